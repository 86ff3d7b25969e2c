//! Azure RBAC as the double enforces it: the data actions of Key Vault operations and of the roles the ARM
//! template assigns, the lab's principals (one per managed identity, plus the operator), role assignments at
//! vault, key, secret or secret-prefix scope, and the check every authenticated request passes before it is
//! served (403 `Forbidden` / `ForbiddenByRbac` otherwise, in the message shape Key Vault uses).

use super::routes::{KvErr, Route};
use super::VaultState;
use crate::imds::LAB_TENANT;
use hyper::StatusCode;

/// Azure's Key Vault data actions (role definitions' `dataActions`). A grant may end in `*`.
pub mod actions {
    pub const SECRETS_SET: &str = "Microsoft.KeyVault/vaults/secrets/setSecret/action";
    pub const SECRETS_GET: &str = "Microsoft.KeyVault/vaults/secrets/getSecret/action";
    pub const SECRETS_READ_METADATA: &str = "Microsoft.KeyVault/vaults/secrets/readMetadata/action";
    pub const KEYS_CREATE: &str = "Microsoft.KeyVault/vaults/keys/create/action";
    pub const KEYS_READ: &str = "Microsoft.KeyVault/vaults/keys/read";
    pub const KEYS_WRAP: &str = "Microsoft.KeyVault/vaults/keys/wrap/action";
    pub const KEYS_UNWRAP: &str = "Microsoft.KeyVault/vaults/keys/unwrap/action";
}

/// The data actions of the roles the ARM template assigns (built-in roles: Azure's definitions).
pub mod roles {
    use super::actions::*;
    /// Built-in "Key Vault Secrets User".
    pub const SECRETS_USER: &[&str] = &[SECRETS_GET, SECRETS_READ_METADATA];
    /// Built-in "Key Vault Crypto Service Encryption User".
    pub const CRYPTO_SERVICE_ENCRYPTION_USER: &[&str] = &[KEYS_READ, KEYS_WRAP, KEYS_UNWRAP];
    /// Built-in "Key Vault Administrator" (data plane).
    pub const ADMINISTRATOR: &[&str] = &["Microsoft.KeyVault/vaults/*"];
    /// Custom roles of arm-templates/azuredeploy.json.
    pub const ESCROW_SECRET_WRITER: &[&str] = &[SECRETS_SET];
    /// The same write-only data action, assigned on the status vault (ARM: the escrow writer role).
    pub const SECRET_WRITER: &[&str] = &[SECRETS_SET];
    pub const ESCROW_KEY_WRAPPER: &[&str] = &[KEYS_WRAP];
    pub const ESCROW_KEY_UNWRAPPER: &[&str] = &[KEYS_UNWRAP];
    pub const CLUSTER_MATERIAL_WRITER: &[&str] = &[SECRETS_GET, SECRETS_SET];
}

/// Object ids of the lab's principals: one per user-assigned identity of the ARM template, plus an
/// operator. The fake IMDS of each node issues tokens with its role's identity (see [`principal_for`]).
pub mod principals {
    pub const CONSUL: &str = "00000000-0000-4000-8000-00000000c001";
    pub const VAULT: &str = "00000000-0000-4000-8000-00000000c002";
    pub const NOMAD: &str = "00000000-0000-4000-8000-00000000c003";
    pub const WORKERS: &str = "00000000-0000-4000-8000-00000000c004";
    pub const JUMPBOX: &str = "00000000-0000-4000-8000-00000000c005";
    /// The operator of `escrow open` (ARM parameter `operatorObjectId`).
    pub const OPERATOR: &str = "00000000-0000-4000-8000-0000000000f0";
}

/// The managed identity a node of this role runs as.
pub fn principal_for(role: hashistack_agent::node::Role) -> &'static str {
    use hashistack_agent::node::Role;
    match role {
        Role::ConsulServer => principals::CONSUL,
        Role::VaultServer => principals::VAULT,
        Role::NomadServer => principals::NOMAD,
        Role::Worker => principals::WORKERS,
        Role::Jumpbox => principals::JUMPBOX,
    }
}

/// Where a role assignment applies inside one vault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// The whole vault (`Microsoft.KeyVault/vaults/<v>`).
    Vault,
    /// One key (`…/vaults/<v>/keys/<name>`): key operations on that key only.
    Key(String),
    /// Secrets whose name starts with this prefix (`…/vaults/<v>/secrets/<name>` for each): secret operations only.
    SecretPrefix(String),
    /// Exactly one secret (`…/vaults/<v>/secrets/<name>`, Azure's single-secret scope): secret operations on it only.
    Secret(String),
}

#[derive(Debug, Clone)]
pub struct Assignment {
    pub principal: String,
    pub actions: Vec<String>,
    pub scope: Scope,
}

/// The operations the double serves; faults and the request log name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    SetSecret,
    GetSecret,
    ListSecretVersions,
    CreateKey,
    GetKey,
    ListKeyVersions,
    WrapKey,
    UnwrapKey,
}

impl Op {
    fn action(self) -> &'static str {
        match self {
            Op::SetSecret => actions::SECRETS_SET,
            Op::GetSecret => actions::SECRETS_GET,
            Op::ListSecretVersions => actions::SECRETS_READ_METADATA,
            Op::CreateKey => actions::KEYS_CREATE,
            Op::GetKey | Op::ListKeyVersions => actions::KEYS_READ,
            Op::WrapKey => actions::KEYS_WRAP,
            Op::UnwrapKey => actions::KEYS_UNWRAP,
        }
    }
    fn is_secret(self) -> bool {
        matches!(self, Op::SetSecret | Op::GetSecret | Op::ListSecretVersions)
    }
}

fn action_matches(granted: &str, wanted: &str) -> bool {
    granted == wanted
        || granted == "*"
        || granted
            .strip_suffix('*')
            .is_some_and(|prefix| wanted.starts_with(prefix))
}

pub(super) fn authorize(
    st: &VaultState,
    vault: &str,
    principal: &str,
    route: &Route,
) -> Result<(), KvErr> {
    let action = route.op.action();
    let allowed = st.assignments.iter().any(|a| {
        a.principal == principal
            && a.actions.iter().any(|g| action_matches(g, action))
            && match &a.scope {
                Scope::Vault => true,
                Scope::Key(k) => !route.op.is_secret() && *k == route.name,
                Scope::SecretPrefix(p) => {
                    route.op.is_secret() && route.name.starts_with(p.as_str())
                }
                // Key Vault object names are case-insensitive.
                Scope::Secret(n) => route.op.is_secret() && n.eq_ignore_ascii_case(&route.name),
            }
    });
    if allowed {
        return Ok(());
    }
    let collection = if route.op.is_secret() {
        "secrets"
    } else {
        "keys"
    };
    Err(KvErr {
        status: StatusCode::FORBIDDEN,
        code: "Forbidden",
        message: format!(
            "Caller is not authorized to perform action on resource.\r\nIf role assignments, deny assignments or role definitions were changed recently, please observe propagation time.\r\nCaller: oid={principal};iss=https://sts.windows.net/{LAB_TENANT}/\r\nAction: '{action}'\r\nResource: '/subscriptions/00000000-0000-4000-8000-000000000001/resourcegroups/rg-hashistack-lab/providers/microsoft.keyvault/vaults/{vault}/{collection}/{}'\r\nAssignment: (not found)\r\nDecisionReason: 'DeniedWithNoValidRBAC'\r\nVault: {vault};location=lab\r\n",
            route.name.to_lowercase()
        ),
        inner: Some("ForbiddenByRbac"),
        retry_after: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_grants() {
        assert!(action_matches(
            "Microsoft.KeyVault/vaults/*",
            actions::KEYS_UNWRAP
        ));
        assert!(!action_matches(actions::KEYS_WRAP, actions::KEYS_UNWRAP));
        assert!(!action_matches(
            "Microsoft.KeyVault/vaults/secrets/*",
            actions::KEYS_WRAP
        ));
    }
}
