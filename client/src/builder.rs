//! [`ClientBuilder`]: connection options and the first connect.

use std::future::Future;
use std::io;
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use switchboard_protocol::SyncPosition;

/// The largest frame limit a broker accepts in its configuration (16 MiB).
const MAX_FRAME_CEILING: usize = 16 << 20;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::driver::{DEFAULT_MAX_PRESENCE_USERS, Driver};
use crate::error::{BoxError, Error, Result};
use crate::handshake::{self, ConnectError};
use crate::state::{DEFAULT_BUFFER_LIMIT, SyncState};
use crate::{Client, EventStream, ReconnectPolicy};

/// A byte stream the client can speak the protocol over.
pub(crate) trait Transport: AsyncRead + AsyncWrite + std::marker::Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + std::marker::Send + Unpin> Transport for T {}

/// A boxed transport.
pub(crate) type BoxTransport = Box<dyn Transport>;

/// Opens a new transport for every connection attempt.
pub(crate) type Connector =
    Arc<dyn Fn() -> BoxFuture<'static, io::Result<BoxTransport>> + std::marker::Send + Sync>;

/// Produces the token for every connection attempt.
pub(crate) type TokenProvider =
    Arc<dyn Fn() -> BoxFuture<'static, Result<String, BoxError>> + std::marker::Send + Sync>;

/// Where Hello's token comes from.
#[derive(Clone)]
pub(crate) enum TokenSource {
    /// The same token every time (until [`Client::refresh_token`](crate::Client::refresh_token)
    /// replaces it): a rejection on reconnect is permanent.
    Static(Arc<std::sync::Mutex<String>>),
    /// Asked before every attempt: a rejection is retried with a fresh token.
    Provider(TokenProvider),
}

impl TokenSource {
    pub(crate) async fn token(&self) -> Result<String> {
        match self {
            TokenSource::Static(t) => {
                Ok(t.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone())
            }
            TokenSource::Provider(p) => p().await.map_err(Error::TokenProvider),
        }
    }
}

/// Immutable settings shared by the driver and every connection attempt.
pub(crate) struct Config {
    pub(crate) connector: Connector,
    pub(crate) token: TokenSource,
    pub(crate) reconnect: ReconnectPolicy,
    pub(crate) client_name: String,
    pub(crate) max_frame_bytes: usize,
    pub(crate) connect_timeout: Duration,
    pub(crate) auto_delivery_receipts: bool,
}

/// Options for a [`Client`]; start with [`Client::builder`].
///
/// ```no_run
/// # async fn demo() -> Result<(), switchboard_client::Error> {
/// use switchboard_client::Client;
/// let (client, mut events) = Client::builder("127.0.0.1:7400").token("jwt").connect().await?;
/// while let Some(event) = events.next().await {
///     println!("{event:?}");
/// }
/// # Ok(()) }
/// ```
#[must_use]
pub struct ClientBuilder {
    addr: String,
    /// More nodes of the same cluster, tried in turn after `addr`.
    more_addrs: Vec<String>,
    token: TokenSource,
    resume: SyncPosition,
    reconnect: ReconnectPolicy,
    client_name: String,
    max_frame_bytes: usize,
    connect_timeout: Duration,
    connector: Option<Connector>,
    auto_delivery_receipts: bool,
    send_rate_limit_retries: u32,
}

impl std::fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("addr", &self.addr)
            .field("more_addrs", &self.more_addrs)
            .field("resume", &self.resume)
            .field("reconnect", &self.reconnect)
            .field("client_name", &self.client_name)
            .field("max_frame_bytes", &self.max_frame_bytes)
            .field("connect_timeout", &self.connect_timeout)
            .field("auto_delivery_receipts", &self.auto_delivery_receipts)
            .field("send_rate_limit_retries", &self.send_rate_limit_retries)
            .finish_non_exhaustive()
    }
}

impl ClientBuilder {
    pub(crate) fn new(addr: String) -> Self {
        Self {
            addr,
            more_addrs: Vec::new(),
            token: TokenSource::Static(Arc::default()),
            resume: SyncPosition::default(),
            reconnect: ReconnectPolicy::default(),
            client_name: format!("switchboard-rs/{}", env!("CARGO_PKG_VERSION")),
            max_frame_bytes: MAX_FRAME_CEILING,
            connect_timeout: Duration::from_secs(10),
            connector: None,
            auto_delivery_receipts: true,
            send_rate_limit_retries: 3,
        }
    }

    /// A static token (a JWT whose `sub` is the user id). If the broker rejects it on a
    /// reconnect, the client stops with [`Event::Closed`](crate::Event::Closed).
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = TokenSource::Static(Arc::new(std::sync::Mutex::new(token.into())));
        self
    }

    /// An async callback asked for a fresh token before every connection attempt, for
    /// long-lived services whose tokens expire. A rejected token is then not permanent: the
    /// client backs off and asks again. Replaces [`token`](Self::token).
    pub fn token_provider<F, Fut, E>(mut self, provider: F) -> Self
    where
        F: Fn() -> Fut + std::marker::Send + Sync + 'static,
        Fut: Future<Output = Result<String, E>> + std::marker::Send + 'static,
        E: Into<BoxError>,
    {
        let provider: TokenProvider =
            Arc::new(move || provider().map(|r| r.map_err(Into::into)).boxed());
        self.token = TokenSource::Provider(provider);
        self
    }

    /// Resume from a position saved from [`Client::position`] earlier: only what happened
    /// after it is delivered. Without it the client starts from scratch and receives every
    /// conversation's readable log.
    pub fn resume_from(mut self, position: SyncPosition) -> Self {
        self.resume = position;
        self
    }

    /// The reconnect policy (default: reconnect with 200 ms .. 30 s full-jitter backoff).
    pub fn reconnect(mut self, policy: ReconnectPolicy) -> Self {
        self.reconnect = policy;
        self
    }

    /// The client name sent in Hello (default `switchboard-rs/<version>`).
    pub fn client_name(mut self, name: impl Into<String>) -> Self {
        self.client_name = name.into();
        self
    }

    /// The largest frame accepted from the broker, in bytes. The default, 16 MiB, is the
    /// largest frame limit a broker can be configured with, so replies sized to the broker's
    /// own limit always decode. Outgoing frames are checked against the broker's announced
    /// limit.
    pub fn max_frame_bytes(mut self, max: usize) -> Self {
        self.max_frame_bytes = max;
        self
    }

    /// How long one attempt (token provider, connect and handshake) may take (default 10 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Whether the client acknowledges delivery on its own (default `true`): for every
    /// conversation whose messages it hands to the application it sends `MarkDelivered` with
    /// the highest seq emitted, at most once per 500 ms per conversation, only while connected
    /// (receipts still pending are sent after the reconnect), never for a seq already
    /// acknowledged. Messages the application cannot receive (its [`EventStream`] was dropped)
    /// are not acknowledged. Replies are consumed internally; failures are logged and ignored.
    pub fn auto_delivery_receipts(mut self, enabled: bool) -> Self {
        self.auto_delivery_receipts = enabled;
        self
    }

    /// How often [`Client::send`] and [`Client::send_with_id`] retry a message the broker
    /// rejected with `RATE_LIMITED` (default 3; 0 returns the error at once). Each retry waits
    /// the broker's `retry_after_ms` (at least 50 ms) and reuses the `client_msg_id`.
    pub fn send_rate_limit_retries(mut self, retries: u32) -> Self {
        self.send_rate_limit_retries = retries;
        self
    }

    /// Other nodes of the same cluster (`host:port` each). Each connection attempt starts at
    /// the next address in turn and tries them all, each for its share of the connect
    /// timeout; so when a node dies, hangs or is cut off, its clients reconnect to another and
    /// resume there (any node serves any conversation).
    pub fn cluster_addrs(mut self, addrs: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.more_addrs = addrs.into_iter().map(Into::into).collect();
        self
    }

    /// Opens connections with `connect` instead of TCP to the builder's address: for TLS,
    /// proxies, Unix sockets or in-memory tests. Called once per connection attempt.
    pub fn connector<F, Fut, S>(mut self, connect: F) -> Self
    where
        F: Fn() -> Fut + std::marker::Send + Sync + 'static,
        Fut: Future<Output = io::Result<S>> + std::marker::Send + 'static,
        S: AsyncRead + AsyncWrite + std::marker::Send + Unpin + 'static,
    {
        let connector: Connector =
            Arc::new(move || connect().map(|r| r.map(|s| Box::new(s) as BoxTransport)).boxed());
        self.connector = Some(connector);
        self
    }

    /// Connects and authenticates, then hands the connection to a background task that keeps
    /// it alive, syncs and reconnects.
    ///
    /// Must be called within a Tokio runtime.
    ///
    /// # Errors
    /// Any failure of this first attempt (no retry): [`Error::Io`], [`Error::Timeout`],
    /// [`Error::Server`] (e.g. `UNAUTHENTICATED`), [`Error::Protocol`],
    /// [`Error::TokenProvider`].
    pub async fn connect(self) -> Result<(Client, EventStream)> {
        let per_addr = self.connect_timeout / u32::try_from(1 + self.more_addrs.len()).unwrap_or(1);
        let mut addrs = vec![self.addr];
        addrs.extend(self.more_addrs);
        let connector = self.connector.unwrap_or_else(|| tcp_connector(addrs, per_addr));
        let static_token = match &self.token {
            TokenSource::Static(t) => Some(Arc::clone(t)),
            TokenSource::Provider(_) => None,
        };
        let cfg = Arc::new(Config {
            connector,
            token: self.token,
            reconnect: self.reconnect,
            client_name: self.client_name,
            max_frame_bytes: self.max_frame_bytes,
            connect_timeout: self.connect_timeout,
            auto_delivery_receipts: self.auto_delivery_receipts,
        });
        let hello_id = 1;
        let session = handshake::establish(Arc::clone(&cfg), self.resume.clone(), hello_id, None)
            .await
            .map_err(|e| match e {
                ConnectError::Permanent(e) | ConnectError::Transient { error: e, .. } => e,
            })?;
        let user_id = session.welcome.user_id.clone();
        let state = Arc::new(Mutex::new(SyncState::new(self.resume, DEFAULT_BUFFER_LIMIT)));
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (event_tx, event_rx) = mpsc::unbounded_channel();
        let max_presence_users = Arc::new(AtomicU32::new(DEFAULT_MAX_PRESENCE_USERS));
        let driver = Driver::new(
            cfg,
            cmd_rx,
            event_tx,
            Arc::clone(&state),
            Arc::clone(&max_presence_users),
            user_id.clone(),
            hello_id + 1,
        );
        tokio::spawn(driver.run(session));
        let client = Client::new(crate::Inner {
            cmds: cmd_tx,
            state,
            max_presence_users,
            user_id,
            send_rate_limit_retries: self.send_rate_limit_retries,
            static_token,
        });
        Ok((client, EventStream::new(event_rx)))
    }
}

/// TCP to the first of `addrs` that accepts, starting one further on every attempt: a node
/// that accepts connections but never completes the handshake (paused, overloaded) is then
/// left behind by the next attempt instead of being retried forever.
fn tcp_connector(addrs: Vec<String>, per_addr: Duration) -> Connector {
    let addrs: Arc<[String]> = addrs.into();
    let attempts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    Arc::new(move || {
        let (addrs, attempts) = (Arc::clone(&addrs), Arc::clone(&attempts));
        async move {
            let start = attempts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut error = io::Error::new(io::ErrorKind::InvalidInput, "no address");
            for i in (0..addrs.len()).map(|k| (start + k) % addrs.len()) {
                let attempt = tokio::time::timeout(per_addr, TcpStream::connect(&addrs[i])).await;
                match attempt {
                    Ok(Ok(stream)) => {
                        stream.set_nodelay(true)?;
                        return Ok(Box::new(stream) as BoxTransport);
                    }
                    Ok(Err(e)) => error = e,
                    Err(_) => error = io::Error::new(io::ErrorKind::TimedOut, "connect timed out"),
                }
            }
            Err(error)
        }
        .boxed()
    })
}
