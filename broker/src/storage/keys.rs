//! Key layouts of the keyspaces. Every variable-length component is prefixed with its length
//! (one byte; ids are at most 140 bytes), so no id can be a prefix of another; integers are
//! big-endian so keys sort numerically.
//!
//! | keyspace      | key                                              |
//! |---------------|--------------------------------------------------|
//! | messages      | partition u16 · len · conversation · seq u64     |
//! | dedupe        | len · conversation · len · sender · client_msg_id|
//! | conversations | conversation                                     |
//! | members       | len · conversation · user                        |
//! | memberships   | len · user · conversation                        |
//! | feeds         | len · user · user_seq u64                        |
//! | users         | user                                             |
//! | push          | len · user · len · conversation · first_seq u64  |
//! | meta          | name                                             |
//!
//! In `meta`, `applied` · partition u16 is the last replicated log index applied (cluster).

fn push_str(out: &mut Vec<u8>, s: &str) {
    debug_assert!(s.len() <= usize::from(u8::MAX));
    #[allow(clippy::cast_possible_truncation)]
    out.push(s.len() as u8);
    out.extend_from_slice(s.as_bytes());
}

/// Prefix of all entries of one conversation in `messages`.
#[must_use]
pub fn message_prefix(partition: u16, conversation: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + 1 + conversation.len() + 8);
    k.extend_from_slice(&partition.to_be_bytes());
    push_str(&mut k, conversation);
    k
}

/// Key of one entry in `messages`.
#[must_use]
pub fn message_key(partition: u16, conversation: &str, seq: u64) -> Vec<u8> {
    let mut k = message_prefix(partition, conversation);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// The trailing big-endian u64 of a key (seq in `messages`, user_seq in `feeds`).
#[must_use]
pub fn trailing_u64(key: &[u8]) -> Option<u64> {
    let tail = key.get(key.len().checked_sub(8)?..)?;
    Some(u64::from_be_bytes(tail.try_into().ok()?))
}

/// Key of an idempotency record in `dedupe`.
#[must_use]
pub fn dedupe_key(conversation: &str, sender: &str, client_msg_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + conversation.len() + sender.len() + client_msg_id.len());
    push_str(&mut k, conversation);
    push_str(&mut k, sender);
    k.extend_from_slice(client_msg_id.as_bytes());
    k
}

/// Key in `conversations`.
#[must_use]
pub fn conversation_key(conversation: &str) -> Vec<u8> {
    conversation.as_bytes().to_vec()
}

/// Prefix of a conversation's rows in `members`.
#[must_use]
pub fn member_prefix(conversation: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + conversation.len() + 16);
    push_str(&mut k, conversation);
    k
}

/// Key in `members`.
#[must_use]
pub fn member_key(conversation: &str, user: &str) -> Vec<u8> {
    let mut k = member_prefix(conversation);
    k.extend_from_slice(user.as_bytes());
    k
}

/// Prefix of a user's rows in `memberships`.
#[must_use]
pub fn membership_prefix(user: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + user.len() + 32);
    push_str(&mut k, user);
    k
}

/// Key in `memberships` (the user → conversations index).
#[must_use]
pub fn membership_key(user: &str, conversation: &str) -> Vec<u8> {
    let mut k = membership_prefix(user);
    k.extend_from_slice(conversation.as_bytes());
    k
}

/// Prefix of a user's feed in `feeds`.
#[must_use]
pub fn feed_prefix(user: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + user.len() + 8);
    push_str(&mut k, user);
    k
}

/// Key of one feed event.
#[must_use]
pub fn feed_key(user: &str, user_seq: u64) -> Vec<u8> {
    let mut k = feed_prefix(user);
    k.extend_from_slice(&user_seq.to_be_bytes());
    k
}

/// Key in `users`.
#[must_use]
pub fn user_key(user: &str) -> Vec<u8> {
    user.as_bytes().to_vec()
}

/// Key in `push`: the notification of `user` for `conversation` whose window opened at
/// `first_seq` (a later window of the same conversation is another notification).
#[must_use]
pub fn push_key(user: &str, conversation: &str, first_seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + user.len() + conversation.len() + 8);
    push_str(&mut k, user);
    push_str(&mut k, conversation);
    k.extend_from_slice(&first_seq.to_be_bytes());
    k
}

/// Splits a `push` key into (user, conversation, first_seq).
#[must_use]
pub fn split_push_key(key: &[u8]) -> Option<(&str, &str, u64)> {
    let (&len, rest) = key.split_first()?;
    let (user, rest) = rest.split_at_checked(usize::from(len))?;
    let (&len, rest) = rest.split_first()?;
    let (conv, seq) = rest.split_at_checked(usize::from(len))?;
    let seq = u64::from_be_bytes(seq.try_into().ok()?);
    Some((std::str::from_utf8(user).ok()?, std::str::from_utf8(conv).ok()?, seq))
}

/// The part of `key` after `prefix`, as UTF-8 (an id).
#[must_use]
pub fn suffix_str<'a>(key: &'a [u8], prefix: &[u8]) -> Option<&'a str> {
    std::str::from_utf8(key.strip_prefix(prefix)?).ok()
}

/// Key in `meta` of a partition's last applied replicated log index (cluster mode).
#[must_use]
pub fn applied_key(partition: u16) -> Vec<u8> {
    let mut k = APPLIED_PREFIX.to_vec();
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

/// Prefix in `meta` of every [`applied_key`].
pub const APPLIED_PREFIX: &[u8] = b"applied/";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_ids_where_one_prefixes_another_keys_should_not_share_prefix() {
        assert!(!member_key("ab", "c").starts_with(&member_prefix("a")));
        assert!(!message_key(1, "ab", 1).starts_with(&message_prefix(1, "a")));
        assert!(!feed_key("ab", 1).starts_with(&feed_prefix("a")));
    }

    #[test]
    fn given_seqs_keys_should_sort_numerically() {
        assert!(message_key(0, "c", 2) < message_key(0, "c", 10));
        assert!(message_key(0, "c", 255) < message_key(0, "c", 256));
        assert_eq!(trailing_u64(&message_key(3, "c", 42)), Some(42));
        assert_eq!(trailing_u64(b"short"), None);
    }

    #[test]
    fn given_push_key_should_split_back_into_user_and_conversation() {
        assert_eq!(split_push_key(&push_key("bob", "dm:a:bob", 7)), Some(("bob", "dm:a:bob", 7)));
        assert_eq!(split_push_key(&[9, b'x']), None);
    }

    #[test]
    fn given_member_key_suffix_should_be_the_user() {
        let p = member_prefix("conv");
        assert_eq!(suffix_str(&member_key("conv", "bob"), &p), Some("bob"));
        assert_eq!(
            suffix_str(&membership_key("bob", "c:1"), &membership_prefix("bob")),
            Some("c:1")
        );
    }
}
