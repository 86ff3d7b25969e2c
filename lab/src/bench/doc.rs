//! `hashistack-lab bench-doc`: the generated sections of `docs/PERFORMANCE.md`, from the bench's JSON committed
//! beside it (`docs/bench/latest.json`), so the page cannot drift from what the bench measured (issue 14 item 4).
//!
//! A generated section sits between `<!-- bench:begin NAME -->` and `<!-- bench:end NAME -->` on lines of their
//! own; [`regenerate`] replaces what is between them with [`sections`] and touches nothing else. Every section the
//! inputs produce must have its markers in the page, and every marker must name a section the generator knows
//! ([`KNOWN`]): a missing, unknown or unbalanced marker is an error, not a silently stale table. A known section
//! whose bench mode is not in the inputs yet keeps what the page has (the hand-copied tables of runs whose JSON
//! was not kept). The output depends on the JSON alone (no clock, no machine).

use super::report::{BenchReport, GOAL_BOOTSTRAP_RATIO, PHASE_ORDER};
use super::scale::{ScaleReport, AZURE_KV_LIMIT, AZURE_STORAGE_RPS};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What the generated sections are made from: one JSON file, each key a bench mode's own `--json` output.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DocInputs {
    /// `hashistack-lab bench --json` (boot measurements and/or time to bootstrapped per tier).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bench: Option<BenchReport>,
    /// `hashistack-lab bench --only scale --json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<ScaleReport>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DocError {
    #[error("line {line}: {what}")]
    Marker { line: usize, what: String },
    #[error("section {0:?} has no `<!-- bench:begin {0} -->` / `<!-- bench:end {0} -->` markers in the page")]
    Unplaced(String),
    #[error("markers for section {0:?}, which the generator does not know")]
    Unknown(String),
}

/// Every section the generator can make. A known section the inputs do not produce (its bench mode's JSON is not
/// in them yet) is left as the page has it; an unknown name is an error.
pub const KNOWN: [&str; 5] = [
    "boot-results",
    "boot-steps",
    "tier-results",
    "scale-run",
    "scale-model",
];

const BEGIN: &str = "<!-- bench:begin ";
const END: &str = "<!-- bench:end ";

fn marker<'a>(line: &'a str, prefix: &str) -> Option<&'a str> {
    line.trim()
        .strip_prefix(prefix)?
        .strip_suffix("-->")
        .map(str::trim)
}

/// Workers booting at once for which the model is tabulated.
pub const MODEL_WORKERS: [u32; 3] = [100, 1_000, 10_000];

fn thousands(n: f64) -> String {
    let s = format!("{:.0}", n.round());
    let (sign, digits) = s.strip_prefix('-').map_or(("", s.as_str()), |d| ("-", d));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    format!("{sign}{out}")
}

fn secs(s: f64) -> String {
    if s < 100.0 {
        format!("{s:.1} s")
    } else {
        format!("{} s", thousands(s))
    }
}

/// The generated sections, by name.
pub fn sections(inputs: &DocInputs) -> BTreeMap<&'static str, String> {
    let mut out = BTreeMap::new();
    if let Some(b) = &inputs.bench {
        if !b.lines.is_empty() {
            out.insert("boot-results", boot_results(b));
            out.insert("boot-steps", boot_steps(b));
        }
        if !b.tier_lines.is_empty() {
            out.insert("tier-results", tier_results(b));
        }
    }
    if let Some(r) = &inputs.scale {
        out.insert("scale-run", scale_run(r));
        out.insert("scale-model", scale_model(r));
    }
    out
}

fn value(v: f64, unit: &str) -> String {
    match unit {
        "ms" => format!("{v:.0} ms"),
        "s" => format!("{v:.1} s"),
        _ => format!("{v:.1} {unit}"),
    }
}

fn header(b: &BenchReport, what: String) -> String {
    format!(
        "Run of {} (UTC): {what}; lab agent `{}` ({}); {}; 1-minute load average {:.1} at the start, {:.1} at the \
         end; {}; {}.\n\n",
        b.date_utc.get(..16).unwrap_or(&b.date_utc).replace('T', " "),
        b.lab_agent
            .file_name()
            .map_or(String::new(), |f| f.to_string_lossy().into_owned()),
        b.lab_agent_profile,
        b.machine,
        b.load_avg.0,
        b.load_avg.1,
        b.consul,
        b.bao
    )
}

/// The boot measurements' lines: N, median, max against the goal.
fn boot_results(b: &BenchReport) -> String {
    let mut s = header(b, format!("{} labs of {}", b.runs, b.nodes));
    s.push_str("| metric | N | median | max | goal | result |\n|---|---:|---:|---:|---:|---|\n");
    for l in &b.lines {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            l.metric.trim(),
            l.n,
            l.median.map_or("–".into(), |m| value(m, &l.unit)),
            if l.n == 0 {
                "–".into()
            } else {
                value(l.max, &l.unit)
            },
            match (l.goal_median, l.goal) {
                (Some(gm), Some(g)) => format!(
                    "≤ {} / {} (median / max: no growth)",
                    value(gm, &l.unit),
                    value(g, &l.unit)
                ),
                (_, Some(g)) => format!("≤ {}", value(g, &l.unit)),
                _ => String::new(),
            },
            match l.pass {
                Some(true) => "PASS",
                Some(false) => "**MISS**",
                None => "info",
            }
        ));
    }
    s
}

/// Critical path per kind of boot and role, then per agent step: median / max ms.
fn boot_steps(b: &BenchReport) -> String {
    let med_max = |mut v: Vec<f64>| -> Option<(f64, f64)> {
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let m = v.len() / 2;
        let med = if v.len() % 2 == 1 {
            v[m]
        } else {
            (v[m - 1] + v[m]) / 2.0
        };
        Some((med, v[v.len() - 1]))
    };
    let mut groups: BTreeMap<(&str, &str), Vec<&super::report::BootSample>> = BTreeMap::new();
    for x in &b.boots {
        groups.entry((&x.kind, &x.role)).or_default().push(x);
    }
    let mut s = String::from("| boot | role | total |");
    for p in PHASE_ORDER {
        s.push_str(&format!(" {p} |"));
    }
    s.push_str("\n|---|---|---:|");
    s.push_str(&"---:|".repeat(PHASE_ORDER.len()));
    s.push('\n');
    for ((kind, role), xs) in groups {
        let (m, x) =
            med_max(xs.iter().map(|b| b.critical_path_ms as f64).collect()).unwrap_or((0.0, 0.0));
        s.push_str(&format!("| {kind} | {role} | {m:.0} / {x:.0} |"));
        for p in PHASE_ORDER {
            match med_max(
                xs.iter()
                    .filter_map(|b| b.phases_ms.get(p).copied())
                    .collect(),
            ) {
                Some((m, x)) => s.push_str(&format!(" {m:.1} / {x:.1} |")),
                None => s.push_str(" – |"),
            }
        }
        s.push('\n');
    }
    s
}

/// Time to bootstrapped per tier, agent-driven vs floor, with every run's samples.
fn tier_results(b: &BenchReport) -> String {
    let pairs = b
        .tier_runs
        .iter()
        .filter(|r| r.mode == super::tiers::Mode::Agent)
        .count();
    let mut s = header(
        b,
        format!(
            "{pairs} agent-driven and {} floor labs",
            b.tier_runs.len() - pairs
        ),
    );
    let f = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{v:.2}"));
    s.push_str("| tier | agent-driven median / max | floor median / max | ratio median / max | goal | result |\n");
    s.push_str("|---|---:|---:|---:|---:|---|\n");
    for l in &b.tier_lines {
        s.push_str(&format!(
            "| {} | {} / {} s | {} / {} s | {} / {} | ≤ {GOAL_BOOTSTRAP_RATIO} | {} |\n",
            l.tier,
            f(l.agent_median),
            f(l.agent_max),
            f(l.floor_median),
            f(l.floor_max),
            f(l.ratio_median),
            f(l.ratio_max),
            match l.pass {
                Some(true) => "PASS",
                Some(false) => "**MISS**",
                None => "–",
            }
        ));
    }
    s.push_str("\nPer-run samples (agent | floor), s:");
    for l in &b.tier_lines {
        let j = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{x:.2}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        s.push_str(&format!(
            " {} {} | {};",
            l.tier,
            j(&l.agent_s),
            j(&l.floor_s)
        ));
    }
    s.push('\n');
    s
}

fn scale_run(r: &ScaleReport) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "Run of {} (UTC), {} agent ({}), on {}; 1-minute load average {:.1} at the start, {:.1} at the end.\n\n",
        r.date_utc.get(..16).unwrap_or(&r.date_utc).replace('T', " "),
        r.agent_profile,
        r.agent.file_name().map_or(String::new(), |f| f.to_string_lossy().into_owned()),
        r.machine,
        r.load_avg.0,
        r.load_avg.1
    ));
    s.push_str("| | |\n|---|---|\n");
    let rows: Vec<(String, String)> = vec![
        ("worker agents booting at once".into(), r.agents.to_string()),
        (
            "shared vault's limit in the run".into(),
            format!(
                "{} per {:.0} s (Azure: {} per {:.0} s, so ×{:.0})",
                thousands(f64::from(r.limit)),
                r.window_s,
                thousands(f64::from(r.azure_limit)),
                AZURE_KV_LIMIT.window.as_secs_f64(),
                f64::from(r.azure_limit) / f64::from(r.limit.max(1))
            ),
        ),
        (
            "finished / failed / over the deadline".into(),
            format!(
                "**{} / {} / {}** (deadline {:.0} s per agent)",
                r.finished, r.failed, r.over_deadline, r.deadline_s
            ),
        ),
        (
            "retries before the `Retry-After` of their 429".into(),
            format!("**{}**", r.early_retries),
        ),
        (
            "smallest margin between a 429's `Retry-After` and the agent's next request".into(),
            r.min_retry_margin_s
                .map_or("no 429 was followed by a request".to_string(), |m| {
                    format!("{m:+.3} s")
                }),
        ),
        (
            "agents throttled at least once".into(),
            format!("{} of {}", r.agents_throttled, r.agents),
        ),
        (
            "released → done (agent exited), median / p90 / max".into(),
            format!(
                "{} / {} / {}",
                secs(r.done_median_s),
                secs(r.done_p90_s),
                secs(r.done_max_s)
            ),
        ),
        (
            "first release → last release / last agent done".into(),
            format!("{:.3} s / {}", r.spawn_span_s, secs(r.wall_s)),
        ),
        (
            "Key Vault per boot: transactions + challenges (401)".into(),
            format!(
                "{:.2} + {:.2}",
                r.kv_transactions_per_agent, r.kv_challenges_per_agent
            ),
        ),
        (
            "Blob requests per boot".into(),
            format!("{:.2}", r.storage_requests_per_agent),
        ),
        (
            "peak: agents alive, their RSS, load average".into(),
            format!(
                "{}, {} MB, {:.1}",
                r.peak.agents_alive,
                thousands(r.peak.agents_rss_mb),
                r.peak.load_avg
            ),
        ),
    ];
    for (k, v) in rows {
        s.push_str(&format!("| {k} | {v} |\n"));
    }
    s.push_str("\n| endpoint | requests | served | 429 | 401 challenges | busiest second | served in it | mean/s | most admitted in one window |\n");
    s.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for v in r.vaults.iter().chain(std::iter::once(&r.storage)) {
        let name = if v.endpoint == "storage" {
            "storage (Azurite)".to_string()
        } else {
            format!("vault `{}`", v.endpoint)
        };
        s.push_str(&format!(
            "| {name} | {} | {} | {} | {} | {} | {} | {:.1} | {} |\n",
            v.requests,
            v.served,
            v.throttled,
            v.challenges,
            v.peak_per_s,
            v.peak_served_per_s,
            v.mean_per_s,
            v.max_admitted_per_window.map_or("–".to_string(), |m| {
                format!("{m} (limit {})", r.limit)
            })
        ));
    }
    s
}

fn scale_model(r: &ScaleReport) -> String {
    let per_s = f64::from(AZURE_KV_LIMIT.limit) / AZURE_KV_LIMIT.window.as_secs_f64();
    let tx = r.kv_transactions_per_agent;
    let ch = r.kv_challenges_per_agent;
    let blob = r.storage_requests_per_agent;
    let mut s = format!(
        "Per worker boot, as measured above: **{tx:.2} Key Vault transactions** (+ {ch:.2} challenge round trips) to the \
         shared vault and **{blob:.2} Blob requests**. Azure's limits: {} transactions per {:.0} s per vault ({} per \
         second), {} requests per second per standard storage account. \"At once\" = all boots' requests within one \
         10 s window.\n\n",
        thousands(f64::from(AZURE_KV_LIMIT.limit)),
        AZURE_KV_LIMIT.window.as_secs_f64(),
        thousands(per_s),
        thousands(AZURE_STORAGE_RPS)
    );
    s.push_str("| workers booting at once | shared-vault transactions | per second over 10 s | vs the vault's limit | time for the vault to serve them all, at its limit | the same if Azure counts the challenges | Blob requests per second over 10 s | vs storage |\n");
    s.push_str("|---:|---:|---:|---|---:|---:|---:|---|\n");
    for n in MODEL_WORKERS {
        let n = f64::from(n);
        let total = n * tx;
        let rate = total / 10.0;
        let vs = if rate <= per_s {
            "within".to_string()
        } else {
            format!("**{:.1}× over**", rate / per_s)
        };
        let drain = |t: f64| {
            if t <= f64::from(AZURE_KV_LIMIT.limit) {
                "within the first window".to_string()
            } else {
                secs(t / per_s)
            }
        };
        let brate = n * blob / 10.0;
        s.push_str(&format!(
            "| {} | {} | {} | {vs} | {} | {} | {} | {} |\n",
            thousands(n),
            thousands(total),
            thousands(rate),
            drain(total),
            drain(n * (tx + ch)),
            thousands(brate),
            if brate <= AZURE_STORAGE_RPS {
                "within"
            } else {
                "over"
            }
        ));
    }
    s
}

/// The page with every generated section replaced from `inputs`.
pub fn regenerate(doc: &str, inputs: &DocInputs) -> Result<String, DocError> {
    let secs = sections(inputs);
    let mut out = String::with_capacity(doc.len());
    let mut open: Option<(String, usize)> = None;
    let mut keep = false;
    let mut placed = Vec::new();
    for (i, line) in doc.split_inclusive('\n').enumerate() {
        let n = i + 1;
        if let Some(name) = marker(line, BEGIN) {
            if let Some((o, at)) = &open {
                return Err(DocError::Marker {
                    line: n,
                    what: format!("section {name:?} begins inside {o:?} (begun at line {at})"),
                });
            }
            if !KNOWN.contains(&name) {
                return Err(DocError::Unknown(name.to_string()));
            }
            if placed.iter().any(|p| p == name) {
                return Err(DocError::Marker {
                    line: n,
                    what: format!("section {name:?} placed twice"),
                });
            }
            out.push_str(line);
            // Not produced by these inputs: the page keeps what it has between the markers.
            keep = match secs.get(name) {
                Some(body) => {
                    out.push_str(body);
                    false
                }
                None => true,
            };
            open = Some((name.to_string(), n));
            placed.push(name.to_string());
            continue;
        }
        if let Some(name) = marker(line, END) {
            match &open {
                Some((o, _)) if o == name => {
                    open = None;
                    keep = false;
                    out.push_str(line);
                }
                _ => {
                    return Err(DocError::Marker {
                        line: n,
                        what: format!("`bench:end {name}` without its begin"),
                    })
                }
            }
            continue;
        }
        if open.is_none() || keep {
            out.push_str(line);
        }
    }
    if let Some((o, at)) = open {
        return Err(DocError::Marker {
            line: at,
            what: format!("section {o:?} is never ended"),
        });
    }
    if let Some(missing) = secs.keys().find(|k| !placed.iter().any(|p| p == *k)) {
        return Err(DocError::Unplaced(missing.to_string()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn repo() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    fn committed() -> (String, DocInputs) {
        let doc = std::fs::read_to_string(repo().join("docs/PERFORMANCE.md")).expect("doc");
        let json = std::fs::read(repo().join("docs/bench/latest.json")).expect("latest.json");
        (
            doc,
            serde_json::from_slice(&json).expect("docs/bench/latest.json parses"),
        )
    }

    /// The committed page is exactly what its committed JSON generates: a hand edit of a generated table (or a
    /// new JSON without `hashistack-lab bench-doc`) fails here.
    #[test]
    fn the_committed_page_matches_its_json() {
        let (doc, inputs) = committed();
        assert!(
            inputs.scale.is_some(),
            "docs/bench/latest.json has the scale run"
        );
        let again = regenerate(&doc, &inputs).expect("the page's markers parse");
        assert!(
            again == doc,
            "docs/PERFORMANCE.md differs from what docs/bench/latest.json generates: run `hashistack-lab bench-doc`"
        );
    }

    #[test]
    fn generation_is_deterministic_and_idempotent() {
        let (doc, inputs) = committed();
        let a = regenerate(&doc, &inputs).unwrap();
        let b = regenerate(&a, &inputs).unwrap();
        assert_eq!(a, b);
        // From the JSON text again (a round trip through serde changes nothing).
        let text = serde_json::to_string(&inputs).unwrap();
        let back: DocInputs = serde_json::from_str(&text).unwrap();
        assert_eq!(regenerate(&doc, &back).unwrap(), a);
    }

    #[test]
    fn a_hand_edit_inside_a_section_is_replaced_and_outside_kept() {
        let (doc, inputs) = committed();
        let edited = doc.replacen(
            "| worker agents booting at once |",
            "| worker agents (edited) |",
            1,
        );
        assert_ne!(edited, doc, "the scale-run table is in the page");
        assert_eq!(regenerate(&edited, &inputs).unwrap(), doc);
        let outside = format!("{doc}\nA line of prose.\n");
        assert_eq!(regenerate(&outside, &inputs).unwrap(), outside);
    }

    #[test]
    fn bad_markers_are_errors() {
        // The scale sections only: with a bench report in the inputs, its sections must be placed too.
        let (_, mut inputs) = committed();
        inputs.bench = None;
        let both = "<!-- bench:begin scale-run -->\n<!-- bench:end scale-run -->\n<!-- bench:begin scale-model -->\nx\n<!-- bench:end scale-model -->\n";
        assert!(regenerate(both, &inputs).is_ok());
        let only_one = "<!-- bench:begin scale-run -->\n<!-- bench:end scale-run -->\n";
        assert_eq!(
            regenerate(only_one, &inputs),
            Err(DocError::Unplaced("scale-model".into()))
        );
        let unended = "<!-- bench:begin scale-run -->\ntext\n";
        assert!(matches!(
            regenerate(unended, &inputs),
            Err(DocError::Marker { line: 1, .. })
        ));
        let stray_end = "text\n<!-- bench:end scale-run -->\n";
        assert!(matches!(
            regenerate(stray_end, &inputs),
            Err(DocError::Marker { line: 2, .. })
        ));
        let unknown = "<!-- bench:begin nothing -->\n<!-- bench:end nothing -->\n";
        assert_eq!(
            regenerate(unknown, &inputs),
            Err(DocError::Unknown("nothing".into()))
        );
        // Without inputs, no section: a page without markers is fine.
        assert_eq!(
            regenerate("plain\n", &DocInputs::default()).unwrap(),
            "plain\n"
        );
    }

    #[test]
    fn a_known_section_without_its_json_is_kept_as_the_page_has_it() {
        let page = "a\n<!-- bench:begin boot-results -->\n| hand | table |\n<!-- bench:end boot-results -->\nb\n";
        assert_eq!(regenerate(page, &DocInputs::default()).unwrap(), page);
    }

    /// A bench run's JSON (as `bench --json` prints it, reduced) generates the boot and tier sections.
    #[test]
    fn the_boot_and_tier_sections_come_from_the_bench_json() {
        let json = serde_json::json!({
            "date_utc": "2026-12-06T10:00:00Z", "runs": 1, "nodes": "3 consul-server + 3 vault-server",
            "machine": "2 cores", "load_avg": [0.5, 0.7], "lab_agent": "/x/release/hashistack-agent",
            "lab_agent_profile": "release", "agent_release": null, "binary_bytes": null, "binary_stripped": null,
            "consul": "Consul v1.8.7", "bao": "OpenBao v2.7.2",
            "lines": [
                {"metric": "critical path, warm reboot: one node alone", "unit": "ms", "n": 2, "median": 7.0,
                 "max": 23.0, "goal": 100.0, "pass": true},
                {"metric": "lab healthy", "unit": "s", "n": 1, "median": 7.6, "max": 7.6, "goal": null,
                 "pass": null}
            ],
            "boots": [
                {"run": 1, "node": "consul-0", "role": "consul-server", "kind": "warm", "critical_path_ms": 6,
                 "spawn_to_record_ms": 6.5, "phases_ms": {"metadata": 4.1, "services": 2.0}, "files_changed": 0,
                 "peak_rss_bytes": 9000000}
            ],
            "labs": [],
            "tier_lines": [
                {"tier": "vault", "agent_definition": "a", "floor_definition": "f", "agent_s": [5.83, 6.13],
                 "floor_s": [5.82, 5.92], "agent_median": 5.98, "agent_max": 6.13, "floor_median": 5.87,
                 "floor_max": 5.92, "ratio_median": 1.02, "ratio_max": 1.04, "pass": true}
            ],
            "tier_runs": [
                {"run": 1, "mode": "agent", "up_s": 1.0, "load_avg": 0.4, "milestones": {}, "leaders": {}},
                {"run": 1, "mode": "floor", "up_s": 1.0, "load_avg": 0.4, "milestones": {}, "leaders": {}}
            ]
        });
        let bench: BenchReport =
            serde_json::from_value(json).expect("a bench --json output parses");
        let inputs = DocInputs {
            bench: Some(bench),
            scale: None,
        };
        let page = "<!-- bench:begin boot-results -->\nold\n<!-- bench:end boot-results -->\n\
                    <!-- bench:begin boot-steps -->\n<!-- bench:end boot-steps -->\n\
                    <!-- bench:begin tier-results -->\n<!-- bench:end tier-results -->\n";
        let out = regenerate(page, &inputs).unwrap();
        assert!(!out.contains("old"));
        assert!(out.contains("| critical path, warm reboot: one node alone | 2 | 7 ms | 23 ms | ≤ 100 ms | PASS |"), "{out}");
        assert!(
            out.contains("| lab healthy | 1 | 7.6 s | 7.6 s |  | info |"),
            "{out}"
        );
        assert!(
            out.contains("| warm | consul-server | 6 / 6 | – | 4.1 / 4.1 |"),
            "{out}"
        );
        assert!(
            out.contains("| vault | 5.98 / 6.13 s | 5.87 / 5.92 s | 1.02 / 1.04 | ≤ 1.25 | PASS |"),
            "{out}"
        );
        assert!(out.contains("1 agent-driven and 1 floor labs"), "{out}");
        assert_eq!(regenerate(&out, &inputs).unwrap(), out);
    }

    #[test]
    fn numbers_are_grouped() {
        assert_eq!(thousands(4000.0), "4,000");
        assert_eq!(thousands(120_000.0), "120,000");
        assert_eq!(thousands(400.0), "400");
        assert_eq!(thousands(1_234_567.4), "1,234,567");
    }
}
