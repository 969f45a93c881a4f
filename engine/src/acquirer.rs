//! Acquirer links: one long-lived QUIC connection per acquirer, requests pipelined on a
//! stream, matched to responses by the switch's own STAN on that link.
//!
//! A supervisor task per link connects, reconnects with backoff, and marks the link down
//! the moment its connection is lost: requests then fail at once (`LinkError::Down`), so
//! the caller can try the route's next acquirer or answer 91 without waiting. A request the
//! acquirer does not answer within the link's timeout fails with `LinkError::Timeout`.
//!
//! An answer is matched by STAN and, when it carries one, by the request's RRN (field 37),
//! so a late answer can never be taken for the answer to a later request that reuses its
//! STAN. An answer that comes after its request timed out is recognised as late (the most
//! recent [`LATE_REMEMBERED`] timed-out STANs are remembered) and counted apart from
//! garbage: a late approval is what the reversal queued at the timeout is for.
//!
//! Reversals have places of their own on each link ([`REVERSAL_SLOTS_PER_LINK`]), so
//! retries never take the places new authorizations need, and each reversal keeps one
//! STAN for all its attempts ([`ReversalWatch`]): a 0410 to any attempt, however late,
//! reaches it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use bytes::{Bytes, BytesMut};
use dashmap::DashMap;
use payswitch_net::{quic, ClientTrust, FrameReader};
use payswitch_protocol::{fields, Message, Stan};
use thiserror::Error;

use crate::breaker::{Admit, Breaker, BreakerConfig, State as BreakerState, Transition};
use crate::routing::AcquirerWeights;
use tokio::sync::{mpsc, oneshot, Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

/// Most requests one link may have outstanding. Switch STANs are handed out in turn from
/// a space of at least 99 999 (a cluster node's block, [`StanSpace`]), so a STAN comes
/// round again only after that many requests; with at most this many outstanding, plus
/// at most [`crate::reversal::MAX_PENDING_REVERSALS`] reversals holding theirs (together
/// under 99 999), a free STAN is always found and never one whose request is still open.
pub const MAX_IN_FLIGHT_PER_LINK: usize = 40_000;

/// Reversal attempts one link may have outstanding at once, beside `max_in_flight`
/// authorizations: enough to drain a backlog of thousands within seconds of an acquirer's
/// return, few enough that a backlog never crowds the link.
pub const REVERSAL_SLOTS_PER_LINK: usize = 64;

/// Timed-out STANs remembered per link, so a late answer is told from a broken one. At
/// 2 s timeouts this covers any acquirer that answers within the minute at 1 000 timeouts
/// a second; beyond it a late answer is only counted as unmatched.
pub const LATE_REMEMBERED: usize = 65_536;

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
    StanSpace::WHOLE.nth(counter)
}

/// The STANs a link hands out. A single node uses the whole 6-digit range. In a cluster
/// every node links to every acquirer and a survivor sends reversals naming another
/// node's STANs, so STANs must be unique across nodes: node with `cluster.stan_block` k
/// uses k·100 000 + 1 ..= k·100 000 + 99 999, in turn (block 0: 1..=99 999). A STAN
/// recurs on a link after 99 999 requests; acquirers match on the STAN with the
/// transmission time (field 7, to the second), so that is unique unless one node sends
/// one acquirer 99 999 requests within a second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StanSpace {
    base: u32,
    size: u32,
}

impl StanSpace {
    /// The whole range, 1..=999 999.
    pub const WHOLE: StanSpace = StanSpace {
        base: 0,
        size: Stan::MAX,
    };

    /// STAN blocks there are (`cluster.stan_block` 0 to 9).
    pub const BLOCKS: u8 = 10;

    /// Block `k` (0..=9; larger values are taken modulo 10).
    pub fn block(k: u8) -> StanSpace {
        StanSpace {
            base: u32::from(k % Self::BLOCKS) * 100_000,
            size: 99_999,
        }
    }

    /// The `counter`-th STAN of the space, wrapping.
    pub fn nth(&self, counter: u32) -> Stan {
        Stan::new(self.base + counter % self.size + 1).expect("within 1..=999999 by construction")
    }

    /// The counter whose STAN follows `stan`, if `stan` is in this space.
    pub fn counter_after(&self, stan: Stan) -> Option<u32> {
        let offset = stan.get().checked_sub(self.base + 1)?;
        (offset < self.size).then_some(offset + 1)
    }
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
    /// The acquirer's circuit breaker is open: nothing was sent.
    #[error("acquirer circuit breaker is open")]
    Open,
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
    /// Requests refused because the link was down or full, or its breaker open.
    pub refused: AtomicU64,
    /// Of those, refused by the open breaker.
    pub breaker_refused: AtomicU64,
    /// Times the breaker opened.
    pub breaker_opened: AtomicU64,
    /// Frames from the acquirer that matched no outstanding request or did not decode.
    pub unmatched: AtomicU64,
    /// Answers that came after their request had timed out.
    pub late: AtomicU64,
    /// Of those, approvals (each one's reversal was queued at the timeout).
    pub late_approvals: AtomicU64,
    /// Connections made.
    pub connects: AtomicU64,
}

/// A link to one acquirer.
pub struct AcquirerLink {
    config: AcquirerConfig,
    endpoint: quinn::Endpoint,
    /// The current connection's write queue; `None` while the link is down.
    writer: ArcSwapOption<mpsc::Sender<Bytes>>,
    pending: DashMap<u32, Waiter>,
    /// Timed-out STANs in the order they timed out, at most [`LATE_REMEMBERED`].
    late: Mutex<VecDeque<u32>>,
    next_stan: AtomicU32,
    /// Where the STANs come from.
    stans: StanSpace,
    in_flight: Semaphore,
    reversal_slots: Semaphore,
    up: AtomicBool,
    draining: AtomicBool,
    /// Woken when a connection is made: reversals waiting out a backoff go at once.
    connected: Notify,
    /// Health judged from what the acquirer does (`crate::breaker`).
    breaker: Mutex<Breaker>,
    /// The breaker's clock: monotonic, from the link's start.
    epoch: Instant,
    /// Where balanced routes read this acquirer's health, and its index there.
    weights: std::sync::OnceLock<(Arc<AcquirerWeights>, usize)>,
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
        stans: StanSpace,
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
        let breaker = Breaker::new(config.breaker, config.timeout_ms);
        let link = Arc::new(AcquirerLink {
            config,
            endpoint,
            writer: ArcSwapOption::empty(),
            pending: DashMap::new(),
            late: Mutex::new(VecDeque::new()),
            next_stan: AtomicU32::new(0),
            stans,
            in_flight: Semaphore::new(max_in_flight),
            reversal_slots: Semaphore::new(REVERSAL_SLOTS_PER_LINK),
            up: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            connected: Notify::new(),
            breaker: Mutex::new(breaker),
            epoch: Instant::now(),
            weights: std::sync::OnceLock::new(),
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

    /// The breaker's state now: `closed`, `open` or `half-open`.
    pub fn breaker_state(&self) -> &'static str {
        let (state, transition) = self.with_breaker(|b, now| b.state(now));
        self.report(transition);
        state.name()
    }

    /// Whether the breaker lets traffic through now (closed, or half-open with a probe
    /// to send).
    pub fn breaker_closed(&self) -> bool {
        !matches!(
            self.with_breaker(|b, now| b.state(now)).0,
            BreakerState::Open { .. }
        )
    }

    /// Publishes this acquirer's health to `weights` at `index`, for balanced routes.
    pub fn weigh_into(&self, weights: Arc<AcquirerWeights>, index: usize) {
        let _ = self.weights.set((weights, index));
    }

    fn with_breaker<T>(&self, f: impl FnOnce(&mut Breaker, u64) -> T) -> T {
        let now = u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
        let mut breaker = self.breaker.lock().unwrap_or_else(|e| e.into_inner());
        let result = f(&mut breaker, now);
        if let Some((weights, index)) = self.weights.get() {
            weights.set(*index, breaker.success_permille());
        }
        result
    }

    /// Logs a change of the breaker's state: WARN when it opens.
    fn report(&self, transition: Option<Transition>) {
        match transition {
            None => {}
            Some(Transition::Opened { trip, open_ms }) => {
                self.stats.breaker_opened.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(acquirer = %self.config.name, reason = %trip, probe_in_ms = open_ms, "acquirer circuit breaker opened: routes skip it");
            }
            Some(Transition::HalfOpened) => {
                tracing::info!(acquirer = %self.config.name, "acquirer circuit breaker half-open: probing with live traffic");
            }
            Some(Transition::Closed) => {
                tracing::warn!(acquirer = %self.config.name, "acquirer circuit breaker closed: back in service");
            }
        }
    }

    /// Authorizations outstanding now.
    pub fn in_flight(&self) -> usize {
        self.config.max_in_flight - self.in_flight.available_permits()
    }

    /// The configured timeout.
    pub fn timeout(&self) -> Duration {
        self.config.timeout()
    }

    /// Takes a place on the link and a STAN for one request, without sending anything:
    /// `Down` or `Busy` when there is none. The caller can journal where the request is
    /// going, with its STAN, before it leaves.
    pub fn reserve(&self) -> Result<Reservation<'_>, LinkError> {
        let Some(writer) = self.writer.load_full() else {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            return Err(LinkError::Down);
        };
        let (admit, transition) = self.with_breaker(|b, now| b.admit(now));
        self.report(transition);
        if admit == Admit::No {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            self.stats.breaker_refused.fetch_add(1, Ordering::Relaxed);
            return Err(LinkError::Open);
        }
        let Ok(permit) = self.in_flight.try_acquire() else {
            self.with_breaker(|b, _| b.not_sent(admit));
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            return Err(LinkError::Busy);
        };
        Ok(Reservation {
            link: self,
            writer,
            _permit: permit,
            stan: self.allocate_stan(),
            admit,
            sent: Sent::No,
        })
    }

    /// Hands out STANs after `stan` from now on (see
    /// [`crate::recovery::Recovery::highest_wanted_stan`]).
    pub fn allocate_after(&self, stan: Stan) {
        if let Some(next) = self.stans.counter_after(stan) {
            self.next_stan.store(next, Ordering::Relaxed);
        }
    }

    /// The next STAN no open request or reversal holds. A STAN remembered only as timed
    /// out is taken over. At most `max_in_flight` authorizations and
    /// [`crate::reversal::MAX_PENDING_REVERSALS`] reversals hold STANs, fewer together than
    /// the 99 999 of the smallest space, so the search ends (within a few steps unless
    /// nearly all are held).
    fn allocate_stan(&self) -> Stan {
        loop {
            let stan = self
                .stans
                .nth(self.next_stan.fetch_add(1, Ordering::Relaxed));
            let held = self
                .pending
                .get(&stan.get())
                .is_some_and(|w| !matches!(*w, Waiter::Late));
            if !held {
                return stan;
            }
        }
    }

    /// A place for one reversal attempt, beside the authorizations' places: `Down` or
    /// `Busy` when there is none. The attempt is sent with [`ReversalWatch::send`].
    pub fn reserve_reversal(&self) -> Result<ReversalSlot<'_>, LinkError> {
        if self.writer.load().is_none() {
            return Err(LinkError::Down);
        }
        let permit = self
            .reversal_slots
            .try_acquire()
            .map_err(|_| LinkError::Busy)?;
        Ok(ReversalSlot { _permit: permit })
    }

    /// As [`AcquirerLink::reserve_reversal`], but waits up to the link's timeout for a
    /// place when all are taken (they free as attempts are answered or time out), so a
    /// backlog of reversals drains in turn instead of backing off. `Down` at once when
    /// there is no connection.
    pub async fn reserve_reversal_wait(&self) -> Result<ReversalSlot<'_>, LinkError> {
        if self.writer.load().is_none() {
            return Err(LinkError::Down);
        }
        match tokio::time::timeout(self.config.timeout(), self.reversal_slots.acquire()).await {
            Ok(Ok(permit)) if self.writer.load().is_some() => Ok(ReversalSlot { _permit: permit }),
            Ok(Ok(_)) => Err(LinkError::Down),
            _ => Err(LinkError::Busy),
        }
    }

    /// Resolves when the link next connects.
    pub fn connected(&self) -> tokio::sync::futures::Notified<'_> {
        self.connected.notified()
    }

    /// Registers a reversal under one STAN for its whole delivery: `wanted` (its STAN
    /// before a restart) when no one holds it, else a new one. Answers with that STAN
    /// (and the original's RRN) reach the watch until it is dropped, across reconnects.
    pub fn watch(&self, wanted: Option<Stan>, rrn: &str) -> ReversalWatch<'_> {
        // Reversals in delivery are at most MAX_PENDING_REVERSALS; a few answers to
        // earlier attempts are all that can queue.
        let (tx, rx) = mpsc::channel(4);
        let rrn = rrn_of(rrn.as_bytes());
        let free = |stan: Stan| {
            self.pending
                .get(&stan.get())
                .is_none_or(|w| matches!(*w, Waiter::Late))
        };
        let stan = match wanted {
            Some(stan) if free(stan) => stan,
            _ => self.allocate_stan(),
        };
        self.pending
            .insert(stan.get(), Waiter::Reversal { tx, rrn });
        ReversalWatch {
            link: self,
            stan,
            answers: rx,
        }
    }

    /// Remembers that the request with `stan` timed out, so its late answer is known.
    fn timed_out(&self, stan: Stan) {
        let ours = self.pending.get_mut(&stan.get()).map(|mut w| {
            let answer = matches!(*w, Waiter::Answer { .. });
            if answer {
                *w = Waiter::Late;
            }
            answer
        });
        if ours != Some(true) {
            return;
        }
        let mut late = self.late.lock().unwrap_or_else(|e| e.into_inner());
        late.push_back(stan.get());
        if late.len() > LATE_REMEMBERED {
            if let Some(oldest) = late.pop_front() {
                self.pending
                    .remove_if(&oldest, |_, w| matches!(w, Waiter::Late));
            }
        }
    }

    /// Writes `frame` on the current connection: `Down` when there is none.
    fn write(&self, frame: Bytes) -> Result<(), LinkError> {
        let writer = self.writer.load_full().ok_or(LinkError::Down)?;
        // The queue holds max_in_flight + REVERSAL_SLOTS_PER_LINK frames and every frame
        // holds a place, so only a closed connection refuses.
        writer.try_send(frame).map_err(|_| LinkError::Down)
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
        let (tx, rx) = mpsc::channel(self.config.max_in_flight + REVERSAL_SLOTS_PER_LINK);
        self.writer.store(Some(Arc::new(tx)));
        self.up.store(true, Ordering::Release);
        self.stats.connects.fetch_add(1, Ordering::Relaxed);
        self.connected.notify_waiters();
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
        // Reversals keep their STANs: their deliveries go on over the next connection.
        self.pending
            .retain(|_, w| matches!(w, Waiter::Reversal { .. }));
        self.late.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    async fn read_loop(&self, recv: quinn::RecvStream) {
        let mut reader = FrameReader::new(recv, MAX_ACQUIRER_FRAME);
        while let Ok(Some(frame)) = reader.next_frame().await {
            let matched = Message::decode(frame).ok().and_then(|answer| {
                let stan = Stan::parse(answer.get(fields::STAN)?).ok()?;
                Some((stan, answer))
            });
            let taken = match matched {
                Some((stan, answer)) => self.take_answer(stan, answer),
                None => false,
            };
            if !taken {
                self.stats.unmatched.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Hands `answer` to whoever waits for `stan`; `false` when no one does.
    fn take_answer(&self, stan: Stan, answer: Message) -> bool {
        let rrn = answer.get(fields::RRN);
        let same_request = |expected: &Option<[u8; 12]>| match (expected, rrn) {
            (Some(expected), Some(rrn)) => expected[..] == *rrn,
            _ => true,
        };
        // Decided under the entry's lock, acted on after it is released.
        let kind = match self.pending.get(&stan.get()).as_deref() {
            None => return false,
            Some(Waiter::Reversal { tx, rrn }) => {
                if !same_request(rrn) {
                    return false;
                }
                // A full queue holds earlier answers to the same reversal: one is enough.
                let _ = tx.try_send(answer);
                return true;
            }
            Some(Waiter::Answer { rrn, .. }) if !same_request(rrn) => return false,
            Some(Waiter::Answer { .. }) => true,
            Some(Waiter::Late) => false,
        };
        let Some((_, waiter)) = self.pending.remove(&stan.get()) else {
            return false;
        };
        match waiter {
            Waiter::Answer { tx, .. } if kind => tx.send(answer).is_ok(),
            Waiter::Late if !kind => {
                self.stats.late.fetch_add(1, Ordering::Relaxed);
                if answer.get(fields::RESPONSE_CODE) == Some(b"00") {
                    self.stats.late_approvals.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(acquirer = %self.config.name, stan = stan.get(), "late approval: its reversal was queued at the timeout");
                }
                true
            }
            // Replaced between the look and the removal: put it back.
            other => {
                self.pending.insert(stan.get(), other);
                false
            }
        }
    }
}

/// Who waits for an answer with a given STAN on a link.
#[derive(Debug)]
enum Waiter {
    /// An authorization, until its answer or its timeout.
    Answer {
        tx: oneshot::Sender<Message>,
        rrn: Option<[u8; 12]>,
    },
    /// A reversal, for as long as it is being delivered.
    Reversal {
        tx: mpsc::Sender<Message>,
        rrn: Option<[u8; 12]>,
    },
    /// An authorization that timed out: an answer now is late.
    Late,
}

fn rrn_of(rrn: &[u8]) -> Option<[u8; 12]> {
    rrn.try_into().ok()
}

/// A reversal attempt's place on a link, given back when dropped.
#[derive(Debug)]
pub struct ReversalSlot<'a> {
    _permit: tokio::sync::SemaphorePermit<'a>,
}

/// One reversal's STAN on a link, held for its whole delivery: every answer with it
/// arrives here. Dropping it frees the STAN.
#[derive(Debug)]
pub struct ReversalWatch<'a> {
    link: &'a AcquirerLink,
    stan: Stan,
    answers: mpsc::Receiver<Message>,
}

impl ReversalWatch<'_> {
    /// The STAN every attempt carries.
    pub fn stan(&self) -> Stan {
        self.stan
    }

    /// Sends one attempt, `message` with the watch's STAN, on the place `slot`; does not
    /// wait for the answer.
    pub fn send(&self, _slot: &ReversalSlot<'_>, message: &Message) -> Result<(), LinkError> {
        let frame = self.link.encode_with_stan(message, self.stan)?;
        self.link.write(frame)
    }

    /// The next answer to any attempt.
    pub async fn answer(&mut self) -> Option<Message> {
        self.answers.recv().await
    }
}

impl Drop for ReversalWatch<'_> {
    fn drop(&mut self) {
        self.link.pending.remove_if(&self.stan.get(), |_, w| {
            matches!(w, Waiter::Reversal { .. })
        });
    }
}

/// A place on a link and the STAN a request will carry there.
pub struct Reservation<'a> {
    link: &'a AcquirerLink,
    writer: Arc<mpsc::Sender<Bytes>>,
    _permit: tokio::sync::SemaphorePermit<'a>,
    stan: Stan,
    /// What the breaker said: a probe's outcome decides whether it closes.
    admit: Admit,
    /// Where the request is, so the breaker hears of it exactly once whatever happens:
    /// dropped unsent, it was not sent; dropped while out (the caller gave up), it is
    /// counted as failed, so the breaker never waits on a request no one will settle.
    sent: Sent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sent {
    No,
    Out,
    Settled,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let admit = self.admit;
        match self.sent {
            Sent::No => self.link.with_breaker(|b, _| b.not_sent(admit)),
            Sent::Out => {
                let transition = self.link.with_breaker(|b, now| b.failed(now, admit));
                self.link.report(transition);
            }
            Sent::Settled => {}
        }
    }
}

impl Reservation<'_> {
    /// The STAN the request will carry on the link.
    pub fn stan(&self) -> Stan {
        self.stan
    }

    /// Sends `request` with the reserved STAN and waits for the answer.
    pub async fn send(mut self, request: &Message) -> Result<Message, LinkError> {
        let link = self.link;
        let admit = self.admit;
        let stan = self.stan;
        let frame = link.encode_with_stan(request, stan)?;
        let (answer_tx, answer_rx) = oneshot::channel();
        let waiter = Waiter::Answer {
            tx: answer_tx,
            rrn: request.get(fields::RRN).and_then(rrn_of),
        };
        let previous = link.pending.insert(stan.get(), waiter);
        // The allocator skips every STAN held; a collision would hand one request's
        // answer to another.
        assert!(
            matches!(previous, None | Some(Waiter::Late)),
            "switch STAN reused while outstanding"
        );
        if self.writer.try_send(frame).is_err() {
            // The queue holds max_in_flight frames and we hold a permit, so only a closed
            // connection refuses: nothing was sent.
            link.pending.remove(&stan.get());
            return Err(LinkError::Down);
        }
        self.sent = Sent::Out;
        let sent_at = link.with_breaker(|b, now| {
            b.sent(now);
            now
        });
        let result = tokio::time::timeout(link.config.timeout(), answer_rx).await;
        self.sent = Sent::Settled;
        let transition = link.with_breaker(|b, now| match result {
            Ok(Ok(_)) => b.answered(now, now.saturating_sub(sent_at), admit),
            _ => b.failed(now, admit),
        });
        link.report(transition);
        match result {
            Ok(Ok(answer)) => {
                link.stats.answered.fetch_add(1, Ordering::Relaxed);
                Ok(answer)
            }
            Ok(Err(_)) => {
                link.stats.lost.fetch_add(1, Ordering::Relaxed);
                Err(LinkError::Lost)
            }
            Err(_) => {
                link.timed_out(stan);
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
    /// When routes skip it for what it does (`crate::breaker`).
    #[serde(default)]
    pub breaker: BreakerConfig,
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
