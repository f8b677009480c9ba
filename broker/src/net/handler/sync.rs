//! `Sync`: everything after a client's position, in bounded pages, from the durable snapshot.
//!
//! A page holds the user's feed events after `feed_position`, then, conversation by
//! conversation (in id order), the entries after the client's cursor, or from the first
//! readable seq when the client has none. When the page is full it ends with a continuation
//! token naming the conversation and seq it stopped at; the next call resumes there (taking the
//! larger of the token and the client's cursor).

use std::collections::HashMap;

use bytes::{Buf, BufMut};
use prost::Message as _;
use switchboard_protocol::{
    CursorReset, ErrorCode, SyncPage, SyncPosition, server_frame, validate,
};

use super::history::{access, decode};
use super::userread::{UserRead, UserReadReply};
use super::{Ctx, REPLY_OVERHEAD, Reject};
use crate::cluster::placement::PartitionSet;
use crate::storage::Reader;

/// Most feed events per page.
const FEED_PAGE: usize = 1_000;
/// Conversations read from the membership index at a time.
const MEMBERSHIP_PAGE: usize = 256;

/// Handles `Sync`.
pub fn handle(ctx: &Ctx<'_>, request_id: u64, req: switchboard_protocol::Sync) {
    let position = req.position.unwrap_or_default();
    if let Err(r) = check(&position) {
        ctx.reject(request_id, r);
        return;
    }
    let limits = &ctx.shard.config.limits;
    let read = UserRead::Sync {
        position,
        limit: clamp(req.limit, limits.max_sync_limit),
        continuation: req.continuation.to_vec(),
        budget: limits.max_frame_bytes - REPLY_OVERHEAD,
    };
    ctx.user_read(request_id, read, |reply| match reply {
        UserReadReply::Sync(page) => Some(server_frame::Kind::Sync(page)),
        _ => None,
    });
}

/// What one sync page covers.
#[derive(Debug, Clone, Copy)]
pub struct Scope<'a> {
    /// Only conversations of these partitions (a cluster node reads those it holds and asks
    /// other nodes for the rest); `None`: all.
    pub only: Option<&'a PartitionSet>,
    /// Include the user's feed events (kept by the node the session is on).
    pub feed: bool,
    /// In a cluster (see [`page`]).
    pub clustered: bool,
}

impl Scope<'_> {
    fn covers(&self, conversation: &str) -> bool {
        self.only.is_none_or(|s| s.contains(crate::shard::partition(conversation)))
    }
}

/// The effective page size for a requested `limit`.
#[must_use]
pub fn clamp(limit: u32, max: u32) -> usize {
    (if limit == 0 || limit > max { max } else { limit }) as usize
}

/// Validates the cursors of a position.
///
/// # Errors
/// `bad_request` naming the first invalid conversation id.
pub fn check(position: &SyncPosition) -> Result<(), Reject> {
    for c in &position.cursors {
        validate::conversation_id(&c.conversation_id)?;
    }
    Ok(())
}

/// Where a page stopped: (conversation, last seq included).
pub(crate) fn encode_token(conv: &str, seq: u64) -> Vec<u8> {
    let mut t = Vec::with_capacity(2 + conv.len() + 8);
    t.put_u8(1);
    #[allow(clippy::cast_possible_truncation)]
    t.put_u8(conv.len() as u8);
    t.put_slice(conv.as_bytes());
    t.put_u64(seq);
    t
}

pub(crate) fn decode_token(mut t: &[u8]) -> Result<Option<(String, u64)>, Reject> {
    if t.is_empty() {
        return Ok(None);
    }
    let bad = || Reject::new(ErrorCode::BadRequest, "invalid continuation token");
    if t.len() < 2 || t.get_u8() != 1 {
        return Err(bad());
    }
    let len = usize::from(t.get_u8());
    if t.len() != len + 8 {
        return Err(bad());
    }
    let conv = std::str::from_utf8(t.get(..len).ok_or_else(bad)?).map_err(|_| bad())?.to_owned();
    t.advance(len);
    Ok(Some((conv, t.get_u64())))
}

/// Builds one sync page of the conversations in `scope`.
///
/// In a cluster (`scope.clustered`), a cursor beyond this node's head is not reset: the client
/// learned those entries from the leader (its own acks, forwarded replies) before this
/// replica applied them, and nothing acknowledged is ever lost there.
///
/// # Errors
/// A bad continuation token, or a storage failure.
pub fn page(
    r: &Reader,
    user: &str,
    position: &SyncPosition,
    limit: usize,
    continuation: &[u8],
    budget: usize,
    scope: Scope<'_>,
) -> Result<SyncPage, Reject> {
    let clustered = scope.clustered;
    let token = decode_token(continuation)?;
    let mut feed_events =
        if scope.feed { r.feed(user, position.feed_position, FEED_PAGE)? } else { Vec::new() };
    let mut feed_full = feed_events.len() == FEED_PAGE;
    // Feed events take at most half the page.
    let mut size = 0;
    let fits = feed_events
        .iter()
        .take_while(|e| {
            size += e.encoded_len() + 4;
            size <= budget / 2
        })
        .count();
    if fits < feed_events.len() {
        feed_events.truncate(fits);
        size = feed_events.iter().map(|e| e.encoded_len() + 4).sum();
        feed_full = true;
    }
    let mut page = SyncPage {
        feed_position: feed_events.last().map_or(position.feed_position, |e| e.user_seq),
        ..SyncPage::default()
    };
    page.feed_events = feed_events;
    if feed_full {
        // Let the client apply these and come back with the new feed position; the token
        // restarts the conversation walk from the beginning.
        page.has_more = true;
        page.continuation = encode_token("", 0).into();
        return Ok(page);
    }
    let cursors: HashMap<&str, u64> =
        position.cursors.iter().map(|c| (c.conversation_id.as_str(), c.seq)).collect();
    if token.as_ref().is_none_or(|(conv, _)| conv.is_empty()) {
        let mut seen = std::collections::HashSet::new();
        for c in &position.cursors {
            let id = c.conversation_id.as_str();
            if !seen.insert(id) || size > budget / 2 || !scope.covers(id) {
                continue;
            }
            if r.member(id, user)?.is_none() {
                size += id.len() + 4;
                page.revoked.push(id.to_owned());
            }
        }
    }
    let mut after = String::new();
    let mut pending: Vec<String> = Vec::new();
    if let Some((conv, _)) = &token {
        pending.push(conv.clone());
        after.clone_from(conv);
    }
    loop {
        if pending.is_empty() {
            pending = r.memberships(user, &after, MEMBERSHIP_PAGE)?;
            pending.reverse();
            if pending.is_empty() {
                return Ok(page);
            }
        }
        while let Some(conv) = pending.pop() {
            after.clone_from(&conv);
            if !scope.covers(&conv) {
                continue;
            }
            let a = match access(r, &conv, user) {
                Ok(a) => a,
                Err(_) => continue, // left since the token was made
            };
            let last = r.head(a.partition, &conv)?.map_or(0, |(seq, _)| seq);
            let cursor = cursors.get(conv.as_str()).copied();
            if clustered && cursor.is_some_and(|c| c > last) {
                continue; // this replica has not applied that far yet
            }
            if let Some(c) = cursor
                && (c > last || c + 1 < a.first_seq)
            {
                let len = conv.len() + 24;
                if size + len > budget {
                    page.has_more = true;
                    page.continuation = encode_token(&conv, 0).into();
                    return Ok(page);
                }
                size += len;
                page.resets.push(CursorReset {
                    conversation_id: conv.clone(),
                    first_seq: a.first_seq,
                    last_seq: last,
                });
                continue;
            }
            let mut from = cursor.map_or(a.first_seq, |c| c + 1).max(a.first_seq);
            if let Some((tc, ts)) = &token
                && *tc == conv
            {
                from = from.max(ts.saturating_add(1));
            }
            for item in r.entries(a.partition, &conv, from, last + 1, false) {
                let (seq, entry) = item?;
                let len = entry.message.len() + 8;
                if page.messages.len() >= limit
                    || (size + len > budget && !page.messages.is_empty())
                {
                    page.has_more = true;
                    page.continuation = encode_token(&conv, seq - 1).into();
                    return Ok(page);
                }
                size += len;
                page.messages.push(decode(entry)?);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_token_when_round_tripped_should_decode_to_same_position() {
        let t = encode_token("g:abc", 42);
        assert_eq!(decode_token(&t).unwrap(), Some(("g:abc".to_owned(), 42)));
        assert_eq!(decode_token(&[]).unwrap(), None);
    }

    #[test]
    fn given_garbage_token_should_reject_without_panicking() {
        for t in [&[1u8][..], &[2, 0], &[1, 200, 1, 2], &[1, 1, b'x', 0, 0]] {
            assert!(decode_token(t).is_err(), "{t:?}");
        }
    }
}
