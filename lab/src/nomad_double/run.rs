//! Starting the agent: TLS, its HTTP client, the server's raft ID, and the serving loop.

use super::*;

fn tls_acceptor(t: &TlsConfig) -> Result<TlsAcceptor, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&t.cert_file)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| format!("tls.cert_file {}: {e}", t.cert_file.display()))?;
    let key = PrivateKeyDer::from_pem_file(&t.key_file)
        .map_err(|e| format!("tls.key_file {}: {e}", t.key_file.display()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    // With a CA: ask every client for a certificate and verify it (a wrong one fails the handshake);
    // API clients without one are still served, and only registration insists on one.
    let builder = match &t.ca_file {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca)
                .map_err(|e| format!("tls.ca_file {}: {e}", ca.display()))?
            {
                let c = c.map_err(|e| format!("tls.ca_file {}: {e}", ca.display()))?;
                roots
                    .add(c)
                    .map_err(|e| format!("tls.ca_file {}: {e}", ca.display()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .allow_unauthenticated()
            .build()
            .map_err(|e| format!("tls.ca_file {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("tls: {e}"))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

/// The agent's own HTTPS client: trusts `tls.ca_file`, presents `tls.cert_file`/`tls.key_file`.
fn http_client(cfg: &Config) -> Result<reqwest::Client, String> {
    http_builder(cfg)?.build().map_err(|e| e.to_string())
}

/// [`http_client`]'s builder (a server adds `resolve` to reach a client by its certificate's name).
pub(super) fn http_builder(cfg: &Config) -> Result<reqwest::ClientBuilder, String> {
    let mut b = reqwest::Client::builder().no_proxy();
    if let Some(t) = &cfg.tls {
        if let Some(ca) = &t.ca_file {
            let pem =
                std::fs::read(ca).map_err(|e| format!("tls.ca_file {}: {e}", ca.display()))?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .map_err(|e| format!("tls.ca_file {}: {e}", ca.display()))?;
            b = b.tls_certs_only([cert]);
        }
        let mut pem = std::fs::read(&t.cert_file)
            .map_err(|e| format!("tls.cert_file {}: {e}", t.cert_file.display()))?;
        pem.push(b'\n');
        pem.extend(
            std::fs::read(&t.key_file)
                .map_err(|e| format!("tls.key_file {}: {e}", t.key_file.display()))?,
        );
        let id = reqwest::Identity::from_pem(&pem)
            .map_err(|e| format!("tls.cert_file/tls.key_file: {e}"));
        pem.fill(0);
        b = b.identity(id?);
    }
    Ok(b)
}

/// This server's raft ID: read from `<data_dir>/server/node-id`, created the first time.
fn server_id(server_dir: &Path) -> Result<String, String> {
    let p = server_dir.join(SERVER_ID_FILE);
    if let Ok(s) = std::fs::read_to_string(&p) {
        if is_uuid(s.trim()) {
            return Ok(s.trim().to_string());
        }
    }
    let id = uuid();
    std::fs::write(&p, &id).map_err(|e| format!("{}: {e}", p.display()))?;
    Ok(id)
}

/// Runs the agent until `shutdown` resolves.
pub async fn run(
    cfg: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    run_with(cfg, shutdown, crate::nomad_identity::RootKey::generate).await
}

/// [`run`], with the leader's root-key generator injected (tests: a slow one).
pub(super) async fn run_with(
    cfg: Config,
    shutdown: impl std::future::Future<Output = ()>,
    keygen: KeyGen,
) -> Result<(), String> {
    let server_dir = cfg.data_dir.join("server");
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&server_dir)
            .map_err(|e| format!("data_dir {}: {e}", server_dir.display()))?;
    }
    let state_file = server_dir.join(STATE_FILE);
    let store = Store::load(&state_file)?;
    let raft_id = server_id(&server_dir)?;
    let client_id = match &cfg.client {
        Some(_) => Some(client_identity(&cfg.data_dir)?),
        None => None,
    };
    let acceptor = cfg.tls.as_ref().map(tls_acceptor).transpose()?;
    let acceptor = Arc::new(Mutex::new(acceptor));
    let addr = SocketAddr::new(cfg.bind, cfg.http_port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("listen on {addr}: {e}"))?;
    let agent = Arc::new(Agent {
        keygen,
        http: Mutex::new(http_client(&cfg)?),
        state_file,
        raft_id,
        rt: Mutex::new(Runtime {
            store,
            ..Default::default()
        }),
        cfg,
    });
    log(format!(
        "Nomad v{VERSION} contract double ({} mode) serving the documented HTTP API subset on {}://{addr}; \
         ACLs {}; state index {}",
        if agent.cfg.server.is_some() { "server" } else { "client" },
        agent.cfg.scheme(),
        if agent.cfg.acl_enabled { "enabled" } else { "disabled" },
        agent.rt.lock().expect("runtime").store.index,
    ));
    if let Some(s) = &agent.cfg.server {
        log(format!(
            "server: bootstrap_expect {}, peers {:?}, heartbeat TTL {:?} + grace {:?}",
            s.bootstrap_expect, s.peers, s.min_heartbeat_ttl, s.heartbeat_grace
        ));
    }
    let poller = {
        let agent = agent.clone();
        tokio::spawn(async move {
            loop {
                agent.poll_peers().await;
                agent.check_heartbeats().await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    let client = client_id.map(|(id, secret)| {
        let agent = agent.clone();
        log(format!(
            "client: node {id}, servers {:?}",
            agent.servers_of_client()
        ));
        tokio::spawn(agent.clone().alloc_runner(id.clone(), secret.clone()));
        tokio::spawn(agent.client_loop(id, secret))
    });
    let reloader = {
        let (agent, acceptor) = (agent.clone(), acceptor.clone());
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let Ok(mut hup) = signal(SignalKind::hangup()) else {
                return;
            };
            while hup.recv().await.is_some() {
                match agent.cfg.tls.as_ref().map(tls_acceptor).transpose() {
                    Ok(a) => {
                        *acceptor.lock().expect("acceptor") = a;
                        if let Ok(c) = http_client(&agent.cfg) {
                            *agent.http.lock().expect("http client") = c;
                        }
                        log("caught SIGHUP: reloaded the TLS certificate");
                    }
                    Err(e) => log(format!("caught SIGHUP: keeping the old certificate: {e}")),
                }
            }
        })
    };
    let accept = async {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            // Like Go's net/http, which real Nomad serves with: no Nagle (else each answer written as several TLS
            // records waits ~40 ms for the client's delayed ACK).
            let _ = tcp.set_nodelay(true);
            let agent = agent.clone();
            let tls = acceptor.lock().expect("acceptor").clone();
            tokio::spawn(async move {
                let builder = hyper::server::conn::http1::Builder::new();
                match tls {
                    Some(tls) => {
                        let Ok(Ok(stream)) =
                            tokio::time::timeout(Duration::from_secs(10), tls.accept(tcp)).await
                        else {
                            return;
                        };
                        // rustls verified any certificate the client presented against tls.ca_file.
                        let client_cert = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .is_some_and(|c| !c.is_empty());
                        let svc = hyper::service::service_fn(move |req| {
                            let agent = agent.clone();
                            async move {
                                Ok::<_, std::convert::Infallible>(
                                    agent.handle(req, client_cert).await,
                                )
                            }
                        });
                        let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                    }
                    None => {
                        let svc = hyper::service::service_fn(move |req| {
                            let agent = agent.clone();
                            async move {
                                Ok::<_, std::convert::Infallible>(agent.handle(req, false).await)
                            }
                        });
                        let _ = builder.serve_connection(TokioIo::new(tcp), svc).await;
                    }
                }
            });
        }
    };
    tokio::select! {
        _ = accept => {}
        _ = shutdown => {}
    }
    poller.abort();
    reloader.abort();
    if let Some(c) = client {
        c.abort();
    }
    log("stopped");
    Ok(())
}
