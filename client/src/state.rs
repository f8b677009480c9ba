//! Sans-IO client state: per-conversation cursors, reordering buffers and the sync rule.
//!
//! The rule, for each conversation log and for the user's membership feed alike: entries are
//! applied in sequence order; an entry at or below the cursor is a duplicate and dropped; an
//! entry beyond `cursor + 1` is buffered (bounded) and a sync is requested; when the missing
//! entries arrive the buffered ones are released in order. A conversation without a cursor
//! buffers everything until a sync page initialises its cursor. The driver owns the I/O: it
//! feeds frames in, forwards the returned [`Event`]s and runs a sync pass whenever
//! [`SyncState::needs_sync`] says so.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use switchboard_protocol::{
    Cursor, FeedEvent, FeedEventKind, Message, Send, SendAck, SyncPage, SyncPosition,
};

use crate::Event;

/// Default bound of each reordering buffer.
pub(crate) const DEFAULT_BUFFER_LIMIT: usize = 1024;

/// Local state of one conversation.
#[derive(Debug, Default)]
struct Conv {
    /// Highest seq applied; `None` until a sync page (or a resume position) sets it.
    cursor: Option<u64>,
    /// Entries that arrived ahead of `cursor + 1`, by seq.
    buffer: BTreeMap<u64, Message>,
}

/// What happened to an entry offered to a sequence.
#[derive(Debug, PartialEq, Eq)]
enum Offer {
    /// Applied (possibly releasing buffered successors).
    Applied,
    /// At or below the cursor: dropped.
    Duplicate,
    /// Ahead of the cursor: buffered, a sync is needed.
    Buffered,
}

/// Offers entry `seq` to the sequence at `cursor`; applied entries go to `emit` in order.
fn offer<T>(
    cursor: &mut u64,
    buffer: &mut BTreeMap<u64, T>,
    seq: u64,
    item: T,
    limit: usize,
    emit: &mut impl FnMut(T),
) -> Offer {
    if seq <= *cursor {
        return Offer::Duplicate;
    }
    if seq == *cursor + 1 {
        emit(item);
        *cursor = seq;
        release(cursor, buffer, emit);
        return Offer::Applied;
    }
    if buffer.len() >= limit && !buffer.contains_key(&seq) {
        // Overflow: a sync refetches everything after the cursor anyway.
        buffer.clear();
    }
    buffer.insert(seq, item);
    Offer::Buffered
}

/// Drops buffered entries at or below `cursor` and applies those that follow it without a gap.
fn release<T>(cursor: &mut u64, buffer: &mut BTreeMap<u64, T>, emit: &mut impl FnMut(T)) {
    while let Some(entry) = buffer.first_entry() {
        let seq = *entry.key();
        if seq <= *cursor {
            entry.remove();
        } else if seq == *cursor + 1 {
            emit(entry.remove());
            *cursor = seq;
        } else {
            break;
        }
    }
}

/// The client's position and the ordering rule. See the module documentation.
#[derive(Debug)]
pub(crate) struct SyncState {
    feed_position: u64,
    feed_buffer: BTreeMap<u64, FeedEvent>,
    convs: HashMap<String, Conv>,
    need_sync: bool,
    buffer_limit: usize,
}

impl SyncState {
    /// State resuming from `position` (use `SyncPosition::default()` to start from scratch).
    pub(crate) fn new(position: SyncPosition, buffer_limit: usize) -> Self {
        let convs = position
            .cursors
            .into_iter()
            .map(|c| (c.conversation_id, Conv { cursor: Some(c.seq), buffer: BTreeMap::new() }))
            .collect();
        Self {
            feed_position: position.feed_position,
            feed_buffer: BTreeMap::new(),
            convs,
            need_sync: false,
            buffer_limit,
        }
    }

    /// The position to persist or resume from: the feed position and every known cursor,
    /// ordered by conversation id.
    pub(crate) fn position(&self) -> SyncPosition {
        let mut cursors: Vec<Cursor> = self
            .convs
            .iter()
            .filter_map(|(id, c)| c.cursor.map(|seq| Cursor { conversation_id: id.clone(), seq }))
            .collect();
        cursors.sort_unstable_by(|a, b| a.conversation_id.cmp(&b.conversation_id));
        SyncPosition { feed_position: self.feed_position, cursors }
    }

    /// True when something was missed and a sync pass should run.
    pub(crate) fn needs_sync(&self) -> bool {
        self.need_sync
    }

    /// Requests a sync pass (e.g. the application asked for one).
    pub(crate) fn request_sync(&mut self) {
        self.need_sync = true;
    }

    /// A sync pass starts: needs raised from now on ask for another pass after this one.
    pub(crate) fn begin_pass(&mut self) {
        self.need_sync = false;
    }

    /// A sync pass completed (the last page had `has_more == false`). Buffers of conversations
    /// the pass did not give a cursor to belong to conversations the user is not in; they are
    /// dropped (if the user joined meanwhile, a new pass is already requested and refetches).
    pub(crate) fn end_pass(&mut self) {
        self.convs.retain(|_, c| c.cursor.is_some());
    }

    /// The broker reported that `conversation_id` has an entry `seq` (e.g. the reply to a
    /// create or membership change); sync unless it has been applied already.
    pub(crate) fn expect_seq(&mut self, conversation_id: &str, seq: u64) {
        let applied =
            self.convs.get(conversation_id).and_then(|c| c.cursor).is_some_and(|c| c >= seq);
        if !applied {
            self.need_sync = true;
        }
    }

    /// Applies a live `Message` push.
    pub(crate) fn apply_message(&mut self, msg: Message) -> Vec<Event> {
        let mut out = Vec::new();
        self.offer_message(msg, &mut out);
        out
    }

    /// Applies a live `FeedEvent` push.
    ///
    /// The broker pushes ADDED only once this session receives the conversation live; a sync
    /// made before that (which may already have applied the event) can have missed entries
    /// committed in between. So a live ADDED always asks for a sync, even as a duplicate.
    pub(crate) fn apply_feed_event(&mut self, event: FeedEvent) -> Vec<Event> {
        let mut out = Vec::new();
        if event.kind == FeedEventKind::Added as i32 {
            self.need_sync = true;
        }
        self.offer_feed(event, &mut out);
        out
    }

    /// Applies the ack of this session's own send as the message it created.
    ///
    /// A `duplicate` ack is the original ack of an earlier send with the same key, whose stored
    /// content may differ from `send`; it is never fabricated into a message: if its seq has not
    /// been applied yet (normally a resume sync already did), a sync fetches the stored entry.
    pub(crate) fn apply_own_ack(&mut self, sender: &str, send: &Send, ack: &SendAck) -> Vec<Event> {
        if ack.duplicate {
            self.expect_seq(&send.conversation_id, ack.seq);
            return Vec::new();
        }
        self.apply_message(Message {
            conversation_id: send.conversation_id.clone(),
            seq: ack.seq,
            sender: sender.to_owned(),
            timestamp_ms: ack.timestamp_ms,
            client_msg_id: send.client_msg_id.clone(),
            content: send.content.clone(),
            system: None,
        })
    }

    /// Applies one `SyncPage` (also `Welcome.resumed`). Returns the events and, when the page
    /// has more, the continuation to send with the next `Sync` of this pass.
    pub(crate) fn apply_page(&mut self, page: SyncPage) -> (Vec<Event>, Option<Bytes>) {
        let mut out = Vec::new();
        for event in page.feed_events {
            self.offer_feed(event, &mut out);
        }
        if page.feed_position > self.feed_position {
            self.feed_position = page.feed_position;
            self.release_feed(&mut out);
        }
        for reset in page.resets {
            let conv = self.convs.entry(reset.conversation_id.clone()).or_default();
            conv.buffer.clear();
            conv.cursor = Some(reset.first_seq.saturating_sub(1));
            self.need_sync = true;
            out.push(Event::CursorReset {
                conversation_id: reset.conversation_id,
                first_seq: reset.first_seq,
                last_seq: reset.last_seq,
            });
        }
        for conversation_id in page.revoked {
            self.convs.remove(&conversation_id);
            out.push(Event::Revoked { conversation_id });
        }
        for msg in page.messages {
            match self.convs.get_mut(&msg.conversation_id) {
                Some(conv) if conv.cursor.is_some() => {}
                // The broker sends a conversation we have no cursor for from its first
                // readable seq: that is where our cursor starts.
                Some(conv) => conv.cursor = Some(msg.seq.saturating_sub(1)),
                None => {
                    let conv = Conv { cursor: Some(msg.seq.saturating_sub(1)), ..Conv::default() };
                    self.convs.insert(msg.conversation_id.clone(), conv);
                }
            }
            self.offer_message(msg, &mut out);
        }
        let continuation = page.has_more.then_some(page.continuation);
        (out, continuation)
    }

    fn offer_message(&mut self, msg: Message, out: &mut Vec<Event>) {
        let limit = self.buffer_limit;
        if !self.convs.contains_key(&msg.conversation_id) {
            self.convs.insert(msg.conversation_id.clone(), Conv::default());
        }
        let Some(conv) = self.convs.get_mut(&msg.conversation_id) else { return };
        let Some(cursor) = conv.cursor.as_mut() else {
            if conv.buffer.len() >= limit && !conv.buffer.contains_key(&msg.seq) {
                conv.buffer.clear();
            }
            conv.buffer.insert(msg.seq, msg);
            self.need_sync = true;
            return;
        };
        let seq = msg.seq;
        let emit = &mut |m: Message| out.push(Event::Message(m));
        if offer(cursor, &mut conv.buffer, seq, msg, limit, emit) == Offer::Buffered {
            self.need_sync = true;
        }
    }

    fn offer_feed(&mut self, event: FeedEvent, out: &mut Vec<Event>) {
        let mut applied = Vec::new();
        let seq = event.user_seq;
        let outcome = offer(
            &mut self.feed_position,
            &mut self.feed_buffer,
            seq,
            event,
            self.buffer_limit,
            &mut |e| applied.push(e),
        );
        if outcome == Offer::Buffered {
            self.need_sync = true;
        }
        self.on_feed_applied(applied, out);
    }

    fn release_feed(&mut self, out: &mut Vec<Event>) {
        let mut applied = Vec::new();
        release(&mut self.feed_position, &mut self.feed_buffer, &mut |e| applied.push(e));
        self.on_feed_applied(applied, out);
    }

    fn on_feed_applied(&mut self, applied: Vec<FeedEvent>, out: &mut Vec<Event>) {
        for event in applied {
            match FeedEventKind::try_from(event.kind) {
                // Sync initialises the new conversation's cursor and fetches its log.
                Ok(FeedEventKind::Added) => self.need_sync = true,
                Ok(FeedEventKind::Removed) => {
                    self.convs.remove(&event.conversation_id);
                }
                _ => {}
            }
            out.push(Event::Feed(event));
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use switchboard_protocol::{Content, CursorReset};

    fn msg(conv: &str, seq: u64) -> Message {
        Message {
            conversation_id: conv.into(),
            seq,
            sender: "bob".into(),
            timestamp_ms: 1000 + seq,
            client_msg_id: format!("m{seq}"),
            content: Some(Content::text(format!("hello {seq}"))),
            system: None,
        }
    }

    fn feed(user_seq: u64, kind: FeedEventKind, conv: &str) -> FeedEvent {
        FeedEvent {
            user_seq,
            kind: kind as i32,
            conversation_id: conv.into(),
            conversation_seq: 1,
            actor: "bob".into(),
            ..FeedEvent::default()
        }
    }

    fn at(feed_position: u64, cursors: &[(&str, u64)]) -> SyncState {
        let cursors =
            cursors.iter().map(|(c, s)| Cursor { conversation_id: (*c).into(), seq: *s }).collect();
        SyncState::new(SyncPosition { feed_position, cursors }, DEFAULT_BUFFER_LIMIT)
    }

    /// The (conversation, seq) of every message event.
    fn seqs(events: &[Event]) -> Vec<(String, u64)> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Message(m) => Some((m.conversation_id.clone(), m.seq)),
                _ => None,
            })
            .collect()
    }

    fn seqs_of(events: &[Event], conv: &str) -> Vec<u64> {
        seqs(events).into_iter().filter(|(c, _)| c == conv).map(|(_, s)| s).collect()
    }

    fn cursor(state: &SyncState, conv: &str) -> Option<u64> {
        state.position().cursors.iter().find(|c| c.conversation_id == conv).map(|c| c.seq)
    }

    fn page(messages: Vec<Message>) -> SyncPage {
        SyncPage { messages, ..SyncPage::default() }
    }

    #[test]
    fn given_cursor_when_next_seq_arrives_should_emit_it_and_advance_the_cursor() {
        let mut s = at(0, &[("c", 4)]);
        let out = s.apply_message(msg("c", 5));
        assert_eq!(out, vec![Event::Message(msg("c", 5))]);
        assert_eq!(cursor(&s, "c"), Some(5));
        assert!(!s.needs_sync());
    }

    #[test]
    fn given_cursor_when_old_or_repeated_seq_arrives_should_drop_it() {
        let mut s = at(0, &[("c", 4)]);
        assert!(s.apply_message(msg("c", 4)).is_empty());
        assert!(s.apply_message(msg("c", 1)).is_empty());
        assert_eq!(s.apply_message(msg("c", 5)).len(), 1);
        assert!(s.apply_message(msg("c", 5)).is_empty(), "exactly once");
        assert_eq!(cursor(&s, "c"), Some(5));
        assert!(!s.needs_sync());
    }

    #[test]
    fn given_cursor_when_seq_beyond_next_arrives_should_buffer_and_need_sync() {
        let mut s = at(0, &[("c", 4)]);
        assert!(s.apply_message(msg("c", 7)).is_empty());
        assert_eq!(cursor(&s, "c"), Some(4));
        assert!(s.needs_sync());
    }

    #[test]
    fn given_buffered_gap_when_missing_seqs_arrive_should_release_buffer_in_order() {
        let mut s = at(0, &[("c", 4)]);
        s.apply_message(msg("c", 8));
        s.apply_message(msg("c", 6));
        s.apply_message(msg("c", 7));
        let out = s.apply_message(msg("c", 5));
        assert_eq!(seqs_of(&out, "c"), vec![5, 6, 7, 8]);
        assert_eq!(cursor(&s, "c"), Some(8));
    }

    #[test]
    fn given_buffered_gap_when_sync_page_fills_it_should_release_and_drop_duplicates() {
        let mut s = at(0, &[("c", 4)]);
        s.apply_message(msg("c", 7));
        s.apply_message(msg("c", 8));
        s.begin_pass();
        let (out, more) = s.apply_page(page(vec![msg("c", 5), msg("c", 6), msg("c", 7)]));
        assert_eq!(seqs_of(&out, "c"), vec![5, 6, 7, 8]);
        assert_eq!(more, None);
        assert!(!s.needs_sync());
    }

    #[test]
    fn given_no_cursor_when_message_arrives_should_buffer_it_and_need_sync() {
        let mut s = at(0, &[]);
        assert!(s.apply_message(msg("new", 3)).is_empty());
        assert!(s.needs_sync());
        assert_eq!(cursor(&s, "new"), None, "a buffer is not a position");
    }

    #[test]
    fn given_full_buffer_when_another_gap_message_arrives_should_drop_the_buffer() {
        let mut s = SyncState::new(
            SyncPosition {
                feed_position: 0,
                cursors: vec![Cursor { conversation_id: "c".into(), seq: 0 }],
            },
            3,
        );
        for seq in [3, 4, 5, 6] {
            s.apply_message(msg("c", seq));
        }
        // 3, 4 and 5 were dropped on overflow; a sync page refetches them.
        let (out, _) = s.apply_page(page(vec![msg("c", 1), msg("c", 2)]));
        assert_eq!(seqs_of(&out, "c"), vec![1, 2]);
        let out = s.apply_message(msg("c", 3));
        assert_eq!(seqs_of(&out, "c"), vec![3]);
    }

    #[test]
    fn given_page_for_conversation_without_cursor_should_start_cursor_before_first_message() {
        let mut s = at(0, &[]);
        let (out, _) = s.apply_page(page(vec![msg("g", 12), msg("g", 13)]));
        assert_eq!(seqs_of(&out, "g"), vec![12, 13]);
        assert_eq!(cursor(&s, "g"), Some(13));
    }

    #[test]
    fn given_buffered_live_messages_without_cursor_when_page_arrives_should_deliver_all_once() {
        let mut s = at(0, &[]);
        s.apply_message(msg("g", 3));
        s.apply_message(msg("g", 5));
        assert!(s.needs_sync());
        s.begin_pass();
        let (out, _) = s.apply_page(page(vec![msg("g", 1), msg("g", 2), msg("g", 3)]));
        assert_eq!(seqs_of(&out, "g"), vec![1, 2, 3]);
        let (out, _) = s.apply_page(page(vec![msg("g", 4), msg("g", 5)]));
        assert_eq!(seqs_of(&out, "g"), vec![4, 5]);
        assert_eq!(cursor(&s, "g"), Some(5));
    }

    #[test]
    fn given_page_with_several_conversations_should_apply_each_in_order() {
        let mut s = at(0, &[("a", 1)]);
        let (out, _) = s.apply_page(page(vec![msg("a", 2), msg("a", 3), msg("b", 1)]));
        assert_eq!(seqs(&out), vec![("a".into(), 2), ("a".into(), 3), ("b".into(), 1)]);
    }

    #[test]
    fn given_page_with_reset_should_emit_reset_move_cursor_to_first_seq_and_need_sync() {
        let mut s = at(0, &[("c", 90)]);
        s.apply_message(msg("c", 95));
        s.begin_pass();
        let reset = CursorReset { conversation_id: "c".into(), first_seq: 10, last_seq: 40 };
        let (out, _) = s.apply_page(SyncPage { resets: vec![reset], ..SyncPage::default() });
        assert_eq!(
            out,
            vec![Event::CursorReset { conversation_id: "c".into(), first_seq: 10, last_seq: 40 }]
        );
        assert_eq!(cursor(&s, "c"), Some(9));
        assert!(s.needs_sync(), "sync again from the new cursor");
        let out = s.apply_message(msg("c", 10));
        assert_eq!(seqs_of(&out, "c"), vec![10], "old buffer was dropped");
    }

    #[test]
    fn given_page_with_revoked_should_drop_the_cursor_and_emit_revoked() {
        let mut s = at(0, &[("c", 5), ("d", 1)]);
        let (out, _) = s.apply_page(SyncPage { revoked: vec!["c".into()], ..SyncPage::default() });
        assert_eq!(out, vec![Event::Revoked { conversation_id: "c".into() }]);
        assert_eq!(cursor(&s, "c"), None);
        assert_eq!(cursor(&s, "d"), Some(1));
    }

    #[test]
    fn given_page_with_more_should_return_its_continuation() {
        let mut s = at(0, &[]);
        let more = SyncPage {
            has_more: true,
            continuation: Bytes::from_static(b"k"),
            ..SyncPage::default()
        };
        assert_eq!(s.apply_page(more).1, Some(Bytes::from_static(b"k")));
        assert_eq!(s.apply_page(SyncPage::default()).1, None);
    }

    #[test]
    fn given_feed_events_in_order_should_emit_them_and_advance_feed_position() {
        let mut s = at(0, &[("c", 3)]);
        let out = s.apply_feed_event(feed(1, FeedEventKind::Removed, "c"));
        assert_eq!(out, vec![Event::Feed(feed(1, FeedEventKind::Removed, "c"))]);
        assert_eq!(s.position().feed_position, 1);
        assert_eq!(cursor(&s, "c"), None, "REMOVED drops the cursor");
        assert!(s.apply_feed_event(feed(1, FeedEventKind::Removed, "c")).is_empty(), "dup");
    }

    #[test]
    fn given_feed_added_should_need_sync() {
        let mut s = at(4, &[]);
        assert_eq!(s.apply_feed_event(feed(5, FeedEventKind::Added, "g")).len(), 1);
        assert!(s.needs_sync());
    }

    #[test]
    fn given_live_added_already_applied_by_a_sync_should_still_need_sync() {
        let mut s = at(5, &[("g", 1)]);
        s.begin_pass();
        s.end_pass();
        assert!(!s.needs_sync());
        assert!(s.apply_feed_event(feed(5, FeedEventKind::Added, "g")).is_empty(), "a duplicate");
        assert!(s.needs_sync(), "entries committed before the live subscription must be fetched");
    }

    #[test]
    fn given_removed_conversation_with_buffer_should_drop_the_buffer_too() {
        let mut s = at(0, &[("c", 3)]);
        s.apply_message(msg("c", 5));
        s.apply_feed_event(feed(1, FeedEventKind::Removed, "c"));
        s.begin_pass();
        let (out, _) = s.apply_page(page(vec![msg("c", 1)]));
        assert_eq!(seqs_of(&out, "c"), vec![1], "re-added: starts over, no stale buffer");
    }

    #[test]
    fn given_feed_gap_should_buffer_need_sync_and_release_when_page_fills_it() {
        let mut s = at(2, &[]);
        assert!(s.apply_feed_event(feed(4, FeedEventKind::Removed, "x")).is_empty());
        assert!(s.needs_sync());
        let filled = SyncPage {
            feed_events: vec![feed(3, FeedEventKind::Removed, "y")],
            feed_position: 3,
            ..SyncPage::default()
        };
        let (out, _) = s.apply_page(filled);
        let users: Vec<u64> = out
            .iter()
            .filter_map(|e| if let Event::Feed(f) = e { Some(f.user_seq) } else { None })
            .collect();
        assert_eq!(users, vec![3, 4]);
        assert_eq!(s.position().feed_position, 4);
    }

    #[test]
    fn given_page_with_older_feed_position_should_keep_the_newer_local_one() {
        let mut s = at(6, &[]);
        s.apply_page(SyncPage { feed_position: 5, ..SyncPage::default() });
        assert_eq!(s.position().feed_position, 6);
        s.apply_page(SyncPage { feed_position: 9, ..SyncPage::default() });
        assert_eq!(s.position().feed_position, 9);
    }

    fn own_send(conv: &str, key: &str, text: &str) -> Send {
        Send {
            conversation_id: conv.into(),
            client_msg_id: key.into(),
            content: Some(Content::text(text)),
        }
    }

    fn ack(conv: &str, seq: u64, key: &str, duplicate: bool) -> SendAck {
        SendAck {
            conversation_id: conv.into(),
            seq,
            timestamp_ms: 77,
            client_msg_id: key.into(),
            duplicate,
        }
    }

    #[test]
    fn given_own_ack_in_order_should_emit_the_message_as_sent_by_self() {
        let mut s = at(0, &[("c", 2)]);
        let out = s.apply_own_ack("alice", &own_send("c", "k1", "hi"), &ack("c", 3, "k1", false));
        let expected = Message {
            conversation_id: "c".into(),
            seq: 3,
            sender: "alice".into(),
            timestamp_ms: 77,
            client_msg_id: "k1".into(),
            content: Some(Content::text("hi")),
            system: None,
        };
        assert_eq!(out, vec![Event::Message(expected)]);
        assert_eq!(cursor(&s, "c"), Some(3));
    }

    #[test]
    fn given_own_ack_after_missed_messages_should_buffer_until_sync_fills_the_gap() {
        let mut s = at(0, &[("c", 2)]);
        assert!(
            s.apply_own_ack("alice", &own_send("c", "k", "x"), &ack("c", 5, "k", false)).is_empty()
        );
        assert!(s.needs_sync());
        let (out, _) = s.apply_page(page(vec![msg("c", 3), msg("c", 4), msg("c", 5)]));
        assert_eq!(seqs_of(&out, "c"), vec![3, 4, 5]);
        let Event::Message(own) = &out[2] else { panic!("not a message") };
        assert_eq!(own.sender, "alice", "the buffered own message, not the page's copy");
    }

    #[test]
    fn given_duplicate_ack_already_applied_should_emit_nothing() {
        let mut s = at(0, &[("c", 5)]);
        let out = s.apply_own_ack("alice", &own_send("c", "k", "x"), &ack("c", 4, "k", true));
        assert!(out.is_empty());
        assert!(!s.needs_sync());
    }

    #[test]
    fn given_duplicate_ack_beyond_cursor_should_sync_instead_of_fabricating() {
        let mut s = at(0, &[("c", 3)]);
        let out = s.apply_own_ack("alice", &own_send("c", "k", "x"), &ack("c", 4, "k", true));
        assert!(out.is_empty());
        assert!(s.needs_sync());
    }

    #[test]
    fn given_expected_seq_not_yet_applied_should_need_sync() {
        let mut s = at(0, &[("c", 3)]);
        s.expect_seq("c", 3);
        assert!(!s.needs_sync());
        s.expect_seq("c", 4);
        assert!(s.needs_sync());
        s.begin_pass();
        s.expect_seq("unknown", 1);
        assert!(s.needs_sync());
    }

    #[test]
    fn given_need_raised_during_pass_should_still_need_sync_after_begin() {
        let mut s = at(0, &[("c", 1)]);
        s.apply_message(msg("c", 3));
        s.begin_pass();
        assert!(!s.needs_sync());
        s.apply_message(msg("c", 9));
        assert!(s.needs_sync());
    }

    #[test]
    fn given_completed_pass_should_drop_buffers_of_conversations_without_cursor() {
        let mut s = at(0, &[]);
        s.apply_message(msg("stranger", 4));
        s.begin_pass();
        s.apply_page(SyncPage::default());
        s.end_pass();
        let (out, _) = s.apply_page(page(vec![msg("stranger", 5)]));
        assert_eq!(seqs_of(&out, "stranger"), vec![5], "the stale 4 is gone");
    }

    #[test]
    fn given_position_when_resumed_should_keep_cursors_sorted_and_feed_position() {
        let s = at(7, &[("b", 2), ("a", 9)]);
        let p = s.position();
        assert_eq!(p.feed_position, 7);
        let ids: Vec<&str> = p.cursors.iter().map(|c| c.conversation_id.as_str()).collect();
        assert_eq!(ids, vec!["a", "b"]);
        let again = SyncState::new(p.clone(), DEFAULT_BUFFER_LIMIT);
        assert_eq!(again.position(), p);
    }
}
