//! What operators on the jumpbox use without privileges (docs/runbooks.md, "Where each action runs"): the cluster
//! CA certificate at a world-readable path, and one `source`-able environment file per product pointing its CLI at
//! this cluster over HTTPS with that CA. No token is ever written here: operators export their own.

use super::{Layout, Material, Plan, RenderOptions};
use crate::files::{DirSpec, FileSpec};
use crate::node::{NodeSpec, Role};
use crate::version::Product;

/// One `export NAME='value'` line per variable; values are single-quoted, so any character is taken literally.
#[derive(Debug, Default)]
pub struct ShellEnv(Vec<(&'static str, String)>);

impl ShellEnv {
    pub fn set(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.0.push((name, value.into()));
        self
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut s =
            String::from("# Written by hashistack-agent; source it, then export your own token.\n");
        for (k, v) in &self.0 {
            s.push_str("export ");
            s.push_str(k);
            s.push_str("='");
            s.push_str(&v.replace('\'', r"'\''"));
            s.push_str("'\n");
        }
        s.into_bytes()
    }
}

/// The environments, by product: every CLI gets the CA; Consul also the local agent's HTTPS address (the
/// jumpbox runs a Consul client); Vault its load balancer's address when the tag `hashistack-vault-address` gives
/// it (it is in Vault's certificate). Nomad has no address the jumpbox knows at boot: operators take a server's
/// address from `hashistack-agent status`.
pub fn environments(spec: &NodeSpec, layout: &Layout) -> Vec<(Product, ShellEnv)> {
    let ca = layout.operator_ca_file().display().to_string();
    vec![
        (
            Product::Consul,
            ShellEnv::default()
                .set(
                    "CONSUL_HTTP_ADDR",
                    format!("https://{}:{}", spec.ip, super::consul::HTTPS_PORT),
                )
                .set("CONSUL_CACERT", ca.clone()),
        ),
        (Product::Vault, {
            let env = match &spec.vault_address {
                Some(a) => ShellEnv::default().set("VAULT_ADDR", a.trim_end_matches('/')),
                None => ShellEnv::default(),
            };
            env.set("VAULT_CACERT", ca.clone())
        }),
        (Product::Nomad, ShellEnv::default().set("NOMAD_CACERT", ca)),
    ]
}

/// On the jumpbox, with material: the operator directory (0755), `ca.pem` and the environment files (0644).
pub fn render(
    spec: &NodeSpec,
    layout: &Layout,
    opts: &RenderOptions,
    m: &Material,
    plan: &mut Plan,
) {
    if spec.role != Role::Jumpbox {
        return;
    }
    let owner = opts.owner("root");
    plan.dirs.push(DirSpec {
        path: layout.operator_dir(),
        mode: 0o755,
        owner: owner.clone(),
    });
    plan.files.push(FileSpec {
        path: layout.operator_ca_file(),
        content: m.ca_pem.as_bytes().to_vec(),
        mode: 0o644,
        owner: owner.clone(),
        secret: false,
    });
    for (p, env) in environments(spec, layout) {
        plan.files.push(FileSpec {
            path: layout.operator_env_file(p),
            content: env.to_bytes(),
            mode: 0o644,
            owner: owner.clone(),
            secret: false,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_quoted_so_a_shell_takes_them_literally() {
        let env = ShellEnv::default()
            .set("A", "https://10.0.0.4:8501")
            .set("B", "it's $HOME `x`");
        let text = String::from_utf8(env.to_bytes()).unwrap();
        assert!(
            text.contains("export A='https://10.0.0.4:8501'\n"),
            "{text}"
        );
        assert!(text.contains(r"export B='it'\''s $HOME `x`'"), "{text}");
        // What a shell makes of it.
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("{text}\nprintf '%s|%s' \"$A\" \"$B\""))
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "https://10.0.0.4:8501|it's $HOME `x`"
        );
    }
}
