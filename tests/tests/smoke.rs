//! End-to-end: the post-deploy smoke test, `hashistack-agent smoke` on the jumpbox (issue 10, item 7). With the
//! Nomad management token from escrow piped to `--token-file -`, it submits the canary job to the Nomad contract
//! double, whose client logs in to the lab's REAL OpenBao with the task's workload identity, renders the canary
//! secret, runs the task and registers its service with the REAL Consul; smoke waits for each hop and cleans up.
//! Proven here: (a) a healthy lab is all green, and afterwards Consul lists no `hashistack-smoke` and Nomad has
//! no job; (b) with the `jwt-nomad` role removed from Vault the job cannot get its secret: smoke exits 1 naming
//! the allocation step and Vault's refusal, and still cleans up; (c) without a token: exit 2 and one line.
//!
//! Nets 170–173 (this suite's).

use hashistack_agent::node::Role;
use hashistack_e2e::{get_as, healthy_lab, nodes_of, options};
use hashistack_lab::Lab;
use serde_json::Value;
use std::time::Duration;

const STEPS: [&str; 5] = [
    "job hashistack-smoke submitted to Nomad",
    "allocation running",
    "service hashistack-smoke passing in Consul",
    "Vault secret rendered by the job's template",
    "job purged and service deregistered",
];

/// Vault's root token, as an operator opens it from escrow.
fn root_token(lab: &Lab, operator: &str) -> String {
    let v: Value =
        serde_json::from_slice(&hashistack_e2e::escrow_open(lab, operator, "vault")).unwrap();
    v["root_token"].as_str().unwrap().to_string()
}

/// Runs smoke on the jumpbox: exit code, stdout, stderr (printed).
async fn smoke(lab: &Lab, token: &str, extra: &[&str]) -> (i32, String, String) {
    let o = lab.smoke(token, extra, false).await.unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    );
    eprintln!(
        "--- smoke (exit {:?}):\n{out}--- stderr:\n{err}",
        o.status.code()
    );
    (o.status.code().unwrap_or(-1), out, err)
}

/// Nothing of the canary is left: Consul lists no instance, Nomad has no job and no allocation of it.
async fn assert_clean(lab: &Lab, operator: &str, nomad_token: &str) {
    let consul = &lab.nodes[lab.jumpbox().unwrap()];
    let (s, body) = get_as(
        lab,
        &format!(
            "https://{}:8501/v1/catalog/service/hashistack-smoke",
            consul.def.ip
        ),
        "X-Consul-Token",
        &consul_root(lab, operator),
    )
    .await;
    assert_eq!(
        (s, body.trim()),
        (200, "[]"),
        "Consul still lists the canary"
    );
    let nomad = lab.opts.nomad_address().unwrap();
    let (s, body) = get_as(
        lab,
        &format!("{nomad}/v1/job/hashistack-smoke"),
        "X-Nomad-Token",
        nomad_token,
    )
    .await;
    assert_eq!(
        (s, body.trim()),
        (404, "job not found"),
        "Nomad still has the job"
    );
}

/// Consul's management token from the Consul escrow (to look at the catalog as an operator).
fn consul_root(lab: &Lab, operator: &str) -> String {
    let v: Value =
        serde_json::from_slice(&hashistack_e2e::escrow_open(lab, operator, "consul")).unwrap();
    v["secret_id"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke_is_green_in_a_healthy_lab_and_names_a_broken_vault_link() {
    let mut o = options("smoke", 170);
    o.vault_servers = 1;
    o.nomad_servers = 1;
    o.workers = 1;
    o.jumpbox = Some(true);
    let mut lab = healthy_lab(o).await;
    lab.wait_workload_identity(Duration::from_secs(120))
        .await
        .unwrap();
    let token = lab.nomad_management_token().await.unwrap();
    let operator = lab.operator_once().await.unwrap();

    // (a) All green, one line per step with its timing, and nothing left behind.
    let (code, out, _) = smoke(&lab, &token, &["--timeout", "120"]).await;
    assert_eq!(code, 0, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), STEPS.len(), "{out}");
    for (line, step) in lines.iter().zip(STEPS) {
        assert!(
            line.starts_with(&format!("✓ {step}  ")) && line.contains(" ms"),
            "{line:?} is not a green {step:?} with its timing"
        );
    }
    assert!(!out.contains(token.as_str()), "the token is never printed");
    assert_clean(&lab, &operator, &token).await;
    // The worker ran the task: its allocation directory holds the rendered canary.
    let worker = &lab.nodes[nodes_of(&lab, Role::Worker)[0]];
    let nomad_cfg: Value =
        serde_json::from_slice(&std::fs::read(worker.root.join("etc/nomad.d/nomad.json")).unwrap())
            .unwrap();
    let allocs = std::path::Path::new(nomad_cfg["data_dir"].as_str().unwrap()).join("alloc");
    let canaries: Vec<String> = std::fs::read_dir(&allocs)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| std::fs::read_to_string(e.path().join("web/local/canary.txt")).ok())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        canaries,
        [hashistack_agent::names::SMOKE_CANARY],
        "the canary job rendered Vault's marker once"
    );

    // (b) Vault no longer has the role workloads log in with: the job cannot get its secret. Smoke says so at the
    // allocation step, with Vault's refusal, and still cleans up.
    let root = root_token(&lab, &operator);
    let r = lab
        .https()
        .delete(format!(
            "{}/v1/auth/jwt-nomad/role/nomad-workloads",
            lab.opts.vault_address()
        ))
        .header("X-Vault-Token", &root)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);
    let (code, out, _) = smoke(&lab, &token, &["--timeout", "60", "--json"]).await;
    assert_eq!(code, 1, "{out}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["schema"], "hashistack-smoke/1");
    assert_eq!(report["ok"], false);
    let steps: Vec<(&str, bool)> = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["step"].as_str().unwrap(), s["ok"].as_bool().unwrap()))
        .collect();
    assert_eq!(
        steps,
        [("submit", true), ("running", false), ("cleanup", true)],
        "{out}"
    );
    let why = report["steps"][1]["detail"].as_str().unwrap();
    assert!(
        why.contains("failed: Killing: Vault: failed to derive vault token")
            && why.contains("nomad-workloads"),
        "the failure names the Vault login and the missing role: {why}"
    );
    assert_clean(&lab, &operator, &token).await;
    lab.down().await;
}

#[tokio::test]
async fn without_a_token_smoke_says_so_in_one_line_and_exits_2() {
    let tools = hashistack_e2e::tools();
    for args in [vec![], vec!["--token-file", "-"]] {
        let out = tokio::process::Command::new(&tools.agent)
            .arg("smoke")
            .args(&args)
            .env_remove("NOMAD_TOKEN")
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err}");
        assert!(err.contains("Nomad token"), "{err}");
        assert!(out.stdout.is_empty());
    }
}
