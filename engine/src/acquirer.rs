//! Acquirer links: one long-lived QUIC connection per acquirer, requests pipelined on a
//! stream, matched to responses by the switch's own STAN on that link.
//!
//! A supervisor task per link connects, reconnects with backoff, and marks the link down
//! the moment its connection is lost: requests then fail at once (`LinkError::Down`), so
//! the caller can try the route's next acquirer or answer 91 without waiting. A request the
//! acquirer does not answer within the link's timeout fails with `LinkError::Timeout`.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::{Bytes, BytesMut};
use dashmap::DashMap;
use payswitch_net::{quic, ClientTrust, FrameReader};
use payswitch_protocol::{fields, Message, Stan};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

/// Most requests one link may have outstanding. Switch STANs are six digits and handed out
/// in turn, so a STAN comes round again only after 999 999 requests; with at most this
/// many outstanding, a STAN is never reused while its request is still open.
pub const MAX_IN_FLIGHT_PER_LINK: usize = 100_000;

/// Longest acquirer timeout accepted (`timeout_ms`). Gateways give up on an authorization
/// within tens of seconds; waiting longer only holds one of the link's in-flight slots for
/// an answer nobody is waiting for.
pub const MAX_TIMEOUT_MS: u64 = 60_000;

/// Largest frame accepted from an acquirer. Acquirer responses are small; anything near
/// this is a broken peer.
const MAX_ACQUIRER_FRAME: usize = payswitch_protocol::DEFAULT_MAX_FRAME;

/// First wait before reconnecting.
const RECONNECT_BACKOFF_START: Duration = Duration::from_millis(50);
/// Longest wait between reconnects: an acquirer that comes back is used within 2 s.
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// A handshake that has not finished in this time is abandoned and retried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Bytes gathered into one stream write when requests queue up.
const WRITE_BATCH_BYTES: usize = 64 * 1024;

/// The `counter`-th STAN a link hands out: 1..=999 999 in turn, then 1 again.
pub fn link_stan(counter: u32) -> Stan {
    Stan::new(counter % Stan::MAX + 1).expect("1..=999999 by construction")
}

/// Why a request did not get an acquirer's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum LinkError {
    /// No connection to the acquirer: nothing was sent.
    #[error("acquirer link is down")]
    Down,
    /// The link has `max_in_flight` requests outstanding: nothing was sent.
    #[error("acquirer link is at its in-flight limit")]
    Busy,
    /// Sent, but no answer within the timeout.
    #[error("acquirer did not answer in time")]
    Timeout,
    /// Sent, then the connection was lost before the answer came.
    #[error("acquirer connection lost with the request outstanding")]
    Lost,
}

impl LinkError {
    /// Whether the request may have reached the acquirer. If so, it must not be sent to
    /// another acquirer: the first may have authorized it.
    pub fn maybe_delivered(&self) -> bool {
        matches!(self, LinkError::Timeout | LinkError::Lost)
    }
}

/// Counters of one link.
#[derive(Debug, Default)]
pub struct LinkStats {
    /// Requests answered by the acquirer.
    pub answered: AtomicU64,
    /// Requests that timed out.
    pub timeouts: AtomicU64,
    /// Requests outstanding when the connection was lost.
    pub lost: AtomicU64,
    /// Requests refused because the link was down or full.
    pub refused: AtomicU64,
    /// Frames from the acquirer that matched no outstanding request or did not decode.
    pub unmatched: AtomicU64,
    /// Connections made.
    pub connects: AtomicU64,
}

/// A link to one acquirer.
pub struct AcquirerLink {
    config: AcquirerConfig,
    endpoint: quinn::Endpoint,
    /// The current connection's write queue; `None` while the link is down.
    writer: ArcSwapOption<mpsc::Sender<Bytes>>,
    pending: DashMap<u32, oneshot::Sender<Message>>,
    next_stan: AtomicU32,
    in_flight: Semaphore,
    up: AtomicBool,
    draining: AtomicBool,
    /// Counters.
    pub stats: LinkStats,
}

impl std::fmt::Debug for AcquirerLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcquirerLink")
            .field("name", &self.config.name)
            .field("up", &self.is_up())
            .finish()
    }
}

impl AcquirerLink {
    /// Creates the link and starts its supervisor, which connects in the background.
    pub fn start(
        config: AcquirerConfig,
        trust: ClientTrust,
        shutdown: CancellationToken,
    ) -> Result<Arc<AcquirerLink>, payswitch_net::NetError> {
        let endpoint = quic::link_endpoint(trust)?;
        // Above the limit a STAN could come round while its request is still open; zero
        // would refuse everything. `Config::check` refuses both.
        assert!(
            (1..=MAX_IN_FLIGHT_PER_LINK).contains(&config.max_in_flight),
            "acquirer {:?}: max_in_flight {} outside 1..={MAX_IN_FLIGHT_PER_LINK}",
            config.name,
            config.max_in_flight
        );
        let max_in_flight = config.max_in_flight;
        let link = Arc::new(AcquirerLink {
            config,
            endpoint,
            writer: ArcSwapOption::empty(),
            pending: DashMap::new(),
            next_stan: AtomicU32::new(0),
            in_flight: Semaphore::new(max_in_flight),
            up: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            stats: LinkStats::default(),
        });
        tokio::spawn(Arc::clone(&link).supervise(shutdown));
        Ok(link)
    }

    /// The acquirer's configured name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Whether a connection is established.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Whether an operator drained the acquirer: routes skip it; reversals still go.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Drains the acquirer (`true`) or puts it back in service (`false`).
    pub fn set_draining(&self, draining: bool) {
        self.draining.store(draining, Ordering::Release);
        tracing::info!(acquirer = %self.config.name, draining, "acquirer drain changed by an operator");
    }

    /// `up`, `draining` or `down`.
    pub fn state(&self) -> &'static str {
        match (self.is_up(), self.is_draining()) {
            (false, _) => "down",
            (true, true) => "draining",
            (true, false) => "up",
        }
    }

    /// Requests outstanding now.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// Takes a place on the link and a STAN for one request, without sending anything:
    /// `Down` or `Busy` when there is none. The caller can journal where the request is
    /// going, with its STAN, before it leaves.
    pub fn reserve(&self) -> Result<Reservation<'_>, LinkError> {
        let Some(writer) = self.writer.load_full() else {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            return Err(LinkError::Down);
        };
        let Ok(permit) = self.in_flight.try_acquire() else {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            return Err(LinkError::Busy);
        };
        Ok(Reservation {
            link: self,
            writer,
            _permit: permit,
            stan: self.allocate_stan(),
        })
    }

    fn allocate_stan(&self) -> Stan {
        link_stan(self.next_stan.fetch_add(1, Ordering::Relaxed))
    }

    fn encode_with_stan(&self, request: &Message, stan: Stan) -> Result<Bytes, LinkError> {
        let mut builder = request.to_builder();
        builder
            .set(fields::STAN, &stan.to_digits())
            .map_err(|_| LinkError::Down)?;
        let mut frame = BytesMut::with_capacity(request.encoded_len() + 2);
        builder
            .build()
            .encode_framed(&mut frame)
            .map_err(|_| LinkError::Down)?;
        Ok(frame.freeze())
    }

    async fn supervise(self: Arc<Self>, shutdown: CancellationToken) {
        let mut backoff = RECONNECT_BACKOFF_START;
        let mut was_up = true; // so the first failure is logged
        loop {
            let connected = tokio::select! {
                _ = shutdown.cancelled() => break,
                connected = self.connect() => connected,
            };
            match connected {
                Ok((connection, send, recv)) => {
                    backoff = RECONNECT_BACKOFF_START;
                    was_up = true;
                    self.run_connection(&connection, send, recv, &shutdown)
                        .await;
                    connection.close(quinn::VarInt::from_u32(payswitch_net::codes::DONE), b"");
                    if shutdown.is_cancelled() {
                        break;
                    }
                    tracing::warn!(acquirer = %self.config.name, "acquirer link down");
                }
                Err(e) => {
                    if was_up {
                        tracing::warn!(acquirer = %self.config.name, address = %self.config.address, error = %e, "cannot connect to acquirer; retrying");
                    }
                    was_up = false;
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
        }
        self.endpoint.close(
            quinn::VarInt::from_u32(payswitch_net::codes::SHUTDOWN),
            b"shutdown",
        );
    }

    async fn connect(
        &self,
    ) -> Result<(quinn::Connection, quinn::SendStream, quinn::RecvStream), String> {
        let attempt = async {
            let connection = quic::connect(
                &self.endpoint,
                self.config.address,
                &self.config.server_name,
            )
            .await
            .map_err(|e| e.to_string())?;
            let (send, recv) = connection.open_bi().await.map_err(|e| e.to_string())?;
            Ok((connection, send, recv))
        };
        tokio::time::timeout(CONNECT_TIMEOUT, attempt)
            .await
            .map_err(|_| "handshake timed out".to_string())?
    }

    /// Serves one connection until it fails or shutdown, then fails what is outstanding.
    async fn run_connection(
        &self,
        connection: &quinn::Connection,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        shutdown: &CancellationToken,
    ) {
        // Within 1..=MAX_IN_FLIGHT_PER_LINK: asserted in `start`.
        let (tx, rx) = mpsc::channel(self.config.max_in_flight);
        self.writer.store(Some(Arc::new(tx)));
        self.up.store(true, Ordering::Release);
        self.stats.connects.fetch_add(1, Ordering::Relaxed);
        tracing::info!(acquirer = %self.config.name, address = %connection.remote_address(), "acquirer link up");
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = write_loop(rx, send) => {}
            _ = self.read_loop(recv) => {}
            _ = connection.closed() => {}
        }
        self.up.store(false, Ordering::Release);
        self.writer.store(None);
        // Dropping the answer senders wakes every waiting caller with `LinkError::Lost`.
        self.pending.clear();
    }

    async fn read_loop(&self, recv: quinn::RecvStream) {
        let mut reader = FrameReader::new(recv, MAX_ACQUIRER_FRAME);
        while let Ok(Some(frame)) = reader.next_frame().await {
            let stan = Message::decode(frame).ok().and_then(|answer| {
                let stan = Stan::parse(answer.get(fields::STAN)?).ok()?;
                Some((stan, answer))
            });
            let delivered = stan.and_then(|(stan, answer)| {
                let (_, waiter) = self.pending.remove(&stan.get())?;
                waiter.send(answer).ok()
            });
            if delivered.is_none() {
                // A late answer after a timeout, or a broken acquirer.
                self.stats.unmatched.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// A place on a link and the STAN a request will carry there.
pub struct Reservation<'a> {
    link: &'a AcquirerLink,
    writer: Arc<mpsc::Sender<Bytes>>,
    _permit: tokio::sync::SemaphorePermit<'a>,
    stan: Stan,
}

impl Reservation<'_> {
    /// The STAN the request will carry on the link.
    pub fn stan(&self) -> Stan {
        self.stan
    }

    /// Sends `request` with the reserved STAN and waits for the answer.
    pub async fn send(self, request: &Message) -> Result<Message, LinkError> {
        let link = self.link;
        let stan = self.stan;
        let frame = link.encode_with_stan(request, stan)?;
        let (answer_tx, answer_rx) = oneshot::channel();
        let previous = link.pending.insert(stan.get(), answer_tx);
        // MAX_IN_FLIGHT_PER_LINK keeps live STANs far apart; a collision would hand one
        // request's answer to another.
        assert!(previous.is_none(), "switch STAN reused while outstanding");
        if self.writer.try_send(frame).is_err() {
            // The queue holds max_in_flight frames and we hold a permit, so only a closed
            // connection refuses: nothing was sent.
            link.pending.remove(&stan.get());
            return Err(LinkError::Down);
        }
        match tokio::time::timeout(link.config.timeout(), answer_rx).await {
            Ok(Ok(answer)) => {
                link.stats.answered.fetch_add(1, Ordering::Relaxed);
                Ok(answer)
            }
            Ok(Err(_)) => {
                link.stats.lost.fetch_add(1, Ordering::Relaxed);
                Err(LinkError::Lost)
            }
            Err(_) => {
                link.pending.remove(&stan.get());
                link.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                Err(LinkError::Timeout)
            }
        }
    }
}

async fn write_loop(mut rx: mpsc::Receiver<Bytes>, mut send: quinn::SendStream) {
    let mut batch = BytesMut::with_capacity(WRITE_BATCH_BYTES);
    while let Some(first) = rx.recv().await {
        batch.clear();
        batch.extend_from_slice(&first);
        while batch.len() < WRITE_BATCH_BYTES {
            match rx.try_recv() {
                Ok(more) => batch.extend_from_slice(&more),
                Err(_) => break,
            }
        }
        if send.write_all(&batch).await.is_err() {
            return;
        }
    }
}

/// One acquirer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcquirerConfig {
    /// Name used in routes, field 48 and reports.
    pub name: String,
    /// QUIC address.
    pub address: SocketAddr,
    /// Name checked against the acquirer's certificate.
    #[serde(default = "default_server_name")]
    pub server_name: String,
    /// CA certificate(s) to verify the acquirer with (PEM).
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// How long to wait for the acquirer's answer before answering 91.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Requests outstanding at this acquirer; beyond it the next acquirer is tried, or 91.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
}

fn default_server_name() -> String {
    "localhost".to_string()
}

fn default_timeout_ms() -> u64 {
    2_000
}

fn default_max_in_flight() -> usize {
    // Well under the 999 999 switch STANs of a link, so a STAN is never reused while its
    // request is still outstanding.
    4_096
}

impl AcquirerConfig {
    /// The timeout as a `Duration`.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}
