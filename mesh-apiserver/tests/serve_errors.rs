//! The gRPC edge answers bad input with the caller's error code: a WatchRequest whose bytes
//! are not a WatchRequest is `InvalidArgument` (the caller's fault), not `Internal`.

mod serve_support;

use bytes::{Buf, BufMut, Bytes};
use serve_support::*;
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;

/// Sends raw bytes as the request message; returns raw bytes.
#[derive(Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

async fn raw_watch(addr: std::net::SocketAddr, body: &'static [u8]) -> Result<(), Status> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/mesh.v1.Mesh/Watch");
    let mut stream = grpc
        .server_streaming(
            tonic::Request::new(Bytes::from_static(body)),
            path,
            RawCodec,
        )
        .await?
        .into_inner();
    // The first message (or the stream's error) tells whether the request was accepted.
    stream.message().await.map(|_| ())
}

#[tokio::test]
async fn malformed_watch_request_is_invalid_argument() {
    let etcd = mesh_testkit::etcd::Etcd::start();
    let server = insecure_server(&etcd, "east", &[]).await;

    // Field 1 (clusters, a string) announced with 5 bytes that are not there.
    let status = raw_watch(server.addr(), &[0x0a, 0x05, b'e'])
        .await
        .expect_err("a truncated WatchRequest must be refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("malformed WatchRequest"),
        "{status:?}"
    );

    // The same server still accepts a well-formed (empty = everything) request.
    raw_watch(server.addr(), &[])
        .await
        .expect("an empty WatchRequest is valid");
}
