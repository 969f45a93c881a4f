//! Start-up from the journal: what the switch owes and what it has seen.
//!
//! The journal is replayed (every checksum and sequence number checked; a torn final
//! record is cut off, corruption anywhere else stops the start). For each request:
//! - forwarded, with no recorded response and no reversal: **in doubt** — the acquirer
//!   may have approved it and the gateway never heard. It is reversed.
//! - a reversal queued and not acknowledged: queued again.
//! - a stand-in approval whose advice is not acknowledged: the advice queued again, before
//!   any reversal of it.
//! - seen within the duplicate window: put back in its shard's window with its outcome,
//!   so a gateway retransmitting after the crash gets the recorded answer (or, when in
//!   doubt, 91 — it is being reversed) and nothing reaches an acquirer twice.
//!
//! Requests older than the window whose story is complete are dropped as the replay goes,
//! so memory follows the window and the backlog, not the journal's length.
//!
//! With a [`VelocityReplay`], the scored requests of the last day (the longest velocity
//! window) are replayed into the fraud features' velocity state as scoring them did, so
//! a restarted switch's card, merchant and terminal windows are not blind. That state is
//! bounded as it is live (`scoring.max_cards` and the entity tables).

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::Arc;

use payswitch_protocol::{ResponseCode, Stan};

use payswitch_models::features::{self, Transaction};

use crate::journal::{scan, Record, RecordKind, ScanError, ScanReport};
use crate::reversal::{Owed, PendingReversal};
use crate::scoring::{Scoring, ShardScoring};
use crate::shard::duplicates::{DupKey, Forwarded, Original, Outcome};

/// Field 48 given to retransmissions of an authorization that was in doubt at a crash.
pub const IN_DOUBT_TAGS: &str = "in_doubt=1;reversal=queued";

/// What the journal says the switch must do and remember.
#[derive(Debug, Default)]
pub struct Recovery {
    /// The replay's findings (records, sequence numbers, torn tail).
    pub report: ScanReport,
    /// Reversals and advices queued before and not acknowledged; a request's advice
    /// before its reversal.
    pub pending: Vec<PendingReversal>,
    /// Forwarded authorizations without an outcome: each needs a `reversal_queued` record
    /// and then delivery.
    pub in_doubt: Vec<PendingReversal>,
    /// Requests within the duplicate window: the keyed PAN hash (for the shard), the key,
    /// when first seen, and what the switch knows of it.
    pub recent: Vec<(u128, DupKey, i64, Arc<Original>)>,
    /// Records naming an acquirer that is no longer configured (left in the journal).
    pub unknown_acquirers: usize,
    /// Their requests' sequence numbers: retention keeps their records.
    pub unknown_owed: Vec<u64>,
    /// Complete requests within the window not remembered: newer ones filled
    /// `journal.max_duplicates`, as the shards' windows would have.
    pub dropped_over_capacity: u64,
    /// The velocity state rebuilt, when asked for.
    pub velocity: Option<VelocityReplay>,
}

/// The longest velocity window the features read (24 h): older requests add nothing to
/// a restarted switch's windows.
pub const VELOCITY_REPLAY_MS: i64 = 24 * 3_600_000;

/// Velocity state rebuilt from the journal: each scored request's inputs (format 4
/// records: event time, amount, currency, MCC, merchant, terminal, country, POS entry
/// mode, keyed PAN hash) recorded into its shard's card state and the shared merchant
/// and terminal state, in journal order, as scoring did.
pub struct VelocityReplay {
    scoring: Arc<Scoring>,
    shards: Vec<ShardScoring>,
    since_ms: i64,
    /// Requests replayed into the state.
    pub fed: u64,
}

impl std::fmt::Debug for VelocityReplay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "VelocityReplay({} shards, {} fed)",
            self.shards.len(),
            self.fed
        )
    }
}

/// What a scored `request` record fed the velocity state (the model input's velocity
/// part), rebuilt from the record; `None` for one not scored (or older than format 4).
pub fn scored_transaction(record: &Record) -> Option<Transaction> {
    // Scored requests carry their decision; format-4 ones their event time.
    if record.kind != RecordKind::Request || record.decision.is_empty() || record.event_ms == 0 {
        return None;
    }
    Some(Transaction {
        timestamp_ms: record.event_ms,
        card: features::card_key(record.pan_hash),
        amount_minor: record.amount_minor,
        currency: record.currency,
        mcc: record.mcc,
        merchant: features::entity_hash(record.merchant.as_bytes()),
        terminal: features::entity_hash(record.terminal.as_bytes()),
        country: record.country,
        pos_entry_mode: record.pos_entry_mode,
    })
}

impl VelocityReplay {
    /// State for `shards` shards of `max_cards` cards each, shared entities in
    /// `scoring`, fed the requests whose event time is at or after `since_ms`.
    pub fn new(
        scoring: Arc<Scoring>,
        shards: usize,
        max_cards: usize,
        since_ms: i64,
    ) -> VelocityReplay {
        VelocityReplay {
            scoring,
            shards: (0..shards.max(1))
                .map(|_| ShardScoring::new(max_cards))
                .collect(),
            since_ms,
            fed: 0,
        }
    }

    /// Takes a `request` record: recorded when it was scored within the window.
    fn feed(&mut self, record: &Record) {
        let Some(tx) = scored_transaction(record).filter(|tx| tx.timestamp_ms >= self.since_ms)
        else {
            return;
        };
        let shard = crate::shard::shard_of(record.pan_hash, self.shards.len());
        self.scoring.warm(&mut self.shards[shard], &tx);
        self.fed += 1;
    }

    /// The shards' card state, by shard index.
    pub fn into_shards(self) -> Vec<ShardScoring> {
        self.shards
    }
}

impl Recovery {
    /// The highest link STAN a recovered reversal or advice of `acquirer` wants again
    /// (its STAN before the restart). The link hands out new STANs after it, so no
    /// authorization or other delivery takes one of these before its delivery holds it
    /// again: a repeat (0401, 0121) must carry the STAN of its first transmission.
    pub fn highest_wanted_stan(&self, acquirer: usize) -> Option<Stan> {
        self.pending
            .iter()
            .filter(|p| p.acquirer == acquirer)
            .filter_map(|p| p.stan)
            .max_by_key(Stan::get)
    }

    /// The `reversal_queued` records of the in-doubt authorizations, stamped `now_ms`: to
    /// be made durable before anything else happens, then their reversals delivered.
    pub fn in_doubt_records(&self, now_ms: i64) -> Vec<Record> {
        self.in_doubt
            .iter()
            .map(|pending| Record {
                acquirer: pending.original.acquirer.clone(),
                link_stan: pending.original.link_stan,
                ..pending.original.follow_up(
                    RecordKind::ReversalQueued,
                    pending.request_seq,
                    now_ms,
                )
            })
            .collect()
    }
}

/// What the replay keeps of one request: compact once its story is told (about 400 bytes
/// rather than the ~7.7 KB of its journal records), in full only what a reversal still
/// owed must be rebuilt from.
#[derive(Debug)]
struct Life {
    /// What it is remembered by (`None` when its key fields are unusable).
    key: Option<DupKey>,
    pan_hash: u128,
    /// When it was first seen.
    time_ms: i64,
    forwarded: Option<Sent>,
    /// The answer the gateway got.
    response: Option<Outcome>,
    /// The reversal queued and not yet acknowledged, in full (to deliver it).
    reversal_queued: Option<Box<Record>>,
    /// A reversal was queued at some point (acknowledged or not).
    reversal_claimed: bool,
    /// The last attempt sent: the reversal's link STAN and attempt number.
    reversal_sent: Option<(u32, u32)>,
    reversal_acked: bool,
    /// A stand-in approval's advice queued and not yet acknowledged, in full.
    advice_queued: Option<Box<Record>>,
    /// The last advice attempt sent: its link STAN and attempt number.
    advice_sent: Option<(u32, u32)>,
    advice_acked: bool,
    /// A stand-in approval, as its window entry remembers it (the advice's acquirer and
    /// STAN): what a reversal of it is built from.
    stand_in: Option<Box<Forwarded>>,
    /// What it owed is another node's (`handed_over`): its story here is complete.
    handed_over: bool,
}

/// Where a request was forwarded.
#[derive(Debug)]
enum Sent {
    /// The `forwarded` record, while the request may be in doubt (a reversal would be
    /// built from it) or its acquirer is not configured.
    Full(Box<Record>),
    /// Once answered: what the duplicate window keeps.
    Compact(Forwarded),
}

impl Life {
    fn of(record: &Record) -> Life {
        // A request shed at the door is journaled as its request record carrying the
        // answer it got (`lifecycle`): nothing else follows it.
        let shed =
            (record.kind == RecordKind::Request && !record.code.is_empty()).then(|| Outcome {
                code: two(&record.code),
                approval: None,
                private_data: record.private_data.clone(),
            });
        Life {
            key: DupKey::of_record(record),
            pan_hash: record.pan_hash,
            time_ms: record.time_ms,
            forwarded: None,
            response: shed,
            reversal_queued: None,
            reversal_claimed: false,
            reversal_sent: None,
            reversal_acked: false,
            advice_queued: None,
            advice_sent: None,
            advice_acked: false,
            stand_in: None,
            handed_over: false,
        }
    }

    fn done(&self) -> bool {
        let reversal_done = self.reversal_queued.is_none() || self.reversal_acked;
        let advice_done = self.advice_queued.is_none() || self.advice_acked;
        self.handed_over
            || (self.response.is_some() || self.forwarded.is_none()) && reversal_done && advice_done
    }

    /// The advice still owed, if any, and its last attempt.
    fn advice_owed(&self) -> Option<&Record> {
        self.advice_queued.as_deref().filter(|_| !self.advice_acked)
    }

    /// Forwarded, with no recorded response and no reversal: the acquirer may have
    /// approved it and the gateway never heard.
    fn in_doubt(&self) -> bool {
        self.forwarded.is_some() && self.response.is_none() && !self.reversal_claimed
    }

    /// The record a reversal still owed is built from, and whether it is owed because the
    /// authorization is in doubt (rather than queued before and not acknowledged).
    fn reversal_owed(&self) -> Option<(&Record, bool)> {
        match (&self.reversal_queued, self.in_doubt()) {
            (Some(queued), _) if !self.reversal_acked => Some((queued, false)),
            (None, true) => match &self.forwarded {
                Some(Sent::Full(record)) => Some((record, true)),
                _ => None,
            },
            _ => None,
        }
    }

    /// Keeps only what the window and any reversal still owed need.
    fn compact(&mut self, acquirers: &[String]) {
        if self.response.is_some() {
            if let Some(Sent::Full(record)) = &self.forwarded {
                if let (Some(acquirer), Some(link_stan)) = (
                    acquirer_index(acquirers, &record.acquirer),
                    Stan::new(record.link_stan),
                ) {
                    let compact = Forwarded::new(acquirer, link_stan, record.request_seq, record);
                    self.forwarded = Some(Sent::Compact(compact));
                }
            }
        }
        if self.reversal_acked {
            self.reversal_queued = None;
        }
        if self.advice_acked {
            self.advice_queued = None;
        }
    }

    /// What a retransmission is answered. Forwarded without a recorded response — in
    /// doubt, or reversed already by a crash between queueing its reversal and journaling
    /// its 91 — it is answered 91: it must never be forwarded again. `None` with reversal
    /// records alone (the request record was older than the replay keeps).
    fn outcome(&self) -> Option<Outcome> {
        match (&self.response, self.forwarded.is_some()) {
            (Some(response), _) => Some(response.clone()),
            (None, true) => Some(Outcome {
                code: two(ResponseCode::IssuerInoperative.as_str()),
                approval: None,
                private_data: IN_DOUBT_TAGS.to_string(),
            }),
            (None, false) => None,
        }
    }
}

/// Replays the journal in `dir`, cutting off a torn tail. `acquirers` are the configured
/// acquirer names (their index is the link's); requests at or after `window_start_ms`
/// are recent, and at most `max_recent` of them are remembered (the newest).
pub fn recover(
    dir: &Path,
    acquirers: &[String],
    window_start_ms: i64,
    max_recent: usize,
    velocity: Option<VelocityReplay>,
) -> Result<Recovery, ScanError> {
    let mut replay = Replay::new(window_start_ms, acquirers, max_recent);
    if let Some(velocity) = velocity {
        replay = replay.with_velocity(velocity);
    }
    let report = scan(dir, true, |seq, record| replay.record(seq, record))?;
    Ok(replay.finish(report))
}

/// The replay of a journal, record by record, in sequence order: what each request's
/// records say about it. Performs no I/O: `recover` feeds it from the segment files,
/// the simulator from its simulated disk.
///
/// Memory is bounded by what the switch will hold anyway, not by the journal's length:
/// a request whose story is complete is dropped once it is older than the duplicate
/// window, kept compact (about 400 bytes) within it, and only the newest `max_recent` of
/// those are kept, as the shards' windows would keep no more. Requests that still owe
/// something (in doubt, a reversal unacknowledged) are always kept.
#[derive(Debug)]
pub struct Replay {
    /// By request sequence number: in order, and freed as `finish` walks it.
    lives: BTreeMap<u64, Life>,
    /// Request sequence numbers in the order they were first seen, to drop the oldest
    /// complete ones beyond `max_recent`.
    order: VecDeque<u64>,
    window_start_ms: i64,
    max_recent: usize,
    acquirers: Vec<String>,
    /// Complete requests within the window dropped because `max_recent` were newer.
    dropped_over_capacity: u64,
    velocity: Option<VelocityReplay>,
}

impl Replay {
    /// A replay remembering at most `max_recent` requests at or after `window_start_ms`,
    /// for the configured `acquirers`.
    pub fn new(window_start_ms: i64, acquirers: &[String], max_recent: usize) -> Replay {
        Replay {
            lives: BTreeMap::new(),
            order: VecDeque::new(),
            window_start_ms,
            max_recent: max_recent.max(1),
            acquirers: acquirers.to_vec(),
            dropped_over_capacity: 0,
            velocity: None,
        }
    }

    /// The replay also rebuilds `velocity`.
    pub fn with_velocity(mut self, velocity: VelocityReplay) -> Replay {
        self.velocity = Some(velocity);
        self
    }

    /// Takes the next record, numbered `seq`.
    pub fn record(&mut self, seq: u64, record: Record) {
        let request_seq = record.request_of(seq);
        if record.kind == RecordKind::Request {
            if let Some(velocity) = &mut self.velocity {
                velocity.feed(&record);
            }
            self.lives.insert(request_seq, Life::of(&record));
            self.order.push_back(request_seq);
            self.bound();
            return;
        }
        let life = self
            .lives
            .entry(request_seq)
            .or_insert_with(|| Life::of(&record));
        match record.kind {
            RecordKind::Request => {}
            RecordKind::ReversalSent => {
                life.reversal_sent = Some((record.reversal_stan, record.attempt))
            }
            RecordKind::Forwarded => {
                life.forwarded = Some(Sent::Full(Box::new(resolved(record, request_seq))));
            }
            RecordKind::Response if record.duplicate => {}
            RecordKind::Response => {
                life.response = Some(Outcome {
                    code: two(&record.code),
                    approval: record.approval_code.as_bytes().try_into().ok(),
                    private_data: record.private_data,
                });
            }
            RecordKind::ReversalQueued => {
                life.reversal_claimed = true;
                life.reversal_acked = false;
                life.reversal_queued = Some(Box::new(resolved(record, request_seq)));
            }
            RecordKind::ReversalAck => life.reversal_acked = true,
            RecordKind::AdviceQueued => {
                // The stand-in answer itself, and the advice it owes.
                life.response = Some(Outcome {
                    code: two(&record.code),
                    approval: record.approval_code.as_bytes().try_into().ok(),
                    private_data: record.private_data.clone(),
                });
                let record = resolved(record, request_seq);
                life.stand_in = acquirer_index(&self.acquirers, &record.acquirer)
                    .map(|acquirer| Box::new(Forwarded::stand_in(acquirer, request_seq, &record)));
                life.advice_acked = false;
                life.advice_queued = Some(Box::new(record));
            }
            RecordKind::AdviceSent => {
                life.advice_sent = Some((record.reversal_stan, record.attempt));
                if let (Some(stand_in), Some(stan)) =
                    (life.stand_in.as_mut(), Stan::new(record.reversal_stan))
                {
                    stand_in.link_stan = stan;
                }
            }
            RecordKind::AdviceAck => life.advice_acked = true,
            // Another node delivers what it owed: nothing is owed here, and it is no
            // longer in doubt (a retransmission is still answered 91).
            RecordKind::HandedOver => {
                life.handed_over = true;
                life.reversal_claimed = true;
                life.reversal_acked = true;
                life.advice_acked = true;
            }
        }
        if life.done() {
            if life.time_ms < self.window_start_ms {
                self.lives.remove(&request_seq);
            } else {
                life.compact(&self.acquirers);
            }
        }
    }

    /// Drops the oldest complete requests beyond `max_recent`. Each sequence number
    /// leaves `order` once, so this costs O(1) a record over the replay.
    fn bound(&mut self) {
        while self.lives.len() > self.max_recent {
            let Some(oldest) = self.order.pop_front() else {
                return;
            };
            if self.lives.get(&oldest).is_some_and(Life::done) {
                self.lives.remove(&oldest);
                self.dropped_over_capacity += 1;
            }
        }
    }

    /// Requests whose story is still needed now (for a memory bound).
    pub fn len(&self) -> usize {
        self.lives.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.lives.is_empty()
    }

    /// What the switch owes and remembers, given the scan's `report`.
    pub fn finish(self, report: ScanReport) -> Recovery {
        let mut recovery = Recovery {
            report,
            dropped_over_capacity: self.dropped_over_capacity,
            velocity: self.velocity,
            ..Recovery::default()
        };
        let acquirers = self.acquirers;
        for (request_seq, life) in self.lives {
            let recent = (life.time_ms >= self.window_start_ms)
                .then(|| remembered(request_seq, &life, &acquirers))
                .flatten();
            // The advice tells the window entry its STAN, for a reversal of it to name.
            let entry = recent
                .as_ref()
                .map(|(_, _, _, original)| Arc::clone(original));
            recovery.owe_advice(request_seq, &life, &acquirers, entry);
            recovery.owe_reversal(request_seq, &life, &acquirers);
            recovery.recent.extend(recent);
        }
        recovery
    }
}

impl Recovery {
    /// Takes on the advice `life` still owes, if any (queued before, not acknowledged).
    fn owe_advice(
        &mut self,
        request_seq: u64,
        life: &Life,
        acquirers: &[String],
        entry: Option<Arc<Original>>,
    ) {
        let Some(record) = life.advice_owed() else {
            return;
        };
        let owed = self.owed(
            Owed::Advice,
            request_seq,
            record,
            life.advice_sent,
            acquirers,
        );
        if let Some(advice) = owed {
            self.pending.push(PendingReversal { entry, ..advice });
        }
    }

    /// What `request_seq` owes, built from `record` with its last attempt `sent` (link STAN
    /// and attempt number); `None`, counted, when the record's acquirer is no longer
    /// configured (its records are kept for a later start).
    fn owed(
        &mut self,
        owed: Owed,
        request_seq: u64,
        record: &Record,
        sent: Option<(u32, u32)>,
        acquirers: &[String],
    ) -> Option<PendingReversal> {
        let Some(acquirer) = acquirer_index(acquirers, &record.acquirer) else {
            self.unknown_acquirers += 1;
            self.unknown_owed.push(request_seq);
            return None;
        };
        let (stan, attempts) = sent.map_or((None, 0), |(stan, attempt)| (Stan::new(stan), attempt));
        Some(PendingReversal {
            owed,
            request_seq,
            acquirer,
            original: record.clone(),
            stan,
            attempts,
            entry: None,
            token: 0,
            // Recovered at a start: delivered under the new lease (`token` is set then).
            settled: true,
            queued_token: 0,
            journaled: true,
        })
    }

    /// Takes on the reversal `life` still owes, if any: to deliver (queued before) or to
    /// queue first (in doubt). One owed to an acquirer no longer configured is counted.
    fn owe_reversal(&mut self, request_seq: u64, life: &Life, acquirers: &[String]) {
        let Some((record, in_doubt)) = life.reversal_owed() else {
            return;
        };
        let owed = self.owed(
            Owed::Reversal,
            request_seq,
            record,
            life.reversal_sent,
            acquirers,
        );
        let Some(mut pending) = owed else {
            return;
        };
        if life.stand_in.is_some() {
            // The reversal of a stand-in approval names its advice by the STAN of the
            // advice's last attempt (none yet: 0, set when the advice is acknowledged).
            pending.original.link_stan = life.advice_sent.map_or(0, |(stan, _)| stan);
        }
        if in_doubt {
            self.in_doubt.push(pending);
        } else {
            self.pending.push(pending);
        }
    }
}

/// What the duplicate window remembers of a request within it: its keyed PAN hash, key,
/// time, where it was forwarded and what it was answered. `None` when there is nothing to
/// remember it by or answer it with.
fn remembered(
    request_seq: u64,
    life: &Life,
    acquirers: &[String],
) -> Option<(u128, DupKey, i64, Arc<Original>)> {
    let key = life.key?;
    let outcome = life.outcome()?;
    let original = Original::new();
    let forwarded = match &life.forwarded {
        // A stand-in approval goes to its advice's acquirer, whatever was tried before.
        _ if life.stand_in.is_some() => life.stand_in.as_deref().cloned(),
        Some(Sent::Compact(forwarded)) => Some(forwarded.clone()),
        Some(Sent::Full(record)) => acquirer_index(acquirers, &record.acquirer)
            .zip(Stan::new(record.link_stan))
            .map(|(acquirer, link_stan)| Forwarded::new(acquirer, link_stan, request_seq, record)),
        None => None,
    };
    if let Some(forwarded) = forwarded {
        original.set_forwarded(forwarded);
    }
    if life.reversal_claimed || life.in_doubt() {
        original.claim_reversal();
    }
    if life.response.is_some() {
        original.mark_settled();
    }
    original.set_outcome(outcome);
    Some((life.pan_hash, key, life.time_ms, Arc::new(original)))
}

/// The link index of the acquirer named `name`.
fn acquirer_index(acquirers: &[String], name: &str) -> Option<usize> {
    acquirers.iter().position(|a| a == name)
}

/// `record` naming its request by sequence number rather than by distance.
fn resolved(mut record: Record, request_seq: u64) -> Record {
    record.request_seq = request_seq;
    record.request_back = 0;
    record
}

fn two(code: &str) -> [u8; 2] {
    code.as_bytes().try_into().unwrap_or(*b"96")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(stan: u32, time_ms: i64) -> Record {
        Record {
            kind: RecordKind::Request,
            time_ms,
            mti: "0100".into(),
            processing_code: "000000".into(),
            transmission_time: "1201000000".into(),
            stan: format!("{:06}", stan % 1_000_000),
            rrn: format!("{stan:012}"),
            terminal: "TERM0001".into(),
            merchant: "MERCHANT0000001".into(),
            pan_masked: "411111******1111".into(),
            pan_hash: u128::from(stan),
            amount_minor: 1_250,
            currency: 840,
            ..Record::default()
        }
    }

    /// Feeds `n` requests, each forwarded and answered (the first `in_doubt` forwarded
    /// only), to a replay remembering at most `max_recent`; the largest number of
    /// requests it held at once, and what it found.
    fn replay(n: u32, in_doubt: u32, max_recent: usize, window_start_ms: i64) -> (usize, Recovery) {
        let acquirers = ["north".to_string()];
        let mut replay = Replay::new(window_start_ms, &acquirers, max_recent);
        let mut seq = 0;
        let mut peak = 0;
        for stan in 1..=n {
            let r = request(stan, i64::from(stan));
            seq += 1;
            replay.record(seq, r.clone());
            let mut forwarded = r.follow_up(RecordKind::Forwarded, 0, r.time_ms);
            forwarded.request_back = 1;
            forwarded.acquirer = "north".into();
            forwarded.link_stan = stan % 999_999 + 1;
            seq += 1;
            replay.record(seq, forwarded);
            if stan > in_doubt {
                let mut response = r.follow_up(RecordKind::Response, 0, r.time_ms);
                response.request_back = 2;
                response.code = "00".into();
                response.approval_code = "A1B2C3".into();
                seq += 1;
                replay.record(seq, response);
            }
            peak = peak.max(replay.len());
        }
        let report = ScanReport::default();
        (peak, replay.finish(report))
    }

    #[test]
    fn the_replay_keeps_at_most_max_recent_complete_requests_and_every_one_in_doubt() {
        let (peak, recovery) = replay(20_000, 5, 1_000, 0);
        assert!(peak <= 1_000 + 5, "held {peak}");
        assert_eq!(recovery.in_doubt.len(), 5);
        assert_eq!(recovery.recent.len(), 1_000);
        assert_eq!(recovery.dropped_over_capacity, 20_000 - 1_000);
        // The newest are the ones remembered, with their outcome and where they went.
        let newest = recovery.recent.iter().map(|(hash, ..)| *hash).max();
        assert_eq!(newest, Some(20_000));
        let (_, _, _, original) = recovery.recent.last().unwrap();
        assert_eq!(&original.outcome_now().unwrap().code, b"00");
        assert!(original.forwarded().is_some());
    }

    #[test]
    fn requests_older_than_the_window_are_dropped_as_the_replay_goes() {
        let (peak, recovery) = replay(20_000, 0, 1_000_000, 19_000);
        assert!(peak <= 1_002, "held {peak}");
        assert_eq!(recovery.recent.len(), 1_001);
        assert_eq!(recovery.dropped_over_capacity, 0);
    }

    #[test]
    fn a_shed_request_comes_back_with_its_91() {
        let acquirers = ["north".to_string()];
        let mut replay = Replay::new(0, &acquirers, 10);
        let mut shed = request(9, 5);
        shed.code = "91".into();
        shed.private_data = crate::ingress::SHED_TAGS.into();
        replay.record(1, shed);
        replay.record(2, request(10, 6));
        let recovery = replay.finish(ScanReport::default());
        assert!(recovery.in_doubt.is_empty() && recovery.pending.is_empty());
        // The plain request has no outcome to answer a copy with; the shed one does.
        assert_eq!(recovery.recent.len(), 1);
        let (_, _, _, original) = &recovery.recent[0];
        let outcome = original.outcome_now().unwrap();
        assert_eq!(&outcome.code, b"91");
        assert_eq!(outcome.private_data, crate::ingress::SHED_TAGS);
    }

    #[test]
    fn a_complete_request_within_the_window_is_kept_compact() {
        let acquirers = ["north".to_string()];
        let mut replay = Replay::new(0, &acquirers, 10);
        let r = request(7, 1);
        replay.record(1, r.clone());
        let mut forwarded = r.follow_up(RecordKind::Forwarded, 1, 1);
        forwarded.acquirer = "north".into();
        forwarded.link_stan = 9;
        replay.record(2, forwarded);
        let mut response = r.follow_up(RecordKind::Response, 1, 1);
        response.code = "05".into();
        replay.record(3, response);
        let life = replay.lives.get(&1).unwrap();
        assert!(matches!(life.forwarded, Some(Sent::Compact(_))));
        assert!(life.reversal_queued.is_none());
        assert!(
            std::mem::size_of::<Life>() < 512,
            "{}",
            std::mem::size_of::<Life>()
        );
    }

    /// A stand-in approval, reversed by the gateway, whose advice was attempted (STAN 44)
    /// but never acknowledged: after a restart the advice goes first, then the reversal,
    /// which names the advice; the window remembers the approval and where it went.
    #[test]
    fn an_unacknowledged_advice_comes_back_before_the_reversal_of_its_approval() {
        let acquirers = ["north".to_string()];
        let mut replay = Replay::new(0, &acquirers, 10);
        let r = request(7, 1);
        replay.record(1, r.clone());
        // The stand-in answer and the advice owed, one record.
        let mut advice = r.follow_up(RecordKind::AdviceQueued, 1, 1);
        advice.acquirer = "north".into();
        advice.code = "00".into();
        advice.approval_code = "S12345".into();
        advice.private_data = "stand_in=1;advice=north".into();
        replay.record(3, advice.clone());
        // Reversed before the advice had a STAN.
        let mut reversal = r.follow_up(RecordKind::ReversalQueued, 1, 2);
        reversal.acquirer = "north".into();
        reversal.mti = "0120".into();
        replay.record(4, reversal);
        let mut sent = advice.clone();
        sent.kind = RecordKind::AdviceSent;
        sent.attempt = 1;
        sent.reversal_stan = 44;
        replay.record(5, sent);
        let recovery = replay.finish(ScanReport::default());
        assert!(recovery.in_doubt.is_empty());
        let owed: Vec<_> = recovery
            .pending
            .iter()
            .map(|p| {
                (
                    p.owed,
                    p.stan.map(|s| s.get()),
                    p.attempts,
                    p.original.link_stan,
                )
            })
            .collect();
        assert_eq!(
            owed,
            [
                (Owed::Advice, Some(44), 1, 0),
                (Owed::Reversal, None, 0, 44)
            ]
        );
        assert_eq!(recovery.pending[0].original.approval_code, "S12345");
        let (_, _, _, original) = &recovery.recent[0];
        let outcome = original.outcome_now().expect("the stand-in answer");
        assert_eq!((&outcome.code, outcome.approval), (b"00", Some(*b"S12345")));
        let forwarded = original.forwarded().expect("remembered as stood in");
        assert_eq!(forwarded.link_stan.get(), 44);
        assert_eq!(forwarded.record("north").mti, "0120");
        assert!(original.reversal_claimed());
        // Acknowledged: nothing owed.
        let mut replay = Replay::new(0, &acquirers, 10);
        replay.record(1, r.clone());
        replay.record(2, advice.clone());
        let mut ack = advice;
        ack.kind = RecordKind::AdviceAck;
        replay.record(3, ack);
        assert!(replay.finish(ScanReport::default()).pending.is_empty());
    }

    /// Only scored requests (with a decision) of the last day rebuild velocity.
    #[test]
    fn velocity_is_rebuilt_from_the_scored_requests_of_the_last_day() {
        let rules = Arc::new(
            crate::scoring::rules::RuleSet::load(None, crate::scoring::rule_variables()).unwrap(),
        );
        let scoring = Arc::new(Scoring::new(
            rules,
            std::time::Duration::from_millis(1),
            crate::scoring::EventTime::Transmission,
            1_000,
        ));
        let now = 10 * VELOCITY_REPLAY_MS;
        let velocity = VelocityReplay::new(scoring, 2, 100, now - VELOCITY_REPLAY_MS);
        let mut replay = Replay::new(0, &["north".to_string()], 10).with_velocity(velocity);
        let scored = |stan, event_ms| Record {
            decision: "approve".into(),
            event_ms,
            ..request(stan, event_ms)
        };
        replay.record(1, scored(1, now - 1_000));
        replay.record(2, scored(2, now - 2 * VELOCITY_REPLAY_MS)); // older than a day
        replay.record(3, request(3, now)); // not scored (a reversal, a shed request)
        replay.record(4, scored(4, now));
        let recovery = replay.finish(ScanReport::default());
        assert_eq!(recovery.velocity.unwrap().fed, 2);
    }
}
