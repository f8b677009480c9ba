//! `History`: one page of a conversation's log, read from the durable snapshot.

use switchboard_protocol::{
    HistoryPage, HistoryVisibility, Message, history::Anchor, server_frame,
};

use super::{Ctx, REPLY_OVERHEAD, Reject};
use crate::config::LimitsConfig;
use crate::shard::mailbox::ReadOp;
use crate::shard::partition;
use crate::storage::{Reader, StoredConversation, StoredEntry, StoredMember};

/// What a member may read of a conversation.
pub struct Access {
    /// The conversation's partition.
    pub partition: u16,
    /// The first seq the member may read (history visibility).
    pub first_seq: u64,
    /// The member's row.
    pub member: StoredMember,
    /// The conversation's row.
    pub conversation: StoredConversation,
}

/// Authorizes `user` to read `conversation`: members only, from their first readable seq.
///
/// # Errors
/// `not_found` for non-members and unknown conversations alike.
pub fn access(r: &Reader, conversation: &str, user: &str) -> Result<Access, Reject> {
    let member = r.member(conversation, user)?.ok_or_else(Reject::not_found)?;
    let record = r.conversation(conversation)?.ok_or_else(Reject::not_found)?;
    let first_seq = if record.visibility == HistoryVisibility::Joined as i32 {
        member.joined_seq.max(1)
    } else {
        1
    };
    Ok(Access { partition: partition(conversation), first_seq, member, conversation: record })
}

/// Decodes a stored entry's message.
///
/// # Errors
/// `internal` when the record is corrupt.
pub fn decode(entry: StoredEntry) -> Result<Message, Reject> {
    use prost::Message as _;
    Message::decode(entry.message).map_err(|e| {
        crate::storage::StorageError::Corrupt { keyspace: "messages", message: e.to_string() }
            .into()
    })
}

/// Handles `History`: read here, or by the leader when this node holds no copy.
pub fn handle(ctx: &Ctx<'_>, request_id: u64, req: switchboard_protocol::History) {
    ctx.read_conversation(request_id, ReadOp::History(req));
}

/// Reads one `History` page within the configured limits.
///
/// # Errors
/// `not_found` for non-members, or a storage failure.
pub fn read(
    r: &Reader,
    user: &str,
    req: &switchboard_protocol::History,
    limits: &LimitsConfig,
) -> Result<server_frame::Kind, Reject> {
    let max = limits.max_history_limit;
    let limit = if req.limit == 0 || req.limit > max { max } else { req.limit } as usize;
    let budget = limits.max_frame_bytes - REPLY_OVERHEAD;
    page(r, user, req, limit, budget).map(server_frame::Kind::History)
}

fn page(
    r: &Reader,
    user: &str,
    req: &switchboard_protocol::History,
    limit: usize,
    budget: usize,
) -> Result<HistoryPage, Reject> {
    let conv = req.conversation_id.as_str();
    let a = access(r, conv, user)?;
    let last_seq = r.head(a.partition, conv)?.map_or(0, |(seq, _)| seq);
    let first = a.first_seq;
    let (from, to, reverse) = match req.anchor {
        Some(Anchor::AfterSeq(s)) => (s.saturating_add(1).max(first), last_seq + 1, false),
        Some(Anchor::BeforeSeq(s)) => (first, s.min(last_seq + 1), true),
        None => (first, last_seq + 1, true),
    };
    let mut messages = Vec::new();
    let mut has_more = false;
    if from < to {
        let mut size = 0;
        for item in r.entries(a.partition, conv, from, to, reverse) {
            let (_, entry) = item?;
            let len = entry.message.len() + 8;
            if messages.len() == limit || (size + len > budget && !messages.is_empty()) {
                has_more = true;
                break;
            }
            size += len;
            messages.push(decode(entry)?);
        }
    }
    if reverse {
        messages.reverse();
    }
    Ok(HistoryPage {
        conversation_id: conv.to_owned(),
        messages,
        has_more,
        first_seq: first,
        last_seq,
    })
}
