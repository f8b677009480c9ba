//! Length-prefixed protobuf framing as a `tokio_util` codec.
//!
//! The decoder reads the 4-byte big-endian length first and rejects it when it exceeds the
//! limit, before the buffer grows for the body: a peer that announces a 4 GiB frame costs
//! nothing but an error. It never reserves the announced length up front either (the reader
//! grows the buffer as bytes arrive), so a slow peer cannot pin a large buffer with a header.

use std::marker::PhantomData;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;
use tokio_util::codec::{Decoder, Encoder};

use crate::{ClientFrame, ServerFrame};

/// Size of the length prefix in bytes.
pub const HEADER_LEN: usize = 4;

/// A framing or decoding failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The declared (or encoded) frame length exceeds the limit.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Declared length.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// The frame body is not a valid protobuf message of the expected type.
    #[error("malformed frame: {0}")]
    Malformed(#[from] prost::DecodeError),
    /// The underlying transport failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// Decodes frames of type `D` and encodes frames of type `E`.
#[derive(Debug)]
pub struct FrameCodec<D, E> {
    max_frame: usize,
    _types: PhantomData<fn(E) -> D>,
}

/// The broker's side: decodes `ClientFrame`, encodes `ServerFrame`.
pub type ServerCodec = FrameCodec<ClientFrame, ServerFrame>;
/// A client's side: decodes `ServerFrame`, encodes `ClientFrame`.
pub type ClientCodec = FrameCodec<ServerFrame, ClientFrame>;

impl<D, E> FrameCodec<D, E> {
    /// A codec that rejects frames longer than `max_frame` bytes (prefix excluded).
    #[must_use]
    pub fn new(max_frame: usize) -> Self {
        Self { max_frame, _types: PhantomData }
    }

    /// The limit in force.
    #[must_use]
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Changes the limit (e.g. after the handshake announced it).
    pub fn set_max_frame(&mut self, max_frame: usize) {
        self.max_frame = max_frame;
    }
}

impl<D, E> Default for FrameCodec<D, E> {
    fn default() -> Self {
        Self::new(crate::DEFAULT_MAX_FRAME_BYTES)
    }
}

/// Checks the header at the front of `src`: `Ok(None)` when fewer than 4 bytes are buffered,
/// `Ok(Some(len))` with the body length, or `TooLarge`.
fn peek_len(src: &[u8], max: usize) -> Result<Option<usize>, FrameError> {
    let Some(header) = src.get(..HEADER_LEN) else { return Ok(None) };
    let mut header = header;
    let len = header.get_u32() as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(Some(len))
}

/// Splits one whole frame's body off the front of `src`, if one is buffered.
///
/// This is the raw half of the decoder, for transports that route bytes before decoding.
///
/// # Errors
/// [`FrameError::TooLarge`] when the declared length exceeds `max_frame`.
pub fn frame_payload(src: &mut BytesMut, max_frame: usize) -> Result<Option<Bytes>, FrameError> {
    let Some(len) = peek_len(src, max_frame)? else { return Ok(None) };
    if src.len() < HEADER_LEN + len {
        return Ok(None);
    }
    src.advance(HEADER_LEN);
    Ok(Some(src.split_to(len).freeze()))
}

impl<D: Message + Default, E> Decoder for FrameCodec<D, E> {
    type Item = D;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<D>, FrameError> {
        match frame_payload(src, self.max_frame)? {
            Some(body) => Ok(Some(D::decode(body)?)),
            None => Ok(None),
        }
    }
}

impl<D, E: Message> Encoder<&E> for FrameCodec<D, E> {
    type Error = FrameError;

    fn encode(&mut self, item: &E, dst: &mut BytesMut) -> Result<(), FrameError> {
        let len = item.encoded_len();
        if len > self.max_frame {
            return Err(FrameError::TooLarge { len, max: self.max_frame });
        }
        dst.reserve(HEADER_LEN + len);
        put_len(dst, len);
        item.encode_raw(dst);
        Ok(())
    }
}

impl<D, E: Message> Encoder<E> for FrameCodec<D, E> {
    type Error = FrameError;

    fn encode(&mut self, item: E, dst: &mut BytesMut) -> Result<(), FrameError> {
        Encoder::<&E>::encode(self, &item, dst)
    }
}

#[allow(clippy::cast_possible_truncation)]
fn put_len(dst: &mut BytesMut, len: usize) {
    // Callers bound `len` by a limit far below u32::MAX.
    dst.put_u32(len as u32);
}

/// Encodes `msg` once into a length-prefixed frame that can be shared by every recipient.
/// Strip the first [`HEADER_LEN`] bytes for transports that frame messages themselves.
#[must_use]
pub fn encode_frame<M: Message>(msg: &M) -> Bytes {
    let len = msg.encoded_len();
    let mut buf = BytesMut::with_capacity(HEADER_LEN + len);
    put_len(&mut buf, len);
    msg.encode_raw(&mut buf);
    buf.freeze()
}

/// Field number of `ServerFrame.message`.
const SERVER_FRAME_MESSAGE_FIELD: u32 = 20;

/// Builds the length-prefixed push frame `ServerFrame { message }` around an already encoded
/// `Message`, without decoding or re-encoding it. The broker encodes each message once, stores
/// those bytes, and wraps them here for delivery.
#[must_use]
pub fn encode_message_push(encoded_message: &[u8]) -> Bytes {
    use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};
    let len = encoded_message.len();
    let body = key_len(SERVER_FRAME_MESSAGE_FIELD) + encoded_len_varint(len as u64) + len;
    let mut buf = BytesMut::with_capacity(HEADER_LEN + body);
    put_len(&mut buf, body);
    encode_key(SERVER_FRAME_MESSAGE_FIELD, WireType::LengthDelimited, &mut buf);
    encode_varint(len as u64, &mut buf);
    buf.put_slice(encoded_message);
    buf.freeze()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::{Content, Hello, Ping, Send, SendAck, client_frame, server_frame};
    use proptest::prelude::*;

    fn decode_all(codec: &mut ServerCodec, bytes: &[u8]) -> Vec<ClientFrame> {
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Some(f) = codec.decode(&mut buf).unwrap() {
            out.push(f);
        }
        out
    }

    #[test]
    fn given_ping_frame_when_encoded_should_match_golden_bytes() {
        let frame = ClientFrame::request(1, client_frame::Kind::Ping(Ping {}));
        // len=4 | field 1 (request_id) varint 1 | field 3 (ping) len 0
        assert_eq!(&encode_frame(&frame)[..], &[0, 0, 0, 4, 0x08, 0x01, 0x1a, 0x00]);
    }

    #[test]
    fn given_hello_frame_when_encoded_should_match_golden_bytes() {
        let frame = ClientFrame::request(
            7,
            client_frame::Kind::Hello(Hello {
                protocol_version: 1,
                token: "t".into(),
                resume: None,
                client: String::new(),
            }),
        );
        // request_id=7 | hello{ protocol_version=1, token="t" }
        let expected = [0, 0, 0, 9, 0x08, 0x07, 0x12, 0x05, 0x08, 0x01, 0x12, 0x01, b't'];
        assert_eq!(&encode_frame(&frame)[..], &expected);
        assert_eq!(decode_all(&mut ServerCodec::default(), &expected), vec![frame]);
    }

    #[test]
    fn given_send_ack_when_encoded_should_match_golden_bytes() {
        let frame = ServerFrame::reply(
            2,
            server_frame::Kind::SendAck(SendAck {
                conversation_id: "c".into(),
                seq: 300,
                timestamp_ms: 0,
                client_msg_id: "m".into(),
                duplicate: false,
            }),
        );
        // request_id=2 | send_ack(6){ conversation_id="c", seq=300 (0xac 0x02), client_msg_id="m" }
        let expected = [
            0, 0, 0, 13, 0x08, 0x02, 0x32, 0x09, 0x0a, 0x01, b'c', 0x10, 0xac, 0x02, 0x22, 0x01,
            b'm',
        ];
        assert_eq!(&encode_frame(&frame)[..], &expected);
    }

    #[test]
    fn given_partial_frame_when_decoding_should_wait_for_more_bytes() {
        let bytes = encode_frame(&ClientFrame::request(1, client_frame::Kind::Ping(Ping {})));
        let mut codec = ServerCodec::default();
        let mut buf = BytesMut::new();
        for (i, b) in bytes.iter().enumerate() {
            buf.put_u8(*b);
            let out = codec.decode(&mut buf).unwrap();
            assert_eq!(out.is_some(), i == bytes.len() - 1);
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn given_4gib_length_prefix_when_decoding_should_reject_before_allocating() {
        let mut codec = ServerCodec::new(1 << 20);
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 1, 2][..]);
        let cap = buf.capacity();
        let err = codec.decode(&mut buf).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { len: 0xffff_ffff, max: 1_048_576 }));
        assert_eq!(buf.capacity(), cap, "no allocation for the announced length");
    }

    #[test]
    fn given_garbage_body_when_decoding_should_return_malformed() {
        let mut codec = ServerCodec::default();
        let mut buf = BytesMut::from(&[0, 0, 0, 3, 0xff, 0xff, 0xff][..]);
        assert!(matches!(codec.decode(&mut buf), Err(FrameError::Malformed(_))));
    }

    #[test]
    fn given_unknown_oneof_case_when_decoding_should_yield_frame_without_kind() {
        // request_id=5, then field 99 (length-delimited, empty): unknown to this version.
        let mut codec = ServerCodec::default();
        let bytes = [0, 0, 0, 5, 0x08, 0x05, 0x9a, 0x06, 0x00];
        let frames = decode_all(&mut codec, &bytes);
        assert_eq!(frames, vec![ClientFrame { request_id: 5, kind: None }]);
    }

    #[test]
    fn given_frame_over_limit_when_encoding_should_fail_typed() {
        let mut codec = ClientCodec::new(16);
        let frame = ClientFrame::request(
            1,
            client_frame::Kind::Send(Send {
                conversation_id: "c".into(),
                client_msg_id: "m".into(),
                content: Some(Content::text("x".repeat(64))),
            }),
        );
        let mut dst = BytesMut::new();
        assert!(matches!(
            codec.encode(&frame, &mut dst),
            Err(FrameError::TooLarge { max: 16, .. })
        ));
    }

    #[test]
    fn given_encoded_message_when_wrapped_as_push_should_equal_encoding_the_frame() {
        let msg = crate::Message {
            conversation_id: "dm:a:b".into(),
            seq: 9,
            sender: "a".into(),
            timestamp_ms: 1_700_000_000_000,
            client_msg_id: "k".into(),
            content: Some(Content::text("hello")),
            system: None,
        };
        let expected = encode_frame(&ServerFrame::push(server_frame::Kind::Message(msg.clone())));
        assert_eq!(encode_message_push(&msg.encode_to_vec()), expected);
    }

    fn arb_content() -> impl Strategy<Value = Content> {
        prop_oneof![
            any::<String>().prop_map(Content::text),
            (any::<String>(), proptest::collection::vec(any::<u8>(), 0..256))
                .prop_map(|(t, d)| Content::data(t, d)),
        ]
    }

    proptest! {
        #[test]
        fn given_any_send_frame_when_round_tripped_should_be_equal(
            request_id in any::<u64>(),
            conversation_id in "[a-z0-9:]{0,40}",
            client_msg_id in any::<String>(),
            content in arb_content(),
        ) {
            let frame = ClientFrame::request(request_id, client_frame::Kind::Send(Send {
                conversation_id, client_msg_id, content: Some(content),
            }));
            let mut codec = ClientCodec::default();
            let mut buf = BytesMut::new();
            codec.encode(&frame, &mut buf).unwrap();
            prop_assert_eq!(&buf[..], &encode_frame(&frame)[..]);
            let decoded = ServerCodec::default().decode(&mut buf).unwrap();
            prop_assert_eq!(decoded, Some(frame));
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn given_random_bytes_when_decoding_should_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut codec = ServerCodec::new(256);
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = codec.decode(&mut buf) {}
        }
    }
}
