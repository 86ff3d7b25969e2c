//! Names that writers (bootstrap) and readers (status, operators) share, in one low room: the status tokens'
//! Key Vault secret names and the read-only policies they are made with.

/// Key Vault secret names in the status vault.
pub const CONSUL_SECRET: &str = "status-consul-token";
pub const VAULT_SECRET: &str = "status-vault-token";
pub const NOMAD_SECRET: &str = "status-nomad-token";

pub const CONSUL_POLICY: &str = "operator-read";
/// Consul ACL rules of the `operator-read` policy: raft and autopilot (operator), the member list and
/// catalog (agent, node, service) — all read-only.
pub const CONSUL_RULES: &str = r#"operator = "read"
agent_prefix "" { policy = "read" }
node_prefix "" { policy = "read" }
service_prefix "" { policy = "read" }
"#;

pub const VAULT_POLICY: &str = "status-read";
/// Vault policy `status-read`: health, seal and HA status, raft configuration and autopilot state — and renewing
/// itself (the token is periodic; every `status` run renews it).
pub const VAULT_RULES: &str = r#"path "sys/health" { capabilities = ["read"] }
path "sys/seal-status" { capabilities = ["read"] }
path "sys/ha-status" { capabilities = ["read"] }
path "sys/storage/raft/configuration" { capabilities = ["read"] }
path "sys/storage/raft/autopilot/state" { capabilities = ["read"] }
path "auth/token/renew-self" { capabilities = ["update"] }
"#;
/// Period of the Vault status token (Vault caps it at the system max TTL, 768h by default).
pub const VAULT_TOKEN_PERIOD: &str = "768h";

pub const NOMAD_POLICY: &str = "status-read";
/// Nomad ACL rules of the `status-read` policy: the node list (client nodes ready or down, and the server
/// members), the agent API and the raft configuration — all read-only.
pub const NOMAD_RULES: &str = r#"node { policy = "read" }
agent { policy = "read" }
operator { policy = "read" }
"#;
/// The Nomad status token's name: a rerun of the tier's configuration finds its earlier token by it.
pub const NOMAD_TOKEN_NAME: &str = "hashistack-agent status (read-only)";

/// The Consul agent token's secret in the shared Key Vault (the Consul tier's leader writes it, every node reads it).
pub fn agent_token_secret(cluster: &str) -> String {
    format!("{cluster}-consul-agent-token")
}
