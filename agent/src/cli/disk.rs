//! `hashistack-agent disk prepare`, run by hashistack-data.service before the agent: on server tiers, the data
//! disk at LUN 0 formatted only if blank and mounted at /var/lib/hashistack-data (`disk::prepare`); other roles
//! and `disk.mode = "directory"` have nothing to do.

use super::fail;
use clap::Subcommand;
use hashistack_agent::boot;
use hashistack_agent::config::AgentConfig;
use hashistack_agent::node::NodeSpec;
use hashistack_agent::render::Layout;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum DiskCommand {
    /// On server tiers: wait for the data disk (disk.device, LUN 0), format it only if it is blank (no
    /// signature, zeros at both ends), and mount it at /var/lib/hashistack-data. A disk holding anything else is
    /// refused untouched. Other roles, and disk.mode = "directory": nothing to do. Exit codes: 0 mounted or
    /// nothing to do, 1 the disk is missing, foreign or cannot be mounted (the message says what to do), 2 bad input.
    Prepare {
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

pub async fn prepare(config: Option<PathBuf>) -> ExitCode {
    use hashistack_agent::config::DiskMode;
    use hashistack_agent::disk;
    let cfg = match AgentConfig::load_or_default(config.as_deref()) {
        Ok(c) => c,
        Err(e) => return fail(2, e),
    };
    let layout = Layout::from_paths(&cfg.paths);
    if cfg.disk.mode == DiskMode::Directory {
        println!(
            "disk.mode = directory: the data directory is {}; nothing to probe, format or mount",
            layout.data_disk_dir().display()
        );
        return ExitCode::SUCCESS;
    }
    let md = match boot::fetch_metadata(&cfg).await {
        Ok(m) => m,
        Err(e) => return fail(e.exit_code() as u8, e),
    };
    let spec = match NodeSpec::from_metadata(&md) {
        Ok(s) => s,
        Err(e) => return fail(2, e),
    };
    if !spec.role.is_server_tier() {
        println!("role {} has no data disk: nothing to do", spec.role);
        return ExitCode::SUCCESS;
    }
    let site = disk::Site {
        role: spec.role.to_string(),
        resource_group: md.compute.resource_group_name.clone(),
        scale_set: md.compute.vm_scale_set_name.clone(),
        vm: md.compute.name.clone(),
    };
    match disk::prepare(
        &disk::SystemDevices::default(),
        &cfg.disk.device,
        &layout.data_disk_dir(),
        std::time::Duration::from_secs(cfg.disk.wait_secs),
        &site,
    )
    .await
    {
        Ok(p) => {
            let what = match p.action {
                disk::Action::AlreadyMounted => "already mounted",
                disk::Action::Mounted => "mounted (not formatted: it holds our filesystem)",
                disk::Action::FormattedAndMounted => "was blank: formatted and mounted",
            };
            println!(
                "data disk {} ({}) {what} at {}",
                p.device.display(),
                p.resolved.display(),
                layout.data_disk_dir().display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(1, e),
    }
}
