//! The node's lease as the rest of the switch sees it (`[cluster]`): whether it may act
//! now, and the fencing token its actions carry.
//!
//! A node in a cluster may send to an acquirer, publish to the journal stream or deliver
//! a reversal only while it holds its lease (`cluster::lease`). The lease is renewed on
//! the NATS servers; here it is a deadline on this process's monotonic clock, set from
//! the moment each renewal was *sent*, so a node that was paused (a GC pause, SIGSTOP, a
//! VM migrated) finds its deadline passed when it runs again — before it sends anything
//! — without asking the servers. A survivor takes over a lapsed lease's work only after
//! the lease time (counted from when it *saw* the last renewal, so later than this
//! deadline) plus the acquirer timeout: what the paused node sent before its deadline has
//! been answered or timed out by then.
//!
//! The token is the lease's revision in the lease bucket: every group of journal records
//! published carries it, so the books show which holder wrote what. Work (a reversal
//! owed) created under one token stays this node's while no other node took that lease's
//! work over ([`Fence::owns`]).
//!
//! Without `[cluster]` there is no fence: a single node always holds its own books.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

use tokio::sync::Notify;

/// The node's lease: a monotonic deadline and its fencing token.
#[derive(Debug)]
pub struct Fence {
    epoch: Instant,
    /// Nanoseconds after `epoch` until which the lease is held; 0: not held.
    until_ns: AtomicU64,
    /// The revision of the lease held, or last held; 0 before the first.
    token: AtomicU64,
    /// Work created under a token below this was taken over by another node.
    owned_from: AtomicU64,
    /// Woken whenever the lease is (re)gained.
    gained: Notify,
}

impl Default for Fence {
    fn default() -> Self {
        Fence::new()
    }
}

impl Fence {
    /// A fence holding no lease yet.
    pub fn new() -> Fence {
        Fence {
            epoch: Instant::now(),
            until_ns: AtomicU64::new(0),
            token: AtomicU64::new(0),
            owned_from: AtomicU64::new(0),
            gained: Notify::new(),
        }
    }

    fn ns(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_nanos() as u64
    }

    /// Whether the lease is held now, on the monotonic clock.
    pub fn held(&self) -> bool {
        self.held_at(Instant::now())
    }

    /// Whether the lease is held at `at`.
    pub fn held_at(&self, at: Instant) -> bool {
        let until = self.until_ns.load(Ordering::Acquire);
        until != 0 && self.ns(at) < until
    }

    /// How long the lease is still held for (zero when not held).
    pub fn remaining(&self) -> Duration {
        let until = self.until_ns.load(Ordering::Acquire);
        Duration::from_nanos(until.saturating_sub(self.ns(Instant::now())))
    }

    /// The fencing token: the revision of the lease held (or last held).
    pub fn token(&self) -> u64 {
        self.token.load(Ordering::Acquire)
    }

    /// The lease, revision `token`, is held until `until`; a renewal sent at `sent` for a
    /// lease of `ttl` holds it until `sent + ttl`.
    pub fn hold(&self, token: u64, until: Instant) {
        let was_held = self.held();
        self.token.store(token, Ordering::Release);
        self.until_ns
            .store(self.ns(until).max(1), Ordering::Release);
        if !was_held {
            self.gained.notify_waiters();
        }
    }

    /// The lease is lost (a renewal refused: another process holds the name, or the
    /// lease was found lapsed).
    pub fn lose(&self) {
        self.until_ns.store(0, Ordering::Release);
    }

    /// Work created under tokens below `token` was taken over by another node: it is no
    /// longer this node's to do.
    pub fn handed_over_before(&self, token: u64) {
        self.owned_from.fetch_max(token, Ordering::AcqRel);
    }

    /// Whether work created under `token` is still this node's.
    pub fn owns(&self, token: u64) -> bool {
        token >= self.owned_from.load(Ordering::Acquire)
    }

    /// Waits until the lease is held (at once if it is).
    pub async fn until_held(&self) {
        loop {
            let gained = self.gained.notified();
            tokio::pin!(gained);
            gained.as_mut().enable();
            if self.held() {
                return;
            }
            // A renewal may extend a lease that lapsed without `hold` seeing it lost
            // (it checks before storing): poll as well, at a tenth of a second.
            tokio::select! {
                _ = gained => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_until_the_deadline_on_the_monotonic_clock() {
        let fence = Fence::new();
        assert!(!fence.held(), "no lease yet");
        let now = Instant::now();
        fence.hold(7, now + Duration::from_secs(3));
        assert!(fence.held_at(now + Duration::from_millis(2_999)));
        assert!(!fence.held_at(now + Duration::from_secs(3)));
        assert_eq!(fence.token(), 7);
        fence.lose();
        assert!(!fence.held());
        assert_eq!(fence.token(), 7, "the last token is kept for the books");
    }

    #[test]
    fn work_under_a_token_taken_over_is_no_longer_owned() {
        let fence = Fence::new();
        assert!(fence.owns(3));
        fence.handed_over_before(5);
        assert!(!fence.owns(3) && !fence.owns(4));
        assert!(fence.owns(5) && fence.owns(9));
        fence.handed_over_before(2);
        assert!(!fence.owns(4), "never moves back");
    }

    #[tokio::test]
    async fn waiting_ends_when_the_lease_is_gained() {
        let fence = std::sync::Arc::new(Fence::new());
        let waiter = tokio::spawn({
            let fence = std::sync::Arc::clone(&fence);
            async move { fence.until_held().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        fence.hold(1, Instant::now() + Duration::from_secs(1));
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();
    }
}
