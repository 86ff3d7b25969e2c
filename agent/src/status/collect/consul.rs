//! Consul: the leader probes, the raft configuration, autopilot, the members and the status token's own view.

use super::*;

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ConsulRaftConfig {
    servers: Vec<ConsulRaftServer>,
}
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ConsulRaftServer {
    #[serde(rename = "ID")]
    id: String,
    node: String,
    address: String,
    leader: bool,
    voter: bool,
}
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ConsulAutopilot {
    healthy: bool,
    failure_tolerance: i64,
    /// `null` while the servers are still stabilising after the cluster formed (seen with Consul 1.8.7).
    #[serde(default, deserialize_with = "null_as_empty")]
    servers: Vec<ConsulAutopilotServer>,
}

fn null_as_empty<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
}
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ConsulAutopilotServer {
    #[serde(rename = "ID")]
    id: String,
    name: String,
    address: String,
    serf_status: String,
    #[serde(default)]
    version: String,
    leader: bool,
    healthy: bool,
    voter: bool,
}
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ConsulMember {
    name: String,
    addr: String,
    #[serde(default)]
    tags: std::collections::BTreeMap<String, String>,
    status: u8,
}
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ConsulTokenSelf {
    #[serde(default)]
    description: String,
}

fn serf_status(n: u8) -> &'static str {
    match n {
        1 => "alive",
        2 => "leaving",
        3 => "left",
        4 => "failed",
        _ => "none",
    }
}

pub(super) async fn collect_consul(
    http: &reqwest::Client,
    local: &str,
    servers: &[(String, String)],
    token: Option<&str>,
    records: &[NodeRecord],
) -> ConsulObs {
    let mut o = ConsulObs::default();
    let local_probe = [("local".to_string(), local.to_string())];
    let (local_answer, mut probes) = tokio::join!(
        probe_all::<String>(http, &local_probe, "/v1/status/leader"),
        probe_all::<String>(http, servers, "/v1/status/leader"),
    );
    // The cluster-wide questions go to the observer's own agent, else to the first server that answers.
    let via = match local_answer.first().map(|p| &p.answer) {
        Some(Some(Ok(_))) => Some(local.to_string()),
        _ => probes
            .iter()
            .find(|p| matches!(p.answer, Some(Ok(_))))
            .map(|p| format!("{}:{CONSUL_PORT}", p.address)),
    };
    o.via = Some(via.clone().unwrap_or_else(|| {
        format!(
            "{local} and {} server{}",
            servers.len(),
            if servers.len() == 1 { "" } else { "s" }
        )
    }));
    let Some(via) = via else {
        o.leader = local_answer.into_iter().next().and_then(|p| p.answer);
        o.probes = probes;
        return o;
    };
    let h = token.map(|t| ("X-Consul-Token", t));
    let (leader, peers, raft, autopilot, members, acl) = tokio::join!(
        get_json::<String>(http, &via, "/v1/status/leader", None, &[]),
        get_json::<Vec<String>>(http, &via, "/v1/status/peers", None, &[]),
        async {
            match h {
                Some(h) => Some(
                    get_json::<ConsulRaftConfig>(
                        http,
                        &via,
                        "/v1/operator/raft/configuration",
                        Some(h),
                        &[],
                    )
                    .await,
                ),
                None => None,
            }
        },
        async {
            match h {
                // 429: autopilot answers with its report and "unhealthy".
                Some(h) => Some(
                    get_json::<ConsulAutopilot>(
                        http,
                        &via,
                        "/v1/operator/autopilot/health",
                        Some(h),
                        &[429],
                    )
                    .await,
                ),
                None => None,
            }
        },
        async {
            match h {
                Some(h) => Some(
                    get_json::<Vec<ConsulMember>>(http, &via, "/v1/agent/members", Some(h), &[])
                        .await,
                ),
                None => None,
            }
        },
        async {
            match h {
                Some(h) => Some(
                    get_json::<ConsulTokenSelf>(http, &via, "/v1/acl/token/self", Some(h), &[])
                        .await,
                ),
                None => None,
            }
        },
    );
    o.leader = Some(leader);
    o.peers = Some(peers.clone());
    o.raft = raft.map(|r| {
        r.map(|c| {
            c.servers
                .into_iter()
                .map(|s| RaftServer {
                    id: s.id,
                    node: s.node,
                    address: s.address,
                    leader: s.leader,
                    voter: s.voter,
                })
                .collect()
        })
    });
    o.autopilot = autopilot.map(|r| {
        r.map(|a| Autopilot {
            healthy: a.healthy,
            failure_tolerance: a.failure_tolerance,
            servers: a
                .servers
                .into_iter()
                .map(|s| AutopilotServer {
                    id: s.id,
                    name: s.name,
                    address: s.address,
                    healthy: s.healthy,
                    status: s.serf_status,
                    leader: s.leader,
                    voter: s.voter,
                    version: s.version,
                })
                .collect(),
        })
    });
    o.members = members.map(|r| {
        r.map(|ms| {
            ms.into_iter()
                .map(|m| Member {
                    role: m.tags.get("role").cloned().unwrap_or_default(),
                    version: m
                        .tags
                        .get("build")
                        .map(|b| b.split(':').next().unwrap_or("").to_string())
                        .unwrap_or_default(),
                    name: m.name,
                    addr: m.addr,
                    status: serf_status(m.status).into(),
                })
                .collect()
        })
    });
    o.acl = acl.map(|r| r.map(|t| t.description));
    // Raft peers that no record names are probed too, under the name raft gives them.
    let known: Vec<String> = probes.iter().map(|p| p.address.clone()).collect();
    let mut extra = vec![];
    let raft_names: Vec<(String, String)> = o
        .raft
        .as_ref()
        .and_then(|r| r.as_ref().ok())
        .map(|r| {
            r.iter()
                .map(|s| {
                    (
                        crate::status::assess::host(&s.address).to_string(),
                        s.node.clone(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    if let Ok(peers) = &peers {
        for a in peers {
            let ip = crate::status::assess::host(a).to_string();
            if !known.contains(&ip) {
                let name = raft_names
                    .iter()
                    .find(|(h, _)| *h == ip)
                    .map(|(_, n)| n.clone())
                    .or_else(|| {
                        records
                            .iter()
                            .find(|r| r.ip.as_deref() == Some(ip.as_str()))
                            .map(|r| r.boot.node.clone())
                    })
                    .unwrap_or_else(|| ip.clone());
                extra.push((name, format!("{ip}:{CONSUL_PORT}")));
            }
        }
    }
    if !extra.is_empty() {
        probes.extend(probe_all::<String>(http, &extra, "/v1/status/leader").await);
    }
    o.via = Some(via);
    o.probes = probes;
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consul_autopilot_health_with_null_servers_parses() {
        // Consul 1.8.7's answer (HTTP 429) right after the cluster formed.
        let a: ConsulAutopilot =
            serde_json::from_str(r#"{"Healthy":false,"FailureTolerance":0,"Servers":null}"#)
                .unwrap();
        assert!(!a.healthy);
        assert!(a.servers.is_empty());
        assert!(serde_json::from_str::<ConsulAutopilot>(
            r#"{"Healthy":true,"FailureTolerance":1,"Servers":7}"#
        )
        .is_err());
    }
}
