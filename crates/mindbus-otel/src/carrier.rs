//! AMQP header tables as OpenTelemetry propagation carriers.
//!
//! Reading accepts the three AMQP types that can hold text: `LongString`
//! (`S`, what RabbitMQ clients write), `ShortString` (`s`, legal AMQP but
//! not carried by RabbitMQ) and `ByteArray` (`x`, what the .NET client
//! writes). Values that are not UTF-8, or of any other type, read as absent:
//! [`HeaderExtractor::lookup`] tells which, for counting. Names are matched
//! exactly first, then ASCII case-insensitively (W3C header names are
//! case-insensitive; AMQP table keys are not).
//!
//! Writing always produces `LongString` values and never writes an empty
//! value.
//!
//! # Bounded reads
//! Header values come from any client that can publish to the bus, so every
//! read that feeds a parser is capped: [`HeaderExtractor::lookup_capped`]
//! compares the value's length with a cap *before* looking at its bytes
//! (not even UTF-8 validation), so a 10 MiB value costs as much as a short
//! one. The [`Extractor`] implementation (what a configured
//! [`TextMapPropagator`](opentelemetry::propagation::TextMapPropagator)
//! reads through) reads values longer than [`MAX_HEADER_VALUE_LEN`] as
//! absent. Only [`HeaderExtractor::lookup`] reads a whole value; use it for
//! trusted headers only.

use crate::w3c::{MAX_BAGGAGE_LEN, RejectReason};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use opentelemetry::propagation::{Extractor, Injector};

/// What a header lookup found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderValue<'a> {
    /// No header by that name.
    Missing,
    /// A text value.
    Text(&'a str),
    /// A header that cannot be read as text (and why).
    Unreadable(RejectReason),
}

/// Longest header value that the [`Extractor`] implementation of
/// [`HeaderExtractor`] hands to a propagator: the longest W3C propagation
/// value ([`MAX_BAGGAGE_LEN`], 8192 bytes). Longer values read as absent.
pub const MAX_HEADER_VALUE_LEN: usize = MAX_BAGGAGE_LEN;

/// Reads text values from an AMQP header table.
#[derive(Clone, Copy, Debug)]
pub struct HeaderExtractor<'a>(pub Option<&'a FieldTable>);

impl<'a> HeaderExtractor<'a> {
    /// Wraps a header table (`None`: a message without headers).
    pub fn new(headers: Option<&'a FieldTable>) -> Self {
        HeaderExtractor(headers)
    }

    fn raw(&self, key: &str) -> Option<&'a AMQPValue> {
        let table = self.0?.inner();
        table.get(key).or_else(|| {
            table
                .iter()
                .find(|(k, _)| k.as_str().eq_ignore_ascii_case(key))
                .map(|(_, v)| v)
        })
    }

    /// Looks a header up, telling a missing header from an unreadable one.
    ///
    /// Reads (UTF-8 validates) the whole value, however long: for headers
    /// from untrusted producers use [`lookup_capped`](Self::lookup_capped).
    pub fn lookup(&self, key: &str) -> HeaderValue<'a> {
        match self.raw(key) {
            None => HeaderValue::Missing,
            Some(value) => match value_text(value) {
                Ok(s) => HeaderValue::Text(s),
                Err(reason) => HeaderValue::Unreadable(reason),
            },
        }
    }

    /// Looks a header up, reading at most `max_len` bytes of it: a text
    /// value longer than that is `Unreadable(too_long)` without its bytes
    /// being looked at, so the cost does not depend on the value's length.
    pub fn lookup_capped(
        &self,
        key: &str,
        max_len: usize,
        too_long: RejectReason,
    ) -> HeaderValue<'a> {
        Found(self.raw(key)).capped(max_len, too_long)
    }

    /// True when a header by that name (exact, else ASCII
    /// case-insensitive) exists, whatever its type and length.
    pub fn contains(&self, key: &str) -> bool {
        self.raw(key).is_some()
    }

    /// Looks several headers up in one pass over the table, with the same
    /// rule as [`lookup`](Self::lookup) (an exact name first, else the
    /// first ASCII case-insensitive one). Cheaper than one lookup per name
    /// when names are missing: each miss would scan the whole table.
    pub fn find_all<const N: usize>(&self, keys: [&str; N]) -> [Found<'a>; N] {
        let mut exact: [Option<&'a AMQPValue>; N] = [None; N];
        let mut folded: [Option<&'a AMQPValue>; N] = [None; N];
        if let Some(table) = self.0 {
            for (k, v) in table.inner() {
                let k = k.as_str();
                for (i, key) in keys.iter().enumerate() {
                    if k.len() != key.len() {
                        continue;
                    }
                    if k == *key {
                        exact[i] = Some(v);
                    } else if folded[i].is_none() && k.eq_ignore_ascii_case(key) {
                        folded[i] = Some(v);
                    }
                }
            }
        }
        std::array::from_fn(|i| Found(exact[i].or(folded[i])))
    }
}

/// A header found by [`HeaderExtractor::find_all`] (or not).
#[derive(Clone, Copy, Debug)]
pub struct Found<'a>(Option<&'a AMQPValue>);

impl<'a> Found<'a> {
    /// True when the header exists, whatever its type and length.
    pub fn exists(&self) -> bool {
        self.0.is_some()
    }

    /// Its text, as [`HeaderExtractor::lookup_capped`] reads it.
    pub fn capped(&self, max_len: usize, too_long: RejectReason) -> HeaderValue<'a> {
        match self.0 {
            None => HeaderValue::Missing,
            Some(value) => match value_text_capped(value, max_len, too_long) {
                Ok(s) => HeaderValue::Text(s),
                Err(reason) => HeaderValue::Unreadable(reason),
            },
        }
    }
}

/// The text of an AMQP value, if it holds UTF-8 text.
pub fn value_text(value: &AMQPValue) -> Result<&str, RejectReason> {
    let bytes = match value {
        AMQPValue::LongString(s) => s.as_bytes(),
        AMQPValue::ShortString(s) => return Ok(s.as_str()),
        AMQPValue::ByteArray(b) => b.as_slice(),
        _ => return Err(RejectReason::WrongType),
    };
    std::str::from_utf8(bytes).map_err(|_| RejectReason::NotUtf8)
}

/// The text of an AMQP value, if it holds UTF-8 text of at most `max_len`
/// bytes: a type that cannot hold text is `WrongType`; a longer text value
/// is `Err(too_long)` without its bytes being read (O(1) whatever its
/// length); then UTF-8 is checked (`NotUtf8`).
pub fn value_text_capped(
    value: &AMQPValue,
    max_len: usize,
    too_long: RejectReason,
) -> Result<&str, RejectReason> {
    let bytes = match value {
        AMQPValue::LongString(s) => s.as_bytes(),
        AMQPValue::ShortString(s) => s.as_str().as_bytes(),
        AMQPValue::ByteArray(b) => b.as_slice(),
        _ => return Err(RejectReason::WrongType),
    };
    if bytes.len() > max_len {
        return Err(too_long);
    }
    std::str::from_utf8(bytes).map_err(|_| RejectReason::NotUtf8)
}

/// Values longer than [`MAX_HEADER_VALUE_LEN`] read as absent (never
/// UTF-8-validated), so a propagator never parses more than that.
impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match self.lookup_capped(key, MAX_HEADER_VALUE_LEN, RejectReason::Oversized) {
            HeaderValue::Text(s) => Some(s),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .map(|t| t.inner().keys().map(ShortString::as_str).collect())
            .unwrap_or_default()
    }
}

/// Writes `LongString` values into a header table, skipping empty values.
#[derive(Debug)]
pub struct HeaderInjector<'a>(pub &'a mut FieldTable);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if value.is_empty() {
            return;
        }
        // Header names come from propagators (short ASCII names); a name
        // that is not a valid short string is skipped, never a panic.
        if let Ok(key) = ShortString::try_new(key) {
            self.0
                .insert(key, AMQPValue::LongString(LongString::from(value)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::ByteArray;

    fn table(entries: Vec<(&str, AMQPValue)>) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in entries {
            t.insert(k.into(), v);
        }
        t
    }

    #[test]
    fn reads_the_three_text_types() {
        let t = table(vec![
            ("a", AMQPValue::LongString("long".into())),
            ("b", AMQPValue::ShortString("short".into())),
            (
                "c",
                AMQPValue::ByteArray(ByteArray::from(b"bytes".to_vec())),
            ),
        ]);
        let x = HeaderExtractor::new(Some(&t));
        assert_eq!(x.get("a"), Some("long"));
        assert_eq!(x.get("b"), Some("short"));
        assert_eq!(x.get("c"), Some("bytes"));
        let mut keys = x.keys();
        keys.sort_unstable();
        assert_eq!(keys, vec!["a", "b", "c"]);
    }

    #[test]
    fn unreadable_values_say_why() {
        let t = table(vec![
            ("n", AMQPValue::LongLongInt(7)),
            (
                "bad",
                AMQPValue::LongString(LongString::from(vec![0xff, 0xfe])),
            ),
            ("nested", AMQPValue::FieldTable(FieldTable::default())),
        ]);
        let x = HeaderExtractor::new(Some(&t));
        assert_eq!(
            x.lookup("n"),
            HeaderValue::Unreadable(RejectReason::WrongType)
        );
        assert_eq!(
            x.lookup("bad"),
            HeaderValue::Unreadable(RejectReason::NotUtf8)
        );
        assert_eq!(
            x.lookup("nested"),
            HeaderValue::Unreadable(RejectReason::WrongType)
        );
        assert_eq!(x.lookup("none"), HeaderValue::Missing);
        assert_eq!(x.get("n"), None);
        assert_eq!(HeaderExtractor::new(None).lookup("n"), HeaderValue::Missing);
    }

    #[test]
    fn names_match_case_insensitively_after_exact() {
        let t = table(vec![
            ("Traceparent", AMQPValue::LongString("upper".into())),
            ("traceparent", AMQPValue::LongString("exact".into())),
            ("TraceState", AMQPValue::LongString("mixed".into())),
        ]);
        let x = HeaderExtractor::new(Some(&t));
        assert_eq!(x.get("traceparent"), Some("exact"));
        assert_eq!(x.get("tracestate"), Some("mixed"));
    }

    /// `find_all` answers every name exactly as one lookup per name does,
    /// whatever the order, case, types and repeats of the table's keys.
    #[test]
    fn one_pass_lookup_agrees_with_lookups_one_by_one() {
        let names = ["traceparent", "tracestate", "baggage"];
        let keys = [
            "traceparent",
            "Traceparent",
            "TRACEPARENT",
            "tracestate",
            "TraceState",
            "baggage",
            "BAGGAGE",
            "bagage",
            "x-other",
        ];
        // Every subset of the keys, with values telling them apart and
        // one of them of a type that cannot hold text.
        for mask in 0u32..(1 << keys.len()) {
            let entries: Vec<(&str, AMQPValue)> = keys
                .iter()
                .enumerate()
                .filter(|(i, _)| mask >> i & 1 == 1)
                .map(|(i, k)| {
                    let v = if i == 4 {
                        AMQPValue::LongLongInt(4)
                    } else {
                        AMQPValue::LongString(format!("v{i}").into())
                    };
                    (*k, v)
                })
                .collect();
            let t = table(entries);
            let x = HeaderExtractor::new(Some(&t));
            let found = x.find_all(names);
            for (name, f) in names.iter().zip(found) {
                let too_long = RejectReason::Oversized;
                assert_eq!(
                    f.capped(64, too_long),
                    x.lookup_capped(name, 64, too_long),
                    "{name} in {mask:b}"
                );
                assert_eq!(f.exists(), x.contains(name), "{name} in {mask:b}");
            }
        }
        let none = HeaderExtractor::new(None).find_all(names);
        assert!(none.iter().all(|f| !f.exists()));
    }

    #[test]
    fn injector_writes_long_strings_and_skips_empty() {
        let mut t = table(vec![("user", AMQPValue::LongLongInt(1))]);
        let mut inj = HeaderInjector(&mut t);
        inj.set("traceparent", "v".into());
        inj.set("tracestate", String::new());
        inj.set(&"k".repeat(300), "too long a name".into());
        assert_eq!(
            t.inner().get("traceparent"),
            Some(&AMQPValue::LongString("v".into()))
        );
        assert!(!t.contains_key("tracestate"));
        assert_eq!(t.inner().len(), 2);
        assert_eq!(t.inner().get("user"), Some(&AMQPValue::LongLongInt(1)));
    }

    #[test]
    fn capped_lookups_check_the_length_before_the_bytes() {
        let mut huge = vec![b'a'; 10 * 1024 * 1024];
        huge[0] = 0xff; // not UTF-8: a full read would say NotUtf8
        let t = table(vec![
            ("big", AMQPValue::LongString(LongString::from(huge.clone()))),
            ("bytes", AMQPValue::ByteArray(ByteArray::from(huge))),
            ("short", AMQPValue::ShortString("abc".into())),
            ("n", AMQPValue::LongLongInt(7)),
            ("bad", AMQPValue::LongString(LongString::from(vec![0xff]))),
        ]);
        let x = HeaderExtractor::new(Some(&t));
        let too_long = RejectReason::BaggageOversized;
        for key in ["big", "bytes", "BIG"] {
            assert_eq!(
                x.lookup_capped(key, 8192, too_long),
                HeaderValue::Unreadable(too_long),
                "{key}"
            );
        }
        assert_eq!(
            x.lookup("big"),
            HeaderValue::Unreadable(RejectReason::NotUtf8)
        );
        assert_eq!(
            x.lookup_capped("short", 3, too_long),
            HeaderValue::Text("abc")
        );
        assert_eq!(
            x.lookup_capped("short", 2, too_long),
            HeaderValue::Unreadable(too_long)
        );
        assert_eq!(
            x.lookup_capped("n", 0, too_long),
            HeaderValue::Unreadable(RejectReason::WrongType)
        );
        assert_eq!(
            x.lookup_capped("bad", 10, too_long),
            HeaderValue::Unreadable(RejectReason::NotUtf8)
        );
        assert_eq!(x.lookup_capped("none", 10, too_long), HeaderValue::Missing);
        assert!(x.contains("big") && x.contains("N") && !x.contains("none"));
        // What a propagator reads is capped too.
        assert_eq!(x.get("big"), None);
        let ok = "v".repeat(MAX_HEADER_VALUE_LEN);
        let t = table(vec![
            ("ok", AMQPValue::LongString(ok.clone().into())),
            ("over", AMQPValue::LongString(format!("{ok}v").into())),
        ]);
        let x = HeaderExtractor::new(Some(&t));
        assert_eq!(x.get("ok"), Some(ok.as_str()));
        assert_eq!(x.get("over"), None);
    }
}
