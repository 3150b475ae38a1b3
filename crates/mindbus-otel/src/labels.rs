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

use std::borrow::Borrow;
use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, PoisonError, RwLock};

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

/// Most table slots a [`LabelGuard`] allocates: a guard's table has
/// `2 * (cap + 1)` slots rounded up to a power of two, at most this many
/// (a cap of up to 1023 values fits whole; values past that are admitted
/// into a locked overflow map). Each slot is 40 bytes on 64-bit targets,
/// so the default cap of 100 takes 256 slots (10 KiB) and no guard takes
/// more than 80 KiB. Every guard holds [`OTHER`], so its table exists from
/// the start.
pub const MAX_LABEL_SLOTS: usize = 2048;

/// Table slots of a [`HandleCache`]: up to half as many handles are found
/// without a lock, later ones in a locked overflow map. At most 64 bytes a
/// slot for the handle types used here, 8 KiB a cache, allocated when its
/// first handle is made (a consume-only channel allocates none of the
/// publish side's).
pub const HANDLE_SLOTS: usize = 128;

/// Interns the values of one label, up to a cap.
///
/// Looking up a value already admitted takes no lock and no atomic
/// read-modify-write (an acquire load per probed slot of a fixed table,
/// sized from the cap: see [`MAX_LABEL_SLOTS`]); admitting one, or folding
/// one past the cap, takes a lock.
#[derive(Debug)]
pub struct LabelGuard {
    label: &'static str,
    cap: usize,
    /// Value -> id; [`OTHER`] -> 0 from the start. Its write lock also
    /// orders admissions.
    index: ReadMostly<Box<str>, LabelId>,
    values: RwLock<Vec<Arc<str>>>,
    /// Set (under the index's write lock) once a value was refused: no
    /// value is admitted after that, so a miss means a fold and needs no
    /// write lock.
    full: AtomicBool,
    folded: AtomicU64,
}

impl LabelGuard {
    /// A guard for `label` admitting `cap` distinct values (plus
    /// [`OTHER`], which is always id 0).
    pub fn new(label: &'static str, cap: usize) -> Self {
        let slots = cap
            .saturating_add(1)
            .saturating_mul(2)
            .min(MAX_LABEL_SLOTS)
            .next_power_of_two();
        let index = ReadMostly::with_slots(slots);
        let _ = index.get_or_insert_with(
            OTHER,
            || Ok::<_, Infallible>((Box::from(OTHER), 0)),
            |_, _| (),
        );
        LabelGuard {
            label,
            cap,
            index,
            values: RwLock::new(vec![Arc::from(OTHER)]),
            full: AtomicBool::new(false),
            folded: AtomicU64::new(0),
        }
    }

    /// The id of `value`, admitting it if there is room, else [`OTHER`]'s.
    #[inline]
    pub fn id(&self, value: &str) -> LabelId {
        let value = truncate(value);
        match self.index.get(value) {
            Some((_, id)) => *id,
            None => self.admit(value),
        }
    }

    /// [`Self::id`] past a miss in the lock-free table.
    #[cold]
    #[inline(never)]
    fn admit(&self, value: &str) -> LabelId {
        // Loaded before looking again: once `full` is seen, every value
        // ever admitted is visible below.
        let full = self.full.load(Ordering::Acquire);
        if let Some((_, id)) = self.index.get(value) {
            return *id;
        }
        if let Some(id) = self.index.get_spilled(value, |_, id| *id) {
            return id;
        }
        if full {
            return self.fold(value);
        }
        let admitted = self.index.get_or_insert_with(
            value,
            || {
                let mut values = self.values.write().unwrap_or_else(PoisonError::into_inner);
                let id = LabelId::try_from(values.len()).map_err(|_| ())?;
                if values.len() > self.cap || value == OTHER {
                    self.full.store(true, Ordering::Release);
                    return Err(());
                }
                values.push(Arc::from(value));
                Ok((Box::from(value), id))
            },
            |_, id| *id,
        );
        admitted.unwrap_or_else(|()| self.fold(value))
    }

    /// Counts `value` as folded into [`OTHER`] (unless it is [`OTHER`]).
    fn fold(&self, value: &str) -> LabelId {
        if value != OTHER {
            self.folded.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("mindbus_otel_label_overflow_total", "label" => self.label)
                .increment(1);
        }
        0
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
        self.values
            .read()
            .map(|v| v.len().saturating_sub(1))
            .unwrap_or(0)
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
///
/// The first [`HANDLE_SLOTS`]` / 2` handles are found without a lock;
/// later ones (many label sets: a misconfiguration more than a load) under
/// a read lock.
#[derive(Debug)]
pub struct HandleCache<K, H> {
    map: ReadMostly<K, H>,
}

impl<K: Hash + Eq, H> Default for HandleCache<K, H> {
    fn default() -> Self {
        HandleCache {
            map: ReadMostly::with_slots(HANDLE_SLOTS),
        }
    }
}

impl<K: Hash + Eq + Copy, H: Clone> HandleCache<K, H> {
    /// Runs `f` on the handle for `key` (made with `make` the first time),
    /// without cloning it: a metric handle is reference-counted, and a
    /// clone and its drop are two atomic read-modify-writes per use. `f`
    /// may run under the cache's read lock, and `make` under its write
    /// lock, so neither may use this cache.
    #[inline]
    pub fn with<R>(&self, key: K, make: impl FnOnce() -> H, f: impl FnOnce(&H) -> R) -> R {
        match self.map.get(&key) {
            Some((_, h)) => f(h),
            None => f(&self.get_slow(key, make)),
        }
    }

    /// The handle for `key`, made with `make` the first time.
    pub fn get(&self, key: K, make: impl FnOnce() -> H) -> H {
        match self.map.get(&key) {
            Some((_, h)) => h.clone(),
            None => self.get_slow(key, make),
        }
    }

    /// [`Self::get`] past a miss in the lock-free table.
    #[cold]
    #[inline(never)]
    fn get_slow(&self, key: K, make: impl FnOnce() -> H) -> H {
        if let Some(h) = self.map.get_spilled(&key, |_, h| h.clone()) {
            return h;
        }
        match self.map.get_or_insert_with(
            &key,
            || Ok::<_, Infallible>((key, make())),
            |_, h| h.clone(),
        ) {
            Ok(h) => h,
            Err(never) => match never {},
        }
    }
}

/// A map for a few read-mostly entries whose lookups take no lock.
///
/// Entries live in a fixed table of `OnceLock` slots (open addressing,
/// linear probing, no removal): a lookup hashes the key and probes slots
/// with `OnceLock::get`, an acquire load, so readers on many threads share
/// the table's cache lines without writing to them. Inserts are rare and
/// serialised by a write lock; the table is filled to at most half its
/// slots, so a probe for an absent key soon meets an empty slot. Past that,
/// entries go to an overflow map behind the same `RwLock`, read only by
/// [`Self::get_spilled`] once anything spilled.
///
/// A lookup that races an insert may miss the new entry; callers then go
/// through [`Self::get_or_insert_with`], which looks again under the lock.
pub(crate) struct ReadMostly<K, V> {
    /// The table, allocated at the first insert: a chain builds several of
    /// these maps (one per metric family, per span operation) and many stay
    /// empty, e.g. the publish-side ones of a consume-only channel.
    slots: OnceLock<Table<K, V>>,
    /// The table's length (a power of two).
    len: usize,
    /// `64 - log2(slots.len())`: the table index is the hash's top bits
    /// (a multiplicative hash mixes its low bits least).
    shift: u32,
    spill: RwLock<Spill<K, V>>,
    spilled: AtomicBool,
}

/// The slots of a [`ReadMostly`], each filled at most once.
type Table<K, V> = Box<[OnceLock<Slot<K, V>>]>;

struct Slot<K, V> {
    hash: u64,
    key: K,
    value: V,
}

struct Spill<K, V> {
    map: FastMap<K, V>,
    /// Slots filled in the table.
    in_table: usize,
}

impl<K, V> fmt::Debug for ReadMostly<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let filled = self
            .slots
            .get()
            .map_or(0, |t| t.iter().filter(|s| s.get().is_some()).count());
        f.debug_struct("ReadMostly")
            .field("slots", &self.len)
            .field("filled", &filled)
            .field("spilled", &self.spilled.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl<K: Hash + Eq, V> ReadMostly<K, V> {
    /// An empty map with `slots` table slots (rounded up to a power of
    /// two, at least 2), of which half can be filled.
    pub(crate) fn with_slots(slots: usize) -> Self {
        let len = slots.max(2).next_power_of_two();
        ReadMostly {
            slots: OnceLock::new(),
            len,
            shift: 64 - len.trailing_zeros(),
            spill: RwLock::new(Spill {
                map: FastMap::default(),
                in_table: 0,
            }),
            spilled: AtomicBool::new(false),
        }
    }

    fn hash<Q: Hash + ?Sized>(key: &Q) -> u64 {
        BuildHasherDefault::<FastHasher>::default().hash_one(key)
    }

    /// The slots of `table` in the order a key of hash `hash` probes them:
    /// from the hash's top bits, once around.
    fn probe<'a>(
        &self,
        table: &'a Table<K, V>,
        hash: u64,
    ) -> impl Iterator<Item = &'a OnceLock<Slot<K, V>>> {
        let start = (hash >> self.shift) as usize;
        let (wrapped, first) = table.split_at(start.min(table.len()));
        first.iter().chain(wrapped)
    }

    /// The entry for `key` if it is in the table: no lock, no write.
    /// `None` if absent, being inserted, or in the overflow map.
    #[inline]
    pub(crate) fn get<Q>(&self, key: &Q) -> Option<(&K, &V)>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let hash = Self::hash(key);
        let table = self.slots.get()?;
        for slot in self.probe(table, hash) {
            let slot = slot.get()?;
            if slot.hash == hash && slot.key.borrow() == key {
                return Some((&slot.key, &slot.value));
            }
        }
        None
    }

    /// `f` on the entry for `key` in the overflow map (under its read
    /// lock), if anything ever spilled there.
    pub(crate) fn get_spilled<Q, R>(&self, key: &Q, f: impl FnOnce(&K, &V) -> R) -> Option<R>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if !self.spilled.load(Ordering::Acquire) {
            return None;
        }
        let spill = self.spill.read().unwrap_or_else(PoisonError::into_inner);
        spill.map.get_key_value(key).map(|(k, v)| f(k, v))
    }

    /// `found` on the entry for `key`, inserting the one `make` returns
    /// (its key must equal `key`) if there is none; `make`'s error if it
    /// declines. Both run under the write lock.
    pub(crate) fn get_or_insert_with<Q, R, E>(
        &self,
        key: &Q,
        make: impl FnOnce() -> Result<(K, V), E>,
        found: impl FnOnce(&K, &V) -> R,
    ) -> Result<R, E>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        // Table and map stay consistent at every step, so a panic in
        // `make` leaves nothing to repair: a poisoned lock is still used.
        let mut spill = self.spill.write().unwrap_or_else(PoisonError::into_inner);
        if let Some((k, v)) = self.get(key) {
            return Ok(found(k, v));
        }
        if let Some((k, v)) = spill.map.get_key_value(key) {
            return Ok(found(k, v));
        }
        let (k, v) = make()?;
        if spill.in_table < self.len / 2 {
            let table = self
                .slots
                .get_or_init(|| (0..self.len).map(|_| OnceLock::new()).collect());
            let hash = Self::hash(key);
            // Slots are filled only under the write lock held here, and the
            // table is at most half full: the first empty slot takes it.
            if let Some(slot) = self.probe(table, hash).find(|s| s.get().is_none()) {
                let s = slot.get_or_init(|| Slot {
                    hash,
                    key: k,
                    value: v,
                });
                spill.in_table += 1;
                return Ok(found(&s.key, &s.value));
            }
        }
        // The table is half full: the entry goes to the overflow map (where
        // `key` is absent, as looked up above).
        self.spilled.store(true, Ordering::Release);
        let entry = spill.map.entry(k).insert_entry(v);
        Ok(found(entry.key(), entry.get()))
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

    #[test]
    fn other_is_found_without_admitting_or_folding() {
        let g = LabelGuard::new("agent", 0);
        assert_eq!(g.id(OTHER), 0);
        assert_eq!(g.id("a"), 0);
        assert_eq!(g.id(OTHER), 0);
        assert_eq!(g.admitted(), 0);
        assert_eq!(g.folded(), 1);
    }

    #[test]
    fn values_past_the_table_spill_and_keep_their_ids() {
        // More than MAX_LABEL_SLOTS / 2 values: the rest go to the
        // overflow map, the cap still holds.
        let cap = MAX_LABEL_SLOTS;
        let g = LabelGuard::new("agent", cap);
        let ids: Vec<LabelId> = (0..cap).map(|i| g.id(&format!("v{i}"))).collect();
        assert_eq!(g.admitted(), cap);
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(*id as usize, i + 1);
            assert_eq!(g.id(&format!("v{i}")), *id);
            assert_eq!(&*g.value(*id), format!("v{i}"));
        }
        assert_eq!(g.id("one-more"), 0);
        assert_eq!(g.id("one-more"), 0);
        assert_eq!(g.folded(), 2);
        assert_eq!(g.id("v7"), ids[7]);
    }

    #[test]
    fn concurrent_admissions_agree_on_ids() {
        use std::collections::HashMap;
        let g = Arc::new(LabelGuard::new("agent", 100));
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let g = Arc::clone(&g);
                std::thread::spawn(move || {
                    let mut seen = HashMap::new();
                    for round in 0..3 {
                        for i in 0..160 {
                            // Each thread walks the values in its own order.
                            let v = format!("v{}", (i * 7 + t * 13 + round) % 160);
                            let id = g.id(&v);
                            assert_eq!(*seen.entry(v).or_insert(id), id);
                        }
                    }
                    seen
                })
            })
            .collect();
        let seen: Vec<HashMap<String, LabelId>> =
            threads.into_iter().filter_map(|t| t.join().ok()).collect();
        assert_eq!(seen.len(), 8);
        for s in &seen[1..] {
            assert_eq!(s, &seen[0]);
        }
        assert_eq!(g.admitted(), 100);
        let mut ids: Vec<LabelId> = seen[0].values().copied().filter(|&id| id != 0).collect();
        ids.sort_unstable();
        assert_eq!(ids, (1..=100).collect::<Vec<_>>());
        for (v, id) in &seen[0] {
            let expected = if *id == 0 { OTHER } else { v.as_str() };
            assert_eq!(&*g.value(*id), expected);
        }
        // 60 values folded, each looked up 3 times by 8 threads.
        assert_eq!(g.folded(), 60 * 3 * 8);
    }

    #[test]
    fn a_read_mostly_map_allocates_its_table_at_the_first_insert() {
        let m: ReadMostly<u32, u32> = ReadMostly::with_slots(HANDLE_SLOTS);
        assert_eq!(m.get(&1), None);
        assert!(m.slots.get().is_none());
        let r = m.get_or_insert_with(&1, || Ok::<_, Infallible>((1, 10)), |_, v| *v);
        assert_eq!(r, Ok(10));
        assert_eq!(m.slots.get().map(|t| t.len()), Some(HANDLE_SLOTS));
        assert_eq!(m.get(&1).map(|(_, v)| *v), Some(10));
        // A guard holds "other" from the start.
        assert!(LabelGuard::new("agent", 3).index.slots.get().is_some());
    }

    #[test]
    fn read_mostly_spills_past_half_its_slots() {
        let m: ReadMostly<u32, u32> = ReadMostly::with_slots(4);
        for k in 0..10 {
            let r = m.get_or_insert_with(&k, || Ok::<_, Infallible>((k, k * 10)), |_, v| *v);
            assert_eq!(r, Ok(k * 10));
        }
        let in_table = (0..10).filter(|k| m.get(k).is_some()).count();
        assert_eq!(in_table, 2);
        for k in 0..10 {
            let v = m.get(&k).map(|(_, v)| *v);
            let v = v.or_else(|| m.get_spilled(&k, |_, v| *v));
            assert_eq!(v, Some(k * 10));
            // Present already: `make` is not called again.
            let r = m.get_or_insert_with(&k, || Err("made twice"), |_, v| *v);
            assert_eq!(r, Ok(k * 10));
        }
        assert_eq!(m.get(&11), None);
        assert_eq!(m.get_spilled(&11, |_, v| *v), None);
        let r = m.get_or_insert_with(&11, || Err::<(u32, u32), _>("declined"), |_, v| *v);
        assert_eq!(r, Err("declined"));
        assert_eq!(m.get_spilled(&11, |_, v| *v), None);
    }

    #[test]
    fn handle_cache_past_its_table_makes_once_per_key() {
        let c: HandleCache<u32, u32> = HandleCache::default();
        let keys = HANDLE_SLOTS as u32 * 2;
        let mut made = 0;
        for _ in 0..3 {
            for k in 0..keys {
                let h = c.with(
                    k,
                    || {
                        made += 1;
                        k + 1
                    },
                    |h| *h,
                );
                assert_eq!(h, k + 1);
            }
        }
        assert_eq!(made, keys);
    }

    #[test]
    fn concurrent_handle_makes_happen_once_per_key() {
        let c: Arc<HandleCache<u32, u32>> = Arc::new(HandleCache::default());
        let made = Arc::new(AtomicU64::new(0));
        let keys = HANDLE_SLOTS as u32;
        let threads: Vec<_> = (0..6u32)
            .map(|t| {
                let (c, made) = (Arc::clone(&c), Arc::clone(&made));
                std::thread::spawn(move || {
                    for i in 0..keys * 4 {
                        let k = (i * 5 + t) % keys;
                        let make = || {
                            made.fetch_add(1, Ordering::Relaxed);
                            k * 3
                        };
                        assert_eq!(c.get(k, make), k * 3);
                    }
                })
            })
            .collect();
        for t in threads {
            assert!(t.join().is_ok());
        }
        assert_eq!(made.load(Ordering::Relaxed), u64::from(keys));
    }

    #[cfg(target_pointer_width = "64")]
    #[test]
    fn slot_sizes_match_the_docs() {
        use std::mem::size_of;
        assert_eq!(size_of::<OnceLock<Slot<Box<str>, LabelId>>>(), 40);
        assert_eq!(size_of::<OnceLock<Slot<&str, &str>>>(), 48);
        assert_eq!(size_of::<OnceLock<Slot<&str, ()>>>(), 32);
        let handles = size_of::<metrics::Counter>() + size_of::<metrics::Histogram>();
        assert!(size_of::<OnceLock<Slot<(LabelId, Option<LabelId>), [u8; 32]>>>() <= 64);
        assert_eq!(handles, 32);
    }
}
