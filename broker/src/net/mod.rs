//! Connections and sessions: transports decode frames, the session runs the handshake and
//! dispatches requests to one handler per operation ([`handler`]).

pub mod admin;
pub mod assets;
pub mod handler;
pub mod http;
pub mod session;
pub mod tcp;
pub mod ws;
