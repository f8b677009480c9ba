//! The home-shard role: where each user's sessions are, so membership events reach all of a
//! user's devices. (Presence will live here too.)

use std::collections::HashMap;
use std::sync::Arc;

use super::SessionRef;
use super::mailbox::{HomeMsg, LocalMsg, Outgoing};

/// Sessions per user, for the users hashed to this shard.
#[derive(Debug, Default)]
pub struct Home {
    users: HashMap<Arc<str>, Vec<SessionRef>>,
}

impl Home {
    /// Handles a home message.
    pub fn handle(&mut self, msg: HomeMsg, out: &mut Outgoing) {
        match msg {
            HomeMsg::SessionUp { user, session, ack } => {
                self.users.entry(user).or_default().push(session);
                let _ = ack.send(());
            }
            HomeMsg::SessionDown { user, session } => {
                if let Some(sessions) = self.users.get_mut(&user) {
                    sessions.retain(|s| *s != session);
                    if sessions.is_empty() {
                        self.users.remove(&user);
                    }
                }
            }
            HomeMsg::UserEvent { user, event } => {
                let Some(sessions) = self.users.get(&user) else { return };
                let mut by_shard: HashMap<usize, Vec<u64>> = HashMap::new();
                for s in sessions {
                    by_shard.entry(s.shard).or_default().push(s.id);
                }
                for (shard, sessions) in by_shard {
                    out.push_local(
                        shard,
                        LocalMsg::UserEvent { sessions, user: user.clone(), event: event.clone() },
                    );
                }
            }
        }
    }

    /// Number of sessions of `user` (all shards).
    #[must_use]
    pub fn session_count(&self, user: &str) -> usize {
        self.users.get(user).map_or(0, Vec::len)
    }
}
