//! mesh-agent: from the local apiserver to eBPF maps.

pub mod datapath;
pub mod desired;
