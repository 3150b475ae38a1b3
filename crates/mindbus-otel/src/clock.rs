//! Wall-clock span timestamps from the monotonic instants the chain already
//! reads.
//!
//! The chain reads the monotonic clock once when a message's start hooks
//! begin and once when its end hooks begin. Left alone, the SDK would read
//! the wall clock twice more per sampled span (start and end), and each read
//! is a `clock_gettime` of 25 to 30 ns on a VM. Instead a span's start is
//! the chain's start instant mapped to wall-clock time through an anchor
//! (one wall-clock and one monotonic reading, taken together), and its end
//! is that start plus the monotonic time between the two hooks, so a span's
//! duration is exactly what the monotonic clock measured.
//!
//! The anchor is taken again when the instant being mapped is more than a
//! second away from it, so a step of the wall clock (an NTP correction, an
//! operator setting the time) shows in span timestamps within a second, as
//! the OpenTelemetry Java SDK's anchored clock does per trace.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long an anchor is used before a new one is taken.
const ANCHOR_LIFETIME_NS: i64 = 1_000_000_000;

/// The instant all others are measured from (the first one mapped).
static BASE: OnceLock<Instant> = OnceLock::new();
/// Wall-clock nanoseconds since the epoch minus monotonic nanoseconds since
/// [`BASE`], at the last anchoring.
static OFFSET_NS: AtomicI64 = AtomicI64::new(0);
/// Monotonic nanoseconds since [`BASE`] of the last anchoring (`i64::MIN`:
/// none yet).
static ANCHORED_AT_NS: AtomicI64 = AtomicI64::new(i64::MIN);

/// Signed nanoseconds from `base` to `at`, saturating (about 292 years).
fn since(base: Instant, at: Instant) -> i64 {
    match at.checked_duration_since(base) {
        Some(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        None => i64::try_from(base.duration_since(at).as_nanos()).map_or(i64::MIN, |n| -n),
    }
}

fn wall_ns(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_nanos()).map_or(i64::MIN, |n| -n),
    }
}

fn anchor(base: Instant) -> i64 {
    let now = Instant::now();
    let wall = wall_ns(SystemTime::now());
    let mono = since(base, now);
    let offset = wall.saturating_sub(mono);
    OFFSET_NS.store(offset, Ordering::Relaxed);
    ANCHORED_AT_NS.store(mono, Ordering::Relaxed);
    offset
}

/// The wall-clock time of `at`.
pub(crate) fn system_time(at: Instant) -> SystemTime {
    let base = *BASE.get_or_init(|| at);
    let mono = since(base, at);
    let anchored = ANCHORED_AT_NS.load(Ordering::Relaxed);
    let offset = if anchored == i64::MIN || mono.abs_diff(anchored) > ANCHOR_LIFETIME_NS as u64 {
        anchor(base)
    } else {
        OFFSET_NS.load(Ordering::Relaxed)
    };
    let wall = offset.saturating_add(mono);
    match u64::try_from(wall) {
        Ok(ns) => UNIX_EPOCH + Duration::from_nanos(ns),
        Err(_) => UNIX_EPOCH,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: SystemTime, b: SystemTime, within: Duration) -> bool {
        let d = a.duration_since(b).unwrap_or_else(|e| e.duration());
        d <= within
    }

    #[test]
    fn maps_instants_to_the_wall_clock() {
        let before = SystemTime::now();
        let now = Instant::now();
        let mapped = system_time(now);
        let after = SystemTime::now();
        assert!(
            close(mapped, before, Duration::from_millis(50)),
            "{mapped:?} vs {before:?}"
        );
        assert!(
            close(mapped, after, Duration::from_millis(50)),
            "{mapped:?} vs {after:?}"
        );
    }

    #[test]
    fn keeps_monotonic_differences() {
        let a = Instant::now();
        let b = a + Duration::from_micros(1_234);
        let (wa, wb) = (system_time(a), system_time(b));
        let d = wb.duration_since(wa).expect("b after a");
        // Both map through the same anchor unless one was taken between
        // the two calls; either way within a microsecond of 1,234 µs.
        assert!(d.as_nanos().abs_diff(1_234_000) < 1_000_000, "{d:?}");
    }

    #[test]
    fn instants_before_the_base_and_far_ones_map() {
        let now = Instant::now();
        let _ = system_time(now);
        let earlier = now.checked_sub(Duration::from_millis(5)).unwrap_or(now);
        let later = now + Duration::from_secs(5);
        let (we, wl) = (system_time(earlier), system_time(later));
        assert!(we <= wl);
        assert!(close(we, SystemTime::now(), Duration::from_secs(1)));
        // A far instant takes a new anchor: still about now + 5 s.
        assert!(close(
            wl,
            SystemTime::now() + Duration::from_secs(5),
            Duration::from_secs(1)
        ));
    }
}
