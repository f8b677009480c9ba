//! Arbitrary text through the JSON subprotocol decoders (`switchboard.v1.json`): the broker's
//! `json::decode_client` and the clients' `json::decode_server`. A frame that decodes must
//! encode back (`json::encode`) to text that decodes to the same frame, must survive a binary
//! round trip, and (client frames) is validated as the broker's handlers would.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use switchboard_protocol::{Encoded, ServerFrame, json};
use switchboard_protocol_fuzz::{check_binary_round_trip, check_json_round_trip, check_validation};

fuzz_target!(|data: &[u8]| {
    // The WebSocket layer hands the decoder text frames, which are UTF-8 by the protocol.
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(frame) = json::decode_client(text) {
        // JSON cannot carry enum values the schema does not name, so the JSON form must exist.
        serde_json::to_string(&frame).expect("a decoded client frame has a JSON form");
        check_json_round_trip(&frame, json::decode_client);
        check_binary_round_trip(&frame);
        check_validation(&frame);
    }
    if let Ok(frame) = json::decode_server(text) {
        let encoded =
            serde_json::to_string(&frame).expect("a decoded server frame has a JSON form");
        check_json_round_trip(&frame, json::decode_server);
        let bytes = frame.encode_to_vec();
        assert_eq!(ServerFrame::decode(&bytes[..]).ok(), Some(frame.clone()), "binary round trip");
        // The encode-once path the broker sends to JSON WebSocket sessions gives the same text.
        let shared = Encoded::of(&frame);
        assert_eq!(shared.json().expect("encoded frame has JSON").as_ref(), encoded.as_bytes());
    }
});
