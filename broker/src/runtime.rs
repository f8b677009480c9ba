//! Builds the broker and owns its lifecycle: storage, the writer thread, one thread per shard
//! with its listener, the ready line, and the graceful shutdown.
//!
//! Shutdown (SIGINT/SIGTERM, or [`BrokerHandle::shutdown`]): every shard stops accepting, tells
//! each client `Disconnect{shutdown}` and closes it after flushing, hands its open batch to the
//! writer and reports once no write of its is in flight. Then the writer commits what is left
//! and fsyncs, the shards exit, and `run` returns. The whole sequence is bounded by
//! `server.shutdown_timeout_ms`; the final fsync happens even if the bound is hit.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::auth::Authenticator;
use crate::config::Config;
use crate::shard::{MAILBOX_CAPACITY, Shard, ShardMsg, ShardSetup};
use crate::storage::{self, Storage};

/// A start-up failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The database could not be opened.
    #[error("cannot open storage: {0}")]
    Storage(#[from] storage::StorageError),
    /// Key material is missing or invalid.
    #[error("cannot load token keys: {0}")]
    Keys(#[from] crate::auth::KeyError),
    /// The cluster identity in the data directory is unusable.
    #[error(transparent)]
    Identity(#[from] crate::cluster::membership::IdentityError),
    /// The control plane could not start.
    #[error(transparent)]
    Control(#[from] crate::cluster::control::ControlError),
    /// A listener could not be bound, or a thread could not start.
    #[error("cannot start: {0}")]
    Io(#[from] std::io::Error),
}

/// How the broker stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// A signal or a handle asked it to stop, and it drained.
    Clean,
    /// Storage failed; acknowledged data is safe but the broker could not go on.
    StorageFailure,
}

/// How long a broker whose storage failed keeps answering `/readyz` (503, with the reason)
/// before it shuts down.
const FAIL_STOP_LINGER: Duration = Duration::from_secs(2);

/// What a started broker is listening on.
#[derive(Debug, Clone)]
pub struct Bound {
    /// The binary protocol listener.
    pub tcp: SocketAddr,
    /// The HTTP listener (WebSocket, metrics, demo).
    pub http: SocketAddr,
    /// Number of shards.
    pub shards: usize,
    /// The cluster identity and gossip address, when clustering is on.
    pub cluster: Option<ClusterBound>,
}

/// A clustered broker's identity.
#[derive(Debug, Clone, Copy)]
pub struct ClusterBound {
    /// The node id.
    pub node: crate::cluster::NodeId,
    /// This start's generation.
    pub generation: u64,
    /// The gossip address peers use.
    pub gossip: SocketAddr,
}

/// Lets another thread stop a running broker.
#[derive(Debug, Clone)]
pub struct BrokerHandle {
    stop: Arc<tokio::sync::Notify>,
}

impl BrokerHandle {
    /// Starts a graceful shutdown.
    pub fn shutdown(&self) {
        self.stop.notify_one();
    }
}

fn bind_reuseport(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Binds one listener per shard on the same port: shard 0 binds (an ephemeral port when 0),
/// the others reuse its port with `SO_REUSEPORT`, so the kernel spreads connections.
fn bind_all(
    addr: SocketAddr,
    shards: usize,
) -> std::io::Result<(SocketAddr, Vec<std::net::TcpListener>)> {
    let first = bind_reuseport(addr)?;
    let bound = first.local_addr()?;
    let mut all = vec![first];
    for _ in 1..shards {
        all.push(bind_reuseport(bound)?);
    }
    Ok((bound, all))
}

/// Every connection is a file descriptor: raises this process's limit as far as allowed (the
/// hard limit too, up to 2^20, when privileged; else the soft limit up to the hard one) and
/// returns the soft limit now in force. Never lowers either limit.
fn raise_nofile_limit() -> u64 {
    const WANT: u64 = 1 << 20;
    if let Ok((_, hard)) = rlimit::getrlimit(rlimit::Resource::NOFILE)
        && hard < WANT
    {
        // Raising a hard limit needs privilege; without it this fails and changes nothing.
        let _ = rlimit::setrlimit(rlimit::Resource::NOFILE, WANT, WANT);
    }
    rlimit::increase_nofile_limit(WANT).unwrap_or(0)
}

/// Runs the broker until a signal arrives or storage fails. Prints the ready line on stdout.
///
/// # Errors
/// When the broker cannot start.
pub fn run(config: Config) -> Result<Exit, StartError> {
    let stop = Arc::new(tokio::sync::Notify::new());
    run_with(config, &BrokerHandle { stop: stop.clone() }, |bound| {
        let line = serde_json::json!({
            "event": "ready",
            "tcp": bound.tcp.to_string(),
            "http": bound.http.to_string(),
            "shards": bound.shards,
            "pid": std::process::id(),
            "node": bound.cluster.map(|c| c.node),
            "generation": bound.cluster.map(|c| c.generation),
            "gossip": bound.cluster.map(|c| c.gossip.to_string()),
        });
        println!("{line}");
        use std::io::Write;
        let _ = std::io::stdout().flush();
    })
}

/// Runs the broker; `on_ready` is called once every listener is bound. Stops on SIGINT,
/// SIGTERM, [`BrokerHandle::shutdown`], or a storage failure.
///
/// # Errors
/// When the broker cannot start.
pub fn run_with(
    config: Config,
    handle: &BrokerHandle,
    on_ready: impl FnOnce(&Bound),
) -> Result<Exit, StartError> {
    config.validate()?;
    let nofile = raise_nofile_limit();
    let shards = config.shard_count();
    let storage = Storage::open(&config.storage)?;
    let auth = Arc::new(Authenticator::from_config(&config.auth, &config.storage.data_dir)?);
    let (bound_tcp, listeners) = bind_all(config.server.listen, shards)?;
    let (bound_http, http_listeners) = bind_all(config.http.listen, shards)?;
    let metrics = crate::metrics::install();
    let (writer, writer_join) = storage::writer::spawn(storage.clone())?;
    let (txs, rxs): (Vec<_>, Vec<_>) = (0..shards).map(|_| mpsc::channel(MAILBOX_CAPACITY)).unzip();
    let membership = match config.cluster.listen {
        Some(listen) => {
            // One port for gossip (UDP) and peer RPCs (TCP): the TCP side is held from here on.
            let peer_listener = crate::cluster::membership::bind_cluster_port(listen)
                .map_err(crate::cluster::control::ControlError::Io)?;
            let listen =
                peer_listener.local_addr().map_err(crate::cluster::control::ControlError::Io)?;
            let identity = crate::cluster::membership::Identity::load(
                &config.storage.data_dir,
                config.cluster.node_id,
            )?;
            let advertise =
                crate::cluster::membership::Advertise { tcp: bound_tcp, http: bound_http, shards };
            let m = crate::cluster::membership::Membership::start(
                &config.cluster,
                listen,
                identity,
                advertise,
            )?;
            let partitions = Arc::new(crate::cluster::dataplane::Partitions::default());
            let (proposer, proposals) = crate::cluster::dataplane::proposals();
            let data = crate::cluster::dataplane::DataPlane {
                storage: storage.clone(),
                writer: writer.clone(),
                shards: txs.clone(),
                partitions: partitions.clone(),
            };
            let control = crate::cluster::control::ControlPlane::start(
                &config.cluster,
                &config.storage.data_dir,
                identity.node,
                peer_listener,
                m.view(),
                m.announce(),
                Some((data, proposals)),
            )?;
            let bind = m.listen_addr().ip();
            Some((m, identity, control, crate::shard::Routing { partitions, proposer, bind }))
        }
        None => None,
    };
    let cluster_bound = membership.as_ref().map(|(m, id, _, _)| ClusterBound {
        node: id.node,
        generation: id.generation,
        gossip: m.gossip_addr(),
    });
    let cluster_view =
        membership.as_ref().map(|(m, _, control, routing)| crate::shard::ClusterView {
            gossip: m.view(),
            control: control.view(),
            replication: control.replication(),
            routing: routing.clone(),
        });
    let dev_minter = match config.dev_tokens() {
        Ok(()) => {
            tracing::info!(
                "development tokens enabled at POST /dev/token (loopback listeners, generated secret)"
            );
            Some(crate::auth::Minter::from_config(&config.auth, &config.storage.data_dir, None)?)
        }
        Err(why) => {
            tracing::info!(reason = why, "development tokens disabled");
            None
        }
    };
    let limiters = Arc::new(crate::ratelimit::Limiters::new(&config.limits));
    let webhook = crate::push::Webhook::from_config(&config.push)
        .map_err(|e| StartError::Io(std::io::Error::other(format!("push webhook: {e}"))))?;
    let config = Arc::new(config);

    let mut joins: Vec<JoinHandle<()>> = Vec::with_capacity(shards);
    for (id, ((rx, listener), http)) in
        rxs.into_iter().zip(listeners).zip(http_listeners).enumerate()
    {
        let setup = ShardSetup {
            id,
            config: config.clone(),
            storage: storage.clone(),
            writer: writer.clone(),
            auth: auth.clone(),
            mailboxes: txs.clone(),
            limiters: limiters.clone(),
            webhook: webhook.clone(),
            metrics: metrics.clone(),
            dev_minter: dev_minter.clone(),
            cluster: cluster_view.clone(),
        };
        joins.push(
            std::thread::Builder::new()
                .name(format!("sb-shard-{id}"))
                .spawn(move || shard_thread(setup, rx, listener, http))?,
        );
    }

    tracing::info!(tcp = %bound_tcp, http = %bound_http, shards, nofile, durability = %config.storage.durability, "broker ready");
    crate::net::admin::mark_started();
    on_ready(&Bound { tcp: bound_tcp, http: bound_http, shards, cluster: cluster_bound });

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let exit = rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut housekeeping = tokio::time::interval(Duration::from_secs(60));
        // Histogram samples pile up in the recorder until drained: without this a broker that
        // nobody scrapes grows by 8 bytes per acknowledged message.
        let mut upkeep = tokio::time::interval(crate::metrics::UPKEEP_EVERY);
        // Free space against storage.min_free_mb, often enough that a burst of writes cannot
        // run the disk from the floor to empty between two looks.
        let mut space = tokio::time::interval(Duration::from_secs(1));
        // File-system calls can hang on a sick mount: never on this thread (it also answers
        // signals and the storage failure), and one of each kind at a time.
        let (mut measuring, mut checking) = (None, None);
        let exit = loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break Exit::Clean,
                _ = term.recv() => break Exit::Clean,
                () = handle.stop.notified() => break Exit::Clean,
                () = storage.fatal() => break Exit::StorageFailure,
                _ = housekeeping.tick() => limiters.forget_idle(),
                _ = upkeep.tick() => {
                    if let Some(m) = &metrics {
                        m.run_upkeep();
                    }
                    let s = storage.clone();
                    one_at_a_time(&mut measuring, move || {
                        if let Some(used) = s.disk_space() {
                            #[allow(clippy::cast_precision_loss)]
                            metrics::gauge!(crate::metrics::STORAGE_BYTES).set(used as f64);
                        }
                    });
                }
                _ = space.tick() => {
                    let s = storage.clone();
                    one_at_a_time(&mut checking, move || {
                        if let Err(e) = s.sync_fsynced_record() {
                            tracing::warn!(error = %e, "cannot record the fsynced commit");
                        }
                        if let Some(free) = s.check_space() {
                            #[allow(clippy::cast_precision_loss)]
                            metrics::gauge!(crate::metrics::STORAGE_FREE_BYTES).set(free as f64);
                        }
                    });
                }
            }
        };
        if exit == Exit::StorageFailure {
            let why = storage.failure().unwrap_or_default();
            tracing::error!(
                reason = %why,
                "storage failed: stopping (fail-stop). Acknowledged messages are safe; the failed batch was not acknowledged. Restart to recover from the journal once the disk is healthy."
            );
            // /readyz reports the failure (and refuses traffic) for a moment before the
            // listeners close, so probes and operators see why the node went away.
            tokio::time::sleep(FAIL_STOP_LINGER).await;
        }
        tracing::info!("shutting down");
        let control = match membership {
            Some((m, _, control, _)) => {
                // Peers stop routing here at once instead of after failure detection (three
                // gossip rounds); Raft and replication stop once the shards drained, so the
                // writes in flight still commit or fail.
                tokio::task::spawn_blocking(move || m.leave()).await.ok();
                Some(control)
            }
            None => None,
        };
        let budget = Duration::from_millis(config.server.shutdown_timeout_ms);
        let mut drained = Vec::new();
        for tx in &txs {
            let (done, rx) = oneshot::channel();
            if tx.send(ShardMsg::Shutdown(done)).await.is_ok() {
                drained.push(rx);
            }
        }
        // Leave room in the budget for the final fsync.
        let wait = budget.saturating_sub(Duration::from_millis(500));
        let deadline = tokio::time::Instant::now() + wait;
        if tokio::time::timeout_at(deadline, futures::future::join_all(drained)).await.is_err() {
            tracing::warn!("shards did not drain in time; stopping anyway");
        }
        // Home-shard state changed by messages that were still in flight when a shard drained
        // (a push queued for a message committed just before) is written now.
        let mut flushed = Vec::new();
        for tx in &txs {
            let (done, rx) = oneshot::channel();
            if tx.send(ShardMsg::FinalFlush(done)).await.is_ok() {
                flushed.push(rx);
            }
        }
        if tokio::time::timeout_at(deadline, futures::future::join_all(flushed)).await.is_err() {
            tracing::warn!("final flush did not finish in time");
        }
        if let Some(control) = control {
            tokio::task::spawn_blocking(move || control.stop()).await.ok();
        }
        Ok::<_, std::io::Error>(exit)
    })?;
    writer.shutdown();
    if let Err(e) = storage.sync_fsynced_record() {
        tracing::warn!(error = %e, "cannot record the fsynced commit");
    }
    for tx in &txs {
        // Blocking: a shard whose mailbox is full still gets told to leave.
        let _ = tx.blocking_send(ShardMsg::Exit);
    }
    for j in joins {
        let _ = j.join();
    }
    let _ = writer_join.join();
    tracing::info!("stopped");
    Ok(exit)
}

fn shard_thread(
    setup: ShardSetup,
    rx: mpsc::Receiver<ShardMsg>,
    listener: std::net::TcpListener,
    http: std::net::TcpListener,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(8)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start shard runtime");
            return;
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let shard: Rc<Shard> = Shard::new(setup);
        match tokio::net::TcpListener::from_std(listener) {
            Ok(listener) => {
                tokio::task::spawn_local(crate::net::tcp::accept_loop(shard.clone(), listener));
            }
            Err(e) => tracing::error!(error = %e, "cannot register listener"),
        }
        match tokio::net::TcpListener::from_std(http) {
            Ok(listener) => {
                tokio::task::spawn_local(crate::net::http::accept_loop(shard.clone(), listener));
            }
            Err(e) => tracing::error!(error = %e, "cannot register http listener"),
        }
        tokio::task::spawn_local(shard.clone().run_ticks());
        shard.run(rx).await;
    });
}

/// Runs `f` on the blocking pool unless the previous run kept in `running` is still going (a
/// call stuck on a sick mount is not joined by more of its kind).
fn one_at_a_time(
    running: &mut Option<tokio::task::JoinHandle<()>>,
    f: impl FnOnce() + Send + 'static,
) {
    if running.as_ref().is_none_or(tokio::task::JoinHandle::is_finished) {
        *running = Some(tokio::task::spawn_blocking(f));
    }
}
