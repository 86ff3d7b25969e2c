//! `hashistack-agent status`: the whole cluster at a glance, from the jumpbox — or this node alone (`--node`).
//!
//! ```text
//!   collect (deadlines on every call) ─► Observations ─► assess (pure) ─► Report ─► render: table | JSON
//! ```
//!
//! Collection reads the coordination container (tier states, published boot records) with the node's managed
//! identity, the read-only status tokens from the status Key Vault, and the products' HTTPS APIs trusting the
//! cluster CA. Assessment and rendering are pure, so snapshot tests start from fixed observations.
//! The JSON schema and every verdict rule: docs/status.md.

pub mod assess;
pub mod cli;
pub mod collect;
pub mod model;
pub mod node;
pub mod render;
pub mod tokens;

pub use assess::assess;
pub use model::{Observations, Report, Verdict};
pub use node::{node_status, print_table, FileState, NodeStatus, ServiceState};
