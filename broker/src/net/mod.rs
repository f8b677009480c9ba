//! Connections and sessions: transports decode frames, the session runs the handshake and
//! dispatches requests to one handler per operation ([`handler`]).

pub mod handler;
pub mod session;
pub mod tcp;
