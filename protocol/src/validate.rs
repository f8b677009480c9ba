//! Input rules shared by the broker and the clients, with typed errors.
//!
//! | field          | bytes   | characters                          |
//! |----------------|---------|-------------------------------------|
//! | user id        | 1..=64  | `A-Z a-z 0-9 . _ - @`               |
//! | conversation id| 1..=140 | user-id characters and `:`          |
//! | client_msg_id  | 1..=64  | printable ASCII (`!`..=`~`)         |
//! | group name     | 0..=256 | any UTF-8 without control characters|
//! | content_type   | 0..=128 | printable ASCII and space           |
//!
//! A direct conversation's id is `dm:<a>:<b>` with the two user ids sorted; user ids cannot
//! contain `:`, so the id is unambiguous.

/// Maximum length of a user id in bytes.
pub const MAX_USER_ID_BYTES: usize = 64;
/// Maximum length of a conversation id in bytes.
pub const MAX_CONVERSATION_ID_BYTES: usize = 140;
/// Maximum length of a `client_msg_id` in bytes.
pub const MAX_CLIENT_MSG_ID_BYTES: usize = 64;
/// Maximum length of a group name in bytes.
pub const MAX_NAME_BYTES: usize = 256;
/// Maximum length of a content type in bytes.
pub const MAX_CONTENT_TYPE_BYTES: usize = 128;
/// Prefix of direct conversation ids.
pub const DIRECT_PREFIX: &str = "dm:";

/// Which field failed validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// A user id.
    UserId,
    /// A conversation id.
    ConversationId,
    /// A `client_msg_id`.
    ClientMsgId,
    /// A group name.
    Name,
    /// A content type.
    ContentType,
    /// A message body.
    Body,
}

impl std::fmt::Display for Field {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::UserId => "user id",
            Self::ConversationId => "conversation id",
            Self::ClientMsgId => "client_msg_id",
            Self::Name => "name",
            Self::ContentType => "content_type",
            Self::Body => "body",
        })
    }
}

/// Why a field was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ValidationError {
    /// The field is empty but must not be.
    #[error("{0} must not be empty")]
    Empty(Field),
    /// The field is longer than allowed.
    #[error("{field} is {len} bytes, more than the limit of {max}")]
    TooLong {
        /// The field.
        field: Field,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The field contains a character that is not allowed.
    #[error("{field} contains the character {ch:?}, which is not allowed")]
    InvalidChar {
        /// The field.
        field: Field,
        /// The offending character.
        ch: char,
    },
    /// The message has neither text nor data.
    #[error("content must have a text or data body")]
    MissingBody,
}

fn check(
    s: &str,
    field: Field,
    max: usize,
    ok: impl Fn(char) -> bool,
) -> Result<(), ValidationError> {
    if s.is_empty() {
        return Err(ValidationError::Empty(field));
    }
    if s.len() > max {
        return Err(ValidationError::TooLong { field, len: s.len(), max });
    }
    match s.chars().find(|c| !ok(*c)) {
        Some(ch) => Err(ValidationError::InvalidChar { field, ch }),
        None => Ok(()),
    }
}

fn user_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@')
}

/// Checks a user id (the JWT `sub`).
///
/// # Errors
/// When empty, longer than [`MAX_USER_ID_BYTES`] or holding other characters than
/// `A-Z a-z 0-9 . _ - @`.
pub fn user_id(s: &str) -> Result<(), ValidationError> {
    check(s, Field::UserId, MAX_USER_ID_BYTES, user_char)
}

/// Checks a conversation id.
///
/// # Errors
/// When empty, longer than [`MAX_CONVERSATION_ID_BYTES`] or holding other characters than
/// those of user ids and `:`.
pub fn conversation_id(s: &str) -> Result<(), ValidationError> {
    check(s, Field::ConversationId, MAX_CONVERSATION_ID_BYTES, |c| user_char(c) || c == ':')
}

/// Checks an idempotency key.
///
/// # Errors
/// When empty, longer than [`MAX_CLIENT_MSG_ID_BYTES`] or not printable ASCII.
pub fn client_msg_id(s: &str) -> Result<(), ValidationError> {
    check(s, Field::ClientMsgId, MAX_CLIENT_MSG_ID_BYTES, |c| c.is_ascii_graphic())
}

/// Checks a group name (may be empty).
///
/// # Errors
/// When longer than [`MAX_NAME_BYTES`] or holding control characters.
pub fn name(s: &str) -> Result<(), ValidationError> {
    if s.is_empty() {
        return Ok(());
    }
    check(s, Field::Name, MAX_NAME_BYTES, |c| !c.is_control())
}

/// Checks message content against the body limit.
///
/// # Errors
/// When the body is missing or too large, or the content type is too long or not printable
/// ASCII. (Text is UTF-8 by construction: protobuf `string` fields are checked on decode.)
pub fn content(c: &crate::Content, max_body: usize) -> Result<(), ValidationError> {
    if c.body.is_none() {
        return Err(ValidationError::MissingBody);
    }
    let len = c.body_len();
    if len > max_body {
        return Err(ValidationError::TooLong { field: Field::Body, len, max: max_body });
    }
    if !c.content_type.is_empty() {
        check(&c.content_type, Field::ContentType, MAX_CONTENT_TYPE_BYTES, |ch| {
            ch.is_ascii_graphic() || ch == ' '
        })?;
    }
    Ok(())
}

/// The deterministic id of the direct conversation between `a` and `b`.
#[must_use]
pub fn direct_conversation_id(a: &str, b: &str) -> String {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    format!("{DIRECT_PREFIX}{lo}:{hi}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_valid_ids_should_accept() {
        assert_eq!(user_id("alice.b_c-d@example"), Ok(()));
        assert_eq!(conversation_id("dm:alice:bob"), Ok(()));
        assert_eq!(client_msg_id("k-1/2"), Ok(()));
    }

    #[test]
    fn given_bad_ids_should_reject_with_typed_errors() {
        assert_eq!(user_id(""), Err(ValidationError::Empty(Field::UserId)));
        assert_eq!(
            user_id("a:b"),
            Err(ValidationError::InvalidChar { field: Field::UserId, ch: ':' })
        );
        assert!(matches!(user_id(&"a".repeat(65)), Err(ValidationError::TooLong { len: 65, .. })));
        assert!(matches!(
            conversation_id("room 1"),
            Err(ValidationError::InvalidChar { ch: ' ', .. })
        ));
        assert!(matches!(client_msg_id("é"), Err(ValidationError::InvalidChar { .. })));
        assert!(matches!(name("a\nb"), Err(ValidationError::InvalidChar { ch: '\n', .. })));
    }

    #[test]
    fn given_content_over_body_limit_should_reject() {
        let c = crate::Content::text("x".repeat(11));
        assert!(matches!(
            content(&c, 10),
            Err(ValidationError::TooLong { field: Field::Body, .. })
        ));
        assert_eq!(content(&crate::Content::text("x".repeat(10)), 10), Ok(()));
        let empty = crate::Content { content_type: String::new(), body: None };
        assert_eq!(content(&empty, 10), Err(ValidationError::MissingBody));
    }

    #[test]
    fn given_two_users_direct_id_should_not_depend_on_order() {
        assert_eq!(direct_conversation_id("bob", "alice"), "dm:alice:bob");
        assert_eq!(direct_conversation_id("alice", "bob"), "dm:alice:bob");
        assert!(conversation_id(&direct_conversation_id(&"a".repeat(64), &"b".repeat(64))).is_ok());
    }
}
