//! hashistack-agent: metadata → NodeSpec → files → services → bootstrap → escrow → status.
//!
//! One module per concern; data flows one way through them.

pub mod azure;
pub mod boot;
pub mod bootstrap;
pub mod config;
pub mod converge;
pub mod coordination;
pub mod disk;
pub mod election;
pub mod escrow;
pub mod files;
pub mod identity;
pub mod ids;
pub mod image;
pub mod imds;
pub mod logging;
pub mod material;
pub mod names;
pub mod node;
pub mod publish;
pub mod record;
pub mod render;
pub mod retry;
pub mod services;
pub mod smoke;
pub mod snapshot;
pub mod status;
pub mod tls;
pub mod userdata;
pub mod version;
pub mod warm;
