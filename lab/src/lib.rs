//! hashistack-lab: Azure-in-a-box on one machine, for the README's demo and the end-to-end tests.

pub mod bench;
pub mod imds;
pub mod keyvault;
pub mod lab;
pub mod lb;
pub mod nomad_double;
pub mod nomad_identity;
pub mod procs;
pub mod tools;

pub use lab::{Lab, LabError, LabHealth, LabOptions};
