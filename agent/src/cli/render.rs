//! `hashistack-agent render`: the configuration tree a VM would have for a metadata document, offline (no
//! network, no CA, no services, no key material), rooted at `--out` and owned by whoever runs it. Product
//! versions come from `--<product>-version` (`1.18.0`, or `openbao-2.7.2` for Vault), else from the installed
//! binaries, else the versions the agent assumes current.

use super::fail;
use hashistack_agent::boot;
use hashistack_agent::config::AgentConfig;
use hashistack_agent::files::Owner;
use hashistack_agent::imds::InstanceMetadata;
use hashistack_agent::node::NodeSpec;
use hashistack_agent::render::{self, Layout, Plan, RenderOptions, Versions};
use hashistack_agent::version::{self, Installed, Product, Version};
use std::path::PathBuf;
use std::process::ExitCode;

/// `overrides`: the `--consul-version`, `--vault-version` and `--nomad-version` flags, in that order.
pub async fn run(
    metadata: PathBuf,
    config: Option<PathBuf>,
    out: PathBuf,
    overrides: [Option<String>; 3],
) -> ExitCode {
    // Offline: an explicit --config is read; otherwise built-in defaults (never the machine's own agent.toml).
    let cfg = match config {
        Some(p) => match AgentConfig::load(&p) {
            Ok(c) => c,
            Err(e) => return fail(2, e),
        },
        None => AgentConfig::default(),
    };
    let bytes = match std::fs::read(&metadata) {
        Ok(b) => b,
        Err(e) => return fail(2, format!("metadata {}: {e}", metadata.display())),
    };
    let md = match InstanceMetadata::from_json(&bytes) {
        Ok(m) => m,
        Err(e) => return fail(2, format!("metadata {}: {e}", metadata.display())),
    };
    let spec = match NodeSpec::from_metadata(&md) {
        Ok(s) => s,
        Err(e) => return fail(2, e),
    };
    let mut versions = Versions::new();
    for (p, over) in [Product::Consul, Product::Vault, Product::Nomad]
        .into_iter()
        .zip(overrides)
    {
        if !spec.products().contains(&p) {
            continue;
        }
        let installed = match over {
            Some(v) => match version_flag(p, &v) {
                Some(i) => i,
                None => return fail(2, format!("--{p}-version {v:?} is not a version")),
            },
            None => match version::detect(p, &boot::bin_for(&cfg, p)).await {
                Ok(i) => i,
                Err(_) => version::assumed_current(p),
            },
        };
        versions.insert(p, installed);
    }
    let root = PathBuf::from("/");
    let mut plan = match render::render(
        &spec,
        &Layout::new(&root),
        &RenderOptions::from_config(&cfg),
        &versions,
        None,
    ) {
        Ok(p) => p,
        Err(e) => return fail(1, e),
    };
    owned_by_caller(&mut plan);
    render::rebase(&mut plan, &root, &out);
    match boot::write_plan(&plan) {
        Ok(changed) => {
            for f in &plan.files {
                println!(
                    "{}{}",
                    f.path.display(),
                    if changed.contains(&f.path) {
                        ""
                    } else {
                        " (unchanged)"
                    }
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(1, e),
    }
}

/// The version a `--<product>-version` flag names: `1.18.0` (the product's usual distribution), or for Vault
/// `openbao-2.7.2` (OpenBao, which differs from HashiCorp Vault in configuration). `None`: not a version.
fn version_flag(p: Product, v: &str) -> Option<Installed> {
    let (distribution, version) = v
        .strip_prefix("openbao-")
        .filter(|_| p == Product::Vault)
        .map_or_else(
            || Version::parse(v).map(|ver| (version::assumed_current(p).distribution, ver)),
            |rest| Version::parse(rest).map(|ver| ("OpenBao".into(), ver)),
        )?;
    Some(Installed {
        distribution,
        version,
    })
}

/// Offline renders are owned by whoever runs them, not by the products' system users.
fn owned_by_caller(plan: &mut Plan) {
    for f in &mut plan.files {
        f.owner = Owner::Current;
    }
    for d in &mut plan.dirs {
        d.owner = Owner::Current;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_flags() {
        let i = version_flag(Product::Vault, "openbao-2.7.2").expect("openbao");
        assert_eq!(i.distribution, "OpenBao");
        assert_eq!(Some(i.version), Version::parse("2.7.2"));
        let i = version_flag(Product::Vault, "1.18.0").expect("vault");
        assert_eq!(
            i.distribution,
            version::assumed_current(Product::Vault).distribution
        );
        assert_eq!(Some(i.version), Version::parse("1.18.0"));
        // `openbao-` names a distribution of Vault only.
        assert!(version_flag(Product::Consul, "openbao-2.7.2").is_none());
        assert!(version_flag(Product::Nomad, "latest").is_none());
    }
}
