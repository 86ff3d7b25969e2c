//! The `status` subcommand: one look (or `--watch`), the verdict as the exit code.

use super::collect::Collector;
use super::model::*;
use super::{assess, render};
use crate::config::AgentConfig;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

pub struct Args {
    pub config: Option<PathBuf>,
    /// This node only (the per-node view).
    pub node: bool,
    pub json: bool,
    /// Refresh every this many seconds until interrupted.
    pub watch: Option<u64>,
}

/// Colour only on a terminal, and never with `NO_COLOR` set (to anything but the empty string).
pub fn use_color(is_tty: bool, no_color: Option<std::ffi::OsString>) -> bool {
    is_tty && no_color.is_none_or(|v| v.is_empty())
}

/// A report for when the observer cannot even look (no metadata, no config): verdict unknown.
pub fn cannot_tell(cluster: &str, observer: &str, message: String) -> Report {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    Report {
        schema: SCHEMA.into(),
        cluster: cluster.into(),
        observer: observer.into(),
        observed_unix: now,
        verdict: Verdict::Unknown,
        exit_code: Verdict::Unknown.exit_code(),
        summary: format!("cannot look at the cluster: {message}"),
        problems: vec![Problem {
            severity: Severity::Unknown,
            area: "observer".into(),
            subject: None,
            message,
        }],
        tiers: vec![],
        nodes: vec![],
    }
}

fn emit(r: &Report, json: bool, watching: bool, color: bool) {
    let mut so = std::io::stdout().lock();
    if json {
        let _ = writeln!(so, "{}", render::json(r, !watching));
    } else {
        if watching && color {
            // Clear the screen and go home: one screen per refresh on a terminal.
            let _ = write!(so, "\x1b[H\x1b[2J");
        }
        let _ = write!(so, "{}", render::table(r, color));
        if watching {
            let _ = writeln!(so);
        }
    }
    let _ = so.flush();
}

async fn node_view(cfg: &AgentConfig, json: bool) -> u8 {
    match super::node_status(cfg).await {
        Ok(s) => {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&s).expect("status serialises")
                );
            } else {
                super::print_table(&s);
            }
            if s.healthy {
                0
            } else {
                1
            }
        }
        Err(e) => {
            eprintln!("hashistack-agent: {e}");
            2
        }
    }
}

/// Runs the subcommand; returns the exit code (0 healthy, 1 degraded, 2 cannot tell).
pub async fn run(args: Args) -> u8 {
    let cfg = match AgentConfig::load_or_default(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hashistack-agent: {e}");
            return 2;
        }
    };
    if args.node {
        return node_view(&cfg, args.json).await;
    }
    let color = !args.json
        && use_color(
            std::io::stdout().is_terminal(),
            std::env::var_os("NO_COLOR"),
        );
    let watching = args.watch.is_some();
    let interval = Duration::from_secs(args.watch.unwrap_or(5).max(1));
    let mut collector: Option<Collector> = None;
    loop {
        if collector.is_none() {
            match Collector::new(&cfg).await {
                Ok(c) => collector = Some(c),
                Err(e) => {
                    let r = cannot_tell("", "", e.to_string());
                    emit(&r, args.json, watching, color);
                    if !watching {
                        return r.exit_code;
                    }
                }
            }
        }
        let code = match collector.as_mut() {
            Some(c) => {
                let r = assess(&c.collect().await);
                emit(&r, args.json, watching, color);
                r.exit_code
            }
            None => 2,
        };
        if !watching {
            return code;
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = tokio::signal::ctrl_c() => return code,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(use_color(true, None));
        assert!(!use_color(false, None));
        assert!(!use_color(true, Some("1".into())));
        assert!(use_color(true, Some("".into())));
    }
}
