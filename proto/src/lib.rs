//! The mesh wire contract (DESIGN.md section 7): generated protobuf types and service,
//! conversions to and from mesh-core, the resumable watch client, rustls helpers, and the
//! peer entry format (`peer_entry`) shared by the apiserver's importer and meshctl.

pub mod cli;
pub mod client;
pub mod convert;
pub mod flows;
pub mod keys;
pub mod peer_entry;
pub mod record;
pub mod request;
#[cfg(feature = "serve")]
pub mod serve;
pub mod state;
pub mod tls;

/// Hubble's flow API (`flow`, `observer`, `relay` packages), wire-compatible with Hubble's
/// CLI and UI: the agents' and the relay's Observer service.
#[allow(clippy::all, unreachable_pub, missing_docs, rustdoc::invalid_html_tags)]
pub mod hubble {
    pub mod flow {
        tonic::include_proto!("flow");
    }
    pub mod relay {
        tonic::include_proto!("relay");
    }
    pub mod observer {
        tonic::include_proto!("observer");
    }
}

#[allow(clippy::all, unreachable_pub, missing_docs, rustdoc::invalid_html_tags)]
pub mod pb {
    tonic::include_proto!("mesh.v1");
}
