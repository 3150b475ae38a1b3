//! Bounded label values and cached metric handles.
//!
//! Label values that come from message content (agent ids, actions, models,
//! error codes) can grow without bound. A [`LabelGuard`] admits the first
//! `cap` distinct values of one label; later ones fold into
//! [`OTHER`], and each fold is counted in
//! `mindbus_otel_label_overflow_total{label}`.
//!
//! Values are interned: a value already seen costs a hash lookup, no
//! allocation. [`HandleCache`] keeps one metric handle per label set so
//! the hot path never rebuilds a metric key.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// The value that label values past the cap fold into.
pub const OTHER: &str = "other";

/// Default number of distinct values admitted per label.
pub const DEFAULT_MAX_LABEL_VALUES: usize = 100;

/// Longest label value kept; longer values are cut at a character
/// boundary (a label is a name, not a payload).
pub const MAX_LABEL_LEN: usize = 128;

/// A small, fast, non-cryptographic hasher (the multiply-rotate scheme of
/// rustc's FxHash) for the bounded tables here: a few hundred entries at
/// most, so adversarial collisions cannot cost more than a short scan.
#[derive(Clone, Copy, Default)]
pub struct FastHasher(u64);

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FastHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for FastHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(w) ^ ((rest.len() as u64) << 56));
        }
    }
    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

/// `HashMap` with [`FastHasher`].
pub type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FastHasher>>;

/// A hasher for keys that already are the output of a keyed hash (the
/// in-flight tables key entries by a `RandomState` hash of the untrusted
/// ids): it passes the `u64` through instead of hashing it a second time.
#[derive(Clone, Copy, Default)]
pub(crate) struct PreHashed(u64);

impl Hasher for PreHashed {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys are expected; anything else still hashes.
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(SEED);
        }
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.0 = i;
    }
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

/// `HashMap` keyed by a keyed hash of the real key (see [`PreHashed`]).
pub(crate) type PreHashedMap<V> = HashMap<u64, V, BuildHasherDefault<PreHashed>>;

/// An index into a [`LabelGuard`]'s values.
pub type LabelId = u32;

/// Interns the values of one label, up to a cap.
#[derive(Debug)]
pub struct LabelGuard {
    label: &'static str,
    cap: usize,
    index: RwLock<FastMap<Box<str>, LabelId>>,
    values: RwLock<Vec<Arc<str>>>,
    folded: AtomicU64,
}

impl LabelGuard {
    /// A guard for `label` admitting `cap` distinct values (plus
    /// [`OTHER`], which is always id 0).
    pub fn new(label: &'static str, cap: usize) -> Self {
        LabelGuard {
            label,
            cap,
            index: RwLock::new(FastMap::default()),
            values: RwLock::new(vec![Arc::from(OTHER)]),
            folded: AtomicU64::new(0),
        }
    }

    /// The id of `value`, admitting it if there is room, else [`OTHER`]'s.
    pub fn id(&self, value: &str) -> LabelId {
        let value = truncate(value);
        if let Ok(index) = self.index.read()
            && let Some(id) = index.get(value)
        {
            return *id;
        }
        let Ok(mut index) = self.index.write() else {
            return 0;
        };
        if let Some(id) = index.get(value) {
            return *id;
        }
        if index.len() >= self.cap || value == OTHER {
            if value != OTHER {
                self.folded.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("mindbus_otel_label_overflow_total", "label" => self.label)
                    .increment(1);
            }
            return 0;
        }
        let Ok(mut values) = self.values.write() else {
            return 0;
        };
        let id = values.len() as LabelId;
        values.push(Arc::from(value));
        index.insert(value.into(), id);
        id
    }

    /// The value of an id (shared, no copy).
    pub fn value(&self, id: LabelId) -> Arc<str> {
        self.values
            .read()
            .ok()
            .and_then(|v| v.get(id as usize).cloned())
            .unwrap_or_else(|| Arc::from(OTHER))
    }

    /// The value `value` is recorded as (itself or [`OTHER`]).
    pub fn label(&self, value: &str) -> Arc<str> {
        self.value(self.id(value))
    }

    /// How many times a value was folded into [`OTHER`].
    pub fn folded(&self) -> u64 {
        self.folded.load(Ordering::Relaxed)
    }

    /// Distinct values admitted so far (not counting [`OTHER`]).
    pub fn admitted(&self) -> usize {
        self.index.read().map(|i| i.len()).unwrap_or(0)
    }
}

fn truncate(value: &str) -> &str {
    truncate_at(value, MAX_LABEL_LEN)
}

/// `value` cut to at most `max` bytes at a character boundary.
pub(crate) fn truncate_at(value: &str, max: usize) -> &str {
    if value.len() <= max {
        return value;
    }
    let mut end = max;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    &value[..end]
}

/// One metric handle per label set, created on first use.
#[derive(Debug)]
pub struct HandleCache<K, H> {
    map: RwLock<FastMap<K, H>>,
}

impl<K, H> Default for HandleCache<K, H> {
    fn default() -> Self {
        HandleCache {
            map: RwLock::new(FastMap::default()),
        }
    }
}

impl<K: Hash + Eq + Copy, H: Clone> HandleCache<K, H> {
    /// Runs `f` on the handle for `key` (made with `make` the first time),
    /// without cloning it: a metric handle is reference-counted, and a
    /// clone and its drop are two atomic read-modify-writes per use. `f`
    /// runs under the cache's read lock, so it must not use this cache.
    pub fn with<R>(&self, key: K, make: impl FnOnce() -> H, f: impl FnOnce(&H) -> R) -> R {
        if let Ok(map) = self.map.read()
            && let Some(h) = map.get(&key)
        {
            return f(h);
        }
        f(&self.get(key, make))
    }

    /// The handle for `key`, made with `make` the first time.
    pub fn get(&self, key: K, make: impl FnOnce() -> H) -> H {
        if let Ok(map) = self.map.read()
            && let Some(h) = map.get(&key)
        {
            return h.clone();
        }
        let handle = make();
        if let Ok(mut map) = self.map.write() {
            return map.entry(key).or_insert(handle).clone();
        }
        handle
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_past_the_cap_and_counts() {
        let g = LabelGuard::new("agent", 2);
        assert_eq!(&*g.label("a"), "a");
        assert_eq!(&*g.label("b"), "b");
        assert_eq!(&*g.label("a"), "a");
        assert_eq!(&*g.label("c"), OTHER);
        assert_eq!(&*g.label("d"), OTHER);
        assert_eq!(g.folded(), 2);
        assert_eq!(g.admitted(), 2);
        // "other" itself is never counted as a fold.
        assert_eq!(&*g.label(OTHER), OTHER);
        assert_eq!(g.folded(), 2);
    }

    #[test]
    fn long_values_are_cut_on_a_char_boundary() {
        let g = LabelGuard::new("model", 10);
        let long = "é".repeat(200);
        let v = g.label(&long);
        assert!(v.len() <= MAX_LABEL_LEN);
        assert!(long.starts_with(&*v));
    }

    #[test]
    fn handle_cache_makes_once() {
        let c: HandleCache<(u32, u8), u64> = HandleCache::default();
        let mut made = 0;
        for _ in 0..3 {
            c.get((1, 2), || {
                made += 1;
                7
            });
        }
        assert_eq!(made, 1);
    }
}
