//! Vault: each server's health, then (with the status token) the raft configuration and autopilot.

use super::*;

#[derive(Deserialize)]
struct VaultHealthBody {
    initialized: bool,
    sealed: bool,
    standby: bool,
    #[serde(default)]
    version: String,
}
#[derive(Deserialize)]
struct VaultData<T> {
    data: T,
}
#[derive(Deserialize)]
struct VaultRaftConfig {
    config: VaultRaftServers,
}
#[derive(Deserialize)]
struct VaultRaftServers {
    servers: Vec<VaultRaftServer>,
}
#[derive(Deserialize)]
struct VaultRaftServer {
    node_id: String,
    address: String,
    leader: bool,
    voter: bool,
}
#[derive(Deserialize)]
struct VaultAutopilot {
    healthy: bool,
    failure_tolerance: i64,
    #[serde(default)]
    servers: std::collections::BTreeMap<String, VaultAutopilotServer>,
}
#[derive(Deserialize)]
struct VaultAutopilotServer {
    id: String,
    name: String,
    address: String,
    #[serde(default)]
    node_status: String,
    healthy: bool,
    #[serde(default)]
    status: String,
    #[serde(default)]
    version: String,
}

/// Every status code sys/health can answer with, as 200, so one request tells all states apart.
const VAULT_HEALTH: &str = "/v1/sys/health?standbyok=true&perfstandbyok=true&sealedcode=200&uninitcode=200&drsecondarycode=200&performancestandbycode=200&standbycode=200";

pub(super) async fn collect_vault(
    http: &reqwest::Client,
    servers: &[(String, String)],
    token: Option<&str>,
    renew: bool,
) -> VaultObs {
    let mut o = VaultObs::default();
    let health: Vec<Probed<VaultHealthBody>> = probe_all(http, servers, VAULT_HEALTH).await;
    o.health = health
        .into_iter()
        .map(|p| Probed {
            name: p.name,
            address: p.address,
            answer: p.answer.map(|r| {
                r.map(|h| VaultHealth {
                    initialized: h.initialized,
                    sealed: h.sealed,
                    standby: h.standby,
                    version: h.version,
                })
            }),
        })
        .collect();
    let Some(token) = token else { return o };
    // The active node answers the raft questions itself; any unsealed node would forward them.
    let usable = |active: bool| {
        o.health.iter().find(|p| {
            matches!(&p.answer, Some(Ok(h)) if h.initialized && !h.sealed && (!active || !h.standby))
        })
    };
    let Some(via) = usable(true)
        .or_else(|| usable(false))
        .map(|p| format!("{}:{VAULT_PORT}", p.address))
    else {
        return o;
    };
    let h = Some(("X-Vault-Token", token));
    let (raft, autopilot, _) = tokio::join!(
        get_json::<VaultData<VaultRaftConfig>>(
            http,
            &via,
            "/v1/sys/storage/raft/configuration",
            h,
            &[]
        ),
        get_json::<VaultData<VaultAutopilot>>(
            http,
            &via,
            "/v1/sys/storage/raft/autopilot/state",
            h,
            &[]
        ),
        async {
            if renew {
                let r = http
                    .post(format!("https://{via}/v1/auth/token/renew-self"))
                    .header("X-Vault-Token", token)
                    .json(&serde_json::json!({}))
                    .send()
                    .await;
                if let Err(e) = r {
                    tracing::debug!(error = %short(&e), "status token not renewed");
                }
            }
        }
    );
    o.via = Some(via);
    o.raft = Some(raft.map(|d| {
        d.data
            .config
            .servers
            .into_iter()
            .map(|s| RaftServer {
                id: s.node_id.clone(),
                node: s.node_id,
                address: s.address,
                leader: s.leader,
                voter: s.voter,
            })
            .collect()
    }));
    o.autopilot = Some(autopilot.map(|d| {
        Autopilot {
            healthy: d.data.healthy,
            failure_tolerance: d.data.failure_tolerance,
            servers: d
                .data
                .servers
                .into_values()
                .map(|s| AutopilotServer {
                    voter: matches!(
                        RaftRole::from_autopilot(&s.status),
                        Some(RaftRole::Voter | RaftRole::Leader)
                    ),
                    leader: RaftRole::from_autopilot(&s.status) == Some(RaftRole::Leader),
                    id: s.id,
                    name: s.name,
                    address: s.address,
                    healthy: s.healthy,
                    status: s.node_status,
                    version: s.version,
                })
                .collect(),
        }
    }));
    o
}
