//! The scale set's `userData` (IMDS `compute/userData`): base64 of a small JSON document the ARM template
//! sets on the server tiers (docs/pgp-escrow.md):
//!
//! ```json
//! {"hashistack": {"pgpKeys": ["<base64 of a binary OpenPGP public key>", "..."]}}
//! ```
//!
//! Only the `hashistack` member is the agent's; other members are left to whoever else uses userData.
//! Inside it, unknown fields are an error (a typo must not turn the PGP escrow off silently). No userData, or
//! an empty one, means no option is set.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
struct Document {
    #[serde(default)]
    hashistack: Option<HashistackUserData>,
}

/// The agent's part of userData.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HashistackUserData {
    /// Operators' OpenPGP public keys (base64 of the binary key), one per Vault recovery share. Empty: the
    /// PGP escrow is off.
    #[serde(default)]
    pub pgp_keys: Vec<String>,
}

/// Why userData is refused. One line each; never quotes the document.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UserDataError {
    #[error("userData: not base64 (the scale set's userData must be base64 of a JSON document such as {{\"hashistack\":{{\"pgpKeys\":[...]}}}})")]
    NotBase64,
    #[error("userData: not a JSON document ({0})")]
    NotJson(String),
    #[error("userData hashistack: {0}")]
    Shape(String),
}

/// Parses the text IMDS returns for `compute/userData`.
pub fn parse(text: &str) -> Result<HashistackUserData, UserDataError> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(HashistackUserData::default());
    }
    let bytes = B64.decode(text).map_err(|_| UserDataError::NotBase64)?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(HashistackUserData::default());
    }
    let doc: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| UserDataError::NotJson(format!("line {} column {}", e.line(), e.column())))?;
    let serde_json::Value::Object(mut map) = doc else {
        return Err(UserDataError::NotJson("not a JSON object".into()));
    };
    let Some(ours) = map.remove("hashistack") else {
        return Ok(HashistackUserData::default());
    };
    let d: Document = serde_json::from_value(serde_json::json!({ "hashistack": ours }))
        .map_err(|e| UserDataError::Shape(first_line(&e.to_string())))?;
    Ok(d.hashistack.unwrap_or_default())
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        B64.encode(s)
    }

    #[test]
    fn absent_or_empty_user_data_sets_nothing() {
        assert_eq!(parse("").unwrap(), HashistackUserData::default());
        assert_eq!(parse(" \n").unwrap(), HashistackUserData::default());
        assert_eq!(parse(&b64("{}")).unwrap(), HashistackUserData::default());
        assert_eq!(
            parse(&b64(r#"{"other-tool": {"x": 1}}"#)).unwrap(),
            HashistackUserData::default()
        );
        assert_eq!(
            parse(&b64(r#"{"hashistack": {"pgpKeys": []}}"#)).unwrap(),
            HashistackUserData::default()
        );
    }

    #[test]
    fn keys_are_read() {
        let d = parse(&b64(r#"{"hashistack": {"pgpKeys": ["a", "b"]}, "x": 1}"#)).unwrap();
        assert_eq!(d.pgp_keys, vec!["a".to_string(), "b".to_string()]);
    }

    #[test]
    fn bad_user_data_is_one_line_naming_the_problem() {
        assert_eq!(parse("{not base64").unwrap_err(), UserDataError::NotBase64);
        let e = parse(&b64("{\"hashistack\": ")).unwrap_err();
        assert!(matches!(e, UserDataError::NotJson(_)), "{e}");
        assert_eq!(
            parse(&b64("[1]")).unwrap_err(),
            UserDataError::NotJson("not a JSON object".into())
        );
        let e = parse(&b64(r#"{"hashistack": {"pgpkeys": ["a"]}}"#)).unwrap_err();
        assert!(e.to_string().contains("pgpkeys"), "{e}");
        let e = parse(&b64(r#"{"hashistack": {"pgpKeys": "a"}}"#)).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("userData hashistack: invalid type"),
            "{e}"
        );
        assert!(!e.to_string().contains('\n'));
    }
}
