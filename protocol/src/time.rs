//! UTC calendar time for the wire: field 7 (transmission date and time, `MMDDhhmmss`), the
//! year a field 7 most likely belongs to, and expiry months (`YYMM`), without a date crate.
//!
//! Sans-IO like the rest of the crate: nothing here reads the clock. Callers pass the time
//! in (`UtcDateTime::from_system_time(SystemTime::now())` at the call site), so tests and
//! replays choose it.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::ValueError;
use crate::types::check_digits;

const SECONDS_PER_DAY: u64 = 86_400;
const MS_PER_DAY: i64 = 86_400_000;
/// Days from 0000-03-01 to 1970-01-01 in the proleptic Gregorian calendar: shifts the
/// algorithms below to count from the epoch.
const EPOCH_FROM_MARCH_0000: i64 = 719_468;
/// Days in a 400-year Gregorian cycle (an era): the calendar repeats after it.
const DAYS_PER_ERA: i64 = 146_097;

/// A UTC date and time to the second, at or after 1970-01-01T00:00:00Z.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct UtcDateTime {
    year: u32,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
}

impl UtcDateTime {
    /// The calendar fields of `unix_s` seconds after 1970-01-01T00:00:00Z.
    pub fn from_unix_seconds(unix_s: u64) -> UtcDateTime {
        let days = (unix_s / SECONDS_PER_DAY) as i64;
        let (year, month, day) = civil_from_days(days);
        let of_day = unix_s % SECONDS_PER_DAY;
        UtcDateTime {
            // At most year 5.8e11 from a u64 of seconds; a clock reads far below u32::MAX.
            year: year as u32,
            month,
            day,
            hour: (of_day / 3600) as u32,
            minute: (of_day / 60 % 60) as u32,
            second: (of_day % 60) as u32,
        }
    }

    /// The calendar fields of `unix_ms` milliseconds after the epoch, to the second below.
    pub fn from_unix_ms(unix_ms: u64) -> UtcDateTime {
        UtcDateTime::from_unix_seconds(unix_ms / 1000)
    }

    /// The calendar fields of a clock reading. A clock before 1970 reads as 1970.
    pub fn from_system_time(time: SystemTime) -> UtcDateTime {
        let unix_s = time
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        UtcDateTime::from_unix_seconds(unix_s)
    }

    /// Seconds since 1970-01-01T00:00:00Z.
    pub fn unix_seconds(&self) -> i64 {
        let days = days_from_civil(i64::from(self.year), self.month, self.day);
        ((days * 24 + i64::from(self.hour)) * 60 + i64::from(self.minute)) * 60
            + i64::from(self.second)
    }

    /// Milliseconds since 1970-01-01T00:00:00Z.
    pub fn unix_ms(&self) -> i64 {
        self.unix_seconds() * 1000
    }

    /// Full year, e.g. 2026.
    pub fn year(&self) -> u32 {
        self.year
    }

    /// Month, 1..=12.
    pub fn month(&self) -> u32 {
        self.month
    }

    /// Day of the month, 1..=31.
    pub fn day(&self) -> u32 {
        self.day
    }

    /// Hour, 0..=23.
    pub fn hour(&self) -> u32 {
        self.hour
    }

    /// Minute, 0..=59.
    pub fn minute(&self) -> u32 {
        self.minute
    }

    /// Second, 0..=59.
    pub fn second(&self) -> u32 {
        self.second
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

/// Field 7 as sent: `MMDDhhmmss` in UTC, each part in its range. It carries no year.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransmissionTime {
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
}

impl TransmissionTime {
    /// Parses ten digits: month 1..=12, day 1..=31, hour ..=23, minute and second ..=59.
    /// The day is not checked against the month (0231 is taken, as 3 March or 2 March).
    pub fn parse(raw: &[u8]) -> Result<TransmissionTime, ValueError> {
        check_digits(raw, "10", 10)?;
        let pair = |i: usize| u32::from(raw[i] - b'0') * 10 + u32::from(raw[i + 1] - b'0');
        let part = |i: usize, range: std::ops::RangeInclusive<u32>| {
            let value = pair(i);
            if range.contains(&value) {
                Ok(value)
            } else {
                Err(ValueError::OutOfRange { offset: i })
            }
        };
        Ok(TransmissionTime {
            month: part(0, 1..=12)?,
            day: part(2, 1..=31)?,
            hour: part(4, 0..=23)?,
            minute: part(6, 0..=59)?,
            second: part(8, 0..=59)?,
        })
    }

    /// Unix milliseconds of this time in the latest year (from four years back, so that
    /// 29 February finds its leap year, to next year) in which it is a real date and falls
    /// at or before `limit_ms`; `None` when no such year has this date (31 April).
    pub fn unix_ms_latest_until(&self, limit_ms: i64) -> Option<i64> {
        let (year, _, _) = civil_from_days(limit_ms.div_euclid(MS_PER_DAY));
        (year - 4..=year + 1)
            .rev()
            .filter(|&y| self.day <= days_in_month(y, self.month))
            .map(|y| self.unix_ms_in(y))
            .find(|&t| t <= limit_ms)
    }

    fn unix_ms_in(&self, year: i64) -> i64 {
        let days = days_from_civil(year, self.month, self.day);
        let of_day =
            (i64::from(self.hour) * 60 + i64::from(self.minute)) * 60 + i64::from(self.second);
        (days * 86_400 + of_day) * 1000
    }
}

/// Days in `month` (1..=12) of `year`.
pub fn days_in_month(year: i64, month: u32) -> u32 {
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`). A day past the month's end runs into the next month.
pub fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let (month, day) = (i64::from(month), i64::from(day));
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let month_from_march = (month + 9) % 12;
    let day_of_year = (153 * month_from_march + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * DAYS_PER_ERA + day_of_era - EPOCH_FROM_MARCH_0000
}

/// Year, month (1..=12) and day (1..=31) of the `days`-th day after 1970-01-01, negative
/// before it (Howard Hinnant's `civil_from_days`).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + EPOCH_FROM_MARCH_0000;
    let era = z.div_euclid(DAYS_PER_ERA);
    let day_of_era = z - era * DAYS_PER_ERA;
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
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month as u32, day as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-11-25T12:30:45Z.
    const NOV_25_2026: u64 = 1_795_609_845;

    #[test]
    fn known_instants() {
        let epoch = UtcDateTime::from_unix_seconds(0);
        assert_eq!((epoch.year(), epoch.month(), epoch.day()), (1970, 1, 1));
        // 2000-02-29T12:34:56Z, a leap day.
        let leap = UtcDateTime::from_unix_seconds(951_827_696);
        assert_eq!(
            (
                leap.year(),
                leap.month(),
                leap.day(),
                leap.hour(),
                leap.minute(),
                leap.second()
            ),
            (2000, 2, 29, 12, 34, 56)
        );
        assert_eq!(leap.transmission_time(), "0229123456");
        let t = UtcDateTime::from_unix_seconds(NOV_25_2026);
        assert_eq!(t.transmission_time(), "1125123045");
        assert_eq!(t.year(), 2026);
        assert_eq!(t.unix_seconds(), NOV_25_2026 as i64);
        assert_eq!(UtcDateTime::from_unix_ms(NOV_25_2026 * 1000 + 999), t);
        assert_eq!(t.unix_ms(), NOV_25_2026 as i64 * 1000);
    }

    #[test]
    fn a_clock_reading_is_taken_as_given() {
        let at = UNIX_EPOCH + std::time::Duration::from_millis(NOV_25_2026 * 1000 + 250);
        assert_eq!(
            UtcDateTime::from_system_time(at),
            UtcDateTime::from_unix_seconds(NOV_25_2026)
        );
        let before = UNIX_EPOCH - std::time::Duration::from_secs(1);
        assert_eq!(
            UtcDateTime::from_system_time(before),
            UtcDateTime::from_unix_seconds(0)
        );
    }

    #[test]
    fn leap_years_follow_the_century_rule() {
        let feb_days = |year| days_from_civil(year, 3, 1) - days_from_civil(year, 2, 1);
        assert_eq!(feb_days(2024), 29, "divisible by 4");
        assert_eq!(feb_days(2026), 28);
        assert_eq!(feb_days(1900), 28, "a century is not a leap year");
        assert_eq!(feb_days(2100), 28);
        assert_eq!(feb_days(2000), 29, "unless divisible by 400");
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(1969, 12, 31), -1);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
    }

    #[test]
    fn days_and_civil_dates_round_trip() {
        // About 2,200 years either side of the epoch, every day.
        for days in -800_000..800_000 {
            let (year, month, day) = civil_from_days(days);
            assert!(
                (1..=12).contains(&month) && (1..=31).contains(&day),
                "{days}"
            );
            assert_eq!(days_from_civil(year, month, day), days);
        }
    }

    #[test]
    fn month_index_orders_months() {
        let dec = UtcDateTime::from_unix_seconds(1_796_083_200); // 2026-12-01
        let jan = UtcDateTime::from_unix_seconds(1_798_761_600); // 2027-01-01
        assert_eq!(jan.month_index() - dec.month_index(), 1);
    }

    #[test]
    fn transmission_time_takes_the_latest_year_up_to_the_limit() {
        let t = TransmissionTime::parse(b"1125123045").unwrap();
        let now_ms = 1_795_614_300_000; // 2026-11-25T13:45:00Z
        assert_eq!(
            t.unix_ms_latest_until(now_ms),
            Some(NOV_25_2026 as i64 * 1000)
        );
        // Sent just before New Year, read just after: the year before.
        let new_year_ms = 1_798_761_610_000; // 2027-01-01T00:00:10Z
        let t = TransmissionTime::parse(b"1231235959").unwrap();
        assert_eq!(t.unix_ms_latest_until(new_year_ms), Some(1_798_761_599_000));
        // Past the limit in this year: last year's.
        let t = TransmissionTime::parse(b"0101000005").unwrap();
        assert_eq!(
            t.unix_ms_latest_until(1_798_761_600_000 + 4_000), // 2027-01-01T00:00:04Z
            Some(1_767_225_605_000)                            // 2026-01-01T00:00:05Z
        );
        // 29 February: the latest leap year; 31 April: none.
        let t = TransmissionTime::parse(b"0229120000").unwrap();
        assert_eq!(t.unix_ms_latest_until(now_ms), Some(1_709_208_000_000)); // 2024-02-29T12:00Z
        let t = TransmissionTime::parse(b"0431120000").unwrap();
        assert_eq!(t.unix_ms_latest_until(now_ms), None);
    }

    #[test]
    fn transmission_time_is_formatted_and_parsed_alike() {
        let sent = UtcDateTime::from_unix_seconds(NOV_25_2026);
        let read = TransmissionTime::parse(sent.transmission_time().as_bytes()).unwrap();
        assert_eq!(
            read.unix_ms_latest_until(sent.unix_ms()),
            Some(sent.unix_ms())
        );
    }

    #[test]
    fn transmission_time_parts_are_range_checked() {
        assert!(TransmissionTime::parse(b"1231235959").is_ok());
        assert!(
            TransmissionTime::parse(b"0231000000").is_ok(),
            "day not by month"
        );
        assert_eq!(
            TransmissionTime::parse(b"11251230"),
            Err(ValueError::Length {
                expected: "10",
                len: 8
            })
        );
        assert_eq!(
            TransmissionTime::parse(b"11251230x5"),
            Err(ValueError::Character { offset: 8 })
        );
        for (raw, offset) in [
            (b"0025123045", 0),
            (b"1325123045", 0),
            (b"1100123045", 2),
            (b"1132123045", 2),
            (b"1125243045", 4),
            (b"1125126045", 6),
            (b"1125123060", 8),
        ] {
            assert_eq!(
                TransmissionTime::parse(raw),
                Err(ValueError::OutOfRange { offset }),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
    }
}
