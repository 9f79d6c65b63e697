//! Durations on the command line and in the environment, in the grammar of Go's
//! `time.ParseDuration` that kubectl and cilium users already type: a sequence of decimal
//! numbers, each with an optional fraction and a unit (`ns`, `us`/`µs`, `ms`, `s`, `m`,
//! `h`), e.g. `500ms`, `30s`, `5m`, `1h30m`, `1.5h`. As in Go, a number needs a unit (only
//! `0` stands alone); unlike Go, negative durations are refused (nothing in mesh waits a
//! negative time).
//!
//! Used as a clap `value_parser`: clap's error names the flag, this one the value.

use std::time::Duration;

/// Why a duration did not parse. Each message names the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("invalid duration {value:?}: empty")]
    Empty { value: String },
    #[error("invalid duration {value:?}: negative durations are not allowed")]
    Negative { value: String },
    #[error(
        "invalid duration {value:?}: expected a number at {rest:?} (e.g. 500ms, 30s, 5m, 1h30m)"
    )]
    ExpectedNumber { value: String, rest: String },
    #[error(
        "invalid duration {value:?}: missing unit after {number:?} (use ns, us, ms, s, m or h)"
    )]
    MissingUnit { value: String, number: String },
    #[error("invalid duration {value:?}: unknown unit {unit:?} (use ns, us, ms, s, m or h)")]
    UnknownUnit { value: String, unit: String },
    #[error("invalid duration {value:?}: too large")]
    Overflow { value: String },
}

const NANOS_PER_UNIT: &[(&str, u128)] = &[
    ("ns", 1),
    ("us", 1_000),
    ("µs", 1_000),
    ("μs", 1_000),
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60_000_000_000),
    ("h", 3_600_000_000_000),
];

/// Parses a duration (see the module documentation). Surrounding whitespace is ignored.
pub fn parse_duration(value: &str) -> Result<Duration, DurationError> {
    let s = value.trim();
    let err_value = || value.to_owned();
    if s.is_empty() {
        return Err(DurationError::Empty { value: err_value() });
    }
    let s = match s.strip_prefix('+') {
        Some(rest) => rest,
        None if s.starts_with('-') => return Err(DurationError::Negative { value: err_value() }),
        None => s,
    };
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = s;
    let mut total: u128 = 0;
    while !rest.is_empty() {
        // The number: digits, optionally a fraction.
        let int_len = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let (int, after) = rest.split_at(int_len);
        let (frac, after) = match after.strip_prefix('.') {
            Some(a) => {
                let n = a.find(|c: char| !c.is_ascii_digit()).unwrap_or(a.len());
                a.split_at(n)
            }
            None => ("", after),
        };
        if int.is_empty() && frac.is_empty() {
            return Err(DurationError::ExpectedNumber {
                value: err_value(),
                rest: rest.to_owned(),
            });
        }
        let number = &rest[..rest.len() - after.len()];
        // The unit: everything up to the next digit or '.'.
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        if unit.is_empty() {
            return Err(DurationError::MissingUnit {
                value: err_value(),
                number: number.to_owned(),
            });
        }
        let Some(&(_, per)) = NANOS_PER_UNIT.iter().find(|(u, _)| *u == unit) else {
            return Err(DurationError::UnknownUnit {
                value: err_value(),
                unit: unit.to_owned(),
            });
        };
        let overflow = || DurationError::Overflow { value: err_value() };
        let int: u128 = if int.is_empty() {
            0
        } else {
            int.parse().map_err(|_| overflow())?
        };
        let mut nanos = int.checked_mul(per).ok_or_else(overflow)?;
        // The fraction, exactly, down to the nanosecond (Go truncates the same way).
        let mut scale = per;
        for d in frac.bytes() {
            scale /= 10;
            if scale == 0 {
                break;
            }
            nanos += u128::from(d - b'0') * scale;
        }
        total = total.checked_add(nanos).ok_or_else(overflow)?;
        rest = next;
    }
    let secs = u64::try_from(total / 1_000_000_000)
        .map_err(|_| DurationError::Overflow { value: err_value() })?;
    Ok(Duration::new(secs, (total % 1_000_000_000) as u32))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_go_durations() {
        let ok = |s: &str| parse_duration(s).unwrap_or_else(|e| panic!("{s}: {e}"));
        assert_eq!(ok("500ms"), Duration::from_millis(500));
        assert_eq!(ok("30s"), Duration::from_secs(30));
        assert_eq!(ok("5m"), Duration::from_secs(300));
        assert_eq!(ok("1h30m"), Duration::from_secs(5400));
        assert_eq!(ok("1.5h"), Duration::from_secs(5400));
        assert_eq!(ok("2m3.5s"), Duration::from_millis(123_500));
        assert_eq!(ok(".5s"), Duration::from_millis(500));
        assert_eq!(ok("250us"), Duration::from_micros(250));
        assert_eq!(ok("250µs"), Duration::from_micros(250));
        assert_eq!(ok("7ns"), Duration::from_nanos(7));
        assert_eq!(ok("0"), Duration::ZERO);
        assert_eq!(ok(" 10s "), Duration::from_secs(10));
        assert_eq!(ok("+1s"), Duration::from_secs(1));
    }

    #[test]
    fn refusals_name_the_value_and_the_problem() {
        let err = |s: &str| parse_duration(s).unwrap_err();
        assert!(matches!(err(""), DurationError::Empty { .. }));
        assert!(matches!(err("5"), DurationError::MissingUnit { ref number, .. } if number == "5"));
        assert!(
            matches!(err("1h30"), DurationError::MissingUnit { ref number, .. } if number == "30")
        );
        assert!(matches!(err("3d"), DurationError::UnknownUnit { ref unit, .. } if unit == "d"));
        assert!(matches!(err("5x"), DurationError::UnknownUnit { .. }));
        assert!(matches!(err("x"), DurationError::ExpectedNumber { .. }));
        assert!(matches!(err("s"), DurationError::ExpectedNumber { .. }));
        assert!(matches!(err("."), DurationError::ExpectedNumber { .. }));
        assert!(matches!(err("-1s"), DurationError::Negative { .. }));
        assert!(matches!(
            err("99999999999999999999999h"),
            DurationError::Overflow { .. }
        ));
        let message = err("5x").to_string();
        assert!(
            message.contains("\"5x\"") && message.contains("\"x\""),
            "{message}"
        );
    }

    proptest! {
        /// What `Duration`'s components print as parses back to the same duration.
        #[test]
        fn components_roundtrip(h in 0u64..1000, m in 0u64..60, s in 0u64..60, ms in 0u64..1000) {
            let text = format!("{h}h{m}m{s}s{ms}ms");
            let want = Duration::from_secs(h * 3600 + m * 60 + s) + Duration::from_millis(ms);
            prop_assert_eq!(parse_duration(&text), Ok(want));
        }

        #[test]
        fn never_panics(s in "\\PC{0,16}") {
            let _ = parse_duration(&s);
        }
    }
}
