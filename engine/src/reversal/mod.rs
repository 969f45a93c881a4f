//! Store-and-forward of reversals: what the switch owes acquirers.
//!
//! An authorization that may have been approved at an acquirer but whose approval did not
//! reach the gateway — a timeout, a lost connection, a crash with it in flight, or a
//! gateway's own 0400/0420 — is reversed. The reversal is journaled as queued first, then
//! sent (each attempt journaled) with backoff until the acquirer answers 0410 (any code),
//! which is journaled as the acknowledgement. After a restart the journal's queued and
//! unacknowledged reversals are queued again (`crate::recovery`).
//!
//! A reversal is built from the journal's record of the forwarded original: 0400 with the
//! original's amount, RRN, terminal and merchant, and field 90 naming the original by its
//! MTI, the STAN the acquirer saw (the switch's link STAN) and its transmission time. It
//! carries no PAN: the journal never holds one, and field 90 with the RRN identifies the
//! original at the acquirer.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use payswitch_protocol::time::UtcDateTime;
use payswitch_protocol::{fields, Message, Mti, Stan};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::acquirer::AcquirerLink;
use crate::clock::Now;
use crate::journal::{Journal, JournalError, Record, RecordKind};
use crate::routing::AcquirerIndex;

/// Reversals being delivered at once. Each is a task holding one message; 100 k is far
/// beyond any real backlog (an acquirer down for minutes at high load) and a few tens of
/// MiB. Past it a reversal stays queued in the journal only and is sent after a restart.
pub const MAX_PENDING_REVERSALS: usize = 100_000;

/// First wait before resending a reversal, milliseconds.
const RETRY_BACKOFF_START_MS: u64 = 200;
/// Longest wait between attempts: an acquirer that comes back gets its reversals within
/// this.
const RETRY_BACKOFF_MAX_MS: u64 = 10_000;

/// A reversal to deliver.
#[derive(Debug, Clone)]
pub struct PendingReversal {
    /// Sequence number of the original request's journal record.
    pub request_seq: u64,
    /// The acquirer that handled the original.
    pub acquirer: AcquirerIndex,
    /// The `forwarded` record of the original (identity, acquirer, link STAN).
    pub original: Record,
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
}

/// The store-and-forward queue.
pub struct StoreAndForward {
    links: Vec<Arc<AcquirerLink>>,
    journal: Option<Journal>,
    slots: Arc<Semaphore>,
    shutdown: CancellationToken,
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
    /// A queue delivering over `links`, journaling to `journal`, until `shutdown`.
    pub fn new(
        links: Vec<Arc<AcquirerLink>>,
        journal: Option<Journal>,
        shutdown: CancellationToken,
    ) -> Arc<StoreAndForward> {
        Arc::new(StoreAndForward {
            links,
            journal,
            slots: Arc::new(Semaphore::new(MAX_PENDING_REVERSALS)),
            shutdown,
            stats: ReversalStats::default(),
        })
    }

    /// Starts delivering a reversal whose `reversal_queued` record is already durable.
    pub fn push(self: &Arc<Self>, reversal: PendingReversal) {
        let Ok(slot) = Arc::clone(&self.slots).try_acquire_owned() else {
            self.stats.deferred.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(rrn = %reversal.original.rrn, "reversal queue full: this reversal is sent after the next restart");
            return;
        };
        if reversal.acquirer >= self.links.len() {
            tracing::error!(acquirer = %reversal.original.acquirer, "reversal for an acquirer no longer configured: left in the journal");
            return;
        }
        self.stats.pending.fetch_add(1, Ordering::Relaxed);
        let queue = Arc::clone(self);
        tokio::spawn(async move {
            queue.deliver(reversal).await;
            queue.stats.pending.fetch_sub(1, Ordering::Relaxed);
            drop(slot);
        });
    }

    async fn deliver(&self, reversal: PendingReversal) {
        let link = &self.links[reversal.acquirer];
        let Some(mut delivery) = Delivery::new(reversal, crate::clock::now()) else {
            return;
        };
        let mut reservation = None;
        let mut step = delivery.start();
        loop {
            if self.shutdown.is_cancelled() {
                return;
            }
            let event = match step {
                DeliveryStep::Done(outcome) => {
                    if outcome == Delivered::Acknowledged {
                        self.stats.acknowledged.fetch_add(1, Ordering::Relaxed);
                    }
                    return;
                }
                DeliveryStep::Reserve(_) => match link.reserve() {
                    Ok(reserved) => {
                        let stan = reserved.stan();
                        reservation = Some(reserved);
                        DeliveryEvent::Reserved(stan)
                    }
                    Err(_) => DeliveryEvent::Unavailable,
                },
                DeliveryStep::Append(records) => {
                    DeliveryEvent::Durable(self.journal_append(&records).await)
                }
                DeliveryStep::Send { .. } => {
                    let reserved = reservation
                        .take()
                        .expect("a Send step follows its reservation");
                    self.stats.sent.fetch_add(1, Ordering::Relaxed);
                    let answered = tokio::select! {
                        _ = self.shutdown.cancelled() => return,
                        answered = reserved.send(delivery.message()) => answered,
                    };
                    match answered {
                        Ok(answer) => DeliveryEvent::Answered(answer),
                        Err(_) => DeliveryEvent::NoAnswer,
                    }
                }
                DeliveryStep::Sleep(wait_ms) => {
                    tokio::select! {
                        _ = self.shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(wait_ms)) => {}
                    }
                    DeliveryEvent::Woke
                }
            };
            step = delivery.handle(event, crate::clock::now());
        }
    }

    async fn journal_append(&self, records: &[Record]) -> Result<u64, JournalError> {
        match &self.journal {
            Some(journal) => journal.append(records).await,
            None => Ok(0),
        }
    }
}

/// What a [`Delivery`] asks its driver to do next.
#[derive(Debug)]
pub enum DeliveryStep {
    /// Take a place and a STAN on the acquirer's link; answer
    /// [`DeliveryEvent::Reserved`] or [`DeliveryEvent::Unavailable`].
    Reserve(AcquirerIndex),
    /// Append these records and wait until durable; answer [`DeliveryEvent::Durable`].
    Append(Vec<Record>),
    /// Send [`Delivery::message`] on the place reserved and wait for the answer; answer
    /// [`DeliveryEvent::Answered`] or [`DeliveryEvent::NoAnswer`].
    Send {
        /// The acquirer.
        acquirer: AcquirerIndex,
        /// The STAN reserved.
        stan: Stan,
    },
    /// Wait this many milliseconds; answer [`DeliveryEvent::Woke`].
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
    /// A place on the link.
    Reserved(Stan),
    /// The link is down or full: nothing was sent.
    Unavailable,
    /// The appended records are durable (or why not).
    Durable(Result<u64, JournalError>),
    /// The acquirer's 0410.
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
    JournalingAttempt { stan: Stan, sent: Record },
    Sending { sent: Record, since: Now },
    JournalingAck,
    Sleeping,
    Done,
}

/// One reversal's delivery, as a state machine that performs no I/O and reads no clock:
/// reserve a place on the acquirer's link, journal the attempt, send, and journal the
/// acknowledgement; back off and try again while the acquirer does not answer.
#[derive(Debug)]
pub struct Delivery {
    reversal: PendingReversal,
    message: Message,
    attempt: u32,
    backoff_ms: u64,
    state: DeliveryState,
}

impl Delivery {
    /// The delivery of `reversal`, its 0400 stamped `now`; `None` when the journal record
    /// cannot make a reversal (logged).
    pub fn new(reversal: PendingReversal, now: Now) -> Option<Delivery> {
        let stamped = UtcDateTime::from_unix_ms(u64::try_from(now.unix_ms()).unwrap_or(0));
        let Some(message) = reversal_message(&reversal.original, stamped) else {
            tracing::error!(rrn = %reversal.original.rrn, "cannot build a reversal from the journal record");
            return None;
        };
        Some(Delivery {
            reversal,
            message,
            attempt: 0,
            backoff_ms: RETRY_BACKOFF_START_MS,
            state: DeliveryState::Idle,
        })
    }

    /// The reversal being delivered.
    pub fn reversal(&self) -> &PendingReversal {
        &self.reversal
    }

    /// The 0400 sent (the link puts its own STAN in field 11).
    pub fn message(&self) -> &Message {
        &self.message
    }

    /// Attempts sent so far.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// The first step.
    pub fn start(&mut self) -> DeliveryStep {
        assert!(
            matches!(self.state, DeliveryState::Idle),
            "delivery started twice"
        );
        self.reserve()
    }

    fn reserve(&mut self) -> DeliveryStep {
        self.state = DeliveryState::Reserving;
        DeliveryStep::Reserve(self.reversal.acquirer)
    }

    fn back_off(&mut self) -> DeliveryStep {
        let wait = self.backoff_ms;
        self.backoff_ms = (self.backoff_ms * 2).min(RETRY_BACKOFF_MAX_MS);
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
                let mut sent = reversal.original.follow_up(
                    RecordKind::ReversalSent,
                    reversal.request_seq,
                    now.unix_ms(),
                );
                sent.acquirer = reversal.original.acquirer.clone();
                sent.link_stan = reversal.original.link_stan;
                sent.attempt = self.attempt;
                self.state = DeliveryState::JournalingAttempt {
                    stan,
                    sent: sent.clone(),
                };
                DeliveryStep::Append(vec![sent])
            }
            (DeliveryState::JournalingAttempt { stan, sent }, DeliveryEvent::Durable(durable)) => {
                match durable {
                    // The disk is behind: the attempt goes, and the next one is journaled.
                    Ok(_) | Err(JournalError::Overloaded) => {
                        self.state = DeliveryState::Sending { sent, since: now };
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
            (DeliveryState::Sending { .. }, DeliveryEvent::NoAnswer) => self.back_off(),
            (DeliveryState::Sending { sent, since }, DeliveryEvent::Answered(answer)) => {
                let mut ack = sent;
                ack.kind = RecordKind::ReversalAck;
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
            (DeliveryState::Sleeping, DeliveryEvent::Woke) => self.reserve(),
            (state, event) => panic!("reversal delivery: {event:?} does not answer {state:?}"),
        }
    }
}

impl StoreAndForward {}

/// The 0400 reversing the forwarded original `original`, sent at `now`.
pub fn reversal_message(original: &Record, now: UtcDateTime) -> Option<Message> {
    let original_data = format!(
        "{}{:06}{}{:011}{:011}",
        original.mti, original.link_stan, original.transmission_time, 0, 0
    );
    let mut b = Message::builder(Mti::REVERSAL_REQUEST);
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
