//! Settlements of a channel's deliveries made for other deliveries than
//! the one they were called on: `multiple: true` (every earlier unsettled
//! delivery of the channel), and `basic_ack`/`basic_nack`/`basic_reject`
//! by delivery tag on the [`TracedChannel`](crate::TracedChannel).
//!
//! The deliveries they cover are told when they next look: as their
//! [`TracedDelivery`](crate::TracedDelivery) is settled or dropped, or as
//! the handler returns. Each then ends once, with the covering settlement's
//! outcome and time, instead of `unsettled`. Nothing is looked up per
//! message unless such a settlement covered its tag (one atomic load).

use crate::message::Outcome;
use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Most settlements remembered per channel. Past it the oldest is
/// forgotten, and a delivery it covered ends as
/// [`Outcome::SettledElsewhere`] (settled, outcome no longer known).
pub(crate) const MAX_SETTLES: usize = 1024;

#[derive(Clone, Copy)]
struct Entry {
    /// Delivery tags covered, inclusive.
    lo: u64,
    hi: u64,
    outcome: Outcome,
    at: Instant,
}

impl Entry {
    /// Whether it settled delivery `tag`, delivered at `since` (a delivery
    /// that arrived after the settlement is not covered: after a channel
    /// recovery tags start again at 1).
    fn covers(&self, tag: u64, since: Instant) -> bool {
        self.lo <= tag && tag <= self.hi && since <= self.at
    }
}

/// One channel's settlements by tag range.
#[derive(Default)]
pub(crate) struct Settles {
    /// Highest tag any settlement covered (0: none yet).
    highest: AtomicU64,
    log: Mutex<Log>,
}

#[derive(Default)]
struct Log {
    entries: VecDeque<Entry>,
    /// What evicted entries covered, merged: up to this tag, until then.
    forgotten: Option<(u64, Instant)>,
}

impl Settles {
    /// Records a settlement of tags `lo..=hi` with `outcome` at `at`.
    pub(crate) fn record(&self, lo: u64, hi: u64, outcome: Outcome, at: Instant) {
        let Ok(mut log) = self.log.lock() else {
            return;
        };
        if log.entries.len() >= MAX_SETTLES
            && let Some(old) = log.entries.pop_front()
        {
            let (hi, at) = log.forgotten.unwrap_or((0, old.at));
            log.forgotten = Some((hi.max(old.hi), at.max(old.at)));
        }
        log.entries.push_back(Entry {
            lo,
            hi,
            outcome,
            at,
        });
        self.highest.fetch_max(hi, Ordering::Release);
    }

    /// The settlement that covered delivery `tag`, delivered at `since`:
    /// its outcome and time. A single-tag entry is used up by its delivery.
    pub(crate) fn claim(&self, tag: u64, since: Instant) -> Option<(Outcome, Instant)> {
        if tag > self.highest.load(Ordering::Acquire) {
            return None;
        }
        let mut log = self.log.lock().ok()?;
        if let Some(i) = log.entries.iter().position(|e| e.covers(tag, since)) {
            let e = log.entries[i];
            if e.lo == e.hi {
                log.entries.remove(i);
            }
            return Some((e.outcome, e.at));
        }
        match log.forgotten {
            Some((hi, at)) if tag <= hi && since <= at => Some((Outcome::SettledElsewhere, at)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_first_settlement_after_a_delivery_that_covers_it_wins() {
        let s = Settles::default();
        let t0 = Instant::now();
        let (t1, t2, t3) = (
            t0 + Duration::from_millis(1),
            t0 + Duration::from_millis(2),
            t0 + Duration::from_millis(3),
        );
        assert_eq!(s.claim(1, t0), None, "nothing recorded");
        s.record(0, 5, Outcome::Acked, t1);
        s.record(0, 9, Outcome::Nacked { requeue: false }, t2);
        s.record(12, 12, Outcome::Rejected { requeue: true }, t3);
        assert_eq!(s.claim(3, t0), Some((Outcome::Acked, t1)));
        assert_eq!(s.claim(3, t0), Some((Outcome::Acked, t1)), "ranges stay");
        assert_eq!(
            s.claim(7, t0),
            Some((Outcome::Nacked { requeue: false }, t2))
        );
        assert_eq!(s.claim(10, t0), None);
        assert_eq!(
            s.claim(12, t0),
            Some((Outcome::Rejected { requeue: true }, t3))
        );
        assert_eq!(s.claim(12, t0), None, "a single tag is used up");
        // Delivered after the settlement (tags restart after a recovery).
        assert_eq!(s.claim(3, t3), None);
    }

    #[test]
    fn bounded_and_honest_about_what_it_forgot() {
        let s = Settles::default();
        let t0 = Instant::now();
        for i in 0..(MAX_SETTLES as u64 + 10) {
            s.record(
                100 + i,
                100 + i,
                Outcome::Acked,
                t0 + Duration::from_millis(1),
            );
        }
        assert_eq!(
            s.log.lock().map(|l| l.entries.len()).unwrap_or(0),
            MAX_SETTLES
        );
        let (outcome, _) = s.claim(100, t0).unwrap();
        assert_eq!(outcome, Outcome::SettledElsewhere);
        assert_eq!(
            s.claim(100 + MAX_SETTLES as u64 + 9, t0).map(|c| c.0),
            Some(Outcome::Acked)
        );
    }
}
