//! The journal on disk: torn tails, corruption, group commit order, recovery. The tests
//! that also run `payswitch journal verify|export` are in `cli/tests/journal_cli.rs`.

use std::collections::HashMap;
use std::sync::Arc;

use payswitch::journal::{self, scan, Journal, Record, RecordKind, ScanError};

#[path = "support/journal.rs"]
mod journal_support;

use journal_support::{config, frame_len, read_all, record, segments, write_requests};

#[tokio::test]
async fn a_damaged_length_in_the_last_segment_is_not_mistaken_for_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let segment = write_requests(dir.path(), 10).await;
    let mut bytes = std::fs::read(&segment).unwrap();
    let frame_len = frame_len();
    // The fifth record's length now reaches past the end of the file, as a torn write's
    // would; the five intact records after it say otherwise.
    let at = journal::segment::SEGMENT_HEADER + 4 * frame_len;
    bytes[at..at + 4].copy_from_slice(&7_000u32.to_le_bytes());
    std::fs::write(&segment, &bytes).unwrap();
    let error = scan(dir.path(), true, |_, _| {}).unwrap_err();
    assert!(matches!(error, ScanError::Corrupt { .. }), "{error}");
    assert_eq!(std::fs::read(&segment).unwrap(), bytes, "nothing cut");
}

#[tokio::test]
async fn a_missing_segment_breaks_the_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.segment_bytes = 500;
    let journal = Journal::start(&cfg, 1).unwrap();
    for i in 0..20 {
        journal
            .append(&[record(RecordKind::Request, i, "533012000001")])
            .await
            .unwrap();
    }
    drop(journal);
    let all = segments(dir.path());
    assert!(all.len() >= 3);
    std::fs::remove_file(&all[1]).unwrap();
    let error = scan(dir.path(), false, |_, _| {}).unwrap_err();
    assert!(matches!(error, ScanError::Sequence { .. }), "{error}");
}

/// Many shards append concurrently; the journal numbers records in the order it writes
/// them, each submission's records stay together and in order, and what each caller was
/// told is what is on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn group_commit_keeps_order_across_shards() {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::start(&config(dir.path()), 1).unwrap();
    const SHARDS: u32 = 8;
    const PER_SHARD: u32 = 200;
    let mut tasks = Vec::new();
    for shard in 0..SHARDS {
        let journal = journal.clone();
        tasks.push(tokio::spawn(async move {
            let mut told = Vec::new();
            for i in 0..PER_SHARD {
                let stan = shard * 1_000 + i;
                let mut forwarded = record(RecordKind::Forwarded, stan, "533012000001");
                forwarded.request_back = 1;
                let first = journal
                    .append(&[record(RecordKind::Request, stan, "533012000001"), forwarded])
                    .await
                    .unwrap();
                told.push((first, stan));
            }
            told
        }));
    }
    let mut told = HashMap::new();
    for task in tasks {
        for (seq, stan) in task.await.unwrap() {
            assert!(
                told.insert(seq, stan).is_none(),
                "a sequence number given twice"
            );
        }
    }
    let stats = Arc::clone(journal.stats());
    drop(journal);
    let read = read_all(dir.path());
    assert_eq!(read.len() as u32, SHARDS * PER_SHARD * 2);
    for (i, (seq, r)) in read.iter().enumerate() {
        assert_eq!(*seq, i as u64 + 1, "contiguous from 1");
        let stan: u32 = r.stan.parse().unwrap();
        match r.kind {
            RecordKind::Request => assert_eq!(told[seq], stan, "seq {seq}"),
            RecordKind::Forwarded => {
                assert_eq!(r.request_of(*seq), seq - 1);
                assert_eq!(read[i - 1].1.stan, r.stan, "a submission stays together");
            }
            other => panic!("{other:?}"),
        }
    }
    // Each shard's own records are in the order that shard appended them.
    for shard in 0..SHARDS {
        let stans: Vec<u32> = read
            .iter()
            .filter(|(_, r)| r.kind == RecordKind::Request)
            .map(|(_, r)| r.stan.parse::<u32>().unwrap())
            .filter(|s| s / 1_000 == shard)
            .collect();
        assert!(stans.windows(2).all(|w| w[0] < w[1]), "shard {shard}");
    }
    let commits = stats.commits.load(std::sync::atomic::Ordering::Relaxed);
    assert!(commits >= 1 && commits <= u64::from(SHARDS * PER_SHARD));
}

/// Whatever a damaged disk hands back, reading it never panics: an error, or a torn tail.
#[test]
fn reading_random_bytes_never_panics() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let (mut clean, mut torn, mut refused) = (0, 0, 0);
    for case in 0..300 {
        let dir = tempfile::tempdir().unwrap();
        let path = journal::segment::segment_path(dir.path(), 1);
        let mut bytes = journal::segment::segment_header(1).to_vec();
        // Intact records first, so the damage after them is met past real frames.
        let intact: Vec<(u64, Record)> = (1..=rng.gen_range(0..4u32))
            .map(|i| (u64::from(i), record(RecordKind::Request, i, "533012000001")))
            .collect();
        for (seq, r) in &intact {
            let start = bytes.len();
            journal::record::encode_frame(r, &mut bytes).unwrap();
            journal::record::seal_frame(&mut bytes[start..], *seq);
        }
        let damage_at = bytes.len();
        // Mostly long runs of noise; every fourth a few bytes, as a write cut short leaves.
        let len = if case % 4 == 3 {
            rng.gen_range(0..16)
        } else {
            rng.gen_range(0..4_000)
        };
        bytes.extend((0..len).map(|_| rng.gen::<u8>()));
        if case % 3 == 0 && bytes.len() >= damage_at + 4 {
            // A plausible length up front, so decoding goes past the length check.
            let claimed = rng.gen_range(12..300u32);
            bytes[damage_at..damage_at + 4].copy_from_slice(&claimed.to_le_bytes());
        }
        if case % 5 == 0 {
            // The zeroed runway a segment is preallocated with.
            bytes.resize(bytes.len() + rng.gen_range(0..512), 0);
        }
        std::fs::write(&path, &bytes).unwrap();
        let repair = case % 2 == 0;
        let mut delivered = Vec::new();
        let result = scan(dir.path(), repair, |seq, r| delivered.push((seq, r)));

        // Only records that passed their checksum reach the visitor: the intact ones, in
        // order, and nothing made of the random bytes.
        assert_eq!(delivered, intact, "case {case}");
        match result {
            Ok(report) => {
                assert_eq!(report.records, intact.len() as u64, "case {case}");
                assert_eq!(report.last_seq, intact.last().map(|(s, _)| *s));
                match report.torn_tail {
                    // A torn tail starts where the intact records end and is cut off
                    // when repairing; reading again finds the same records, untorn.
                    Some(tail) => {
                        torn += 1;
                        assert_eq!(tail.offset, damage_at, "case {case}");
                        assert!(tail.bytes <= bytes.len() - damage_at, "case {case}");
                        assert_eq!(tail.truncated, repair);
                        let on_disk = std::fs::metadata(&path).unwrap().len() as usize;
                        if repair {
                            assert_eq!(on_disk, damage_at, "case {case}");
                            let mut again = Vec::new();
                            let report = scan(dir.path(), false, |s, r| again.push((s, r)));
                            assert!(report.unwrap().torn_tail.is_none(), "case {case}");
                            assert_eq!(again, intact, "case {case}");
                        } else {
                            assert_eq!(on_disk, bytes.len(), "case {case}");
                        }
                    }
                    // No tail: nothing but the zeroed runway followed the records.
                    None => {
                        clean += 1;
                        assert!(bytes[damage_at..].iter().all(|b| *b == 0), "case {case}");
                    }
                }
            }
            // Damage that is not a write cut short is refused where it starts, and the
            // file is left as it was, even when asked to repair.
            Err(error) => {
                refused += 1;
                assert!(
                    matches!(error, ScanError::Corrupt { offset, .. } if offset == damage_at),
                    "case {case}: {error}"
                );
                assert_eq!(std::fs::read(&path).unwrap(), bytes, "case {case}");
            }
        }
        // The frame decoder alone: the first intact frame decodes, the damage does not.
        if let Some((seq, r)) = intact.first() {
            let decoded = journal::record::decode_frame(&bytes[16..]).unwrap();
            assert_eq!(decoded, (*seq, r.clone(), frame_len()));
        }
        assert!(journal::record::decode_frame(&bytes[damage_at..]).is_err());
    }
    // The seed reaches every outcome.
    assert!(
        clean > 0 && torn > 0 && refused > 0,
        "{clean} {torn} {refused}"
    );
}

/// After a crash: a forwarded authorization without an outcome is in doubt (reversed),
/// a queued reversal without its acknowledgement is queued again, and both are answered 91
/// to a retransmission — even when the crash fell between queueing the reversal and
/// journaling the 91.
#[tokio::test]
async fn recovery_finds_what_is_in_doubt_and_what_is_owed() {
    use payswitch::shard::duplicates::DupKey;
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::start(&config(dir.path()), 1).unwrap();
    let forwarded = |stan: u32| {
        let mut r = record(RecordKind::Forwarded, stan, &format!("5330000000{stan:02}"));
        r.request_back = 1;
        r.acquirer = "north".into();
        r.link_stan = 100 + stan;
        r
    };
    let request = |stan: u32| record(RecordKind::Request, stan, &format!("5330000000{stan:02}"));
    // 1: forwarded, then the crash.
    journal.append(&[request(1), forwarded(1)]).await.unwrap();
    // 2: forwarded and answered 00.
    let first = journal.append(&[request(2), forwarded(2)]).await.unwrap();
    let mut response = record(RecordKind::Response, 2, "533000000002");
    response.request_seq = first;
    response.code = "00".into();
    response.approval_code = "A1B2C3".into();
    journal.append(&[response]).await.unwrap();
    // 3: timed out: reversal queued, then the crash before its 91 was journaled.
    let third = journal.append(&[request(3), forwarded(3)]).await.unwrap();
    let mut queued = forwarded(3);
    queued.kind = RecordKind::ReversalQueued;
    queued.request_back = 0;
    queued.request_seq = third;
    journal.append(&[queued]).await.unwrap();
    drop(journal);

    let recovery =
        payswitch::recovery::recover(dir.path(), &["north".to_string()], 0, 1_000, None).unwrap();
    let stans = |v: &[payswitch::reversal::PendingReversal]| {
        v.iter()
            .map(|p| p.original.stan.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(stans(&recovery.in_doubt), ["000001"]);
    assert_eq!(stans(&recovery.pending), ["000003"]);
    assert_eq!(recovery.in_doubt[0].original.link_stan, 101);
    assert_eq!(recovery.pending[0].request_seq, third);
    let outcome = |stan: u32| {
        let key = DupKey::of_record(&request(stan)).unwrap();
        let (_, _, _, original) = recovery
            .recent
            .iter()
            .find(|(_, k, _, _)| *k == key)
            .unwrap_or_else(|| panic!("{stan} not remembered"));
        let outcome = original.outcome_now().unwrap();
        (
            String::from_utf8_lossy(&outcome.code).into_owned(),
            original.reversal_claimed(),
        )
    };
    assert_eq!(outcome(1), ("91".to_string(), true));
    assert_eq!(outcome(2), ("00".to_string(), false));
    assert_eq!(outcome(3), ("91".to_string(), true));
}

/// The journal holds masked PANs, PAN hashes, amounts, merchants and RRNs, and the PAN
/// hash key: its directory and files are the switch's user's alone, also when an older
/// version left them readable by others.
#[cfg(unix)]
#[test]
fn the_journal_is_readable_by_its_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let journal_dir = dir.path().join("journal");
    std::fs::create_dir(&journal_dir).unwrap();
    std::fs::set_permissions(&journal_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let old = journal_dir.join("left-by-an-older-version");
    std::fs::write(&old, b"x").unwrap();
    std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mode =
        |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;

    journal::PanKey::load_or_create(&journal_dir).unwrap();
    let writer = Journal::start(&config(&journal_dir), 1).unwrap();
    drop(writer);

    assert_eq!(mode(&journal_dir), 0o700);
    assert_eq!(mode(&old), 0o600);
    assert_eq!(mode(&journal_dir.join(journal::PAN_KEY_FILE)), 0o600);
    let segments = segments(&journal_dir);
    assert!(!segments.is_empty());
    for segment in segments {
        assert_eq!(mode(&segment), 0o600, "{}", segment.display());
    }
}
