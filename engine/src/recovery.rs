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
    reversal_acked: bool,
}

impl Life {
    fn done(&self) -> bool {
        let reversal_done = self.reversal_queued.is_none() || self.reversal_acked;
        (self.response.is_some() || self.forwarded.is_none()) && reversal_done
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
            reversal_acked: false,
        });
        match record.kind {
            RecordKind::Request | RecordKind::ReversalSent => {}
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
        let window_start_ms = self.window_start_ms;
        let mut recovery = Recovery {
            report,
            ..Recovery::default()
        };
        let index_of = |name: &str| acquirers.iter().position(|a| a == name);
        let mut lives: Vec<(u64, Life)> = self.lives.into_iter().collect();
        lives.sort_by_key(|(seq, _)| *seq);
        for (request_seq, life) in lives {
            let in_doubt = life.forwarded.is_some()
                && life.response.is_none()
                && life.reversal_queued.is_none();
            let reversal_from = match (&life.reversal_queued, in_doubt) {
                (Some(queued), _) if !life.reversal_acked => Some((queued, false)),
                (None, true) => life.forwarded.as_ref().map(|f| (f, true)),
                _ => None,
            };
            if let Some((record, doubt)) = reversal_from {
                match index_of(&record.acquirer) {
                    Some(acquirer) => {
                        let pending = PendingReversal {
                            request_seq,
                            acquirer,
                            original: record.clone(),
                        };
                        if doubt {
                            recovery.in_doubt.push(pending);
                        } else {
                            recovery.pending.push(pending);
                        }
                    }
                    None => recovery.unknown_acquirers += 1,
                }
            }
            if life.request.time_ms < window_start_ms {
                continue;
            }
            let Some(key) = DupKey::of_record(&life.request) else {
                continue;
            };
            let original = Original::new();
            if let Some(forwarded) = &life.forwarded {
                if let (Some(acquirer), Some(link_stan)) = (
                    index_of(&forwarded.acquirer),
                    Stan::new(forwarded.link_stan),
                ) {
                    original.set_forwarded(Forwarded::new(
                        acquirer,
                        link_stan,
                        request_seq,
                        forwarded,
                    ));
                }
            }
            if life.reversal_queued.is_some() || in_doubt {
                original.claim_reversal();
            }
            // Forwarded without a recorded response — in doubt, or reversed already by a
            // crash between queueing its reversal and journaling its 91 — is answered 91 to a
            // retransmission: it must never be forwarded again.
            match (&life.response, life.forwarded.is_some()) {
                (Some(response), _) => original.set_outcome(Outcome {
                    code: two(&response.code),
                    approval: response.approval_code.as_bytes().try_into().ok(),
                    private_data: response.private_data.clone(),
                }),
                (None, true) => original.set_outcome(Outcome {
                    code: two(ResponseCode::IssuerInoperative.as_str()),
                    approval: None,
                    private_data: IN_DOUBT_TAGS.to_string(),
                }),
                // Reversal records alone (the request record was older than the replay keeps).
                (None, false) => continue,
            }
            recovery.recent.push((
                life.request.pan_hash,
                key,
                life.request.time_ms,
                Arc::new(original),
            ));
        }
        recovery
    }
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
