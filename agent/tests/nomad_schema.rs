//! Every rendered nomad.json (and the Nomad server's gossip.json) against a JSON Schema of Nomad's documented
//! agent configuration (agent/tests/fixtures/nomad-agent.schema.json, `additionalProperties: false` at every
//! level), validated by the Python `jsonschema` package from the lab's venv (`bash lab/setup.sh`).
//!
//! Without that Python these tests print SKIPPED and pass, unless CI is set, where it is a failure.

mod common;

use common::{
    agent_config, fixtures_dir, imds_fixture, imds_fixture_path, render_with_material, run_agent,
    text, versions,
};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

const VALIDATE: &str = r#"
import json, sys
from jsonschema import Draft202012Validator
schema = json.load(open(sys.argv[1]))
Draft202012Validator.check_schema(schema)
validator = Draft202012Validator(schema)
bad = 0
for path in sys.argv[2:]:
    for e in sorted(validator.iter_errors(json.load(open(path))), key=lambda e: list(e.absolute_path)):
        bad += 1
        print("%s: /%s: %s" % (path, "/".join(str(p) for p in e.absolute_path), e.message))
sys.exit(1 if bad else 0)
"#;

fn schema() -> PathBuf {
    fixtures_dir().join("nomad-agent.schema.json")
}

/// A Python that has `jsonschema`, or `None` after printing why the test is skipped (a failure under CI).
fn python() -> Option<PathBuf> {
    let py = common::require_tool("HASHISTACK_PYTHON", "python3", "Python with jsonschema")?;
    let ok = Command::new(&py)
        .args(["-c", "import jsonschema"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        Some(py)
    } else if common::in_ci() {
        panic!("{} has no jsonschema module and CI is set", py.display());
    } else {
        eprintln!(
            "SKIPPED: {} has no jsonschema module (run `bash lab/setup.sh`)",
            py.display()
        );
        None
    }
}

/// (valid, validator output)
fn validate(py: &Path, files: &[PathBuf]) -> (bool, String) {
    let o = Command::new(py)
        .arg("-c")
        .arg(VALIDATE)
        .arg(schema())
        .args(files)
        .output()
        .expect("run python");
    let out = format!("{}{}", text(&o.stdout), text(&o.stderr));
    assert!(
        matches!(o.status.code(), Some(0 | 1)),
        "validator crashed: {out}"
    );
    (o.status.success(), out)
}

fn render_offline(fixture: &str, out: &Path) -> PathBuf {
    let o = run_agent([
        "render".as_ref(),
        "--metadata".as_ref(),
        imds_fixture_path(fixture).as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
        "--nomad-version".as_ref(),
        "1.9.0".as_ref(),
    ]);
    assert!(o.status.success(), "{fixture}: {}", text(&o.stderr));
    out.join("etc/nomad.d/nomad.json")
}

#[test]
fn schema_forbids_unknown_keys_at_every_level() {
    fn walk(v: &Value, at: &str, bad: &mut Vec<String>) {
        if let Value::Object(m) = v {
            if m.contains_key("properties")
                && m.get("additionalProperties") != Some(&Value::Bool(false))
            {
                bad.push(at.to_string());
            }
            for (k, x) in m {
                walk(x, &format!("{at}/{k}"), bad);
            }
        }
    }
    let s: Value = serde_json::from_slice(&std::fs::read(schema()).unwrap()).unwrap();
    let mut bad = Vec::new();
    walk(&s, "", &mut bad);
    assert!(
        bad.is_empty(),
        "objects without additionalProperties:false: {bad:?}"
    );
}

#[test]
fn every_rendered_nomad_config_matches_the_documented_schema() {
    let Some(py) = python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for fixture in ["nomad-server", "worker"] {
        let out = tmp.path().join(fixture);
        files.push(render_offline(fixture, &out));
    }
    // As boot writes it: nomad.json with real paths, and the server's gossip.json.
    for fixture in ["nomad-server", "worker"] {
        let dir = tmp.path().join(format!("{fixture}-material"));
        let root = tmp.path().join(format!("{fixture}-root"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::create_dir_all(&root).unwrap();
        let cfg = agent_config(&dir, &root, true, "unused");
        render_with_material(&imds_fixture(fixture), &cfg, &versions(None, None));
        let nomad_d = root.join("etc/nomad.d");
        let mut found: Vec<PathBuf> = std::fs::read_dir(&nomad_d)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        found.sort();
        let expect: &[&str] = if fixture == "nomad-server" {
            &["gossip.json", "nomad.json"]
        } else {
            &["nomad.json"]
        };
        let names: Vec<String> = found
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names, expect,
            "{fixture}: every file Nomad loads from its config dir"
        );
        files.extend(found);
    }
    let (ok, out) = validate(&py, &files);
    assert!(
        ok,
        "rendered Nomad config does not match the schema:\n{out}"
    );
}

#[test]
fn schema_check_fails_on_misspelled_keys_and_wrong_types() {
    let Some(py) = python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let server = render_offline("nomad-server", &tmp.path().join("s"));
    let worker = render_offline("worker", &tmp.path().join("w"));
    let load = |p: &Path| -> Value { serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap() };
    type Break = fn(&mut Value);
    let breaks: Vec<(&str, &Path, Break, &str)> = vec![
        (
            "misspelled server_join key",
            &server,
            |v| {
                let j = v["server"]["server_join"].as_object_mut().unwrap();
                let x = j.remove("retry_join").unwrap();
                j.insert("retry_jion".into(), x);
            },
            "retry_jion",
        ),
        (
            "misspelled top-level key",
            &server,
            |v| {
                let x = v.as_object_mut().unwrap().remove("datacenter").unwrap();
                v["datacentre"] = x;
            },
            "datacentre",
        ),
        (
            "bootstrap_expect as a string",
            &server,
            |v| v["server"]["bootstrap_expect"] = Value::from("3"),
            "bootstrap_expect",
        ),
        (
            "misspelled docker plugin option",
            &worker,
            |v| {
                let c = v["plugin"]["docker"]["config"].as_object_mut().unwrap();
                let x = c.remove("allow_privileged").unwrap();
                c.insert("allow_priviledged".into(), x);
            },
            "allow_priviledged",
        ),
        (
            "tls flag as a string",
            &worker,
            |v| v["tls"]["rpc"] = Value::from("true"),
            "rpc",
        ),
    ];
    for (what, src, edit, needle) in breaks {
        let mut v = load(src);
        edit(&mut v);
        let f = tmp.path().join("broken.json");
        std::fs::write(&f, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
        let (ok, out) = validate(&py, &[f]);
        assert!(!ok, "{what}: the schema must reject it");
        assert!(
            out.contains(needle),
            "{what}: the error names {needle}: {out}"
        );
    }
}

/// Nomad's Consul token file (`consul-token.json`, rendered once the Consul tier handed the token over) is
/// documented Nomad configuration too: `consul.token`.
#[test]
fn the_consul_token_file_matches_the_documented_schema() {
    let Some(py) = python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for fixture in ["nomad-server", "worker"] {
        let root = tmp.path().join(fixture);
        std::fs::create_dir_all(&root).unwrap();
        let cfg = agent_config(&root, &root, true, "unused");
        let md = hashistack_agent::imds::InstanceMetadata::from_json(
            &serde_json::to_vec(&imds_fixture(fixture)).unwrap(),
        )
        .unwrap();
        let spec = hashistack_agent::node::NodeSpec::from_metadata(&md).unwrap();
        let layout = hashistack_agent::render::Layout::new(&cfg.paths.root);
        let mut m = hashistack_agent::boot::load_material(&cfg, &spec, &layout, None).unwrap();
        m.nomad_consul_token = Some("6f1c2a4e-8d0b-4c59-9e7a-3b2d1f0e9c8a".into());
        let plan = hashistack_agent::render::render(
            &spec,
            &layout,
            &hashistack_agent::render::RenderOptions::from_config(&cfg),
            &versions(None, None),
            Some(&m),
        )
        .unwrap();
        let f = plan
            .files
            .iter()
            .find(|f| f.path.ends_with("consul-token.json"))
            .expect("consul-token.json");
        let out = tmp.path().join(format!("{fixture}-consul-token.json"));
        std::fs::write(&out, &f.content).unwrap();
        files.push(out);
    }
    let (ok, out) = validate(&py, &files);
    assert!(ok, "consul-token.json does not match the schema:\n{out}");
}
