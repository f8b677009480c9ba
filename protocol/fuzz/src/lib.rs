//! Checks shared by the fuzz targets, and the seed corpus generator.
//!
//! The checks panic (which libFuzzer reports as a crash) when a property of the protocol crate
//! does not hold:
//! - [`check_validation`]: every rule of `switchboard_protocol::validate` gives the result its
//!   specification (the table in `validate.rs`) prescribes, on every string of a frame;
//! - [`check_binary_round_trip`]: a decoded frame encodes to bytes that decode to the same
//!   frame, also through the length-prefixed codec with the limit set to exactly its length;
//! - [`check_json_round_trip`]: a frame whose JSON form can be produced decodes back from it.

use bytes::BytesMut;
use prost::Message as _;
use switchboard_protocol::validate::{self, Field, ValidationError};
use switchboard_protocol::{
    ClientCodec, ClientFrame, Content, FrameError, ServerCodec, client_frame, content, json,
};
use tokio_util::codec::{Decoder as _, Encoder as _};

pub mod seeds;

/// What a rule must answer for `s`, computed from the specification alone: empty (unless
/// allowed), then too long, then the first character not allowed.
fn expected(
    s: &str,
    field: Field,
    max: usize,
    allowed: fn(char) -> bool,
    may_be_empty: bool,
) -> Result<(), ValidationError> {
    if s.is_empty() {
        return if may_be_empty { Ok(()) } else { Err(ValidationError::Empty(field)) };
    }
    if s.len() > max {
        return Err(ValidationError::TooLong { field, len: s.len(), max });
    }
    match s.chars().find(|&c| !allowed(c)) {
        Some(ch) => Err(ValidationError::InvalidChar { field, ch }),
        None => Ok(()),
    }
}

fn user_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@')
}

fn conversation_char(c: char) -> bool {
    user_char(c) || c == ':'
}

fn printable(c: char) -> bool {
    ('!'..='~').contains(&c)
}

fn content_type_char(c: char) -> bool {
    printable(c) || c == ' '
}

fn not_control(c: char) -> bool {
    !c.is_control()
}

/// `s`'s characters, repeated, up to at most `n` bytes: random inputs rarely have a rule's
/// exact length limit, so every string is also tried stretched to each limit and one past it.
fn stretched(s: &str, n: usize) -> String {
    let mut out = String::with_capacity(n);
    for ch in s.chars().cycle() {
        if out.len() + ch.len_utf8() > n {
            break;
        }
        out.push(ch);
    }
    out
}

/// Runs every string rule on `s`, and on `s` stretched to each rule's length limit and one
/// byte past it, comparing each answer with the specification.
pub fn check_string_rules(s: &str) {
    check_rules_once(s);
    for max in [
        validate::MAX_USER_ID_BYTES,
        validate::MAX_CONVERSATION_ID_BYTES,
        validate::MAX_CLIENT_MSG_ID_BYTES,
        validate::MAX_NAME_BYTES,
    ] {
        check_rules_once(&stretched(s, max));
        check_rules_once(&stretched(s, max + 1));
    }
}

fn check_rules_once(s: &str) {
    let user = validate::user_id(s);
    assert_eq!(
        user,
        expected(s, Field::UserId, validate::MAX_USER_ID_BYTES, user_char, false),
        "user_id({s:?})"
    );
    let conversation = validate::conversation_id(s);
    assert_eq!(
        conversation,
        expected(
            s,
            Field::ConversationId,
            validate::MAX_CONVERSATION_ID_BYTES,
            conversation_char,
            false
        ),
        "conversation_id({s:?})"
    );
    // Every valid user id is a valid conversation id (the broker relies on it for keys).
    if user.is_ok() {
        assert!(conversation.is_ok(), "user id {s:?} is not a valid conversation id");
    }
    assert_eq!(
        validate::client_msg_id(s),
        expected(s, Field::ClientMsgId, validate::MAX_CLIENT_MSG_ID_BYTES, printable, false),
        "client_msg_id({s:?})"
    );
    assert_eq!(
        validate::name(s),
        expected(s, Field::Name, validate::MAX_NAME_BYTES, not_control, true),
        "name({s:?})"
    );
}

/// For two valid user ids: the direct conversation id does not depend on the order, is a valid
/// conversation id, and names exactly these two users.
pub fn check_direct_id(a: &str, b: &str) {
    if validate::user_id(a).is_err() || validate::user_id(b).is_err() {
        return;
    }
    let id = validate::direct_conversation_id(a, b);
    assert_eq!(id, validate::direct_conversation_id(b, a), "direct id depends on the order");
    assert_eq!(validate::conversation_id(&id), Ok(()), "direct id {id:?} is invalid");
    let pair = id.strip_prefix(validate::DIRECT_PREFIX).expect("direct id has the prefix");
    let (lo, hi) = pair.split_once(':').expect("direct id has two users");
    let (x, y) = if a <= b { (a, b) } else { (b, a) };
    assert_eq!((lo, hi), (x, y), "direct id {id:?} is ambiguous");
}

/// Checks `validate::content` against its specification, for the broker's default body limit
/// and for a limit of exactly the body's length (accepted) and one less (rejected).
pub fn check_content(c: &Content) {
    fn spec(c: &Content, max_body: usize) -> Result<(), ValidationError> {
        if c.body.is_none() {
            return Err(ValidationError::MissingBody);
        }
        let len = match &c.body {
            Some(content::Body::Text(t)) => t.len(),
            Some(content::Body::Data(d)) => d.len(),
            None => 0,
        };
        if len > max_body {
            return Err(ValidationError::TooLong { field: Field::Body, len, max: max_body });
        }
        if c.content_type.is_empty() {
            return Ok(());
        }
        expected(
            &c.content_type,
            Field::ContentType,
            validate::MAX_CONTENT_TYPE_BYTES,
            content_type_char,
            false,
        )
    }
    let len = c.body_len();
    // The content type is also tried stretched to its limit and one byte past it.
    for n in [validate::MAX_CONTENT_TYPE_BYTES, validate::MAX_CONTENT_TYPE_BYTES + 1] {
        let c = Content { content_type: stretched(&c.content_type, n), body: c.body.clone() };
        assert_eq!(validate::content(&c, len), spec(&c, len), "content({c:?}, {len})");
    }
    let mut limits = vec![switchboard_protocol::DEFAULT_MAX_BODY_BYTES, len];
    if let Some(below) = len.checked_sub(1) {
        limits.push(below);
    }
    for max in limits {
        assert_eq!(validate::content(c, max), spec(c, max), "content({c:?}, {max})");
    }
}

/// Every string a client frame carries, for the validation checks.
fn strings(frame: &ClientFrame) -> Vec<&str> {
    use client_frame::Kind;
    let mut out: Vec<&str> = Vec::new();
    let Some(kind) = &frame.kind else { return out };
    match kind {
        Kind::Hello(h) => {
            out.extend([h.token.as_str(), h.client.as_str()]);
            if let Some(p) = &h.resume {
                out.extend(p.cursors.iter().map(|c| c.conversation_id.as_str()));
            }
        }
        Kind::Ping(_) => {}
        Kind::Send(s) => {
            out.extend([s.conversation_id.as_str(), s.client_msg_id.as_str()]);
            if let Some(c) = &s.content {
                out.push(c.content_type.as_str());
                if let Some(t) = c.as_text() {
                    out.push(t);
                }
            }
        }
        Kind::History(h) => out.push(&h.conversation_id),
        Kind::Sync(s) => {
            if let Some(p) = &s.position {
                out.extend(p.cursors.iter().map(|c| c.conversation_id.as_str()));
            }
        }
        Kind::CreateConversation(c) => {
            out.extend([c.name.as_str(), c.conversation_id.as_str()]);
            out.extend(c.members.iter().map(String::as_str));
        }
        Kind::AddMembers(m) => {
            out.push(&m.conversation_id);
            out.extend(m.users.iter().map(String::as_str));
        }
        Kind::RemoveMembers(m) => {
            out.push(&m.conversation_id);
            out.extend(m.users.iter().map(String::as_str));
        }
        Kind::Leave(l) => out.push(&l.conversation_id),
        Kind::ListConversations(l) => out.push(&l.after),
        Kind::ListMembers(l) => out.extend([l.conversation_id.as_str(), l.after.as_str()]),
        Kind::MarkRead(m) => out.push(&m.conversation_id),
        Kind::MarkDelivered(m) => out.push(&m.conversation_id),
        Kind::Typing(t) => out.push(&t.conversation_id),
        Kind::PresenceQuery(p) => out.extend(p.users.iter().map(String::as_str)),
        Kind::PresenceSubscribe(p) => out.extend(p.users.iter().map(String::as_str)),
        Kind::PresenceUnsubscribe(p) => out.extend(p.users.iter().map(String::as_str)),
        Kind::GetReceipts(g) => out.extend([g.conversation_id.as_str(), g.after.as_str()]),
        Kind::RefreshToken(r) => out.push(&r.token),
    }
    out
}

/// Runs the protocol crate's validation on whatever `frame` carries (as the broker's handlers
/// do), checking each answer against the specification.
pub fn check_validation(frame: &ClientFrame) {
    let strings = strings(frame);
    // Bounded so that a frame with thousands of members stays fast.
    for s in strings.iter().take(64) {
        check_string_rules(s);
    }
    for pair in strings.windows(2).take(64) {
        check_direct_id(pair[0], pair[1]);
    }
    if let Some(client_frame::Kind::Send(s)) = &frame.kind
        && let Some(c) = &s.content
    {
        check_content(c);
    }
}

/// A decoded client frame encodes to bytes that decode to the same frame; through the codec, a
/// limit of exactly its length accepts it and one byte less rejects it before decoding.
pub fn check_binary_round_trip(frame: &ClientFrame) {
    let bytes = frame.encode_to_vec();
    assert_eq!(bytes.len(), frame.encoded_len());
    let again = ClientFrame::decode(&bytes[..]).expect("re-encoded frame decodes");
    assert_eq!(&again, frame, "binary round trip");

    let mut wire = BytesMut::new();
    ClientCodec::new(bytes.len()).encode(frame, &mut wire).expect("encodes at its own length");
    assert_eq!(&wire[..], &switchboard_protocol::encode_frame(frame)[..]);
    let mut copy = wire.clone();
    let decoded = ServerCodec::new(bytes.len()).decode(&mut copy).expect("decodes at the limit");
    assert_eq!(decoded.as_ref(), Some(frame), "codec round trip");
    assert!(copy.is_empty(), "codec left bytes behind");
    if let Some(below) = bytes.len().checked_sub(1) {
        let err = ServerCodec::new(below).decode(&mut wire.clone()).expect_err("over the limit");
        assert!(matches!(err, FrameError::TooLarge { .. }), "{err:?}");
    }
}

/// A frame whose JSON form can be produced (binary frames may hold enum values this version
/// does not know, which the JSON mapping cannot name) decodes back from it unchanged.
pub fn check_json_round_trip<M>(frame: &M, decode: fn(&str) -> Result<M, json::JsonError>)
where
    M: serde::Serialize + PartialEq + std::fmt::Debug,
{
    let Ok(text) = serde_json::to_string(frame) else { return };
    assert_eq!(json::encode(frame).ok().as_ref(), Some(&text));
    match decode(&text) {
        Ok(again) => assert_eq!(&again, frame, "JSON round trip of {text}"),
        Err(e) => panic!("JSON form {text} of {frame:?} does not decode: {e}"),
    }
}
