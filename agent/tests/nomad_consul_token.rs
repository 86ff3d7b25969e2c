//! Nomad's Consul token (`consul.token`, created by the Consul tier's bootstrap, docs/bootstrap.md): rendered
//! into a file of its own, `/etc/nomad.d/consul-token.json` (0640, Nomad's service user and group, written as
//! a secret), which Nomad loads with the rest of its config directory; `nomad.json` never holds it. Only nodes
//! that run Nomad get it.

mod common;

use common::{agent_config, imds_fixture, versions, ROLE_FIXTURES};
use hashistack_agent::boot;
use hashistack_agent::config::Owners;
use hashistack_agent::files::Owner;
use hashistack_agent::imds::InstanceMetadata;
use hashistack_agent::node::NodeSpec;
use hashistack_agent::render::{self, Layout, Plan, RenderOptions};

const TOKEN: &str = "6f1c2a4e-8d0b-4c59-9e7a-3b2d1f0e9c8a";

/// Renders `fixture` with full material (from files) plus Nomad's Consul token, as boot does once the shared
/// vault holds it; the agent config asks for the image's service users.
fn render_with_token(fixture: &str) -> (NodeSpec, Layout, Plan) {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = agent_config(tmp.path(), tmp.path(), true, "unused");
    cfg.paths.owners = Owners::ServiceUsers;
    let md =
        InstanceMetadata::from_json(&serde_json::to_vec(&imds_fixture(fixture)).unwrap()).unwrap();
    let spec = NodeSpec::from_metadata(&md).unwrap();
    let layout = Layout::new(&cfg.paths.root);
    let mut material = boot::load_material(&cfg, &spec, &layout, None).unwrap();
    material.nomad_consul_token = Some(TOKEN.into());
    let plan = render::render(
        &spec,
        &layout,
        &RenderOptions::from_config(&cfg),
        &versions(None, None),
        Some(&material),
    )
    .unwrap();
    (spec, layout, plan)
}

#[test]
fn nomad_nodes_get_the_token_in_a_secret_file_of_their_own() {
    for (fixture, user) in [("nomad-server", "nomad"), ("worker", "root")] {
        let (_, layout, plan) = render_with_token(fixture);
        let path = layout.root.join("etc/nomad.d/consul-token.json");
        let f = plan
            .files
            .iter()
            .find(|f| f.path == path)
            .unwrap_or_else(|| panic!("{fixture}: no {}", path.display()));
        assert_eq!(f.mode, 0o640, "{fixture}");
        assert_eq!(f.owner, Owner::named(user, user), "{fixture}");
        assert!(f.secret, "{fixture}: written as a secret");
        let v: serde_json::Value = serde_json::from_slice(&f.content).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"consul": {"token": TOKEN}}),
            "{fixture}"
        );
        // Nothing else holds it: the main config stays free of secrets.
        for other in plan.files.iter().filter(|o| o.path != path) {
            assert!(
                !String::from_utf8_lossy(&other.content).contains(TOKEN),
                "{fixture}: token in {}",
                other.path.display()
            );
        }
        // Nomad restarts when it changes: the file is under a path its service watches.
        let svc = plan
            .services
            .iter()
            .find(|s| s.name.starts_with("nomad"))
            .unwrap();
        assert!(
            svc.watch.iter().any(|w| path.starts_with(w)),
            "{fixture}: {:?}",
            svc.watch
        );
    }
}

#[test]
fn nodes_without_nomad_never_render_it() {
    for fixture in ROLE_FIXTURES {
        if matches!(fixture, "nomad-server" | "worker") {
            continue;
        }
        let (spec, _, plan) = render_with_token(fixture);
        for f in &plan.files {
            assert!(
                !String::from_utf8_lossy(&f.content).contains(TOKEN),
                "{fixture} ({}): token in {}",
                spec.role,
                f.path.display()
            );
        }
    }
}

#[test]
fn without_the_token_nothing_is_rendered_for_it() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = agent_config(tmp.path(), tmp.path(), true, "unused");
    let (_, plan) =
        common::render_with_material(&imds_fixture("worker"), &cfg, &versions(None, None));
    assert!(!plan
        .files
        .iter()
        .any(|f| f.path.ends_with("consul-token.json")));
}
