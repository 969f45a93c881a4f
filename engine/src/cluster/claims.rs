//! Claims: one node decides each request, cluster-wide (`PAYSWITCH_CLAIMS`).
//!
//! Before a node decides a new authorization (scores, declines or forwards it), it
//! *claims* the request's duplicate key — terminal, STAN, RRN and transmission time, what
//! a gateway keeps when it retransmits — with a key-value `create`, which succeeds on one
//! node only, however the copies race. The node that wins decides. A node that loses
//! answers the copy it holds from the original's answer — read from the winner's journal
//! as every node follows the others' (`super::follow::Outcomes`), or written into the
//! claim by a survivor that took the winner over — waiting for it while the original is
//! still out, marked `dup=1`, and never authorizes it again: a gateway that retransmits
//! to another node after its node vanished gets the original's answer. One replicated
//! write per request, the claim; the answer costs nothing more.
//!
//! The bucket keeps claims for the duplicate window (`journal.duplicate_window_s`, its
//! `max_age`), as each node's own window does.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::ClusterConfig;
use crate::shard::duplicates::{DupKey, Outcome};

/// The claims bucket.
pub const CLAIMS_BUCKET: &str = "PAYSWITCH_CLAIMS";

/// Largest claim value: a node name, a code, an approval code and field 48 (at most
/// 999 bytes as sent).
const MAX_CLAIM_BYTES: i32 = 2 * 1024;

/// A claim's value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimValue {
    /// The node deciding the request.
    pub node: String,
    /// Its lease generation when it claimed.
    pub token: u64,
    /// The answer, once given: response code (39).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// Approval code (38).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<String>,
    /// Field 48 as sent.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub data: String,
}

impl ClaimValue {
    /// The answer recorded, if any (and readable).
    pub fn outcome(&self) -> Option<Outcome> {
        let code: [u8; 2] = self.code.as_deref()?.as_bytes().try_into().ok()?;
        Some(Outcome {
            code,
            approval: self
                .approval
                .as_deref()
                .and_then(|a| a.as_bytes().try_into().ok()),
            private_data: self.data.clone(),
        })
    }
}

/// What claiming a request found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claimed {
    /// This node decides it; the claim's revision, to record the answer with.
    Won(u64),
    /// Another node (or an earlier run of this one) claimed it first: `node`.
    Theirs {
        /// Who claimed it.
        node: String,
        /// Its answer, if there is one yet.
        outcome: Option<Outcome>,
    },
}

/// The claims bucket of the cluster.
#[derive(Clone)]
pub struct Claims {
    bucket: kv::Store,
    node: String,
    /// The lease bucket: whether a claim's node is gone.
    leases: kv::Store,
    /// How long after a takeover its survivor has settled the claims of what the node
    /// journaled.
    settled_after: Duration,
}

impl std::fmt::Debug for Claims {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claims").field("node", &self.node).finish()
    }
}

/// The key of a request's claim: its duplicate key's bytes in hex (terminal IDs may hold
/// characters a key may not), so distinct requests never share one.
pub fn claim_key(key: &DupKey) -> String {
    format!("c.{}", hex::encode(key.bytes()))
}

impl Claims {
    /// Opens (or creates) the bucket, keeping claims for `window`; `leases` is the lease
    /// bucket, and a survivor has settled a node's claims `settled_after` its takeover.
    pub async fn open(
        context: &jetstream::Context,
        config: &ClusterConfig,
        window: Duration,
        leases: kv::Store,
        settled_after: Duration,
    ) -> anyhow::Result<Claims> {
        let bucket = match context.get_key_value(CLAIMS_BUCKET).await {
            Ok(bucket) => bucket,
            Err(_) => {
                let created = context
                    .create_key_value(kv::Config {
                        bucket: CLAIMS_BUCKET.into(),
                        history: 1,
                        max_age: window,
                        max_value_size: MAX_CLAIM_BYTES,
                        num_replicas: config.replicas,
                        storage: jetstream::stream::StorageType::File,
                        ..Default::default()
                    })
                    .await;
                match created {
                    Ok(bucket) => bucket,
                    Err(_) => context.get_key_value(CLAIMS_BUCKET).await?,
                }
            }
        };
        Ok(Claims {
            bucket,
            node: config.node.clone(),
            leases,
            settled_after,
        })
    }

    /// Claims `key` for this node, under lease generation `token`.
    pub async fn claim(&self, key: &DupKey, token: u64) -> anyhow::Result<Claimed> {
        let name = claim_key(key);
        let value = ClaimValue {
            node: self.node.clone(),
            token,
            code: None,
            approval: None,
            data: String::new(),
        };
        let bytes = serde_json::to_vec(&value)?;
        match self.bucket.create(&name, bytes.into()).await {
            Ok(revision) => return Ok(Claimed::Won(revision)),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
            Err(e) => return Err(e.into()),
        }
        let entry = self
            .bucket
            .entry(&name)
            .await?
            .filter(|e| e.operation == kv::Operation::Put);
        let theirs = entry.as_ref().and_then(|e| {
            serde_json::from_slice::<ClaimValue>(&e.value)
                .ok()
                .map(|v| (e.revision, v))
        });
        Ok(match theirs {
            // The client's `create` is an update from revision 0 that, when it fails (a
            // lost answer: a server restarting), reads the entry and calls it taken: it
            // may be this very claim, stored after all. This node, this lease, no
            // answer: ours (a copy at this node never gets here, its shard's window
            // answers it).
            Some((revision, value))
                if value.node == self.node && value.token == token && value.code.is_none() =>
            {
                Claimed::Won(revision)
            }
            Some((_, value)) => Claimed::Theirs {
                outcome: value.outcome(),
                node: value.node,
            },
            // Deleted or unreadable between the two calls: someone else's all the same.
            None => Claimed::Theirs {
                node: String::new(),
                outcome: None,
            },
        })
    }

    /// Writes `outcome` into the claim of `key` unless it has one: what a survivor does
    /// for the requests of a node it took over (which may have died between answering
    /// and writing the answer). Whether it wrote it.
    pub async fn settle_if_open(&self, key: &DupKey, outcome: &Outcome) -> anyhow::Result<bool> {
        let name = claim_key(key);
        let Some(entry) = self.bucket.entry(&name).await? else {
            return Ok(false);
        };
        let Some(value) = (entry.operation == kv::Operation::Put)
            .then(|| serde_json::from_slice::<ClaimValue>(&entry.value).ok())
            .flatten()
        else {
            return Ok(false);
        };
        if value.code.is_some() {
            return Ok(false);
        }
        let settled = ClaimValue {
            code: Some(String::from_utf8_lossy(&outcome.code).into_owned()),
            approval: outcome
                .approval
                .map(|a| String::from_utf8_lossy(&a).into_owned()),
            data: outcome.private_data.clone(),
            ..value
        };
        match self
            .bucket
            .update(&name, serde_json::to_vec(&settled)?.into(), entry.revision)
            .await
        {
            Ok(_) => Ok(true),
            // Settled meanwhile (by its node, late): that answer stands.
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// The answer of a request another node claimed, once there is one. Gives up after
    /// `wait`, or once the claiming node's lease was taken over long enough ago for its
    /// survivor to have settled it (`settled_after`) with the claim still open: the survivor settles what the node journaled (an
    /// approval in doubt is answered 91 and reversed), so a claim still open then was
    /// never sent anywhere.
    pub async fn outcome(&self, key: &DupKey, wait: Duration) -> Awaited {
        let (leases, settled_after) = (&self.leases, self.settled_after);
        let name = claim_key(key);
        let watched = async {
            let mut owner: Option<(String, u64)> = None;
            let mut check = tokio::time::interval(Duration::from_millis(500));
            'watch: loop {
                // Last value first, then every change: an answer written between a read and
                // the start of a watch is not missed. A watch that fails (a server going
                // away) is made again; the wait bounds it all.
                let Ok(mut entries) = self.bucket.watch_with_history(&name).await else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                loop {
                    tokio::select! {
                        entry = entries.next() => {
                            let Some(Ok(entry)) = entry else {
                                tokio::time::sleep(Duration::from_millis(200)).await;
                                continue 'watch;
                            };
                            let Ok(value) = serde_json::from_slice::<ClaimValue>(&entry.value) else {
                                continue;
                            };
                            if let Some(outcome) = value.outcome() {
                                return Awaited::Answered(outcome);
                            }
                            owner = Some((value.node, value.token));
                        }
                        _ = check.tick() => {
                            if let Some((node, token)) = &owner {
                                if owner_lost(leases, node, *token, settled_after).await {
                                    return Awaited::OwnerLost;
                                }
                            }
                        }
                    }
                }
            }
        };
        tokio::time::timeout(wait, watched)
            .await
            .unwrap_or(Awaited::TimedOut)
    }
}

/// What waiting for another node's answer came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Awaited {
    /// Its answer.
    Answered(Outcome),
    /// Its node's lease was taken over and the survivor did not settle the claim: the
    /// node never journaled it, so never sent it.
    OwnerLost,
    /// Neither within the wait.
    TimedOut,
}

/// Whether `node`'s lease generation `token` was taken over at least `settled_after`
/// ago (by the survivor's clock in the lease entry).
async fn owner_lost(leases: &kv::Store, node: &str, token: u64, settled_after: Duration) -> bool {
    let Ok(Some(entry)) = leases.entry(super::lease::lease_key(node)).await else {
        return false;
    };
    match super::lease::LeaseValue::parse(&entry.value) {
        Some(super::lease::LeaseValue::TakenOver {
            generation, at_ms, ..
        }) => {
            generation >= token
                && crate::clock::now().unix_ms() - at_ms >= settled_after.as_millis() as i64
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_value_carries_the_answer_once_given() {
        let claimed = ClaimValue {
            node: "a".into(),
            token: 4,
            code: None,
            approval: None,
            data: String::new(),
        };
        assert_eq!(claimed.outcome(), None);
        let text = serde_json::to_string(&claimed).unwrap();
        assert_eq!(text, r#"{"node":"a","token":4}"#);
        let answered = ClaimValue {
            code: Some("00".into()),
            approval: Some("A1B2C3".into()),
            data: "decision=approve".into(),
            ..claimed
        };
        let outcome = answered.outcome().unwrap();
        assert_eq!(&outcome.code, b"00");
        assert_eq!(outcome.approval.as_ref(), Some(b"A1B2C3"));
        assert_eq!(outcome.private_data, "decision=approve");
    }
}
