//! Start-up from the journal: what the switch owes and what it has seen.
//!
//! The journal is replayed (every checksum and sequence number checked; a torn final
//! record is cut off, corruption anywhere else stops the start). For each request:
//! - forwarded, with no recorded response and no reversal: **in doubt** — the acquirer
//!   may have approved it and the gateway never heard. It is reversed.
//! - a reversal queued and not acknowledged: queued again.
//! - seen within the duplicate window: put back in its shard's window with its outcome,
//!   so a gateway retransmitting after the crash gets the recorded answer (or, when in
//!   doubt, 91 — it is being reversed) and nothing reaches an acquirer twice.
//!
//! Requests older than the window whose story is complete are dropped as the replay goes,
//! so memory follows the window and the backlog, not the journal's length.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use payswitch_protocol::{ResponseCode, Stan};

use crate::journal::{scan, Record, RecordKind, ScanError, ScanReport};
use crate::reversal::PendingReversal;
use crate::shard::duplicates::{DupKey, Forwarded, Original, Outcome};

/// Field 48 given to retransmissions of an authorization that was in doubt at a crash.
pub const IN_DOUBT_TAGS: &str = "in_doubt=1;reversal=queued";

/// What the journal says the switch must do and remember.
#[derive(Debug, Default)]
pub struct Recovery {
    /// The replay's findings (records, sequence numbers, torn tail).
    pub report: ScanReport,
    /// Reversals queued before and not acknowledged.
    pub pending: Vec<PendingReversal>,
    /// Forwarded authorizations without an outcome: each needs a `reversal_queued` record
    /// and then delivery.
    pub in_doubt: Vec<PendingReversal>,
    /// Requests within the duplicate window: the keyed PAN hash (for the shard), the key,
    /// when first seen, and what the switch knows of it.
    pub recent: Vec<(u128, DupKey, i64, Arc<Original>)>,
    /// Records naming an acquirer that is no longer configured (left in the journal).
    pub unknown_acquirers: usize,
}

impl Recovery {
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

#[derive(Debug)]
struct Life {
    request: Record,
    forwarded: Option<Record>,
    response: Option<Record>,
    reversal_queued: Option<Record>,
    /// The last attempt sent: the reversal's link STAN and attempt number.
    reversal_sent: Option<(u32, u32)>,
    reversal_acked: bool,
}

impl Life {
    fn done(&self) -> bool {
        let reversal_done = self.reversal_queued.is_none() || self.reversal_acked;
        (self.response.is_some() || self.forwarded.is_none()) && reversal_done
    }

    /// Forwarded, with no recorded response and no reversal: the acquirer may have
    /// approved it and the gateway never heard.
    fn in_doubt(&self) -> bool {
        self.forwarded.is_some() && self.response.is_none() && self.reversal_queued.is_none()
    }

    /// The record a reversal still owed is built from, and whether it is owed because the
    /// authorization is in doubt (rather than queued before and not acknowledged).
    fn reversal_owed(&self) -> Option<(&Record, bool)> {
        match (&self.reversal_queued, self.in_doubt()) {
            (Some(queued), _) if !self.reversal_acked => Some((queued, false)),
            (None, true) => self.forwarded.as_ref().map(|f| (f, true)),
            _ => None,
        }
    }

    /// What a retransmission is answered. Forwarded without a recorded response — in
    /// doubt, or reversed already by a crash between queueing its reversal and journaling
    /// its 91 — it is answered 91: it must never be forwarded again. `None` with reversal
    /// records alone (the request record was older than the replay keeps).
    fn outcome(&self) -> Option<Outcome> {
        match (&self.response, self.forwarded.is_some()) {
            (Some(response), _) => Some(Outcome {
                code: two(&response.code),
                approval: response.approval_code.as_bytes().try_into().ok(),
                private_data: response.private_data.clone(),
            }),
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
/// are recent.
pub fn recover(
    dir: &Path,
    acquirers: &[String],
    window_start_ms: i64,
) -> Result<Recovery, ScanError> {
    let mut replay = Replay::new(window_start_ms);
    let report = scan(dir, true, |seq, record| replay.record(seq, record))?;
    Ok(replay.finish(report, acquirers))
}

/// The replay of a journal, record by record, in sequence order: what each request's
/// records say about it. Performs no I/O: `recover` feeds it from the segment files,
/// the simulator from its simulated disk.
#[derive(Debug)]
pub struct Replay {
    lives: HashMap<u64, Life>,
    window_start_ms: i64,
}

impl Replay {
    /// A replay remembering requests at or after `window_start_ms`.
    pub fn new(window_start_ms: i64) -> Replay {
        Replay {
            lives: HashMap::new(),
            window_start_ms,
        }
    }

    /// Takes the next record, numbered `seq`.
    pub fn record(&mut self, seq: u64, record: Record) {
        let request_seq = record.request_of(seq);
        if record.kind == RecordKind::Request {
            self.lives.insert(
                request_seq,
                Life {
                    request: record,
                    forwarded: None,
                    response: None,
                    reversal_queued: None,
                    reversal_sent: None,
                    reversal_acked: false,
                },
            );
            return;
        }
        let life = self.lives.entry(request_seq).or_insert_with(|| Life {
            request: record.clone(),
            forwarded: None,
            response: None,
            reversal_queued: None,
            reversal_sent: None,
            reversal_acked: false,
        });
        match record.kind {
            RecordKind::Request => {}
            RecordKind::ReversalSent => {
                life.reversal_sent = Some((record.reversal_stan, record.attempt))
            }
            RecordKind::Forwarded => life.forwarded = Some(resolved(record, request_seq)),
            RecordKind::Response if record.duplicate => {}
            RecordKind::Response => life.response = Some(record),
            RecordKind::ReversalQueued => {
                life.reversal_queued = Some(resolved(record, request_seq))
            }
            RecordKind::ReversalAck => life.reversal_acked = true,
        }
        if life.done() && life.request.time_ms < self.window_start_ms {
            self.lives.remove(&request_seq);
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

    /// What the switch owes and remembers, given the scan's `report` and the configured
    /// `acquirers`.
    pub fn finish(self, report: ScanReport, acquirers: &[String]) -> Recovery {
        let mut recovery = Recovery {
            report,
            ..Recovery::default()
        };
        let mut lives: Vec<(u64, Life)> = self.lives.into_iter().collect();
        lives.sort_by_key(|(seq, _)| *seq);
        for (request_seq, life) in lives {
            recovery.owe_reversal(request_seq, &life, acquirers);
            if life.request.time_ms < self.window_start_ms {
                continue;
            }
            if let Some(recent) = remembered(request_seq, &life, acquirers) {
                recovery.recent.push(recent);
            }
        }
        recovery
    }
}

impl Recovery {
    /// Takes on the reversal `life` still owes, if any: to deliver (queued before) or to
    /// queue first (in doubt). One owed to an acquirer no longer configured is counted.
    fn owe_reversal(&mut self, request_seq: u64, life: &Life, acquirers: &[String]) {
        let Some((record, in_doubt)) = life.reversal_owed() else {
            return;
        };
        let Some(acquirer) = acquirer_index(acquirers, &record.acquirer) else {
            self.unknown_acquirers += 1;
            return;
        };
        let (stan, attempts) = life
            .reversal_sent
            .map_or((None, 0), |(stan, attempt)| (Stan::new(stan), attempt));
        let pending = PendingReversal {
            request_seq,
            acquirer,
            original: record.clone(),
            stan,
            attempts,
        };
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
    let key = DupKey::of_record(&life.request)?;
    let outcome = life.outcome()?;
    let original = Original::new();
    if let Some(forwarded) = &life.forwarded {
        if let (Some(acquirer), Some(link_stan)) = (
            acquirer_index(acquirers, &forwarded.acquirer),
            Stan::new(forwarded.link_stan),
        ) {
            original.set_forwarded(Forwarded::new(acquirer, link_stan, request_seq, forwarded));
        }
    }
    if life.reversal_queued.is_some() || life.in_doubt() {
        original.claim_reversal();
    }
    original.set_outcome(outcome);
    Some((
        life.request.pan_hash,
        key,
        life.request.time_ms,
        Arc::new(original),
    ))
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
