//! The journal: every authorization and its outcome, appended to checksummed segment files
//! and made durable by group commit before the gateway is answered.
//!
//! - [`record`]: what a record holds and how it is framed (length, CRC32C, sequence).
//! - [`segment`]: segment files, and reading them back with every check (`journal verify`).
//! - [`writer`]: the single writer thread and its group commit.
//! - [`replica`]: the copy on a replicated NATS JetStream stream, with `[cluster]`.
//! - [`PanKey`]: the keyed hash that links a card's records without storing its number.
//! - [`export`]: JSON lines and CSV for reconciliation and risk teams' labels.
//!
//! What the switch does with the records on start (in-doubt authorizations, the reversal
//! queue, the duplicate window) lives in `crate::recovery`.

pub mod record;
pub mod replica;
pub mod retention;
pub mod segment;
pub mod vault;
pub mod writer;

use std::io::{self, Write};
use std::path::Path;

use serde::Serialize;
use siphasher::sip128::{Hasher128, SipHasher24};

pub use record::{Record, RecordKind};
pub use segment::{scan, ScanError, ScanReport};
pub use vault::{PanVault, SealedPan};
pub use writer::{FsyncPolicy, Journal, JournalConfig, JournalError, JournalStats};

/// File in the journal directory holding the PAN hash key.
pub const PAN_KEY_FILE: &str = "pan.key";

/// Creates the journal directory if needed and makes it the switch's user's alone
/// (0700): its files hold masked PANs, PAN hashes, amounts, merchants and RRNs, and the
/// PAN hash key. An existing directory, and the files in it, with wider permissions are
/// tightened (files to 0600).
pub fn private_dir(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let tighten = |path: &Path, mode: u32| -> io::Result<()> {
            if std::fs::metadata(path)?.permissions().mode() & 0o777 != mode {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
            }
            Ok(())
        };
        tighten(dir, 0o700)?;
        // Files an older version wrote with the umask's permissions.
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                tighten(&entry.path(), 0o600)?;
            }
        }
    }
    Ok(())
}

/// The secret key of the PAN hash. Records of one card share a hash; without the key the
/// hash says nothing about the card number.
#[derive(Clone)]
pub struct PanKey([u8; 16]);

impl std::fmt::Debug for PanKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PanKey(..)")
    }
}

impl PanKey {
    /// Reads the key from `dir/pan.key`, making a random one (readable by the owner only)
    /// the first time.
    pub fn load_or_create(dir: &Path) -> io::Result<PanKey> {
        let path = dir.join(PAN_KEY_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => PanKey::parse(&text, &path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                private_dir(dir)?;
                let key: [u8; 16] = rand::random();
                let mut options = std::fs::OpenOptions::new();
                options.write(true).create_new(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
                let mut file = options.open(&path)?;
                writeln!(file, "{}", hex::encode(key))?;
                file.sync_all()?;
                Ok(PanKey(key))
            }
            Err(e) => Err(e),
        }
    }

    /// Reads the key from `path`, a file provisioned by the operator (the same on every
    /// node of a cluster): it must exist and be readable by its owner only.
    pub fn load(path: &Path) -> io::Result<PanKey> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "{}: mode {mode:o}; the PAN hash key must be readable by its owner only (chmod 600)",
                        path.display()
                    ),
                ));
            }
        }
        let text = std::fs::read_to_string(path)?;
        PanKey::parse(&text, path)
    }

    fn parse(text: &str, path: &Path) -> io::Result<PanKey> {
        hex::decode(text.trim())
            .ok()
            .and_then(|b| <[u8; 16]>::try_from(b).ok())
            .map(PanKey)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: not 32 hex digits", path.display()),
                )
            })
    }

    /// What nodes compare to know they share the key, without showing it: the keyed
    /// hash of a fixed text no card number can be.
    pub fn fingerprint(&self) -> String {
        format!(
            "{:032x}",
            self.hash(b"payswitch: the PAN hash key's fingerprint")
        )
    }

    /// A key for tests and for running without a journal.
    pub fn from_bytes(key: [u8; 16]) -> PanKey {
        PanKey(key)
    }

    /// The keyed hash of a PAN's digits.
    pub fn hash(&self, pan: &[u8]) -> u128 {
        let mut hasher = SipHasher24::new_with_key(&self.0);
        std::hash::Hasher::write(&mut hasher, pan);
        hasher.finish128().as_u128()
    }
}

/// Export formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// One JSON object per line.
    Jsonl,
    /// CSV with a header.
    Csv,
}

/// A record as exported: the stored fields, with empty ones as null.
#[derive(Debug, Serialize)]
pub struct Exported<'a> {
    seq: u64,
    kind: &'static str,
    time_ms: i64,
    request_seq: u64,
    mti: &'a str,
    processing_code: &'a str,
    transmission_time: &'a str,
    terminal: &'a str,
    merchant: &'a str,
    stan: &'a str,
    rrn: &'a str,
    pan_masked: &'a str,
    pan_hash: String,
    amount_minor: u64,
    currency: u16,
    acquirer: Option<&'a str>,
    link_stan: Option<u32>,
    code: Option<&'a str>,
    approval_code: Option<&'a str>,
    decision: Option<&'a str>,
    score: Option<f32>,
    model: Option<&'a str>,
    private_data: Option<&'a str>,
    duplicate: bool,
    switch_us: Option<u64>,
    acquirer_us: Option<u64>,
    attempt: Option<u32>,
}

impl<'a> Exported<'a> {
    /// The export view of record `seq`.
    pub fn of(seq: u64, r: &'a Record) -> Exported<'a> {
        let text = |s: &'a str| (!s.is_empty()).then_some(s);
        let number = |n: u64| (n != 0).then_some(n);
        Exported {
            seq,
            kind: r.kind.as_str(),
            time_ms: r.time_ms,
            request_seq: r.request_of(seq),
            mti: &r.mti,
            processing_code: &r.processing_code,
            transmission_time: &r.transmission_time,
            terminal: &r.terminal,
            merchant: &r.merchant,
            stan: &r.stan,
            rrn: &r.rrn,
            pan_masked: &r.pan_masked,
            pan_hash: format!("{:032x}", r.pan_hash),
            amount_minor: r.amount_minor,
            currency: r.currency,
            acquirer: text(&r.acquirer),
            link_stan: (r.link_stan != 0).then_some(r.link_stan),
            code: text(&r.code),
            approval_code: text(&r.approval_code),
            decision: text(&r.decision),
            score: r.score,
            model: text(&r.model),
            private_data: text(&r.private_data),
            duplicate: r.duplicate,
            switch_us: number(r.switch_us),
            acquirer_us: number(r.acquirer_us),
            attempt: (r.attempt != 0).then_some(r.attempt),
        }
    }
}

/// Writes every record of the journal in `dir` to `out`. The journal is checked as it is
/// read and not repaired: a torn tail is left out (and reported), corruption is an error.
pub fn export(dir: &Path, format: ExportFormat, out: impl Write) -> anyhow::Result<ScanReport> {
    // One sink per export: the size difference costs nothing.
    #[allow(clippy::large_enum_variant)]
    enum Sink<W: Write> {
        Csv(csv::Writer<W>),
        Jsonl(io::BufWriter<W>),
    }
    let mut sink = match format {
        ExportFormat::Csv => Sink::Csv(csv::Writer::from_writer(out)),
        ExportFormat::Jsonl => Sink::Jsonl(io::BufWriter::new(out)),
    };
    let mut failure: Option<anyhow::Error> = None;
    let report = scan(dir, false, |seq, record| {
        if failure.is_some() {
            return;
        }
        let exported = Exported::of(seq, &record);
        let written = match &mut sink {
            Sink::Csv(csv) => csv.serialize(&exported).map_err(anyhow::Error::from),
            Sink::Jsonl(out) => serde_json::to_writer(&mut *out, &exported)
                .map_err(anyhow::Error::from)
                .and_then(|()| out.write_all(b"\n").map_err(anyhow::Error::from)),
        };
        if let Err(e) = written {
            failure = Some(e);
        }
    })?;
    if let Some(e) = failure {
        return Err(e);
    }
    match &mut sink {
        Sink::Csv(csv) => csv.flush()?,
        Sink::Jsonl(out) => out.flush()?,
    }
    Ok(report)
}
