//! Automatic delivery receipts, sans-IO: which `MarkDelivered` to send, and when.
//!
//! The driver reports every message it hands to the application ([`Delivery::emitted`]) and
//! every delivered watermark the broker confirms ([`Delivery::confirmed`]: replies to
//! `MarkDelivered` and `MarkRead`, and the user's own receipt pushes from other devices).
//! While connected it asks [`Delivery::due`] which receipts to send now and sleeps until
//! [`Delivery::next_due`]. Per conversation at most one receipt is sent per [`WINDOW`]: the
//! first right away, later ones when the window ends, carrying the highest seq emitted by then.
//! A seq at or below one already sent or confirmed is never sent.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tokio::time::Instant;

/// The least time between two `MarkDelivered` of one conversation.
pub(crate) const WINDOW: Duration = Duration::from_millis(500);

/// The delivery state of one conversation.
#[derive(Debug, Default)]
struct Conv {
    /// The highest seq handed to the application.
    emitted: u64,
    /// The highest seq sent in a `MarkDelivered` on this connection, or confirmed.
    sent: u64,
    /// The highest delivered watermark the broker confirmed.
    confirmed: u64,
    /// No receipt for this conversation before this instant.
    quiet_until: Option<Instant>,
}

impl Conv {
    fn pending(&self) -> bool {
        self.emitted > self.sent
    }
}

/// Delivery receipt bookkeeping of all conversations. See the module documentation.
#[derive(Debug)]
pub(crate) struct Delivery {
    enabled: bool,
    /// The broker does not support receipts; nothing is sent until the next connection.
    suspended: bool,
    convs: HashMap<String, Conv>,
    /// The conversations with a receipt to send (`emitted > sent`), so that the frequent
    /// [`due`](Self::due) and [`next_due`](Self::next_due) do not scan every conversation.
    pending: HashSet<String>,
}

impl Delivery {
    /// Bookkeeping that sends receipts only when `enabled`.
    pub(crate) fn new(enabled: bool) -> Self {
        Self { enabled, suspended: false, convs: HashMap::new(), pending: HashSet::new() }
    }

    /// Message `seq` of `conversation_id` was handed to the application.
    pub(crate) fn emitted(&mut self, conversation_id: &str, seq: u64) {
        if !self.enabled {
            return;
        }
        let conv = match self.convs.get_mut(conversation_id) {
            Some(conv) => conv,
            None => self.convs.entry(conversation_id.to_owned()).or_default(),
        };
        conv.emitted = conv.emitted.max(seq);
        if conv.pending() && !self.pending.contains(conversation_id) {
            self.pending.insert(conversation_id.to_owned());
        }
    }

    /// The broker confirmed the user's delivered watermark in `conversation_id`.
    pub(crate) fn confirmed(&mut self, conversation_id: &str, delivered_seq: u64) {
        if !self.enabled {
            return;
        }
        let conv = self.convs.entry(conversation_id.to_owned()).or_default();
        conv.confirmed = conv.confirmed.max(delivered_seq);
        conv.sent = conv.sent.max(delivered_seq);
        if !conv.pending() {
            self.pending.remove(conversation_id);
        }
    }

    /// The conversation's log starts over or the user left it: forget it.
    pub(crate) fn forget(&mut self, conversation_id: &str) {
        self.convs.remove(conversation_id);
        self.pending.remove(conversation_id);
    }

    /// The broker answered `UNSUPPORTED`: send nothing more on this connection.
    pub(crate) fn suspend(&mut self) {
        self.suspended = true;
    }

    /// The connection ended: receipts sent but not confirmed may not have arrived, so they are
    /// pending again for the next connection (the broker ignores a repeated watermark).
    pub(crate) fn connection_lost(&mut self) {
        self.suspended = false;
        for (id, conv) in &mut self.convs {
            conv.sent = conv.confirmed;
            if conv.pending() {
                self.pending.insert(id.clone());
            }
        }
    }

    /// The receipts to send now, as `(conversation_id, seq)`; each starts a new window.
    pub(crate) fn due(&mut self, now: Instant) -> Vec<(String, u64)> {
        if !self.enabled || self.suspended {
            return Vec::new();
        }
        let mut due = Vec::new();
        self.pending.retain(|id| {
            let Some(conv) = self.convs.get_mut(id) else { return false };
            if conv.quiet_until.is_some_and(|t| t > now) {
                return true;
            }
            conv.sent = conv.emitted;
            conv.quiet_until = Some(now + WINDOW);
            due.push((id.clone(), conv.emitted));
            false
        });
        due.sort_unstable();
        due
    }

    /// When the next receipt becomes due, if one is pending.
    pub(crate) fn next_due(&self) -> Option<Instant> {
        if !self.enabled || self.suspended {
            return None;
        }
        let quiet_until = |id: &String| self.convs.get(id).and_then(|c| c.quiet_until);
        self.pending.iter().filter_map(quiet_until).min()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn pair(conv: &str, seq: u64) -> (String, u64) {
        (conv.to_owned(), seq)
    }

    #[test]
    fn given_first_message_should_be_due_at_once_and_later_ones_when_the_window_ends() {
        let mut d = Delivery::new(true);
        let t0 = Instant::now();
        d.emitted("c", 1);
        assert_eq!(d.due(t0), vec![pair("c", 1)]);
        d.emitted("c", 2);
        d.emitted("c", 3);
        assert!(d.due(t0 + Duration::from_millis(499)).is_empty(), "still in the window");
        assert_eq!(d.next_due(), Some(t0 + WINDOW));
        assert_eq!(d.due(t0 + WINDOW), vec![pair("c", 3)], "the latest seq");
        assert_eq!(d.next_due(), None);
    }

    #[test]
    fn given_confirmed_watermark_should_not_send_seqs_at_or_below_it() {
        let mut d = Delivery::new(true);
        let t0 = Instant::now();
        d.confirmed("c", 5);
        d.emitted("c", 4);
        d.emitted("c", 5);
        assert!(d.due(t0).is_empty());
        assert_eq!(d.next_due(), None);
        d.emitted("c", 6);
        assert_eq!(d.due(t0), vec![pair("c", 6)]);
    }

    #[test]
    fn given_sent_receipt_should_not_send_the_same_seq_again_after_the_window() {
        let mut d = Delivery::new(true);
        let t0 = Instant::now();
        d.emitted("c", 2);
        assert_eq!(d.due(t0), vec![pair("c", 2)]);
        assert!(d.due(t0 + WINDOW * 4).is_empty());
    }

    #[test]
    fn given_unconfirmed_receipt_when_connection_is_lost_should_be_due_again() {
        let mut d = Delivery::new(true);
        let t0 = Instant::now();
        d.emitted("c", 2);
        d.emitted("d", 7);
        assert_eq!(d.due(t0), vec![pair("c", 2), pair("d", 7)]);
        d.confirmed("d", 7);
        d.connection_lost();
        assert_eq!(d.due(t0 + WINDOW), vec![pair("c", 2)], "only the unconfirmed one");
    }

    #[test]
    fn given_disabled_or_suspended_should_never_be_due() {
        let mut off = Delivery::new(false);
        off.emitted("c", 1);
        assert!(off.due(Instant::now()).is_empty());
        assert_eq!(off.next_due(), None);

        let mut d = Delivery::new(true);
        d.suspend();
        d.emitted("c", 1);
        assert!(d.due(Instant::now()).is_empty());
        d.connection_lost();
        assert_eq!(d.due(Instant::now()), vec![pair("c", 1)], "resumed on the next connection");
    }

    #[test]
    fn given_forgotten_conversation_should_start_over() {
        let mut d = Delivery::new(true);
        let t0 = Instant::now();
        d.emitted("c", 9);
        d.due(t0);
        d.forget("c");
        d.emitted("c", 1);
        assert_eq!(d.due(t0), vec![pair("c", 1)]);
    }
}
