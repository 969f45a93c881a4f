//! Serving the wire contract: frames in, one [`Handler`] call per frame, responses out on
//! the same stream in completion order.
//!
//! The same loop serves a QUIC bidirectional stream and a plain TCP connection. Requests on
//! one stream are handled concurrently (pipelining) up to `Limits::max_in_flight_per_stream`,
//! and on one connection up to `Limits::max_in_flight_per_connection`. Beyond those bounds
//! a handler that sheds ([`Handler::SHEDS`]) gets the frame through [`Handler::shed`] (the
//! switch answers 91 at once unless it is a retransmission) and the loop reads on, so an
//! overloaded switch answers quickly instead of letting requests wait in socket buffers;
//! shed frames in progress are bounded by the stream's bound again, and past that, or with
//! a handler that does not shed, the loop stops reading and transport flow control pushes
//! back on the peer.
//! A **gateway** — a client certificate, or an IP address where gateways present none —
//! has its own bounds over all its connections to a listener:
//! `Limits::max_in_flight_per_gateway` requests in progress and, when set,
//! `Limits::max_rate_per_gateway` requests a second (a token bucket with a second's
//! burst); beyond them its frames are shed (or, without shedding, wait) like beyond a
//! connection's bound, so one gateway's burst cannot take the places the others need.
//! A frame that cannot be answered ends only its own stream (QUIC: reset with an
//! application error code; TCP: the connection, which is the stream).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use payswitch_protocol::Message;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::codes;
use crate::framed::{FrameReader, ReadError};

/// What to do with one received frame.
// `Close` is rare and small; boxing the message would cost an allocation per response.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Reply {
    /// Send this message back.
    Message(Message),
    /// The frame cannot be answered: end the stream with this application error code.
    Close(u32),
}

/// Handles one frame (a message without its header) and says what to answer.
pub trait Handler: Send + Sync + 'static {
    /// Handle `frame`. This is called in the order the stream's frames are read, and the
    /// future it returns then runs concurrently with the stream's other requests (on the
    /// stream's own task or a task of its own): work done before the future is returned
    /// (enqueueing to a card's shard, say) keeps the stream's order; work inside it may
    /// complete in any order. The future runs to its end even if the stream fails
    /// meanwhile.
    fn handle(self: Arc<Self>, frame: Bytes) -> impl Future<Output = Reply> + Send + 'static;

    /// Whether frames beyond the in-flight bounds are answered by [`Handler::shed`]
    /// (`true`) or left unread until a request in progress completes (`false`).
    const SHEDS: bool = false;

    /// The quick answer to `frame`, read while the stream or connection is at its
    /// in-flight bound: without doing the request. Called only when [`Handler::SHEDS`].
    fn shed(self: Arc<Self>, frame: Bytes) -> impl Future<Output = Reply> + Send + 'static {
        let _ = frame;
        async { Reply::Close(codes::INTERNAL) }
    }
}

/// Bounds of a server.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest frame accepted; a bigger header ends the stream.
    pub max_frame: usize,
    /// Requests one stream may have in progress before the server stops reading it.
    pub max_in_flight_per_stream: usize,
    /// Requests one connection may have in progress over all its streams.
    pub max_in_flight_per_connection: usize,
    /// Open connections (QUIC and TCP each); more are refused.
    pub max_connections: usize,
    /// Open connections from one IP address (QUIC and TCP each), so one peer opening
    /// connections it never uses cannot take every place and lock other gateways out.
    pub max_connections_per_peer: usize,
    /// A TCP connection with nothing in progress that completes no frame for this long is
    /// closed: an idle peer gives its place back. QUIC has its transport's idle timeout
    /// and keep-alives instead, and quiet streams stay open.
    pub idle_timeout: Duration,
    /// A frame begun must be finished, and answers written must be taken by the peer,
    /// within this: a peer that sends half a frame, or stops reading, loses the stream
    /// (QUIC: reset with `STALLED`; TCP: the connection) however busy its other streams
    /// keep the connection.
    pub stall_timeout: Duration,
    /// Requests one gateway may have in progress over all its connections to a listener.
    pub max_in_flight_per_gateway: usize,
    /// Requests a second one gateway may start (a second's worth as a burst); 0: no rate
    /// bound.
    pub max_rate_per_gateway: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame: payswitch_protocol::DEFAULT_MAX_FRAME,
            // A gateway pipelining more than this on one stream is better served by more
            // streams; 256 keeps one stream's pending responses to a few tens of KiB.
            max_in_flight_per_stream: 256,
            // A connection's share is the same whether its gateway pipelines on one
            // stream or opens a stream per request. It is also the overload latency
            // budget: an admitted request waits behind at most this many others, so at
            // 3x overload 512 gave a gateway p99 of 0.7-1.5 s on the 2-core VM and 256
            // 0.3-1.0 s at the same goodput (bench/RESULTS.md). The cost: a connection
            // sheds once rate x acquirer latency passes it (850 TPS at 300 ms), so a
            // busier gateway opens more connections. Far below QUIC's 4096 streams, so a
            // gateway meets this bound (and a quick 91) before flow control.
            max_in_flight_per_connection: 256,
            // Gateways hold few long-lived connections; 1024 bounds per-connection state
            // (buffers, QUIC state of a few KiB each) to a few tens of MiB.
            max_connections: 1024,
            // A gateway behind one address holds a handful of connections; a quarter of
            // the places leaves three quarters to everyone else whatever one peer does.
            max_connections_per_peer: 256,
            // Gateways that keep a TCP connection open across quiet hours send a network
            // echo (0800) every minute or so; twice that tells a live one from a dead one.
            idle_timeout: Duration::from_secs(120),
            // A frame is a few hundred bytes: on any working network it arrives within
            // milliseconds of its first byte, and a gateway takes its answers as fast.
            stall_timeout: Duration::from_secs(10),
            // Eight connections' worth: a gateway that needs more is one to talk to, and
            // no one gateway can hold every place of a busy switch.
            max_in_flight_per_gateway: 2_048,
            // Gateways' contracted rates differ; bounding them is the operator's choice.
            max_rate_per_gateway: 0,
        }
    }
}

/// Counters of a server, shared with whoever reports them.
#[derive(Debug, Default)]
pub struct ServeStats {
    /// Connections accepted (QUIC and TCP).
    pub connections: AtomicU64,
    /// Connections refused at the limit (all connections, or one peer's).
    pub connections_refused: AtomicU64,
    /// Handshakes that failed or timed out: no client certificate, one the CA did not
    /// issue or not on the allowlist, or a peer that stalled.
    pub handshakes_failed: AtomicU64,
    /// Streams served (a TCP connection counts as one).
    pub streams: AtomicU64,
    /// Frames handed to the handler.
    pub frames: AtomicU64,
    /// Streams ended because of a frame that could not be answered.
    pub streams_aborted: AtomicU64,
    /// TCP connections closed after `Limits::idle_timeout` without a frame, and streams
    /// (TCP connections, QUIC streams) closed after `Limits::stall_timeout` with a frame
    /// begun or answers not taken.
    pub idle_closed: AtomicU64,
    /// Frames answered by [`Handler::shed`] because a stream or connection was at its
    /// in-flight bound.
    pub shed: AtomicU64,
    /// Among `shed`, frames of a gateway at its own in-flight bound or rate.
    pub gateway_shed: AtomicU64,
}

/// How a stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// The peer finished and every response was written.
    Finished,
    /// End the stream with this application error code.
    Abort(u32),
    /// The transport failed; nothing more can be written.
    Failed,
    /// The peer idled past the idle timeout, or stalled past the stall timeout.
    Stalled,
}

/// How long a TLS handshake may take (QUIC or TCP) before the connection is dropped: a
/// peer that stalls mid-handshake holds a connection place no longer than this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections open per peer address, bounded by `Limits::max_connections_per_peer`.
#[derive(Debug, Default)]
struct PerPeer {
    open: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
}

/// A peer's place, given back when dropped.
struct PeerPlace {
    peers: Arc<PerPeer>,
    ip: std::net::IpAddr,
}

impl PerPeer {
    /// A place for one more connection from `ip`, or `None` at `max`. The map holds only
    /// addresses with connections open, so it is bounded by `max_connections`.
    fn take(self: &Arc<Self>, ip: std::net::IpAddr, max: usize) -> Option<PeerPlace> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(ip).or_insert(0);
        if *count >= max {
            if *count == 0 {
                open.remove(&ip);
            }
            return None;
        }
        *count += 1;
        Some(PeerPlace {
            peers: Arc::clone(self),
            ip,
        })
    }
}

impl Drop for PeerPlace {
    fn drop(&mut self) {
        let mut open = self.peers.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// The gateways connected to one listener, by identity: an entry lives while one of its
/// connections is open, so the map is bounded by `Limits::max_connections`.
#[derive(Default)]
struct Gateways {
    /// Each gateway with its connections open.
    open: std::sync::Mutex<std::collections::HashMap<String, (Arc<Gateway>, usize)>>,
}

/// One gateway's share: its requests in progress and its rate.
pub struct Gateway {
    in_flight: Arc<Semaphore>,
    /// Tokens and when they were counted; `None` without a rate bound.
    bucket: Option<std::sync::Mutex<(f64, tokio::time::Instant)>>,
    rate: u32,
}

impl Gateway {
    /// Takes one request's token: `false` when the gateway is over its rate.
    fn take_token(&self) -> bool {
        let Some(bucket) = &self.bucket else {
            return true;
        };
        let rate = f64::from(self.rate);
        let mut bucket = bucket.lock().unwrap_or_else(|e| e.into_inner());
        let now = tokio::time::Instant::now();
        let (tokens, at) = *bucket;
        let tokens = (tokens + now.duration_since(at).as_secs_f64() * rate).min(rate);
        if tokens >= 1.0 {
            *bucket = (tokens - 1.0, now);
            true
        } else {
            *bucket = (tokens, now);
            false
        }
    }
}

/// A connection's membership of its gateway, given back when dropped.
struct GatewayPlace {
    gateways: Arc<Gateways>,
    key: String,
    gateway: Arc<Gateway>,
}

impl Gateways {
    fn join(self: &Arc<Self>, key: String, limits: &Limits) -> GatewayPlace {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let (gateway, connections) = open.entry(key.clone()).or_insert_with(|| {
            let rate = limits.max_rate_per_gateway;
            let gateway = Arc::new(Gateway {
                in_flight: Arc::new(Semaphore::new(limits.max_in_flight_per_gateway)),
                bucket: (rate > 0)
                    .then(|| std::sync::Mutex::new((f64::from(rate), tokio::time::Instant::now()))),
                rate,
            });
            (gateway, 0)
        });
        *connections += 1;
        let gateway = Arc::clone(gateway);
        GatewayPlace {
            gateways: Arc::clone(self),
            key,
            gateway,
        }
    }
}

impl Drop for GatewayPlace {
    fn drop(&mut self) {
        let mut open = self.gateways.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, connections)) = open.get_mut(&self.key) {
            *connections -= 1;
            if *connections == 0 {
                // Requests still draining keep their own reference.
                open.remove(&self.key);
            }
        }
    }
}

/// Who a connection's gateway is: its client certificate when it presented one (a hash of
/// the leaf), else its IP address.
fn gateway_key(certificate: Option<&[u8]>, ip: std::net::IpAddr) -> String {
    match certificate {
        Some(der) => {
            use std::hash::{Hash, Hasher};
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            der.hash(&mut hasher);
            format!("cert:{:016x}", hasher.finish())
        }
        None => format!("ip:{ip}"),
    }
}

/// The places a stream's requests take beside the stream's own: its connection's and its
/// gateway's.
pub struct Places {
    connection: Arc<Semaphore>,
    gateway: Arc<Gateway>,
}

/// How long a shutting-down server waits for requests in progress to be answered before
/// it closes what is left. Longer than a typical acquirer timeout (2 s), so a request
/// waiting on an acquirer still gets its answer.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// One stream's bounds.
#[derive(Debug, Clone, Copy)]
pub struct StreamBounds {
    /// Requests in progress before the stream is shed or no longer read.
    pub max_in_flight: usize,
    /// Nothing in progress and no frame for this long ends the stream; `None`: no bound.
    pub idle_timeout: Option<Duration>,
    /// Longest wait for the peer to take a write of answers.
    pub stall_timeout: Duration,
}

/// A request in progress and whether it holds places (admitted) or was shed.
type Running = (Reply, bool);

/// A request polled by its stream's own task, boxed so one slot holds either kind.
type InlineRequest = Pin<Box<dyn Future<Output = Running> + Send + 'static>>;

/// Starts a request: on the stream's own task when its slot is free — a stream with one
/// request at a time (a gateway opening a stream per request) then costs no task of its
/// own — else on a task of its own, so a pipelined stream's requests run on every core.
fn start<F>(request: F, inline: &mut Option<InlineRequest>, tasks: &mut JoinSet<Running>)
where
    F: Future<Output = Running> + Send + 'static,
{
    if inline.is_none() {
        *inline = Some(Box::pin(request));
    } else {
        tasks.spawn(request);
    }
}

/// Serves one stream until the peer finishes it, it fails, a frame cannot be answered, or
/// `shutdown` fires. Responses still in progress when reading stops are written before
/// returning, so a shutdown drains the stream instead of dropping its requests. Requests
/// still in progress when the stream fails run on to their end on tasks of their own.
pub async fn serve_stream<R, W, H>(
    reader: &mut FrameReader<R>,
    writer: &mut W,
    handler: &Arc<H>,
    bounds: StreamBounds,
    places_of: &Places,
    stats: &ServeStats,
    shutdown: &CancellationToken,
) -> StreamEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    H: Handler,
{
    let StreamBounds {
        max_in_flight,
        idle_timeout,
        stall_timeout,
    } = bounds;
    // The first request in progress is polled here; the others each have a task.
    let mut inline: Option<InlineRequest> = None;
    let mut tasks: JoinSet<Running> = JoinSet::new();
    // Admitted requests in progress (each holds a place of the connection's and of its
    // gateway's too), and all requests in progress: shed ones hold no place, and all
    // together are at most twice the stream's bound.
    let mut admitted = 0usize;
    let mut in_progress = 0usize;
    let max_in_progress = if H::SHEDS {
        2 * max_in_flight
    } else {
        max_in_flight
    };
    let mut out = BytesMut::new();
    let mut reading = true;
    let mut end = StreamEnd::Finished;
    let cancelled = shutdown.cancelled();
    tokio::pin!(cancelled);
    // A stream with nothing in progress and no frame for `idle_for` is closed. The timer
    // is set once and, when it fires early (a frame came meanwhile), set again for the
    // rest: resetting it on every frame would cost a timer-wheel update per request.
    // Without a timeout the branch is disabled and a year keeps the arithmetic safe.
    let idle_for = idle_timeout.unwrap_or(Duration::from_secs(365 * 86_400));
    let mut idle_since = tokio::time::Instant::now();
    let idle = tokio::time::sleep_until(idle_since + idle_for);
    tokio::pin!(idle);
    let end = loop {
        // In this order: answers first (they give places back), then frames, then the
        // idle timer — which a stream whose frame is already there then never arms.
        tokio::select! {
            biased;
            _ = &mut cancelled, if reading => reading = false,
            done = std::future::poll_fn(|cx| match inline.as_mut() {
                // A handler that panics ends its request and stream, not the stream's
                // other requests: as it would on a task of its own.
                Some(request) => match std::panic::catch_unwind(std::panic::AssertUnwindSafe(
                    || request.as_mut().poll(cx),
                )) {
                    Ok(poll) => poll.map(Some),
                    Err(_) => std::task::Poll::Ready(None),
                },
                None => std::task::Poll::Pending,
            }), if inline.is_some() => {
                inline = None;
                if let Some(failed) = answer(
                    done, &mut tasks, &mut out, (writer, stall_timeout, stats),
                    (&mut admitted, &mut in_progress), (&mut reading, &mut end),
                ).await {
                    break failed;
                }
                idle_since = tokio::time::Instant::now();
            }
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if let Some(failed) = answer(
                    done.ok(), &mut tasks, &mut out, (writer, stall_timeout, stats),
                    (&mut admitted, &mut in_progress), (&mut reading, &mut end),
                ).await {
                    break failed;
                }
                idle_since = tokio::time::Instant::now();
            }
            frame = reader.next_frame(), if reading && in_progress < max_in_progress => {
                match frame {
                    Ok(Some(frame)) => {
                        idle_since = tokio::time::Instant::now();
                        stats.frames.fetch_add(1, Ordering::Relaxed);
                        let connection = &places_of.connection;
                        let gateway = &places_of.gateway;
                        let mut gateway_full = false;
                        let place = (admitted < max_in_flight).then_some(()).and_then(|()| {
                            let conn = Arc::clone(connection).try_acquire_owned().ok()?;
                            let gw = Arc::clone(&gateway.in_flight).try_acquire_owned().ok();
                            gateway_full = gw.is_none() || !gateway.take_token();
                            Some((conn, gw.filter(|_| !gateway_full)?))
                        });
                        let place = match place {
                            Some(place) => Some(place),
                            None if H::SHEDS => {
                                if gateway_full {
                                    stats.gateway_shed.fetch_add(1, Ordering::Relaxed);
                                }
                                None
                            }
                            // Not shedding: wait for places, as flow control would (the
                            // stream's own bound is kept by reading no further frame).
                            None => {
                                let (Ok(conn), Ok(gw)) = (
                                    Arc::clone(connection).acquire_owned().await,
                                    Arc::clone(&gateway.in_flight).acquire_owned().await,
                                ) else {
                                    break StreamEnd::Failed;
                                };
                                while !gateway.take_token() {
                                    tokio::time::sleep(Duration::from_millis(10)).await;
                                }
                                Some((conn, gw))
                            }
                        };
                        in_progress += 1;
                        match place {
                            Some(place) => {
                                admitted += 1;
                                let request = Arc::clone(handler).handle(frame);
                                let request = async move {
                                    let reply = request.await;
                                    drop(place);
                                    (reply, true)
                                };
                                start(request, &mut inline, &mut tasks);
                            }
                            None => {
                                stats.shed.fetch_add(1, Ordering::Relaxed);
                                let request = Arc::clone(handler).shed(frame);
                                start(async move { (request.await, false) }, &mut inline, &mut tasks);
                            }
                        }
                    }
                    Ok(None) => reading = false,
                    Err(ReadError::Frame(_)) => {
                        reading = false;
                        end = StreamEnd::Abort(codes::BAD_FRAME_LENGTH);
                    }
                    Err(ReadError::Stalled(_)) => {
                        stats.idle_closed.fetch_add(1, Ordering::Relaxed);
                        reading = false;
                        end = StreamEnd::Stalled;
                    }
                    Err(ReadError::Truncated(_) | ReadError::Io(_)) => {
                        reading = false;
                        end = StreamEnd::Failed;
                    }
                }
            }
            _ = &mut idle, if reading && in_progress == 0 && idle_timeout.is_some() => {
                if tokio::time::Instant::now() < idle_since + idle_for {
                    idle.as_mut().reset(idle_since + idle_for);
                    continue;
                }
                stats.idle_closed.fetch_add(1, Ordering::Relaxed);
                reading = false;
                end = StreamEnd::Stalled;
            }
            else => break end,
        }
    };
    if matches!(end, StreamEnd::Failed | StreamEnd::Stalled) {
        // Requests in progress still run to their end (a switch journals their outcome);
        // only their answers have nowhere to go.
        tasks.detach_all();
        if let Some(request) = inline.take() {
            tokio::spawn(request);
        }
    }
    if matches!(end, StreamEnd::Abort(_)) {
        stats.streams_aborted.fetch_add(1, Ordering::Relaxed);
    }
    end
}

/// Writes a finished request's answer, with those of any others already finished, and
/// counts them out; returns how the stream ends when it can no longer be written (failed,
/// or the peer took nothing for the stall timeout). A reply that asks to end the stream
/// stops reading it.
async fn answer<W: AsyncWrite + Unpin>(
    done: Option<Running>,
    tasks: &mut JoinSet<Running>,
    out: &mut BytesMut,
    (writer, stall_timeout, stats): (&mut W, Duration, &ServeStats),
    (admitted, in_progress): (&mut usize, &mut usize),
    (reading, end): (&mut bool, &mut StreamEnd),
) -> Option<StreamEnd> {
    out.clear();
    let mut close = None;
    let mut next = Some(done);
    // Batch whatever else is ready into the same write.
    while let Some(done) = next
        .take()
        .or_else(|| tasks.try_join_next().map(Result::ok))
    {
        *in_progress -= 1;
        if let Some((_, true)) = done {
            *admitted -= 1;
        }
        // A request that panicked (`None`) could not be answered: it ends the stream, so
        // what it held no longer matters to the count.
        close = close.or(collect(done.map(|(reply, _)| reply), out));
    }
    if !out.is_empty() {
        match tokio::time::timeout(stall_timeout, writer.write_all(out)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Some(StreamEnd::Failed),
            Err(_) => {
                stats.idle_closed.fetch_add(1, Ordering::Relaxed);
                return Some(StreamEnd::Stalled);
            }
        }
    }
    if let Some(code) = close {
        *reading = false;
        *end = StreamEnd::Abort(code);
    }
    None
}

/// Appends a reply to `out`; returns the close code if the reply asks to end the stream.
fn collect(done: Option<Reply>, out: &mut BytesMut) -> Option<u32> {
    match done {
        Some(Reply::Message(message)) => match message.encode_framed(out) {
            Ok(()) => None,
            Err(_) => Some(codes::INTERNAL),
        },
        Some(Reply::Close(code)) => Some(code),
        // A handler that panicked: its request cannot be answered, the stream can't be
        // trusted to be in order any more.
        None => Some(codes::INTERNAL),
    }
}

/// Accepts QUIC connections on `endpoint` and serves every bidirectional stream until
/// `shutdown` fires.
pub async fn serve_quic<H: Handler>(
    endpoint: quinn::Endpoint,
    handler: Arc<H>,
    limits: Limits,
    stats: Arc<ServeStats>,
    shutdown: CancellationToken,
) {
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let peers = Arc::new(PerPeer::default());
    let gateways = Arc::new(Gateways::default());
    let streams = TaskTracker::new();
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => break,
            incoming = endpoint.accept() => incoming,
        };
        let Some(incoming) = incoming else { break };
        let peer = peers.take(
            incoming.remote_address().ip(),
            limits.max_connections_per_peer,
        );
        let (Some(peer), Ok(permit)) = (peer, Arc::clone(&connections).try_acquire_owned()) else {
            stats.connections_refused.fetch_add(1, Ordering::Relaxed);
            incoming.refuse();
            continue;
        };
        let handler = Arc::clone(&handler);
        let stats = Arc::clone(&stats);
        let shutdown = shutdown.clone();
        let streams = streams.clone();
        let gateways = Arc::clone(&gateways);
        tokio::spawn(async move {
            let _places = (permit, peer);
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await {
                Ok(Ok(connection)) => {
                    stats.connections.fetch_add(1, Ordering::Relaxed);
                    let certificates = connection.peer_identity().and_then(|identity| {
                        identity
                            .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                            .ok()
                    });
                    let leaf = certificates.as_ref().and_then(|c| c.first());
                    let key =
                        gateway_key(leaf.map(|c| c.as_ref()), connection.remote_address().ip());
                    let gateway = gateways.join(key, &limits);
                    serve_quic_connection(
                        connection,
                        handler,
                        limits,
                        Arc::clone(&gateway.gateway),
                        stats,
                        shutdown,
                        streams,
                    )
                    .await;
                    drop(gateway);
                }
                _ => {
                    stats.handshakes_failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    // Stop taking streams, let the ones open answer what they have read, then close.
    streams.close();
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, streams.wait()).await;
    endpoint.close(quinn::VarInt::from_u32(codes::SHUTDOWN), b"shutdown");
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, endpoint.wait_idle()).await;
}

async fn serve_quic_connection<H: Handler>(
    connection: quinn::Connection,
    handler: Arc<H>,
    limits: Limits,
    gateway: Arc<Gateway>,
    stats: Arc<ServeStats>,
    shutdown: CancellationToken,
    streams: TaskTracker,
) {
    let places = Arc::new(Places {
        connection: Arc::new(Semaphore::new(limits.max_in_flight_per_connection)),
        gateway,
    });
    let served = Arc::new(Semaphore::new(crate::quic::MAX_SERVED_STREAMS));
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => {
                // Keep this handle until the open streams have drained: dropping the last
                // one closes the connection and discards what is not yet sent.
                streams.wait().await;
                return;
            }
            stream = async {
                // At the bound, further streams wait in the transport for one to end.
                let place = Arc::clone(&served).acquire_owned().await;
                (place, connection.accept_bi().await)
            } => stream,
        };
        let (Ok(served_place), Ok((mut send, recv))) = stream else {
            return;
        };
        stats.streams.fetch_add(1, Ordering::Relaxed);
        let handler = Arc::clone(&handler);
        let stats = Arc::clone(&stats);
        let shutdown = shutdown.clone();
        let places = Arc::clone(&places);
        streams.spawn(async move {
            let _served = served_place;
            let mut reader =
                FrameReader::new(recv, limits.max_frame).with_stall_timeout(limits.stall_timeout);
            let end = serve_stream(
                &mut reader,
                &mut send,
                &handler,
                StreamBounds {
                    max_in_flight: limits.max_in_flight_per_stream,
                    // A quiet QUIC stream stays: the connection's keep-alives and idle
                    // timeout tell a live peer from a dead one, and a pipelined stream
                    // (an acquirer link, a gateway's) must outlive quiet hours. What idle
                    // streams hold is bounded by `quic::MAX_SERVED_STREAMS`.
                    idle_timeout: None,
                    stall_timeout: limits.stall_timeout,
                },
                &places,
                &stats,
                &shutdown,
            )
            .await;
            match end {
                StreamEnd::Finished => {
                    let _ = send.finish();
                    if shutdown.is_cancelled() {
                        // The connection closes once every stream is done: wait until the
                        // peer has the responses, or they would be discarded with it.
                        let _ = tokio::time::timeout(DRAIN_TIMEOUT, send.stopped()).await;
                    }
                }
                StreamEnd::Abort(code) => {
                    let code = quinn::VarInt::from_u32(code);
                    let _ = send.reset(code);
                    let _ = reader.get_mut().stop(code);
                }
                StreamEnd::Stalled => {
                    let code = quinn::VarInt::from_u32(codes::STALLED);
                    let _ = send.reset(code);
                    let _ = reader.get_mut().stop(code);
                }
                StreamEnd::Failed => {}
            }
        });
    }
}

/// Accepts TCP connections on `listener`; each connection is one stream of frames.
pub async fn serve_tcp<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    limits: Limits,
    stats: Arc<ServeStats>,
    shutdown: CancellationToken,
) {
    serve_tcp_with(listener, None, handler, limits, stats, shutdown).await;
}

/// The TLS settings of a TCP listener, swapped whole to reload certificates: each new
/// connection takes the current one.
pub type TlsSource = Arc<std::sync::RwLock<Arc<rustls::ServerConfig>>>;

/// As [`serve_tcp`], with TLS (and client certificates, as `tls` requires them) on every
/// connection when `tls` is given; a connection whose handshake fails or does not finish
/// within [`HANDSHAKE_TIMEOUT`] is dropped and counted.
pub async fn serve_tcp_with<H: Handler>(
    listener: TcpListener,
    tls: Option<TlsSource>,
    handler: Arc<H>,
    limits: Limits,
    stats: Arc<ServeStats>,
    shutdown: CancellationToken,
) {
    let peers = Arc::new(PerPeer::default());
    let gateways = Arc::new(Gateways::default());
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let tracker = TaskTracker::new();
    let mut backoff = ACCEPT_BACKOFF_START;
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer): (tokio::net::TcpStream, SocketAddr) = match accepted {
            Ok(accepted) => {
                backoff = ACCEPT_BACKOFF_START;
                accepted
            }
            Err(_) => {
                // Out of file descriptors and the like: wait rather than spin.
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        let place = peers.take(peer.ip(), limits.max_connections_per_peer);
        let (Some(place), Ok(permit)) = (place, Arc::clone(&connections).try_acquire_owned())
        else {
            stats.connections_refused.fetch_add(1, Ordering::Relaxed);
            continue; // dropping the stream closes it
        };
        let _ = stream.set_nodelay(true);
        let handler = Arc::clone(&handler);
        let stats = Arc::clone(&stats);
        let shutdown = shutdown.clone();
        let acceptor = tls.as_ref().map(|tls| {
            let config = tls.read().unwrap_or_else(|e| e.into_inner());
            tokio_rustls::TlsAcceptor::from(Arc::clone(&config))
        });
        let gateways = Arc::clone(&gateways);
        tracker.spawn(async move {
            let _places = (permit, place);
            match acceptor {
                None => {
                    stats.connections.fetch_add(1, Ordering::Relaxed);
                    let gateway = gateways.join(gateway_key(None, peer.ip()), &limits);
                    let (read, write) = stream.into_split();
                    let gw = Arc::clone(&gateway.gateway);
                    serve_tcp_connection(read, write, &handler, limits, gw, &stats, &shutdown)
                        .await;
                }
                Some(acceptor) => {
                    let handshake =
                        tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream));
                    let Ok(Ok(stream)) = handshake.await else {
                        stats.handshakes_failed.fetch_add(1, Ordering::Relaxed);
                        return;
                    };
                    stats.connections.fetch_add(1, Ordering::Relaxed);
                    let leaf = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| c.as_ref().to_vec());
                    let gateway = gateways.join(gateway_key(leaf.as_deref(), peer.ip()), &limits);
                    let (read, write) = tokio::io::split(stream);
                    let gw = Arc::clone(&gateway.gateway);
                    serve_tcp_connection(read, write, &handler, limits, gw, &stats, &shutdown)
                        .await;
                }
            }
        });
    }
    tracker.close();
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, tracker.wait()).await;
}

/// One TCP connection (plain or TLS): one stream of frames.
async fn serve_tcp_connection<R, W, H>(
    read: R,
    mut write: W,
    handler: &Arc<H>,
    limits: Limits,
    gateway: Arc<Gateway>,
    stats: &ServeStats,
    shutdown: &CancellationToken,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    H: Handler,
{
    stats.streams.fetch_add(1, Ordering::Relaxed);
    let mut reader =
        FrameReader::new(read, limits.max_frame).with_stall_timeout(limits.stall_timeout);
    let places = Places {
        connection: Arc::new(Semaphore::new(limits.max_in_flight_per_connection)),
        gateway,
    };
    let end = serve_stream(
        &mut reader,
        &mut write,
        handler,
        StreamBounds {
            max_in_flight: limits.max_in_flight_per_stream,
            idle_timeout: Some(limits.idle_timeout),
            stall_timeout: limits.stall_timeout,
        },
        &places,
        stats,
        shutdown,
    )
    .await;
    if end == StreamEnd::Finished {
        let _ = write.shutdown().await;
    }
}

/// First wait after a failed accept.
const ACCEPT_BACKOFF_START: Duration = Duration::from_millis(5);
/// Longest wait between accept retries.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
