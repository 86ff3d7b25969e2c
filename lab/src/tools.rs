//! Where the real components are. `lab/setup.sh` installs them and writes `.tools/env.sh`; the variables it
//! exports win, then the repository's `.tools/` layout, then `PATH`. The lab installs nothing itself.

use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct Tools {
    pub agent: PathBuf,
    pub consul: PathBuf,
    pub bao: PathBuf,
    pub azurite: Option<PathBuf>,
    pub lowkey_jar: Option<PathBuf>,
    pub java: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
#[error("{what} not found: {hint}")]
pub struct MissingTool {
    pub what: &'static str,
    pub hint: String,
}

/// The repository root (where `.tools/` lives): HASHISTACK_REPO, else found from this crate's location.
pub fn repo_root() -> PathBuf {
    if let Some(p) = std::env::var_os("HASHISTACK_REPO") {
        return PathBuf::from(p);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("lab/ has a parent")
        .to_path_buf()
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

fn pick(var: &str, fallbacks: &[PathBuf], path_name: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .map(PathBuf::from)
        .filter(|p| p.is_file())
        .or_else(|| fallbacks.iter().find(|p| p.is_file()).cloned())
        .or_else(|| {
            if path_name.is_empty() {
                None
            } else {
                on_path(path_name)
            }
        })
}

/// The agent binary: HASHISTACK_AGENT, else next to the running executable (cargo's target dir).
pub fn agent_bin() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let mut cands = vec![];
    for dir in exe.ancestors().skip(1).take(3) {
        cands.push(dir.join("hashistack-agent"));
    }
    pick("HASHISTACK_AGENT", &cands, "hashistack-agent")
}

impl Tools {
    pub fn discover() -> Result<Tools, MissingTool> {
        let t = repo_root().join(".tools");
        let setup = "run `bash lab/setup.sh` first".to_string();
        let agent = agent_bin().ok_or(MissingTool {
            what: "hashistack-agent",
            hint: "build it: cargo build -p hashistack-agent".into(),
        })?;
        let consul = pick("HASHISTACK_CONSUL", &[], "consul").ok_or(MissingTool {
            what: "consul",
            hint: setup.clone(),
        })?;
        let bao = pick("HASHISTACK_BAO", &[t.join("venv/bin/bao")], "bao").ok_or(MissingTool {
            what: "bao (OpenBao)",
            hint: setup.clone(),
        })?;
        let azurite = pick(
            "HASHISTACK_AZURITE",
            &[t.join("azurite/node_modules/.bin/azurite-blob")],
            "azurite-blob",
        );
        let lowkey_jar = std::env::var_os("HASHISTACK_LOWKEY_JAR")
            .map(PathBuf::from)
            .filter(|p| p.is_file())
            .or_else(|| find_jar(&t.join("lowkey-vault")));
        let java = pick("HASHISTACK_JAVA", &[], "java");
        Ok(Tools {
            agent,
            consul,
            bao,
            azurite,
            lowkey_jar,
            java,
        })
    }
}

fn find_jar(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "jar"))
}
