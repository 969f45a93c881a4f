//! The switch as a cluster node (`[cluster]`): its lease renewed, the others' leases
//! watched, and the work of a node whose lease lapsed moved into this node's books
//! (`crate::cluster::takeover`).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Switch;
use crate::cluster::lease::Previous;
use crate::cluster::takeover::{self, Lapsed};
use crate::cluster::{ClusterConfig, Joined};
use crate::journal::{Journal, RecordKind};
use crate::recovery::{Recovery, Replay};
use crate::reversal::StoreAndForward;

/// Margin added to the acquirer timeout before a survivor reads a lapsed node's journal:
/// what the node sent just before its deadline has been answered (or timed out) and
/// journaled by then.
const TAKEOVER_MARGIN: Duration = Duration::from_secs(1);

/// The requests whose claims a node that comes back, or a survivor, settles: those
/// journaled within this long of the node's last request. A node writes each answer into
/// its claim as it answers, so only the last moments before a crash can be left open.
pub(super) const SETTLE_TAIL_MS: i64 = 10_000;

/// At most this many claims are settled for one node's restart or takeover (a bound on
/// the work; far above what a crash leaves open).
const MAX_SETTLED: usize = 100_000;

/// How long after taking a lease over a survivor has settled the claims of what the node
/// journaled: its wait (acquirer timeout and margin) and a few seconds to read and settle.
pub(super) fn settled_after(config: &crate::config::Config) -> Duration {
    let timeout = config
        .acquirers
        .iter()
        .map(|a| a.timeout())
        .max()
        .unwrap_or_default();
    timeout + TAKEOVER_MARGIN + Duration::from_secs(5)
}

/// Writes the answers of `recent` requests (those of the last [`SETTLE_TAIL_MS`] before
/// the newest) into their claims where the claims have none: an approval in doubt gets
/// its 91. Returns how many it wrote.
async fn settle_tail(
    claims: &crate::cluster::claims::Claims,
    recent: &[(
        u128,
        crate::shard::duplicates::DupKey,
        i64,
        Arc<crate::shard::duplicates::Original>,
    )],
) -> u64 {
    let Some(newest) = recent.iter().map(|(_, _, at, _)| *at).max() else {
        return 0;
    };
    let mut settled = 0;
    for (_, key, _, original) in recent
        .iter()
        .filter(|(_, _, at, _)| *at >= newest - SETTLE_TAIL_MS)
        .take(MAX_SETTLED)
    {
        let Some(outcome) = original.outcome_now() else {
            continue;
        };
        match claims.settle_if_open(key, outcome).await {
            Ok(true) => settled += 1,
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "settling a claim failed: a copy of that request at another node waits for its answer");
            }
        }
    }
    settled
}

/// Settles what the journal says this node owed before this start. If its previous
/// lease was taken over, that work is the survivor's: each item is journaled
/// `handed_over` here and not delivered. Otherwise (nobody took it over, and from now on
/// nobody can) it is delivered as on a single node, under the new lease (`token`).
pub(super) async fn settle_previous(
    journal: Option<&Journal>,
    reversals: &Arc<StoreAndForward>,
    mut recovery: Recovery,
    recent: &[(
        u128,
        crate::shard::duplicates::DupKey,
        i64,
        Arc<crate::shard::duplicates::Original>,
    )],
    claims: Option<&crate::cluster::claims::Claims>,
    previous: &Previous,
    token: u64,
) -> anyhow::Result<()> {
    let Previous::HandedOver { to, generation } = previous else {
        if let Some(claims) = claims {
            let settled = settle_tail(claims, recent).await;
            if settled > 0 {
                tracing::info!(
                    settled,
                    "answers the last run had not written into their claims written now"
                );
            }
        }
        for pending in recovery
            .pending
            .iter_mut()
            .chain(recovery.in_doubt.iter_mut())
        {
            pending.token = token;
        }
        return super::deliver_what_is_owed(journal, reversals, recovery).await;
    };
    let now_ms = crate::clock::now().unix_ms();
    let records: Vec<_> = recovery
        .pending
        .iter()
        .chain(recovery.in_doubt.iter())
        .map(|pending| {
            let mut record =
                pending
                    .original
                    .follow_up(RecordKind::HandedOver, pending.request_seq, now_ms);
            record.private_data = format!("to={to};lease={generation}");
            record
        })
        .collect();
    tracing::warn!(survivor = %to, generation, owed = records.len(), "this node's previous lease was taken over: what it owed is the survivor's");
    if let (Some(journal), false) = (journal, records.is_empty()) {
        journal
            .append(&records)
            .await
            .context("journaling the work handed over")?;
    }
    Ok(())
}

/// Starts the node's cluster tasks: lease renewal, the watch over the others' leases,
/// and the mover of the work of those taken over.
pub(super) fn start(
    switch: &Arc<Switch>,
    config: ClusterConfig,
    joined: Joined,
    shutdown: CancellationToken,
) {
    let Joined {
        context,
        lease,
        fence,
        ..
    } = joined;
    let bucket = lease.bucket().clone();
    tokio::spawn(lease.run(shutdown.clone()));
    // Following the others' journals gives their answers (for copies of their requests)
    // and, with `shared_velocity`, their transactions.
    if let Some(outcomes) = switch.outcomes.clone() {
        let observers = switch.observers.clone();
        let shared_velocity = config.shared_velocity;
        let (stats, lag_stats) = (Arc::clone(&switch.cluster), Arc::clone(&switch.cluster));
        tokio::spawn(crate::cluster::follow::run(
            context.clone(),
            config.clone(),
            outcomes,
            move |pan_hash, tx| {
                if !shared_velocity {
                    return;
                }
                let shard = crate::shard::shard_of(pan_hash, observers.len());
                if observers[shard].try_send(tx).is_ok() {
                    stats.followed.fetch_add(1, Ordering::Relaxed);
                } else {
                    stats.follow_dropped.fetch_add(1, Ordering::Relaxed);
                }
            },
            move |lag| lag_stats.follow_lag.store(lag, Ordering::Relaxed),
            shutdown.clone(),
        ));
    }
    if config.events {
        let (context, config, shutdown) = (context.clone(), config.clone(), shutdown.clone());
        tokio::spawn(async move {
            match crate::cluster::events::stream(&context, &config).await {
                Ok(()) => crate::cluster::events::run(context, config, shutdown).await,
                Err(e) => tracing::error!(error = %e, "no event feed: its stream cannot be made"),
            }
        });
    }
    let (lapsed, mut to_move) = mpsc::channel(takeover::MAX_LAPSED_QUEUED);
    tokio::spawn(takeover::watch(
        bucket,
        config.node.clone(),
        Duration::from_millis(config.lease_ms),
        fence,
        lapsed,
        shutdown.clone(),
    ));
    let switch = Arc::clone(switch);
    tokio::spawn(async move {
        while let Some(lapsed) = tokio::select! {
            _ = shutdown.cancelled() => None,
            lapsed = to_move.recv() => lapsed,
        } {
            move_work(&switch, &config, &context, lapsed, &shutdown).await;
        }
    });
}

/// Waits out the acquirer timeout, then moves what `lapsed.node` owed into this node's
/// books and queue; retried every few seconds until it succeeds or the switch stops.
async fn move_work(
    switch: &Switch,
    config: &ClusterConfig,
    context: &async_nats::jetstream::Context,
    lapsed: Lapsed,
    shutdown: &CancellationToken,
) {
    let timeout = switch
        .links
        .iter()
        .map(|l| l.timeout())
        .max()
        .unwrap_or_default();
    let ready = lapsed.at + timeout + TAKEOVER_MARGIN;
    tokio::select! {
        _ = shutdown.cancelled() => return,
        _ = tokio::time::sleep_until(ready) => {}
    }
    // The original requests moved already: a retry after a failure part-way moves the
    // rest, never one twice.
    let mut done = std::collections::HashSet::new();
    loop {
        match try_move(switch, config, context, &lapsed, &mut done).await {
            Ok(moved) => {
                let ms = lapsed.at.elapsed().as_millis() as u64;
                switch.cluster.takeovers.fetch_add(1, Ordering::Relaxed);
                switch.cluster.last_takeover_ms.store(ms, Ordering::Relaxed);
                tracing::warn!(node = %lapsed.node, generation = lapsed.generation, moved, after_ms = ms, "took over a lapsed node's work: its reversals and advices are delivered from here");
                return;
            }
            Err(e) => {
                tracing::error!(node = %lapsed.node, error = %e, "moving a lapsed node's work failed; retrying in 5 s");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
            }
        }
    }
}

async fn try_move(
    switch: &Switch,
    config: &ClusterConfig,
    context: &async_nats::jetstream::Context,
    lapsed: &Lapsed,
    done: &mut std::collections::HashSet<u64>,
) -> anyhow::Result<u64> {
    // Only the node's last moments are "recent" (for their claims): complete requests
    // before them are dropped as the replay goes, so memory follows what the node still
    // owed and its last seconds, not the length of its journal.
    let since = lapsed.at.elapsed()
        + Duration::from_millis(config.lease_ms)
        + Duration::from_millis(SETTLE_TAIL_MS as u64);
    let window_start = crate::clock::now().unix_ms() - since.as_millis() as i64;
    let mut replay = Replay::new(window_start, &switch.acquirer_names, MAX_SETTLED);
    let read = takeover::read_node(context, config, &lapsed.node, |seq, record| {
        replay.record(seq, record)
    })
    .await?;
    switch
        .cluster
        .records_read
        .fetch_add(read, Ordering::Relaxed);
    let mut recovery = replay.finish(Default::default());
    let recent = std::mem::take(&mut recovery.recent);
    if recovery.unknown_acquirers > 0 {
        tracing::error!(node = %lapsed.node, count = recovery.unknown_acquirers, "the lapsed node owed reversals to acquirers this node does not know: configure them here (they stay in its journal)");
    }
    let token = switch.fence.as_ref().map_or(0, |f| f.token());
    let mut moved = 0;
    for pending in recovery.pending.into_iter().chain(recovery.in_doubt) {
        if !done.insert(pending.request_seq) {
            continue;
        }
        let records = takeover::moved_records(&pending, &lapsed.node);
        let request_seq = match &switch.journal {
            Some(journal) => match journal.append(&records).await {
                Ok(seq) => seq,
                Err(e) => {
                    done.remove(&pending.request_seq);
                    anyhow::bail!("journaling the work taken over: {e}");
                }
            },
            None => 0,
        };
        switch
            .reversals
            .push(takeover::moved(pending, request_seq, token));
        moved += 1;
        switch.cluster.moved.fetch_add(1, Ordering::Relaxed);
    }
    // Copies of its requests at other nodes wait on their claims: write the answers the
    // node gave (or the 91 of an approval in doubt) where it had not.
    if let Some(claims) = &switch.claims {
        let settled = settle_tail(claims, &recent).await;
        switch
            .cluster
            .claims_settled
            .fetch_add(settled, Ordering::Relaxed);
    }
    // And its event feed, to the end of its journal.
    if config.events {
        let published =
            crate::cluster::events::publish(context, config, &lapsed.node, false).await?;
        tracing::info!(node = %lapsed.node, published, "a lapsed node's last events published");
    }
    Ok(moved)
}
