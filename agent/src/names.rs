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

/// Nomad's Consul token's secret in the shared Key Vault (the Consul tier's leader writes it, only nodes that run
/// Nomad read it).
pub fn nomad_token_secret(cluster: &str) -> String {
    format!("{cluster}-consul-nomad-token")
}

// ----- Nomad workload identities in Vault (docs/bootstrap.md#nomad-workload-identities) ---------------------
//
// Nomad's documented setup ("Vault integration with workload identity", what `nomad setup vault` creates):
// a JWT auth method at `jwt-nomad`, its default role `nomad-workloads` bound to the audience `vault.io`, and
// the ACL policy `nomad-workloads` templated on the job's namespace and id. Shared by the Vault tier (which
// creates them), the nodes that write the auth method's configuration, and the Nomad agents' `vault` block.

/// Where the JWT auth method for Nomad workloads is mounted (`auth/jwt-nomad`).
pub const NOMAD_JWT_MOUNT: &str = "jwt-nomad";
/// The auth method's default role, and the ACL policy its tokens carry (the same name, as Nomad documents).
pub const NOMAD_WORKLOAD_ROLE: &str = "nomad-workloads";
pub const NOMAD_WORKLOAD_POLICY: &str = "nomad-workloads";
/// The audience of the identity Nomad signs for Vault (`vault.default_identity.aud`), bound by the role.
pub const NOMAD_VAULT_AUDIENCE: &str = "vault.io";
/// The identity's lifetime (`vault.default_identity.ttl`).
pub const NOMAD_VAULT_IDENTITY_TTL: &str = "1h";
/// The KV version 2 mount the workloads policy grants paths in: `secret/data/<namespace>/<job>/…`.
pub const WORKLOAD_KV_MOUNT: &str = "secret";
/// Vault policy of the token that may (re)write `auth/jwt-nomad/config` and nothing else of substance.
pub const NOMAD_JWT_CONFIG_POLICY: &str = "hashistack-nomad-jwt-config";
/// Its rules: the auth method's configuration (the JWKS URL and its CA), and renewing itself.
pub const NOMAD_JWT_CONFIG_RULES: &str = r#"path "auth/jwt-nomad/config" { capabilities = ["create", "read", "update"] }
path "auth/token/renew-self" { capabilities = ["update"] }
"#;

/// The JWT configuration token's secret in the servers Key Vault (the Vault tier's leader writes it; Vault and
/// Nomad servers read it to write the auth method's configuration once both tiers are done).
pub fn nomad_jwt_token_secret(cluster: &str) -> String {
    format!("{cluster}-vault-nomad-jwt-token")
}

// ----- The post-deploy smoke test (`hashistack-agent smoke`, docs/deploy.md) -----------------------------------

/// The canary job `hashistack-smoke` submits (namespace `default`), its group, task and Consul service.
pub const SMOKE_JOB: &str = "hashistack-smoke";
pub const SMOKE_NAMESPACE: &str = "default";
/// The canary's KV v2 secret (`secret/data/default/hashistack-smoke`), written by the Vault tier's bootstrap
/// and read by the canary job through its workload identity (the `nomad-workloads` policy grants exactly
/// `secret/data/<namespace>/<job>`).
pub const SMOKE_SECRET_PATH: &str = "secret/data/default/hashistack-smoke";
/// The key of the canary secret and its value: a fixed, public marker — a canary, not a secret.
pub const SMOKE_CANARY_KEY: &str = "canary";
pub const SMOKE_CANARY: &str = "hashistack smoke canary (public marker, not a secret)";

// ----- Snapshots (docs/runbooks.md#snapshots, docs/trust-model.md) -------------------------------------------

/// The container the tiers' leaders write encrypted snapshots to (create-only; operators read).
pub const SNAPSHOT_CONTAINER: &str = "snapshots";
/// The Key Vault key (in the escrow vault) that wraps each snapshot's data key: server tiers wrap, operators unwrap.
pub const SNAPSHOT_KEY: &str = "snapshot-wrap";

/// The snapshot credential of a tier, in the servers Key Vault (the tier's bootstrap writes it, the tier's leader
/// reads it at every snapshot).
pub fn snapshot_token_secret(cluster: &str, tier: &str) -> String {
    format!("{cluster}-{tier}-snapshot-token")
}

/// Consul: `GET /v1/snapshot` is allowed to a token whose policy grants `acl = "write"` (Consul's snapshot endpoint
/// checks the ACL-write permission; its API reference lists "management", and HashiCorp's snapshot-agent token
/// guide grants `acl = "write"`). That is close to management in power (it can mint tokens): it is why the token
/// lives in the servers vault only.
pub const CONSUL_SNAPSHOT_POLICY: &str = "hashistack-snapshot";
pub const CONSUL_SNAPSHOT_RULES: &str = "acl = \"write\"\n";
/// Vault/OpenBao: read the raft snapshot, and renew itself (a periodic token, renewed at every snapshot).
pub const VAULT_SNAPSHOT_POLICY: &str = "hashistack-snapshot";
pub const VAULT_SNAPSHOT_RULES: &str = r#"path "sys/storage/raft/snapshot" { capabilities = ["read"] }
path "auth/token/renew-self" { capabilities = ["update"] }
"#;
/// Nomad before 2.0 lets only a management token save a snapshot (`operator { capabilities = ["snapshot-save"] }`
/// arrived in Nomad 2.0): a separate management token, named so it can be found and revoked on its own.
pub const NOMAD_SNAPSHOT_TOKEN_NAME: &str = "hashistack snapshot";
