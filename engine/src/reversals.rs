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
use std::time::{Duration, Instant};

use payswitch_protocol::time::UtcDateTime;
use payswitch_protocol::{fields, Message, Mti};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::acquirer::AcquirerLink;
use crate::journal::{Journal, Record, RecordKind};
use crate::router::AcquirerIndex;

/// Reversals being delivered at once. Each is a task holding one message; 100 k is far
/// beyond any real backlog (an acquirer down for minutes at high load) and a few tens of
/// MiB. Past it a reversal stays queued in the journal only and is sent after a restart.
pub const MAX_PENDING_REVERSALS: usize = 100_000;

/// First wait before resending a reversal.
const RETRY_BACKOFF_START: Duration = Duration::from_millis(200);
/// Longest wait between attempts: an acquirer that comes back gets its reversals within
/// this.
const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(10);

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
        let Some(message) = reversal_message(
            &reversal.original,
            UtcDateTime::from_system_time(std::time::SystemTime::now()),
        ) else {
            tracing::error!(rrn = %reversal.original.rrn, "cannot build a reversal from the journal record");
            return;
        };
        let mut backoff = RETRY_BACKOFF_START;
        let mut attempt = 0u32;
        loop {
            if self.shutdown.is_cancelled() {
                return;
            }
            // Only an attempt that can leave is journaled as sent.
            if let Ok(reservation) = link.reserve() {
                attempt += 1;
                let now = crate::switch::unix_now_ms();
                let mut sent = reversal.original.follow_up(
                    RecordKind::ReversalSent,
                    reversal.request_seq,
                    now,
                );
                sent.acquirer = reversal.original.acquirer.clone();
                sent.link_stan = reversal.original.link_stan;
                sent.attempt = attempt;
                if !self.journal_append(std::slice::from_ref(&sent)).await {
                    return;
                }
                self.stats.sent.fetch_add(1, Ordering::Relaxed);
                let started = Instant::now();
                let answered = tokio::select! {
                    _ = self.shutdown.cancelled() => return,
                    answered = reservation.send(&message) => answered,
                };
                if let Ok(answer) = answered {
                    let mut ack = sent;
                    ack.kind = RecordKind::ReversalAck;
                    ack.time_ms = crate::switch::unix_now_ms();
                    ack.code = answer
                        .get_str(fields::RESPONSE_CODE)
                        .unwrap_or("")
                        .to_string();
                    ack.acquirer_us = started.elapsed().as_micros() as u64;
                    if self.journal_append(&[ack]).await {
                        self.stats.acknowledged.fetch_add(1, Ordering::Relaxed);
                    }
                    return;
                }
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(RETRY_BACKOFF_MAX);
        }
    }

    /// Journals `records`; `false` when the journal has stopped (the reversal stays queued
    /// in the journal and is retried after a restart).
    async fn journal_append(&self, records: &[Record]) -> bool {
        let Some(journal) = &self.journal else {
            return true;
        };
        match journal.append(records).await {
            Ok(_) => true,
            Err(crate::journal::JournalError::Overloaded) => {
                // The disk is behind: the next attempt tries again.
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "reversal not journaled: left for the next start");
                false
            }
        }
    }
}

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
