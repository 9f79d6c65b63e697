//! The mesh wire contract (DESIGN.md section 7): generated protobuf types and service,
//! conversions to and from mesh-core, the resumable watch client, rustls helpers, and the
//! peer entry format (`peer_entry`) shared by the apiserver's importer and meshctl.

pub mod cli;
pub mod client;
pub mod convert;
pub mod keys;
pub mod peer_entry;
#[cfg(feature = "serve")]
pub mod serve;
pub mod state;
pub mod tls;

#[allow(clippy::all, unreachable_pub, missing_docs, rustdoc::invalid_html_tags)]
pub mod pb {
    tonic::include_proto!("mesh.v1");
}
