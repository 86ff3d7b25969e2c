//! The scheduler, purge and garbage collection, and refusals.

use super::*;

#[test]
fn templates_are_plain_text_or_one_secret_key() {
    assert_eq!(
        parse_template(
            r#"{{ with secret "secret/data/default/hashistack-smoke" }}{{ .Data.data.canary }}{{ end }}"#
        ),
        Ok(Tmpl::SecretKey {
            path: "secret/data/default/hashistack-smoke".into(),
            key: "canary".into()
        })
    );
    assert_eq!(
        parse_template("{{with secret \"a/b\"}}{{.Data.data.k_1}}{{end}}"),
        Ok(Tmpl::SecretKey {
            path: "a/b".into(),
            key: "k_1".into()
        })
    );
    assert_eq!(parse_template("hello\n"), Ok(Tmpl::Plain("hello\n".into())));
    for bad in [
        "{{ key \"x\" }}",
        "{{ with secret \"a\" }}{{ .Data.data.k }}{{ end }} trailing",
        "{{ with secret \"a\" }}{{ .Data.k }}{{ end }}",
        "{{ range service \"x\" }}{{ .Address }}{{ end }}",
    ] {
        assert!(parse_template(bad).is_err(), "{bad}");
    }
}

fn store_with_nodes(n: usize) -> Store {
    let mut s = Store::default();
    s.keyring
        .push(crate::nomad_identity::RootKey::generate("key-1".into()));
    let now = time::OffsetDateTime::now_utc();
    for i in 0..n {
        s.register_node(
            super::super::NodeRegistration {
                id: uuid(),
                secret_id: uuid(),
                name: format!("worker-{i}"),
                datacenter: "dc1".into(),
                node_class: String::new(),
                http_addr: format!("10.0.0.{}:4646", 4 + i),
                address: format!("10.0.0.{}", 4 + i),
                tls_enabled: true,
                version: super::super::VERSION.into(),
            },
            now,
        )
        .unwrap();
    }
    s
}

fn job(count: u32) -> Value {
    json!({
        "ID": "web", "Type": "service", "Datacenters": ["*"],
        "TaskGroups": [{"Name": "g", "Count": count, "Networks": [{"DynamicPorts": [{"Label": "http"}]}],
            "Tasks": [{"Name": "t", "Driver": "exec", "Config": {"command": "/bin/true"}, "Vault": {},
                "Templates": [{"EmbeddedTmpl": "x", "DestPath": "local/x"}],
                "Services": [{"Name": "web", "PortLabel": "http", "Provider": "consul"}]}]}]
    })
}

fn signer(aud: &[String]) -> Signer<'_> {
    Signer {
        aud,
        ttl: Duration::from_secs(3600),
        region: "global",
    }
}

#[test]
fn the_scheduler_places_each_count_round_robin_with_ports_and_signed_vault_identities() {
    let mut s = store_with_nodes(2);
    let aud = ["vault.io".to_string()];
    let sg = signer(&aud);
    let index = s.register_job(job(2), &sg).unwrap();
    assert_eq!(s.index, index);
    assert_eq!(s.allocs.len(), 2);
    let nodes: std::collections::BTreeSet<&str> =
        s.allocs.iter().map(|a| a.node_id.as_str()).collect();
    assert_eq!(nodes.len(), 2, "one allocation on each ready node");
    for (i, a) in s.allocs.iter().enumerate() {
        assert_eq!(a.name, format!("web.g[{i}]"));
        assert_eq!(
            (a.desired_status.as_str(), a.client_status.as_str()),
            ("run", "pending")
        );
        let p = &a.ports[0];
        assert_eq!(p.label, "http");
        assert!((MIN_DYNAMIC_PORT..=MAX_DYNAMIC_PORT).contains(&p.value));
        // The task's Vault identity: Nomad's claims for this allocation, audience vault.io.
        let jwt = &a.signed_identities["t"];
        let claims: Value = serde_json::from_slice(
            &base64::Engine::decode(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                jwt.split('.').nth(1).unwrap(),
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(claims["nomad_allocation_id"], a.id);
        assert_eq!(claims["nomad_job_id"], "web");
        assert_eq!(claims["aud"], "vault.io");
        assert_eq!(claims["sub"], "global:default:web:g:t:vault_default");
        // Never in what the API shows.
        assert!(
            a.public().get("SignedIdentities").is_none()
                && a.stub().get("SignedIdentities").is_none()
        );
    }
    assert_eq!(s.job_public("web").unwrap()["Status"], "pending");
}

#[test]
fn purge_stops_the_allocations_and_they_go_once_their_client_reports_them_terminal() {
    let mut s = store_with_nodes(1);
    let aud = ["vault.io".to_string()];
    let sg = signer(&aud);
    s.register_job(job(1), &sg).unwrap();
    let (id, node) = (s.allocs[0].id.clone(), s.allocs[0].node_id.clone());
    let running = AllocUpdates {
        node_id: node.clone(),
        allocs: vec![AllocUpdate {
            id: id.clone(),
            client_status: "running".into(),
            client_description: String::new(),
            task_states: BTreeMap::new(),
        }],
    };
    assert!(s.update_allocs(running.clone()));
    assert!(
        !s.update_allocs(running),
        "the same report twice is no write"
    );
    assert_eq!(s.job_public("web").unwrap()["Status"], "running");
    // Another node cannot report on it.
    let foreign = AllocUpdates {
        node_id: uuid(),
        allocs: vec![AllocUpdate {
            id: id.clone(),
            client_status: "failed".into(),
            client_description: String::new(),
            task_states: BTreeMap::new(),
        }],
    };
    assert!(!s.update_allocs(foreign));
    s.deregister_job("web", true).unwrap();
    assert!(s.job_public("web").is_none(), "purged");
    assert_eq!(
        s.allocs[0].desired_status, "stop",
        "kept until its client stopped it"
    );
    let stopped = AllocUpdates {
        node_id: node,
        allocs: vec![AllocUpdate {
            id,
            client_status: "complete".into(),
            client_description: String::new(),
            task_states: BTreeMap::new(),
        }],
    };
    assert!(s.update_allocs(stopped));
    assert!(
        s.allocs.is_empty(),
        "a stopped, terminal allocation of a purged job is gone"
    );
}

#[test]
fn no_ready_node_places_nothing_and_what_the_double_cannot_run_is_refused() {
    let mut s = store_with_nodes(0);
    let aud = ["vault.io".to_string()];
    let sg = signer(&aud);
    s.register_job(job(1), &sg).unwrap();
    assert!(s.allocs.is_empty());
    let mut docker = job(1);
    docker["TaskGroups"][0]["Tasks"][0]["Driver"] = json!("docker");
    let e = s.register_job(docker, &sg).unwrap_err();
    assert_eq!(e.0, 400);
    assert!(
        e.1.contains("driver \"docker\" is not implemented by the Nomad contract double"),
        "{}",
        e.1
    );
    let mut tmpl = job(1);
    tmpl["TaskGroups"][0]["Tasks"][0]["Templates"][0]["DestPath"] = json!("../../etc/passwd");
    assert!(s
        .register_job(tmpl, &sg)
        .unwrap_err()
        .1
        .contains("escapes the task directory"));
}
