//! The JSON form of the protocol: the canonical protobuf JSON mapping, used by the WebSocket
//! subprotocol `switchboard.v1.json` so browsers need no protobuf library.
//!
//! Field names are lowerCamelCase (`requestId`, `conversationId`); 64-bit integers are JSON
//! strings (`"seq": "42"`); `bytes` are base64; enums are their names
//! (`"code": "ERROR_CODE_RATE_LIMITED"`); a `oneof` is the one field that is set; fields with
//! default values are omitted. Parsers accept the original snake_case names too, and numbers
//! for 64-bit fields. Unknown fields are ignored.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use prost::Message as _;

use crate::{ClientFrame, FrameError, ServerFrame, codec::HEADER_LEN, encode_frame};

/// A JSON decoding failure.
#[derive(Debug, thiserror::Error)]
#[error("invalid JSON frame: {0}")]
pub struct JsonError(#[from] serde_json::Error);

/// Parses one `ClientFrame` in its JSON form.
///
/// # Errors
/// When the text is not a valid JSON `ClientFrame`.
pub fn decode_client(text: &str) -> Result<ClientFrame, JsonError> {
    Ok(serde_json::from_str(text)?)
}

/// Parses one `ServerFrame` in its JSON form (for clients and tests).
///
/// # Errors
/// When the text is not a valid JSON `ServerFrame`.
pub fn decode_server(text: &str) -> Result<ServerFrame, JsonError> {
    Ok(serde_json::from_str(text)?)
}

/// The JSON form of a frame.
///
/// # Errors
/// When the frame holds a value JSON cannot name: an enum number the schema does not define
/// (the canonical mapping names enum values), as a binary frame from a newer peer may.
pub fn encode<M: serde::Serialize>(frame: &M) -> Result<String, JsonError> {
    Ok(serde_json::to_string(frame)?)
}

/// A server frame encoded once and shared by every recipient: the length-prefixed protobuf
/// bytes (TCP), the same bytes without the prefix (binary WebSocket), and, computed on first
/// use and then shared, the JSON text (JSON WebSocket).
#[derive(Debug)]
pub struct Encoded {
    prefixed: Bytes,
    json: OnceLock<Bytes>,
}

/// A shared encoded frame.
pub type SharedFrame = Arc<Encoded>;

impl Encoded {
    /// Wraps an already length-prefixed encoding of a `ServerFrame`.
    #[must_use]
    pub fn new(prefixed: Bytes) -> SharedFrame {
        Arc::new(Self { prefixed, json: OnceLock::new() })
    }

    /// Encodes `frame`.
    #[must_use]
    pub fn of(frame: &ServerFrame) -> SharedFrame {
        Self::new(encode_frame(frame))
    }

    /// Length-prefixed protobuf, as sent over TCP.
    #[must_use]
    pub fn prefixed(&self) -> &Bytes {
        &self.prefixed
    }

    /// The protobuf message alone, as sent in a binary WebSocket message (no copy).
    #[must_use]
    pub fn payload(&self) -> Bytes {
        self.prefixed.slice(HEADER_LEN.min(self.prefixed.len())..)
    }

    /// The JSON text, computed once per frame however many sessions send it. A frame with no
    /// JSON form (an enum number the schema does not name) is replaced by an `INTERNAL` error
    /// for the same request, so a JSON client gets a typed answer, never an empty message.
    ///
    /// # Errors
    /// Only if the stored bytes are not a `ServerFrame` (a bug).
    pub fn json(&self) -> Result<Bytes, FrameError> {
        if let Some(j) = self.json.get() {
            return Ok(j.clone());
        }
        let frame = ServerFrame::decode(self.payload())?;
        let text = encode(&frame).unwrap_or_else(|e| {
            let error = ServerFrame::error(
                frame.request_id,
                crate::ErrorCode::Internal,
                format!("this frame has no JSON form: {e}"),
            );
            // An error frame holds only named enum values: it always has a JSON form.
            encode(&error).unwrap_or_default()
        });
        Ok(self.json.get_or_init(|| Bytes::from(text)).clone())
    }

    /// The frame's kind number ([`crate::kinds`]), read from its first bytes.
    #[must_use]
    pub fn kind(&self) -> usize {
        crate::kinds::server_kind_of(self.prefixed.get(HEADER_LEN..).unwrap_or_default())
    }

    /// Size used for queue accounting.
    #[must_use]
    pub fn len(&self) -> usize {
        self.prefixed.len()
    }

    /// Whether empty (never, for real frames).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.prefixed.is_empty()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::{Content, Message, client_frame, server_frame};

    #[test]
    fn given_client_frame_json_with_camel_case_and_string_ints_should_parse() {
        let text = r#"{"requestId":"7","send":{"conversationId":"dm:a:b","clientMsgId":"k1","content":{"text":"hi"}}}"#;
        let f = decode_client(text).unwrap();
        assert_eq!(f.request_id, 7);
        match f.kind {
            Some(client_frame::Kind::Send(s)) => {
                assert_eq!(
                    (s.conversation_id.as_str(), s.client_msg_id.as_str()),
                    ("dm:a:b", "k1")
                );
                assert_eq!(s.content.unwrap().as_text(), Some("hi"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn given_refresh_token_json_should_parse_and_its_reply_encode_camel_case() {
        let f = decode_client(r#"{"requestId":"9","refreshToken":{"token":"eyJ.x.y"}}"#).unwrap();
        assert_eq!(f.request_id, 9);
        assert!(
            matches!(f.kind, Some(client_frame::Kind::RefreshToken(r)) if r.token == "eyJ.x.y")
        );
        let ok = crate::RefreshTokenOk { expires_at_ms: 1_700_000_000_000 };
        let e = Encoded::of(&ServerFrame::reply(9, server_frame::Kind::RefreshTokenOk(ok)));
        let json: serde_json::Value = serde_json::from_slice(&e.json().unwrap()).unwrap();
        assert_eq!(json["refreshTokenOk"]["expiresAtMs"], "1700000000000");
        let mut err = ServerFrame::error(9, crate::ErrorCode::TokenExpired, "token expired");
        if let Some(server_frame::Kind::Error(e)) = err.kind.as_mut() {
            e.reason = "expired".into();
        }
        let json: serde_json::Value =
            serde_json::from_slice(&Encoded::of(&err).json().unwrap()).unwrap();
        assert_eq!(json["error"]["code"], "ERROR_CODE_TOKEN_EXPIRED");
        assert_eq!(json["error"]["reason"], "expired");
    }

    #[test]
    fn given_unknown_request_type_should_parse_without_kind() {
        let f = decode_client(r#"{"requestId":"3","somethingNew":{"x":1}}"#).unwrap();
        assert_eq!((f.request_id, f.kind), (3, None));
    }

    #[test]
    fn given_message_push_should_encode_seqs_as_strings_and_enums_as_names() {
        let msg = Message {
            conversation_id: "g:x".into(),
            seq: 42,
            sender: "alice".into(),
            timestamp_ms: 1,
            client_msg_id: String::new(),
            content: Some(Content::data("image/png", vec![1, 2, 3])),
            system: None,
        };
        let e = Encoded::of(&ServerFrame::push(server_frame::Kind::Message(msg)));
        let json: serde_json::Value = serde_json::from_slice(&e.json().unwrap()).unwrap();
        assert_eq!(json["message"]["seq"], "42");
        assert_eq!(json["message"]["content"]["data"], "AQID");
        assert!(json.get("requestId").is_none(), "defaults are omitted");
        let err = ServerFrame::error(5, crate::ErrorCode::RateLimited, "slow down");
        let json: serde_json::Value = serde_json::from_str(&encode(&err).unwrap()).unwrap();
        assert_eq!(json["error"]["code"], "ERROR_CODE_RATE_LIMITED");
        assert_eq!(decode_server(&encode(&err).unwrap()).unwrap(), err);
    }

    #[test]
    fn given_a_frame_with_an_unnamed_enum_value_should_send_json_clients_a_typed_error_instead() {
        let mut frame = ServerFrame::error(7, crate::ErrorCode::RateLimited, "slow down");
        if let Some(server_frame::Kind::Error(e)) = frame.kind.as_mut() {
            e.code = 999;
        }
        assert!(encode(&frame).is_err(), "JSON names enum values");
        let text = Encoded::of(&frame).json().unwrap();
        let json: serde_json::Value = serde_json::from_slice(&text).unwrap();
        assert_eq!(json["requestId"], "7", "{json}");
        assert_eq!(json["error"]["code"], "ERROR_CODE_INTERNAL", "{json}");
        assert!(json["error"]["message"].as_str().unwrap().contains("no JSON form"), "{json}");
    }

    #[test]
    fn given_encoded_frame_payload_should_be_the_prefixed_bytes_without_the_prefix() {
        let f = ServerFrame::push(server_frame::Kind::Pong(crate::Pong { server_time_ms: 9 }));
        let e = Encoded::of(&f);
        assert_eq!(&e.prefixed()[4..], &e.payload()[..]);
        assert_eq!(ServerFrame::decode(e.payload()).unwrap(), f);
    }
}
