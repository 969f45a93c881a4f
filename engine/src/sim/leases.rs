//! Several nodes' leases under faults, by seed: the real lease, takeover and fence code
//! (`cluster::lease`, `cluster::takeover`, `fence`) against an in-memory key-value store
//! with revisions, on tokio's paused clock, with partitions (a node cut off from the
//! store: its renewals fail, as when it is paused), delays, and answers lost after the
//! write was made (what a server restarting does).
//!
//! Invariants checked:
//! - **fencing**: a node never acts under a lease generation at or after the moment a
//!   survivor took that generation over (each node "sends" every 10 ms while its fence
//!   says it holds its lease, as the driver does before every send);
//! - **exactly one survivor**: each node's generation is taken over at most once, and the
//!   survivor whose takeover the store holds is told (even when its answer was lost), so
//!   the work is moved;
//! - **coming back**: after the faults stop, every node holds a lease again within a few
//!   lease times, each under a generation higher than any taken over.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cluster::lease::Lease;
use crate::cluster::store::{CasError, LeaseStore, Versioned, Watch};
use crate::cluster::takeover;
use crate::fence::Fence;

/// The lease time of the simulated nodes.
const TTL: Duration = Duration::from_secs(3);

/// The simulated run's length; faults stop after `FAULTY`.
const RUN: Duration = Duration::from_secs(90);
const FAULTY: Duration = Duration::from_secs(60);

/// A watch: the node it is for, its key prefix, where its changes go.
type Watcher = (
    usize,
    String,
    mpsc::UnboundedSender<Result<Versioned, CasError>>,
);

/// Sends per (node, generation): the first and last instants and how many.
type Sends = Arc<Mutex<HashMap<(usize, u64), (Instant, Instant, u64)>>>;

/// Takeovers reported per (node, generation): by whom and when.
type Taken = Arc<Mutex<BTreeMap<(usize, u64), Vec<(String, Instant)>>>>;

#[derive(Default)]
struct Kv {
    entries: HashMap<String, (u64, Option<Bytes>)>,
    revision: u64,
    /// Every takeover written: the node's lease key, the generation, when it was applied.
    taken: Vec<(String, u64, Instant)>,
    watchers: Vec<Watcher>,
}

/// What the network does to one node's requests.
#[derive(Default)]
struct Net {
    /// Cut off from the store until then.
    cut_until: Vec<Option<Instant>>,
    rng: u64,
    /// Per mille of answers lost after the write was made.
    lose_per_mille: u64,
}

impl Net {
    fn next(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }
}

/// The store as one node sees it.
#[derive(Clone)]
pub struct SimStore {
    kv: Arc<Mutex<Kv>>,
    net: Arc<Mutex<Net>>,
    node: usize,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl SimStore {
    fn cut(&self) -> bool {
        lock(&self.net).cut_until[self.node].is_some_and(|until| Instant::now() < until)
    }

    /// The way there: a few milliseconds, or a timeout when cut off.
    async fn there(&self) -> Result<(), CasError> {
        let delay = lock(&self.net).next() % 5;
        tokio::time::sleep(Duration::from_millis(delay)).await;
        if self.cut() {
            tokio::time::sleep(Duration::from_millis(200)).await;
            return Err(CasError::Other("no server reachable".into()));
        }
        Ok(())
    }

    /// The way back: the answer may be lost (the write stands), or the node cut off.
    async fn back<T>(&self, result: Result<T, CasError>) -> Result<T, CasError> {
        let (delay, lose) = {
            let mut net = lock(&self.net);
            let delay = net.next() % 5;
            let lose = net.next() % 1000 < net.lose_per_mille;
            (delay, lose)
        };
        tokio::time::sleep(Duration::from_millis(delay)).await;
        if lose || self.cut() {
            return Err(CasError::Other("answer lost".into()));
        }
        result
    }

    fn write(kv: &mut Kv, key: &str, value: Bytes) -> u64 {
        kv.revision += 1;
        let revision = kv.revision;
        if let Some(crate::cluster::lease::LeaseValue::TakenOver { generation, .. }) =
            crate::cluster::lease::LeaseValue::parse(&value)
        {
            kv.taken.push((key.to_string(), generation, Instant::now()));
        }
        kv.entries
            .insert(key.to_string(), (revision, Some(value.clone())));
        let change = Versioned {
            key: key.to_string(),
            revision,
            value: Some(value),
        };
        kv.watchers.retain(|(_, prefix, tx)| {
            !key.starts_with(prefix.as_str()) || tx.send(Ok(change.clone())).is_ok()
        });
        revision
    }
}

impl LeaseStore for SimStore {
    async fn entry(&self, key: &str) -> Result<Option<Versioned>, CasError> {
        self.there().await?;
        let found = lock(&self.kv)
            .entries
            .get(key)
            .map(|(revision, value)| Versioned {
                key: key.to_string(),
                revision: *revision,
                value: value.clone(),
            });
        self.back(Ok(found)).await
    }

    async fn create(&self, key: &str, value: Bytes) -> Result<u64, CasError> {
        self.there().await?;
        let result = {
            let mut kv = lock(&self.kv);
            if kv.entries.get(key).is_some_and(|(_, v)| v.is_some()) {
                Err(CasError::Exists)
            } else {
                Ok(SimStore::write(&mut kv, key, value))
            }
        };
        self.back(result).await
    }

    async fn update(&self, key: &str, value: Bytes, revision: u64) -> Result<u64, CasError> {
        self.there().await?;
        let result = {
            let mut kv = lock(&self.kv);
            match kv.entries.get(key) {
                Some((current, _)) if *current == revision => {
                    Ok(SimStore::write(&mut kv, key, value))
                }
                _ => Err(CasError::WrongRevision),
            }
        };
        self.back(result).await
    }

    async fn watch(&self, prefix: &str) -> Result<Watch, CasError> {
        self.there().await?;
        let prefix = prefix.trim_end_matches('>').to_string();
        let (tx, rx) = mpsc::unbounded_channel();
        {
            let mut kv = lock(&self.kv);
            let mut latest: Vec<_> = kv
                .entries
                .iter()
                .filter(|(k, _)| k.starts_with(prefix.as_str()))
                .map(|(k, (revision, value))| Versioned {
                    key: k.clone(),
                    revision: *revision,
                    value: value.clone(),
                })
                .collect();
            latest.sort_by_key(|v| v.revision);
            for v in latest {
                let _ = tx.send(Ok(v));
            }
            kv.watchers.push((self.node, prefix, tx));
        }
        // A node cut off loses its watch: the stream ends when the cut begins.
        let store = self.clone();
        let watch = futures_util::stream::unfold((rx, store), |(mut rx, store)| async move {
            if store.cut() {
                return None;
            }
            let item = tokio::select! {
                item = rx.recv() => item?,
                _ = async {
                    loop {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        if store.cut() { break; }
                    }
                } => return None,
            };
            Some((item, (rx, store)))
        });
        Ok(Box::pin(watch))
    }
}

/// What a seed's run found.
#[derive(Debug, Default)]
pub struct LeaseReport {
    /// Takeovers: (node, generation) → (survivor, when, ms since start).
    pub takeovers: BTreeMap<(usize, u64), Vec<(String, u64)>>,
    /// Sends made (node, generation) counted.
    pub sends: u64,
    /// Invariant violations, described.
    pub violations: Vec<String>,
    /// Cuts made.
    pub cuts: u64,
}

/// Runs one seed: `nodes` nodes, faults for the first minute, then quiet.
pub fn run(seed: u64, nodes: usize) -> LeaseReport {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a current-thread runtime");
    runtime.block_on(simulate(seed, nodes))
}

async fn simulate(seed: u64, nodes: usize) -> LeaseReport {
    let start = Instant::now();
    let kv = Arc::new(Mutex::new(Kv::default()));
    let net = Arc::new(Mutex::new(Net {
        cut_until: vec![None; nodes],
        rng: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
        // No faults while the nodes start; answers lost from then on.
        lose_per_mille: 0,
    }));
    let shutdown = CancellationToken::new();
    let names: Vec<String> = (0..nodes).map(|i| format!("n{i}")).collect();
    let fences: Vec<Arc<Fence>> = (0..nodes).map(|_| Arc::new(Fence::new())).collect();
    // Sends per (node, generation): the first and last instants.
    let sends: Sends = Default::default();
    let taken: Taken = Default::default();
    let (lapsed_tx, mut lapsed_rx) = mpsc::unbounded_channel::<(usize, takeover::Lapsed)>();
    for i in 0..nodes {
        let store = SimStore {
            kv: Arc::clone(&kv),
            net: Arc::clone(&net),
            node: i,
        };
        let (lease, _) = Lease::acquire_in(store.clone(), &names[i], TTL, Arc::clone(&fences[i]))
            .await
            .expect("no faults yet: the lease is taken");
        tokio::spawn(lease.run(shutdown.clone()));
        let (tx, mut rx) = mpsc::channel(64);
        tokio::spawn(takeover::watch(
            store,
            names[i].clone(),
            TTL,
            Arc::clone(&fences[i]),
            tx,
            shutdown.clone(),
        ));
        let forward = lapsed_tx.clone();
        tokio::spawn(async move {
            while let Some(lapsed) = rx.recv().await {
                let _ = forward.send((i, lapsed));
            }
        });
        // The node's work: a send every 10 ms while it holds its lease, as the driver
        // checks before every send.
        let (fence, sends, net, shutdown) = (
            Arc::clone(&fences[i]),
            Arc::clone(&sends),
            Arc::clone(&net),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(10)) => {}
                }
                // A cut node is paused here too: it does nothing while cut.
                if lock(&net).cut_until[i].is_some_and(|until| Instant::now() < until) {
                    continue;
                }
                if fence.held() {
                    let now = Instant::now();
                    let mut sends = lock(&sends);
                    let entry = sends.entry((i, fence.token())).or_insert((now, now, 0));
                    entry.1 = now;
                    entry.2 += 1;
                }
            }
        });
    }
    drop(lapsed_tx);
    lock(&net).lose_per_mille = 20;
    // Takeovers as they happen.
    let recorder = {
        let (taken, names) = (Arc::clone(&taken), names.clone());
        tokio::spawn(async move {
            while let Some((survivor, lapsed)) = lapsed_rx.recv().await {
                let Some(node) = names.iter().position(|n| *n == lapsed.node) else {
                    continue;
                };
                lock(&taken)
                    .entry((node, lapsed.generation))
                    .or_default()
                    .push((names[survivor].clone(), lapsed.at));
            }
        })
    };
    // Faults: cuts of 0.2 to 8 s, one node at a time or two, for the first minute.
    let mut cuts = 0;
    let mut rng = seed.wrapping_add(7).wrapping_mul(0x2545_F491_4F6C_DD1D) | 1;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    while start.elapsed() < FAULTY {
        tokio::time::sleep(Duration::from_millis(500 + next() % 3_000)).await;
        let node = (next() % nodes as u64) as usize;
        let length = Duration::from_millis(200 + next() % 7_800);
        lock(&net).cut_until[node] = Some(Instant::now() + length);
        cuts += 1;
    }
    tokio::time::sleep(RUN - start.elapsed().min(RUN)).await;
    let mut report = LeaseReport {
        cuts,
        ..LeaseReport::default()
    };
    // Every node holds a lease again, under a generation above any taken over.
    for (i, fence) in fences.iter().enumerate() {
        if !fence.held() {
            report
                .violations
                .push(format!("node {i} holds no lease after the faults stopped"));
        }
    }
    shutdown.cancel();
    tokio::time::sleep(Duration::from_secs(1)).await;
    recorder.abort();
    let taken = lock(&taken).clone();
    let sends = lock(&sends).clone();
    // When each takeover was applied in the store: the moment from which the node must
    // not act under that generation.
    let applied: HashMap<(usize, u64), Instant> = lock(&kv)
        .taken
        .iter()
        .filter_map(|(key, generation, at)| {
            let node = names
                .iter()
                .position(|n| key == &crate::cluster::lease::lease_key(n))?;
            Some(((node, *generation), *at))
        })
        .collect();
    report.sends = sends.values().map(|(_, _, n)| n).sum();
    for ((node, generation), at) in &applied {
        if !taken.contains_key(&(*node, *generation)) {
            report.violations.push(format!(
                "node {node} generation {generation} taken over in the store at {:?} but no survivor was told: its work is nobody's",
                *at - start
            ));
        }
    }
    for ((node, generation), survivors) in &taken {
        if survivors.len() > 1 {
            report.violations.push(format!(
                "node {node} generation {generation} taken over {} times: {survivors:?}",
                survivors.len()
            ));
        }
        let Some(&at) = applied.get(&(*node, *generation)) else {
            report.violations.push(format!(
                "node {node} generation {generation} reported taken over, never written"
            ));
            continue;
        };
        if let Some((_, last, _)) = sends.get(&(*node, *generation)) {
            if *last >= at {
                report.violations.push(format!(
                    "node {node} sent under generation {generation} {:?} after a survivor took it over",
                    *last - at
                ));
            }
        }
        if fences[*node].token() <= *generation {
            report.violations.push(format!(
                "node {node} ended under generation {}, not above the {generation} taken over",
                fences[*node].token()
            ));
        }
        report.takeovers.insert(
            (*node, *generation),
            survivors
                .iter()
                .map(|(s, at)| (s.clone(), (*at - start).as_millis() as u64))
                .collect(),
        );
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_fence_and_take_over_exactly_once_under_cuts_and_lost_answers() {
        let mut takeovers = 0;
        // More with PAYSWITCH_LEASE_SEEDS=N (each seed is 90 s of simulated time).
        let seeds = std::env::var("PAYSWITCH_LEASE_SEEDS")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(12u64);
        for seed in 1..=seeds {
            let report = run(seed, 3);
            assert!(report.violations.is_empty(), "seed {seed}: {report:#?}");
            assert!(report.sends > 0);
            takeovers += report.takeovers.len();
        }
        assert!(
            takeovers > 0,
            "the cuts never lapsed a lease: this proves little"
        );
    }
}
