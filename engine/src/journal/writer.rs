//! The journal writer: one thread that orders, writes and syncs every record, with group
//! commit.
//!
//! Callers (every shard's requests) encode their records and hand them over through a
//! bounded queue; the writer takes everything waiting (up to [`MAX_BATCH_SUBMISSIONS`],
//! after waiting up to the group-commit window for more), gives the records consecutive
//! sequence numbers, writes them in one `write`, syncs once (`fdatasync`) and only then
//! tells each caller its records are durable. While one sync is under way the next batch
//! gathers, so the cost of a sync is shared by every request that arrived during it.
//!
//! A failed write or sync stops the journal for good: after a failed `fsync` the kernel
//! may have dropped the dirty pages, and retrying would report durable what is not. Every
//! later append fails, and the switch answers without authorizing anything.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam::channel::{self, Receiver, Sender, TrySendError};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::oneshot;

use super::record::{encode_frame, seal_frame, Record};
use super::segment::create_segment;

/// Zeroed bytes the writer keeps ahead of its position in a segment. Overwriting blocks
/// that already exist makes `fdatasync` a pure data flush; growing the file also commits
/// the file system's metadata, which on the disks measured here costs 2-3× more per sync.
/// So the file is grown in steps of this much zeros, paid for by one commit in ~9 000
/// records (`bench/RESULTS.md`, journal).
pub const RUNWAY_BYTES: u64 = 4 << 20;

/// Submissions the writer takes into one write and sync. 4096 submissions of a few
/// hundred bytes is about 1–2 MiB: one large sequential write.
pub const MAX_BATCH_SUBMISSIONS: usize = 4096;

/// Longest group-commit window accepted (`journal.group_commit_window_us`). Every
/// authorization waits for two commits on its path (before it is forwarded, before it is
/// answered); past 100 ms the wait costs more than an acquirer's whole round trip, and a
/// sync is shared by whatever arrives during it without any window anyway.
pub const MAX_GROUP_COMMIT_WINDOW_US: u64 = 100_000;

/// Smallest segment accepted (`journal.segment_bytes`): about 3 000 records. Starting a
/// segment costs three syncs (its header, the file, the directory); below this they become
/// a visible share of the journal's syncs, and the directory fills with files.
pub const MIN_SEGMENT_BYTES: u64 = 1 << 20;

/// Largest segment accepted (`journal.segment_bytes`): a segment is read whole into memory
/// at start (recovery) and by `journal verify`.
pub const MAX_SEGMENT_BYTES: u64 = 1 << 30;

/// Deepest writer queue accepted (`journal.queue_depth`). The queue's slots are allocated
/// when the journal starts; 1 Mi submissions of a few hundred bytes is ~320 MiB of records
/// waiting, 16 s of traffic at 65 k TPS: a disk that far behind has failed, and a deeper
/// queue would only answer 91 later.
pub const MAX_QUEUE_DEPTH: usize = 1 << 20;

/// Longest duplicate window accepted (`journal.duplicate_window_s`): gateways retransmit
/// within minutes, and at start the journal's last window is replayed into memory; a day
/// is far more than any retry schedule needs.
pub const MAX_DUPLICATE_WINDOW_S: u64 = 86_400;

/// Most requests remembered for duplicate detection (`journal.max_duplicates`): about
/// 570 bytes each, so 10 M ≈ 5.7 GiB, more than a node has to give to it.
pub const MAX_DUPLICATES: usize = 10_000_000;

/// When records are synced to the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FsyncPolicy {
    /// `fdatasync` after every group commit, before any of its callers is answered:
    /// nothing answered is lost, even on a power failure.
    Always,
    /// Written to the operating system only: survives a crash of the switch, not of the
    /// machine. For tests and for measuring what the sync costs.
    Never,
}

/// How the journal is written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JournalConfig {
    /// Write the journal. On unless turned off explicitly: without it nothing survives a
    /// crash and in-doubt authorizations cannot be reversed.
    pub enabled: bool,
    /// Directory of the segments (and of the PAN hash key).
    pub dir: PathBuf,
    /// When records reach the disk.
    pub fsync: FsyncPolicy,
    /// After the first record of a group arrives, wait this long for more before writing.
    /// 0: write at once; records that arrive during a sync still share the next one.
    pub group_commit_window_us: u64,
    /// A segment past this size is closed and a new one started.
    pub segment_bytes: u64,
    /// Submissions waiting for the writer; beyond it requests are answered 91.
    pub queue_depth: usize,
    /// A request seen again within this window, with the same terminal, STAN, RRN and
    /// transmission time, is a duplicate.
    pub duplicate_window_s: u64,
    /// Requests remembered for duplicate detection, over all shards.
    pub max_duplicates: usize,
    /// Days a closed segment is kept after its last record (`journal::retention`); 0
    /// keeps every segment. A segment holding a record of a reversal still owed is kept
    /// whatever its age.
    pub retention_days: u64,
    /// The key file that seals PANs in the journal (`journal::vault`), outside the
    /// journal's directory; none: the journal keeps no PAN and reversals and advices go
    /// without field 2.
    pub pan_key_file: Option<PathBuf>,
    /// The file holding the PAN *hash* key (32 hex digits, readable by its owner only),
    /// when it is not the journal directory's `pan.key`: nodes of a cluster must share
    /// one, or a card's records on two nodes would not link (duplicates, velocity).
    pub pan_hash_key_file: Option<PathBuf>,
}

impl Default for JournalConfig {
    fn default() -> Self {
        JournalConfig {
            enabled: true,
            dir: PathBuf::from("journal"),
            fsync: FsyncPolicy::Always,
            group_commit_window_us: 0,
            // 64 MiB: ~200 k authorizations; few files per day, quick to scan one.
            segment_bytes: 64 << 20,
            // 65 536 submissions: a second of traffic at 65 k TPS if the disk stalls,
            // about 20 MiB of encoded records at most.
            queue_depth: 65_536,
            // Gateways retransmit within seconds to a few minutes; ten minutes covers
            // every retry schedule we know of.
            duplicate_window_s: 600,
            // About 570 bytes each (measured: 160 000 forwarded requests grew the switch's
            // RSS by 89 MB): 500 k ≈ 280 MiB, ten minutes at 830 TPS. Beyond that the
            // oldest are forgotten first (counted) and the window is shorter.
            max_duplicates: 500_000,
            // Card-scheme rules and disputes want months of records; deleting them is
            // the operator's choice, not a default.
            retention_days: 0,
            pan_key_file: None,
            pan_hash_key_file: None,
        }
    }
}

/// Why records were not made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum JournalError {
    /// The writer's queue is full: the disk is not keeping up.
    #[error("journal queue full")]
    Overloaded,
    /// A write or sync failed earlier; the journal is stopped.
    #[error("journal stopped after an I/O error")]
    Failed,
    /// A record could not be encoded (a bug).
    #[error("journal record could not be encoded")]
    Encode,
    /// Written locally, but the replicated stream did not acknowledge it in time
    /// (`[cluster]`): the cluster is unreachable or behind.
    #[error("journal record not acknowledged by the replicated stream")]
    Unreplicated,
}

/// Counters of the writer.
#[derive(Debug, Default)]
pub struct JournalStats {
    /// Records written.
    pub records: AtomicU64,
    /// Group commits (writes followed by a sync when syncing).
    pub commits: AtomicU64,
    /// Bytes written.
    pub bytes: AtomicU64,
    /// Nanoseconds spent in write + sync, summed.
    pub commit_ns: AtomicU64,
    /// Submissions handed to the writer and not yet answered.
    pub queued: AtomicU64,
    /// Sequence number of the last durable record.
    pub last_seq: AtomicU64,
    /// Set once a write or sync failed.
    pub failed: AtomicBool,
}

struct Submission {
    frames: Vec<u8>,
    done: oneshot::Sender<Result<u64, JournalError>>,
}

/// A handle to the journal; cheap to clone. The writer thread ends when the last handle
/// is dropped.
#[derive(Clone)]
pub struct Journal {
    queue: Sender<Submission>,
    stats: Arc<JournalStats>,
    dir: Arc<PathBuf>,
    fsync: FsyncPolicy,
    replica: Option<super::replica::Replica>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("last_seq", &self.stats.last_seq.load(Ordering::Relaxed))
            .finish()
    }
}

impl Journal {
    /// Starts writing a new segment in `config.dir` whose first record is `next_seq` (one
    /// past the last record already there; see [`super::segment::scan`]).
    pub fn start(config: &JournalConfig, next_seq: u64) -> std::io::Result<Journal> {
        Journal::start_replicated(config, next_seq, None)
    }

    /// As [`Journal::start`], and with `replica` every group commit is also published to
    /// the replicated stream, its callers answered once the stream has acknowledged it.
    pub fn start_replicated(
        config: &JournalConfig,
        next_seq: u64,
        replica: Option<super::replica::Replica>,
    ) -> std::io::Result<Journal> {
        super::private_dir(&config.dir)?;
        let file = create_segment(&config.dir, next_seq)?;
        // A bounded(0) channel would refuse every `try_send`: `Config::check` keeps the
        // depth within 1..=MAX_QUEUE_DEPTH, and so must any other caller.
        assert!(
            (1..=MAX_QUEUE_DEPTH).contains(&config.queue_depth),
            "journal queue_depth {} outside 1..={MAX_QUEUE_DEPTH}",
            config.queue_depth
        );
        let (queue, submissions) = channel::bounded(config.queue_depth);
        let stats = Arc::new(JournalStats::default());
        let mut writer = Writer::new(config.clone(), file, next_seq, Arc::clone(&stats));
        writer.replica = replica.clone();
        std::thread::Builder::new()
            .name("journal".into())
            .spawn(move || writer.run(submissions))?;
        Ok(Journal {
            queue,
            stats,
            dir: Arc::new(config.dir.clone()),
            fsync: config.fsync,
            replica,
        })
    }

    /// The replica's counters, when the journal is replicated.
    pub fn replica_stats(&self) -> Option<&Arc<super::replica::ReplicaStats>> {
        self.replica.as_ref().map(|r| r.stats())
    }

    /// The replica, when the journal is replicated.
    pub fn replica(&self) -> Option<&super::replica::Replica> {
        self.replica.as_ref()
    }

    /// Appends `records` in order, contiguously, and waits until they are durable (as the
    /// fsync policy defines it). Returns the sequence number of the first.
    pub async fn append(&self, records: &[Record]) -> Result<u64, JournalError> {
        let mut frames = Vec::with_capacity(records.len() * 320);
        for record in records {
            encode_frame(record, &mut frames).map_err(|_| JournalError::Encode)?;
        }
        let (done, durable) = oneshot::channel();
        match self.queue.try_send(Submission { frames, done }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(JournalError::Overloaded),
            Err(TrySendError::Disconnected(_)) => return Err(JournalError::Failed),
        }
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        durable.await.unwrap_or(Err(JournalError::Failed))
    }

    /// The sync policy.
    pub fn fsync(&self) -> FsyncPolicy {
        self.fsync
    }

    /// The journal's directory.
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// The writer's counters.
    pub fn stats(&self) -> &Arc<JournalStats> {
        &self.stats
    }
}

struct Writer {
    config: JournalConfig,
    file: File,
    /// Where the next write goes in the current segment.
    segment_len: u64,
    /// The file's length: zeros from `segment_len` up to here.
    zeroed_to: u64,
    /// The number the next frame gets.
    next_seq: u64,
    /// The number of the last record written (as the fsync policy defines it), kept apart
    /// from `next_seq` to check every batch against.
    last_written: u64,
    stats: Arc<JournalStats>,
    failed: bool,
    /// Where written groups go to be replicated before their callers are answered.
    replica: Option<super::replica::Replica>,
}

impl Writer {
    /// A writer appending to `file`, a new segment whose first record is `next_seq`.
    fn new(config: JournalConfig, file: File, next_seq: u64, stats: Arc<JournalStats>) -> Writer {
        // Record numbers start at 1: 0 is nothing written yet.
        assert!(next_seq >= 1, "journal sequence numbers start at 1");
        stats.last_seq.store(next_seq - 1, Ordering::Relaxed);
        Writer {
            config,
            file,
            segment_len: super::segment::SEGMENT_HEADER as u64,
            zeroed_to: super::segment::SEGMENT_HEADER as u64,
            next_seq,
            last_written: next_seq - 1,
            stats,
            failed: false,
            replica: None,
        }
    }

    fn run(mut self, submissions: Receiver<Submission>) {
        let window = Duration::from_micros(self.config.group_commit_window_us);
        let mut batch: Vec<Submission> = Vec::with_capacity(MAX_BATCH_SUBMISSIONS);
        let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
        while let Ok(first) = submissions.recv() {
            batch.push(first);
            let deadline = Instant::now() + window;
            while batch.len() < MAX_BATCH_SUBMISSIONS {
                let more = if window.is_zero() {
                    submissions.try_recv().ok()
                } else {
                    submissions.recv_deadline(deadline).ok()
                };
                match more {
                    Some(submission) => batch.push(submission),
                    None => break,
                }
            }
            self.stats
                .queued
                .fetch_sub(batch.len() as u64, Ordering::Relaxed);
            match self.replica.take() {
                Some(replica) => {
                    self.commit_replicated(&replica, &mut batch, &mut buf);
                    self.replica = Some(replica);
                }
                None => {
                    let results = self.commit(&mut batch, &mut buf);
                    for (submission, result) in batch.drain(..).zip(results) {
                        let _ = submission.done.send(result);
                    }
                }
            }
        }
    }

    /// Writes and syncs the batch; the first sequence number of each submission, or why
    /// none of them is durable.
    fn commit(
        &mut self,
        batch: &mut [Submission],
        buf: &mut Vec<u8>,
    ) -> Vec<Result<u64, JournalError>> {
        let Some((firsts, next_seq)) = self.seal(batch, buf) else {
            return vec![Err(JournalError::Failed); batch.len()];
        };
        match self.write_sealed(buf, next_seq) {
            Ok(()) => firsts.into_iter().map(Ok).collect(),
            Err(e) => vec![Err(e); batch.len()],
        }
    }

    /// Numbers and seals the batch's frames into `buf`: the first sequence number of each
    /// submission and the number after the last; `None` once the journal has stopped.
    fn seal(&mut self, batch: &mut [Submission], buf: &mut Vec<u8>) -> Option<(Vec<u64>, u64)> {
        if self.failed {
            return None;
        }
        let (firsts, next_seq) = seal_batch(batch, self.next_seq, buf);
        // Readers refuse a gap or a repeat as corruption: a batch that does not continue
        // the sequence right after the last record written would make the journal
        // unreadable from there on. Checked on the sealed bytes, before they are written.
        if let Some(first) = first_frame_seq(buf) {
            assert_eq!(
                first,
                self.last_written + 1,
                "journal batch starts at sequence {first}, the last record written is {}",
                self.last_written
            );
        }
        Some((firsts, next_seq))
    }

    /// Writes and syncs the sealed frames in `buf`, numbered up to `next_seq`; a failure
    /// stops the journal.
    fn write_sealed(&mut self, buf: &mut Vec<u8>, next_seq: u64) -> Result<(), JournalError> {
        let records_bytes = buf.len() as u64;
        let started = Instant::now();
        if let Err(e) = self.write_synced(buf) {
            tracing::error!(error = %e, dir = %self.config.dir.display(), "journal write failed: the journal is stopped and every request is answered without authorizing");
            self.failed = true;
            self.stats.failed.store(true, Ordering::Relaxed);
            return Err(JournalError::Failed);
        }
        let elapsed = started.elapsed();
        self.advance(next_seq, records_bytes, buf.len() as u64, elapsed);
        self.start_segment_when_full();
        Ok(())
    }

    /// With a replica: seals the batch, hands it to the replica first, then writes and
    /// syncs it, so the publish and the local sync overlap; the replica answers each
    /// caller once the stream has acknowledged and the local write has succeeded.
    fn commit_replicated(
        &mut self,
        replica: &super::replica::Replica,
        batch: &mut Vec<Submission>,
        buf: &mut Vec<u8>,
    ) {
        let Some((firsts, next_seq)) = self.seal(batch, buf) else {
            for submission in batch.drain(..) {
                let _ = submission.done.send(Err(JournalError::Failed));
            }
            return;
        };
        let (written, local) = tokio::sync::oneshot::channel();
        let parts = batch
            .drain(..)
            .zip(firsts)
            .map(|(submission, first_seq)| {
                let answer = super::replica::Answer {
                    done: submission.done,
                    first_seq,
                };
                (submission.frames, answer)
            })
            .collect();
        replica.hand_over(super::replica::Group {
            parts,
            handed: Instant::now(),
            local,
        });
        let _ = written.send(self.write_sealed(buf, next_seq));
    }

    /// Writes `buf` (the batch's frames) at the end of the segment's records, growing the
    /// file by the zeroed runway when they reach past it, and syncs as the policy says.
    fn write_synced(&mut self, buf: &mut Vec<u8>) -> std::io::Result<()> {
        let data_end = self.segment_len + buf.len() as u64;
        if data_end > self.zeroed_to {
            // Grow the file by the runway in the same write; the next commits overwrite.
            // No further than the segment's size: the next segment has its own runway.
            let grown = (data_end + RUNWAY_BYTES).min(self.config.segment_bytes.max(data_end));
            buf.resize((grown - self.segment_len) as usize, 0);
        }
        self.file.write_all_at(buf, self.segment_len)?;
        match self.config.fsync {
            FsyncPolicy::Always => self.file.sync_data(),
            FsyncPolicy::Never => Ok(()),
        }
    }

    /// Takes a durable write of `records_bytes` of frames (`written_bytes` with the
    /// runway), numbered up to `next_seq`, in `elapsed`: moves the segment's end on and
    /// counts it.
    fn advance(
        &mut self,
        next_seq: u64,
        records_bytes: u64,
        written_bytes: u64,
        elapsed: Duration,
    ) {
        let records = next_seq - self.next_seq;
        self.next_seq = next_seq;
        self.last_written = next_seq - 1;
        self.zeroed_to = self.zeroed_to.max(self.segment_len + written_bytes);
        self.segment_len += records_bytes;
        let stats = &self.stats;
        stats.records.fetch_add(records, Ordering::Relaxed);
        stats.commits.fetch_add(1, Ordering::Relaxed);
        stats.bytes.fetch_add(records_bytes, Ordering::Relaxed);
        stats
            .commit_ns
            .fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
        stats.last_seq.store(next_seq - 1, Ordering::Relaxed);
    }

    /// Starts a new segment once the current one has reached its size.
    fn start_segment_when_full(&mut self) {
        if self.segment_len < self.config.segment_bytes {
            return;
        }
        match create_segment(&self.config.dir, self.next_seq) {
            Ok(file) => {
                self.file = file;
                self.segment_len = super::segment::SEGMENT_HEADER as u64;
                self.zeroed_to = self.segment_len;
            }
            // The records written are durable; keep appending to the old segment and try
            // again after the next commit.
            Err(e) => tracing::warn!(error = %e, "cannot start a new journal segment"),
        }
    }
}

/// Numbers the frames of `batch` from `first_seq` on, in order, seals them (sequence
/// number and checksum) and gathers them into `buf`. Returns the first sequence number of
/// each submission and the number after the last frame.
fn seal_batch(batch: &mut [Submission], first_seq: u64, buf: &mut Vec<u8>) -> (Vec<u64>, u64) {
    buf.clear();
    let mut firsts = Vec::with_capacity(batch.len());
    let mut seq = first_seq;
    for submission in batch.iter_mut() {
        firsts.push(seq);
        let frames = &mut submission.frames;
        let mut at = 0;
        while at < frames.len() {
            let len = u32::from_le_bytes(frames[at..at + 4].try_into().expect("4 bytes"));
            let end = at + 4 + len as usize;
            seal_frame(&mut frames[at..end], seq);
            seq += 1;
            at = end;
        }
        buf.extend_from_slice(frames);
    }
    (firsts, seq)
}

/// The sequence number of the first frame in `buf`, if it holds one.
fn first_frame_seq(buf: &[u8]) -> Option<u64> {
    let seq = buf.get(8..16)?;
    Some(u64::from_le_bytes(seq.try_into().expect("8 bytes")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::record::tests::sample;
    use crate::journal::segment::{scan, segment_path, SEGMENT_HEADER};
    use crate::journal::RecordKind;
    use std::path::Path;

    fn writer(dir: &Path, next_seq: u64) -> Writer {
        let config = JournalConfig {
            dir: dir.to_owned(),
            fsync: FsyncPolicy::Never,
            ..JournalConfig::default()
        };
        let file = create_segment(dir, next_seq).unwrap();
        Writer::new(config, file, next_seq, Arc::new(JournalStats::default()))
    }

    /// A submission of `records` encoded records.
    fn submission(records: usize) -> Submission {
        let mut frames = Vec::new();
        for _ in 0..records {
            encode_frame(&sample(RecordKind::Request), &mut frames).unwrap();
        }
        let (done, _) = oneshot::channel();
        Submission { frames, done }
    }

    fn seqs(dir: &Path) -> Vec<u64> {
        let mut seqs = Vec::new();
        scan(dir, false, |seq, _| seqs.push(seq)).unwrap();
        seqs
    }

    #[test]
    fn batches_continue_the_sequence_from_where_the_last_one_ended() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = writer(dir.path(), 5);
        let mut buf = Vec::new();
        let mut batch = [submission(2), submission(0), submission(1)];
        let firsts = writer.commit(&mut batch, &mut buf);
        assert_eq!(firsts, [Ok(5), Ok(7), Ok(7)]);
        let firsts = writer.commit(&mut [submission(3)], &mut buf);
        assert_eq!(firsts, [Ok(8)]);
        assert_eq!(seqs(dir.path()), (5..=10).collect::<Vec<_>>());
        assert_eq!(writer.stats.last_seq.load(Ordering::Relaxed), 10);
    }

    #[test]
    fn a_batch_that_would_leave_a_gap_is_never_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = writer(dir.path(), 5);
        // A numbering bug: the next frame would skip sequence number 5.
        writer.next_seq = 6;
        let mut batch = [submission(1)];
        let committed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            writer.commit(&mut batch, &mut Vec::new())
        }));
        assert!(committed.is_err(), "a gap must stop the writer");
        let segment = std::fs::metadata(segment_path(dir.path(), 5)).unwrap();
        assert_eq!(segment.len(), SEGMENT_HEADER as u64, "nothing was written");
    }
}
