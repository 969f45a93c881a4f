//! Retention: closed segments older than `journal.retention_days` are deleted, except
//! those a reversal still owed needs at the next start.
//!
//! A segment holds the records numbered from its first sequence number up to the next
//! segment's. It may go when it is not the last (the writer's), its last record (its
//! file's modification time) is older than the cutoff, and every record in it is older
//! than the oldest request that still owes something: a reversal queued and not yet
//! acknowledged (delivering, deferred for a full queue, or for an acquirer no longer
//! configured). Those records are what the next start rebuilds the reversal from, so
//! they stay however old they are. The duplicate window a start replays is far younger
//! than any retention accepted (at least a day).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::segment::list_segments;

/// How often a running switch looks for expired segments.
pub const CHECK_EVERY: Duration = Duration::from_secs(600);

/// One segment: its first sequence number, its path and when it was last written.
#[derive(Debug, Clone)]
pub struct SegmentInfo {
    /// Sequence number of its first record.
    pub first_seq: u64,
    /// Its file.
    pub path: PathBuf,
    /// When its last record was written.
    pub modified: SystemTime,
}

/// The segments that may be deleted: closed, last written before `cutoff`, and wholly
/// before `keep_from_seq` (the oldest request still owed something; `None`: nothing is).
/// `segments` in order of their first sequence number.
pub fn expired(
    segments: &[SegmentInfo],
    cutoff: SystemTime,
    keep_from_seq: Option<u64>,
) -> Vec<PathBuf> {
    segments
        .windows(2)
        .take_while(|pair| {
            let (segment, next) = (&pair[0], &pair[1]);
            // Its records are numbered below the next segment's first.
            let before_owed = keep_from_seq.is_none_or(|keep| next.first_seq <= keep);
            segment.modified < cutoff && before_owed
        })
        .map(|pair| pair[0].path.clone())
        .collect()
}

/// Deletes the expired segments of the journal in `dir` (see [`expired`]) for a retention
/// of `retention`, now `now`; the paths deleted and their bytes.
pub fn apply(
    dir: &Path,
    retention: Duration,
    now: SystemTime,
    keep_from_seq: Option<u64>,
) -> std::io::Result<(Vec<PathBuf>, u64)> {
    let mut segments = Vec::new();
    for (first_seq, path) in list_segments(dir)? {
        let modified = std::fs::metadata(&path)?.modified()?;
        segments.push(SegmentInfo {
            first_seq,
            path,
            modified,
        });
    }
    let cutoff = now.checked_sub(retention).unwrap_or(SystemTime::UNIX_EPOCH);
    let mut deleted = Vec::new();
    let mut bytes = 0;
    for path in expired(&segments, cutoff, keep_from_seq) {
        bytes += std::fs::metadata(&path).map_or(0, |m| m.len());
        std::fs::remove_file(&path)?;
        deleted.push(path);
    }
    if !deleted.is_empty() {
        // The directory entry removals are durable too.
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok((deleted, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    fn segment(first_seq: u64, age_days: u64, now: SystemTime) -> SegmentInfo {
        SegmentInfo {
            first_seq,
            path: PathBuf::from(format!("{first_seq}")),
            modified: now - DAY * age_days as u32,
        }
    }

    #[test]
    fn old_closed_segments_go_unless_something_owed_is_in_them_and_the_last_stays() {
        let now = SystemTime::UNIX_EPOCH + DAY * 1_000;
        let segments = [
            segment(1, 100, now),
            segment(1_000, 95, now),
            segment(2_000, 40, now),
            segment(3_000, 10, now),
            segment(4_000, 200, now), // the writer's (clock skew): never deleted
        ];
        let cutoff = now - DAY * 30;
        let names = |v: Vec<PathBuf>| {
            v.into_iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names(expired(&segments, cutoff, None)),
            ["1", "1000", "2000"]
        );
        // A reversal owed for request 1 500: its segment and every later one stay.
        assert_eq!(names(expired(&segments, cutoff, Some(1_500))), ["1"]);
        assert_eq!(names(expired(&segments, cutoff, Some(1_000))), ["1"]);
        assert_eq!(
            names(expired(&segments, cutoff, Some(999))),
            Vec::<String>::new()
        );
        // A young segment stops the sweep: nothing after it goes either.
        let cutoff = now - DAY * 97;
        assert_eq!(names(expired(&segments, cutoff, None)), ["1"]);
        assert!(expired(&segments[4..], now, None).is_empty());
    }

    #[test]
    fn apply_deletes_the_files_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        for (first_seq, age_days) in [(1u64, 60u64), (500, 45), (900, 1)] {
            let path = super::super::segment::segment_path(dir.path(), first_seq);
            let file = std::fs::File::create(&path).unwrap();
            file.set_len(4_096).unwrap();
            file.set_modified(now - DAY * age_days as u32).unwrap();
        }
        let (deleted, bytes) = apply(dir.path(), DAY * 30, now, Some(700)).unwrap();
        assert_eq!(deleted.len(), 1);
        assert_eq!(bytes, 4_096);
        let left: Vec<u64> = list_segments(dir.path())
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(left, [500, 900]);
    }
}
