//! The wire codec: pre-encoded [`WireMsg`]s, the `Watch` codec and the chunker.

use mesh_proto::pb::{self};
use prost::Message;
use tonic::Status;

use super::*;

pub(super) fn msg(revision: i64, payload: pb::watch_response::Payload) -> WireMsg {
    WireMsg::of(&pb::WatchResponse {
        revision,
        payload: Some(payload),
    })
}

/// `WatchResponse.revision` (field 1, varint) and `payload.events` (field 2, bytes).
const TAG_REVISION: u8 = 1 << 3;
const TAG_EVENTS: u8 = (2 << 3) | 2;
/// `Events.events` (field 1, length-delimited).
const TAG_EVENT: u8 = (1 << 3) | 2;

/// One encoded `WatchResponse`, the item of a watch stream on the wire. `Events`
/// messages are assembled from the index's pre-encoded events (a header, then the
/// events' bytes copied once into `body`); the others are encoded by prost.
#[derive(Debug, Clone, Default)]
pub struct WireMsg {
    pub(super) head: Vec<u8>,
    pub(super) body: Vec<u8>,
    /// Events in the message (for metrics).
    pub(super) events: usize,
}

impl WireMsg {
    fn of(m: &pb::WatchResponse) -> Self {
        WireMsg {
            head: m.encode_to_vec(),
            body: Vec::new(),
            events: match &m.payload {
                Some(pb::watch_response::Payload::Events(e)) => e.events.len(),
                _ => 0,
            },
        }
    }

    /// An `Events` message at `revision` whose `Events` body (framed events) is `body`.
    pub(super) fn events(revision: i64, body: Vec<u8>, events: usize) -> Self {
        let mut head = Vec::with_capacity(16);
        if revision != 0 {
            head.push(TAG_REVISION);
            prost::encoding::encode_varint(revision as u64, &mut head);
        }
        head.push(TAG_EVENTS);
        prost::encoding::encode_varint(body.len() as u64, &mut head);
        WireMsg { head, body, events }
    }

    pub fn len(&self) -> usize {
        self.head.len() + self.body.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The message decoded (tests, and the typed `Mesh::watch`).
    pub fn decode(&self) -> Result<pb::WatchResponse, prost::DecodeError> {
        pb::WatchResponse::decode(bytes::Buf::chain(&self.head[..], &self.body[..]))
    }
}

/// The gRPC codec of the wire watch stream: decodes `WatchRequest`s with prost, writes
/// [`WireMsg`]s as they are.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct WireCodec;

impl tonic::codec::Codec for WireCodec {
    type Encode = WireMsg;
    type Decode = pb::WatchRequest;
    type Encoder = WireCodec;
    type Decoder = WireCodec;

    fn encoder(&mut self) -> Self::Encoder {
        WireCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        WireCodec
    }
}

impl tonic::codec::Encoder for WireCodec {
    type Item = WireMsg;
    type Error = Status;

    fn encode(
        &mut self,
        item: WireMsg,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), Status> {
        use bytes::BufMut;
        dst.reserve(item.len());
        dst.put_slice(&item.head);
        dst.put_slice(&item.body);
        Ok(())
    }
}

impl tonic::codec::Decoder for WireCodec {
    type Item = pb::WatchRequest;
    type Error = Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<pb::WatchRequest>, Status> {
        pb::WatchRequest::decode(src)
            .map(Some)
            .map_err(|e| ServeError::MalformedRequest(e).into())
    }
}

/// The codec of the unary methods: prost, except that a request that does not decode is
/// the caller's fault (`InvalidArgument` naming the message type), where tonic's own prost
/// codec answers `Internal`.
pub(super) struct StrictCodec<E, D>(std::marker::PhantomData<fn(E) -> D>);

impl<E, D> Default for StrictCodec<E, D> {
    fn default() -> Self {
        Self(std::marker::PhantomData)
    }
}

impl<E, D> tonic::codec::Codec for StrictCodec<E, D>
where
    E: Message + Send + 'static,
    D: Message + Default + Send + 'static,
{
    type Encode = E;
    type Decode = D;
    type Encoder = StrictCodec<E, D>;
    type Decoder = StrictCodec<E, D>;

    fn encoder(&mut self) -> Self::Encoder {
        StrictCodec::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        StrictCodec::default()
    }
}

impl<E: Message, D> tonic::codec::Encoder for StrictCodec<E, D> {
    type Item = E;
    type Error = Status;

    fn encode(&mut self, item: E, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), Status> {
        // EncodeBuf grows as needed: encoding cannot run out of space.
        item.encode(dst)
            .map_err(|e| Status::internal(format!("encoding a response: {e}")))
    }
}

impl<E, D: Message + Default> tonic::codec::Decoder for StrictCodec<E, D> {
    type Item = D;
    type Error = Status;

    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<D>, Status> {
        let what = std::any::type_name::<D>()
            .rsplit("::")
            .next()
            .unwrap_or("request");
        D::decode(src)
            .map(Some)
            .map_err(|source| ServeError::MalformedMessage { what, source }.into())
    }
}

/// Packs encoded events into `Events` bodies bounded by count and encoded size.
pub(super) struct Chunker {
    max_events: usize,
    max_bytes: usize,
    body: Vec<u8>,
    events: usize,
    out: Vec<(Vec<u8>, usize)>,
}

impl Chunker {
    pub(super) fn new(cfg: &ServeConfig) -> Self {
        Self {
            max_events: cfg.max_events_per_message.max(1),
            max_bytes: cfg.max_message_bytes.max(1),
            body: Vec::new(),
            events: 0,
            out: Vec::new(),
        }
    }

    /// Appends one encoded `pb::Event`, framed as an element of `Events.events`.
    pub(super) fn push(&mut self, ev: &[u8]) {
        let len = 1 + prost::encoding::encoded_len_varint(ev.len() as u64) + ev.len();
        if self.events > 0
            && (self.events >= self.max_events || self.body.len() + len > self.max_bytes)
        {
            self.out.push((std::mem::take(&mut self.body), self.events));
            self.events = 0;
        }
        if self.body.is_empty() {
            self.body.reserve(len.max(self.max_bytes.min(16 * 1024)));
        }
        self.body.push(TAG_EVENT);
        prost::encoding::encode_varint(ev.len() as u64, &mut self.body);
        self.body.extend_from_slice(ev);
        self.events += 1;
    }

    /// The oldest chunk closed by [`Chunker::push`], if any: lets a caller send chunks as
    /// they fill instead of holding all of them.
    pub(super) fn take_closed(&mut self) -> Option<(Vec<u8>, usize)> {
        if self.out.is_empty() {
            None
        } else {
            Some(self.out.remove(0))
        }
    }

    pub(super) fn finish(mut self) -> Vec<(Vec<u8>, usize)> {
        if self.events > 0 {
            self.out.push((self.body, self.events));
        }
        self.out
    }
}
