//! The Vault internal load balancer of the ARM template, in the lab: TCP on a frontend address, forwarded to a
//! backend whose health probe is up. Like Azure Load Balancer's HTTPS probe (`vault-health` in
//! arm-templates/azuredeploy.json: `GET /v1/sys/health`), a backend is up only while it answers 200, which Vault
//! gives only on the active node (429 standby, 501 uninitialized, 503 sealed); the probe does not verify the
//! certificate. Connections are passed through untouched: clients verify Vault's own certificate, which names
//! the frontend address (tag `hashistack-vault-address`).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// How often each backend is probed (the template says 5 s; the lab is quicker).
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// Starts the load balancer; the tasks end when the handles are aborted.
pub async fn serve(
    front: SocketAddr,
    backends: Vec<SocketAddr>,
) -> std::io::Result<Vec<JoinHandle<()>>> {
    let listener = TcpListener::bind(front).await?;
    let up: Arc<Mutex<Vec<SocketAddr>>> = Arc::new(Mutex::new(Vec::new()));
    let probe_up = up.clone();
    let probe = tokio::spawn(async move {
        let http = reqwest::Client::builder()
            .danger_accept_invalid_certs(true)
            .no_proxy()
            .timeout(Duration::from_secs(2))
            .build()
            .expect("probe client");
        loop {
            let mut now_up = Vec::new();
            for b in &backends {
                let ok = http
                    .get(format!("https://{b}/v1/sys/health"))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().as_u16() == 200);
                if ok {
                    now_up.push(*b);
                }
            }
            *probe_up.lock().unwrap() = now_up;
            tokio::time::sleep(PROBE_INTERVAL).await;
        }
    });
    let accept = tokio::spawn(async move {
        let mut next = 0usize;
        while let Ok((mut client, _)) = listener.accept().await {
            let target = {
                let up = up.lock().unwrap();
                next = next.wrapping_add(1);
                (!up.is_empty()).then(|| up[next % up.len()])
            };
            // No healthy backend: Azure's load balancer drops the flow; so do we.
            let Some(target) = target else { continue };
            tokio::spawn(async move {
                // A pass-through, as Azure's layer-4 balancer is: no Nagle on either leg (the Go servers behind
                // it set none on theirs), or a proxied answer waits on the client's delayed ACK.
                let _ = client.set_nodelay(true);
                if let Ok(mut server) = TcpStream::connect(target).await {
                    let _ = server.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    Ok(vec![probe, accept])
}
