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
//! Chosen over routing each card to one node (gateways would need to know it, and a
//! node's loss would move cards mid-window) and over forwarding requests to the card's
//! owner (a hop on every authorization): every node keeps every card's state, at the
//! cost of each node reading the whole cluster's requests (a few hundred bytes each).

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures_util::StreamExt;
use payswitch_models::features::Transaction;

use super::ClusterConfig;
use crate::recovery::{scored_transaction, VELOCITY_REPLAY_MS};

/// Follows every other node's journal until `shutdown`, handing each scored request's
/// keyed PAN hash and transaction to `each`, and the consumer's lag (messages not yet
/// delivered) to `lag`. Resumes after the last message read when interrupted.
pub async fn run(
    context: jetstream::Context,
    config: ClusterConfig,
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
