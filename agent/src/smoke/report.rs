//! The smoke test's steps and how they are shown: one line per step as it ends (`✓|✗ <step>  <ms> ms`, a
//! failure with what was seen), or one JSON document (`--json`, schema `hashistack-smoke/1`).

use serde::Serialize;

pub const SCHEMA: &str = "hashistack-smoke/1";

/// The hops of docs/architecture.md's "Life of a workload", in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    /// `PUT /v1/jobs`: Nomad accepted the canary job.
    Submit,
    /// An allocation of the job runs on a client (its template read the Vault secret before the task started).
    Running,
    /// Consul lists the allocation's service instance as passing.
    Passing,
    /// The rendered canary file holds the marker Vault's secret holds.
    Secret,
    /// The job is purged and Consul lists no instance of its service.
    Cleanup,
}

impl Step {
    pub fn label(self) -> &'static str {
        match self {
            Step::Submit => "job hashistack-smoke submitted to Nomad",
            Step::Running => "allocation running",
            Step::Passing => "service hashistack-smoke passing in Consul",
            Step::Secret => "Vault secret rendered by the job's template",
            Step::Cleanup => "job purged and service deregistered",
        }
    }
}

/// How one step ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Outcome {
    pub step: Step,
    pub ok: bool,
    pub ms: u64,
    /// What was seen: the failure, or a detail of a success (the allocation's ID).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// The line of a step: `✓ <step>  <ms> ms` (plus ` (<detail>)`), or `✗ <step>  <ms> ms: <what was seen>`.
pub fn line(o: &Outcome) -> String {
    let head = format!(
        "{} {}  {} ms",
        if o.ok { '✓' } else { '✗' },
        o.step.label(),
        o.ms
    );
    match (&o.detail, o.ok) {
        (Some(d), true) => format!("{head} ({d})"),
        (Some(d), false) => format!("{head}: {d}"),
        (None, _) => head,
    }
}

/// The whole run, for `--json`.
#[derive(Debug, Serialize)]
pub struct Report {
    pub schema: &'static str,
    pub ok: bool,
    pub exit_code: u8,
    pub steps: Vec<Outcome>,
}

impl Report {
    pub fn new(steps: Vec<Outcome>) -> Report {
        let ok = !steps.is_empty() && steps.iter().all(|s| s.ok);
        Report {
            schema: SCHEMA,
            ok,
            exit_code: if ok { 0 } else { 1 },
            steps,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(step: Step, ok: bool, ms: u64, detail: Option<&str>) -> Outcome {
        Outcome {
            step,
            ok,
            ms,
            detail: detail.map(String::from),
        }
    }

    #[test]
    fn one_line_per_step_with_its_timing_and_what_was_seen() {
        assert_eq!(
            line(&o(Step::Submit, true, 12, None)),
            "✓ job hashistack-smoke submitted to Nomad  12 ms"
        );
        assert_eq!(
            line(&o(
                Step::Running,
                true,
                3400,
                Some("allocation 1a2b3c4d on worker-0")
            )),
            "✓ allocation running  3400 ms (allocation 1a2b3c4d on worker-0)"
        );
        assert_eq!(
            line(&o(
                Step::Running,
                false,
                812,
                Some("allocation 1a2b3c4d failed: Template failed: vault.read(secret/data/default/hashistack-smoke): permission denied")
            )),
            "✗ allocation running  812 ms: allocation 1a2b3c4d failed: Template failed: vault.read(secret/data/default/hashistack-smoke): permission denied"
        );
    }

    #[test]
    fn the_report_is_green_only_when_every_step_is() {
        let green = Report::new(vec![
            o(Step::Submit, true, 1, None),
            o(Step::Cleanup, true, 2, None),
        ]);
        assert!(green.ok);
        assert_eq!(green.exit_code, 0);
        let red = Report::new(vec![
            o(Step::Submit, true, 1, None),
            o(Step::Running, false, 9, Some("x")),
            o(Step::Cleanup, true, 2, None),
        ]);
        assert!(!red.ok);
        assert_eq!(red.exit_code, 1);
        assert!(!Report::new(vec![]).ok, "no step run is not a success");
        let v = serde_json::to_value(&red).unwrap();
        assert_eq!(v["schema"], "hashistack-smoke/1");
        assert_eq!(v["steps"][1]["step"], "running");
        assert_eq!(v["steps"][1]["detail"], "x");
        assert!(v["steps"][0].get("detail").is_none());
    }
}
