//! COMMANDs being handled, so that a RESULT or ERROR published for one can
//! find it: [`crate::MessagingSpans`] keeps the COMMAND's span context (RPC
//! parenting in the stream style), [`crate::AgentMetrics`] the COMMAND's
//! sender (the reply's `peer`).
//!
//! Entries are found by a keyed SipHash of `(reply_to, correlation_id)`
//! alone; the strings themselves are not kept (two allocations per COMMAND
//! otherwise). SipHash with a random per-table key is a pseudo-random
//! function: without the key, a producer cannot make two ids collide, and
//! two of at most [`DEFAULT_MAX_IN_FLIGHT`] live entries collide by chance
//! with probability about 10^-11. A collision would only attribute one reply
//! to the wrong COMMAND. The table is bounded: past `max` live entries new
//! COMMANDs are not tracked (their replies lose the match, nothing else).

use crate::envelope::MessageKind;
use crate::labels::PreHashedMap;
use lapin::BasicProperties;
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;

/// Default bound of an in-flight COMMAND table.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 10_000;

/// The `(reply_to, correlation_id)` a received COMMAND's reply will carry,
/// when it awaits one: its `correlation_id`, else its `message_id`, else its
/// CloudEvents `id` (`envelope_id`), as the reference client correlates.
pub(crate) fn awaited_reply<'a>(
    kind: MessageKind,
    props: &'a BasicProperties,
    envelope_id: Option<&'a str>,
) -> Option<(&'a str, &'a str)> {
    if kind != MessageKind::Command {
        return None;
    }
    let reply_to = props.reply_to().as_ref()?.as_str();
    let correlation = props
        .correlation_id()
        .as_ref()
        .or(props.message_id().as_ref())
        .map(|c| c.as_str())
        .or(envelope_id)?;
    Some((reply_to, correlation))
}

/// COMMANDs being handled, by a keyed hash of `(reply_to, correlation_id)`.
pub(crate) struct InFlight<V> {
    hasher: RandomState,
    map: Mutex<PreHashedMap<V>>,
    /// Most live entries.
    pub(crate) max: usize,
}

impl<V: Clone> InFlight<V> {
    pub(crate) fn new(max: usize) -> Self {
        InFlight {
            hasher: RandomState::new(),
            map: Mutex::new(PreHashedMap::default()),
            max,
        }
    }

    /// The key of a COMMAND, or of the reply that answers it (its routing
    /// key is the COMMAND's `reply_to`).
    pub(crate) fn key(&self, reply_to: &str, correlation_id: &str) -> u64 {
        self.hasher.hash_one((reply_to, correlation_id))
    }

    /// Live entries.
    pub(crate) fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// The value of a live entry.
    pub(crate) fn get(&self, key: u64) -> Option<V> {
        self.map.lock().ok()?.get(&key).cloned()
    }

    /// Tracks a COMMAND; its key, or `None` when the table is full.
    pub(crate) fn insert(&self, key: u64, value: V) -> Option<u64> {
        let mut map = self.map.lock().ok()?;
        if map.len() >= self.max && !map.contains_key(&key) {
            return None;
        }
        map.insert(key, value);
        Some(key)
    }

    /// Forgets a COMMAND (it was settled).
    pub(crate) fn remove(&self, key: u64) {
        if let Ok(mut map) = self.map.lock() {
            map.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_keyed_by_both_strings() {
        let t = InFlight::new(2);
        let a = t.key("amq.gen-1", "c1");
        assert_ne!(a, t.key("amq.gen-1", "c2"));
        assert_ne!(a, t.key("amq.gen-2", "c1"));
        assert_eq!(t.insert(a, 1), Some(a));
        let b = t.key("q", "c");
        assert_eq!(t.insert(b, 2), Some(b));
        // Full: a new COMMAND is not tracked, a known one is updated.
        assert_eq!(t.insert(t.key("q", "other"), 3), None);
        assert_eq!(t.insert(a, 4), Some(a));
        assert_eq!((t.get(a), t.get(b), t.len()), (Some(4), Some(2), 2));
        t.remove(a);
        assert_eq!((t.get(a), t.len()), (None, 1));
    }
}
