//! Requests the switch has seen, per shard: what makes a retransmission a duplicate, and
//! where a reversal finds its original.
//!
//! A request is identified by terminal (41), STAN (11), RRN (37) and transmission time (7)
//! — the key gateways keep when they retransmit — and whether it is an authorization or a
//! reversal (a reversal may reuse its original's STAN and time). Every request the shard
//! accepts gets an [`Original`]: the task completing it records the outcome there, and a
//! retransmission that arrives meanwhile waits for that outcome instead of reaching an
//! acquirer a second time. Entries live for the configured window and the window holds a
//! bounded number of them; past the bound the oldest go first.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use payswitch_protocol::{fields, Message, Stan};
use tokio::sync::Notify;

use crate::journal::{Record, RecordKind};
use crate::routing::AcquirerIndex;

pub use crate::ingress::key::DupKey;

/// The answer a request got, kept to answer its retransmissions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Response code (39).
    pub code: [u8; 2],
    /// Approval code (38), when approved.
    pub approval: Option<[u8; 6]>,
    /// Field 48 as sent.
    pub private_data: String,
}

/// Where an authorization was sent: what a reversal of it needs.
///
/// Kept for every forwarded request in the duplicate window, so it holds its text in
/// fixed arrays (under 200 bytes; the sealed PAN, when kept, boxed) rather than a journal
/// `Record` (a dozen `String`s, ~700 bytes with their heap); the acquirer's name comes from
/// its index when a reversal needs it.
#[derive(Debug, Clone)]
pub struct Forwarded {
    /// The acquirer.
    pub acquirer: AcquirerIndex,
    /// The switch's STAN on that acquirer's link.
    pub link_stan: Stan,
    /// Sequence number of the request's journal record.
    pub request_seq: u64,
    /// The fencing token it was sent under, in a cluster (`crate::fence`); 0 otherwise.
    pub token: u64,
    mti: Text<4>,
    processing_code: Text<6>,
    transmission_time: Text<10>,
    stan: Text<6>,
    rrn: Text<12>,
    terminal: Text<8>,
    merchant: Text<15>,
    pan_masked: Text<19>,
    pan_hash: u128,
    amount_minor: u64,
    currency: u16,
    time_ms: i64,
    /// The PAN, sealed, when the journal keeps it (for field 2 of the reversal).
    pan_sealed: Option<Box<crate::journal::SealedPan>>,
}

/// Up to `N` bytes of ASCII text in place.
#[derive(Clone, Copy)]
struct Text<const N: usize> {
    len: u8,
    bytes: [u8; N],
}

impl<const N: usize> Text<N> {
    /// `text`, cut at `N` bytes (the fields kept here have fixed or bounded lengths once
    /// validated, so nothing is cut in practice).
    fn new(text: &str) -> Text<N> {
        let mut bytes = [0u8; N];
        let mut len = text.len().min(N);
        while !text.is_char_boundary(len) {
            len -= 1;
        }
        bytes[..len].copy_from_slice(&text.as_bytes()[..len]);
        Text {
            len: len as u8,
            bytes,
        }
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or("")
    }
}

impl<const N: usize> std::fmt::Debug for Text<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.as_str().fmt(f)
    }
}

impl Forwarded {
    /// From the `forwarded` journal record of a request.
    pub fn new(
        acquirer: AcquirerIndex,
        link_stan: Stan,
        request_seq: u64,
        r: &Record,
    ) -> Forwarded {
        Forwarded {
            acquirer,
            link_stan,
            request_seq,
            token: 0,
            mti: Text::new(&r.mti),
            processing_code: Text::new(&r.processing_code),
            transmission_time: Text::new(&r.transmission_time),
            stan: Text::new(&r.stan),
            rrn: Text::new(&r.rrn),
            terminal: Text::new(&r.terminal),
            merchant: Text::new(&r.merchant),
            pan_masked: Text::new(&r.pan_masked),
            pan_hash: r.pan_hash,
            amount_minor: r.amount_minor,
            currency: r.currency,
            time_ms: r.time_ms,
            pan_sealed: r.pan_sealed.clone().map(Box::new),
        }
    }

    /// A stand-in approval, from its `advice_queued` record: "forwarded" to the acquirer
    /// its advice goes to, as an advice (MTI x20), with the advice's link STAN once it has
    /// one (0 before). A reversal of it goes to that acquirer after the advice and names
    /// the advice in field 90.
    pub fn stand_in(acquirer: AcquirerIndex, request_seq: u64, r: &Record) -> Forwarded {
        let mut forwarded =
            Forwarded::new(acquirer, Stan::new(0).expect("0 is a STAN"), request_seq, r);
        let mut advice = *forwarded.mti.bytes.first_chunk::<4>().expect("4 bytes");
        advice[2] = b'2';
        advice[3] = b'0';
        forwarded.mti = Text::new(std::str::from_utf8(&advice).unwrap_or("0120"));
        forwarded
    }

    /// The `forwarded` journal record again: the original's identity, the acquirer (whose
    /// name the caller has from `acquirer`) and the link STAN, naming the request by
    /// `request_seq`.
    pub fn record(&self, acquirer_name: &str) -> Record {
        let text = |t: &str| t.to_string();
        Record {
            kind: RecordKind::Forwarded,
            time_ms: self.time_ms,
            request_seq: self.request_seq,
            mti: text(self.mti.as_str()),
            processing_code: text(self.processing_code.as_str()),
            transmission_time: text(self.transmission_time.as_str()),
            stan: text(self.stan.as_str()),
            rrn: text(self.rrn.as_str()),
            terminal: text(self.terminal.as_str()),
            merchant: text(self.merchant.as_str()),
            pan_masked: text(self.pan_masked.as_str()),
            pan_hash: self.pan_hash,
            amount_minor: self.amount_minor,
            currency: self.currency,
            acquirer: text(acquirer_name),
            link_stan: self.link_stan.get(),
            pan_sealed: self.pan_sealed.as_deref().cloned(),
            ..Record::default()
        }
    }
}

/// A request the switch has accepted, shared between its shard's window and the task
/// completing it.
#[derive(Debug, Default)]
pub struct Original {
    outcome: OnceLock<Outcome>,
    answered: Notify,
    forwarded: Mutex<Option<Forwarded>>,
    reversal_claimed: AtomicBool,
    /// Its answer's record is durable (a response, a stand-in's advice): the journal, and
    /// a survivor reading it, knows it was not left in doubt.
    settled: AtomicBool,
}

impl Original {
    /// An original still in progress.
    pub fn new() -> Original {
        Original::default()
    }

    /// Records the answer and wakes retransmissions waiting for it. Only the first call
    /// counts.
    pub fn set_outcome(&self, outcome: Outcome) {
        if self.outcome.set(outcome).is_ok() {
            self.answered.notify_waiters();
        }
    }

    /// The answer, once there is one; `None` if none came within `wait`.
    pub async fn outcome(&self, wait: Duration) -> Option<&Outcome> {
        let answered = async {
            loop {
                let notified = self.answered.notified();
                tokio::pin!(notified);
                // Registers the waiter before the check, so an answer set in between
                // still wakes it.
                notified.as_mut().enable();
                if let Some(outcome) = self.outcome.get() {
                    return outcome;
                }
                notified.await;
            }
        };
        tokio::time::timeout(wait, answered).await.ok()
    }

    /// The answer if there is one now.
    pub fn outcome_now(&self) -> Option<&Outcome> {
        self.outcome.get()
    }

    /// Records where the request was sent.
    pub fn set_forwarded(&self, forwarded: Forwarded) {
        *self.forwarded.lock().unwrap_or_else(|e| e.into_inner()) = Some(forwarded);
    }

    /// The STAN the advice of this stand-in approval carries on its link.
    pub fn set_advice_stan(&self, stan: Stan) {
        let mut forwarded = self.forwarded.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(forwarded) = forwarded.as_mut() {
            forwarded.link_stan = stan;
        }
    }

    /// Where the request was sent, if it was.
    pub fn forwarded(&self) -> Option<Forwarded> {
        self.forwarded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether a reversal of this authorization has been taken on.
    pub fn reversal_claimed(&self) -> bool {
        self.reversal_claimed.load(Ordering::Acquire)
    }

    /// Takes the right to reverse this authorization: `true` only for the first caller,
    /// so a timeout and a gateway's 0400 never reverse it twice.
    pub fn claim_reversal(&self) -> bool {
        !self.reversal_claimed.swap(true, Ordering::AcqRel)
    }

    /// Its answer's record is durable now.
    pub fn mark_settled(&self) {
        self.settled.store(true, Ordering::Release);
    }

    /// Whether its answer's record is durable.
    pub fn settled(&self) -> bool {
        self.settled.load(Ordering::Acquire)
    }
}

/// One shard's window of recent requests.
#[derive(Debug)]
pub struct DuplicateWindow {
    entries: HashMap<DupKey, Arc<Original>>,
    /// Keys in arrival order with their arrival time, for expiry.
    order: VecDeque<(i64, DupKey)>,
    /// The latest authorization per terminal and RRN, for reversals without field 90.
    by_rrn: HashMap<([u8; 8], [u8; 12]), DupKey>,
    window_ms: i64,
    capacity: usize,
    /// Entries dropped before their window ended because the window was full.
    pub evicted_early: u64,
}

impl DuplicateWindow {
    /// A window of `window` holding at most `capacity` requests.
    pub fn new(window: Duration, capacity: usize) -> DuplicateWindow {
        // With no room, every request would be forgotten as it is remembered: a
        // retransmission forwarded again. `Config::check` keeps `journal.max_duplicates`
        // at one per shard or more.
        assert!(capacity >= 1, "a duplicate window must hold a request");
        DuplicateWindow {
            entries: HashMap::new(),
            order: VecDeque::new(),
            by_rrn: HashMap::new(),
            window_ms: i64::try_from(window.as_millis()).unwrap_or(i64::MAX),
            capacity,
            evicted_early: 0,
        }
    }

    /// Requests remembered now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn expire(&mut self, now_ms: i64) {
        while let Some(&(at, key)) = self.order.front() {
            let expired = now_ms.saturating_sub(at) > self.window_ms;
            if !expired && self.entries.len() < self.capacity {
                break;
            }
            if !expired {
                self.evicted_early += 1;
            }
            self.order.pop_front();
            self.entries.remove(&key);
            if self.by_rrn.get(&key.terminal_rrn()) == Some(&key) {
                self.by_rrn.remove(&key.terminal_rrn());
            }
        }
    }

    /// The original of a retransmission of `key`, if `key` was seen within the window.
    pub fn get(&mut self, key: &DupKey, now_ms: i64) -> Option<Arc<Original>> {
        self.expire(now_ms);
        self.entries.get(key).cloned()
    }

    /// Remembers a request first seen at `at_ms`.
    pub fn insert(&mut self, key: DupKey, at_ms: i64, original: Arc<Original>) {
        self.expire(at_ms);
        if self.entries.insert(key, original).is_none() {
            self.order.push_back((at_ms, key));
        }
        if !key.reversal {
            self.by_rrn.insert(key.terminal_rrn(), key);
        }
    }

    /// The authorization a reversal refers to: the one field 90 names when it carries
    /// one (nothing else: a wrong field 90 must not reverse some other transaction), else
    /// the latest authorization with the reversal's terminal and RRN.
    pub fn find_original(&self, reversal: &Message) -> Option<Arc<Original>> {
        if reversal.has(fields::ORIGINAL_DATA) {
            let key = DupKey::original_of(reversal)?;
            return self.entries.get(&key).cloned();
        }
        let own = DupKey::of(reversal, true)?;
        let key = self.by_rrn.get(&own.terminal_rrn())?;
        self.entries.get(key).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use payswitch_protocol::Mti;

    fn request(mti: Mti, stan: &str, time: &str) -> Message {
        let mut b = Message::builder(mti);
        b.set_str(7, time)
            .unwrap()
            .set_str(11, stan)
            .unwrap()
            .set_str(37, "533012000001")
            .unwrap()
            .set_str(41, "TERM0001")
            .unwrap();
        b.build()
    }

    #[test]
    fn window_expires_and_bounds() {
        let mut window = DuplicateWindow::new(Duration::from_secs(10), 2);
        let a = DupKey::of(
            &request(Mti::AUTHORIZATION_REQUEST, "000001", "1125123045"),
            false,
        )
        .unwrap();
        let b = DupKey::of(
            &request(Mti::AUTHORIZATION_REQUEST, "000002", "1125123045"),
            false,
        )
        .unwrap();
        let c = DupKey::of(
            &request(Mti::AUTHORIZATION_REQUEST, "000003", "1125123045"),
            false,
        )
        .unwrap();
        window.insert(a, 0, Arc::new(Original::new()));
        assert!(window.get(&a, 10_000).is_some(), "inside the window");
        assert!(window.get(&a, 10_001).is_none(), "past the window");
        window.insert(a, 20_000, Arc::new(Original::new()));
        window.insert(b, 20_001, Arc::new(Original::new()));
        window.insert(c, 20_002, Arc::new(Original::new()));
        assert_eq!(window.len(), 2);
        assert_eq!(window.evicted_early, 1);
        assert!(
            window.get(&a, 20_003).is_none(),
            "oldest dropped at the bound"
        );
    }

    #[test]
    fn reversal_finds_its_original_by_field_90_or_rrn() {
        let mut window = DuplicateWindow::new(Duration::from_secs(60), 100);
        let auth = request(Mti::AUTHORIZATION_REQUEST, "000007", "1125123045");
        let original = Arc::new(Original::new());
        window.insert(DupKey::of(&auth, false).unwrap(), 0, Arc::clone(&original));
        let mut b = request(Mti::REVERSAL_REQUEST, "000008", "1125123050").to_builder();
        b.set_str(90, "010000000711251230450000000000000000000000")
            .unwrap();
        let found = window.find_original(&b.build()).unwrap();
        assert!(Arc::ptr_eq(&found, &original));
        let without_90 = request(Mti::REVERSAL_REQUEST, "000008", "1125123050");
        assert!(Arc::ptr_eq(
            &window.find_original(&without_90).unwrap(),
            &original
        ));
        // A reversal is not a duplicate of its original, even with the same STAN and time.
        assert_ne!(
            DupKey::of(&auth, false),
            DupKey::of(
                &request(Mti::REVERSAL_REQUEST, "000007", "1125123045"),
                true
            )
        );
    }

    #[test]
    fn forwarded_keeps_what_a_reversal_needs() {
        let record = Record {
            kind: RecordKind::Forwarded,
            time_ms: 1_764_000_000_123,
            request_seq: 0,
            request_back: 1,
            mti: "0100".into(),
            processing_code: "000000".into(),
            transmission_time: "1125123045".into(),
            stan: "000007".into(),
            rrn: "533012000007".into(),
            terminal: "TERM0001".into(),
            merchant: "MERCHANT0000001".into(),
            pan_masked: "4111111******1111111".into(),
            pan_hash: 42,
            amount_minor: 12_500,
            currency: 978,
            acquirer: "north".into(),
            link_stan: 123,
            code: String::new(),
            approval_code: String::new(),
            decision: "approve".into(),
            score: Some(0.1),
            model: "rf".into(),
            private_data: String::new(),
            duplicate: false,
            switch_us: 0,
            acquirer_us: 0,
            attempt: 0,
            reversal_stan: 0,
            pan_sealed: Some(crate::journal::SealedPan {
                key: 2,
                nonce: [1; 12],
                data: vec![3; 32],
            }),
            event_ms: 0,
            mcc: 0,
            country: 0,
            pos_entry_mode: 0,
        };
        let forwarded = Forwarded::new(3, Stan::new(123).unwrap(), 77, &record);
        let back = forwarded.record("north");
        assert_eq!(
            back,
            Record {
                request_seq: 77,
                request_back: 0,
                decision: String::new(),
                score: None,
                model: String::new(),
                // A masked PAN is at most 19 characters.
                pan_masked: "4111111******111111".into(),
                ..record
            }
        );
        assert!(
            std::mem::size_of::<Forwarded>() <= 200,
            "{}",
            std::mem::size_of::<Forwarded>()
        );
    }

    #[tokio::test]
    async fn waiters_get_the_outcome_set_later() {
        let original = Arc::new(Original::new());
        let waiter = {
            let original = Arc::clone(&original);
            tokio::spawn(async move {
                original
                    .outcome(Duration::from_secs(5))
                    .await
                    .map(|o| o.code)
            })
        };
        tokio::task::yield_now().await;
        original.set_outcome(Outcome {
            code: *b"00",
            approval: Some(*b"ABC123"),
            private_data: String::new(),
        });
        assert_eq!(waiter.await.unwrap(), Some(*b"00"));
        assert!(original.claim_reversal());
        assert!(!original.claim_reversal());
    }
}
