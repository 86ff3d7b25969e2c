//! `hashistack-agent image verify`: checks an image root against the gold-image contract
//! (`image::verify_image`); on the image itself (`--root /`) also writes the binaries' version cache, so a VM's
//! first boot spawns no `version` probes.

use clap::Subcommand;
use hashistack_agent::boot;
use hashistack_agent::config::AgentConfig;
use hashistack_agent::render::Layout;
use hashistack_agent::version::Product;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Check that an image root satisfies the gold-image contract (binaries, users, directories, units).
    Verify {
        #[arg(long, default_value = "/")]
        root: PathBuf,
    },
}

pub async fn verify(root: &Path) -> ExitCode {
    match hashistack_agent::image::verify_image(root) {
        Ok(report) => {
            println!("{report}");
            // On the image itself, record the binaries' versions now (keyed by path, size and mtime, which
            // image capture preserves), so a VM's first boot spawns no `version` probes.
            if root == Path::new("/") {
                let cfg = AgentConfig::default();
                let layout = Layout::from_paths(&cfg.paths);
                let all = [Product::Consul, Product::Vault, Product::Nomad];
                if let Err(e) = boot::detect_versions(&cfg, &layout, &all).await {
                    eprintln!("hashistack-agent: version cache not written: {e}");
                    return ExitCode::from(1);
                }
                println!(
                    "version cache written to {}",
                    layout.state_dir().join("versions.json").display()
                );
            }
            ExitCode::SUCCESS
        }
        Err(failed) => {
            eprintln!("{failed}");
            ExitCode::from(1)
        }
    }
}
