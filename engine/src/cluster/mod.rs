//! Several nodes, one set of books: the switch on NATS JetStream (`[cluster]`).
//!
//! What is here so far: the connection to the NATS servers and the journal stream. Every
//! group commit of the node's journal is also published to the stream (on
//! `{subject_prefix}.journal.{node}`) and its callers answered only once the stream has
//! acknowledged it (`journal::replica`). Without `[cluster]` nothing here runs: the local
//! journal is the whole journal, as on a single machine.

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream;
use serde::Deserialize;

use crate::journal::replica::Replica;

pub mod claims;
pub mod deploy;
pub mod events;
pub mod follow;
pub mod lease;
pub mod store;
pub mod takeover;
pub mod view;

pub use view::{ClusterStats, ClusterView};

/// Longest a node name may be: it is a NATS subject token and a message-id prefix.
pub const MAX_NODE_NAME: usize = 32;

/// Most replicas a stream may ask for: NATS JetStream allows up to 5.
pub const MAX_REPLICAS: usize = 5;

/// `[cluster]`: where the NATS servers are and what this node is called.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// NATS server URLs (`nats://host:4222`); the client fails over between them.
    pub servers: Vec<String>,
    /// This node's name, unique in the cluster: letters, digits, `-` and `_`.
    pub node: String,
    /// The journal stream; created (with `replicas`) when it does not exist.
    #[serde(default = "defaults::stream")]
    pub stream: String,
    /// Subjects start with this: the journal is `{subject_prefix}.journal.{node}`.
    #[serde(default = "defaults::subject_prefix")]
    pub subject_prefix: String,
    /// Replicas of the stream when the switch creates it: 3 on a three-server cluster,
    /// 1 for a single development server.
    #[serde(default = "defaults::replicas")]
    pub replicas: usize,
    /// How long a group commit may wait for the stream's acknowledgement before its
    /// requests are answered 91.
    #[serde(default = "defaults::ack_timeout_ms")]
    pub ack_timeout_ms: u64,
    /// How long the switch tries to reach a server at start.
    #[serde(default = "defaults::connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// This node's block of link STANs, 0 to 9, unique in the cluster
    /// (`acquirer::StanSpace`): every node links to every acquirer, and a survivor's
    /// reversals name the STANs another node used.
    pub stan_block: u8,
    /// The node's lease (`lease`): renewed every quarter of this; a node that cannot
    /// renew stops sending when it runs out, and a survivor takes its work over once it
    /// has seen no renewal for this long (plus the acquirer timeout before reversing).
    #[serde(default = "defaults::lease_ms")]
    pub lease_ms: u64,
    /// Publish the event feed (`events`): every outcome as JSON on
    /// `{subject_prefix}.events.{node}`.
    #[serde(default = "defaults::events")]
    pub events: bool,
    /// Record the other nodes' scored requests into this node's velocity state
    /// (`follow`), so a card's features count its transactions on every node.
    #[serde(default = "defaults::shared_velocity")]
    pub shared_velocity: bool,
    /// How long the journal stream keeps messages, days, when the switch creates it
    /// (its `max_age`): the servers' disks are bounded by it. A survivor reads a dead
    /// node's owed work from the stream, so it must outlast the longest a reversal may
    /// stay unacknowledged (escalated ones are retried every minute, forever) and a
    /// node's longest outage.
    #[serde(default = "defaults::stream_max_age_days")]
    pub stream_max_age_days: u64,
}

mod defaults {
    pub fn stream() -> String {
        "PAYSWITCH_JOURNAL".into()
    }
    pub fn subject_prefix() -> String {
        "payswitch".into()
    }
    pub fn replicas() -> usize {
        3
    }
    // Above a replication round on a loaded LAN (milliseconds) with room for a leader
    // election (about a second), below a gateway's patience.
    pub fn ack_timeout_ms() -> u64 {
        2_000
    }
    pub fn connect_timeout_ms() -> u64 {
        5_000
    }
    // Several renewals (every 750 ms) must fail before a node stops: a leader election
    // (about a second) does not cost a node its lease; a dead node's work is taken over
    // within seconds.
    pub fn lease_ms() -> u64 {
        3_000
    }
    pub fn events() -> bool {
        true
    }
    pub fn shared_velocity() -> bool {
        true
    }
    pub fn stream_max_age_days() -> u64 {
        30
    }
}

/// A subject token or stream name: non-empty, at most `max` bytes, letters, digits, `-`
/// and `_` only (no `.`, `*`, `>` or spaces, which NATS gives meaning to).
fn is_token(text: &str, max: usize) -> bool {
    !text.is_empty()
        && text.len() <= max
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl ClusterConfig {
    /// Refuses what NATS would refuse later, or misread: says which setting and why.
    pub fn check(&self) -> Result<(), String> {
        if self.servers.is_empty() {
            return Err("cluster.servers: at least one NATS server URL".into());
        }
        for url in &self.servers {
            if let Err(e) = url.parse::<async_nats::ServerAddr>() {
                return Err(format!("cluster.servers: {url:?} is not a NATS URL: {e}"));
            }
        }
        if !is_token(&self.node, MAX_NODE_NAME) {
            return Err(format!(
                "cluster.node = {:?}: 1 to {MAX_NODE_NAME} letters, digits, '-' or '_'",
                self.node
            ));
        }
        if !is_token(&self.stream, 64) {
            return Err(format!(
                "cluster.stream = {:?}: 1 to 64 letters, digits, '-' or '_'",
                self.stream
            ));
        }
        if !self.subject_prefix.split('.').all(|t| is_token(t, 64)) {
            return Err(format!(
                "cluster.subject_prefix = {:?}: dot-separated tokens of letters, digits, '-' or '_'",
                self.subject_prefix
            ));
        }
        if !(1..=MAX_REPLICAS).contains(&self.replicas) {
            return Err(format!(
                "cluster.replicas = {}: 1 to {MAX_REPLICAS}",
                self.replicas
            ));
        }
        if !(1..=60_000).contains(&self.ack_timeout_ms) {
            return Err(format!(
                "cluster.ack_timeout_ms = {}: 1 to 60000",
                self.ack_timeout_ms
            ));
        }
        if !(1..=600_000).contains(&self.connect_timeout_ms) {
            return Err(format!(
                "cluster.connect_timeout_ms = {}: 1 to 600000",
                self.connect_timeout_ms
            ));
        }
        if self.stan_block >= crate::acquirer::StanSpace::BLOCKS {
            return Err(format!(
                "cluster.stan_block = {}: 0 to {}, one per node",
                self.stan_block,
                crate::acquirer::StanSpace::BLOCKS - 1
            ));
        }
        if !(1..=3650).contains(&self.stream_max_age_days) {
            return Err(format!(
                "cluster.stream_max_age_days = {}: 1 to 3650",
                self.stream_max_age_days
            ));
        }
        if !(500..=60_000).contains(&self.lease_ms) {
            return Err(format!(
                "cluster.lease_ms = {}: 500 to 60000",
                self.lease_ms
            ));
        }
        Ok(())
    }

    /// The subject this node's journal is published on.
    pub fn journal_subject(&self) -> String {
        format!("{}.journal.{}", self.subject_prefix, self.node)
    }

    /// The subjects of every node's journal.
    pub fn journal_subjects(&self) -> String {
        format!("{}.journal.>", self.subject_prefix)
    }

    /// The subject `node`'s journal is published on.
    pub fn journal_subject_of(&self, node: &str) -> String {
        format!("{}.journal.{node}", self.subject_prefix)
    }
}

/// Connects to the NATS servers (within `connect_timeout_ms`).
pub async fn connect(config: &ClusterConfig) -> anyhow::Result<async_nats::Client> {
    let addresses = config
        .servers
        .iter()
        .map(|url| url.parse::<async_nats::ServerAddr>())
        .collect::<Result<Vec<_>, _>>()
        .context("cluster.servers")?;
    let servers = config.servers.join(", ");
    let options = async_nats::ConnectOptions::new()
        .name(format!("payswitch-{}", config.node))
        .connection_timeout(Duration::from_millis(config.connect_timeout_ms));
    tokio::time::timeout(
        Duration::from_millis(config.connect_timeout_ms),
        options.connect(addresses.as_slice()),
    )
    .await
    .map_err(|_| anyhow::anyhow!("no NATS server answered at {servers}"))?
    .with_context(|| format!("connecting to NATS at {servers}"))
}

/// The journal stream, created when missing: file storage, `replicas`, the journal
/// subjects of every node, and a two-minute duplicate window for the message ids.
pub async fn journal_stream(
    client: async_nats::Client,
    config: &ClusterConfig,
) -> anyhow::Result<jetstream::Context> {
    let mut context = jetstream::new(client);
    context.set_timeout(Duration::from_millis(config.ack_timeout_ms));
    let stream = jetstream::stream::Config {
        name: config.stream.clone(),
        subjects: vec![config.journal_subjects()],
        num_replicas: config.replicas,
        storage: jetstream::stream::StorageType::File,
        duplicate_window: Duration::from_secs(120),
        max_age: Duration::from_secs(config.stream_max_age_days.saturating_mul(86_400)),
        ..Default::default()
    };
    let created = tokio::time::timeout(
        Duration::from_millis(config.connect_timeout_ms),
        context.get_or_create_stream(stream),
    )
    .await
    .map_err(|_| anyhow::anyhow!("JetStream did not answer (is it enabled on the servers?)"))?
    .with_context(|| format!("getting or creating the stream {}", config.stream))?;
    let subjects = &created.cached_info().config.subjects;
    anyhow::ensure!(
        subjects.contains(&config.journal_subjects()),
        "the stream {} exists for the subjects {subjects:?}, not {}: another cluster's stream, \
         or another cluster.subject_prefix; name another cluster.stream",
        config.stream,
        config.journal_subjects()
    );
    let replicas = created.cached_info().config.num_replicas;
    if replicas != config.replicas {
        tracing::warn!(
            stream = %config.stream,
            replicas,
            configured = config.replicas,
            "the journal stream exists with another replica count; it is used as it is"
        );
    }
    Ok(context)
}

/// The bucket of what every node must agree on.
pub const SETTINGS_BUCKET: &str = "PAYSWITCH_CLUSTER";

/// The entry holding the PAN hash key's fingerprint.
const PAN_HASH_KEY_ENTRY: &str = "pan-hash-key";

/// Checks that this node hashes PANs with the cluster's key: the first node to start
/// records its key's fingerprint (`PanKey::fingerprint`, which does not show the key) in
/// the settings bucket; any other node whose key differs is refused, since its records
/// would not link to the others' (duplicates, velocity, reversals by card).
pub async fn agree_on_pan_key(
    context: &jetstream::Context,
    config: &ClusterConfig,
    key: &crate::journal::PanKey,
) -> anyhow::Result<()> {
    let bucket = match context.get_key_value(SETTINGS_BUCKET).await {
        Ok(bucket) => bucket,
        Err(_) => {
            let created = context
                .create_key_value(jetstream::kv::Config {
                    bucket: SETTINGS_BUCKET.into(),
                    history: 1,
                    num_replicas: config.replicas,
                    storage: jetstream::stream::StorageType::File,
                    ..Default::default()
                })
                .await;
            match created {
                Ok(bucket) => bucket,
                // Another node created it meanwhile.
                Err(_) => context
                    .get_key_value(SETTINGS_BUCKET)
                    .await
                    .with_context(|| format!("the key-value bucket {SETTINGS_BUCKET}"))?,
            }
        }
    };
    let mine = key.fingerprint();
    match bucket.create(PAN_HASH_KEY_ENTRY, mine.clone().into()).await {
        Ok(_) => return Ok(()),
        Err(e) if e.kind() == jetstream::kv::CreateErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).context("recording the PAN hash key's fingerprint"),
    }
    let theirs = bucket
        .get(PAN_HASH_KEY_ENTRY)
        .await
        .context("reading the cluster's PAN hash key fingerprint")?
        .unwrap_or_default();
    anyhow::ensure!(
        theirs == mine.as_bytes(),
        "this node's PAN hash key is not the cluster's (fingerprint {mine}, the cluster's {}): \
         every node must hash card numbers with the same key — give each node the same key \
         file (journal.pan_hash_key_file, 0600), copied from a node already running",
        String::from_utf8_lossy(&theirs)
    );
    Ok(())
}

/// What joining the cluster gives the node.
pub struct Joined {
    /// Where the journal's groups are published.
    pub replica: Replica,
    /// The JetStream context, for what else the node keeps on the cluster.
    pub context: jetstream::Context,
    /// The node's lease, to renew (`Lease::run`).
    pub lease: lease::Lease,
    /// What became of the node's previous lease.
    pub previous: lease::Previous,
    /// The lease as the rest of the switch reads it.
    pub fence: std::sync::Arc<crate::fence::Fence>,
}

/// Connects, makes sure the journal stream exists, takes the node's lease and starts
/// publishing the journal under it.
pub async fn join(config: &ClusterConfig) -> anyhow::Result<Joined> {
    let client = connect(config).await?;
    let context = journal_stream(client, config).await?;
    let fence = std::sync::Arc::new(crate::fence::Fence::new());
    let (lease, previous) =
        lease::Lease::acquire(&context, config, std::sync::Arc::clone(&fence)).await?;
    tracing::info!(
        node = %config.node,
        stream = %config.stream,
        subject = %config.journal_subject(),
        generation = lease.generation(),
        "journal replicated to NATS JetStream"
    );
    let replica = Replica::start(
        context.clone(),
        config.journal_subject(),
        config.node.clone(),
        Duration::from_millis(config.ack_timeout_ms),
        std::sync::Arc::clone(&fence),
    );
    Ok(Joined {
        replica,
        context,
        lease,
        previous,
        fence,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ClusterConfig {
        toml::from_str(
            "servers = [\"nats://127.0.0.1:4222\", \"nats://10.0.0.2:4222\"]\nnode = \"a-1\"\nstan_block = 1\n",
        )
        .unwrap()
    }

    #[test]
    fn defaults_and_subjects() {
        let c = config();
        assert_eq!(c.check(), Ok(()));
        assert_eq!(c.stream, "PAYSWITCH_JOURNAL");
        assert_eq!(c.replicas, 3);
        assert_eq!(c.journal_subject(), "payswitch.journal.a-1");
        assert_eq!(c.journal_subjects(), "payswitch.journal.>");
    }

    #[test]
    fn what_nats_would_misread_is_refused_by_name() {
        let refused = |change: &dyn Fn(&mut ClusterConfig), name: &str| {
            let mut c = config();
            change(&mut c);
            let err = c.check().unwrap_err();
            assert!(err.contains(name), "{err}");
        };
        refused(&|c| c.servers.clear(), "cluster.servers");
        refused(
            &|c| c.servers = vec!["nats://host:port".into()],
            "cluster.servers",
        );
        refused(&|c| c.node = "a.b".into(), "cluster.node");
        refused(&|c| c.node = "a>".into(), "cluster.node");
        refused(&|c| c.node = String::new(), "cluster.node");
        refused(&|c| c.node = "x".repeat(MAX_NODE_NAME + 1), "cluster.node");
        refused(&|c| c.stream = "JOURNAL.X".into(), "cluster.stream");
        refused(
            &|c| c.subject_prefix = "a..b".into(),
            "cluster.subject_prefix",
        );
        refused(
            &|c| c.subject_prefix = "a.*".into(),
            "cluster.subject_prefix",
        );
        refused(&|c| c.replicas = 0, "cluster.replicas");
        refused(&|c| c.replicas = MAX_REPLICAS + 1, "cluster.replicas");
        refused(&|c| c.ack_timeout_ms = 0, "cluster.ack_timeout_ms");
        refused(&|c| c.connect_timeout_ms = 0, "cluster.connect_timeout_ms");
        refused(&|c| c.stan_block = 10, "cluster.stan_block");
        refused(&|c| c.lease_ms = 100, "cluster.lease_ms");
        refused(
            &|c| c.stream_max_age_days = 0,
            "cluster.stream_max_age_days",
        );
        let mut dotted = config();
        dotted.subject_prefix = "acme.payswitch".into();
        assert_eq!(dotted.check(), Ok(()));
        assert_eq!(dotted.journal_subject(), "acme.payswitch.journal.a-1");
    }

    #[test]
    fn unknown_settings_are_refused() {
        let err = toml::from_str::<ClusterConfig>(
            "servers = []\nnode = \"a\"\nstan_block = 0\nreplica = 3\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("replica"), "{err}");
    }
}

/// What reading the journal stream found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StreamReport {
    /// Messages read.
    pub messages: u64,
    /// Records read, over all nodes.
    pub records: u64,
    /// Per node (the last token of the subject): first and last sequence numbers, records,
    /// and the sequence numbers missing between them (groups the stream never
    /// acknowledged: their requests were answered 91, and the node's local segments have
    /// them).
    pub nodes: std::collections::BTreeMap<String, NodeRange>,
}

/// One node's records in the stream.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct NodeRange {
    /// First sequence number seen.
    pub first_seq: u64,
    /// Last sequence number seen.
    pub last_seq: u64,
    /// Records seen.
    pub records: u64,
    /// Sequence numbers between `first_seq` and `last_seq` not seen.
    pub missing: u64,
    /// Records seen again (a publish retried after the stream's duplicate window).
    pub repeated: u64,
}

/// Reads every journal record in the stream `config.stream`, in stream order, checking
/// each frame's checksum, and hands each to `each` with its node; `node` keeps one node's
/// records only. A frame that does not decode is an error naming the message.
pub async fn read_journal(
    config: &ClusterConfig,
    node: Option<&str>,
    mut each: impl FnMut(&str, u64, crate::journal::Record),
) -> anyhow::Result<StreamReport> {
    let client = connect(config).await?;
    let mut context = jetstream::new(client);
    context.set_timeout(Duration::from_millis(config.ack_timeout_ms.max(5_000)));
    let mut stream = context
        .get_stream(&config.stream)
        .await
        .with_context(|| format!("the stream {}", config.stream))?;
    let (first, last, count) = {
        let state = &stream.info().await?.state;
        (state.first_sequence, state.last_sequence, state.messages)
    };
    let prefix = format!("{}.journal.", config.subject_prefix);
    let mut report = StreamReport::default();
    if count == 0 {
        return Ok(report);
    }
    let mut next: std::collections::BTreeMap<String, u64> = Default::default();
    for message_seq in first..=last {
        // A server that does not answer for a moment (a leader being elected) is asked
        // again, for up to 10 s.
        let mut tries = 0;
        let message = loop {
            match stream.get_raw_message(message_seq).await {
                Ok(message) => break Some(message),
                // Deleted from the stream (by its limits, or by hand): a hole, not an error.
                Err(e)
                    if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound =>
                {
                    break None
                }
                Err(_) if tries < 40 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => return Err(e).context(format!("stream message {message_seq}")),
            }
        };
        let Some(message) = message else {
            continue;
        };
        let subject = message.subject.to_string();
        let Some(from) = subject.strip_prefix(&prefix) else {
            continue;
        };
        if node.is_some_and(|n| n != from) {
            continue;
        }
        report.messages += 1;
        frames(&message.payload, |seq, record| {
            report.records += 1;
            let range = report.nodes.entry(from.to_string()).or_default();
            let expected = next.entry(from.to_string()).or_insert(seq);
            if range.records == 0 {
                range.first_seq = seq;
            }
            range.records += 1;
            if seq < *expected {
                range.repeated += 1;
            } else {
                range.missing += seq - *expected;
                *expected = seq + 1;
                range.last_seq = seq;
            }
            each(from, seq, record);
        })
        .map_err(|e| anyhow::anyhow!("stream message {message_seq} ({subject}): {e}"))?;
    }
    Ok(report)
}

/// Hands each journal frame in a stream message's `payload` to `each`, checking its
/// checksum; an error names the byte where a frame does not decode.
pub(crate) fn frames(
    payload: &[u8],
    mut each: impl FnMut(u64, crate::journal::Record),
) -> Result<(), String> {
    let mut at = 0;
    while at < payload.len() {
        let (seq, record, len) = crate::journal::record::decode_frame(&payload[at..])
            .map_err(|e| format!("byte {at}: {e:?}"))?;
        at += len;
        each(seq, record);
    }
    Ok(())
}
