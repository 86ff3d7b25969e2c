//! Where the smoke test's Nomad token comes from: `--token-file PATH`, `--token-file -` (standard input, so
//! `escrow open ... | jq -r .secret_id | hashistack-agent smoke --token-file -` keeps it off command lines and
//! out of files), else the `NOMAD_TOKEN` environment variable. Held in a [`Zeroizing`] string, never logged.
//! The Nomad status token is read-only (it cannot submit a job), so an operator's token is required.

use std::io::Read;
use zeroize::Zeroizing;

/// Why there is no usable token (exit code 2). Never carries the token.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error(
        "no Nomad token: pass --token-file PATH (or --token-file - to read it from standard input) or set NOMAD_TOKEN; \
         submitting the canary job needs submit-job (the status token is read-only)"
    )]
    Missing,
    #[error("--token-file {path}: {reason}")]
    Unreadable { path: String, reason: String },
    #[error("the Nomad token from {from} is empty")]
    Empty { from: String },
    #[error("the Nomad token from {from} is not one line of printable text")]
    Malformed { from: String },
}

/// Reads the token: `file` (`-`: `stdin`), else `env` (the value of `NOMAD_TOKEN`).
pub fn read(
    file: Option<&str>,
    env: Option<std::ffi::OsString>,
    stdin: &mut dyn Read,
) -> Result<Zeroizing<String>, TokenError> {
    let (raw, from) = match file {
        Some("-") => {
            let mut buf = Zeroizing::new(Vec::new());
            stdin
                .read_to_end(&mut buf)
                .map_err(|e| TokenError::Unreadable {
                    path: "-".into(),
                    reason: e.kind().to_string(),
                })?;
            (buf, "standard input".to_string())
        }
        Some(path) => {
            let bytes = std::fs::read(path).map_err(|e| TokenError::Unreadable {
                path: path.into(),
                reason: e.kind().to_string(),
            })?;
            (Zeroizing::new(bytes), path.to_string())
        }
        None => match env {
            Some(v) => (
                Zeroizing::new(v.into_encoded_bytes()),
                "NOMAD_TOKEN".to_string(),
            ),
            None => return Err(TokenError::Missing),
        },
    };
    let text =
        std::str::from_utf8(&raw).map_err(|_| TokenError::Malformed { from: from.clone() })?;
    let t = text.trim();
    if t.is_empty() {
        return Err(TokenError::Empty { from });
    }
    if t.chars().any(|c| c.is_control()) {
        return Err(TokenError::Malformed { from });
    }
    Ok(Zeroizing::new(t.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = "6f2a3c1e-0b7d-4e8f-9a1b-2c3d4e5f6a7b";

    #[test]
    fn stdin_file_and_environment_in_that_order() {
        let mut stdin = format!("{T}\n").into_bytes();
        let got = read(Some("-"), Some("env-token".into()), &mut stdin.as_slice()).unwrap();
        assert_eq!(got.as_str(), T, "--token-file - wins over NOMAD_TOKEN");
        stdin.clear();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        std::fs::write(&p, format!("  {T}  \n")).unwrap();
        let got = read(p.to_str(), None, &mut stdin.as_slice()).unwrap();
        assert_eq!(got.as_str(), T);
        let got = read(None, Some(T.into()), &mut stdin.as_slice()).unwrap();
        assert_eq!(got.as_str(), T);
    }

    #[test]
    fn no_empty_unreadable_or_multiline_token_is_used_and_no_error_shows_it() {
        let empty: &[u8] = b"";
        assert_eq!(read(None, None, &mut &*empty), Err(TokenError::Missing));
        assert_eq!(
            read(Some("-"), None, &mut &b" \n"[..]),
            Err(TokenError::Empty {
                from: "standard input".into()
            })
        );
        assert_eq!(
            read(None, Some("".into()), &mut &*empty),
            Err(TokenError::Empty {
                from: "NOMAD_TOKEN".into()
            })
        );
        let e = read(Some("/nonexistent/token"), None, &mut &*empty).unwrap_err();
        assert!(
            matches!(&e, TokenError::Unreadable { path, .. } if path == "/nonexistent/token"),
            "{e:?}"
        );
        let two = format!("{T}\nsecond-line-{T}");
        let e = read(Some("-"), None, &mut two.as_bytes()).unwrap_err();
        assert_eq!(
            e,
            TokenError::Malformed {
                from: "standard input".into()
            }
        );
        assert!(!e.to_string().contains(T));
        assert_eq!(
            TokenError::Missing.to_string().lines().count(),
            1,
            "one clear line"
        );
    }
}
