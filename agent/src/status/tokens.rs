//! The read-only status tokens, as `hashistack-agent status` reads them from the status Key Vault (tag
//! `hashistack-status-vault-uri`: server tiers write it, only the jumpbox identity reads it). Each tier's bootstrap
//! creates them (bootstrap/status_tokens.rs); their names and policies are in names.rs.
//! See docs/status.md#status-tokens for who can read them.

use super::model::TokenState;
use crate::azure::Azure;
use crate::retry::RetryPolicy;
use zeroize::Zeroizing;

pub use crate::names::{CONSUL_SECRET, NOMAD_SECRET, VAULT_SECRET};

/// Fetches a status token.
pub async fn fetch(
    az: &Azure,
    vault: &str,
    name: &str,
    policy: RetryPolicy,
) -> (TokenState, Option<Zeroizing<String>>) {
    match crate::material::get_secret(az, vault, name, policy).await {
        Ok(Some(v)) if !v.is_empty() => (TokenState::Present, Some(v)),
        Ok(_) => (TokenState::Missing, None),
        Err(e) => (TokenState::Error(e.detail), None),
    }
}
