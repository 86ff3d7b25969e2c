//! hashistack-agent: metadata → NodeSpec → files → services → bootstrap → escrow → status.
pub mod image;
