//! Inputs shared by the benchmarks: representative frames of the hot paths.
//!
//! The benchmarks themselves (`benches/`) are thin; the measured code lives in the crates.

use bytes::Bytes;
use switchboard_protocol::{ClientFrame, Content, Message, client_frame};

/// A chat message of `body` bytes as the broker stores and delivers it.
#[must_use]
pub fn message(body: usize, seq: u64) -> Message {
    Message {
        conversation_id: "g:0123456789abcdef0123456789abcdef".into(),
        seq,
        sender: "alice@example".into(),
        timestamp_ms: 1_795_000_000_000 + seq,
        client_msg_id: format!("{seq:032x}"),
        content: Some(Content::text("x".repeat(body))),
        system: None,
    }
}

/// A `Send` request with a `body`-byte text.
#[must_use]
pub fn send_frame(body: usize, request_id: u64) -> ClientFrame {
    ClientFrame::request(
        request_id,
        client_frame::Kind::Send(switchboard_protocol::Send {
            conversation_id: "g:0123456789abcdef0123456789abcdef".into(),
            client_msg_id: format!("{request_id:032x}"),
            content: Some(Content::text("x".repeat(body))),
        }),
    )
}

/// `n` encoded `Send` frames back to back, as a client pipelines them.
#[must_use]
pub fn pipelined_sends(n: usize, body: usize) -> Bytes {
    let mut out = Vec::new();
    for i in 0..n {
        out.extend_from_slice(&switchboard_protocol::encode_frame(&send_frame(body, i as u64 + 1)));
    }
    Bytes::from(out)
}
