//! Arbitrary bytes as a protobuf `ClientFrame` (the body of a TCP frame, or a binary WebSocket
//! message). Whatever decodes is validated as the broker's handlers would, every validation
//! answer is checked against the specification, and the frame must survive a binary round trip
//! (also through the codec at exactly its length) and, where it has a JSON form, a JSON one.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use switchboard_protocol::{ClientFrame, json};
use switchboard_protocol_fuzz::{check_binary_round_trip, check_json_round_trip, check_validation};

fuzz_target!(|data: &[u8]| {
    let Ok(frame) = ClientFrame::decode(data) else { return };
    check_validation(&frame);
    check_binary_round_trip(&frame);
    check_json_round_trip(&frame, json::decode_client);
});
