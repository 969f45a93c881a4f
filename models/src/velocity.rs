//! Velocity state: what recent history of a card, merchant or terminal looks like.
//!
//! **Windows are exact, over a bounded history.** Each card keeps a ring of its last
//! [`CARD_EVENTS`] events `(time_ms, amount_minor, merchant, country)`; each merchant and
//! terminal a ring of its last [`ENTITY_EVENTS`] events `(time_ms, card)`. A window count is
//! the number of ring events with `|now - time_ms| < window_ms`, so an event rolls off at
//! exactly `window_ms` after it happened (not at a bucket edge). The distance is taken on
//! either side because events arrive out of time order when several gateways interleave
//! (see `features::within`); for data in time order it is the usual `now - time_ms`.
//! The price of exactness is that a count saturates at the ring size: a card with more
//! than [`CARD_EVENTS`] transactions in 24 h reports [`CARD_EVENTS`] (and the sum of those), which is already as
//! suspicious as a card gets. Bucketed counters would not saturate but roll off a whole
//! bucket at once; we chose exact roll-off so training and serving agree to the millisecond.
//!
//! **Memory bound.** A [`ClockTable`] holds at most `capacity` keys; when full, the clock
//! hand evicts the first slot not touched since the hand last passed (second-chance LRU).
//! Bytes per card: one `CardState` slot is [`CARD_STATE_BYTES`] (≈ 32 events × 24 B +
//! 32 B header, about 800 B) plus about 24 B of hash-map entry, so about 0.8 KiB per card:
//! 1 M cards ≈ 0.8 GiB. Per merchant or terminal about 1 KiB (64 × 16 B + header).
//! Slots are allocated as keys arrive, up to `capacity`; nothing grows past it.

use std::collections::HashMap;

/// Events kept per card: 32 covers a normal card's whole day many times over and keeps a
/// card under 1 KiB; a burst beyond it saturates the counts (see the module doc).
pub const CARD_EVENTS: usize = 32;

/// Events kept per merchant or terminal: 64 is enough to see a compromised terminal's burst
/// within a minute; a busy merchant saturates the hour count at 64, still ranking it "busy".
pub const ENTITY_EVENTS: usize = 64;

/// Size in bytes of one card's state, for the memory bound in the module doc.
pub const CARD_STATE_BYTES: usize = std::mem::size_of::<CardState>();

/// Size in bytes of one merchant's or terminal's state.
pub const ENTITY_STATE_BYTES: usize = std::mem::size_of::<EntityState>();

/// One card transaction remembered.
#[derive(Clone, Copy, Debug, Default)]
pub struct CardEvent {
    /// When, Unix ms.
    pub time_ms: i64,
    /// Amount in minor units.
    pub amount_minor: u64,
    /// Low 32 bits of the merchant hash: enough to count distinct merchants.
    pub merchant: u32,
    /// Merchant country, ISO numeric.
    pub country: u16,
}

/// A fixed-capacity ring of the most recent events, newest last.
#[derive(Clone, Debug)]
pub struct Ring<E: Copy + Default, const N: usize> {
    events: [E; N],
    /// Index of the next write.
    next: u16,
    len: u16,
}

impl<E: Copy + Default, const N: usize> Default for Ring<E, N> {
    fn default() -> Self {
        Ring {
            events: [E::default(); N],
            next: 0,
            len: 0,
        }
    }
}

impl<E: Copy + Default, const N: usize> Ring<E, N> {
    /// Adds an event, dropping the oldest when full.
    pub fn push(&mut self, event: E) {
        self.events[usize::from(self.next)] = event;
        self.next = ((usize::from(self.next) + 1) % N) as u16;
        self.len = (usize::from(self.len) + 1).min(N) as u16;
    }

    /// Number of events held.
    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    /// True when no event is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The newest event.
    pub fn newest(&self) -> Option<&E> {
        (self.len > 0).then(|| &self.events[(usize::from(self.next) + N - 1) % N])
    }

    /// Events, newest first.
    pub fn iter_newest_first(&self) -> impl Iterator<Item = &E> {
        let next = usize::from(self.next);
        (0..self.len()).map(move |i| &self.events[(next + N - 1 - i) % N])
    }
}

/// What a card's history says.
#[derive(Clone, Debug, Default)]
pub struct CardState {
    /// Recent transactions.
    pub events: Ring<CardEvent, CARD_EVENTS>,
    /// Home country: the first one seen (simple, and an attacker cannot drift it).
    pub home_country: u16,
    /// Home currency: the first one seen.
    pub home_currency: u16,
    /// Transactions seen, saturating.
    pub seen: u32,
    /// Running mean amount in minor units.
    pub mean_amount_minor: f32,
}

/// One merchant or terminal transaction remembered.
#[derive(Clone, Copy, Debug, Default)]
pub struct EntityEvent {
    /// When, Unix ms.
    pub time_ms: i64,
    /// Low 32 bits of the card hash: enough to count distinct cards.
    pub card: u32,
}

/// What a merchant's or terminal's history says.
#[derive(Clone, Debug, Default)]
pub struct EntityState {
    /// Recent transactions.
    pub events: Ring<EntityEvent, ENTITY_EVENTS>,
}

/// A bounded map from key to state with second-chance (clock) eviction.
#[derive(Debug)]
pub struct ClockTable<S> {
    index: HashMap<u64, u32>,
    slots: Vec<Slot<S>>,
    hand: usize,
    capacity: usize,
}

#[derive(Debug)]
struct Slot<S> {
    key: u64,
    referenced: bool,
    state: S,
}

impl<S: Default> ClockTable<S> {
    /// A table that holds at most `capacity` keys, within `1..=u32::MAX`: the switch sizes
    /// it from a checked configuration (`Config::check`).
    pub fn new(capacity: usize) -> Self {
        // Slot indexes are u32 (a bigger table would not fit in memory anyway), and a table
        // with no slot could not hold the key it is asked to track.
        assert!(
            (1..=u32::MAX as usize).contains(&capacity),
            "velocity table capacity {capacity} outside 1..=u32::MAX"
        );
        ClockTable {
            index: HashMap::new(),
            slots: Vec::new(),
            hand: 0,
            capacity,
        }
    }

    /// Keys held.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// The state of `key`, if held; does not touch it.
    pub fn peek(&self, key: u64) -> Option<&S> {
        self.index.get(&key).map(|&i| &self.slots[i as usize].state)
    }

    /// The state of `key`, made fresh (evicting another key when full) if not held.
    pub fn get_or_insert(&mut self, key: u64) -> &mut S {
        let i = match self.index.get(&key) {
            Some(&i) => i as usize,
            None => self.insert(key),
        };
        let slot = &mut self.slots[i];
        slot.referenced = true;
        &mut slot.state
    }

    fn insert(&mut self, key: u64) -> usize {
        let i = if self.slots.len() < self.capacity {
            self.slots.push(Slot {
                key,
                referenced: false,
                state: S::default(),
            });
            self.slots.len() - 1
        } else {
            let i = self.victim();
            self.index.remove(&self.slots[i].key);
            self.slots[i] = Slot {
                key,
                referenced: false,
                state: S::default(),
            };
            i
        };
        self.index.insert(key, i as u32);
        i
    }

    /// Second chance: a referenced slot has its bit cleared and is passed over once, so
    /// the sweep ends within two turns of the table.
    fn victim(&mut self) -> usize {
        loop {
            let i = self.hand;
            self.hand = (self.hand + 1) % self.slots.len();
            if !std::mem::replace(&mut self.slots[i].referenced, false) {
                return i;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_newest_n() {
        let mut ring: Ring<u32, 3> = Ring::default();
        for v in 1..=5 {
            ring.push(v);
        }
        assert_eq!(ring.len(), 3);
        assert_eq!(ring.newest(), Some(&5));
        assert_eq!(
            ring.iter_newest_first().copied().collect::<Vec<_>>(),
            [5, 4, 3]
        );
    }

    #[test]
    fn clock_table_evicts_an_unreferenced_key_at_capacity() {
        let mut table: ClockTable<u32> = ClockTable::new(2);
        *table.get_or_insert(1) = 10;
        *table.get_or_insert(2) = 20;
        // Both referenced: the sweep clears 1 and 2, then evicts 1.
        *table.get_or_insert(3) = 30;
        assert_eq!(table.len(), 2);
        assert!(table.peek(1).is_none());
        // 3 was just inserted (referenced); 2 had its bit cleared: 2 goes.
        table.get_or_insert(4);
        assert!(table.peek(2).is_none());
        assert_eq!(table.peek(3), Some(&30));
        assert_eq!(table.peek(4), Some(&0));
    }

    // The memory bound in the module doc, checked at compile time.
    const _: () = assert!(CARD_STATE_BYTES <= 1024);
    const _: () = assert!(ENTITY_STATE_BYTES <= 1024 + 16);
}
