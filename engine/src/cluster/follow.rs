//! Velocity across nodes: each node follows the others' journals.
//!
//! A card's transactions can reach any node, and its fraud features (how many, how much,
//! where, over the last minutes to day) must count all of them. Each node reads every
//! other node's journal subject from the stream and records each scored request there
//! into its own velocity state — the card's shard, the merchant's and the terminal's
//! windows — as if it had scored it, a few milliseconds later (the lag is in
//! `/api/cluster`). At start it reads the last day of the others' journals, as the
//! local replay reads its own.
//!
//! The same reading gives every node the others' answers ([`Outcomes`]): a copy of a
//! request another node claimed is answered from its original's answer as soon as that
//! node's journal holds it, with no write of its own per request.
//!
//! Chosen over routing each card to one node (gateways would need to know it, and a
//! node's loss would move cards mid-window) and over forwarding requests to the card's
//! owner (a hop on every authorization): every node keeps every card's state, at the
//! cost of each node reading the whole cluster's requests (a few hundred bytes each).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer};
use futures_util::StreamExt;
use payswitch_models::features::Transaction;
use tokio::sync::Notify;

use super::ClusterConfig;
use crate::journal::{Record, RecordKind};
use crate::recovery::{scored_transaction, VELOCITY_REPLAY_MS};
use crate::shard::duplicates::{DupKey, Outcome};

/// The other nodes' answers kept for copies of their requests, at most: about 200 bytes
/// each, so 20 MiB. At 10 000 TPS across the cluster that is ten seconds of answers;
/// gateways retransmit within seconds.
pub const MAX_OUTCOMES: usize = 100_000;

/// How long another node's answer is kept for its copies.
pub const OUTCOME_TTL: Duration = Duration::from_secs(60);

/// The other nodes' recent answers, by the request's duplicate key.
#[derive(Debug, Default)]
pub struct Outcomes {
    inner: Mutex<OutcomesInner>,
    added: Notify,
}

#[derive(Debug, Default)]
struct OutcomesInner {
    by_key: HashMap<DupKey, Outcome>,
    order: VecDeque<(Instant, DupKey)>,
}

impl Outcomes {
    /// Remembers the answer of record `r`, if it is an answer.
    pub fn record(&self, r: &Record) {
        let answered = match r.kind {
            RecordKind::Response => !r.duplicate,
            RecordKind::AdviceQueued => true,
            RecordKind::Request => !r.code.is_empty(),
            _ => false,
        };
        if !answered {
            return;
        }
        let (Some(key), Ok(code)) = (DupKey::of_record(r), <[u8; 2]>::try_from(r.code.as_bytes()))
        else {
            return;
        };
        let outcome = Outcome {
            code,
            approval: r.approval_code.as_bytes().try_into().ok(),
            private_data: r.private_data.clone(),
        };
        let now = Instant::now();
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        while let Some((at, old)) = inner.order.front().copied() {
            if inner.order.len() < MAX_OUTCOMES && now.duration_since(at) < OUTCOME_TTL {
                break;
            }
            inner.order.pop_front();
            inner.by_key.remove(&old);
        }
        if inner.by_key.insert(key, outcome).is_none() {
            inner.order.push_back((now, key));
        }
        drop(inner);
        self.added.notify_waiters();
    }

    /// The answer of `key`, once another node's journal holds it; `None` if it does not
    /// within `wait`.
    pub async fn wait(&self, key: &DupKey, wait: Duration) -> Option<Outcome> {
        let found = async {
            loop {
                let added = self.added.notified();
                tokio::pin!(added);
                added.as_mut().enable();
                if let Some(outcome) = self.get(key) {
                    return outcome;
                }
                added.await;
            }
        };
        tokio::time::timeout(wait, found).await.ok()
    }

    fn get(&self, key: &DupKey) -> Option<Outcome> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.by_key.get(key).cloned()
    }

    /// Answers kept now.
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .by_key
            .len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Follows every other node's journal until `shutdown`: their answers into `outcomes`,
/// each scored request's keyed PAN hash and transaction to `each`, and the consumer's lag
/// (messages not yet delivered) to `lag`. Resumes after the last message read when
/// interrupted.
pub async fn run(
    context: jetstream::Context,
    config: ClusterConfig,
    outcomes: std::sync::Arc<Outcomes>,
    mut each: impl FnMut(u128, Transaction) + Send,
    lag: impl Fn(u64) + Send,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let own = config.journal_subject();
    let prefix = format!("{}.journal.", config.subject_prefix);
    let mut next: Option<u64> = None;
    loop {
        let deliver_policy = match next {
            Some(start_sequence) => consumer::DeliverPolicy::ByStartSequence { start_sequence },
            None => consumer::DeliverPolicy::ByStartTime {
                start_time: time::OffsetDateTime::now_utc()
                    - time::Duration::milliseconds(VELOCITY_REPLAY_MS),
            },
        };
        let followed = async {
            let stream = context.get_stream(&config.stream).await?;
            let reader = stream
                .create_consumer(consumer::pull::OrderedConfig {
                    filter_subject: config.journal_subjects(),
                    deliver_policy,
                    ..Default::default()
                })
                .await?;
            let mut messages = reader.messages().await?;
            while let Some(message) = messages.next().await {
                let message = message?;
                let info = message.info().map_err(|e| anyhow::anyhow!("{e}"))?;
                next = Some(info.stream_sequence + 1);
                lag(info.pending);
                let subject = message.subject.as_str();
                if subject == own || !subject.starts_with(&prefix) {
                    continue;
                }
                super::frames(&message.payload, |_, record| {
                    if let Some(tx) = scored_transaction(&record) {
                        each(record.pan_hash, tx);
                    }
                    outcomes.record(&record);
                })
                .map_err(|e| anyhow::anyhow!("{subject}: {e}"))?;
            }
            anyhow::Ok(())
        };
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            result = followed => result,
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "following the other nodes' journals interrupted; resuming in 1 s");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(stan: &str, code: &str) -> Record {
        Record {
            kind: RecordKind::Response,
            mti: "0100".into(),
            terminal: "TERM0001".into(),
            stan: stan.into(),
            rrn: format!("000000{stan}"),
            transmission_time: "1208120000".into(),
            code: code.into(),
            approval_code: "A1B2C3".into(),
            ..Record::default()
        }
    }

    #[tokio::test]
    async fn a_waiter_gets_the_answer_when_it_is_read() {
        let outcomes = std::sync::Arc::new(Outcomes::default());
        let record = answer("000001", "00");
        let key = DupKey::of_record(&record).unwrap();
        let waiter = tokio::spawn({
            let outcomes = std::sync::Arc::clone(&outcomes);
            async move { outcomes.wait(&key, Duration::from_secs(5)).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        outcomes.record(&answer("000002", "05"));
        outcomes.record(&record);
        let got = waiter.await.unwrap().unwrap();
        assert_eq!(&got.code, b"00");
        assert_eq!(got.approval.as_ref(), Some(b"A1B2C3"));
        // Read before anyone waited: found at once.
        let other = DupKey::of_record(&answer("000002", "05")).unwrap();
        let early = outcomes
            .wait(&other, Duration::from_millis(1))
            .await
            .unwrap();
        assert_eq!(&early.code, b"05");
        // A duplicate's response, or a record that is not an answer, is not one.
        let mut copy = answer("000003", "00");
        copy.duplicate = true;
        outcomes.record(&copy);
        assert_eq!(outcomes.len(), 2);
    }

    #[test]
    fn bounded() {
        let outcomes = Outcomes::default();
        for i in 0..MAX_OUTCOMES + 10 {
            outcomes.record(&answer(&format!("{:06}", i % 1_000_000), "00"));
        }
        assert!(outcomes.len() <= MAX_OUTCOMES);
    }
}
