//! Live deliveries to nodes outside a conversation's replica set (a cluster with more nodes
//! than replicas): such a node registers its interest with the conversation's leader, which
//! then pushes the conversation's committed entries, typing and receipts to it.
//!
//! - **Register** (when a session there subscribes): `POST /interest` with the user, to the
//!   node the partition is read on (its leader when it is live and holds a complete copy).
//!   The leader's owner checks that the user is a member, records the node's interest (a lease)
//!   and answers with the conversation's committed head. Only then is the session subscribed,
//!   so every later entry is pushed and every earlier one is in the resume page or sync the
//!   session reads next.
//! - **Push**: each entry the leader commits goes to the interested nodes (best effort, in
//!   order per node), whose owner shard delivers it to its interested sessions, revoking a
//!   removed member's subscription as a replica would.
//! - **Refresh**: every [`REFRESH`] the node renews each registration with the last seq it
//!   delivered in order; the leader answers with what follows (up to [`CATCH_UP`] entries), so
//!   a lost push, and a leader change (the new leader knows no interest until the refresh), is
//!   repaired within a refresh. A lease not renewed for [`LEASE`] lapses.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

/// Peer path of registrations and refreshes ([`wire::Request`] → [`wire::Reply`]).
pub const PATH: &str = "/interest";

/// How often a node renews its registrations (and catches up).
pub const REFRESH: Duration = Duration::from_secs(2);

/// How long a leader keeps pushing to a node that stopped renewing.
pub const LEASE: Duration = Duration::from_secs(10);

/// Most entries one refresh answer catches up per conversation (read on the leader's shard
/// thread: kept small; the next refresh continues).
pub const CATCH_UP: usize = 64;

/// Removals remembered per followed conversation (a subscription answered after a removal
/// was delivered is refused); beyond this the memory is cleared.
pub const MAX_REMEMBERED_REMOVALS: usize = 1024;

pub mod wire {
    //! Interest registrations between nodes (protobuf over HTTP on the peer port).

    /// One conversation's registration or refresh.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Item {
        /// The conversation.
        #[prost(string, tag = "1")]
        pub conversation: String,
        /// A refresh: the last seq delivered in order; entries after it are sent back.
        #[prost(uint64, tag = "2")]
        pub after_seq: u64,
        /// A registration for this user (checked to be a member); empty for a refresh.
        #[prost(string, tag = "3")]
        pub user: String,
    }

    /// Registrations or refreshes from one node.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Request {
        /// The node that wants the pushes.
        #[prost(uint64, tag = "1")]
        pub node: u64,
        /// The conversations.
        #[prost(message, repeated, tag = "2")]
        pub items: Vec<Item>,
    }

    /// The answer for one item.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ItemReply {
        /// This node leads the conversation and recorded the interest.
        #[prost(bool, tag = "1")]
        pub ok: bool,
        /// A registration's user is a member (always true for a refresh).
        #[prost(bool, tag = "2")]
        pub member: bool,
        /// The conversation's committed head.
        #[prost(uint64, tag = "3")]
        pub head: u64,
        /// A refresh: the encoded `Message`s after `after_seq`, ascending.
        #[prost(bytes = "bytes", repeated, tag = "4")]
        pub entries: Vec<bytes::Bytes>,
    }

    /// The answers, in request order.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Reply {
        /// The answers.
        #[prost(message, repeated, tag = "1")]
        pub items: Vec<ItemReply>,
    }

    /// A user added to a conversation.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Follow {
        /// The user.
        #[prost(string, tag = "1")]
        pub user: String,
        /// The conversation.
        #[prost(string, tag = "2")]
        pub conversation: String,
    }

    /// Several.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Follows {
        /// The additions.
        #[prost(message, repeated, tag = "1")]
        pub items: Vec<Follow>,
    }
}

/// A conversation this node follows through its leader's pushes (it holds no copy).
#[derive(Debug, Default)]
pub struct Followed {
    /// Bit i set: shard i has sessions receiving it.
    pub interested: u64,
    /// The last seq delivered here in order (pushes and catch-ups).
    pub last_seq: u64,
    /// Members removed by entries delivered here, and at which seq.
    pub removed: std::collections::HashMap<Arc<str>, u64>,
}

/// Serves registrations and refreshes from another node: each item goes to its
/// conversation's owner shard; `None` when the request does not decode.
pub async fn serve(
    shards: &[tokio::sync::mpsc::Sender<super::ShardMsg>],
    body: &[u8],
) -> Option<Vec<u8>> {
    use prost::Message as _;
    let request = wire::Request::decode(body).ok()?;
    let mut waiting = Vec::with_capacity(request.items.len());
    for item in request.items {
        switchboard_protocol::validate::conversation_id(&item.conversation).ok()?;
        let owner = super::owner_shard(super::partition(&item.conversation), shards.len());
        let (reply, rx) = tokio::sync::oneshot::channel();
        let msg = super::OwnerMsg::Interest {
            node: request.node,
            user: (!item.user.is_empty()).then(|| Arc::from(item.user.as_str())),
            conversation: Arc::from(item.conversation.as_str()),
            after_seq: item.after_seq,
            reply,
        };
        if let Some(tx) = shards.get(owner) {
            let _ = tx.send(super::ShardMsg::Owner(msg)).await;
        }
        waiting.push(rx);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(4);
    let mut items = Vec::with_capacity(waiting.len());
    for rx in waiting {
        let reply = tokio::time::timeout_at(deadline, rx).await;
        items.push(reply.ok().and_then(Result::ok).unwrap_or_default());
    }
    Some(wire::Reply { items }.encode_to_vec())
}

/// Posts registrations or refreshes to `node`; `None` when it does not answer.
pub async fn post(
    shard: &super::Shard,
    node: crate::cluster::NodeId,
    request: wire::Request,
) -> Option<Vec<wire::ItemReply>> {
    use prost::Message as _;
    let client = shard.peer_client()?;
    let addr = shard.peer_addr(node)?;
    let body = request.encode_to_vec();
    let reply =
        crate::cluster::raft::post_protobuf(&client, &addr, PATH, body, Duration::from_secs(5))
            .await?;
    let reply = wire::Reply::decode(reply).ok()?;
    let n = request.items.len();
    (reply.items.len() == n).then_some(reply.items)
}

/// Peer path: users added to conversations, for a node without a copy of them
/// ([`wire::Follows`]): its sessions of those users subscribe (they follow the conversations
/// through their leaders from then on).
pub const FOLLOW_PATH: &str = "/interest/follow";

/// Hands added users to their home shards here, which subscribe their sessions, if any
/// (without a feed event: this node's feed has none); `false` when the batch does not decode.
pub fn serve_follow(shards: &[tokio::sync::mpsc::Sender<super::ShardMsg>], body: &[u8]) -> bool {
    use prost::Message as _;
    let Ok(batch) = wire::Follows::decode(body) else { return false };
    for f in batch.items {
        if switchboard_protocol::validate::user_id(&f.user).is_err()
            || switchboard_protocol::validate::conversation_id(&f.conversation).is_err()
        {
            return false;
        }
        let event = super::mailbox::UserEvent {
            frame: switchboard_protocol::Encoded::of(&switchboard_protocol::ServerFrame::default()),
            conversation: Arc::from(f.conversation.as_str()),
            added: true,
            silent: true,
        };
        let user: Arc<str> = Arc::from(f.user.as_str());
        let msg = super::HomeMsg::UserEvent { user: user.clone(), event: Arc::new(event) };
        if let Some(tx) = shards.get(super::home_shard(&user, shards.len())) {
            let _ = tx.try_send(super::ShardMsg::Home(msg));
        }
    }
    true
}

/// Encoded messages of a refresh answer.
pub type Entries = Vec<Bytes>;
