//! The simulated disk under the journal: one segment's bytes, written with the journal's
//! own frame code and read back with its own scanner, of which only what was synced is
//! sure to survive a crash.

use rand::Rng;

use crate::journal::record::{encode_frame, seal_frame};
use crate::journal::segment::{scan_segment, segment_header, SegmentEnd, SegmentError};
use crate::journal::{Record, ScanReport};

/// The segment's bytes and how far they are synced.
#[derive(Debug)]
pub struct Disk {
    bytes: Vec<u8>,
    /// Bytes that survive a crash.
    synced: usize,
    /// The number the next record gets.
    next_seq: u64,
}

impl Disk {
    /// An empty disk: a segment whose first record is 1.
    pub fn new() -> Disk {
        Disk {
            bytes: segment_header(1).to_vec(),
            synced: crate::journal::segment::SEGMENT_HEADER,
            next_seq: 1,
        }
    }

    /// Writes `records` after the last, numbering them; returns the first's number.
    /// Nothing is synced.
    pub fn write(&mut self, records: &[Record]) -> u64 {
        let first = self.next_seq;
        for record in records {
            let start = self.bytes.len();
            encode_frame(record, &mut self.bytes).expect("records the switch makes encode");
            seal_frame(&mut self.bytes[start..], self.next_seq);
            self.next_seq += 1;
        }
        first
    }

    /// Bytes written so far (a sync point).
    pub fn written(&self) -> usize {
        self.bytes.len()
    }

    /// Everything up to `point` (from [`Disk::written`]) is now on the disk.
    pub fn synced_to(&mut self, point: usize) {
        assert!(point <= self.bytes.len(), "synced what was never written");
        self.synced = self.synced.max(point);
    }

    /// A crash: what was not synced is lost, except that some of it may have reached the
    /// disk anyway, possibly cut mid-record. Returns whether a torn write was left.
    pub fn crash(&mut self, rng: &mut impl Rng) -> bool {
        let unsynced = self.bytes.len() - self.synced;
        let kept = match (unsynced, rng.gen_range(0..4)) {
            (0, _) | (_, 0 | 1) => 0,
            (n, 2) => n,
            (n, _) => rng.gen_range(0..n),
        };
        self.bytes.truncate(self.synced + kept);
        kept > 0
    }

    /// Reads the segment back as a restart does, cutting off a torn tail, and feeds every
    /// record to `visit`. Any other damage, or a sequence gap, is an error: the journal's
    /// sequence numbers are contiguous.
    pub fn replay(
        &mut self,
        mut visit: impl FnMut(u64, Record),
    ) -> Result<ScanReport, SegmentError> {
        let mut report = ScanReport::default();
        let end = scan_segment(&self.bytes, 1, true, &mut report, &mut visit)?;
        if let SegmentEnd::Torn { offset, .. } = end {
            self.bytes
                .truncate(offset.max(crate::journal::segment::SEGMENT_HEADER));
        }
        self.synced = self.bytes.len();
        self.next_seq = report.next_seq();
        Ok(report)
    }
}

impl Disk {
    /// Every intact record on the disk, read without changing it (a torn tail is left
    /// where it is).
    pub fn records(&self) -> Result<Vec<Record>, SegmentError> {
        let mut records = Vec::new();
        let mut report = ScanReport::default();
        scan_segment(&self.bytes, 1, true, &mut report, &mut |_, record| {
            records.push(record)
        })?;
        Ok(records)
    }
}

impl Default for Disk {
    fn default() -> Self {
        Disk::new()
    }
}
