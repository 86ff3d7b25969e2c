//! Rendered configs against the real binaries the lab installs (`bash lab/setup.sh`): `consul validate` on
//! every rendered Consul config dir, and a real `bao server` from every rendered Vault config.
//!
//! Without the binaries these tests print SKIPPED and pass, unless CI is set, where a missing binary fails.

mod common;

use common::{
    agent_config, imds_fixture, imds_fixture_path, render_with_material, require_tool, run_render,
    set_ip, set_tag, text, versions, ROLE_FIXTURES,
};
use hashistack_agent::bootstrap::vault as bvault;
use hashistack_agent::render::{vault, Layout};
use hashistack_agent::services::health::{client_for, probe, Probe};
use hashistack_agent::services::{read_env_file, Health};
use hashistack_agent::version::{self, Installed, Product, Version};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The lab's binary for `product` (`require_tool`) and what its `version` says.
fn installed(
    env_var: &str,
    path_name: &str,
    what: &str,
    product: Product,
) -> Option<(PathBuf, Installed)> {
    let bin = require_tool(env_var, path_name, what)?;
    let out = Command::new(&bin)
        .arg("version")
        .output()
        .unwrap_or_else(|e| panic!("{path_name} version: {e}"));
    let installed = version::parse_version_output(product, &text(&out.stdout))
        .unwrap_or_else(|| panic!("{} version: {}", bin.display(), text(&out.stdout)));
    eprintln!(
        "using {} ({} {})",
        bin.display(),
        installed.distribution,
        installed.version
    );
    Some((bin, installed))
}

fn consul() -> Option<(PathBuf, Installed)> {
    installed(
        "HASHISTACK_CONSUL",
        "consul",
        "consul binary",
        Product::Consul,
    )
}

fn bao() -> Option<(PathBuf, Installed)> {
    installed(
        "HASHISTACK_BAO",
        "bao",
        "OpenBao binary (bao)",
        Product::Vault,
    )
}

fn consul_validate(bin: &Path, dir: &Path) -> (bool, String) {
    let o = Command::new(bin)
        .arg("validate")
        .arg(dir)
        .output()
        .expect("run consul validate");
    (
        o.status.success(),
        format!("{}{}", text(&o.stdout), text(&o.stderr)),
    )
}

/// Offline renders (`render --out`, no key material) for the installed Consul's version.
#[test]
fn consul_validate_accepts_every_offline_render() {
    let Some((bin, installed)) = consul() else {
        return;
    };
    for fixture in ROLE_FIXTURES {
        let out = tempfile::tempdir().unwrap();
        let o = run_render(
            &imds_fixture_path(fixture),
            out.path(),
            &[("consul", &installed.version.to_string())],
        );
        assert!(o.status.success(), "{fixture}: {}", text(&o.stderr));
        let (ok, said) = consul_validate(&bin, &out.path().join("etc/consul.d"));
        assert!(
            ok,
            "{fixture}: consul validate rejected the render:\n{said}"
        );
        assert!(said.contains("Configuration is valid"), "{fixture}: {said}");
        assert!(
            !said.to_lowercase().contains("warn"),
            "{fixture}: consul validate warns:\n{said}"
        );
    }
}

/// The Vault audit log's rotation rule (etc/logrotate.d/vault-audit) as the real logrotate reads it: `-d`
/// parses the rule and walks a rotation without touching anything; any error or warning fails.
#[test]
fn logrotate_accepts_the_audit_log_rule() {
    let Some(bin) = common::find_tool("HASHISTACK_LOGROTATE", "logrotate")
        .or_else(|| Some(PathBuf::from("/usr/sbin/logrotate")).filter(|p| p.is_file()))
    else {
        assert!(
            !common::in_ci(),
            "logrotate not found and CI is set (`bash lab/setup.sh` installs it)"
        );
        eprintln!("SKIPPED: logrotate not found (run `bash lab/setup.sh`)");
        return;
    };
    for fixture in ["vault-server-akv", "vault-server-transit"] {
        let out = tempfile::tempdir().unwrap();
        let o = run_render(&imds_fixture_path(fixture), out.path(), &[]);
        assert!(o.status.success(), "{fixture}: {}", text(&o.stderr));
        let rule = out.path().join("etc/logrotate.d/vault-audit");
        let state = out.path().join("logrotate.state");
        let o = Command::new(&bin)
            .arg("-d")
            .arg("-s")
            .arg(&state)
            .arg(&rule)
            .output()
            .expect("run logrotate");
        let said = format!("{}{}", text(&o.stdout), text(&o.stderr));
        assert!(
            o.status.success(),
            "{fixture}: logrotate -d failed:\n{said}"
        );
        // `-d` itself always warns that it changes nothing; anything else said as an error or warning fails.
        let findings: Vec<&str> = said
            .lines()
            .filter(|l| !l.starts_with("warning: logrotate in debug mode does nothing"))
            .filter(|l| {
                let l = l.to_lowercase();
                l.contains("error") || l.contains("warning")
            })
            .collect();
        assert!(findings.is_empty(), "{fixture}: {findings:?}\n{said}");
        assert!(
            said.contains("/var/log/vault/audit.log"),
            "{fixture}:\n{said}"
        );
    }
}

/// Full renders, as boot writes them: certificates, keys and gossip.json exist and are read by validate.
#[test]
fn consul_validate_accepts_every_render_with_material() {
    let Some((bin, installed)) = consul() else {
        return;
    };
    for fixture in ROLE_FIXTURES {
        let dir = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        let cfg = agent_config(dir.path(), root.path(), true, "s.transit");
        render_with_material(
            &imds_fixture(fixture),
            &cfg,
            &versions(Some(&installed), None),
        );
        let cdir = root.path().join("etc/consul.d");
        assert!(cdir.join("gossip.json").is_file(), "{fixture}");
        // Workers and the jumpbox get their certificate from the servers (auto_encrypt): no key on disk.
        let auto = hashistack_agent::render::consul::uses_auto_encrypt(
            hashistack_agent::node::NodeSpec::from_metadata(
                &hashistack_agent::imds::InstanceMetadata::from_json(
                    &serde_json::to_vec(&imds_fixture(fixture)).unwrap(),
                )
                .unwrap(),
            )
            .unwrap()
            .role,
        );
        assert_eq!(
            cdir.join("tls/consul-key.pem").is_file(),
            !auto,
            "{fixture}"
        );
        assert!(cdir.join("tls/ca.pem").is_file(), "{fixture}");
        let (ok, said) = consul_validate(&bin, &cdir);
        assert!(
            ok,
            "{fixture}: consul validate rejected the render:\n{said}"
        );
    }
}

/// The check can fail: a misspelled key, and (on a Consul older than 1.12) the current `tls` block syntax.
#[test]
fn consul_validate_rejects_broken_configs() {
    let Some((bin, installed)) = consul() else {
        return;
    };
    let out = tempfile::tempdir().unwrap();
    let server = imds_fixture_path("consul-server");
    let o = run_render(
        &server,
        out.path(),
        &[("consul", &installed.version.to_string())],
    );
    assert!(o.status.success());
    let cdir = out.path().join("etc/consul.d");
    let file = cdir.join("consul.json");
    let good = std::fs::read(&file).unwrap();
    assert!(consul_validate(&bin, &cdir).0, "baseline is valid");

    let mut v: Value = serde_json::from_slice(&good).unwrap();
    let join = v.as_object_mut().unwrap().remove("retry_join").unwrap();
    v["retry_jion"] = join;
    std::fs::write(&file, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    let (ok, said) = consul_validate(&bin, &cdir);
    assert!(!ok, "a misspelled key must be rejected:\n{said}");
    assert!(said.contains("retry_jion"), "{said}");

    let mut v: Value = serde_json::from_slice(&good).unwrap();
    v["bootstrap_expect"] = Value::from("three");
    std::fs::write(&file, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    assert!(
        !consul_validate(&bin, &cdir).0,
        "a mistyped value must be rejected"
    );

    if installed.version < Version::new(1, 12, 0) {
        let o = run_render(&server, out.path(), &[("consul", "1.20.0")]);
        assert!(o.status.success());
        let (ok, said) = consul_validate(&bin, &cdir);
        assert!(
            !ok,
            "Consul {} must reject 1.20 syntax, which is why rendering is version-aware:\n{said}",
            installed.version
        );
    }
}

// ----- OpenBao ------------------------------------------------------------------------------------------

/// A loopback /24 of our own, so parallel runs and the lab (127.0.0.x) do not collide on port 8200.
fn test_net() -> String {
    format!(
        "127.{}.{}",
        90 + std::process::id() % 100,
        10 + std::process::id() % 200
    )
}

struct Child {
    child: std::process::Child,
    log: PathBuf,
}
impl Child {
    fn spawn(mut cmd: Command, log: PathBuf) -> Child {
        let f = std::fs::File::create(&log).unwrap();
        cmd.stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f);
        Child {
            child: cmd.spawn().expect("spawn"),
            log,
        }
    }
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn bao_command(bin: &Path, home: &Path) -> Command {
    let mut c = Command::new(bin);
    for k in [
        "VAULT_ADDR",
        "VAULT_TOKEN",
        "VAULT_CACERT",
        "BAO_ADDR",
        "BAO_TOKEN",
        "VAULT_SEAL_TYPE",
    ] {
        c.env_remove(k);
    }
    c.env("HOME", home);
    c
}

async fn wait_until<F, Fut, T>(what: &str, child: &mut Child, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if let Some(status) = child.exited() {
            panic!("{what}: process exited ({status}):\n{}", child.log());
        }
        if start.elapsed() > Duration::from_secs(60) {
            panic!("{what}: not ready in 60 s:\n{}", child.log());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Sends the request; the answer's body as JSON.
async fn json_answer(req: reqwest::RequestBuilder) -> Value {
    req.send().await.unwrap().json().await.unwrap()
}

/// A dev-mode OpenBao with a transit key, standing in for the lab's auto-unseal provider.
async fn transit_provider(bin: &Path, home: &Path, ip: &str) -> Child {
    let mut cmd = bao_command(bin, home);
    cmd.args([
        "server",
        "-dev",
        "-dev-root-token-id=root",
        &format!("-dev-listen-address={ip}:8200"),
    ]);
    let mut child = Child::spawn(cmd, home.join("transit.log"));
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let base = format!("http://{ip}:8200");
    wait_until("transit provider", &mut child, || {
        let http = http.clone();
        let url = format!("{base}/v1/sys/health");
        async move {
            match http.get(url).send().await {
                Ok(r) if r.status().is_success() => Some(()),
                _ => None,
            }
        }
    })
    .await;
    for (path, body) in [
        (
            "/v1/sys/mounts/transit",
            serde_json::json!({"type": "transit"}),
        ),
        ("/v1/transit/keys/autounseal", serde_json::json!({})),
    ] {
        let r = http
            .post(format!("{base}{path}"))
            .header("X-Vault-Token", "root")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{path}: {}", r.status());
    }
    child
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bao_serves_from_the_rendered_transit_config() {
    let Some((bin, installed)) = bao() else {
        return;
    };
    let net = test_net();
    let (transit_ip, node_ip) = (format!("{net}.2"), format!("{net}.10"));
    let dir = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let transit = transit_provider(&bin, dir.path(), &transit_ip).await;

    // The lab's vault-server document, on our addresses.
    let mut doc = imds_fixture("vault-server-transit");
    set_ip(&mut doc, &node_ip);
    set_tag(
        &mut doc,
        "hashistack-vault-join",
        &format!("{net}.10 {net}.11 {net}.12"),
    );
    set_tag(
        &mut doc,
        "hashistack-vault-seal",
        &format!(
            "transit address=http://{transit_ip}:8200 key_name=autounseal mount_path=transit/"
        ),
    );
    let cfg = agent_config(dir.path(), root.path(), false, "root");
    let (spec, plan) = render_with_material(&doc, &cfg, &versions(None, Some(&installed)));
    let svc = plan
        .services
        .iter()
        .find(|s| s.name == "vault")
        .expect("vault service");

    // Run exactly what the unit/process backend runs, with the rendered environment file.
    let mut cmd = bao_command(&bin, dir.path());
    cmd.args(&svc.command[1..]);
    let env_file = svc.env_file.as_ref().expect("vault has an env file");
    let env = read_env_file(env_file).unwrap();
    assert!(env.iter().any(|(k, v)| k == "VAULT_TOKEN" && v == "root"));
    cmd.envs(env);
    let mut server = Child::spawn(cmd, dir.path().join("vault.log"));

    let layout = Layout::new(root.path());
    let ca = layout.ca_file(Product::Vault);
    let health = Health::VaultHttps {
        addr: format!("{}:8200", spec.ip),
        ca_file: ca.clone(),
    };
    let p = wait_until("bao server", &mut server, || {
        let h = health.clone();
        async move {
            match probe(&h, Duration::from_secs(2)).await {
                Probe::Unreachable { .. } => None,
                p => Some(p),
            }
        }
    })
    .await;
    assert_eq!(
        p,
        Probe::Vault {
            initialized: false,
            sealed: true
        },
        "log:\n{}",
        server.log()
    );
    // The raw answer, over HTTPS verified against the cluster CA only.
    let status = json_answer(
        client_for(&ca, Duration::from_secs(5))
            .unwrap()
            .get(format!("https://{}:8200/v1/sys/seal-status", spec.ip)),
    )
    .await;
    assert_eq!(status["initialized"], false, "{status}");
    assert_eq!(
        status["type"], "transit",
        "the rendered seal is in use: {status}"
    );
    let log = server.log();
    assert!(
        !log.to_lowercase().contains("unknown or unsupported field"),
        "every rendered key is known to {} {}:\n{log}",
        installed.distribution,
        installed.version
    );

    // The declared audit device (OpenBao >= 2.4): mounted by the server itself once it is initialized and
    // unsealed, writing where vault.service may write, with no API call.
    if vault::declares_audit_devices(&installed) {
        let api = format!("https://{}:8200", spec.ip);
        let http = client_for(&ca, Duration::from_secs(120)).unwrap();
        let init = json_answer(
            http.put(format!("{api}/v1/sys/init"))
                .json(&serde_json::json!({"recovery_shares": 1, "recovery_threshold": 1})),
        )
        .await;
        let root_token = init["root_token"]
            .as_str()
            .unwrap_or_else(|| panic!("init answered without a root token; log:\n{}", server.log()))
            .to_string();
        wait_until("auto-unseal after init", &mut server, || {
            let h = health.clone();
            async move {
                match probe(&h, Duration::from_secs(2)).await {
                    Probe::Vault {
                        initialized: true,
                        sealed: false,
                    } => Some(()),
                    _ => None,
                }
            }
        })
        .await;
        // Unsealed is not yet active: until the node has taken over, it answers 5xx (the agent retries
        // these too).
        let list: Value = wait_until("sys/audit listing", &mut server, || {
            let req = http
                .get(format!("{api}/v1/sys/audit"))
                .header("X-Vault-Token", &root_token)
                .send();
            async move {
                match req.await {
                    Ok(r) if r.status().is_success() => r.json().await.ok(),
                    Ok(r) if r.status().is_server_error() => None,
                    Ok(r) => panic!("sys/audit: HTTP {}", r.status()),
                    Err(_) => None,
                }
            }
        })
        .await;
        let file = vault::audit_file(&layout);
        assert_eq!(list["data"]["file/"]["type"], "file", "{list}");
        assert_eq!(
            list["data"]["file/"]["options"]["file_path"],
            file.display().to_string(),
            "{list}"
        );
        let lines = |f: &Path| -> Vec<Value> {
            std::fs::read_to_string(f)
                .unwrap_or_default()
                .lines()
                .map(|l| {
                    serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line {l:?}: {e}"))
                })
                .collect()
        };
        let before = lines(&file);
        assert!(
            !before.is_empty(),
            "{} has audit lines after the listing",
            file.display()
        );
        let r = http
            .get(format!("{api}/v1/auth/token/lookup-self"))
            .header("X-Vault-Token", &root_token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let after = lines(&file);
        assert!(
            after.len() >= before.len() + 2,
            "a request and its response are logged: {} -> {} lines",
            before.len(),
            after.len()
        );
        assert!(after
            .iter()
            .any(|l| l["type"] == "response" && l["request"]["path"] == "auth/token/lookup-self"));
        let raw = std::fs::read_to_string(&file).unwrap();
        assert!(
            !raw.contains(&root_token),
            "the root token is HMAC'd in the audit log"
        );
        eprintln!(
            "declared audit device file/ active: {} lines in {}",
            after.len(),
            file.display()
        );
    } else {
        eprintln!(
            "{} {} declares no audit devices: audit checks skipped",
            installed.distribution, installed.version
        );
    }
    drop(server);
    drop(transit);
}

/// Walks `bao operator diagnose -format=json` output: (name, status, message) of every check.
fn diagnose_checks(v: &Value, out: &mut Vec<(String, String, String)>) {
    out.push((
        v["name"].as_str().unwrap_or("").to_string(),
        v["status"].as_str().unwrap_or("").to_string(),
        v["message"].as_str().unwrap_or("").to_string(),
    ));
    if let Some(children) = v["children"].as_array() {
        for c in children {
            diagnose_checks(c, out);
        }
    }
}

/// The Azure render (`seal "azurekeyvault"`, cloud auto-join). Azure runs HashiCorp Vault, whose binary has
/// the Key Vault seal built in; the lab's OpenBao moved that seal to an external KMS plugin (2.7), so here
/// `bao operator diagnose` must accept everything but the seal it cannot build without Azure.
#[test]
fn bao_diagnose_accepts_the_rendered_azure_config_but_the_seal() {
    let Some((bin, installed)) = bao() else {
        return;
    };
    let net = test_net();
    let dir = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let mut doc = imds_fixture("vault-server-akv");
    set_ip(&mut doc, &format!("{net}.25"));
    let cfg = agent_config(dir.path(), root.path(), false, "unused");
    render_with_material(&doc, &cfg, &versions(None, Some(&installed)));
    let file = Layout::new(root.path()).config_file(Product::Vault);

    let o = bao_command(&bin, dir.path())
        .args(["operator", "diagnose", "-format=json"])
        .arg(format!("-config={}", file.display()))
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "diagnose output is not JSON ({e}):\n{}{}",
            text(&o.stdout),
            text(&o.stderr)
        )
    });
    let mut checks = Vec::new();
    diagnose_checks(&report, &mut checks);
    let status = |name: &str| -> String {
        checks
            .iter()
            .find(|c| c.0 == name)
            .map(|c| c.1.clone())
            .unwrap_or_else(|| panic!("no diagnose check {name:?} in {checks:?}"))
    };
    assert_ne!(status("Parse Configuration"), "fail", "{checks:?}");
    assert_eq!(status("Create Storage Backend"), "ok", "{checks:?}");
    assert_eq!(status("Create Listeners"), "ok", "{checks:?}");
    assert_eq!(status("Check Listener TLS"), "ok", "{checks:?}");
    assert_eq!(status("Check Cluster Address"), "ok", "{checks:?}");
    let seal_related = |c: &(String, String, String)| {
        let s = format!("{} {}", c.0, c.2).to_lowercase();
        s.contains("seal") || s.contains("azurekeyvault")
    };
    // Diagnose's telemetry check fails every `telemetry` stanza without Stackdriver settings: it tests
    // `coalesce(…, t.StackdriverDebugLogs, …) != nil`, and a bool `false` is never nil (command/operator_diagnose.go,
    // Vault and OpenBao alike). That one message, and only it, is not a finding about the rendered telemetry,
    // which the server itself accepts (bao_serves_from_the_rendered_transit_config serves from it).
    let diagnose_stackdriver_bug = |c: &(String, String, String)| {
        c.0 == "Check Telemetry"
            && c.2
                == "incomplete Stackdriver telemetry configuration, missing stackdriver_project_id"
    };
    let leaf_failures: Vec<_> = checks
        .iter()
        .filter(|c| c.1 == "fail" && c.0 != "Vault Diagnose" && !diagnose_stackdriver_bug(c))
        .collect();
    assert!(
        leaf_failures.iter().all(|c| seal_related(c)),
        "only the seal may fail: {leaf_failures:?}"
    );
    assert!(
        checks
            .iter()
            .any(|c| c.1 == "fail" && c.2.contains("azurekeyvault")),
        "the seal is the rendered azurekeyvault one: {checks:?}"
    );
    // No key of the rendered config is unknown to this binary.
    let parse = find_check(&report, "Parse Configuration").expect("parse check");
    assert!(
        parse["warnings"].as_array().is_none_or(|w| w.is_empty()),
        "configuration warnings: {}",
        parse["warnings"]
    );
}

fn find_check<'a>(v: &'a Value, name: &str) -> Option<&'a Value> {
    if v["name"] == name {
        return Some(v);
    }
    v["children"]
        .as_array()?
        .iter()
        .find_map(|c| find_check(c, name))
}

/// One rendered OpenBao node that the test can power off (SIGKILL) and on again, keeping its data directory.
struct PowerNode {
    bin: PathBuf,
    home: PathBuf,
    command: Vec<String>,
    env: Vec<(String, String)>,
    server: Option<Child>,
    health: Health,
}

impl PowerNode {
    fn on(&mut self) {
        let mut cmd = bao_command(&self.bin, &self.home);
        cmd.args(&self.command[1..]);
        cmd.envs(self.env.clone());
        let n = std::fs::read_dir(&self.home)
            .map(|d| d.count())
            .unwrap_or(0);
        self.server = Some(Child::spawn(cmd, self.home.join(format!("vault-{n}.log"))));
    }
    fn off(&mut self) {
        // Drop kills (SIGKILL) and reaps: a power loss.
        self.server = None;
    }
    async fn wait_answering(&mut self) {
        let h = self.health.clone();
        wait_until("bao answering", self.server.as_mut().unwrap(), || {
            let h = h.clone();
            async move {
                match probe(&h, Duration::from_secs(2)).await {
                    Probe::Unreachable { .. } => None,
                    p => Some(p),
                }
            }
        })
        .await;
    }
}

/// Test seam for the tier's local repair: powers the node off, empties its data directory, powers it on.
struct ResetPowerNode(std::sync::Arc<tokio::sync::Mutex<PowerNode>>, PathBuf);

#[async_trait::async_trait]
impl bvault::LocalStorage for ResetPowerNode {
    async fn reset(&self) -> Result<(), hashistack_agent::bootstrap::TierError> {
        let mut n = self.0.lock().await;
        n.off();
        bvault::empty_dir(&self.1).map_err(|e| hashistack_agent::bootstrap::TierError::Step {
            step: "storage reset: empty",
            detail: e.to_string(),
        })?;
        n.on();
        Ok(())
    }
}

/// Power loss in the middle of `sys/init`, on the real OpenBao: raft is bootstrapped with the node as its only
/// voter but no seal configuration was written, so every later init answers 400 "cluster already has state".
/// The Vault tier classifies that answer, resets the node's storage and initializes it for real. (The delay that
/// lands inside the window is found by trying a few; a delay that lands before or after it leaves a clean or an
/// initialized node, which the test says and tries the next.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bao_half_initialized_by_power_loss_is_reset_and_initialized() {
    use hashistack_agent::bootstrap::{Tier, TierFailure};
    let Some((bin, installed)) = bao() else {
        return;
    };
    let net = test_net();
    let (transit_ip, node_ip) = (format!("{net}.3"), format!("{net}.20"));
    let dir = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let _transit = transit_provider(&bin, dir.path(), &transit_ip).await;
    let mut doc = imds_fixture("vault-server-transit");
    set_ip(&mut doc, &node_ip);
    set_tag(&mut doc, "hashistack-vault-join", &node_ip);
    set_tag(&mut doc, "hashistack-vault-servers", "1");
    set_tag(
        &mut doc,
        "hashistack-vault-seal",
        &format!(
            "transit address=http://{transit_ip}:8200 key_name=autounseal mount_path=transit/"
        ),
    );
    let cfg = agent_config(dir.path(), root.path(), false, "root");
    let (spec, plan) = render_with_material(&doc, &cfg, &versions(None, Some(&installed)));
    let svc = plan.services.iter().find(|s| s.name == "vault").unwrap();
    let layout = Layout::new(root.path());
    let ca = layout.ca_file(Product::Vault);
    let data = layout.data_dir(Product::Vault, spec.role);
    let api = format!("https://{}:8200", spec.ip);
    let home = dir.path().join("node");
    std::fs::create_dir_all(&home).unwrap();
    let node = std::sync::Arc::new(tokio::sync::Mutex::new(PowerNode {
        bin: bin.clone(),
        home,
        command: svc.command.clone(),
        env: read_env_file(svc.env_file.as_ref().unwrap()).unwrap(),
        server: None,
        health: Health::VaultHttps {
            addr: format!("{}:8200", spec.ip),
            ca_file: ca.clone(),
        },
    }));
    let http = client_for(&ca, Duration::from_secs(120)).unwrap();
    let tier = |local: Option<Box<dyn bvault::LocalStorage>>| bvault::VaultTier {
        recovery_pgp_keys: Vec::new(),
        api: api.clone(),
        ca_file: ca.clone(),
        recovery_shares: 1,
        recovery_threshold: 1,
        servers: 1,
        audit_file: root.path().join("var/log/vault/audit.log"),
        shared: None,
        status_vault: None,
        workload_identity: None,
        snapshot: None,
        local,
    };

    let mut found = None;
    for delay_ms in [150u64, 400, 800, 1500, 2500, 4000] {
        bvault::empty_dir(&data).unwrap();
        {
            let mut n = node.lock().await;
            n.on();
            n.wait_answering().await;
        }
        let init = tokio::spawn(
            http.put(format!("{api}/v1/sys/init"))
                .json(&serde_json::json!({"recovery_shares": 1, "recovery_threshold": 1}))
                .send(),
        );
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        let finished = init.is_finished();
        node.lock().await.off();
        init.abort();
        {
            let mut n = node.lock().await;
            n.on();
            n.wait_answering().await;
        }
        // Without a way to reset, the tier names the state and calls nothing else.
        match tier(None).bootstrap().await {
            Err(TierFailure::HalfInitialized(d)) => {
                assert!(d.contains("cluster already has state"), "{d}");
                eprintln!("power off {delay_ms} ms into sys/init: half-initialized");
                found = Some(delay_ms);
                break;
            }
            Err(TierFailure::AlreadyDone(_)) => {
                eprintln!("power off {delay_ms} ms into sys/init: init had finished (answered: {finished})")
            }
            Ok(_) => eprintln!(
                "power off {delay_ms} ms into sys/init: nothing was written; a clean init"
            ),
            Err(other) => panic!("{delay_ms} ms: unexpected answer {other:?}"),
        }
        node.lock().await.off();
    }
    let delay = found.expect("no delay landed inside sys/init (see the lines above)");

    // The state the tier meets after the power comes back, twice: the call is refused again, nothing changed.
    assert!(matches!(
        tier(None).bootstrap().await,
        Err(TierFailure::HalfInitialized(_))
    ));
    let t = tier(Some(Box::new(ResetPowerNode(node.clone(), data.clone()))));
    t.reset_local().await.unwrap();
    t.wait_ready(Duration::from_secs(60)).await.unwrap();
    let secrets = t
        .bootstrap()
        .await
        .unwrap_or_else(|e| panic!("init after the reset ({delay} ms): {e:?}"));
    let v: bvault::VaultSecrets = serde_json::from_slice(&secrets).unwrap();
    assert_eq!(v.recovery_keys_base64.len(), 1);
    // The root token works on the node, which is initialized and unsealed now.
    let mut status = 0;
    for _ in 0..100 {
        status = http
            .get(format!("{api}/v1/auth/token/lookup-self"))
            .header("X-Vault-Token", &v.root_token)
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0);
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(status, 200, "the new root token authenticates");
    node.lock().await.off();
}

/// A server whose join was cut off keeps raft state without the cluster's seal configuration, and the real
/// OpenBao then refuses every later join with "cluster already has state": it stays uninitialized beside a live
/// cluster for ever (seen in the lab's power-loss suite). The state is made here the same way a power loss
/// makes it (the node powered off inside `sys/init`, the window found by trying delays as above), then the node
/// is started with `retry_join` at a live, initialized server: it stays out. `Tier::join` resets it once and it
/// joins that cluster (same cluster id, unsealed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bao_stuck_with_raft_state_beside_a_live_cluster_is_reset_and_joins() {
    use hashistack_agent::bootstrap::member::{JoinPolicy, Joined};
    use hashistack_agent::bootstrap::{Tier, TierFailure};
    let Some((bin, installed)) = bao() else {
        return;
    };
    let net = test_net();
    let transit_ip = format!("{net}.4");
    let (a_ip, b_ip) = (format!("{net}.30"), format!("{net}.31"));
    let dir = tempfile::tempdir().unwrap();
    let (root_a, root_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let _transit = transit_provider(&bin, dir.path(), &transit_ip).await;
    let cfg_a = agent_config(dir.path(), root_a.path(), false, "root");
    let mut cfg_b = cfg_a.clone();
    cfg_b.paths.root = root_b.path().to_path_buf();
    let node = |ip: &str, cfg: &hashistack_agent::config::AgentConfig, name: &str| {
        let mut doc = imds_fixture("vault-server-transit");
        set_ip(&mut doc, ip);
        // Each server its own node name (raft node id).
        doc["compute"]["name"] = Value::String(format!("vault-{name}"));
        doc["compute"]["osProfile"]["computerName"] = Value::String(format!("hs-vault-{name}"));
        // A third server of the tier never starts (tiers have 1, 3, 5 or 7).
        set_tag(
            &mut doc,
            "hashistack-vault-join",
            &format!("{a_ip} {b_ip} {net}.32"),
        );
        set_tag(&mut doc, "hashistack-vault-servers", "3");
        set_tag(
            &mut doc,
            "hashistack-vault-seal",
            &format!(
                "transit address=http://{transit_ip}:8200 key_name=autounseal mount_path=transit/"
            ),
        );
        let (spec, plan) = render_with_material(&doc, cfg, &versions(None, Some(&installed)));
        let svc = plan
            .services
            .iter()
            .find(|s| s.name == "vault")
            .unwrap()
            .clone();
        let layout = Layout::new(&cfg.paths.root);
        let ca = layout.ca_file(Product::Vault);
        let home = dir.path().join(name);
        std::fs::create_dir_all(&home).unwrap();
        let data = layout.data_dir(Product::Vault, spec.role);
        let n = std::sync::Arc::new(tokio::sync::Mutex::new(PowerNode {
            bin: bin.clone(),
            home,
            command: svc.command.clone(),
            env: read_env_file(svc.env_file.as_ref().unwrap()).unwrap(),
            server: None,
            health: Health::VaultHttps {
                addr: format!("{}:8200", spec.ip),
                ca_file: ca.clone(),
            },
        }));
        (n, data, ca, format!("https://{}:8200", spec.ip))
    };
    let (a, _a_data, ca, a_api) = node(&a_ip, &cfg_a, "a");
    let (b, b_data, _, b_api) = node(&b_ip, &cfg_b, "b");
    let http = client_for(&ca, Duration::from_secs(120)).unwrap();
    let tier = |api: &str, local: Option<Box<dyn bvault::LocalStorage>>| bvault::VaultTier {
        recovery_pgp_keys: Vec::new(),
        api: api.to_string(),
        ca_file: ca.clone(),
        recovery_shares: 1,
        recovery_threshold: 1,
        servers: 3,
        audit_file: root_b.path().join("var/log/vault/audit.log"),
        shared: None,
        status_vault: None,
        workload_identity: None,
        snapshot: None,
        local,
    };
    let seal_status = |api: String| {
        let http = http.clone();
        async move {
            http.get(format!("{api}/v1/sys/seal-status"))
                .send()
                .await
                .ok()?
                .json::<Value>()
                .await
                .ok()
        }
    };

    // 1. B alone (A is off, so its retry_join finds nobody): powered off inside sys/init until it is left
    //    with raft state and no seal configuration.
    let mut found = false;
    for delay_ms in [150u64, 400, 800, 1500, 2500, 4000] {
        bvault::empty_dir(&b_data).unwrap();
        {
            let mut n = b.lock().await;
            n.on();
            n.wait_answering().await;
        }
        let init = tokio::spawn(
            http.put(format!("{b_api}/v1/sys/init"))
                .json(&serde_json::json!({"recovery_shares": 1, "recovery_threshold": 1}))
                .send(),
        );
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        b.lock().await.off();
        init.abort();
        {
            let mut n = b.lock().await;
            n.on();
            n.wait_answering().await;
        }
        let answer = tier(&b_api, None).bootstrap().await;
        b.lock().await.off();
        match answer {
            Err(TierFailure::HalfInitialized(_)) => {
                eprintln!(
                    "B powered off {delay_ms} ms into sys/init: raft state, no seal configuration"
                );
                found = true;
                break;
            }
            other => eprintln!(
                "B powered off {delay_ms} ms into sys/init: not the window ({})",
                match other {
                    Ok(_) => "a clean init".to_string(),
                    Err(e) => format!("{e:?}"),
                }
            ),
        }
    }
    assert!(
        found,
        "no delay landed inside sys/init (see the lines above)"
    );

    // 2. A: a live, initialized, unsealed cluster.
    {
        let mut n = a.lock().await;
        n.on();
        n.wait_answering().await;
    }
    let a_tier = tier(&a_api, None);
    a_tier.bootstrap().await.expect("A initializes");
    let mut a_id = String::new();
    for _ in 0..150 {
        if let Some(s) = seal_status(a_api.clone()).await {
            if s["sealed"] == false {
                a_id = s["cluster_id"].as_str().unwrap_or_default().to_string();
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!a_id.is_empty(), "A unsealed with a cluster id");

    // 3. B comes back with retry_join at A: refused for ever ("cluster already has state"); it stays out.
    {
        let mut n = b.lock().await;
        n.on();
        n.wait_answering().await;
    }
    tokio::time::sleep(Duration::from_secs(8)).await;
    let s = seal_status(b_api.clone()).await.expect("B answers");
    assert_eq!(s["initialized"], false, "B stuck beside the cluster: {s}");
    let log = b.lock().await.server.as_ref().unwrap().log();
    assert!(
        log.contains("cluster already has state"),
        "B's joins are refused for its raft state:\n{log}"
    );

    // 4. The join step: B is reset once and joins A's cluster.
    let b_tier = tier(
        &b_api,
        Some(Box::new(ResetPowerNode(b.clone(), b_data.clone()))),
    );
    let joined = b_tier
        .join(JoinPolicy {
            grace: Duration::from_secs(3),
            deadline: Duration::from_secs(90),
            poll: Duration::from_millis(300),
        })
        .await;
    if let Err(e) = &joined {
        panic!(
            "B did not join: {e}\n{}",
            b.lock().await.server.as_ref().unwrap().log()
        );
    }
    let joined = joined.unwrap();
    assert_eq!(joined, Joined::RejoinedAfterReset);
    let s = seal_status(b_api.clone()).await.expect("B answers");
    assert_eq!(s["initialized"], true, "{s}");
    assert_eq!(s["sealed"], false, "{s}");
    assert_eq!(s["cluster_id"], a_id.as_str(), "B joined A's cluster: {s}");
    // A member is left alone: a second join is immediate and resets nothing.
    assert_eq!(
        b_tier
            .join(JoinPolicy {
                grace: Duration::from_secs(3),
                deadline: Duration::from_secs(10),
                poll: Duration::from_millis(300),
            })
            .await,
        Ok(Joined::Member)
    );
    b.lock().await.off();
    a.lock().await.off();
}

// ----- Consul: Nomad's Consul token ---------------------------------------------------------------------

/// `ensure_nomad_token` against a real `consul agent -dev` with ACLs on (default deny): the policy and the
/// token are made once, a second run (a re-bootstrap, an interrupted configuration run again) gets the same
/// secret back and makes nothing new, and the token is what its rules say (tests/tests/nomad_consul.rs proves
/// each of Nomad's calls in the lab).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_nomad_token_is_made_once_and_reused() {
    use hashistack_agent::bootstrap::consul_tokens::{
        ensure_nomad_token, NOMAD_POLICY, NOMAD_TOKEN_ACCESSOR,
    };
    let Some((bin, _)) = consul() else { return };
    let home = tempfile::tempdir().unwrap();
    let ip = format!("{}.7", test_net());
    const MASTER: &str = "0c4b4a0e-5d0f-4f0e-9b7a-2f6d3c1e8a90";
    let acl = format!(
        r#"acl {{ enabled = true, default_policy = "deny", tokens {{ master = "{MASTER}", agent = "{MASTER}" }} }}"#
    );
    let mut cmd = Command::new(&bin);
    cmd.env_remove("CONSUL_HTTP_TOKEN")
        .env_remove("CONSUL_HTTP_ADDR")
        .args(["agent", "-dev", "-bind", &ip, "-client", &ip, "-hcl", &acl]);
    let mut child = Child::spawn(cmd, home.path().join("consul.log"));
    let api = format!("http://{ip}:8500");
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    // Ready once the ACL system answers (a fresh leader is in "legacy mode" for a moment).
    wait_until("consul ACLs", &mut child, || {
        let req = http
            .get(format!("{api}/v1/acl/policies"))
            .header("X-Consul-Token", MASTER);
        async move {
            match req.send().await {
                Ok(r) if r.status().is_success() => Some(()),
                _ => None,
            }
        }
    })
    .await;
    // The client trusts the cluster CA only; this agent speaks plain HTTP, so any CA will do.
    let (ca, _) =
        hashistack_agent::tls::generate_ca("test CA", 1, time::OffsetDateTime::now_utc()).unwrap();
    let ca_file = home.path().join("ca.pem");
    std::fs::write(&ca_file, ca).unwrap();

    let first = ensure_nomad_token(&api, &ca_file, MASTER).await.unwrap();
    let second = ensure_nomad_token(&api, &ca_file, MASTER).await.unwrap();
    assert_eq!(*first, *second, "the second run reuses the token");
    let listed = |path: &'static str| {
        let req = http
            .get(format!("{api}{path}"))
            .header("X-Consul-Token", MASTER);
        async move { json_answer(req).await }
    };
    let tokens = listed("/v1/acl/tokens").await;
    let ours: Vec<_> = tokens
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["AccessorID"] == NOMAD_TOKEN_ACCESSOR)
        .collect();
    assert_eq!(ours.len(), 1, "{tokens}");
    assert_eq!(ours[0]["Policies"][0]["Name"], NOMAD_POLICY, "{tokens}");
    assert_eq!(
        tokens.as_array().unwrap().len(),
        3,
        "master, anonymous and Nomad's token, nothing more: {tokens}"
    );
    let policies = listed("/v1/acl/policies").await;
    let names: Vec<_> = policies
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["Name"].as_str())
        .collect();
    assert_eq!(
        names.iter().filter(|n| **n == NOMAD_POLICY).count(),
        1,
        "{policies}"
    );

    // What the rules allow and refuse, in a nutshell.
    let call = |method: reqwest::Method, path: &str, body: Option<Value>| {
        let mut req = http
            .request(method, format!("{api}{path}"))
            .header("X-Consul-Token", first.as_str());
        if let Some(b) = body {
            req = req.json(&b);
        }
        async move { req.send().await.unwrap().status().as_u16() }
    };
    use reqwest::Method;
    let svc = serde_json::json!({"ID": "nomad-1", "Name": "nomad", "Port": 4646,
        "Check": {"CheckID": "nomad-1-ttl", "TTL": "30s"}});
    assert_eq!(call(Method::GET, "/v1/agent/self", None).await, 200);
    assert_eq!(
        call(Method::PUT, "/v1/agent/service/register", Some(svc)).await,
        200
    );
    assert_eq!(
        call(Method::PUT, "/v1/agent/check/pass/nomad-1-ttl", None).await,
        200
    );
    assert_eq!(
        call(Method::PUT, "/v1/agent/service/deregister/nomad-1", None).await,
        200
    );
    assert_eq!(
        call(Method::PUT, "/v1/kv/x", Some(Value::from("v"))).await,
        403
    );
    assert_eq!(call(Method::GET, "/v1/acl/tokens", None).await, 403);
    assert!(child.exited().is_none(), "{}", child.log());
}
