//! `hashistack-agent image verify`: the gold image contract (owned by the packer work).
