//! Frame kinds as small numbers and names, for metrics: a `ClientFrame` or `ServerFrame` kind
//! is the field number of its `oneof` member, so an encoded server frame's kind can be read
//! from its first bytes without decoding it.
//!
//! Numbers are below [`KINDS`]; 0 means no kind (or one this build does not know).

use crate::client_frame;

/// Kind numbers are below this.
pub const KINDS: usize = 32;

/// The field number of a client frame's kind (0: none).
#[must_use]
pub fn client_kind(kind: Option<&client_frame::Kind>) -> usize {
    use client_frame::Kind as K;
    match kind {
        None => 0,
        Some(K::Hello(_)) => 2,
        Some(K::Ping(_)) => 3,
        Some(K::Send(_)) => 4,
        Some(K::History(_)) => 5,
        Some(K::Sync(_)) => 6,
        Some(K::CreateConversation(_)) => 7,
        Some(K::AddMembers(_)) => 8,
        Some(K::RemoveMembers(_)) => 9,
        Some(K::Leave(_)) => 10,
        Some(K::ListConversations(_)) => 11,
        Some(K::ListMembers(_)) => 12,
        Some(K::MarkRead(_)) => 13,
        Some(K::MarkDelivered(_)) => 14,
        Some(K::Typing(_)) => 15,
        Some(K::PresenceQuery(_)) => 16,
        Some(K::PresenceSubscribe(_)) => 17,
        Some(K::PresenceUnsubscribe(_)) => 18,
        Some(K::GetReceipts(_)) => 19,
        Some(K::RefreshToken(_)) => 20,
    }
}

/// The name of client frame kind `n` (its `oneof` field name).
#[must_use]
pub fn client_kind_name(n: usize) -> &'static str {
    match n {
        2 => "hello",
        3 => "ping",
        4 => "send",
        5 => "history",
        6 => "sync",
        7 => "create_conversation",
        8 => "add_members",
        9 => "remove_members",
        10 => "leave",
        11 => "list_conversations",
        12 => "list_members",
        13 => "mark_read",
        14 => "mark_delivered",
        15 => "typing",
        16 => "presence_query",
        17 => "presence_subscribe",
        18 => "presence_unsubscribe",
        19 => "get_receipts",
        20 => "refresh_token",
        _ => "unknown",
    }
}

/// The name of server frame kind `n` (its `oneof` field name).
#[must_use]
pub fn server_kind_name(n: usize) -> &'static str {
    match n {
        2 => "welcome",
        3 => "pong",
        4 => "error",
        5 => "disconnect",
        6 => "send_ack",
        7 => "history",
        8 => "sync",
        9 => "conversation",
        10 => "membership",
        11 => "conversations",
        12 => "members",
        13 => "receipt",
        14 => "presences",
        15 => "receipts",
        16 => "ack",
        17 => "refresh_token_ok",
        20 => "message",
        21 => "feed_event",
        22 => "presence",
        23 => "typing",
        24 => "receipt_event",
        _ => "unknown",
    }
}

/// Reads a varint at the front of `b`: its value and the bytes it took.
fn varint(b: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (i, byte) in b.iter().take(10).enumerate() {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

/// The kind number of an encoded `ServerFrame` (the protobuf message, without the length
/// prefix), read from its first fields: prost writes fields in number order, so the kind
/// follows `request_id` (field 1, a varint, absent when 0). 0 when it cannot tell.
#[must_use]
pub fn server_kind_of(payload: &[u8]) -> usize {
    let mut rest = payload;
    while let Some((tag, n)) = varint(rest) {
        rest = rest.get(n..).unwrap_or_default();
        let field = tag >> 3;
        if field == 1 && tag & 7 == 0 {
            let Some((_, n)) = varint(rest) else { return 0 };
            rest = rest.get(n..).unwrap_or_default();
            continue;
        }
        return usize::try_from(field).ok().filter(|f| *f < KINDS).unwrap_or(0);
    }
    0
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use prost::Message as _;

    use super::*;
    use crate::{ClientFrame, ServerFrame, server_frame};

    #[test]
    fn given_encoded_server_frames_should_read_their_kind_without_decoding() {
        let frames = [
            (ServerFrame::reply(0, server_frame::Kind::Pong(crate::Pong { server_time_ms: 1 })), 3),
            (
                ServerFrame::reply(
                    u64::MAX,
                    server_frame::Kind::Pong(crate::Pong { server_time_ms: 1 }),
                ),
                3,
            ),
            (ServerFrame::error(7, crate::ErrorCode::NotFound, "x"), 4),
            (ServerFrame::disconnect(crate::DisconnectReason::Shutdown, "bye", 0), 5),
            (ServerFrame::reply(0, server_frame::Kind::Message(crate::Message::default())), 20),
        ];
        for (frame, kind) in frames {
            let bytes = frame.encode_to_vec();
            assert_eq!(server_kind_of(&bytes), kind, "{frame:?}");
            assert_ne!(server_kind_name(kind), "unknown");
        }
        assert_eq!(server_kind_of(&[]), 0);
        assert_eq!(server_kind_of(&[0x08, 0xff]), 0, "truncated request id");
        assert_eq!(server_kind_of(&[0xff; 12]), 0, "overlong varint");
        assert_eq!(server_kind_of(&[0xf8, 0x01]), 31, "a field this build does not know");
        assert_eq!(server_kind_name(31), "unknown");
        assert_eq!(server_kind_of(&[0x80, 0x02]), 0, "field 32 is out of range");
    }

    #[test]
    fn given_every_client_kind_should_have_a_name() {
        let frame = ClientFrame::request(1, client_frame::Kind::Ping(crate::Ping::default()));
        assert_eq!(client_kind_name(client_kind(frame.kind.as_ref())), "ping");
        for n in 2..=20 {
            assert_ne!(client_kind_name(n), "unknown", "{n}");
        }
        assert_eq!(client_kind_name(client_kind(None)), "unknown");
    }
}
