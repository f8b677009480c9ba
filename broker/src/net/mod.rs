//! Connections and sessions: transports decode frames, the session runs the handshake and
//! dispatches requests to one handler per operation ([`handler`]).

pub mod admin;
pub mod assets;
pub mod handler;
pub mod http;
pub mod session;
pub mod tcp;
pub mod ws;

/// Writes `bytes` to a connection being refused and closes it, giving up after a second.
pub(crate) async fn write_and_close(mut stream: tokio::net::TcpStream, bytes: &[u8]) {
    use tokio::io::AsyncWriteExt as _;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        stream.write_all(bytes).await?;
        stream.shutdown().await
    })
    .await;
}
