//! The PAN at rest: sealed in the journal under a key kept outside it, so a reversal or
//! an advice rebuilt after a restart can carry field 2, which many acquirers require.
//!
//! - **Cipher**: AES-256-GCM-SIV (RFC 8452), a random 96-bit nonce per PAN, the record's
//!   keyed PAN hash as associated data (a sealed PAN moved onto another card's record
//!   does not open). GCM-SIV rather than GCM because nonces are random and a switch seals
//!   billions of PANs under one key: a repeated nonce in GCM leaks the authentication key,
//!   in GCM-SIV only that two equal PANs were sealed under it.
//! - **Keys**: a key file outside the journal directory (`journal.pan_key_file`), readable
//!   by the switch's user only (refused otherwise), one key per line: `ID HEX` with a
//!   numeric id and 64 hex digits (`#` starts a comment). The last line's key seals;
//!   every key in the file opens what it sealed (each sealed PAN names its key's id).
//! - **Rotation**: append a new key (`payswitch journal new-pan-key FILE`) and restart;
//!   new records are sealed under it, older ones still open under theirs. Remove an old
//!   key once `journal.retention_days` has deleted every segment written before the
//!   rotation (or the journal was archived): records sealed under a removed key keep
//!   their masked PAN and hash, and their reversals go without field 2.
//! - Only the PAN: never track data, CVV, PIN blocks or ICC data. Only the records a
//!   reversal or advice is built from carry it (`forwarded`, `reversal_queued`,
//!   `advice_queued`); the rest keep the masked PAN and the hash alone.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::Path;

use aes_gcm_siv::aead::{Aead, KeyInit, Payload};
use aes_gcm_siv::{Aes256GcmSiv, Nonce};
use payswitch_protocol::Pan;
use serde::{Deserialize, Serialize};

/// A PAN as the journal keeps it: the id of the key that sealed it, the nonce, and the
/// ciphertext with its tag.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedPan {
    /// The sealing key's id in the key file.
    pub key: u32,
    /// The nonce.
    pub nonce: [u8; 12],
    /// Ciphertext and 16-byte tag.
    pub data: Vec<u8>,
}

impl std::fmt::Debug for SealedPan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SealedPan(key {}, {} bytes)", self.key, self.data.len())
    }
}

/// The keys that seal and open PANs.
pub struct PanVault {
    keys: BTreeMap<u32, Aes256GcmSiv>,
    /// The key that seals: the file's last.
    active: u32,
}

impl std::fmt::Debug for PanVault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PanVault(keys {:?}, sealing with {})",
            self.keys.keys().collect::<Vec<_>>(),
            self.active
        )
    }
}

/// Longest key file read: a key line is under 80 bytes, so this is thousands of keys.
const MAX_KEY_FILE: u64 = 256 * 1024;

impl PanVault {
    /// The keys `(id, key)`, the last one sealing. `None` when there is none or an id is
    /// given twice.
    pub fn from_keys(keys: &[(u32, [u8; 32])]) -> Option<PanVault> {
        let (active, _) = *keys.last()?;
        let mut map = BTreeMap::new();
        for (id, key) in keys {
            let cipher = Aes256GcmSiv::new_from_slice(key).ok()?;
            if map.insert(*id, cipher).is_some() {
                return None;
            }
        }
        Some(PanVault { keys: map, active })
    }

    /// Reads the key file at `path`: refused when others than its owner may read it, or
    /// when a line is not `ID HEX`.
    pub fn load(path: &Path) -> io::Result<PanVault> {
        let invalid = |why: String| io::Error::new(io::ErrorKind::InvalidData, why);
        let meta = std::fs::metadata(path)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode();
            if mode & 0o077 != 0 {
                return Err(invalid(format!(
                    "{}: readable by others than its owner (mode {:o}); chmod 600 it",
                    path.display(),
                    mode & 0o777
                )));
            }
        }
        if meta.len() > MAX_KEY_FILE {
            return Err(invalid(format!(
                "{}: too big for a key file",
                path.display()
            )));
        }
        let text = std::fs::read_to_string(path)?;
        let keys =
            parse_keys(&text).map_err(|why| invalid(format!("{}: {why}", path.display())))?;
        PanVault::from_keys(&keys)
            .ok_or_else(|| invalid(format!("{}: no key, or an id twice", path.display())))
    }

    /// The id of the key that seals.
    pub fn active_key(&self) -> u32 {
        self.active
    }

    /// Seals the PAN digits `pan` of the record whose keyed PAN hash is `pan_hash`.
    pub fn seal(&self, pan: &[u8], pan_hash: u128) -> SealedPan {
        let nonce: [u8; 12] = rand::random();
        let cipher = &self.keys[&self.active];
        let aad = pan_hash.to_le_bytes();
        let data = cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: pan,
                    aad: &aad,
                },
            )
            // Encryption fails only for inputs of gigabytes.
            .expect("a PAN seals");
        SealedPan {
            key: self.active,
            nonce,
            data,
        }
    }

    /// The PAN `sealed` holds, if its key is here and it was sealed for `pan_hash`.
    pub fn open(&self, sealed: &SealedPan, pan_hash: u128) -> Option<Pan> {
        let cipher = self.keys.get(&sealed.key)?;
        let aad = pan_hash.to_le_bytes();
        let digits = cipher
            .decrypt(
                Nonce::from_slice(&sealed.nonce),
                Payload {
                    msg: &sealed.data,
                    aad: &aad,
                },
            )
            .ok()?;
        Pan::parse(&digits).ok()
    }
}

fn parse_keys(text: &str) -> Result<Vec<(u32, [u8; 32])>, String> {
    let mut keys = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let bad = || format!("line {}: not `ID HEX` (a number and 64 hex digits)", n + 1);
        let (id, hex_key) = line.split_once(char::is_whitespace).ok_or_else(bad)?;
        let id: u32 = id.parse().map_err(|_| bad())?;
        let key = hex::decode(hex_key.trim())
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or_else(bad)?;
        keys.push((id, key));
    }
    Ok(keys)
}

/// Appends a new random key to the key file at `path` (created readable by its owner
/// only), with the next id: it seals from the next start. Returns the id.
pub fn add_key(path: &Path) -> io::Result<u32> {
    let existing = match std::fs::read_to_string(path) {
        Ok(text) => {
            parse_keys(&text).map_err(|why| io::Error::new(io::ErrorKind::InvalidData, why))?
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    let id = existing
        .iter()
        .map(|(id, _)| *id)
        .max()
        .map_or(1, |m| m + 1);
    let key: [u8; 32] = rand::random();
    let mut options = std::fs::OpenOptions::new();
    options.append(true).create(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    writeln!(file, "{id} {}", hex::encode(key))?;
    file.sync_all()?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAN: &[u8] = b"4111111111111111";

    #[test]
    fn a_sealed_pan_opens_only_with_its_key_and_for_its_record() {
        let vault = PanVault::from_keys(&[(1, [7; 32])]).unwrap();
        let sealed = vault.seal(PAN, 42);
        assert_eq!(sealed.key, 1);
        assert!(!sealed.data.windows(PAN.len()).any(|w| w == PAN));
        assert_eq!(vault.open(&sealed, 42).unwrap().expose(), PAN);
        assert!(vault.open(&sealed, 43).is_none(), "another card's record");
        let mut tampered = sealed.clone();
        tampered.data[0] ^= 1;
        assert!(vault.open(&tampered, 42).is_none());
        let other = PanVault::from_keys(&[(1, [8; 32])]).unwrap();
        assert!(
            other.open(&sealed, 42).is_none(),
            "another key under the same id"
        );
        // Two seals of one PAN differ (random nonces).
        assert_ne!(vault.seal(PAN, 42), sealed);
    }

    #[test]
    fn after_a_rotation_new_pans_use_the_new_key_and_old_ones_still_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pan-data.key");
        assert_eq!(add_key(&path).unwrap(), 1);
        let before = PanVault::load(&path).unwrap();
        let old = before.seal(PAN, 9);
        assert_eq!(add_key(&path).unwrap(), 2);
        let after = PanVault::load(&path).unwrap();
        assert_eq!(after.active_key(), 2);
        assert_eq!(after.seal(PAN, 9).key, 2);
        assert_eq!(after.open(&old, 9).unwrap().expose(), PAN);
        // Key 1 removed: its PANs no longer open, nothing else breaks.
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.lines().nth(1).unwrap()).unwrap();
        let rotated = PanVault::load(&path).unwrap();
        assert!(rotated.open(&old, 9).is_none());
    }

    #[cfg(unix)]
    #[test]
    fn a_key_file_others_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pan-data.key");
        add_key(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = PanVault::load(&path).unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }

    #[test]
    fn malformed_key_files_are_refused_by_line() {
        for bad in ["1", "x 00", &format!("1 {}", "0".repeat(62)), "1 zz"] {
            assert!(parse_keys(bad).is_err(), "{bad}");
        }
        let two = format!("1 {k}\n1 {k}\n", k = "ab".repeat(32));
        let keys = parse_keys(&two).unwrap();
        assert!(PanVault::from_keys(&keys).is_none(), "an id twice");
        assert!(PanVault::from_keys(&[]).is_none());
    }
}
