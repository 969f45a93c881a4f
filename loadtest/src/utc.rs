//! UTC calendar fields from Unix seconds: enough for field 7 (MMDDhhmmss) and expiry
//! months (YYMM), without a date crate.

use std::time::{SystemTime, UNIX_EPOCH};

/// A UTC date and time to the second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct UtcDateTime {
    /// Full year, e.g. 2026.
    pub year: u32,
    /// 1..=12.
    pub month: u32,
    /// 1..=31.
    pub day: u32,
    /// 0..=23.
    pub hour: u32,
    /// 0..=59.
    pub minute: u32,
    /// 0..=59.
    pub second: u32,
}

const SECONDS_PER_DAY: u64 = 86_400;

impl UtcDateTime {
    /// The calendar fields of `unix_s` seconds after 1970-01-01T00:00:00Z.
    pub fn from_unix_seconds(unix_s: u64) -> UtcDateTime {
        let (year, month, day) = civil_from_days(unix_s / SECONDS_PER_DAY);
        let of_day = unix_s % SECONDS_PER_DAY;
        UtcDateTime {
            year,
            month,
            day,
            hour: (of_day / 3600) as u32,
            minute: (of_day / 60 % 60) as u32,
            second: (of_day % 60) as u32,
        }
    }

    /// The wall clock now. A clock before 1970 reads as 1970.
    pub fn now() -> UtcDateTime {
        let unix_s = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        UtcDateTime::from_unix_seconds(unix_s)
    }

    /// Field 7, transmission date and time: `MMDDhhmmss`.
    pub fn transmission_time(&self) -> String {
        format!(
            "{:02}{:02}{:02}{:02}{:02}",
            self.month, self.day, self.hour, self.minute, self.second
        )
    }

    /// Months since year 0, to compare expiry months by subtraction.
    pub fn month_index(&self) -> u32 {
        self.year * 12 + (self.month - 1)
    }
}

/// Year, month, day of the `days`-th day after 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, restricted to dates after the epoch).
fn civil_from_days(days: u64) -> (u32, u32, u32) {
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year as u32, month as u32, day as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_instants() {
        let epoch = UtcDateTime::from_unix_seconds(0);
        assert_eq!((epoch.year, epoch.month, epoch.day), (1970, 1, 1));
        // 2000-02-29T12:34:56Z, a leap day.
        let leap = UtcDateTime::from_unix_seconds(951_827_696);
        assert_eq!(
            (
                leap.year,
                leap.month,
                leap.day,
                leap.hour,
                leap.minute,
                leap.second
            ),
            (2000, 2, 29, 12, 34, 56)
        );
        assert_eq!(leap.transmission_time(), "0229123456");
        // 2026-11-25T12:30:45Z.
        let t = UtcDateTime::from_unix_seconds(1_795_609_845);
        assert_eq!(t.transmission_time(), "1125123045");
        assert_eq!(t.year, 2026);
    }

    #[test]
    fn month_index_orders_months() {
        let dec = UtcDateTime::from_unix_seconds(1_796_083_200); // 2026-12-01
        let jan = UtcDateTime::from_unix_seconds(1_798_761_600); // 2027-01-01
        assert_eq!(jan.month_index() - dec.month_index(), 1);
    }
}
