//! Segment files: naming, headers, and reading them back with every check.
//!
//! A journal directory holds segments named `{first_seq:020}.journal`. Each starts with a
//! 16-byte header — `PSWJNL`, format version (u16 LE), first sequence number (u64 LE) —
//! followed by frames (see [`super::record`]). The writer starts a new segment at every
//! start and whenever one passes its size, so only the last segment can have a torn tail.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::record::{decode_frame, FrameError, Record};

/// First bytes of a segment.
pub const SEGMENT_MAGIC: &[u8; 6] = b"PSWJNL";
/// The segment format this build writes and reads.
pub const SEGMENT_VERSION: u16 = 1;
/// Bytes of a segment header.
pub const SEGMENT_HEADER: usize = 16;
/// File name suffix of a segment.
const SEGMENT_SUFFIX: &str = ".journal";

/// The header of a segment whose first record will be `first_seq`.
pub fn segment_header(first_seq: u64) -> [u8; SEGMENT_HEADER] {
    let mut header = [0u8; SEGMENT_HEADER];
    header[..6].copy_from_slice(SEGMENT_MAGIC);
    header[6..8].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
    header[8..].copy_from_slice(&first_seq.to_le_bytes());
    header
}

/// The path of the segment starting at `first_seq`.
pub fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("{first_seq:020}{SEGMENT_SUFFIX}"))
}

/// The segments in `dir`, ordered by their first sequence number.
pub fn list_segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut segments = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(number) = name.strip_suffix(SEGMENT_SUFFIX) else {
            continue;
        };
        if let Ok(first_seq) = number.parse::<u64>() {
            segments.push((first_seq, path));
        }
    }
    segments.sort();
    Ok(segments)
}

/// Why a journal cannot be trusted.
#[derive(Debug, Error)]
pub enum ScanError {
    /// Reading failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A segment does not start with a valid header.
    #[error("{path}: not a payswitch journal segment (bad header)")]
    BadHeader {
        /// The file.
        path: PathBuf,
    },
    /// A record before the end of the journal fails its checks.
    #[error("{path}: corrupt record at byte {offset}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Where the record starts.
        offset: usize,
        /// What failed.
        reason: String,
    },
    /// Records are missing or repeated.
    #[error("{path}: record at byte {offset} has sequence {found}, expected {expected}")]
    Sequence {
        /// The file.
        path: PathBuf,
        /// Where the record starts.
        offset: usize,
        /// The sequence number due.
        expected: u64,
        /// The one found.
        found: u64,
    },
}

/// A final record cut short by a crash.
#[derive(Debug, Clone)]
pub struct TornTail {
    /// The last segment.
    pub path: PathBuf,
    /// Where the intact records end.
    pub offset: usize,
    /// Bytes after them.
    pub bytes: usize,
    /// Whether it was cut off the file.
    pub truncated: bool,
}

/// What a scan found.
#[derive(Debug, Clone, Default)]
pub struct ScanReport {
    /// Segments read.
    pub segments: usize,
    /// Intact records.
    pub records: u64,
    /// Sequence number of the first record.
    pub first_seq: Option<u64>,
    /// Sequence number of the last intact record.
    pub last_seq: Option<u64>,
    /// A torn final record, if the last write before a crash was cut short.
    pub torn_tail: Option<TornTail>,
}

impl ScanReport {
    /// The sequence number the next record gets.
    pub fn next_seq(&self) -> u64 {
        self.last_seq.map_or(1, |s| s + 1)
    }
}

/// Reads every segment in `dir` in order, checking each header, checksum and sequence
/// number, and calls `visit` for each record. A torn tail of the last segment is reported
/// (and cut off the file when `repair` is set); anything else wrong is an error.
pub fn scan(
    dir: &Path,
    repair: bool,
    mut visit: impl FnMut(u64, Record),
) -> Result<ScanReport, ScanError> {
    let io_error = |path: &Path| {
        let path = path.to_owned();
        move |source| ScanError::Io { path, source }
    };
    let segments = list_segments(dir).map_err(io_error(dir))?;
    let mut report = ScanReport::default();
    let last_index = segments.len().saturating_sub(1);
    for (index, (first_seq, path)) in segments.iter().enumerate() {
        let is_last = index == last_index;
        let data = fs::read(path).map_err(io_error(path))?;
        report.segments += 1;
        let end =
            scan_segment(&data, *first_seq, is_last, &mut report, &mut visit).map_err(|error| {
                match error {
                    SegmentError::BadHeader => ScanError::BadHeader { path: path.clone() },
                    SegmentError::Sequence {
                        offset,
                        expected,
                        found,
                    } => ScanError::Sequence {
                        path: path.clone(),
                        offset,
                        expected,
                        found,
                    },
                    SegmentError::Corrupt { offset, reason } => ScanError::Corrupt {
                        path: path.clone(),
                        offset,
                        reason,
                    },
                }
            })?;
        if let SegmentEnd::Torn { offset, bytes } = end {
            report.torn_tail = Some(cut(path, offset, bytes, repair).map_err(io_error(path))?);
            break;
        }
    }
    Ok(report)
}

/// How one segment's bytes end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentEnd {
    /// At the last intact record (or in the zeroed runway after it).
    Complete,
    /// With a write cut short by a crash, from `offset` on (`bytes` of it not zero).
    Torn {
        /// Where the intact records end.
        offset: usize,
        /// Bytes after them up to the last non-zero one.
        bytes: usize,
    },
}

/// What is wrong with a segment's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SegmentError {
    /// Not a segment of this format, or not the one its name says.
    BadHeader,
    /// A record out of sequence.
    Sequence {
        /// Where.
        offset: usize,
        /// The number it should have had.
        expected: u64,
        /// The number it had.
        found: u64,
    },
    /// Damage that is not a torn tail.
    Corrupt {
        /// Where.
        offset: usize,
        /// What.
        reason: String,
    },
}

/// Reads one segment's bytes (`data`, named for `first_seq`), checking its header and
/// every frame's checksum and sequence number against `report`, which it updates; calls
/// `visit` for each record. Only the last segment (`is_last`) may end torn. Performs no
/// I/O: `scan` gives it files, the simulator its simulated disk.
pub fn scan_segment(
    data: &[u8],
    first_seq: u64,
    is_last: bool,
    report: &mut ScanReport,
    visit: &mut impl FnMut(u64, Record),
) -> Result<SegmentEnd, SegmentError> {
    if data.len() < SEGMENT_HEADER {
        // A crash right after the segment was created: it holds nothing.
        if is_last {
            return Ok(SegmentEnd::Torn {
                offset: 0,
                bytes: data.len(),
            });
        }
        return Err(SegmentError::BadHeader);
    }
    if data[..6] != SEGMENT_MAGIC[..]
        || data[6..8] != SEGMENT_VERSION.to_le_bytes()
        || data[8..16] != first_seq.to_le_bytes()
    {
        return Err(SegmentError::BadHeader);
    }
    let mut offset = SEGMENT_HEADER;
    while offset < data.len() {
        let rest = &data[offset..];
        match decode_frame(rest) {
            Ok((seq, record, size)) => {
                let expected = report.last_seq.map_or(first_seq, |last| last + 1);
                if seq != expected || (offset == SEGMENT_HEADER && seq != first_seq) {
                    return Err(SegmentError::Sequence {
                        offset,
                        expected,
                        found: seq,
                    });
                }
                report.first_seq.get_or_insert(seq);
                report.last_seq = Some(seq);
                report.records += 1;
                visit(seq, record);
                offset += size;
            }
            Err(_) if rest.iter().all(|b| *b == 0) => {
                // The zeroed runway past the last record: the segment's end.
                break;
            }
            Err(error) => {
                let next_seq = report.last_seq.map_or(first_seq, |last| last + 1);
                if is_last && is_torn(rest, &error) && !intact_frame_after(rest, next_seq) {
                    let bytes = rest.iter().rposition(|b| *b != 0).map_or(0, |p| p + 1);
                    return Ok(SegmentEnd::Torn { offset, bytes });
                }
                return Err(SegmentError::Corrupt {
                    offset,
                    reason: match error {
                        FrameError::Truncated => "cut short".into(),
                        FrameError::BadLength(n) => format!("impossible length {n}"),
                        FrameError::Checksum => "checksum mismatch".into(),
                        FrameError::Body(e) => format!("undecodable body: {e}"),
                    },
                });
            }
        }
    }
    Ok(SegmentEnd::Complete)
}

/// Whether the bytes from a failing frame to the end of the last segment look like a write
/// cut short: a partial frame at the end of the file, or a final frame whose bytes did not
/// all reach the disk, followed by nothing but the zeroed runway.
fn is_torn(rest: &[u8], error: &FrameError) -> bool {
    match error {
        FrameError::Truncated => true,
        FrameError::Checksum | FrameError::Body(_) => {
            let len =
                u32::from_le_bytes(rest[0..4].try_into().expect("checked by decode")) as usize;
            rest.get(4 + len..)
                .is_none_or(|after| after.iter().all(|b| *b == 0))
        }
        FrameError::BadLength(_) => false,
    }
}

/// Whether an intact frame numbered `after_seq + 1` follows the failing frame at the
/// start of `rest`: then the failure is damage in the middle (a flipped length, say), not a
/// write cut short, and cutting there would throw intact records away.
fn intact_frame_after(rest: &[u8], after_seq: u64) -> bool {
    let wanted = (after_seq + 1).to_le_bytes();
    // A frame's seq sits 8 bytes into it.
    rest.windows(8)
        .enumerate()
        .skip(9)
        .filter(|(_, w)| *w == wanted)
        .any(|(at, _)| decode_frame(&rest[at - 8..]).is_ok_and(|(seq, _, _)| seq == after_seq + 1))
}

fn cut(path: &Path, offset: usize, bytes: usize, repair: bool) -> io::Result<TornTail> {
    if repair {
        let file = OpenOptions::new().write(true).open(path)?;
        if offset == 0 {
            drop(file);
            fs::remove_file(path)?;
        } else {
            file.set_len(offset as u64)?;
            file.sync_all()?;
        }
    }
    Ok(TornTail {
        path: path.to_owned(),
        offset,
        bytes,
        truncated: repair,
    })
}

/// Creates the segment for `first_seq` with its header, durably (file and directory).
pub fn create_segment(dir: &Path, first_seq: u64) -> io::Result<File> {
    let path = segment_path(dir, first_seq);
    let mut options = OpenOptions::new();
    options.create_new(true).write(true);
    // Readable by the switch's user only: the records hold card data (masked) and amounts.
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&path)?;
    file.write_all(&segment_header(first_seq))?;
    file.sync_all()?;
    File::open(dir)?.sync_all()?;
    Ok(file)
}
