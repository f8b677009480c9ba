//! Reads that walk a user's conversations: `Hello`'s subscriptions and resume page, `Sync`,
//! `ListConversations`.
//!
//! A single node, or a cluster node that holds a readable copy of every partition, reads its
//! own store. A cluster node that holds only some partitions (more nodes than replicas) reads
//! those, asks each other partition's leader for the rest (one request per node,
//! [`PATH`] on the peer port, each answered from that node's store restricted to the
//! partitions asked for), and merges the parts into the answer one store holding everything
//! would give: conversations in id order, cut where the first part stopped.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use prost::Message as _;
use switchboard_protocol::{ConversationList, ErrorCode, SyncPage, SyncPosition};

use super::Reject;
use super::sync::{Scope, decode_token, encode_token};
use crate::cluster::NodeId;
use crate::cluster::placement::PartitionSet;
use crate::shard::Shard;
use crate::storage::Reader;

/// Peer path: a user read restricted to some partitions ([`wire::Request`] → [`wire::Reply`]).
pub const PATH: &str = "/user/read";

/// Conversations read from the membership index at a time.
const MEMBERSHIP_PAGE: usize = 10_000;

/// How long a node waits for another's part.
const TIMEOUT: Duration = Duration::from_secs(5);

/// A read over a user's conversations.
#[derive(Debug, Clone)]
pub enum UserRead {
    /// Every conversation the user belongs to.
    Memberships,
    /// A page of `ListConversations`.
    List {
        /// Conversations after this id.
        after: String,
        /// Most conversations.
        limit: usize,
        /// Most bytes of summaries.
        budget: usize,
    },
    /// A page of `Sync`.
    Sync {
        /// The client's position.
        position: SyncPosition,
        /// Most messages.
        limit: usize,
        /// Where the previous page stopped.
        continuation: Vec<u8>,
        /// Most bytes.
        budget: usize,
    },
}

/// Its answer.
#[derive(Debug, Clone, PartialEq)]
pub enum UserReadReply {
    /// Conversation ids, ascending.
    Memberships(Vec<String>),
    /// A conversation list page.
    List(ConversationList),
    /// A sync page.
    Sync(SyncPage),
}

pub mod wire {
    //! User reads between nodes (protobuf over HTTP on the peer port).

    /// A read for `user`, restricted to `partitions`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Request {
        /// The user.
        #[prost(string, tag = "1")]
        pub user: String,
        /// The partitions to read ([`crate::cluster::placement::PartitionSet`] bytes).
        #[prost(bytes = "vec", tag = "2")]
        pub partitions: Vec<u8>,
        /// 1: memberships, 2: list, 3: sync.
        #[prost(uint32, tag = "3")]
        pub kind: u32,
        /// List: after this id; sync: unused.
        #[prost(string, tag = "4")]
        pub after: String,
        /// Most conversations or messages.
        #[prost(uint64, tag = "5")]
        pub limit: u64,
        /// Most bytes.
        #[prost(uint64, tag = "6")]
        pub budget: u64,
        /// Sync: the client's position.
        #[prost(message, optional, tag = "7")]
        pub position: Option<switchboard_protocol::SyncPosition>,
        /// Sync: the continuation token.
        #[prost(bytes = "vec", tag = "8")]
        pub continuation: Vec<u8>,
    }

    /// The part of the answer from the partitions asked for.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Reply {
        /// Memberships.
        #[prost(string, repeated, tag = "1")]
        pub ids: Vec<String>,
        /// List.
        #[prost(message, optional, tag = "2")]
        pub list: Option<switchboard_protocol::ConversationList>,
        /// Sync.
        #[prost(message, optional, tag = "3")]
        pub sync: Option<switchboard_protocol::SyncPage>,
        /// Why it could not be read here (the partitions moved); empty on success.
        #[prost(string, tag = "4")]
        pub error: String,
    }
}

/// The user's conversations after `after` in `only` (all when `None`), up to `limit`.
///
/// # Errors
/// A storage failure.
pub fn memberships(
    r: &Reader,
    user: &str,
    after: &str,
    limit: usize,
    only: Option<&PartitionSet>,
) -> Result<Vec<String>, Reject> {
    let mut out = Vec::new();
    let mut cursor = after.to_owned();
    loop {
        let page = r.memberships(user, &cursor, MEMBERSHIP_PAGE)?;
        let done = page.len() < MEMBERSHIP_PAGE;
        if let Some(last) = page.last() {
            cursor.clone_from(last);
        }
        for id in page {
            if only.is_none_or(|s| s.contains(crate::shard::partition(&id))) {
                out.push(id);
                if out.len() == limit {
                    return Ok(out);
                }
            }
        }
        if done {
            return Ok(out);
        }
    }
}

/// Runs `read` against `r`, over the partitions in `only` (all when `None`); `feed`: the
/// user's feed events are included (only the session's node has them).
///
/// # Errors
/// A bad continuation token, or a storage failure.
pub fn run(
    r: &Reader,
    user: &str,
    read: &UserRead,
    only: Option<&PartitionSet>,
    feed: bool,
    clustered: bool,
) -> Result<UserReadReply, Reject> {
    Ok(match read {
        UserRead::Memberships => {
            UserReadReply::Memberships(memberships(r, user, "", usize::MAX, only)?)
        }
        UserRead::List { after, limit, budget } => {
            UserReadReply::List(super::list::page(r, user, after, *limit, *budget, only)?)
        }
        UserRead::Sync { position, limit, continuation, budget } => {
            let scope = Scope { only, feed, clustered };
            UserReadReply::Sync(super::sync::page(
                r,
                user,
                position,
                *limit,
                continuation,
                *budget,
                scope,
            )?)
        }
    })
}

/// Attempts at a gathered read before it fails: a part is refused when the table changed
/// under it (a move settled, a leader failed over), and the next plan reads elsewhere.
const ATTEMPTS: u32 = 5;

/// Runs `read` for `user`: on this node's store, plus, for partitions it holds no readable
/// copy of, on nodes that hold one; the parts merged.
///
/// # Errors
/// `unavailable` when, after a few attempts, some partition has nowhere to be read or a node
/// does not answer; a storage failure; a bad continuation token.
pub async fn gather(
    shard: &Rc<Shard>,
    user: Arc<str>,
    read: UserRead,
) -> Result<UserReadReply, Reject> {
    for attempt in 1.. {
        match gather_once(shard, &user, &read).await {
            Ok(Some(reply)) => return Ok(reply),
            Ok(None) if attempt < ATTEMPTS => {
                tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
            }
            Ok(None) => break,
            Err(r) => return Err(r),
        }
    }
    Err(Reject::new(
        ErrorCode::Unavailable,
        "a node holding some of your conversations did not answer; retry",
    ))
}

/// One attempt of [`gather`]: `None` when some part could not be read.
async fn gather_once(
    shard: &Rc<Shard>,
    user: &Arc<str>,
    read: &UserRead,
) -> Result<Option<UserReadReply>, Reject> {
    let Some((here, remote)) = shard.user_plan() else { return Ok(None) };
    let clustered = shard.cluster.is_some();
    let only = (!remote.is_empty()).then_some(here);
    let storage = shard.storage.clone();
    let (u, r) = (user.clone(), read.clone());
    let local = tokio::task::spawn_blocking(move || {
        run(&storage.reader(), &u, &r, only.as_ref(), true, clustered)
    });
    let asks = remote.into_iter().map(|(node, set)| ask(shard, node, set, user, read));
    let (local, remote) = tokio::join!(local, futures::future::join_all(asks));
    let local = local.map_err(|_| Reject::new(ErrorCode::Internal, "internal error"))??;
    if remote.is_empty() {
        return Ok(Some(local));
    }
    let mut parts = vec![local];
    for part in remote {
        let Some(part) = part else { return Ok(None) };
        parts.push(part);
    }
    merge(read, parts).map(Some)
}

/// Asks node `node` for its part of `read` over `set`.
async fn ask(
    shard: &Rc<Shard>,
    node: NodeId,
    set: PartitionSet,
    user: &str,
    read: &UserRead,
) -> Option<UserReadReply> {
    let client = shard.peer_client()?;
    let addr = shard.peer_addr(node)?;
    let mut request =
        wire::Request { user: user.to_owned(), partitions: set.to_bytes(), ..Default::default() };
    match read {
        UserRead::Memberships => request.kind = 1,
        UserRead::List { after, limit, budget } => {
            request.kind = 2;
            request.after.clone_from(after);
            request.limit = *limit as u64;
            request.budget = *budget as u64;
        }
        UserRead::Sync { position, limit, continuation, budget } => {
            request.kind = 3;
            request.position = Some(position.clone());
            request.limit = *limit as u64;
            request.budget = *budget as u64;
            request.continuation.clone_from(continuation);
        }
    }
    let body = request.encode_to_vec();
    let reply = crate::cluster::raft::post_protobuf(&client, &addr, PATH, body, TIMEOUT).await?;
    let reply = wire::Reply::decode(reply).ok()?;
    if !reply.error.is_empty() {
        tracing::debug!(node, error = %reply.error, "user read refused");
        return None;
    }
    match read {
        UserRead::Memberships => Some(UserReadReply::Memberships(reply.ids)),
        UserRead::List { .. } => reply.list.map(UserReadReply::List),
        UserRead::Sync { .. } => reply.sync.map(UserReadReply::Sync),
    }
}

/// Serves another node's part of a user read from this node's store, when every partition
/// asked for has a readable copy here (per `holds`); `None` when the request does not decode.
pub async fn serve(
    storage: Arc<crate::storage::Storage>,
    holds: impl Fn(u16) -> bool,
    body: &[u8],
) -> Option<Vec<u8>> {
    let request = wire::Request::decode(body).ok()?;
    let set = PartitionSet::from_bytes(&request.partitions)?;
    if switchboard_protocol::validate::user_id(&request.user).is_err() {
        return None;
    }
    if let Some(p) = set.iter().find(|p| !holds(*p)) {
        let error = format!("partition {p} is not held here");
        return Some(wire::Reply { error, ..Default::default() }.encode_to_vec());
    }
    // Bounded whatever the peer asks (a page never exceeds a peer frame).
    let limit = usize::try_from(request.limit).unwrap_or(usize::MAX).min(100_000);
    let budget = usize::try_from(request.budget).unwrap_or(usize::MAX).min(16 << 20);
    let read = match request.kind {
        1 => UserRead::Memberships,
        2 => UserRead::List { after: request.after, limit, budget },
        3 => UserRead::Sync {
            position: request.position.unwrap_or_default(),
            limit,
            continuation: request.continuation,
            budget,
        },
        _ => return None,
    };
    let user = request.user;
    let result = tokio::task::spawn_blocking(move || {
        run(&storage.reader(), &user, &read, Some(&set), false, true)
    })
    .await
    .ok()?;
    let reply = match result {
        Ok(UserReadReply::Memberships(ids)) => wire::Reply { ids, ..Default::default() },
        Ok(UserReadReply::List(list)) => wire::Reply { list: Some(list), ..Default::default() },
        Ok(UserReadReply::Sync(page)) => wire::Reply { sync: Some(page), ..Default::default() },
        Err(r) => wire::Reply { error: r.message, ..Default::default() },
    };
    Some(reply.encode_to_vec())
}

/// Merges parts read over disjoint partition sets; the first part is this node's (the only
/// one with feed events).
///
/// # Errors
/// A part with a bad continuation token.
pub fn merge(read: &UserRead, parts: Vec<UserReadReply>) -> Result<UserReadReply, Reject> {
    match read {
        UserRead::Memberships => {
            let mut all: Vec<String> = parts
                .into_iter()
                .flat_map(|p| match p {
                    UserReadReply::Memberships(ids) => ids,
                    _ => Vec::new(),
                })
                .collect();
            all.sort_unstable();
            all.dedup();
            Ok(UserReadReply::Memberships(all))
        }
        UserRead::List { limit, budget, .. } => {
            let lists = parts.into_iter().filter_map(|p| match p {
                UserReadReply::List(l) => Some(l),
                _ => None,
            });
            Ok(UserReadReply::List(merge_lists(lists, *limit, *budget)))
        }
        UserRead::Sync { limit, budget, .. } => {
            let pages = parts
                .into_iter()
                .filter_map(|p| match p {
                    UserReadReply::Sync(s) => Some(s),
                    _ => None,
                })
                .collect();
            merge_pages(pages, *limit, *budget).map(UserReadReply::Sync)
        }
    }
}

/// The smaller of two optional cut points (`None`: no cut).
fn min_cut<T: Ord>(a: Option<T>, b: T) -> Option<T> {
    Some(match a {
        Some(a) if a <= b => a,
        _ => b,
    })
}

fn merge_lists(
    lists: impl Iterator<Item = ConversationList>,
    limit: usize,
    budget: usize,
) -> ConversationList {
    let mut cut: Option<String> = None;
    let mut all = Vec::new();
    for l in lists {
        if l.has_more {
            cut = min_cut(cut, l.next_after);
        }
        all.extend(l.conversations);
    }
    all.retain(|c| cut.as_ref().is_none_or(|cut| c.conversation_id <= *cut));
    all.sort_by(|a, b| a.conversation_id.cmp(&b.conversation_id));
    let mut size = 0;
    let fits = all
        .iter()
        .take(limit)
        .take_while(|c| {
            size += c.encoded_len() + 4;
            size <= budget
        })
        .count();
    if fits < all.len() {
        all.truncate(fits);
        cut = Some(all.last().map(|c| c.conversation_id.clone()).unwrap_or_default());
    }
    ConversationList {
        conversations: all,
        has_more: cut.is_some(),
        next_after: cut.unwrap_or_default(),
    }
}

fn merge_pages(pages: Vec<SyncPage>, limit: usize, budget: usize) -> Result<SyncPage, Reject> {
    let mut pages = pages.into_iter();
    let mut out = pages.next().unwrap_or_default();
    // A page cut at (conversation, seq) stopped after that entry; "" sorts first, so a local
    // page that stopped for its feed events admits no message of any part.
    let mut cut: Option<(String, u64)> = None;
    if out.has_more {
        cut = decode_token(&out.continuation)?;
    }
    let mut messages = std::mem::take(&mut out.messages);
    for p in pages {
        if p.has_more
            && let Some(t) = decode_token(&p.continuation)?
        {
            cut = min_cut(cut, t);
        }
        messages.extend(p.messages);
        out.resets.extend(p.resets);
        out.revoked.extend(p.revoked);
    }
    let within = |conv: &str, seq: u64, cut: &Option<(String, u64)>| {
        cut.as_ref().is_none_or(|(c, s)| (conv, seq) <= (c.as_str(), *s))
    };
    messages.retain(|m| within(&m.conversation_id, m.seq, &cut));
    messages.sort_by(|a, b| (&a.conversation_id, a.seq).cmp(&(&b.conversation_id, b.seq)));
    let mut size: usize = out.feed_events.iter().map(|e| e.encoded_len() + 4).sum();
    let fits = messages
        .iter()
        .take(limit)
        .enumerate()
        .take_while(|(i, m)| {
            size += m.encoded_len() + 8;
            *i == 0 || size <= budget
        })
        .count();
    if fits < messages.len() {
        messages.truncate(fits);
        cut = messages.last().map(|m| (m.conversation_id.clone(), m.seq)).or(cut);
    }
    out.resets.retain(|r| cut.as_ref().is_none_or(|(c, _)| r.conversation_id <= *c));
    out.resets.sort_by(|a, b| a.conversation_id.cmp(&b.conversation_id));
    out.revoked.sort_unstable();
    out.revoked.dedup();
    out.messages = messages;
    out.has_more = cut.is_some();
    out.continuation = cut.map(|(c, s)| encode_token(&c, s).into()).unwrap_or_default();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_protocol::{CursorReset, Message};

    fn msg(conv: &str, seq: u64) -> Message {
        Message { conversation_id: conv.into(), seq, ..Default::default() }
    }

    fn page(messages: &[(&str, u64)], cut: Option<(&str, u64)>) -> SyncPage {
        SyncPage {
            messages: messages.iter().map(|(c, s)| msg(c, *s)).collect(),
            has_more: cut.is_some(),
            continuation: cut.map(|(c, s)| encode_token(c, s).into()).unwrap_or_default(),
            ..Default::default()
        }
    }

    fn seqs(p: &SyncPage) -> Vec<(String, u64)> {
        p.messages.iter().map(|m| (m.conversation_id.clone(), m.seq)).collect()
    }

    #[test]
    fn given_parts_that_stopped_at_different_points_should_cut_at_the_first_and_resume_there() {
        let local = page(&[("a", 1), ("a", 2), ("d", 1)], None);
        let remote = page(&[("b", 1), ("b", 2)], Some(("b", 2)));
        let mut remote2 = page(&[("c", 1), ("e", 1)], None);
        remote2.resets.push(CursorReset { conversation_id: "c2".into(), ..Default::default() });
        let merged = merge_pages(vec![local, remote, remote2], 100, 1 << 20).unwrap();
        let want: Vec<(String, u64)> =
            vec![("a".into(), 1), ("a".into(), 2), ("b".into(), 1), ("b".into(), 2)];
        assert_eq!(seqs(&merged), want);
        assert!(merged.has_more);
        assert_eq!(decode_token(&merged.continuation).unwrap(), Some(("b".into(), 2)));
        assert!(merged.resets.is_empty(), "c2 is past the cut: read again next page");
    }

    #[test]
    fn given_more_messages_than_the_limit_should_cut_at_the_limit() {
        let merged = merge_pages(
            vec![page(&[("a", 1), ("c", 1)], None), page(&[("b", 1), ("b", 2)], None)],
            3,
            1 << 20,
        )
        .unwrap();
        let want: Vec<(String, u64)> = vec![("a".into(), 1), ("b".into(), 1), ("b".into(), 2)];
        assert_eq!(seqs(&merged), want);
        assert_eq!(decode_token(&merged.continuation).unwrap(), Some(("b".into(), 2)));
        let done = merge_pages(vec![page(&[("a", 1)], None), page(&[], None)], 3, 1 << 20).unwrap();
        assert!(!done.has_more && done.continuation.is_empty());
    }

    #[test]
    fn given_a_local_page_stopped_for_its_feed_should_admit_no_message() {
        let local = page(&[], Some(("", 0)));
        let merged = merge_pages(vec![local, page(&[("a", 1)], None)], 10, 1 << 20).unwrap();
        assert!(merged.messages.is_empty() && merged.has_more);
        assert_eq!(decode_token(&merged.continuation).unwrap(), Some((String::new(), 0)));
    }

    #[test]
    fn given_lists_should_merge_in_id_order_and_cut_at_the_first_that_has_more() {
        let summary = |id: &str| switchboard_protocol::ConversationSummary {
            conversation_id: id.into(),
            ..Default::default()
        };
        let list = |ids: &[&str], more: Option<&str>| ConversationList {
            conversations: ids.iter().map(|i| summary(i)).collect(),
            has_more: more.is_some(),
            next_after: more.unwrap_or_default().into(),
        };
        let merged = merge_lists(
            [list(&["a", "d"], None), list(&["b", "c"], Some("c")), list(&["e"], None)].into_iter(),
            10,
            1 << 20,
        );
        let ids: Vec<&str> =
            merged.conversations.iter().map(|c| c.conversation_id.as_str()).collect();
        assert_eq!(ids, ["a", "b", "c"]);
        assert_eq!((merged.has_more, merged.next_after.as_str()), (true, "c"));
        let merged =
            merge_lists([list(&["a", "c"], None), list(&["b"], None)].into_iter(), 2, 1 << 20);
        assert_eq!((merged.has_more, merged.next_after.as_str()), (true, "b"));
    }
}
