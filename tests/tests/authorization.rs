//! The authorization matrix: every conversation operation, tried by a user who was never a
//! member and by one who was removed, is refused; neither learns anything nor changes
//! anything, and the removed member's live deliveries stop at once.

use std::time::Duration;

use switchboard_protocol::{ErrorCode, client_frame, server_frame};
use switchboard_tests::{Broker, RawConn};

/// Every request that names a conversation.
fn operations(conv: &str) -> Vec<client_frame::Kind> {
    let conversation_id = conv.to_owned();
    vec![
        client_frame::Kind::Send(switchboard_protocol::Send {
            conversation_id: conversation_id.clone(),
            client_msg_id: "intruder".into(),
            content: Some(switchboard_protocol::Content::text("hi")),
        }),
        client_frame::Kind::History(switchboard_protocol::History {
            conversation_id: conversation_id.clone(),
            ..Default::default()
        }),
        client_frame::Kind::ListMembers(switchboard_protocol::ListMembers {
            conversation_id: conversation_id.clone(),
            ..Default::default()
        }),
        client_frame::Kind::AddMembers(switchboard_protocol::AddMembers {
            conversation_id: conversation_id.clone(),
            users: vec!["mallory".into()],
        }),
        client_frame::Kind::RemoveMembers(switchboard_protocol::RemoveMembers {
            conversation_id: conversation_id.clone(),
            users: vec!["owner".into()],
        }),
        client_frame::Kind::Leave(switchboard_protocol::Leave {
            conversation_id: conversation_id.clone(),
        }),
        client_frame::Kind::MarkRead(switchboard_protocol::MarkRead {
            conversation_id: conversation_id.clone(),
            seq: 1,
        }),
        client_frame::Kind::MarkDelivered(switchboard_protocol::MarkDelivered {
            conversation_id: conversation_id.clone(),
            seq: 1,
        }),
        client_frame::Kind::GetReceipts(switchboard_protocol::GetReceipts {
            conversation_id: conversation_id.clone(),
            ..Default::default()
        }),
        client_frame::Kind::Typing(switchboard_protocol::Typing { conversation_id, active: true }),
    ]
}

/// Asks every operation as `who`; each must be refused as "not found" (a non-member cannot
/// tell a conversation it is not in from one that does not exist).
async fn refused_everything(who: &mut RawConn, name: &str, conv: &str) {
    for op in operations(conv) {
        match who.request(op.clone()).await {
            server_frame::Kind::Error(e) => {
                assert_eq!(e.code, ErrorCode::NotFound as i32, "{name}: {op:?} → {e:?}");
            }
            other => panic!("{name}: {op:?} was answered with {other:?}"),
        }
    }
}

#[tokio::test]
async fn given_a_stranger_and_a_removed_member_every_operation_should_be_refused() {
    let broker = Broker::start();
    let (mut owner, _) = broker.raw_as("owner").await;
    let group = match owner
        .request(client_frame::Kind::CreateConversation(switchboard_protocol::CreateConversation {
            kind: switchboard_protocol::ConversationKind::Group as i32,
            name: "matrix".into(),
            members: vec!["member".into(), "removed".into()],
            ..Default::default()
        }))
        .await
    {
        server_frame::Kind::Conversation(c) => c.conversation_id,
        other => panic!("{other:?}"),
    };
    let direct = owner.create_direct("member").await;
    let (mut member, _) = broker.raw_as("member").await;
    let (mut removed, _) = broker.raw_as("removed").await;
    let (mut stranger, _) = broker.raw_as("stranger").await;

    // The removal: the removed member's session gets the removal entry and nothing after it.
    match owner
        .request(client_frame::Kind::RemoveMembers(switchboard_protocol::RemoveMembers {
            conversation_id: group.clone(),
            users: vec!["removed".into()],
        }))
        .await
    {
        server_frame::Kind::Membership(m) => assert_eq!(m.changed, vec!["removed".to_owned()]),
        other => panic!("{other:?}"),
    }
    let removal = removed.next_message().await;
    assert!(removal.system.is_some(), "the removal entry reaches the removed member");
    let after = match owner
        .request(client_frame::Kind::Send(switchboard_protocol::Send {
            conversation_id: group.clone(),
            client_msg_id: "after-removal".into(),
            content: Some(switchboard_protocol::Content::text("not for you")),
        }))
        .await
    {
        server_frame::Kind::SendAck(a) => a.seq,
        other => panic!("{other:?}"),
    };
    assert_eq!(member.next_message().await.seq, removal.seq);
    assert_eq!(member.next_message().await.seq, after);

    refused_everything(&mut stranger, "a stranger", &group).await;
    refused_everything(&mut stranger, "a stranger", &direct).await;
    refused_everything(&mut stranger, "a stranger", "g:does-not-exist").await;
    refused_everything(&mut removed, "a removed member", &group).await;

    // Nothing reached the members from them (typing included), and the removed member got
    // nothing after the removal.
    let quiet = tokio::time::Instant::now() + Duration::from_millis(500);
    while let Ok(Some(f)) = tokio::time::timeout_at(quiet, member.recv()).await {
        assert!(
            !matches!(f.kind, Some(server_frame::Kind::Typing(_) | server_frame::Kind::Message(_))),
            "a non-member's request reached a member: {f:?}"
        );
    }
    assert!(member.pushes.is_empty(), "{:?}", member.pushes);
    let late = tokio::time::timeout(Duration::from_millis(500), removed.next_message()).await;
    assert!(late.is_err(), "a delivery after the removal: {late:?}");
    // And the log holds only the owner's and the members' entries.
    let log = owner.log(&group).await;
    assert!(log.iter().all(|(_, key)| key != "intruder"), "{log:?}");
    // Their own conversation lists do not show the group.
    for who in [&mut stranger, &mut removed] {
        match who.request(client_frame::Kind::ListConversations(Default::default())).await {
            server_frame::Kind::Conversations(l) => {
                assert!(l.conversations.iter().all(|c| c.conversation_id != group), "{l:?}");
            }
            other => panic!("{other:?}"),
        }
    }
}
