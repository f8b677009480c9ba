//! # Switchboard wire protocol
//!
//! The schema (`proto/switchboard/v1/switchboard.proto`), the generated message types, a frame
//! codec and input validation shared by the broker and the clients. This crate is sans-IO: no
//! sockets, no runtime, no clocks.
//!
//! ## Frame layout (TCP)
//!
//! ```text
//! 0        4                                  4 + len
//! +--------+----------------------------------+
//! | len    | protobuf message (len bytes)     |
//! | u32 BE | ClientFrame or ServerFrame       |
//! +--------+----------------------------------+
//! ```
//!
//! A declared `len` above the configured limit is rejected before any buffer grows for it
//! ([`FrameError::TooLarge`]). Message-oriented transports (the planned WebSocket bridge)
//! carry one protobuf message per transport message, without the length prefix.
//!
//! ## Layout
//! - [`codec`]: the `tokio_util` `Decoder`/`Encoder` and encode-once helpers.
//! - [`json`]: the canonical protobuf JSON mapping (WebSocket JSON subprotocol) and the
//!   shared encode-once frame.
//! - [`kinds`]: frame kinds as numbers and names (metrics), read from encoded frames.
//! - [`validate`]: id, name and content rules with typed errors.
//! - [`pb`]: the generated types, re-exported at the crate root.

pub mod codec;
pub mod json;
pub mod kinds;
pub mod validate;

/// Types generated from `switchboard.proto` by prost.
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/switchboard.v1.rs"));
    include!(concat!(env!("OUT_DIR"), "/switchboard.v1.serde.rs"));
}

pub use codec::{
    ClientCodec, FrameCodec, FrameError, ServerCodec, encode_frame, encode_message_push,
    frame_payload,
};
pub use json::{Encoded, SharedFrame};
pub use pb::*;

/// The protocol version this crate implements, sent in `Hello` and `Welcome`.
pub const PROTOCOL_VERSION: u32 = 1;

/// Default maximum frame size in bytes (length prefix excluded): 1 MiB.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 1 << 20;

/// Default maximum message body (text or data) in bytes: 64 KiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 64 << 10;

impl Content {
    /// A `text/plain` message.
    #[must_use]
    pub fn text(text: impl Into<String>) -> Self {
        Self { content_type: String::new(), body: Some(content::Body::Text(text.into())) }
    }

    /// A binary message with an application-chosen content type.
    #[must_use]
    pub fn data(content_type: impl Into<String>, data: impl Into<bytes::Bytes>) -> Self {
        Self { content_type: content_type.into(), body: Some(content::Body::Data(data.into())) }
    }

    /// The text body, if this is a text message.
    #[must_use]
    pub fn as_text(&self) -> Option<&str> {
        match &self.body {
            Some(content::Body::Text(t)) => Some(t),
            _ => None,
        }
    }

    /// Size of the body in bytes (text or data).
    #[must_use]
    pub fn body_len(&self) -> usize {
        match &self.body {
            Some(content::Body::Text(t)) => t.len(),
            Some(content::Body::Data(d)) => d.len(),
            None => 0,
        }
    }
}

impl ClientFrame {
    /// A request frame with the given id.
    #[must_use]
    pub fn request(request_id: u64, kind: client_frame::Kind) -> Self {
        Self { request_id, kind: Some(kind) }
    }
}

impl ServerFrame {
    /// A reply frame with the given id.
    #[must_use]
    pub fn reply(request_id: u64, kind: server_frame::Kind) -> Self {
        Self { request_id, kind: Some(kind) }
    }

    /// A push (request id 0).
    #[must_use]
    pub fn push(kind: server_frame::Kind) -> Self {
        Self { request_id: 0, kind: Some(kind) }
    }

    /// An error reply.
    #[must_use]
    pub fn error(request_id: u64, code: ErrorCode, message: impl Into<String>) -> Self {
        Self::reply(
            request_id,
            server_frame::Kind::Error(Error {
                code: code as i32,
                message: message.into(),
                retry_after_ms: 0,
                leader_hint: String::new(),
                reason: String::new(),
            }),
        )
    }

    /// A `Disconnect` push.
    #[must_use]
    pub fn disconnect(
        reason: DisconnectReason,
        message: impl Into<String>,
        retry_after_ms: u64,
    ) -> Self {
        Self::push(server_frame::Kind::Disconnect(Disconnect {
            reason: reason as i32,
            message: message.into(),
            retry_after_ms,
        }))
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = self.as_str_name();
        f.write_str(name.strip_prefix("ERROR_CODE_").unwrap_or(name))
    }
}
