//! `ListConversations` and `ListMembers`, read from the durable snapshot.

use switchboard_protocol::{
    ConversationList, ConversationSummary, ListConversations, ListMembers, Member, MemberList,
    server_frame, validate,
};

use super::history::{access, decode};
use super::userread::{UserRead, UserReadReply};
use super::{Ctx, Reject};
use crate::cluster::placement::PartitionSet;
use crate::storage::Reader;

/// Largest page of either list.
pub const MAX_PAGE: usize = 500;

fn page_size(limit: u32) -> usize {
    match limit as usize {
        0 => MAX_PAGE,
        n => n.min(MAX_PAGE),
    }
}

fn check_after(
    after: &str,
    check: fn(&str) -> Result<(), validate::ValidationError>,
) -> Result<(), Reject> {
    if after.is_empty() { Ok(()) } else { check(after).map_err(Reject::from) }
}

/// Handles `ListConversations`.
pub fn conversations(ctx: &Ctx<'_>, request_id: u64, req: ListConversations) {
    if let Err(r) = check_after(&req.after, validate::conversation_id) {
        ctx.reject(request_id, r);
        return;
    }
    let read = UserRead::List {
        after: req.after,
        limit: page_size(req.limit),
        budget: ctx.shard.config.limits.max_frame_bytes - super::REPLY_OVERHEAD,
    };
    ctx.user_read(request_id, read, |reply| match reply {
        UserReadReply::List(list) => Some(server_frame::Kind::Conversations(list)),
        _ => None,
    });
}

/// One `ListConversations` page of the user's conversations in `only` (all when `None`).
///
/// # Errors
/// A storage failure.
pub fn page(
    r: &Reader,
    user: &str,
    after: &str,
    limit: usize,
    budget: usize,
    only: Option<&PartitionSet>,
) -> Result<ConversationList, Reject> {
    let mut ids = super::userread::memberships(r, user, after, limit + 1, only)?;
    let mut has_more = ids.len() > limit;
    ids.truncate(limit);
    let mut conversations = Vec::with_capacity(ids.len());
    let mut size = 0;
    let mut last = String::new();
    for id in &ids {
        if let Some(s) = summary(r, id, user)? {
            size += prost::Message::encoded_len(&s) + 4;
            if size > budget {
                has_more = true;
                break;
            }
            conversations.push(s);
        }
        last.clone_from(id);
    }
    let next_after = if has_more { last } else { String::new() };
    Ok(ConversationList { conversations, has_more, next_after })
}

fn summary(r: &Reader, id: &str, user: &str) -> Result<Option<ConversationSummary>, Reject> {
    let a = match access(r, id, user) {
        Ok(a) => a,
        Err(_) => return Ok(None),
    };
    let (last_seq, last_ordinal, last_activity_ms) = match r.head(a.partition, id)? {
        Some((seq, entry)) => {
            let ordinal = entry.ordinal;
            (seq, ordinal, decode(entry)?.timestamp_ms)
        }
        None => (0, 0, a.conversation.created_at_ms),
    };
    // Unread: user messages after what the member has read (or could first read).
    let read_upto = a.member.read_seq.max(a.first_seq.saturating_sub(1)).min(last_seq);
    let read_ordinal = match read_upto {
        0 => 0,
        s => r.entry(a.partition, id, s)?.map_or(0, |e| e.ordinal),
    };
    Ok(Some(ConversationSummary {
        conversation_id: id.to_owned(),
        kind: a.conversation.kind,
        name: a.conversation.name,
        visibility: a.conversation.visibility,
        role: a.member.role,
        last_seq,
        read_seq: a.member.read_seq,
        unread_count: last_ordinal.saturating_sub(read_ordinal),
        first_seq: a.first_seq,
        last_activity_ms,
        member_count: a.conversation.member_count,
    }))
}

/// Handles `ListMembers`: read here, or by the leader when this node holds no copy.
pub fn members(ctx: &Ctx<'_>, request_id: u64, req: ListMembers) {
    ctx.read_conversation(request_id, crate::shard::mailbox::ReadOp::ListMembers(req));
}

/// Checks a `ListMembers` request's fields.
///
/// # Errors
/// The first invalid field.
pub fn check_members(req: &ListMembers) -> Result<(), Reject> {
    validate::conversation_id(&req.conversation_id)?;
    check_after(&req.after, validate::user_id)
}

/// Reads one `ListMembers` page.
///
/// # Errors
/// `not_found` for non-members, or a storage failure.
pub fn read_members(
    r: &Reader,
    user: &str,
    req: ListMembers,
) -> Result<server_frame::Kind, Reject> {
    let limit = page_size(req.limit);
    {
        access(r, &req.conversation_id, user)?;
        let mut rows = r.members(&req.conversation_id, &req.after, limit + 1)?;
        let has_more = rows.len() > limit;
        rows.truncate(limit);
        let next_after = if has_more {
            rows.last().map(|(u, _)| u.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        let members = rows
            .into_iter()
            .map(|(user_id, m)| Member { user_id, role: m.role, joined_seq: m.joined_seq })
            .collect();
        Ok(server_frame::Kind::Members(MemberList {
            conversation_id: req.conversation_id,
            members,
            has_more,
            next_after,
        }))
    }
}
