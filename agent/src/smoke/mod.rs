//! `hashistack-agent smoke`: the post-deploy smoke test, run on the jumpbox (docs/deploy.md). It walks the hops of
//! docs/architecture.md's "Life of a workload" with a tiny canary job:
//!
//! ```text
//!   submit (Nomad, the operator's token) ─► allocation running (its template read Vault's canary secret with
//!   the task's workload identity) ─► service passing (Consul, the status token) ─► the rendered canary is
//!   Vault's marker (Nomad's client fs API) ─► cleanup: job purged, service gone (always, even after a failure)
//! ```
//!
//! Endpoints and the Consul status token are found exactly as `status` finds them
//! ([`crate::status::collect::Collector::endpoints`]); the Nomad token is the operator's ([`token`]).
//! Exit codes: 0 every step green, 1 a step failed (its line says what was seen), 2 bad usage or cannot start.

pub mod flow;
pub mod job;
pub mod report;
pub mod token;

use crate::config::AgentConfig;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(180);

pub struct Args {
    pub config: Option<PathBuf>,
    /// `--token-file PATH`, `-` for standard input.
    pub token_file: Option<String>,
    pub timeout: Duration,
    pub json: bool,
}

fn usage(msg: impl std::fmt::Display) -> u8 {
    eprintln!("hashistack-agent smoke: {msg}");
    2
}

/// Runs the subcommand; returns the exit code.
pub async fn run(args: Args) -> u8 {
    let token = match token::read(
        args.token_file.as_deref(),
        std::env::var_os("NOMAD_TOKEN"),
        &mut std::io::stdin().lock(),
    ) {
        Ok(t) => t,
        Err(e) => return usage(e),
    };
    if args.timeout.is_zero() {
        return usage("--timeout must be at least 1 second");
    }
    let cfg = match AgentConfig::load_or_default(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => return usage(e),
    };
    let endpoints = match crate::status::collect::Collector::new(&cfg).await {
        Ok(c) => c.endpoints().await,
        Err(e) => Err(e),
    };
    let ep = match endpoints {
        Ok(ep) => ep,
        Err(e) => return usage(format!("cannot find the cluster's endpoints: {e}")),
    };
    if ep.consul_token.is_none() {
        eprintln!(
            "hashistack-agent smoke: no Consul status token ({:?}): asking Consul anonymously",
            ep.consul_token_state
        );
    }
    let target = flow::Target {
        http: ep.http,
        scheme: "https",
        nomad: ep.nomad,
        consul: ep.consul,
        consul_token: ep.consul_token,
    };
    let json = args.json;
    let mut emit = |o: &report::Outcome| {
        if !json {
            let mut so = std::io::stdout().lock();
            let _ = writeln!(so, "{}", report::line(o));
            let _ = so.flush();
        }
    };
    let steps = flow::run(&target, &token, args.timeout, &mut emit).await;
    let r = report::Report::new(steps);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&r).expect("the report serialises")
        );
    }
    r.exit_code
}
