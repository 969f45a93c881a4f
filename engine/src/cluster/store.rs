//! What leases need of a key-value store: read, create, compare-and-set on the revision,
//! and a watch of the latest value of every key under a prefix. NATS JetStream's
//! key-value bucket in production; an in-memory store with faults in the simulator
//! (`sim::cluster`), so the same lease and takeover code runs under both.

use std::future::Future;
use std::pin::Pin;

use async_nats::jetstream::kv;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};

/// Why a write was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CasError {
    /// `create`: the key has a value.
    Exists,
    /// `update`: the key's revision is not the one given.
    WrongRevision,
    /// The store did not answer, or failed.
    Other(String),
}

impl std::fmt::Display for CasError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CasError::Exists => write!(f, "the key exists"),
            CasError::WrongRevision => write!(f, "the key was written since"),
            CasError::Other(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for CasError {}

/// A key's latest value and its revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    /// The key.
    pub key: String,
    /// Its revision (the store's sequence number of the write).
    pub revision: u64,
    /// Its value; `None` for a deletion.
    pub value: Option<Bytes>,
}

/// The latest values under a prefix, then each change, as they come.
pub type Watch = Pin<Box<dyn Stream<Item = Result<Versioned, CasError>> + Send>>;

/// A key-value store with revisions.
pub trait LeaseStore: Clone + Send + Sync + 'static {
    /// The key's latest value.
    fn entry(&self, key: &str) -> impl Future<Output = Result<Option<Versioned>, CasError>> + Send;
    /// Writes `value` if the key has none; the new revision.
    fn create(&self, key: &str, value: Bytes)
        -> impl Future<Output = Result<u64, CasError>> + Send;
    /// Writes `value` if the key's revision is `revision`; the new revision.
    fn update(
        &self,
        key: &str,
        value: Bytes,
        revision: u64,
    ) -> impl Future<Output = Result<u64, CasError>> + Send;
    /// The latest value of every key under `prefix` (`lease.>`), then every change.
    fn watch(&self, prefix: &str) -> impl Future<Output = Result<Watch, CasError>> + Send;
}

fn other(e: impl std::fmt::Display) -> CasError {
    CasError::Other(e.to_string())
}

fn versioned(entry: kv::Entry) -> Versioned {
    Versioned {
        value: (entry.operation == kv::Operation::Put).then_some(entry.value),
        key: entry.key,
        revision: entry.revision,
    }
}

impl LeaseStore for kv::Store {
    async fn entry(&self, key: &str) -> Result<Option<Versioned>, CasError> {
        kv::Store::entry(self, key)
            .await
            .map(|e| e.map(versioned))
            .map_err(other)
    }

    async fn create(&self, key: &str, value: Bytes) -> Result<u64, CasError> {
        kv::Store::create(self, key, value).await.map_err(|e| {
            if e.kind() == kv::CreateErrorKind::AlreadyExists {
                CasError::Exists
            } else {
                other(e)
            }
        })
    }

    async fn update(&self, key: &str, value: Bytes, revision: u64) -> Result<u64, CasError> {
        kv::Store::update(self, key, value, revision)
            .await
            .map_err(|e| {
                if e.kind() == kv::UpdateErrorKind::WrongLastRevision {
                    CasError::WrongRevision
                } else {
                    other(e)
                }
            })
    }

    async fn watch(&self, prefix: &str) -> Result<Watch, CasError> {
        let entries = self.watch_with_history(prefix).await.map_err(other)?;
        Ok(Box::pin(entries.map(|e| e.map(versioned).map_err(other))))
    }
}
