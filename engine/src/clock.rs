//! Time as the switch's pure parts take it: a [`Now`] handed in by their driver. The
//! switch's driver reads the system clock ([`now`]); the simulator hands in its own.

/// A reading of the clock: Unix microseconds (the switch's clock, or the simulator's).
/// Durations between two readings are taken saturating at zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Now {
    /// Microseconds since the Unix epoch.
    pub unix_us: i64,
}

impl Now {
    /// Milliseconds since the Unix epoch, as journal records keep them.
    pub fn unix_ms(self) -> i64 {
        self.unix_us.div_euclid(1000)
    }

    /// Microseconds from `earlier` to this reading; 0 if the clock went back.
    pub fn since(self, earlier: Now) -> u64 {
        u64::try_from(self.unix_us.saturating_sub(earlier.unix_us)).unwrap_or(0)
    }
}

/// The system clock now.
pub fn now() -> Now {
    let unix_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
    Now { unix_us }
}
