//! Nomad: the leader probes, the raft peers and (with the status token) the client nodes.

use super::*;

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct NomadNodeBody {
    name: String,
    #[serde(default)]
    address: String,
    status: String,
    #[serde(default)]
    scheduling_eligibility: String,
}

pub(super) async fn collect_nomad(
    http: &reqwest::Client,
    servers: &[(String, String)],
    token: Option<&str>,
) -> NomadObs {
    let mut o = NomadObs::default();
    if servers.is_empty() {
        return o;
    }
    o.probes = probe_all::<String>(http, servers, "/v1/status/leader").await;
    let Some(via) = o
        .probes
        .iter()
        .find(|p| matches!(p.answer, Some(Ok(_))))
        .map(|p| format!("{}:{NOMAD_PORT}", p.address))
    else {
        return o;
    };
    let h = token.map(|t| ("X-Nomad-Token", t));
    let (peers, nodes) = tokio::join!(
        get_json::<Vec<String>>(http, &via, "/v1/status/peers", None, &[]),
        async {
            match h {
                Some(h) => Some(
                    get_json::<Vec<NomadNodeBody>>(http, &via, "/v1/nodes", Some(h), &[]).await,
                ),
                None => None,
            }
        }
    );
    o.peers = Some(peers);
    o.nodes = nodes.map(|r| {
        r.map(|ns| {
            ns.into_iter()
                .map(|n| NomadNode {
                    eligible: n.scheduling_eligibility == "eligible",
                    name: n.name,
                    address: n.address,
                    status: n.status,
                })
                .collect()
        })
    });
    o
}
