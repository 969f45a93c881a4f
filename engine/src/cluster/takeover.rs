//! Takeover: a survivor's side of the leases (`super::lease`).
//!
//! Every node watches every lease. One not renewed for the lease time (on the watcher's
//! own monotonic clock, counted from when it *saw* the last renewal) is taken over with a
//! compare-and-set on the revision it saw: it fails if the node renewed meanwhile, and
//! only one survivor's succeeds. The survivor then waits the acquirer timeout (what the
//! node sent before its own deadline has been answered or timed out by then), reads the
//! node's journal from the stream, and moves what it owes into its own books:
//!
//! - every authorization it forwarded without a recorded answer: in doubt, reversed;
//! - every reversal and stand-in advice it queued and had not had acknowledged.
//!
//! Each is journaled by the survivor as a copy of the request (field 48 of the copy:
//! `taken_over_from={node};seq={its sequence number there}`) and its `reversal_queued`
//! (or `advice_queued`), with the attempts already sent, then delivered by the survivor's
//! store-and-forward queue over its own link to the same acquirer — a repeat (0401) with
//! the node's reversal STAN where the node had sent one. From then on it is the
//! survivor's, and a survivor that dies in turn hands it on the same way.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer};
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::lease::{lease_key, LeaseValue};
use super::store::{CasError, LeaseStore};
use super::ClusterConfig;
use crate::fence::Fence;
use crate::journal::{Record, RecordKind};
use crate::reversal::{Owed, PendingReversal};

/// A lease this node took over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lapsed {
    /// The node whose lease lapsed.
    pub node: String,
    /// Its generation taken over.
    pub generation: u64,
    /// When the watcher took it over.
    pub at: Instant,
}

/// Leases taken over at once, waiting for their work to be moved: beyond it the watcher
/// waits (there are at most as many as nodes).
pub const MAX_LAPSED_QUEUED: usize = 64;

/// Watches every lease in `bucket` until `shutdown`, taking over each one not renewed
/// for `ttl` while this node (`me`) holds its own (`fence`); each taken is sent on
/// `lapsed`.
pub async fn watch<S: LeaseStore>(
    bucket: S,
    me: String,
    ttl: Duration,
    fence: Arc<Fence>,
    lapsed: mpsc::Sender<Lapsed>,
    shutdown: CancellationToken,
) {
    let mine = lease_key(&me);
    // Takeovers written whose answer did not come (a server restarting): the write may
    // stand. The watch shows it if it does, and it is ours then — its work must be moved,
    // or nobody would (the node that lapsed leaves it to us). By key, the generation.
    let mut attempted: HashMap<String, u64> = HashMap::new();
    loop {
        let watched = tokio::select! {
            _ = shutdown.cancelled() => return,
            watched = bucket.watch("lease.>") => watched,
        };
        let mut entries = match watched {
            Ok(entries) => entries,
            Err(e) => {
                tracing::warn!(error = %e, "watching the leases failed; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        // Each lease by key: the revision seen last, when it was first seen, its value.
        // Seen afresh on every (re)start of the watch: a watcher that was itself cut off
        // never takes over on what it missed.
        let mut seen: HashMap<String, (u64, Instant, Option<LeaseValue>)> = HashMap::new();
        let mut tick = tokio::time::interval(ttl / 4);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                entry = entries.next() => match entry {
                    Some(Ok(entry)) => {
                        if entry.key == mine {
                            continue;
                        }
                        let value = entry.value.as_deref().and_then(LeaseValue::parse);
                        if let Some(LeaseValue::TakenOver { taken_over_by, node, generation, .. }) = &value {
                            if *taken_over_by == me && attempted.get(&entry.key) == Some(generation) {
                                attempted.remove(&entry.key);
                                tracing::warn!(%node, generation, "lease lapsed: this node took over its work (the answer was lost, the write stood)");
                                let sent = lapsed
                                    .send(Lapsed { node: node.clone(), generation: *generation, at: Instant::now() })
                                    .await;
                                if sent.is_err() {
                                    return;
                                }
                            }
                        }
                        let changed = seen.get(&entry.key).is_none_or(|(r, _, _)| *r != entry.revision);
                        if changed {
                            seen.insert(entry.key, (entry.revision, Instant::now(), value));
                        }
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "lease watch interrupted; restarting it");
                        break;
                    }
                    None => break,
                },
                _ = tick.tick() => {
                    if !fence.held() {
                        continue;
                    }
                    for (key, (revision, at, value)) in &mut seen {
                        let Some(held @ LeaseValue::Held { holder, .. }) = value.as_ref() else {
                            continue;
                        };
                        if at.elapsed() < ttl {
                            continue;
                        }
                        let generation = held.generation_at(*revision);
                        let holder = holder.clone();
                        let taken = LeaseValue::TakenOver {
                            taken_over_by: me.clone(),
                            node: holder.clone(),
                            generation,
                            at_ms: crate::clock::now().unix_ms(),
                        };
                        match bucket.update(key.as_str(), taken.bytes(), *revision).await {
                            Ok(new_revision) => {
                                attempted.remove(key);
                                let node = holder;
                                tracing::warn!(%node, generation, "lease lapsed: this node takes over its work");
                                *revision = new_revision;
                                *value = Some(taken);
                                let sent = lapsed
                                    .send(Lapsed { node, generation, at: Instant::now() })
                                    .await;
                                if sent.is_err() {
                                    return;
                                }
                            }
                            // Renewed after all, or another survivor was first: the watch
                            // brings the new value.
                            Err(CasError::WrongRevision) => {
                                *at = Instant::now();
                            }
                            Err(e) => {
                                attempted.insert(key.clone(), generation);
                                tracing::warn!(error = %e, "taking over a lapsed lease: no answer; retrying");
                            }
                        }
                    }
                }
            }
        }
    }
}

/// How long a survivor waits for the next message of a node's journal before giving up
/// the read (and the takeover: it is retried from the start by a later start).
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Hands every record `node` published on the journal stream to `each`, in order, as
/// far as the stream held when the read began; returns the records read.
pub async fn read_node(
    context: &jetstream::Context,
    config: &ClusterConfig,
    node: &str,
    mut each: impl FnMut(u64, Record),
) -> anyhow::Result<u64> {
    let subject = config.journal_subject_of(node);
    let stream = context
        .get_stream(&config.stream)
        .await
        .with_context(|| format!("the stream {}", config.stream))?;
    let last = match stream.get_last_raw_message_by_subject(&subject).await {
        Ok(message) => message.sequence,
        Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
            return Ok(0)
        }
        Err(e) => return Err(e).context(format!("the last message on {subject}")),
    };
    let reader = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: subject.clone(),
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .with_context(|| format!("reading {subject}"))?;
    let mut messages = reader.messages().await?;
    let mut records = 0;
    loop {
        let message = tokio::time::timeout(READ_TIMEOUT, messages.next())
            .await
            .map_err(|_| anyhow::anyhow!("{subject}: no message within {READ_TIMEOUT:?}"))?
            .ok_or_else(|| anyhow::anyhow!("{subject}: the read ended early"))??;
        let sequence = message
            .info()
            .map_err(|e| anyhow::anyhow!("{subject}: {e}"))?
            .stream_sequence;
        super::frames(&message.payload, |seq, record| {
            records += 1;
            each(seq, record)
        })
        .map_err(|e| anyhow::anyhow!("{subject}, stream message {sequence}: {e}"))?;
        if sequence >= last {
            return Ok(records);
        }
    }
}

/// What `pending` (owed by `from`, its request `pending.request_seq` there) becomes in
/// the survivor's books: a copy of the request (unscored, so no velocity is counted
/// twice) naming where it came from, its `reversal_queued` or `advice_queued` record, and
/// its last attempt if one was sent. Appended together (`request_back`).
pub fn moved_records(pending: &PendingReversal, from: &str) -> Vec<Record> {
    let original = &pending.original;
    let request = Record {
        kind: RecordKind::Request,
        request_seq: 0,
        request_back: 0,
        private_data: format!("taken_over_from={from};seq={}", pending.request_seq),
        decision: String::new(),
        score: None,
        model: String::new(),
        event_ms: 0,
        ..original.follow_up(RecordKind::Request, 0, original.time_ms)
    };
    let (queued_kind, sent_kind) = match pending.owed {
        Owed::Reversal => (RecordKind::ReversalQueued, RecordKind::ReversalSent),
        Owed::Advice => (RecordKind::AdviceQueued, RecordKind::AdviceSent),
    };
    let queued = Record {
        kind: queued_kind,
        request_seq: 0,
        request_back: 1,
        ..original.clone()
    };
    let mut records = vec![request, queued];
    if let Some(stan) = pending.stan {
        records.push(Record {
            reversal_stan: stan.get(),
            attempt: pending.attempts,
            request_back: 2,
            ..original.follow_up(sent_kind, 0, original.time_ms)
        });
    }
    records
}

/// `pending` as the survivor delivers it, once [`moved_records`] are durable with the
/// request copy at `request_seq`, under the survivor's fencing `token`.
pub fn moved(pending: PendingReversal, request_seq: u64, token: u64) -> PendingReversal {
    let original = Record {
        kind: match pending.owed {
            Owed::Reversal => RecordKind::ReversalQueued,
            Owed::Advice => RecordKind::AdviceQueued,
        },
        request_seq,
        request_back: 0,
        ..pending.original
    };
    PendingReversal {
        request_seq,
        original,
        token,
        entry: None,
        ..pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recovery::Replay;
    use payswitch_protocol::Stan;

    fn forwarded(seq: u64) -> Record {
        Record {
            kind: RecordKind::Forwarded,
            time_ms: 1_000,
            request_seq: seq,
            mti: "0100".into(),
            stan: "000123".into(),
            rrn: "000000000123".into(),
            terminal: "TERM0001".into(),
            transmission_time: "1208120000".into(),
            acquirer: "north".into(),
            link_stan: 100_007,
            amount_minor: 4_200,
            decision: "approve".into(),
            event_ms: 1_000,
            ..Record::default()
        }
    }

    /// The moved records, replayed as the survivor's own journal, owe the same reversal:
    /// after a crash of the survivor it is still delivered, as a repeat with the STAN the
    /// first node used, and no velocity is counted for the copy.
    #[test]
    fn moved_work_replays_as_the_same_reversal_in_the_survivors_books() {
        let acquirers = vec!["north".to_string()];
        let pending = PendingReversal {
            owed: Owed::Reversal,
            request_seq: 41,
            acquirer: 0,
            original: forwarded(41),
            stan: Stan::new(100_050),
            attempts: 2,
            token: 7,
            entry: None,
            settled: true,
            queued_token: 0,
            journaled: true,
        };
        let records = moved_records(&pending, "node-a");
        assert_eq!(records.len(), 3);
        assert_eq!(records[0].private_data, "taken_over_from=node-a;seq=41");
        assert!(records[0].decision.is_empty() && records[0].event_ms == 0);
        let mut replay = Replay::new(0, &acquirers, 100);
        for (i, record) in records.into_iter().enumerate() {
            replay.record(500 + i as u64, record);
        }
        let recovery = replay.finish(Default::default());
        assert!(recovery.in_doubt.is_empty());
        assert_eq!(recovery.pending.len(), 1);
        let again = &recovery.pending[0];
        assert_eq!(again.request_seq, 500);
        assert_eq!(
            again.original.link_stan, 100_007,
            "names the original's STAN"
        );
        assert_eq!(
            again.stan,
            Stan::new(100_050),
            "repeats the reversal's STAN"
        );
        assert_eq!(again.attempts, 2);
        let delivered = moved(pending, 500, 9);
        assert_eq!(delivered.request_seq, 500);
        assert_eq!(delivered.original.request_seq, 500);
        assert_eq!(delivered.original.kind, RecordKind::ReversalQueued);
        assert_eq!(delivered.token, 9);
    }
}
