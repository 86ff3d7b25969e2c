//! `hashistack-agent boot`: what systemd runs at every boot. Configures the node and starts its services
//! (`boot::boot`), publishes its boot record, runs the tier bootstrap, converges the Consul agent token and the
//! Nomad workload identities, then (process backend) supervises the services until SIGTERM. The services keep
//! running whatever the bootstrap concludes; a failure makes the unit fail, so it is visible.

use super::fail;
use hashistack_agent::config::AgentConfig;
use hashistack_agent::{boot, publish};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

pub async fn run(config: Option<PathBuf>, started: Instant) -> ExitCode {
    let cfg = match AgentConfig::load_or_default(config.as_deref()) {
        Ok(c) => c,
        Err(e) => return fail(2, e),
    };
    let mut booted = match boot::boot(&cfg, started).await {
        Ok(b) => b,
        Err((e, record, metadata)) => {
            // Without metadata (IMDS unreachable) there is nowhere to publish to.
            if let (Some(r), Some(md)) = (&record, &metadata) {
                publish::publish_failure(&cfg, r, md).await;
            }
            return fail(e.exit_code() as u8, e);
        }
    };
    let publishing = publish::spawn(&cfg, &booted.record, Some(&booted.spec));
    tracing::info!(
        critical_path_ms = booted.record.critical_path_ms,
        "services started"
    );
    // The services keep running whatever the bootstrap concludes; a failure is recorded for `status` and
    // makes the unit fail, so it is visible.
    let mut code = ExitCode::SUCCESS;
    // A warm boot started the services from the material on disk: confirm it with Key Vault now.
    let converged = hashistack_agent::converge::run(&cfg, &mut booted).await;
    match &converged {
        Ok(None) => {}
        Ok(Some(c)) => tracing::info!(?c, "cluster material confirmed with Key Vault"),
        Err(e) => {
            tracing::error!(error = %e, "cluster material");
            eprintln!("hashistack-agent: {e}");
            code = ExitCode::from(1);
        }
    }
    if let Err(hashistack_agent::converge::ConvergeError::Withdrawn(_)) = converged {
        publishing
            .then(&cfg, Some(&booted.record), Some(&booted.spec))
            .await;
        return code;
    }
    // The tier bootstrap and the Consul agent token run at once: a node's token comes from the Consul tier, not
    // from its own tier, so it is rendered as soon as the Consul tier hands it over. Both read the boot as it
    // is (`Started`) and change only their own fields of the record (`SharedRecord`); the token's new plan, and
    // Nomad's restart for its Consul token, are applied once both are over.
    let converge_ran = !matches!(converged, Ok(None));
    let (bootstrap, token) = {
        let (started, record) = booted.split(&cfg);
        let bootstrap = async {
            let b = boot::bootstrap_phase(&cfg, &started, &record).await;
            let ran = !matches!(b, Ok(None)) || converge_ran;
            let newer = ran.then(|| record.snapshot());
            publishing
                .then(&cfg, newer.as_ref(), Some(started.spec))
                .await;
            b
        };
        let token = hashistack_agent::converge::consul_token(&cfg, &started, &record);
        tokio::join!(bootstrap, token)
    };
    let bootstrapped = matches!(bootstrap, Ok(Some(_)));
    match bootstrap {
        Ok(Some(outcome)) => tracing::info!(?outcome, "tier bootstrap"),
        Ok(None) => {}
        Err(e) => {
            tracing::error!(error = %e, "tier bootstrap failed");
            eprintln!("hashistack-agent: {e}");
            code = ExitCode::from(1);
        }
    }
    let token = match token {
        Ok(Some(rendered)) => {
            hashistack_agent::converge::finish_consul_token(&cfg, &mut booted, rendered).await
        }
        Ok(None) => Ok(()),
        Err(e) => Err(e),
    };
    if let Err(e) = token {
        tracing::error!(error = %e, "consul agent token");
        code = ExitCode::from(1);
    }
    if bootstrapped {
        use hashistack_agent::bootstrap::workload_identity::Converged;
        match hashistack_agent::converge::workload_identity(&cfg, &mut booted).await {
            Ok(None) => {}
            Ok(Some(Converged::Waiting { tier })) => tracing::info!(
                waiting_for = tier,
                "Nomad workload identities: Vault's JWT auth method is configured by the tier that finishes last"
            ),
            Ok(Some(Converged::Ensured(how))) => {
                tracing::info!(?how, "Nomad workload identities: Vault's JWT auth method points at the Nomad servers' JWKS")
            }
            Err(e) => {
                tracing::error!(error = %e, "Nomad workload identities");
                eprintln!("hashistack-agent: {e}");
                code = ExitCode::from(1);
            }
        }
    }
    // The process backend keeps supervising its children until SIGTERM/SIGINT; systemd returns at once.
    let shutdown = Box::pin(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("signal handler");
        tokio::select! {
            _ = term.recv() => {},
            _ = tokio::signal::ctrl_c() => {},
        }
        tracing::info!("shutting down");
    });
    booted.manager.run_until(shutdown).await;
    code
}
