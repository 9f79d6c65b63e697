//! mesh-agent: from the local apiserver to eBPF maps.
