//! Chat from a terminal: prints the conversation's messages (with sender and seq), who is
//! typing, how far the others have read and the peer's presence, and sends every line typed on
//! stdin. Displayed messages are marked read.
//!
//! ```text
//! cargo run -p switchboard-client --example chat -- --addr 127.0.0.1:7400 --token <jwt> --with bob
//! cargo run -p switchboard-client --example chat -- --token <jwt> --group g:team
//! ```

use std::collections::HashMap;
use std::time::{Duration, Instant};

use clap::{ArgGroup, Parser};
use switchboard_client::{
    Client, Content, Error, Event, Message, Presence, Receipt, SystemEvent, TypingEvent,
};
use tokio::io::{AsyncBufReadExt, BufReader};

/// How long a typing indicator lasts when the broker does not say.
const TYPING_SHOWN: Duration = Duration::from_secs(5);

/// Two people chat from two terminals over a Switchboard broker.
#[derive(Debug, Parser)]
#[command(group(ArgGroup::new("target").required(true).args(["with", "group"])))]
struct Args {
    /// The broker's address.
    #[arg(long, env = "SWITCHBOARD_ADDR", default_value = "127.0.0.1:7400")]
    addr: String,
    /// A JWT whose `sub` is your user id.
    #[arg(long, env = "SWITCHBOARD_TOKEN")]
    token: String,
    /// Chat directly with this user.
    #[arg(long)]
    with: Option<String>,
    /// Chat in this group (you must be a member).
    #[arg(long)]
    group: Option<String>,
}

fn describe(m: &Message) -> String {
    if let Some(SystemEvent { kind: Some(kind) }) = &m.system {
        use switchboard_client::protocol::system_event::Kind;
        let what = match kind {
            Kind::Created(c) => format!("created the conversation with {}", c.members.join(", ")),
            Kind::MembersAdded(a) => format!("added {}", a.users.join(", ")),
            Kind::MembersRemoved(r) => format!("removed {}", r.users.join(", ")),
            Kind::MemberLeft(l) => format!("{} left", l.user),
        };
        return format!("* {} {what}", m.sender);
    }
    match m.content.as_ref() {
        Some(c) => match c.as_text() {
            Some(text) => text.to_owned(),
            None => format!("<{} bytes of {}>", c.body_len(), c.content_type),
        },
        None => "<empty>".to_owned(),
    }
}

/// `HH:MM:SS` (UTC) of a time in milliseconds since the epoch.
fn clock(ms: u64) -> String {
    let s = ms / 1000;
    format!("{:02}:{:02}:{:02} UTC", s / 3600 % 24, s / 60 % 60, s % 60)
}

/// What the terminal shows of one conversation.
struct View {
    me: String,
    conversation: String,
    /// The other user of a direct conversation.
    peer: Option<String>,
    /// Until when each user's typing indicator counts as shown.
    typing: HashMap<String, Instant>,
    /// The highest read seq printed per user.
    read: HashMap<String, u64>,
    /// The last printed presence per user.
    online: HashMap<String, bool>,
}

impl View {
    /// Prints `event`; returns the seq of a displayed message.
    fn show(&mut self, event: Event) -> Option<u64> {
        match event {
            Event::Message(m) if m.conversation_id == self.conversation => {
                self.typing.remove(&m.sender);
                println!("[#{}] {}: {}", m.seq, m.sender, describe(&m));
                return Some(m.seq);
            }
            Event::Typing(t) if t.conversation_id == self.conversation => self.typing(t),
            Event::Receipt(r) if r.conversation_id == self.conversation => self.receipt(r),
            Event::Presence(p) => self.presence(p),
            Event::Disconnected { reason, message } => {
                eprintln!("disconnected ({reason:?}): {message}; reconnecting");
            }
            Event::Connected { reconnect: true, .. } => eprintln!("reconnected"),
            Event::Revoked { conversation_id } if conversation_id == self.conversation => {
                eprintln!("you are no longer a member of {conversation_id}");
            }
            _ => {}
        }
        None
    }

    /// Prints "… is typing" once per burst: when no indicator of the user is showing.
    fn typing(&mut self, t: TypingEvent) {
        if !t.active {
            self.typing.remove(&t.user_id);
            return;
        }
        let now = Instant::now();
        let lasts = match t.expires_in_ms {
            0 => TYPING_SHOWN,
            ms => Duration::from_millis(u64::from(ms)),
        };
        if self.typing.insert(t.user_id.clone(), now + lasts).is_none_or(|until| until <= now) {
            println!("… {} is typing", t.user_id);
        }
    }

    fn receipt(&mut self, r: Receipt) {
        if r.user_id == self.me {
            return;
        }
        let read = self.read.entry(r.user_id.clone()).or_default();
        if r.read_seq > *read {
            *read = r.read_seq;
            match &self.peer {
                Some(_) => println!("✓✓ read up to #{}", r.read_seq),
                None => println!("✓✓ {} read up to #{}", r.user_id, r.read_seq),
            }
        }
    }

    /// Prints the peer's presence when it changes.
    fn presence(&mut self, p: Presence) {
        if self.peer.as_deref() != Some(p.user_id.as_str()) {
            return;
        }
        if self.online.insert(p.user_id.clone(), p.online) == Some(p.online) {
            return;
        }
        match (p.online, p.last_seen_ms) {
            (true, _) => println!("{} is online", p.user_id),
            (false, 0) => println!("{} is offline", p.user_id),
            (false, ms) => println!("{} was last seen at {}", p.user_id, clock(ms)),
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let (client, mut events) = Client::builder(&args.addr).token(args.token).connect().await?;
    let (conversation, peer) = match (args.with, args.group) {
        (Some(peer), _) => (client.create_direct(&peer).await?.conversation_id, Some(peer)),
        (None, Some(group)) => (group, None),
        (None, None) => return Err("pass --with <user> or --group <id>".into()),
    };
    eprintln!("connected as {}; chatting in {conversation}", client.user_id());

    let mut view = View {
        me: client.user_id().to_owned(),
        conversation: conversation.clone(),
        peer: peer.clone(),
        typing: HashMap::new(),
        read: HashMap::new(),
        online: HashMap::new(),
    };
    // The peer's changes are pushed; this is where they start from.
    if let Some(peer) = peer {
        match client.presence([peer]).await {
            Ok(now) => now.into_iter().for_each(|p| view.presence(p)),
            Err(e) => eprintln!("presence query failed: {e}"),
        }
    }

    let reader = client.clone();
    let printer = tokio::spawn(async move {
        // A read mark that failed for want of a connection, retried with the next batch.
        let mut unmarked = None;
        while let Some(first) = events.next().await {
            // Show everything that is ready, then mark the last message shown as read.
            let mut batch = vec![first];
            while let Some(event) = events.try_next() {
                batch.push(event);
            }
            let closed = batch.contains(&Event::Closed);
            let shown = batch.into_iter().filter_map(|e| view.show(e)).last();
            if closed {
                break;
            }
            if let Some(seq) = shown.or(unmarked.take()) {
                match reader.mark_read(&view.conversation, seq).await {
                    Ok(_) => {}
                    Err(Error::ConnectionLost) => unmarked = Some(seq),
                    Err(e) => eprintln!("mark read failed: {e}"),
                }
            }
        }
    });

    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        if line.trim().is_empty() {
            continue;
        }
        // A line-based terminal cannot tell when typing starts; announce it once per line.
        // Typing is best effort: a rate limit is normal, so errors are ignored.
        let _ = client.typing(&conversation, true).await;
        if let Err(e) = client.send(&conversation, Content::text(line)).await {
            eprintln!("send failed: {e}");
        }
    }
    client.close().await;
    printer.await?;
    Ok(())
}
