//! What the load is sent to. A target opens authenticated connections, sets up channels (a
//! conversation, a subject, a pub/sub channel), and splits each connection into a sending and a
//! receiving half. Scenarios are generic over [`Target`].
//!
//! Payloads carry the intended send time (nanoseconds since the run's start, 8 bytes LE) and
//! the sender's index (8 bytes LE), so receivers measure end-to-end latency and peers that echo
//! a publisher's own messages (NATS, Redis) can skip them.

pub mod switchboard;

#[cfg(feature = "peers")]
pub mod nats;
#[cfg(feature = "peers")]
pub mod redis;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};

use bytes::{BufMut, Bytes, BytesMut};

/// Bytes of the payload header (send time, sender index).
pub const HEADER: usize = 16;

/// Builds a payload of `size` bytes (at least the header).
#[must_use]
pub fn payload(stamp: u64, sender: u64, size: usize) -> Bytes {
    let mut b = BytesMut::with_capacity(size.max(HEADER));
    b.put_u64_le(stamp);
    b.put_u64_le(sender);
    b.resize(size.max(HEADER), b'x');
    b.freeze()
}

/// The (send time, sender index) of a payload.
#[must_use]
pub fn parse(payload: &[u8]) -> Option<(u64, u64)> {
    let stamp = u64::from_le_bytes(payload.get(..8)?.try_into().ok()?);
    let sender = u64::from_le_bytes(payload.get(8..16)?.try_into().ok()?);
    Some((stamp, sender))
}

/// Something a connection received.
#[derive(Debug)]
pub enum Event {
    /// The send with this id was acknowledged (durably, for durable targets).
    Ack(u64),
    /// A message arrived; the raw payload as sent.
    Delivery(Bytes),
    /// A request failed; the error's code and the request id when known.
    Error(String, Option<u64>),
}

/// A system under test.
pub trait Target: Clone + Send + Sync + 'static {
    /// An open, authenticated connection.
    type Conn: Connection;

    /// A short name for reports (`switchboard-tcp`, `nats-core`, …).
    fn name(&self) -> String;

    /// Whether sends are acknowledged; closed-loop runs on unacknowledged targets window on
    /// their own deliveries instead.
    fn acks(&self) -> bool;

    /// Opens a connection as `user`, from `local` when given.
    fn connect(
        &self,
        user: &str,
        local: Option<IpAddr>,
    ) -> impl Future<Output = anyhow::Result<Self::Conn>> + Send;

    /// Makes users `a` and `b` share a channel (`conn` is `a`'s); returns its name.
    fn direct(
        &self,
        conn: &mut Self::Conn,
        a: &str,
        b: &str,
    ) -> impl Future<Output = anyhow::Result<String>> + Send;

    /// Makes `members` (and `owner`) share a channel; returns its name.
    fn room(
        &self,
        conn: &mut Self::Conn,
        owner: &str,
        members: &[String],
    ) -> impl Future<Output = anyhow::Result<String>> + Send;
}

/// A connection before it is split.
pub trait Connection: Send + 'static {
    /// The sending half.
    type Tx: Tx;
    /// The receiving half.
    type Rx: Rx;

    /// Prepares to receive `channel` (subscribes where the target needs it).
    fn join(&mut self, channel: &str) -> impl Future<Output = anyhow::Result<()>> + Send;

    /// The two halves.
    fn split(self) -> (Self::Tx, Self::Rx);
}

/// The sending half of a connection.
pub trait Tx: Send + 'static {
    /// Queues a message to `channel`; `id` comes back in its [`Event::Ack`].
    fn send(
        &mut self,
        channel: &str,
        id: u64,
        payload: Bytes,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;

    /// Writes what is queued.
    fn flush(&mut self) -> impl Future<Output = anyhow::Result<()>> + Send;

    /// Keeps the connection alive while idle.
    fn ping(&mut self) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// The receiving half of a connection.
pub trait Rx: Send + 'static {
    /// The next event; `None` when the connection closed.
    fn next(&mut self) -> impl Future<Output = Option<Event>> + Send;
}

/// Opens a TCP connection to `addr` from `local` (any port) when given, with Nagle off: the
/// one way every target connects, so `--source-ips` applies to all of them.
///
/// # Errors
/// When binding or connecting fails.
pub async fn tcp(
    addr: SocketAddr,
    local: Option<IpAddr>,
) -> std::io::Result<tokio::net::TcpStream> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    if let Some(ip) = local {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_payload_should_carry_stamp_and_sender_and_have_the_asked_size() {
        let p = payload(123, 7, 100);
        assert_eq!(p.len(), 100);
        assert_eq!(parse(&p), Some((123, 7)));
        assert_eq!(payload(1, 2, 4).len(), HEADER);
        assert_eq!(parse(b"short"), None);
    }
}
