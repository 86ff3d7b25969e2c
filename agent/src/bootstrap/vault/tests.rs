use super::*;

#[test]
fn init_request_without_and_with_pgp_keys() {
    let plain = serde_json::to_value(init_request(5, 3, &[])).unwrap();
    assert_eq!(
        plain,
        serde_json::json!({"recovery_shares": 5, "recovery_threshold": 3})
    );
    let keys = ["a".to_string(), "b".into(), "c".into()];
    let with = serde_json::to_value(init_request(3, 2, &keys)).unwrap();
    assert_eq!(
        with,
        serde_json::json!({"recovery_shares": 3, "recovery_threshold": 2, "recovery_pgp_keys": ["a", "b", "c"]}),
        "the root token is never sent to be PGP-encrypted by Vault: the agent needs it for the configuration"
    );
}

fn list(devices: &[(&str, &str, &str)]) -> BTreeMap<String, AuditMount> {
    devices
        .iter()
        .map(|(path, kind, file)| {
            (
                path.to_string(),
                AuditMount {
                    kind: kind.to_string(),
                    options: BTreeMap::from([("file_path".to_string(), file.to_string())]),
                },
            )
        })
        .collect()
}

#[test]
fn the_listing_decides_whether_the_device_is_ours() {
    let want = Path::new("/var/log/vault/audit.log");
    assert_eq!(
        audit_device_state(&list(&[]), want),
        AuditDeviceState::Missing
    );
    assert_eq!(
        audit_device_state(
            &list(&[("file/", "file", "/var/log/vault/audit.log")]),
            want
        ),
        AuditDeviceState::Active
    );
    assert_eq!(
        audit_device_state(
            &list(&[("other/", "file", "/var/log/vault/audit.log")]),
            want
        ),
        AuditDeviceState::Missing
    );
    assert!(matches!(
        audit_device_state(&list(&[("file/", "file", "/tmp/x.log")]), want),
        AuditDeviceState::Different(d) if d.contains("/tmp/x.log")
    ));
    assert!(matches!(
        audit_device_state(&list(&[("file/", "socket", "")]), want),
        AuditDeviceState::Different(d) if d.contains("socket")
    ));
}

#[test]
fn init_refusals_are_classified() {
    let half = br#"{"errors":["could not bootstrap clustered storage: error bootstrapping cluster: cluster already has state"]}"#;
    assert!(
        matches!(classify_init_refusal(400, half), TierFailure::HalfInitialized(d) if d.contains("cluster already has state"))
    );
    assert!(matches!(
        classify_init_refusal(400, br#"{"errors":["Vault is already initialized"]}"#),
        TierFailure::AlreadyDone(_)
    ));
    assert!(matches!(
        classify_init_refusal(400, br#"{"errors":["invalid recovery_threshold"]}"#),
        TierFailure::Refused(d) if d == "init: HTTP 400: invalid recovery_threshold"
    ));
    assert!(matches!(
        classify_init_refusal(403, b"not json"),
        TierFailure::Refused(d) if d == "init: HTTP 403: "
    ));
    assert!(matches!(
        classify_init_refusal(503, b"{}"),
        TierFailure::Other(d) if d == "init: HTTP 503"
    ));
}

#[test]
fn empty_dir_keeps_the_directory_and_removes_the_rest() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(d.path().join("raft/snapshots")).unwrap();
    std::fs::write(d.path().join("raft/raft.db"), b"x").unwrap();
    std::fs::write(d.path().join("vault.db"), b"x").unwrap();
    empty_dir(d.path()).unwrap();
    assert!(d.path().is_dir());
    assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
}

#[test]
fn audit_enable_answers_are_classified() {
    assert_eq!(classify_enable(204, ""), EnableAnswer::Enabled);
    assert_eq!(
        classify_enable(400, r#"{"errors":["path already in use at file/"]}"#),
        EnableAnswer::InUse
    );
    // What OpenBao 2.7.2 answers (seen against the real binary).
    assert_eq!(
        classify_enable(
            400,
            r#"{"errors":["cannot enable audit device via API; use declarative, config-based audit device management instead"]}"#
        ),
        EnableAnswer::DeclarativeOnly
    );
    assert!(matches!(classify_enable(503, ""), EnableAnswer::Retry(_)));
    assert!(matches!(
        classify_enable(500, "local node not active"),
        EnableAnswer::Retry(_)
    ));
    assert!(matches!(
        classify_enable(403, "permission denied"),
        EnableAnswer::Final(_)
    ));
    assert!(matches!(
        classify_enable(400, "bad"),
        EnableAnswer::Final(_)
    ));
}

/// A contract double of `GET /v1/sys/audit` and `PUT /v1/sys/audit/file` (request and answer shapes as
/// Vault's API documents them and OpenBao 2.7.2 answers), behaving as OpenBao or as HashiCorp Vault.
mod audit_double {
    use super::*;
    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::get;
    use axum::{Json, Router};
    use std::sync::{Arc, Mutex};

    pub const TOKEN: &str = "s.root-token-of-the-test";

    #[derive(Default)]
    pub struct Server {
        /// OpenBao: API-enabled devices are refused.
        pub declarative_only: bool,
        /// The mounted devices: `file/` → file_path.
        pub devices: BTreeMap<String, String>,
        /// `GET sys/audit` answers 500 this many times first (a node that just unsealed).
        pub busy: u32,
        pub puts: Vec<serde_json::Value>,
        pub gets: u32,
    }

    type Shared = Arc<Mutex<Server>>;

    fn authorized(h: &HeaderMap) -> bool {
        h.get("X-Vault-Token").and_then(|v| v.to_str().ok()) == Some(TOKEN)
    }

    async fn list(State(s): State<Shared>, h: HeaderMap) -> (StatusCode, Json<serde_json::Value>) {
        if !authorized(&h) {
            return (
                StatusCode::FORBIDDEN,
                Json(serde_json::json!({"errors": ["permission denied"]})),
            );
        }
        let mut s = s.lock().unwrap();
        s.gets += 1;
        if s.busy > 0 {
            s.busy -= 1;
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(
                    serde_json::json!({"errors": ["local node not active but active cluster node not found"]}),
                ),
            );
        }
        let devices: serde_json::Map<String, serde_json::Value> = s
            .devices
            .iter()
            .map(|(p, f)| (p.clone(), serde_json::json!({"type": "file", "path": p, "description": "", "local": false, "options": {"file_path": f}})))
            .collect();
        let mut body = serde_json::Value::Object(devices.clone());
        body["data"] = serde_json::Value::Object(devices);
        (StatusCode::OK, Json(body))
    }

    async fn enable(
        State(s): State<Shared>,
        h: HeaderMap,
        Json(body): Json<serde_json::Value>,
    ) -> (StatusCode, String) {
        if !authorized(&h) {
            return (
                StatusCode::FORBIDDEN,
                r#"{"errors":["permission denied"]}"#.into(),
            );
        }
        let mut s = s.lock().unwrap();
        s.puts.push(body.clone());
        if s.declarative_only {
            return (StatusCode::BAD_REQUEST, r#"{"errors":["cannot enable audit device via API; use declarative, config-based audit device management instead"]}"#.into());
        }
        if s.devices.contains_key("file/") {
            return (
                StatusCode::BAD_REQUEST,
                r#"{"errors":["path already in use at file/"]}"#.into(),
            );
        }
        let file = body["options"]["file_path"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        s.devices.insert("file/".into(), file);
        (StatusCode::NO_CONTENT, String::new())
    }

    /// Serves the double on 127.0.0.1; returns its base URL.
    pub async fn serve(state: Shared) -> String {
        let app = Router::new()
            .route("/v1/sys/audit", get(list))
            .route("/v1/sys/audit/file", axum::routing::put(enable))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{addr}")
    }
}

/// A tier pointed at the double (plain HTTP; the client still loads a CA file, as on a node).
fn tier(api: String, dir: &Path) -> VaultTier {
    let ca = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca.cert.pem()).unwrap();
    VaultTier {
        recovery_pgp_keys: Vec::new(),
        api,
        ca_file,
        recovery_shares: 5,
        recovery_threshold: 3,
        servers: 3,
        audit_file: PathBuf::from("/var/log/vault/audit.log"),
        shared: None,
        status_vault: None,
        workload_identity: None,
        snapshot: None,
        local: None,
    }
}

async fn ensure(
    server: audit_double::Server,
) -> (Result<AuditVia, AuditError>, audit_double::Server) {
    let state = std::sync::Arc::new(std::sync::Mutex::new(server));
    let api = audit_double::serve(state.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let t = tier(api, dir.path());
    let c = t.client(Duration::from_secs(5)).unwrap();
    let r = t
        .ensure_audit_within(&c, audit_double::TOKEN, Duration::from_secs(1))
        .await;
    let s = std::mem::take(&mut *state.lock().unwrap());
    (r, s)
}

#[tokio::test]
async fn openbao_declared_device_is_verified_without_an_api_call() {
    let (r, s) = ensure(audit_double::Server {
        declarative_only: true,
        devices: BTreeMap::from([("file/".into(), "/var/log/vault/audit.log".into())]),
        busy: 2,
        ..Default::default()
    })
    .await;
    assert_eq!(r.unwrap(), AuditVia::Configuration);
    assert!(s.puts.is_empty(), "no API call for a declared device");
    assert_eq!(s.gets, 3, "two busy answers were retried");
}

#[tokio::test]
async fn vault_gets_the_device_through_the_api_and_it_is_listed_after() {
    let (r, s) = ensure(audit_double::Server::default()).await;
    assert_eq!(r.unwrap(), AuditVia::Api);
    assert_eq!(s.puts.len(), 1);
    assert_eq!(s.puts[0]["type"], "file");
    assert_eq!(
        s.puts[0]["options"]["file_path"],
        "/var/log/vault/audit.log"
    );
    assert_eq!(s.gets, 2, "listed before and after the call");
}

#[tokio::test]
async fn openbao_without_a_declared_device_is_reported_not_taken_as_success() {
    let (r, s) = ensure(audit_double::Server {
        declarative_only: true,
        ..Default::default()
    })
    .await;
    let e = r.unwrap_err().to_string();
    assert!(e.contains("refuses API-enabled audit devices"), "{e}");
    assert!(e.contains("docs/bootstrap.md#finish-configuration"), "{e}");
    assert!(!e.contains(audit_double::TOKEN));
    assert_eq!(s.puts.len(), 1);
}

#[tokio::test]
async fn a_foreign_device_at_the_path_is_reported() {
    let (r, s) = ensure(audit_double::Server {
        devices: BTreeMap::from([("file/".into(), "/tmp/elsewhere.log".into())]),
        ..Default::default()
    })
    .await;
    let e = r.unwrap_err().to_string();
    assert!(
        e.contains("/tmp/elsewhere.log") && e.contains("/var/log/vault/audit.log"),
        "{e}"
    );
    assert!(s.puts.is_empty(), "never replaced");
}
