//! Chat from a terminal: prints the conversation's messages (with sender and seq) and sends
//! every line typed on stdin.
//!
//! ```text
//! cargo run -p switchboard-client --example chat -- --addr 127.0.0.1:7400 --token <jwt> --with bob
//! cargo run -p switchboard-client --example chat -- --token <jwt> --group g:team
//! ```

use clap::{ArgGroup, Parser};
use switchboard_client::{Client, Content, Event, Message, SystemEvent};
use tokio::io::{AsyncBufReadExt, BufReader};

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

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let (client, mut events) = Client::builder(&args.addr).token(args.token).connect().await?;
    let conversation = match (args.with, args.group) {
        (Some(peer), _) => client.create_direct(&peer).await?.conversation_id,
        (None, Some(group)) => group,
        (None, None) => return Err("pass --with <user> or --group <id>".into()),
    };
    eprintln!("connected as {}; chatting in {conversation}", client.user_id());

    let shown = conversation.clone();
    let printer = tokio::spawn(async move {
        while let Some(event) = events.next().await {
            match event {
                Event::Message(m) if m.conversation_id == shown => {
                    println!("[#{}] {}: {}", m.seq, m.sender, describe(&m));
                }
                Event::Disconnected { reason, message } => {
                    eprintln!("disconnected ({reason:?}): {message}; reconnecting");
                }
                Event::Connected { reconnect: true, .. } => eprintln!("reconnected"),
                Event::Revoked { conversation_id } if conversation_id == shown => {
                    eprintln!("you are no longer a member of {conversation_id}");
                }
                Event::Closed => break,
                _ => {}
            }
        }
    });

    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        if line.trim().is_empty() {
            continue;
        }
        if let Err(e) = client.send(&conversation, Content::text(line)).await {
            eprintln!("send failed: {e}");
        }
    }
    client.close().await;
    printer.await?;
    Ok(())
}
