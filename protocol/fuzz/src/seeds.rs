//! The committed seed corpus (`seeds/<target>/<name>`), built here so that it can be
//! regenerated exactly: `cargo run --example gen_seeds` (add `-- --check` to only compare).

use prost::Message as _;
use switchboard_protocol::{
    ClientFrame, Content, CreateConversation, Cursor, Hello, History, Ping, PresenceQuery, Send,
    ServerFrame, Sync, SyncPosition, client_frame, encode_frame, history, json, server_frame,
};

/// One seed file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seed {
    /// The fuzz target it is for (the folder under `seeds/`).
    pub target: &'static str,
    /// The file name.
    pub name: &'static str,
    /// The file's bytes.
    pub bytes: Vec<u8>,
}

/// First byte of a `frame_decoder` input: how the target picks the codec's limit (see
/// `fuzz_targets/frame_decoder.rs`).
pub mod limit {
    /// `DEFAULT_MAX_FRAME_BYTES` (1 MiB), the broker's default.
    pub const DEFAULT: u8 = 0;
    /// 64 KiB, the smallest limit the broker accepts in its configuration.
    pub const BROKER_MIN: u8 = 1;
    /// A limit of `n` bytes, for `n` in 0..=63.
    #[must_use]
    pub const fn small(n: u8) -> u8 {
        (n << 2) | 2
    }
    /// 16 MiB, the largest limit the broker accepts in its configuration.
    pub const BROKER_MAX: u8 = 3;
}

/// Second byte of a `frame_decoder` input: 0 feeds the stream whole, anything else seeds the
/// chunk sizes.
pub mod chunks {
    /// The stream in one piece.
    pub const WHOLE: u8 = 0;
    /// One byte at a time.
    pub const BYTES: u8 = 1;
    /// Pseudo-random chunk sizes.
    pub const MIXED: u8 = 0x5a;
}

fn hello(token: &str) -> ClientFrame {
    ClientFrame::request(
        1,
        client_frame::Kind::Hello(Hello {
            protocol_version: switchboard_protocol::PROTOCOL_VERSION,
            token: token.into(),
            resume: None,
            client: "switchboard-fuzz/0".into(),
        }),
    )
}

fn hello_resume() -> ClientFrame {
    ClientFrame::request(
        1,
        client_frame::Kind::Hello(Hello {
            protocol_version: 1,
            token: "eyJhbGciOiJIUzI1NiJ9.e30.sig".into(),
            resume: Some(SyncPosition {
                feed_position: 7,
                cursors: vec![
                    Cursor { conversation_id: "dm:alice:bob".into(), seq: 42 },
                    Cursor { conversation_id: "g:team".into(), seq: u64::MAX },
                ],
            }),
            client: String::new(),
        }),
    )
}

fn ping(request_id: u64) -> ClientFrame {
    ClientFrame::request(request_id, client_frame::Kind::Ping(Ping {}))
}

fn send_text() -> ClientFrame {
    ClientFrame::request(
        2,
        client_frame::Kind::Send(Send {
            conversation_id: "dm:alice:bob".into(),
            client_msg_id: "k-1".into(),
            content: Some(Content::text("hello, bob")),
        }),
    )
}

fn send_data() -> ClientFrame {
    ClientFrame::request(
        3,
        client_frame::Kind::Send(Send {
            conversation_id: "g:team".into(),
            client_msg_id: "k-2".into(),
            content: Some(Content::data("image/png", vec![0x89, b'P', b'N', b'G', 0, 0xff])),
        }),
    )
}

fn create_group() -> ClientFrame {
    ClientFrame::request(
        4,
        client_frame::Kind::CreateConversation(CreateConversation {
            kind: switchboard_protocol::ConversationKind::Group as i32,
            name: "Team ✓".into(),
            members: vec!["alice".into(), "bob".into(), "carol@example".into()],
            visibility: switchboard_protocol::HistoryVisibility::Joined as i32,
            conversation_id: "g:team".into(),
        }),
    )
}

fn history_before() -> ClientFrame {
    ClientFrame::request(
        5,
        client_frame::Kind::History(History {
            conversation_id: "g:team".into(),
            anchor: Some(history::Anchor::BeforeSeq(100)),
            limit: 50,
        }),
    )
}

fn sync_continuation() -> ClientFrame {
    ClientFrame::request(
        6,
        client_frame::Kind::Sync(Sync {
            position: Some(SyncPosition {
                feed_position: 1,
                cursors: vec![Cursor { conversation_id: "g:team".into(), seq: 3 }],
            }),
            limit: 0,
            continuation: vec![1, 2, 3, 4].into(),
        }),
    )
}

fn presence() -> ClientFrame {
    ClientFrame::request(
        7,
        client_frame::Kind::PresenceQuery(PresenceQuery {
            users: vec!["alice".into(), "bob".into(), "a:b".into(), String::new()],
        }),
    )
}

/// A Hello whose encoding is exactly `len` bytes (for `len` from 25 up to 127).
fn hello_of_len(len: usize) -> ClientFrame {
    let base = hello("").encoded_len();
    let frame = hello(&"t".repeat(len - base - 2));
    assert_eq!(frame.encoded_len(), len, "hello_of_len({len})");
    frame
}

fn decoder_input(limit: u8, chunks: u8, stream: &[u8]) -> Vec<u8> {
    let mut v = vec![limit, chunks];
    v.extend_from_slice(stream);
    v
}

fn concat(frames: &[&ClientFrame]) -> Vec<u8> {
    frames.iter().flat_map(|f| encode_frame(*f).to_vec()).collect()
}

fn frame_decoder_seeds() -> Vec<Seed> {
    let at_limit = hello_of_len(40);
    let seed = |name, bytes| Seed { target: "frame_decoder", name, bytes };
    vec![
        seed("ping_whole", decoder_input(limit::DEFAULT, chunks::WHOLE, &concat(&[&ping(1)]))),
        seed(
            "hello_bytewise",
            decoder_input(limit::DEFAULT, chunks::BYTES, &concat(&[&hello("t")])),
        ),
        seed(
            "session_mixed_chunks",
            decoder_input(
                limit::BROKER_MIN,
                chunks::MIXED,
                &concat(&[&hello_resume(), &send_text(), &send_data(), &ping(9), &create_group()]),
            ),
        ),
        seed(
            "history_sync_broker_max",
            decoder_input(
                limit::BROKER_MAX,
                chunks::MIXED,
                &concat(&[&history_before(), &sync_continuation(), &presence()]),
            ),
        ),
        // A frame of exactly the limit, then one byte over it.
        seed("len_at_limit", decoder_input(limit::small(40), chunks::WHOLE, &concat(&[&at_limit]))),
        seed(
            "len_over_limit",
            decoder_input(limit::small(39), chunks::BYTES, &concat(&[&at_limit])),
        ),
        // An empty frame (len 0) decodes to the default ClientFrame; a limit of 0 still takes it.
        seed("empty_frame", decoder_input(limit::small(0), chunks::WHOLE, &[0, 0, 0, 0])),
        // A 4 GiB announcement must be refused before anything grows.
        seed(
            "len_4gib",
            decoder_input(limit::DEFAULT, chunks::BYTES, &[0xff, 0xff, 0xff, 0xff, 1, 2, 3]),
        ),
        // The broker's default limit exactly (1 MiB), with only a little of the body.
        seed(
            "len_default_limit_truncated",
            decoder_input(limit::DEFAULT, chunks::MIXED, &[0, 0x10, 0, 0, 0x08, 0x01]),
        ),
        seed("truncated_header", decoder_input(limit::DEFAULT, chunks::WHOLE, &[0, 0, 0])),
        seed(
            "garbage_body",
            decoder_input(limit::DEFAULT, chunks::WHOLE, &[0, 0, 0, 3, 0xff, 0xff, 0xff]),
        ),
        // request_id=5 and an unknown oneof case (field 99).
        seed(
            "unknown_case",
            decoder_input(limit::DEFAULT, chunks::WHOLE, &[0, 0, 0, 5, 0x08, 0x05, 0x9a, 0x06, 0]),
        ),
    ]
}

fn client_frame_seeds() -> Vec<Seed> {
    let seed = |name, frame: ClientFrame| Seed {
        target: "client_frame",
        name,
        bytes: frame.encode_to_vec(),
    };
    vec![
        seed("hello", hello("eyJhbGciOiJIUzI1NiJ9.e30.sig")),
        seed("hello_resume", hello_resume()),
        seed("ping", ping(1)),
        seed("send_text", send_text()),
        seed("send_data", send_data()),
        seed("create_group", create_group()),
        seed("history_before", history_before()),
        seed("sync_continuation", sync_continuation()),
        seed("presence_query", presence()),
        Seed { target: "client_frame", name: "empty", bytes: Vec::new() },
        // request_id=5 and an unknown oneof case (field 99).
        Seed {
            target: "client_frame",
            name: "unknown_case",
            bytes: vec![0x08, 0x05, 0x9a, 0x06, 0],
        },
        // A Send whose content has no body (validation must say MissingBody).
        Seed {
            target: "client_frame",
            name: "send_without_body",
            bytes: ClientFrame::request(
                8,
                client_frame::Kind::Send(Send {
                    conversation_id: "c".into(),
                    client_msg_id: "m".into(),
                    content: Some(Content::default()),
                }),
            )
            .encode_to_vec(),
        },
    ]
}

fn json_frame_seeds() -> Vec<Seed> {
    let text = |name, s: &str| Seed { target: "json_frame", name, bytes: s.as_bytes().to_vec() };
    let encoded = |name, frame: &ClientFrame| Seed {
        target: "json_frame",
        name,
        bytes: json::encode(frame).expect("JSON form").into_bytes(),
    };
    let server = |name, frame: &ServerFrame| Seed {
        target: "json_frame",
        name,
        bytes: json::encode(frame).expect("JSON form").into_bytes(),
    };
    vec![
        encoded("hello_resume", &hello_resume()),
        encoded("send_text", &send_text()),
        encoded("send_data", &send_data()),
        encoded("create_group", &create_group()),
        encoded("history_before", &history_before()),
        encoded("sync_continuation", &sync_continuation()),
        text("ping_number_id", r#"{"requestId":1,"ping":{}}"#),
        text(
            "send_snake_case",
            r#"{"request_id":"7","send":{"conversation_id":"dm:a:b","client_msg_id":"k1","content":{"content_type":"text/plain","text":"hi"}}}"#,
        ),
        text("unknown_field", r#"{"requestId":"3","somethingNew":{"x":1}}"#),
        text("null_kind", r#"{"requestId":"4","send":null}"#),
        text("empty_object", "{}"),
        text(
            "enum_number",
            r#"{"createConversation":{"kind":2,"visibility":"HISTORY_VISIBILITY_SHARED"}}"#,
        ),
        text("max_u64", r#"{"requestId":"18446744073709551615","ping":{}}"#),
        server(
            "server_error",
            &ServerFrame::error(5, switchboard_protocol::ErrorCode::RateLimited, "slow down"),
        ),
        server(
            "server_message_push",
            &ServerFrame::push(server_frame::Kind::Message(switchboard_protocol::Message {
                conversation_id: "g:x".into(),
                seq: 42,
                sender: "alice".into(),
                timestamp_ms: 1_700_000_000_000,
                client_msg_id: "k".into(),
                content: Some(Content::data("image/png", vec![1, 2, 3])),
                system: None,
            })),
        ),
    ]
}

/// Every seed, in a fixed order.
#[must_use]
pub fn all() -> Vec<Seed> {
    let mut v = frame_decoder_seeds();
    v.extend(client_frame_seeds());
    v.extend(json_frame_seeds());
    v
}
