//! Store-and-forward of reversals: what the switch owes acquirers.
//!
//! An authorization that may have been approved at an acquirer but whose approval did not
//! reach the gateway — a timeout, a lost connection, a crash with it in flight, or a
//! gateway's own 0400/0420 — is reversed. The reversal is journaled as queued first, then
//! sent (each attempt journaled) with backoff until the acquirer answers 0410 (any code),
//! which is journaled as the acknowledgement. After a restart the journal's queued and
//! unacknowledged reversals are queued again (`crate::recovery`).
//!
//! Every attempt after the first is a repeat (0401) of the same reversal with the same
//! link STAN, never a new reversal, so an acquirer applies it once however often it comes;
//! an answer to any attempt, however late, acknowledges it (`crate::acquirer` keeps the
//! STAN registered for the whole delivery). Attempts use the link's reversal places, not
//! the authorizations'. Retries back off from 200 ms to 10 s; after
//! [`ESCALATE_AFTER_ATTEMPTS`] unanswered attempts a reversal is escalated (a WARN line,
//! `payswitch_reversals_escalated`, `/api/reversals`) and retried once a minute, never
//! dropped.
//!
//! The same queue delivers **advices**: a stand-in approval (`crate::routing::StandIn`)
//! is owed to the route's first acquirer as an authorization advice, 0120 (0220 for a
//! 0200), repeated as 0121 until the acquirer answers 0130 (any code: an advice is booked,
//! not decided). An advice has no hold: nothing of it was ever sent. Deliveries for one
//! request go one after the other: a reversal of a stand-in approval waits until its advice
//! is acknowledged, so the acquirer books the approval before it is asked to reverse it;
//! that reversal names the advice in field 90 (its MTI and STAN).
//!
//! A reversal is built from the journal's record of the forwarded original: 0400 with the
//! original's amount, RRN, terminal and merchant, and field 90 naming the original by its
//! MTI, the STAN the acquirer saw (the switch's link STAN) and its transmission time. It
//! carries no PAN: the journal never holds one, and field 90 with the RRN identifies the
//! original at the acquirer.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use payswitch_protocol::time::UtcDateTime;
use payswitch_protocol::{fields, Message, Mti, Pan, Stan};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::acquirer::{AcquirerLink, ReversalSlot};
use crate::clock::Now;
use crate::fence::Fence;
use crate::journal::{Journal, JournalError, PanVault, Record, RecordKind};
use crate::routing::AcquirerIndex;
use crate::shard::duplicates::Original;

/// Reversals being delivered at once. Each is a task holding one message and a STAN on
/// its link; 50 k is far beyond any real backlog (an acquirer down for minutes at high
/// load), a few tens of MiB, and with a link's in-flight bound under the 99 999 STANs of a
/// cluster node's block (`acquirer::StanSpace`). Past it a reversal stays queued in the
/// journal only and is sent after a restart.
pub const MAX_PENDING_REVERSALS: usize = 50_000;

const _: () = assert!(
    crate::acquirer::MAX_IN_FLIGHT_PER_LINK + MAX_PENDING_REVERSALS < 99_999,
    "a link's STAN holders must fit a cluster node's STAN block (acquirer::StanSpace)"
);

/// What the switch owes an acquirer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Owed {
    /// A reversal (0400, repeated as 0401).
    #[default]
    Reversal,
    /// The advice of a stand-in approval (0120, repeated as 0121).
    Advice,
}

/// A reversal or an advice to deliver.
#[derive(Debug, Clone, Default)]
pub struct PendingReversal {
    /// A reversal or an advice.
    pub owed: Owed,
    /// Sequence number of the original request's journal record.
    pub request_seq: u64,
    /// The acquirer that handled the original.
    pub acquirer: AcquirerIndex,
    /// The `forwarded` record of the original (identity, acquirer, link STAN); for an
    /// advice, its `advice_queued` record (identity, acquirer, code, approval code).
    pub original: Record,
    /// The reversal's own link STAN, when attempts were sent before (a restart).
    pub stan: Option<Stan>,
    /// Attempts sent before (a restart): the next is a repeat.
    pub attempts: u32,
    /// For an advice sent in this run: the stand-in approval's entry in its shard's
    /// window, told the advice's STAN so that a reversal of it names the advice.
    pub entry: Option<Arc<Original>>,
    /// The fencing token (`crate::fence`) of the lease under which what it reverses was
    /// sent, in a cluster. 0 without a cluster.
    pub token: u64,
    /// The original's answer was durable when this was owed (not in doubt in the journal).
    pub settled: bool,
    /// The fencing token under which its `reversal_queued` (`advice_queued`) record was
    /// made durable; 0 when it was not journaled.
    pub queued_token: u64,
    /// Its `reversal_queued` (`advice_queued`) record is durable (set by the lifecycle;
    /// the driver then sets `queued_token`).
    pub journaled: bool,
}

impl PendingReversal {
    /// Whether a survivor that took over the lease `token` (this node no longer
    /// `owns`) delivers this: it read the node's journal from the stream and moved
    /// every original left in doubt there (sent, no durable answer) and every reversal
    /// queued there and not acknowledged. Otherwise — an original answered durably,
    /// reversed (a gateway's 0400) only under a later lease — it is still this node's.
    pub fn survivor_delivers(&self, owns: impl Fn(u64) -> bool) -> bool {
        if owns(self.token) {
            return false;
        }
        !self.settled || (self.queued_token != 0 && !owns(self.queued_token))
    }
}

/// Counters of the queue.
#[derive(Debug, Default)]
pub struct ReversalStats {
    /// Reversals waiting for their acknowledgement now.
    pub pending: AtomicU64,
    /// Attempts sent.
    pub sent: AtomicU64,
    /// Reversals acknowledged.
    pub acknowledged: AtomicU64,
    /// Reversals left to the next start because the queue was full.
    pub deferred: AtomicU64,
    /// Reversals escalated (unacknowledged after [`ESCALATE_AFTER_ATTEMPTS`] attempts) and
    /// still not acknowledged.
    pub escalated: AtomicU64,
    /// Advices among `pending`.
    pub advices_pending: AtomicU64,
    /// Advices acknowledged (not counted in `acknowledged`).
    pub advices_acknowledged: AtomicU64,
    /// Reversals and advices given up here because another node took over the lease they
    /// were owed under (`crate::fence`): that node delivers them.
    pub handed_over: AtomicU64,
}

/// An escalated reversal, as `/api/reversals` shows it: no card data.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Escalated {
    /// `reversal` or `advice`.
    pub owed: &'static str,
    /// Sequence number of the original's request record.
    pub request_seq: u64,
    /// The acquirer.
    pub acquirer: String,
    /// The original's RRN.
    pub rrn: String,
    /// The original's terminal.
    pub terminal: String,
    /// Amount, minor units.
    pub amount_minor: u64,
    /// Attempts when it was escalated.
    pub attempts: u32,
    /// The reversal's link STAN.
    pub stan: u32,
    /// Unix milliseconds of the escalation.
    pub since_ms: i64,
}

/// The store-and-forward queue.
pub struct StoreAndForward {
    links: Vec<Arc<AcquirerLink>>,
    journal: Option<Journal>,
    slots: Arc<Semaphore>,
    shutdown: CancellationToken,
    /// Escalated reversals by request sequence number; bounded by the queue's slots.
    escalated: Mutex<BTreeMap<u64, Escalated>>,
    /// Requests owed a reversal not yet acknowledged (delivering, deferred, or left for
    /// the next start), by sequence number: journal retention keeps their records. One
    /// entry per reversal queued in this run or recovered; at most the queue's slots plus
    /// those deferred, which are few unless the queue overflowed.
    owed: Mutex<BTreeMap<u64, u32>>,
    /// Requests with a delivery in progress, each with the deliveries waiting to follow it
    /// (a reversal of a stand-in approval waits for its advice). One entry per delivery
    /// task, so at most [`MAX_PENDING_REVERSALS`]; at most two deliveries per request.
    active: Mutex<HashMap<u64, VecDeque<PendingReversal>>>,
    /// Opens the PANs sealed in the journal, for field 2; none without a PAN key file.
    vault: Option<Arc<PanVault>>,
    /// The node's lease, in a cluster: nothing is sent without it, and what another node
    /// took over is left to that node.
    fence: std::sync::OnceLock<Arc<Fence>>,
    /// Counters.
    pub stats: ReversalStats,
}

impl std::fmt::Debug for StoreAndForward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreAndForward")
            .field("pending", &self.stats.pending.load(Ordering::Relaxed))
            .finish()
    }
}

impl StoreAndForward {
    /// A queue delivering over `links`, journaling to `journal`, until `shutdown`; with
    /// `vault`, reversals and advices carry the PAN their records hold sealed.
    pub fn new(
        links: Vec<Arc<AcquirerLink>>,
        journal: Option<Journal>,
        vault: Option<Arc<PanVault>>,
        shutdown: CancellationToken,
    ) -> Arc<StoreAndForward> {
        Arc::new(StoreAndForward {
            links,
            journal,
            slots: Arc::new(Semaphore::new(MAX_PENDING_REVERSALS)),
            shutdown,
            escalated: Mutex::new(BTreeMap::new()),
            owed: Mutex::new(BTreeMap::new()),
            active: Mutex::new(HashMap::new()),
            vault,
            fence: std::sync::OnceLock::new(),
            stats: ReversalStats::default(),
        })
    }

    /// Starts delivering a reversal (or advice) whose `reversal_queued` (`advice_queued`)
    /// record is already durable; after the one in progress for its request, if any.
    pub fn push(self: &Arc<Self>, reversal: PendingReversal) {
        self.hold(reversal.request_seq);
        if reversal.acquirer >= self.links.len() {
            tracing::error!(acquirer = %reversal.original.acquirer, "reversal for an acquirer no longer configured: left in the journal");
            return;
        }
        let request_seq = reversal.request_seq;
        let mut active = self.active.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(waiting) = active.get_mut(&request_seq) {
            waiting.push_back(reversal);
            return;
        }
        let Ok(slot) = Arc::clone(&self.slots).try_acquire_owned() else {
            self.stats.deferred.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(rrn = %reversal.original.rrn, "reversal queue full: this reversal is sent after the next restart");
            return;
        };
        active.insert(request_seq, VecDeque::new());
        drop(active);
        let queue = Arc::clone(self);
        tokio::spawn(async move {
            let mut next = Some(reversal);
            while let Some(reversal) = next.take() {
                let owed = reversal.owed;
                queue.stats.pending.fetch_add(1, Ordering::Relaxed);
                if owed == Owed::Advice {
                    queue.stats.advices_pending.fetch_add(1, Ordering::Relaxed);
                }
                let (outcome, stan) = queue.deliver(reversal).await;
                queue.stats.pending.fetch_sub(1, Ordering::Relaxed);
                if owed == Owed::Advice {
                    queue.stats.advices_pending.fetch_sub(1, Ordering::Relaxed);
                }
                let mut active = queue.active.lock().unwrap_or_else(|e| e.into_inner());
                if outcome == Some(Delivered::Acknowledged) {
                    next = active.get_mut(&request_seq).and_then(VecDeque::pop_front);
                }
                match &mut next {
                    Some(following) => {
                        // A reversal queued behind its advice names the advice by the
                        // STAN it was acknowledged with.
                        if owed == Owed::Advice {
                            if let Some(stan) = stan {
                                following.original.link_stan = stan.get();
                            }
                        }
                    }
                    // Stopping, or the journal failed: what waits stays owed in the
                    // journal and goes after the next start.
                    None => {
                        active.remove(&request_seq);
                    }
                }
            }
            drop(slot);
        });
    }

    /// Sends only while the node holds its lease, and leaves what another node took over
    /// (`crate::fence`); set once, before anything is pushed.
    pub fn set_fence(&self, fence: Arc<Fence>) {
        let _ = self.fence.set(fence);
    }

    /// The links it delivers over.
    pub fn links(&self) -> &[Arc<AcquirerLink>] {
        &self.links
    }

    /// Marks request `request_seq` as owed a reversal whose records the journal must keep
    /// (one queued, or one left for an acquirer no longer configured).
    pub fn hold(&self, request_seq: u64) {
        let mut owed = self.owed.lock().unwrap_or_else(|e| e.into_inner());
        *owed.entry(request_seq).or_insert(0) += 1;
    }

    /// The oldest request still owed a reversal, if any: retention keeps its records.
    pub fn oldest_owed(&self) -> Option<u64> {
        let owed = self.owed.lock().unwrap_or_else(|e| e.into_inner());
        owed.keys().next().copied()
    }

    fn release(&self, request_seq: u64) {
        let mut owed = self.owed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = owed.get_mut(&request_seq) {
            *count -= 1;
            if *count == 0 {
                owed.remove(&request_seq);
            }
        }
    }

    /// The escalated reversals, oldest first (at most `limit`).
    pub fn escalated(&self, limit: usize) -> Vec<Escalated> {
        let escalated = self.escalated.lock().unwrap_or_else(|e| e.into_inner());
        escalated.values().take(limit).cloned().collect()
    }

    /// Delivers `reversal` until it is acknowledged, the journal fails or the switch
    /// stops; how it ended (`None`: stopped) and its STAN on the link.
    async fn deliver(&self, reversal: PendingReversal) -> (Option<Delivered>, Option<Stan>) {
        let link = &self.links[reversal.acquirer];
        let Some(mut delivery) =
            Delivery::new(reversal, crate::clock::now(), self.vault.as_deref())
        else {
            return (None, None);
        };
        // The reversal's STAN on the link, for every attempt; answers to any reach it.
        let mut watch = link.watch(delivery.stan(), &delivery.reversal().original.rrn);
        let mut slot: Option<ReversalSlot<'_>> = None;
        let mut step = delivery.start();
        let outcome = loop {
            if self.shutdown.is_cancelled() {
                break None;
            }
            if let Some(fence) = self.fence.get() {
                if !fence.held() {
                    tokio::select! {
                        _ = self.shutdown.cancelled() => break None,
                        _ = fence.until_held() => {}
                    }
                }
                let token = delivery.reversal().token;
                if delivery.reversal().survivor_delivers(|t| fence.owns(t)) {
                    self.hand_over(&delivery, token).await;
                    break None;
                }
            }
            let event = match step {
                DeliveryStep::Done(outcome) => break Some(outcome),
                DeliveryStep::Reserve { .. } => match link.reserve_reversal_wait().await {
                    Ok(reserved) => {
                        slot = Some(reserved);
                        DeliveryEvent::Reserved(watch.stan())
                    }
                    Err(_) => DeliveryEvent::Unavailable,
                },
                DeliveryStep::Append(records) => {
                    DeliveryEvent::Durable(self.journal_append(&records).await)
                }
                DeliveryStep::Send { stan, .. } => {
                    // The attempt is journaled with its STAN: a reversal of this stand-in
                    // approval names it from now on.
                    if let Some(entry) = &delivery.reversal().entry {
                        entry.set_advice_stan(stan);
                    }
                    let reserved = slot.take().expect("a Send step follows its reservation");
                    self.stats.sent.fetch_add(1, Ordering::Relaxed);
                    if watch.send(&reserved, delivery.message()).is_err() {
                        DeliveryEvent::NoAnswer
                    } else {
                        tokio::select! {
                            _ = self.shutdown.cancelled() => break None,
                            answer = watch.answer() => match answer {
                                Some(answer) => DeliveryEvent::Answered(answer),
                                None => DeliveryEvent::NoAnswer,
                            },
                            _ = tokio::time::sleep(link.timeout()) => DeliveryEvent::NoAnswer,
                        }
                    }
                }
                DeliveryStep::Sleep(wait_ms) => {
                    // A place reserved for an attempt that did not leave goes back.
                    slot = None;
                    tokio::select! {
                        _ = self.shutdown.cancelled() => break None,
                        // An earlier attempt's answer that comes late still acknowledges it.
                        answer = watch.answer() => match answer {
                            Some(answer) => DeliveryEvent::Answered(answer),
                            None => DeliveryEvent::Woke,
                        },
                        _ = tokio::time::sleep(Duration::from_millis(wait_ms)) => DeliveryEvent::Woke,
                        // The acquirer is back: no need to wait out the backoff.
                        _ = link.connected(), if !delivery.is_holding() => DeliveryEvent::Woke,
                    }
                }
            };
            let was_escalated = delivery.escalated();
            step = delivery.handle(event, crate::clock::now());
            if delivery.escalated() && !was_escalated {
                self.escalate(&delivery, watch.stan());
            }
        };
        if delivery.escalated() {
            let request_seq = delivery.reversal().request_seq;
            let mut escalated = self.escalated.lock().unwrap_or_else(|e| e.into_inner());
            if escalated.remove(&request_seq).is_some() {
                self.stats.escalated.fetch_sub(1, Ordering::Relaxed);
            }
        }
        if outcome == Some(Delivered::Acknowledged) {
            self.release(delivery.reversal().request_seq);
            match delivery.reversal().owed {
                Owed::Reversal => &self.stats.acknowledged,
                Owed::Advice => &self.stats.advices_acknowledged,
            }
            .fetch_add(1, Ordering::Relaxed);
            if delivery.escalated() {
                let original = &delivery.reversal().original;
                tracing::info!(rrn = %original.rrn, acquirer = %original.acquirer, attempts = delivery.attempts(), "escalated reversal acknowledged");
            }
        }
        (outcome, Some(watch.stan()))
    }

    /// Gives `delivery` up: another node took over the lease (`token`) it was owed under,
    /// and delivers it. Journaled (`handed_over`), so a restart does not deliver it either.
    async fn hand_over(&self, delivery: &Delivery, token: u64) {
        let pending = delivery.reversal();
        let mut record = pending.original.follow_up(
            RecordKind::HandedOver,
            pending.request_seq,
            crate::clock::now().unix_ms(),
        );
        record.private_data = format!("lease={token}");
        if let Err(e) = self.journal_append(&[record]).await {
            tracing::warn!(error = %e, "journaling a reversal handed over failed: the next start finds it handed over from the lease");
        }
        self.release(pending.request_seq);
        self.stats.handed_over.fetch_add(1, Ordering::Relaxed);
        tracing::info!(rrn = %pending.original.rrn, acquirer = %pending.original.acquirer, "reversal left to the node that took this node's lease over");
    }

    fn escalate(&self, delivery: &Delivery, stan: Stan) {
        let original = &delivery.reversal().original;
        tracing::warn!(rrn = %original.rrn, terminal = %original.terminal, acquirer = %original.acquirer, attempts = delivery.attempts(), "reversal unacknowledged: escalated, repeated every minute until the acquirer answers");
        let entry = Escalated {
            owed: match delivery.reversal().owed {
                Owed::Reversal => "reversal",
                Owed::Advice => "advice",
            },
            request_seq: delivery.reversal().request_seq,
            acquirer: original.acquirer.clone(),
            rrn: original.rrn.clone(),
            terminal: original.terminal.clone(),
            amount_minor: original.amount_minor,
            attempts: delivery.attempts(),
            stan: stan.get(),
            since_ms: crate::clock::now().unix_ms(),
        };
        let mut escalated = self.escalated.lock().unwrap_or_else(|e| e.into_inner());
        if escalated.insert(entry.request_seq, entry).is_none() {
            self.stats.escalated.fetch_add(1, Ordering::Relaxed);
        }
    }

    async fn journal_append(&self, records: &[Record]) -> Result<u64, JournalError> {
        match &self.journal {
            Some(journal) => journal.append(records).await,
            None => Ok(0),
        }
    }
}

/// First wait before repeating a reversal, milliseconds.
const RETRY_BACKOFF_START_MS: u64 = 200;
/// Longest wait between attempts: an acquirer that comes back gets its reversals within
/// this.
const RETRY_BACKOFF_MAX_MS: u64 = 10_000;
/// Unanswered attempts after which a reversal is escalated: about a minute of retries.
pub const ESCALATE_AFTER_ATTEMPTS: u32 = 10;
/// No reversal leaves within this long of its record's time (the forwarding, or the
/// queueing after it): an original still in the network — delayed, or sent just before a
/// crash and reversed at once by the restart — must reach the acquirer first, or the
/// reversal finds nothing to reverse and the late original stands. Longer than the
/// default acquirer timeout with room for the network; reversals are store-and-forward,
/// so the wait costs nothing but a few seconds.
pub const REVERSAL_HOLD_MS: i64 = 5_000;
/// Wait between attempts of an escalated reversal: slow, but never given up.
const ESCALATED_RETRY_MS: u64 = 60_000;

/// What a [`Delivery`] asks its driver to do next.
#[derive(Debug)]
pub enum DeliveryStep {
    /// Take a reversal place on the acquirer's link; answer [`DeliveryEvent::Reserved`]
    /// with the reversal's STAN there (`stan` when given: the same on every attempt), or
    /// [`DeliveryEvent::Unavailable`].
    Reserve {
        /// The acquirer.
        acquirer: AcquirerIndex,
        /// The reversal's STAN, once it has one.
        stan: Option<Stan>,
    },
    /// Append these records and wait until durable; answer [`DeliveryEvent::Durable`].
    Append(Vec<Record>),
    /// Send [`Delivery::message`] on the place reserved and wait for an answer, to this
    /// attempt or an earlier one, up to the link's timeout; answer
    /// [`DeliveryEvent::Answered`] or [`DeliveryEvent::NoAnswer`].
    Send {
        /// The acquirer.
        acquirer: AcquirerIndex,
        /// The reversal's STAN.
        stan: Stan,
    },
    /// Wait this many milliseconds, or until an answer to an earlier attempt comes;
    /// answer [`DeliveryEvent::Woke`] or [`DeliveryEvent::Answered`].
    Sleep(u64),
    /// The delivery is over.
    Done(Delivered),
}

/// How a delivery ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivered {
    /// The acquirer answered and the answer is journaled.
    Acknowledged,
    /// The journal stopped: the reversal stays queued in the journal for the next start.
    LeftForRestart,
}

/// What happened, in answer to the last [`DeliveryStep`].
// Moved once per step: boxing the acquirer's answer would cost an allocation each.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum DeliveryEvent {
    /// A place on the link, and the reversal's STAN there.
    Reserved(Stan),
    /// The link is down or full: nothing was sent.
    Unavailable,
    /// The appended records are durable (or why not).
    Durable(Result<u64, JournalError>),
    /// The acquirer's 0410, to this attempt or an earlier one.
    Answered(Message),
    /// No answer in time, or nothing sent.
    NoAnswer,
    /// The wait is over.
    Woke,
}

#[derive(Debug)]
enum DeliveryState {
    Idle,
    Reserving,
    JournalingAttempt { stan: Stan },
    Sending,
    JournalingAck,
    Sleeping,
    Done,
}

/// One reversal's delivery, as a state machine that performs no I/O and reads no clock:
/// reserve a place on the acquirer's link, journal the attempt, send, and journal the
/// acknowledgement; back off and repeat while the acquirer does not answer. An answer to
/// any attempt acknowledges the reversal, also one that comes while it waits to repeat.
#[derive(Debug)]
pub struct Delivery {
    reversal: PendingReversal,
    message: Message,
    stan: Option<Stan>,
    attempt: u32,
    backoff_ms: u64,
    /// The last attempt's record and when it was sent.
    last_sent: Option<(Record, Now)>,
    state: DeliveryState,
    /// How long to wait before the first attempt ([`REVERSAL_HOLD_MS`] from its record).
    hold_ms: u64,
}

impl Delivery {
    /// The delivery of `reversal`, its 0400 stamped `now`, with the PAN in field 2 when
    /// its record holds it sealed and `vault` opens it; `None` when the journal record
    /// cannot make a reversal (logged).
    pub fn new(reversal: PendingReversal, now: Now, vault: Option<&PanVault>) -> Option<Delivery> {
        let stamped = UtcDateTime::from_unix_ms(u64::try_from(now.unix_ms()).unwrap_or(0));
        let original = &reversal.original;
        let pan = match (vault, &original.pan_sealed) {
            (Some(vault), Some(sealed)) => {
                let pan = vault.open(sealed, original.pan_hash);
                if pan.is_none() {
                    tracing::warn!(rrn = %original.rrn, key = sealed.key, "the sealed PAN does not open (its key is not in the key file): sent without field 2");
                }
                pan
            }
            _ => None,
        };
        let message = match reversal.owed {
            Owed::Reversal => reversal_message(original, stamped, pan.as_ref()),
            Owed::Advice => advice_message(original, stamped, pan.as_ref()),
        };
        let Some(mut message) = message else {
            tracing::error!(rrn = %reversal.original.rrn, "cannot build a reversal or advice from the journal record");
            return None;
        };
        if reversal.attempts > 0 {
            message = as_repeat(&message);
        }
        // An advice has no hold: nothing of its request was ever sent.
        let reversal_time_ms = match reversal.owed {
            Owed::Reversal => reversal.original.time_ms,
            Owed::Advice => i64::MIN / 2,
        };
        Some(Delivery {
            stan: reversal.stan,
            attempt: reversal.attempts,
            reversal,
            message,
            backoff_ms: RETRY_BACKOFF_START_MS,
            last_sent: None,
            state: DeliveryState::Idle,
            hold_ms: u64::try_from(
                (reversal_time_ms + REVERSAL_HOLD_MS).saturating_sub(now.unix_ms()),
            )
            .unwrap_or(0),
        })
    }

    /// The reversal being delivered.
    pub fn reversal(&self) -> &PendingReversal {
        &self.reversal
    }

    /// The message to send: 0400, then 0401 for every repeat (the link puts the
    /// reversal's STAN in field 11).
    pub fn message(&self) -> &Message {
        &self.message
    }

    /// The reversal's link STAN, once it has one.
    pub fn stan(&self) -> Option<Stan> {
        self.stan
    }

    /// Attempts sent so far.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// Unacknowledged after [`ESCALATE_AFTER_ATTEMPTS`] attempts.
    pub fn escalated(&self) -> bool {
        self.attempt >= ESCALATE_AFTER_ATTEMPTS
    }

    /// Whether a [`DeliveryEvent::Answered`] is taken now: while an attempt is out or
    /// while it waits to repeat.
    pub fn awaits_answer(&self) -> bool {
        matches!(self.state, DeliveryState::Sending | DeliveryState::Sleeping)
    }

    /// Whether an attempt is out, waiting for its answer or its timeout.
    pub fn is_sending(&self) -> bool {
        matches!(self.state, DeliveryState::Sending)
    }

    /// Whether it waits to repeat.
    pub fn is_sleeping(&self) -> bool {
        matches!(self.state, DeliveryState::Sleeping)
    }

    /// Whether it waits out [`REVERSAL_HOLD_MS`] before its first attempt: a link that
    /// comes up must not cut that wait short.
    pub fn is_holding(&self) -> bool {
        self.is_sleeping() && self.hold_ms > 0
    }

    /// The first step.
    pub fn start(&mut self) -> DeliveryStep {
        assert!(
            matches!(self.state, DeliveryState::Idle),
            "delivery started twice"
        );
        let hold = self.hold_ms;
        if hold > 0 {
            self.state = DeliveryState::Sleeping;
            return DeliveryStep::Sleep(hold);
        }
        self.reserve()
    }

    fn reserve(&mut self) -> DeliveryStep {
        self.state = DeliveryState::Reserving;
        DeliveryStep::Reserve {
            acquirer: self.reversal.acquirer,
            stan: self.stan,
        }
    }

    fn back_off(&mut self) -> DeliveryStep {
        let wait = if self.escalated() {
            ESCALATED_RETRY_MS
        } else {
            self.backoff_ms
        };
        self.backoff_ms = (self.backoff_ms * 2).min(RETRY_BACKOFF_MAX_MS);
        if self.attempt > 0 && !self.message.mti().is_repeat() {
            // Sent once: every later attempt is a repeat of it.
            self.message = as_repeat(&self.message);
        }
        self.state = DeliveryState::Sleeping;
        DeliveryStep::Sleep(wait)
    }

    /// What happened in answer to the last step; returns the next.
    ///
    /// # Panics
    /// When `event` does not answer the last step: a driver bug.
    pub fn handle(&mut self, event: DeliveryEvent, now: Now) -> DeliveryStep {
        let reversal = &self.reversal;
        match (
            std::mem::replace(&mut self.state, DeliveryState::Done),
            event,
        ) {
            (DeliveryState::Reserving, DeliveryEvent::Unavailable) => self.back_off(),
            (DeliveryState::Reserving, DeliveryEvent::Reserved(stan)) => {
                // Only an attempt that can leave is journaled as sent.
                self.attempt += 1;
                self.stan = Some(stan);
                let sent = attempt_record(reversal, self.attempt, stan.get(), now);
                self.last_sent = Some((sent.clone(), now));
                self.state = DeliveryState::JournalingAttempt { stan };
                DeliveryStep::Append(vec![sent])
            }
            (DeliveryState::JournalingAttempt { stan }, DeliveryEvent::Durable(durable)) => {
                match durable {
                    // An advice leaves only with its STAN durable: sent under a STAN the
                    // journal lost, its repeat after a crash would carry another one, and
                    // an acquirer that tells advices apart by STAN would book it twice.
                    Err(JournalError::Overloaded) if reversal.owed == Owed::Advice => {
                        self.attempt -= 1;
                        self.last_sent = None;
                        self.back_off()
                    }
                    // The replicated stream did not acknowledge it (no quorum for a
                    // moment: a server lost, a leader elected): tried again after the
                    // backoff, as the stream comes back within seconds. Given up, as on
                    // a stopped journal, it would wait for a restart that a cluster node
                    // may never have (the process test killing a NATS server showed an
                    // approval never reversed).
                    Err(JournalError::Unreplicated) => {
                        self.attempt -= 1;
                        self.last_sent = None;
                        self.back_off()
                    }
                    // The disk is behind: the reversal goes (field 90 names its original
                    // whatever its STAN), and the next attempt is journaled.
                    Ok(_) | Err(JournalError::Overloaded) => {
                        if let Some((_, since)) = &mut self.last_sent {
                            *since = now;
                        }
                        self.state = DeliveryState::Sending;
                        DeliveryStep::Send {
                            acquirer: reversal.acquirer,
                            stan,
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, rrn = %reversal.original.rrn, "reversal not journaled: left for the next start");
                        DeliveryStep::Done(Delivered::LeftForRestart)
                    }
                }
            }
            (DeliveryState::Sending, DeliveryEvent::NoAnswer) => self.back_off(),
            (DeliveryState::Sending | DeliveryState::Sleeping, DeliveryEvent::Answered(answer)) => {
                // No attempt sent by this run (one sent before a restart was answered):
                // the acknowledgement is built from the original, as an attempt would be.
                let (mut ack, since) = self.last_sent.take().unwrap_or_else(|| {
                    let stan = self.stan.map_or(0, |s| s.get());
                    (attempt_record(reversal, self.attempt, stan, now), now)
                });
                ack.kind = match reversal.owed {
                    Owed::Reversal => RecordKind::ReversalAck,
                    Owed::Advice => RecordKind::AdviceAck,
                };
                ack.time_ms = now.unix_ms();
                ack.code = answer
                    .get_str(fields::RESPONSE_CODE)
                    .unwrap_or("")
                    .to_string();
                ack.acquirer_us = u64::try_from(now.unix_us - since.unix_us).unwrap_or(0);
                self.state = DeliveryState::JournalingAck;
                DeliveryStep::Append(vec![ack])
            }
            (DeliveryState::JournalingAck, DeliveryEvent::Durable(durable)) => match durable {
                Ok(_) => DeliveryStep::Done(Delivered::Acknowledged),
                Err(e) => {
                    tracing::error!(error = %e, rrn = %reversal.original.rrn, "reversal acknowledgement not journaled: sent again after the next start");
                    DeliveryStep::Done(Delivered::LeftForRestart)
                }
            },
            (DeliveryState::Sleeping, DeliveryEvent::Woke) => {
                self.hold_ms = 0;
                self.reserve()
            }
            (state, event) => panic!("reversal delivery: {event:?} does not answer {state:?}"),
        }
    }
}

/// The `reversal_sent` record of attempt `attempt` of `reversal`, carrying its link STAN
/// `stan`, made `now`.
fn attempt_record(reversal: &PendingReversal, attempt: u32, stan: u32, now: Now) -> Record {
    let original = &reversal.original;
    let kind = match reversal.owed {
        Owed::Reversal => RecordKind::ReversalSent,
        Owed::Advice => RecordKind::AdviceSent,
    };
    let mut sent = original.follow_up(kind, reversal.request_seq, now.unix_ms());
    sent.acquirer = original.acquirer.clone();
    sent.link_stan = original.link_stan;
    if reversal.owed == Owed::Advice {
        // What the advice tells the acquirer, on each of its records.
        sent.code = original.code.clone();
        sent.approval_code = original.approval_code.clone();
    }
    sent.attempt = attempt;
    sent.reversal_stan = stan;
    sent
}

/// `message` as a repeat: 0401 for a 0400, 0421 for a 0420, 0121 for a 0120 (the
/// origin digit made odd); a repeat unchanged.
fn as_repeat(message: &Message) -> Message {
    let mti = message.mti();
    if mti.is_repeat() {
        return message.clone();
    }
    let mut digits = *mti.as_bytes();
    digits[3] += 1;
    let repeat = Mti::parse(&digits).unwrap_or(mti);
    message.to_builder().set_mti(repeat).build()
}

/// The advice of the stand-in approval recorded in `queued` (its `advice_queued` record),
/// sent at `now`: 0120 for an authorization (x20 for the original's class: 0220 for a
/// 0200) with the PAN when known, the original's amount, RRN, terminal and merchant, the
/// switch's approval code (38) and response code (39), and `stand_in=1` in field 48.
pub fn advice_message(queued: &Record, now: UtcDateTime, pan: Option<&Pan>) -> Option<Message> {
    let mut digits: [u8; 4] = queued.mti.as_bytes().try_into().ok()?;
    digits[2] = b'2';
    digits[3] = b'0';
    let mti = Mti::parse(&digits).ok()?;
    let mut b = Message::builder(mti);
    if let Some(pan) = pan {
        b.set(fields::PAN, pan.expose()).ok()?;
    }
    b.set_str(fields::PROCESSING_CODE, &queued.processing_code)
        .ok()?
        .set_str(fields::AMOUNT, &format!("{:012}", queued.amount_minor))
        .ok()?
        .set_str(fields::TRANSMISSION_TIME, &now.transmission_time())
        .ok()?
        // The link puts its own STAN here.
        .set_str(fields::STAN, "000000")
        .ok()?
        .set_str(fields::RRN, &queued.rrn)
        .ok()?
        .set_str(fields::APPROVAL_CODE, &queued.approval_code)
        .ok()?
        .set_str(fields::RESPONSE_CODE, &queued.code)
        .ok()?
        .set_str(fields::TERMINAL, &queued.terminal)
        .ok()?
        .set_str(fields::MERCHANT, &queued.merchant)
        .ok()?
        .set_str(fields::PRIVATE_DATA, "stand_in=1")
        .ok()?
        .set_str(fields::CURRENCY, &format!("{:03}", queued.currency))
        .ok()?;
    Some(b.build())
}

/// The 0400 reversing the forwarded original `original`, sent at `now`, with the PAN in
/// field 2 when known.
pub fn reversal_message(original: &Record, now: UtcDateTime, pan: Option<&Pan>) -> Option<Message> {
    let original_data = format!(
        "{}{:06}{}{:011}{:011}",
        original.mti, original.link_stan, original.transmission_time, 0, 0
    );
    let mut b = Message::builder(Mti::REVERSAL_REQUEST);
    if let Some(pan) = pan {
        b.set(fields::PAN, pan.expose()).ok()?;
    }
    b.set_str(fields::PROCESSING_CODE, &original.processing_code)
        .ok()?
        .set_str(fields::AMOUNT, &format!("{:012}", original.amount_minor))
        .ok()?
        .set_str(fields::TRANSMISSION_TIME, &now.transmission_time())
        .ok()?
        // The link puts its own STAN here.
        .set_str(fields::STAN, "000000")
        .ok()?
        .set_str(fields::RRN, &original.rrn)
        .ok()?
        .set_str(fields::TERMINAL, &original.terminal)
        .ok()?
        .set_str(fields::MERCHANT, &original.merchant)
        .ok()?
        .set_str(fields::CURRENCY, &format!("{:03}", original.currency))
        .ok()?
        .set_str(fields::ORIGINAL_DATA, &original_data)
        .ok()?;
    Some(b.build())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::record::tests::sample;

    const T0: Now = Now {
        unix_us: 1_764_000_000_000_000,
    };

    fn pending(stan: Option<Stan>, attempts: u32) -> PendingReversal {
        let mut original = sample(RecordKind::Forwarded);
        original.link_stan = 42;
        // Forwarded long enough ago that no hold applies (see the test of the hold).
        original.time_ms = T0.unix_ms() - REVERSAL_HOLD_MS;
        PendingReversal {
            request_seq: 7,
            acquirer: 0,
            original,
            stan,
            attempts,
            ..PendingReversal::default()
        }
    }

    fn answer(delivery: &Delivery) -> Message {
        crate::ingress::validate::respond(delivery.message(), b"00", None, "")
    }

    /// Reserve, journal and send one attempt; the step after the send.
    fn attempt(delivery: &mut Delivery, step: DeliveryStep, stan: Stan) -> DeliveryStep {
        assert!(matches!(step, DeliveryStep::Reserve { .. }), "{step:?}");
        let step = delivery.handle(DeliveryEvent::Reserved(stan), T0);
        let DeliveryStep::Append(records) = step else {
            panic!("{step:?}")
        };
        assert_eq!(records[0].kind, RecordKind::ReversalSent);
        assert_eq!(records[0].reversal_stan, stan.get());
        assert_eq!(records[0].attempt, delivery.attempts());
        delivery.handle(DeliveryEvent::Durable(Ok(1)), T0)
    }

    #[test]
    fn a_reversal_waits_until_its_original_cannot_still_be_on_its_way() {
        let mut fresh = pending(None, 0);
        fresh.original.time_ms = T0.unix_ms() - 1_000;
        let mut delivery = Delivery::new(fresh, T0, None).unwrap();
        let step = delivery.start();
        assert!(
            matches!(step, DeliveryStep::Sleep(ms) if ms == (REVERSAL_HOLD_MS - 1_000) as u64),
            "{step:?}"
        );
        assert!(delivery.is_holding());
        let step = delivery.handle(DeliveryEvent::Woke, T0);
        assert!(matches!(step, DeliveryStep::Reserve { .. }), "{step:?}");
        assert!(!delivery.is_holding());
    }

    #[test]
    fn an_attempt_the_replicated_stream_did_not_take_is_tried_again_not_left() {
        let stan = Stan::new(500).unwrap();
        let mut delivery = Delivery::new(pending(None, 0), T0, None).unwrap();
        let step = delivery.start();
        assert!(matches!(step, DeliveryStep::Reserve { .. }), "{step:?}");
        let step = delivery.handle(DeliveryEvent::Reserved(stan), T0);
        assert!(matches!(step, DeliveryStep::Append(_)), "{step:?}");
        let step = delivery.handle(DeliveryEvent::Durable(Err(JournalError::Unreplicated)), T0);
        assert!(matches!(step, DeliveryStep::Sleep(_)), "{step:?}");
        // Back, it goes as the first attempt: a 0400, not a repeat.
        let step = delivery.handle(DeliveryEvent::Woke, T0);
        assert!(matches!(step, DeliveryStep::Reserve { .. }), "{step:?}");
        let step = delivery.handle(DeliveryEvent::Reserved(stan), T0);
        assert!(matches!(step, DeliveryStep::Append(_)), "{step:?}");
        let step = delivery.handle(DeliveryEvent::Durable(Ok(3)), T0);
        assert!(matches!(step, DeliveryStep::Send { .. }), "{step:?}");
        assert_eq!(delivery.message().mti(), Mti::REVERSAL_REQUEST);
    }

    #[test]
    fn every_retry_is_a_repeat_of_the_same_reversal() {
        let stan = Stan::new(500).unwrap();
        let mut delivery = Delivery::new(pending(None, 0), T0, None).unwrap();
        let mut step = delivery.start();
        assert!(matches!(step, DeliveryStep::Reserve { stan: None, .. }));
        for n in 1..=3 {
            step = attempt(&mut delivery, step, stan);
            let DeliveryStep::Send { stan: sent, .. } = step else {
                panic!("{step:?}")
            };
            assert_eq!(sent, stan, "attempt {n} carries the reversal's STAN");
            let expected = if n == 1 {
                Mti::REVERSAL_REQUEST
            } else {
                Mti::REVERSAL_REQUEST_REPEAT
            };
            assert_eq!(delivery.message().mti(), expected, "attempt {n}");
            step = delivery.handle(DeliveryEvent::NoAnswer, T0);
            assert!(matches!(step, DeliveryStep::Sleep(_)), "{step:?}");
            step = delivery.handle(DeliveryEvent::Woke, T0);
            assert!(
                matches!(step, DeliveryStep::Reserve { stan: Some(s), .. } if s == stan),
                "{step:?}"
            );
        }
        // Field 90 names the original, not the reversal, on every attempt.
        let data = delivery.message().get_str(fields::ORIGINAL_DATA).unwrap();
        assert_eq!(&data[..10], "0100000042");
    }

    #[test]
    fn a_late_answer_while_waiting_to_repeat_acknowledges_the_reversal() {
        let stan = Stan::new(9).unwrap();
        let mut delivery = Delivery::new(pending(None, 0), T0, None).unwrap();
        let step = delivery.start();
        let step = attempt(&mut delivery, step, stan);
        assert!(matches!(step, DeliveryStep::Send { .. }));
        let step = delivery.handle(DeliveryEvent::NoAnswer, T0);
        assert!(matches!(step, DeliveryStep::Sleep(_)));
        assert!(delivery.awaits_answer());
        let late = answer(&delivery);
        let step = delivery.handle(DeliveryEvent::Answered(late), T0);
        let DeliveryStep::Append(records) = step else {
            panic!("{step:?}")
        };
        assert_eq!(records[0].kind, RecordKind::ReversalAck);
        assert_eq!(records[0].code, "00");
        assert_eq!(records[0].reversal_stan, 9);
        let step = delivery.handle(DeliveryEvent::Durable(Ok(2)), T0);
        assert!(matches!(step, DeliveryStep::Done(Delivered::Acknowledged)));
    }

    #[test]
    fn an_unanswered_reversal_is_escalated_and_retried_slowly_never_dropped() {
        let stan = Stan::new(77).unwrap();
        let mut delivery = Delivery::new(pending(None, 0), T0, None).unwrap();
        let mut step = delivery.start();
        let mut waits = Vec::new();
        for _ in 0..ESCALATE_AFTER_ATTEMPTS + 3 {
            let sent = attempt(&mut delivery, step, stan);
            assert!(matches!(sent, DeliveryStep::Send { .. }), "{sent:?}");
            step = delivery.handle(DeliveryEvent::NoAnswer, T0);
            let DeliveryStep::Sleep(wait) = step else {
                panic!("{step:?}")
            };
            waits.push(wait);
            step = delivery.handle(DeliveryEvent::Woke, T0);
        }
        assert!(delivery.escalated());
        assert_eq!(waits[0], RETRY_BACKOFF_START_MS);
        assert!(waits.windows(2).all(|w| w[0] <= w[1]), "{waits:?}");
        assert_eq!(
            waits[ESCALATE_AFTER_ATTEMPTS as usize - 2],
            RETRY_BACKOFF_MAX_MS
        );
        assert_eq!(*waits.last().unwrap(), ESCALATED_RETRY_MS);
        assert!(matches!(step, DeliveryStep::Reserve { .. }), "still trying");
    }

    #[test]
    fn after_a_restart_the_next_attempt_repeats_with_the_journaled_stan() {
        let stan = Stan::new(123_456).unwrap();
        let mut delivery = Delivery::new(pending(Some(stan), 2), T0, None).unwrap();
        assert_eq!(delivery.message().mti(), Mti::REVERSAL_REQUEST_REPEAT);
        let step = delivery.start();
        assert!(
            matches!(step, DeliveryStep::Reserve { stan: Some(s), .. } if s == stan),
            "{step:?}"
        );
        let step = attempt(&mut delivery, step, stan);
        assert!(matches!(step, DeliveryStep::Send { .. }));
        assert_eq!(delivery.attempts(), 3);
    }

    #[test]
    fn an_advice_is_sent_at_once_as_0120_repeated_as_0121_and_acknowledged_by_0130() {
        let mut queued = sample(RecordKind::AdviceQueued);
        queued.approval_code = "S1A2B3".into();
        // Just now: an advice has no hold.
        queued.time_ms = T0.unix_ms();
        let advice = PendingReversal {
            owed: Owed::Advice,
            request_seq: 7,
            acquirer: 0,
            original: queued,
            ..PendingReversal::default()
        };
        let stan = Stan::new(31).unwrap();
        let vault = PanVault::from_keys(&[(1, [9; 32])]).unwrap();
        let mut advice = advice;
        advice.original.pan_sealed =
            Some(vault.seal(b"4111111111111111", advice.original.pan_hash));
        let mut delivery = Delivery::new(advice, T0, Some(&vault)).unwrap();
        assert_eq!(
            delivery.message().get(fields::PAN),
            Some(&b"4111111111111111"[..]),
            "the PAN sealed in the journal, in field 2"
        );
        assert_eq!(delivery.message().mti(), Mti::AUTHORIZATION_ADVICE);
        assert_eq!(
            delivery.message().get_str(fields::APPROVAL_CODE),
            Some("S1A2B3")
        );
        assert_eq!(
            delivery.message().get_str(fields::RESPONSE_CODE),
            Some("00")
        );
        assert_eq!(
            delivery.message().get_str(fields::RRN),
            Some("533012000001")
        );
        assert!(!delivery.message().has(fields::ORIGINAL_DATA));
        let step = delivery.start();
        assert!(
            matches!(step, DeliveryStep::Reserve { .. }),
            "no hold: {step:?}"
        );
        let step = delivery.handle(DeliveryEvent::Reserved(stan), T0);
        let DeliveryStep::Append(records) = step else {
            panic!("{step:?}")
        };
        assert_eq!(records[0].kind, RecordKind::AdviceSent);
        assert_eq!(records[0].approval_code, "S1A2B3");
        let step = delivery.handle(DeliveryEvent::Durable(Ok(1)), T0);
        assert!(matches!(step, DeliveryStep::Send { .. }), "{step:?}");
        let step = delivery.handle(DeliveryEvent::NoAnswer, T0);
        assert!(matches!(step, DeliveryStep::Sleep(_)), "{step:?}");
        assert_eq!(delivery.message().mti(), Mti::AUTHORIZATION_ADVICE_REPEAT);
        let response = crate::ingress::validate::respond(delivery.message(), b"00", None, "");
        assert_eq!(response.mti(), Mti::AUTHORIZATION_ADVICE_RESPONSE);
        let step = delivery.handle(DeliveryEvent::Answered(response), T0);
        let DeliveryStep::Append(records) = step else {
            panic!("{step:?}")
        };
        assert_eq!(records[0].kind, RecordKind::AdviceAck);
        assert_eq!(records[0].reversal_stan, 31);
    }

    #[test]
    fn after_a_takeover_a_survivor_delivers_what_its_journal_showed_owed_and_nothing_else() {
        // Lease 5 was taken over; this node holds 9 now.
        let owns = |token: u64| token >= 6;
        let owed = |settled: bool, queued_token: u64| PendingReversal {
            token: 5,
            settled,
            queued_token,
            journaled: queued_token != 0,
            ..PendingReversal::default()
        };
        // Left in doubt under 5 (no durable answer): the survivor reversed it.
        assert!(owed(false, 0).survivor_delivers(owns));
        assert!(owed(false, 9).survivor_delivers(owns));
        // Answered durably, its reversal queued under 5: the survivor delivers it.
        assert!(owed(true, 5).survivor_delivers(owns));
        // Answered durably under 5, reversed (a gateway's 0400) under 9, or queued only in
        // memory: the survivor never saw it owed — this node's.
        assert!(!owed(true, 9).survivor_delivers(owns));
        assert!(!owed(true, 0).survivor_delivers(owns));
        // Sent under a lease this node still owns: its own.
        let own = PendingReversal {
            token: 9,
            ..PendingReversal::default()
        };
        assert!(!own.survivor_delivers(owns));
    }
}
