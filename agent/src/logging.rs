//! Logs: journald when running under systemd (JOURNAL_STREAM is set), stderr otherwise; JSON on request.

use tracing_subscriber::{fmt, layer::SubscriberExt, util::SubscriberInitExt, EnvFilter};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

pub fn init(format: LogFormat, verbose: bool) {
    let filter = EnvFilter::try_from_env("HASHISTACK_LOG").unwrap_or_else(|_| {
        EnvFilter::new(if verbose {
            "hashistack_agent=debug,info"
        } else {
            "info"
        })
    });
    let registry = tracing_subscriber::registry().with(filter);
    if std::env::var_os("JOURNAL_STREAM").is_some() && format == LogFormat::Text {
        if let Ok(journald) = tracing_journald::layer() {
            registry
                .with(journald.with_syslog_identifier("hashistack-agent".into()))
                .init();
            return;
        }
    }
    match format {
        LogFormat::Json => registry
            .with(fmt::layer().json().with_writer(std::io::stderr))
            .init(),
        LogFormat::Text => registry
            .with(fmt::layer().with_writer(std::io::stderr).with_target(false))
            .init(),
    }
}
