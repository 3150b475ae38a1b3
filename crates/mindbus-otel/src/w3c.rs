//! W3C Trace Context (`traceparent`, `tracestate`) and W3C Baggage, parsed
//! strictly and bounded, with a reason for every rejection.
//!
//! The OpenTelemetry SDK propagators return the parent context when a value
//! is invalid, which is right, but they cannot say *why*; we count rejections
//! by reason, so we parse ourselves.
//!
//! # Limits
//! Every inbound value is first compared with a length cap (before any other
//! work), then split and counted, then checked against the grammar, so the
//! cost of a value is bounded by its cap, not by its length.
//!
//! | value | limit | over the limit |
//! |---|---|---|
//! | `traceparent` | [`MAX_TRACEPARENT_LEN`] = 256 bytes (version 00 is 55) | rejected, [`RejectReason::Oversized`] |
//! | `tracestate` raw header | [`MAX_TRACESTATE_HEADER_LEN`] = 1024 bytes (with OWS and empty members) | dropped, [`RejectReason::TracestateOversized`] |
//! | `tracestate` list members | [`MAX_TRACESTATE_MEMBERS`] = 32 | dropped, `TracestateOversized` |
//! | `tracestate` combined length | [`MAX_TRACESTATE_LEN`] = 512 characters, members joined by `,`, OWS not counted | dropped, `TracestateOversized` |
//! | `tracestate` key / value | 256 / 256 characters (W3C grammar) | dropped, `TracestateMalformed` |
//! | `baggage` header | [`MAX_BAGGAGE_LEN`] = 8192 bytes | dropped, [`RejectReason::BaggageOversized`] |
//! | `baggage` list members | [`MAX_BAGGAGE_MEMBERS`] = 180 | dropped, `BaggageOversized` |
//! | `baggage` entries kept | [`MAX_BAGGAGE_KEPT_MEMBERS`] = 64 distinct keys (what the OpenTelemetry `Baggage` holds) | the first 64 kept, the others dropped and counted, [`RejectReason::BaggageTruncated`] |
//!
//! A rejected `tracestate` or `baggage` never invalidates the `traceparent`.
//!
//! `tracestate` follows the current W3C text (the editor's draft and the
//! w3c/trace-context test suite) where it differs from Level 1: a key may
//! start with a digit and hold `@` anywhere after its first character
//! (Level 1 had one `@` and at most 14 characters after it), and a key
//! repeated in a list is inherited once (the first member; Level 1 made
//! the list invalid). Keys that the OpenTelemetry API's `TraceState` still
//! refuses (`foo@@bar`, `a@b@c`, 15 characters after `@`) are kept beside
//! it ([`ParsedTracestate::members`]) and written out again for the same
//! trace ([`format_tracestate_inherited`]). A member that breaks the
//! grammar still drops the whole value, as the test suite expects.
//! The W3C Baggage specification requires every member to be propagated
//! only up to 64 members and 8192 bytes and lets a platform drop members
//! beyond that; the OpenTelemetry API's `Baggage` silently keeps 64 entries,
//! so [`parse_baggage_counted`] keeps the first 64 distinct keys (in header
//! order) and reports how many members it dropped.
//!
//! Outbound, [`format_tracestate_limited`] and [`format_baggage_limited`]
//! never write a value over these limits nor a member that does not follow
//! the grammar: they drop members (and say how many) instead.

use opentelemetry::baggage::Baggage;
use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
use std::fmt::Write as _;

/// Header (and CloudEvents attribute) name of the W3C trace parent.
pub const TRACEPARENT: &str = "traceparent";
/// Header (and CloudEvents attribute) name of the W3C trace state.
pub const TRACESTATE: &str = "tracestate";
/// Header name of W3C Baggage.
pub const BAGGAGE: &str = "baggage";

/// Longest `traceparent` we read (version 00 is 55 characters; later
/// versions may append fields).
pub const MAX_TRACEPARENT_LEN: usize = 256;
/// W3C Trace Context: at most 32 list members in `tracestate`.
pub const MAX_TRACESTATE_MEMBERS: usize = 32;
/// W3C Trace Context: vendors must propagate at least 512 characters of
/// `tracestate` (list members joined by commas, optional white space not
/// counted) and may discard a longer one; we discard it (inbound) or
/// truncate it the W3C way (outbound).
pub const MAX_TRACESTATE_LEN: usize = 512;
/// Longest raw `tracestate` header value we look at, optional white space
/// and empty list members included: a longer value is rejected as
/// oversized before it is split.
pub const MAX_TRACESTATE_HEADER_LEN: usize = 1024;
/// W3C Trace Context: outbound truncation removes members longer than this
/// first, then members from the end.
pub const TRACESTATE_TRUNCATE_FIRST_LEN: usize = 128;
/// W3C Baggage: at most 180 list members (the grammar's limit).
pub const MAX_BAGGAGE_MEMBERS: usize = 180;
/// W3C Baggage: at most 8192 bytes.
pub const MAX_BAGGAGE_LEN: usize = 8192;
/// Entries the OpenTelemetry API's `Baggage` holds (`MAX_KEY_VALUE_PAIRS`
/// in opentelemetry 0.33), and the W3C Baggage "must propagate" member
/// count. Members beyond it are dropped and counted.
pub const MAX_BAGGAGE_KEPT_MEMBERS: usize = 64;

/// Why an inbound trace-context value was not used (or not used whole).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RejectReason {
    /// `traceparent` does not follow the W3C format (or has zero ids).
    Malformed,
    /// `traceparent` longer than [`MAX_TRACEPARENT_LEN`].
    Oversized,
    /// A header value that is not valid UTF-8.
    NotUtf8,
    /// A header of an AMQP type that cannot hold text (a number, a table...).
    WrongType,
    /// `tracestate` that does not follow the W3C format: dropped, the
    /// `traceparent` is still used.
    TracestateMalformed,
    /// `tracestate` over the W3C limits: dropped.
    TracestateOversized,
    /// `baggage` that does not follow the W3C format: dropped.
    BaggageMalformed,
    /// `baggage` over the W3C limits: dropped.
    BaggageOversized,
    /// `baggage` with more distinct keys than the
    /// [`MAX_BAGGAGE_KEPT_MEMBERS`] (64) that the OpenTelemetry API holds:
    /// the first 64 are used, the others dropped (counted one by one in
    /// [`PropagationStats::baggage_members_dropped`](crate::PropagationStats::baggage_members_dropped)).
    BaggageTruncated,
}

impl RejectReason {
    /// Every reason, in a stable order.
    pub const ALL: [RejectReason; 9] = [
        RejectReason::Malformed,
        RejectReason::Oversized,
        RejectReason::NotUtf8,
        RejectReason::WrongType,
        RejectReason::TracestateMalformed,
        RejectReason::TracestateOversized,
        RejectReason::BaggageMalformed,
        RejectReason::BaggageOversized,
        RejectReason::BaggageTruncated,
    ];

    /// The label used in metrics and logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            RejectReason::Malformed => "malformed",
            RejectReason::Oversized => "oversized",
            RejectReason::NotUtf8 => "not_utf8",
            RejectReason::WrongType => "wrong_type",
            RejectReason::TracestateMalformed => "tracestate_malformed",
            RejectReason::TracestateOversized => "tracestate_oversized",
            RejectReason::BaggageMalformed => "baggage_malformed",
            RejectReason::BaggageOversized => "baggage_oversized",
            RejectReason::BaggageTruncated => "baggage_truncated",
        }
    }

    pub(crate) const fn index(self) -> usize {
        self as usize
    }
}
/// Lowercase hex digit values; `0x80` marks every other byte (W3C trace
/// context ids are lowercase only).
const HEX_VALUE: [u8; 256] = {
    let mut table = [0x80u8; 256];
    let mut i = 0;
    while i < 10 {
        table[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        table[b'a' as usize + i] = 10 + i as u8;
        i += 1;
    }
    table
};

/// `N` bytes from `2N` lowercase hex digits. Branch-free per digit: the
/// invalid marks are or-ed together and checked once.
fn parse_hex<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    if s.len() != N * 2 {
        return None;
    }
    let mut out = [0u8; N];
    let mut bad = 0u8;
    for (o, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
        let (hi, lo) = (
            HEX_VALUE[usize::from(pair[0])],
            HEX_VALUE[usize::from(pair[1])],
        );
        bad |= hi | lo;
        *o = (hi << 4) | lo;
    }
    (bad & 0x80 == 0).then_some(out)
}

/// Parses a `traceparent` value into a remote [`SpanContext`] (without
/// trace state). Accepts any flags value; only the sampled bit is kept.
pub fn parse_traceparent(value: &str) -> Result<SpanContext, RejectReason> {
    if value.len() > MAX_TRACEPARENT_LEN {
        return Err(RejectReason::Oversized);
    }
    let b = value.trim().as_bytes();
    if b.len() < 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return Err(RejectReason::Malformed);
    }
    let version = parse_hex::<1>(&b[0..2]).ok_or(RejectReason::Malformed)?[0];
    // Version ff is invalid; version 00 has exactly 55 characters; a later
    // version may append fields after a dash.
    if version == 0xff || (version == 0 && b.len() != 55) || (b.len() > 55 && b[55] != b'-') {
        return Err(RejectReason::Malformed);
    }
    let trace_id = parse_hex::<16>(&b[3..35]).ok_or(RejectReason::Malformed)?;
    let span_id = parse_hex::<8>(&b[36..52]).ok_or(RejectReason::Malformed)?;
    let flags = parse_hex::<1>(&b[53..55]).ok_or(RejectReason::Malformed)?[0];
    let trace_id = TraceId::from_bytes(trace_id);
    let span_id = SpanId::from_bytes(span_id);
    if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
        return Err(RejectReason::Malformed);
    }
    Ok(SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags) & TraceFlags::SAMPLED,
        true,
        TraceState::NONE,
    ))
}

/// Formats a valid span context as a version-00 `traceparent`.
pub fn format_traceparent(cx: &SpanContext) -> String {
    // Written byte by byte: `core::fmt` with `{:032x}` costs about ten
    // times as much, on every publish.
    let mut out = *b"00-00000000000000000000000000000000-0000000000000000-00";
    let flags = cx.trace_flags().to_u8() & TraceFlags::SAMPLED.to_u8();
    hex_into(&mut out[3..35], &cx.trace_id().to_bytes());
    hex_into(&mut out[36..52], &cx.span_id().to_bytes());
    hex_into(&mut out[53..], &[flags]);
    // All ASCII: the conversion cannot fail.
    String::from_utf8(out.to_vec()).unwrap_or_default()
}

/// Lowercase hex digits of `bytes`, two per byte, into `out`.
fn hex_into(out: &mut [u8], bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = HEX[usize::from(b >> 4)];
        pair[1] = HEX[usize::from(b & 0xf)];
    }
}

/// Optional white space of the W3C list grammars: spaces and tabs.
fn trim_ows(s: &str) -> &str {
    s.trim_matches([' ', '\t'])
}

/// The non-empty list members of a comma-separated header value.
fn list_members(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(trim_ows).filter(|m| !m.is_empty())
}

/// A `tracestate` key character after the first: `lcalpha / DIGIT / "_"
/// / "-" / "*" / "/" / "@"`.
fn ts_key_char(c: u8) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'-' | b'*' | b'/' | b'@')
}

/// W3C Trace Context `key`, as the current text has it (the editor's
/// draft and the w3c/trace-context test suite): a lowercase letter or
/// digit, then up to 255 of lowercase letters, digits, `_`, `-`, `*`, `/`
/// and `@`. Level 1's `tenant@system` form (one `@`, at most 14 characters
/// after it) is one case of it; keys such as `foo@` or `a@b@c` are valid
/// now too, and only a key that starts with `@` (or another character
/// outside the grammar) is not.
fn is_tracestate_key(key: &str) -> bool {
    let b = key.as_bytes();
    matches!(b.first(), Some(c) if c.is_ascii_lowercase() || c.is_ascii_digit())
        && b.len() <= 256
        && b[1..].iter().all(|&c| ts_key_char(c))
}

/// W3C Trace Context `value`: 1 to 256 printable ASCII characters except
/// `,` and `=`, spaces allowed but not last.
fn is_tracestate_value(value: &str) -> bool {
    let nblk = |c: u8| matches!(c, 0x21..=0x2B | 0x2D..=0x3C | 0x3E..=0x7E);
    let b = value.as_bytes();
    b.len() <= 256
        && b.iter().all(|&c| c == b' ' || nblk(c))
        && matches!(b.last(), Some(&c) if nblk(c))
}

/// Whether the OpenTelemetry API's `TraceState` takes a key the W3C
/// grammar allows: it still checks keys with `@` against Level 1's
/// `tenant@system` form (only those can be refused).
fn api_holds_key(key: &str) -> bool {
    !key.contains('@') || TraceState::from_key_value([(key, "x")]).is_ok()
}

/// A `tracestate` value as inherited: see [`parse_tracestate_counted`].
#[derive(Debug, Clone, Default)]
pub struct ParsedTracestate {
    /// The members the OpenTelemetry `TraceState` holds, in header order.
    pub state: TraceState,
    /// Members with a key seen earlier in the list, discarded: the first
    /// of each key is kept (the specification makes unique keys the
    /// sender's duty and lets a receiver keep or discard duplicates).
    pub duplicates: usize,
    /// When some member is valid but the OpenTelemetry API's `TraceState`
    /// refuses it (it still checks keys against Level 1's `tenant@system`
    /// form: `foo@`, `a@b@c`, or more than 14 characters after `@`), every
    /// inherited member in header order, those included; else empty.
    pub members: Vec<(String, String)>,
}

impl ParsedTracestate {
    /// Members the `TraceState` could not hold (kept in
    /// [`members`](Self::members)).
    pub fn unrepresentable(&self) -> usize {
        self.members
            .len()
            .saturating_sub((&self.state).into_iter().len())
    }
}

/// Parses a `tracestate` value within the W3C limits (see the
/// [module docs](self)).
///
/// Empty and white-space-only list members are allowed and skipped. Size
/// is checked first (raw length, then member count and combined length:
/// [`RejectReason::TracestateOversized`]), then the grammar: every member
/// `key=value` with a valid key and value
/// ([`RejectReason::TracestateMalformed`]); a value that breaks the
/// grammar is dropped whole, as the W3C test suite expects (it sends
/// `foo=,bar=3` and `@foo=1,bar=2` and expects nothing inherited). A key
/// repeated later in the list is not an error: the first member of each
/// key is inherited, the others discarded and counted.
pub fn parse_tracestate_counted(value: &str) -> Result<ParsedTracestate, RejectReason> {
    if value.len() > MAX_TRACESTATE_HEADER_LEN {
        return Err(RejectReason::TracestateOversized);
    }
    let (mut count, mut combined) = (0usize, 0usize);
    for m in list_members(value) {
        count += 1;
        combined += m.len();
    }
    combined += count.saturating_sub(1);
    if count > MAX_TRACESTATE_MEMBERS || combined > MAX_TRACESTATE_LEN {
        return Err(RejectReason::TracestateOversized);
    }
    let mut parsed = ParsedTracestate::default();
    if count == 0 {
        return Ok(parsed);
    }
    let mut pairs: Vec<(&str, &str)> = Vec::with_capacity(count);
    for m in list_members(value) {
        let (k, v) = m.split_once('=').ok_or(RejectReason::TracestateMalformed)?;
        if !is_tracestate_key(k) || !is_tracestate_value(v) {
            return Err(RejectReason::TracestateMalformed);
        }
        if pairs.iter().any(|(pk, _)| *pk == k) {
            parsed.duplicates += 1;
        } else {
            pairs.push((k, v));
        }
    }
    if pairs.iter().all(|(k, _)| api_holds_key(k)) {
        parsed.state =
            TraceState::from_key_value(pairs).map_err(|_| RejectReason::TracestateMalformed)?;
        return Ok(parsed);
    }
    parsed.members = pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    parsed.state = TraceState::from_key_value(pairs.into_iter().filter(|(k, _)| api_holds_key(k)))
        .map_err(|_| RejectReason::TracestateMalformed)?;
    Ok(parsed)
}

/// [`parse_tracestate_counted`]'s trace state alone.
pub fn parse_tracestate(value: &str) -> Result<TraceState, RejectReason> {
    parse_tracestate_counted(value).map(|p| p.state)
}

/// Formats a trace state as a `tracestate` header value within the W3C
/// limits, and says how many members it left out.
///
/// Members that do not follow the W3C grammar (the OpenTelemetry API is
/// laxer: it accepts e.g. non-ASCII values) and members past the 32nd are
/// left out. When the rest is longer than [`MAX_TRACESTATE_LEN`], members
/// longer than [`TRACESTATE_TRUNCATE_FIRST_LEN`] are removed first, from
/// the end, then members from the end, as the specification recommends.
pub fn format_tracestate_limited(ts: &TraceState) -> (String, usize) {
    format_members_limited(ts)
}

/// [`format_tracestate_limited`] for a trace state that inherited members
/// the OpenTelemetry `TraceState` could not hold (`inherited`, every
/// inherited member in header order: [`ParsedTracestate::members`]).
/// Unchanged since (it holds exactly the inherited members it could), the
/// inherited list goes on as it came; changed (a member added, updated or
/// deleted through the API), its members go first, in its order, then the
/// inherited members it could not hold.
pub fn format_tracestate_inherited(
    ts: &TraceState,
    inherited: &[(String, String)],
) -> (String, usize) {
    let held = inherited.iter().filter(|(k, _)| api_holds_key(k));
    let unchanged = ts
        .into_iter()
        .eq(held.map(|(k, v)| (k.as_str(), v.as_str())));
    if unchanged {
        return format_members_limited(inherited.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    }
    let rest = inherited
        .iter()
        .filter(|(k, _)| !api_holds_key(k))
        .map(|(k, v)| (k.as_str(), v.as_str()));
    format_members_limited(ts.into_iter().chain(rest))
}

fn format_members_limited<'a>(
    list: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> (String, usize) {
    let mut dropped = 0;
    let mut members: Vec<(&str, &str)> = Vec::new();
    for (k, v) in list {
        let ok = is_tracestate_key(k)
            && is_tracestate_value(v)
            && members.len() < MAX_TRACESTATE_MEMBERS
            && !members.iter().any(|(pk, _)| *pk == k);
        if ok {
            members.push((k, v));
        } else {
            dropped += 1;
        }
    }
    let member_len = |(k, v): &(&str, &str)| k.len() + 1 + v.len();
    let mut total = members.iter().map(member_len).sum::<usize>() + members.len().saturating_sub(1);
    let mut i = members.len();
    while total > MAX_TRACESTATE_LEN && i > 0 {
        i -= 1;
        let len = member_len(&members[i]);
        if len > TRACESTATE_TRUNCATE_FIRST_LEN {
            members.remove(i);
            total -= len + usize::from(!members.is_empty());
            dropped += 1;
        }
    }
    while total > MAX_TRACESTATE_LEN {
        let Some(last) = members.pop() else { break };
        total -= member_len(&last) + usize::from(!members.is_empty());
        dropped += 1;
    }
    let mut out = String::with_capacity(total);
    for (k, v) in &members {
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(k);
        out.push('=');
        out.push_str(v);
    }
    (out, dropped)
}

/// Decodes `%XX` escapes; `None` for a `%` not followed by two hex digits.
/// Decoded bytes that are not UTF-8 become U+FFFD, as W3C Baggage requires.
fn percent_decode(s: &str) -> Option<String> {
    if !s.contains('%') {
        return Some(s.to_owned());
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hi = b.get(i + 1).copied().and_then(hex_val_any)?;
            let lo = b.get(i + 2).copied().and_then(hex_val_any)?;
            out.push((hi << 4) | lo);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(match String::from_utf8(out) {
        Ok(s) => s,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    })
}

fn hex_val_any(b: u8) -> Option<u8> {
    let v = HEX_VALUE[usize::from(b.to_ascii_lowercase())];
    (v & 0x80 == 0).then_some(v)
}

/// An RFC 7230 `token` (what W3C Baggage keys are).
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c))
}

/// W3C Baggage `baggage-octet`: printable ASCII except `"`, `,`, `;`, `\`.
fn is_baggage_octet(c: u8) -> bool {
    matches!(c, 0x21 | 0x23..=0x2B | 0x2D..=0x3A | 0x3C..=0x5B | 0x5D..=0x7E)
}

/// Validates `;`-separated W3C Baggage properties (`key` or
/// `key=value`, values not decoded) and returns them normalised (no white
/// space, empty properties skipped), or `None` when one is malformed.
fn normalise_properties(props: &str) -> Option<String> {
    let mut out = String::new();
    for p in props.split(';').map(trim_ows).filter(|p| !p.is_empty()) {
        let (k, v) = match p.split_once('=') {
            Some((k, v)) => (trim_ows(k), Some(trim_ows(v))),
            None => (p, None),
        };
        if !is_token(k) || !v.is_none_or(|v| v.bytes().all(is_baggage_octet)) {
            return None;
        }
        if !out.is_empty() {
            out.push(';');
        }
        out.push_str(k);
        if let Some(v) = v {
            out.push('=');
            out.push_str(v);
        }
    }
    Some(out)
}

/// A parsed `baggage` header and how many of its members were not kept.
#[derive(Debug, Default)]
pub struct ParsedBaggage {
    /// The entries kept: the first [`MAX_BAGGAGE_KEPT_MEMBERS`] distinct
    /// keys, in header order (a repeated key: the last value wins).
    pub baggage: Baggage,
    /// List members dropped because the `Baggage` was full.
    pub dropped: usize,
}

/// Parses a `baggage` value within the W3C limits and says how many
/// members did not fit in the OpenTelemetry `Baggage` (see the
/// [module docs](self)).
///
/// Size is checked first: more than [`MAX_BAGGAGE_LEN`] bytes or
/// [`MAX_BAGGAGE_MEMBERS`] members is [`RejectReason::BaggageOversized`].
/// Then every member must be `key=value` with optional `;`-separated
/// properties: key an RFC 7230 token, value made of W3C `baggage-octet`s
/// with valid `%XX` escapes, else [`RejectReason::BaggageMalformed`] and
/// the whole value is dropped. Empty list members are skipped. Escapes
/// that decode to invalid UTF-8 become U+FFFD.
pub fn parse_baggage_counted(value: &str) -> Result<ParsedBaggage, RejectReason> {
    if value.len() > MAX_BAGGAGE_LEN {
        return Err(RejectReason::BaggageOversized);
    }
    if list_members(value).nth(MAX_BAGGAGE_MEMBERS).is_some() {
        return Err(RejectReason::BaggageOversized);
    }
    let mut parsed = ParsedBaggage::default();
    for member in list_members(value) {
        let (kv, props) = match member.split_once(';') {
            Some((kv, props)) => (kv, Some(props)),
            None => (member, None),
        };
        let (k, v) = kv.split_once('=').ok_or(RejectReason::BaggageMalformed)?;
        let (k, v) = (trim_ows(k), trim_ows(v));
        if !is_token(k) || !v.bytes().all(is_baggage_octet) {
            return Err(RejectReason::BaggageMalformed);
        }
        let v = percent_decode(v).ok_or(RejectReason::BaggageMalformed)?;
        let meta = match props {
            Some(p) => normalise_properties(p).ok_or(RejectReason::BaggageMalformed)?,
            None => String::new(),
        };
        let baggage = &mut parsed.baggage;
        let is_new = baggage.get(k).is_none();
        if is_new && baggage.len() >= MAX_BAGGAGE_KEPT_MEMBERS {
            parsed.dropped += 1;
            continue;
        }
        let before = baggage.len();
        baggage.insert_with_metadata(k.to_owned(), v, meta);
        // The API refuses silently (e.g. its own byte limit): count it.
        if is_new && baggage.len() == before {
            parsed.dropped += 1;
        }
    }
    Ok(parsed)
}

/// Parses a `baggage` value within the W3C limits: see
/// [`parse_baggage_counted`], which also says how many members past the
/// 64th were dropped.
pub fn parse_baggage(value: &str) -> Result<Baggage, RejectReason> {
    parse_baggage_counted(value).map(|p| p.baggage)
}

fn percent_encode_into(out: &mut String, s: &str) {
    for b in s.bytes() {
        // baggage-octet minus '%' (which we encode) per W3C Baggage.
        if is_baggage_octet(b) && b != b'%' {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
}

/// Formats baggage as a W3C `baggage` header value (empty when empty),
/// without limits: see [`format_baggage_limited`] for what is sent.
pub fn format_baggage(baggage: &Baggage) -> String {
    let mut out = String::new();
    for (k, (v, meta)) in baggage {
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(k.as_str());
        out.push('=');
        percent_encode_into(&mut out, v.as_str());
        if !meta.as_str().is_empty() {
            out.push(';');
            out.push_str(meta.as_str());
        }
    }
    out
}

/// Formats baggage as a W3C `baggage` header value within the W3C limits
/// (at most [`MAX_BAGGAGE_MEMBERS`] members and [`MAX_BAGGAGE_LEN`] bytes),
/// members sorted, and says how many members it left out.
///
/// Values are percent-encoded; a member whose key is not a token or whose
/// metadata does not follow the property grammar is left out; when the
/// members do not all fit, those that do not fit (in sorted order) are
/// left out.
pub fn format_baggage_limited(baggage: &Baggage) -> (String, usize) {
    let mut dropped = 0;
    let mut members: Vec<String> = Vec::with_capacity(baggage.len());
    for (k, (v, meta)) in baggage {
        let meta = match meta.as_str() {
            "" => Some(String::new()),
            m => normalise_properties(m),
        };
        let (true, Some(meta)) = (is_token(k.as_str()), meta) else {
            dropped += 1;
            continue;
        };
        let mut m = String::with_capacity(k.as_str().len() + 1 + v.as_str().len());
        m.push_str(k.as_str());
        m.push('=');
        percent_encode_into(&mut m, v.as_str());
        if !meta.is_empty() {
            m.push(';');
            m.push_str(&meta);
        }
        members.push(m);
    }
    members.sort_unstable();
    let mut out = String::new();
    let mut kept = 0;
    for m in members {
        let extra = m.len() + usize::from(kept > 0);
        if kept == MAX_BAGGAGE_MEMBERS || out.len() + extra > MAX_BAGGAGE_LEN {
            dropped += 1;
            continue;
        }
        if kept > 0 {
            out.push(',');
        }
        out.push_str(&m);
        kept += 1;
    }
    (out, dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparent_round_trips() {
        let cx = parse_traceparent(TP).expect("valid");
        assert!(cx.is_remote() && cx.is_sampled());
        assert_eq!(format_traceparent(&cx), TP);
        // Same as the `core::fmt` rendering, for ids across the byte range.
        for seed in 0u128..300 {
            let t = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835) | 1;
            let s = (t >> 64) as u64 | 1;
            for flags in [
                TraceFlags::default(),
                TraceFlags::SAMPLED,
                TraceFlags::new(0xff),
            ] {
                let cx = SpanContext::new(
                    TraceId::from(t),
                    SpanId::from(s),
                    flags,
                    true,
                    TraceState::NONE,
                );
                let expected = format!(
                    "00-{:032x}-{:016x}-{:02x}",
                    t,
                    s,
                    flags.to_u8() & TraceFlags::SAMPLED.to_u8()
                );
                assert_eq!(format_traceparent(&cx), expected);
            }
        }
    }

    #[test]
    fn traceparent_accepts_level2_flags_and_future_versions() {
        let cx = parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-03")
            .expect("flags 03");
        assert!(cx.is_sampled());
        assert_eq!(cx.trace_flags(), TraceFlags::SAMPLED);
        let future = format!("cc{}-extra", &TP[2..]);
        assert!(parse_traceparent(&future).is_ok());
        let unsampled = parse_traceparent(&TP.replace("-01", "-00")).expect("unsampled");
        assert!(!unsampled.is_sampled());
    }

    #[test]
    fn traceparent_rejections_have_reasons() {
        use RejectReason::*;
        let cases: &[(&str, RejectReason)] = &[
            ("", Malformed),
            ("garbage", Malformed),
            (&TP.to_uppercase(), Malformed),
            (
                "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                Malformed,
            ),
            (
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                Malformed,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                Malformed,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
                Malformed,
            ),
            (
                "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                Malformed,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
                Malformed,
            ),
        ];
        for (input, reason) in cases {
            assert_eq!(parse_traceparent(input).err(), Some(*reason), "{input:?}");
        }
        assert_eq!(parse_traceparent(&"0".repeat(65536)).err(), Some(Oversized));
        // Multi-byte characters at the positions of the dashes must not panic.
        assert!(parse_traceparent(&"é".repeat(40)).is_err());
    }

    #[test]
    fn tracestate_limits() {
        let ts = parse_tracestate("congo=t61rcWkgMzE, rojo=00f067aa0ba902b7").expect("valid");
        assert_eq!(ts.get("rojo"), Some("00f067aa0ba902b7"));
        let many = (0..33)
            .map(|i| format!("k{i}=v"))
            .collect::<Vec<_>>()
            .join(",");
        assert_eq!(
            parse_tracestate(&many).err(),
            Some(RejectReason::TracestateOversized)
        );
        let long = format!("k={}", "v".repeat(600));
        assert_eq!(
            parse_tracestate(&long).err(),
            Some(RejectReason::TracestateOversized)
        );
        assert_eq!(
            parse_tracestate("novalue").err(),
            Some(RejectReason::TracestateMalformed)
        );
        assert_eq!(parse_tracestate(" , ").ok(), Some(TraceState::NONE));
    }

    #[test]
    fn baggage_round_trips_with_encoding() {
        let b = parse_baggage("userId=alice%20b,tenant=acme;prop=1").expect("valid");
        assert_eq!(b.get("userId").map(|v| v.as_str()), Some("alice b"));
        assert_eq!(b.get("tenant").map(|v| v.as_str()), Some("acme"));
        let again = parse_baggage(&format_baggage(&b)).expect("re-parse");
        assert_eq!(again.get("userId").map(|v| v.as_str()), Some("alice b"));
        assert_eq!(
            parse_baggage("=x").err(),
            Some(RejectReason::BaggageMalformed)
        );
        assert_eq!(
            parse_baggage("k=%zz").err(),
            Some(RejectReason::BaggageMalformed)
        );
        let huge = format!("k={}", "v".repeat(9000));
        assert_eq!(
            parse_baggage(&huge).err(),
            Some(RejectReason::BaggageOversized)
        );
        let many = (0..181)
            .map(|i| format!("k{i}=v"))
            .collect::<Vec<_>>()
            .join(",");
        assert_eq!(
            parse_baggage(&many).err(),
            Some(RejectReason::BaggageOversized)
        );
    }

    #[test]
    fn tracestate_grammar_follows_the_spec() {
        use RejectReason::*;
        let ok = [
            "a=1",
            "a=1,b=2",
            "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7",
            " a=1 ,\t, b=2 ",
            "tenant1@vendor=x",
            "0tenant@v=x",
            "a_-*/9=x y",
            "k=!\"#$%&'()*+-./:;<>?@[]^_`{|}~",
            // The current text: a digit first, `@` anywhere after the first
            // character; a repeated key is inherited once.
            "1digit=1",
            "t@=x",
            "t@v@w=x",
            "t@abcdefghijklmno=x",
            "k=v ,k=w",
        ];
        for v in ok {
            assert!(parse_tracestate(v).is_ok(), "{v:?}");
        }
        let malformed = [
            "novalue",
            "Upper=1",
            "k=",
            "k=a=b",
            "k =v",
            "k=v\u{e9}",
            "k=v\u{7f}",
            "k=tab\tinside",
            "@v=x",
            "t@V=x",
            "foo.bar=1",
        ];
        for v in malformed {
            assert_eq!(
                parse_tracestate(v).err(),
                Some(TracestateMalformed),
                "{v:?}"
            );
        }
        assert!(parse_tracestate(&format!("{}=v", "k".repeat(256))).is_ok());
        // Keys and values have their own 256-character limits, below 512.
        let v257 = format!("k={}", "v".repeat(257));
        assert_eq!(parse_tracestate(&v257).err(), Some(TracestateMalformed));
        let ts = parse_tracestate("b=2, a=1").expect("valid");
        assert_eq!(ts.header(), "b=2,a=1", "order kept, white space dropped");
    }

    /// The `test_tracestate_*` cases of the w3c/trace-context test suite
    /// (test/test.py, default strictness): what each input inherits, as
    /// the list of members the next hop receives.
    #[test]
    fn the_w3c_suite_tracestate_cases() {
        let inherited = |value: &str| -> Option<Vec<(String, String)>> {
            let parsed = parse_tracestate_counted(value).ok()?;
            Some(if parsed.members.is_empty() {
                (&parsed.state)
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect()
            } else {
                parsed.members
            })
        };
        let list = |pairs: &[(&str, &str)]| {
            Some(
                pairs
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect::<Vec<_>>(),
            )
        };
        let (t241, t242) = ("t".repeat(241), "t".repeat(242));
        let (vendor14, z256) = (format!("{t241}@{}", "v".repeat(14)), "z".repeat(256));
        let (at_v, v15) = (format!("{t242}@v"), format!("t@{}", "v".repeat(15)));
        type Members = Vec<(String, String)>;
        let cases: Vec<(String, Option<Members>)> = vec![
            // test_tracestate_duplicated_keys: inherited, one of each.
            ("foo=1,foo=1".into(), list(&[("foo", "1")])),
            ("foo=1,foo=2".into(), list(&[("foo", "1")])),
            // test_tracestate_key_illegal_vendor_format.
            ("foo@=1,bar=2".into(), list(&[("foo@", "1"), ("bar", "2")])),
            ("@foo=1,bar=2".into(), None),
            (
                "foo@@bar=1,bar=2".into(),
                list(&[("foo@@bar", "1"), ("bar", "2")]),
            ),
            (
                "foo@bar@baz=1,bar=2".into(),
                list(&[("foo@bar@baz", "1"), ("bar", "2")]),
            ),
            // test_tracestate_key_length_limit.
            (
                format!("foo=1,{z256}=1"),
                list(&[("foo", "1"), (z256.as_str(), "1")]),
            ),
            (format!("foo=1,{}=1", "z".repeat(257)), None),
            (
                format!("foo=1,{vendor14}=1"),
                list(&[("foo", "1"), (vendor14.as_str(), "1")]),
            ),
            (
                format!("foo=1,{at_v}=1"),
                list(&[("foo", "1"), (at_v.as_str(), "1")]),
            ),
            (
                format!("foo=1,{v15}=1"),
                list(&[("foo", "1"), (v15.as_str(), "1")]),
            ),
            // test_tracestate_key_illegal_characters.
            ("foo =1".into(), None),
            ("FOO=1".into(), None),
            ("foo.bar=1".into(), None),
            // test_tracestate_value_illegal_characters.
            ("foo=bar=baz".into(), None),
            ("foo=,bar=3".into(), None),
            // test_tracestate_ows_handling.
            (
                "foo=1 \t , \t bar=2, \t baz=3".into(),
                list(&[("foo", "1"), ("bar", "2"), ("baz", "3")]),
            ),
            ("\t foo=1 \t".into(), list(&[("foo", "1")])),
            // test_tracestate_empty_header and test_tracestate_multiple_headers_different_keys
            // (RFC 9110 joins the fields with commas).
            ("".into(), list(&[])),
            (
                "foo=1,bar=2,rojo=1,congo=2,baz=3".into(),
                list(&[
                    ("foo", "1"),
                    ("bar", "2"),
                    ("rojo", "1"),
                    ("congo", "2"),
                    ("baz", "3"),
                ]),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(inherited(&input), want, "{input:?}");
        }
        let p = parse_tracestate_counted("foo=1,foo=2,bar@@baz=3").expect("inherited");
        assert_eq!((p.duplicates, p.unrepresentable()), (1, 1));
    }

    #[test]
    fn tracestate_size_is_checked_first_and_ows_does_not_count() {
        use RejectReason::*;
        let members = |n: usize, sep: &str| {
            (0..n)
                .map(|i| format!("k{i:02}=v"))
                .collect::<Vec<_>>()
                .join(sep)
        };
        assert!(parse_tracestate(&members(32, ",")).is_ok());
        assert_eq!(
            parse_tracestate(&members(33, ",")).err(),
            Some(TracestateOversized)
        );
        // Exactly 512 combined characters, then 513.
        let at = |n: usize| {
            let (x, y, z) = ("x".repeat(250), "y".repeat(250), "z".repeat(n - 508));
            format!("a={x},b={y},c={z}")
        };
        assert_eq!(at(512).len(), 512);
        assert!(parse_tracestate(&at(512)).is_ok());
        assert_eq!(parse_tracestate(&at(513)).err(), Some(TracestateOversized));
        // White space around members is not counted: 505 combined, 536 raw.
        let spaced = format!("a={}, b={}", "x".repeat(250), "y".repeat(250));
        let spaced = format!("{spaced}{}", ", ".repeat(15));
        assert!(spaced.len() > MAX_TRACESTATE_LEN);
        assert!(parse_tracestate(&spaced).is_ok());
        // The raw cap applies before anything, whatever the content.
        let padded = format!("a=1{}", " ".repeat(MAX_TRACESTATE_HEADER_LEN));
        assert_eq!(parse_tracestate(&padded).err(), Some(TracestateOversized));
        let junk = "\u{e9}".repeat(MAX_TRACESTATE_HEADER_LEN);
        assert_eq!(parse_tracestate(&junk).err(), Some(TracestateOversized));
        // Oversized wins over malformed (size is checked first).
        let both = format!("{},NOT VALID", members(32, ","));
        assert_eq!(parse_tracestate(&both).err(), Some(TracestateOversized));
    }

    #[test]
    fn tracestate_outbound_is_truncated_the_w3c_way() {
        // The API accepts values our grammar does not (non-ASCII, empty).
        let ts = TraceState::from_key_value([("a", "1"), ("bad", "\u{e9}"), ("c", "3")])
            .expect("the API accepts it");
        assert_eq!(format_tracestate_limited(&ts), ("a=1,c=3".to_owned(), 1));
        // Over 512: entries longer than 128 go first (from the end), then
        // entries from the end.
        let big = "x".repeat(200);
        let ts = TraceState::from_key_value([
            ("a", big.as_str()),
            ("b", "1"),
            ("c", big.as_str()),
            ("d", big.as_str()),
            ("e", "2"),
        ])
        .expect("valid");
        let (out, dropped) = format_tracestate_limited(&ts);
        assert_eq!(dropped, 1);
        assert_eq!(out, format!("a={big},b=1,c={big},e=2"));
        assert!(out.len() <= MAX_TRACESTATE_LEN);
        let small = "y".repeat(100);
        let kvs: Vec<(String, String)> = (0..6).map(|i| (format!("k{i}"), small.clone())).collect();
        let ts = TraceState::from_key_value(kvs).expect("valid");
        let (out, dropped) = format_tracestate_limited(&ts);
        assert_eq!(dropped, 2, "{out}");
        assert!(out.starts_with("k0=") && out.contains("k3=") && !out.contains("k4="));
        assert!(out.len() <= MAX_TRACESTATE_LEN);
        // Whatever was kept parses back.
        assert!(parse_tracestate(&out).is_ok());
        assert_eq!(
            format_tracestate_limited(&TraceState::NONE),
            (String::new(), 0)
        );
    }

    #[test]
    fn baggage_past_64_members_keeps_the_first_64_and_counts_the_rest() {
        let members = |n: usize| {
            (0..n)
                .map(|i| format!("k{i}=v{i}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        for (n, dropped) in [(64, 0), (65, 1), (100, 36), (180, 116)] {
            let p = parse_baggage_counted(&members(n)).expect("within 180");
            assert_eq!(p.baggage.len(), n.min(MAX_BAGGAGE_KEPT_MEMBERS), "{n}");
            assert_eq!(p.dropped, dropped, "{n}");
            // The first 64 in header order are the ones kept.
            assert_eq!(p.baggage.get("k63").map(|v| v.as_str()), Some("v63"));
            assert!(p.baggage.get("k64").is_none());
        }
        assert_eq!(
            parse_baggage_counted(&members(181)).err(),
            Some(RejectReason::BaggageOversized)
        );
        // A repeated key replaces its value (last wins) and takes no slot.
        let p = parse_baggage_counted(&format!("{},k0=again", members(64))).expect("valid");
        assert_eq!((p.baggage.len(), p.dropped), (64, 0));
        assert_eq!(p.baggage.get("k0").map(|v| v.as_str()), Some("again"));
        // Exactly 8192 bytes is accepted, 8193 is not.
        let v = format!("k={}", "v".repeat(MAX_BAGGAGE_LEN - 2));
        assert!(parse_baggage(&v).is_ok());
        assert_eq!(
            parse_baggage(&format!("{v}v")).err(),
            Some(RejectReason::BaggageOversized)
        );
    }

    #[test]
    fn baggage_grammar_is_strict() {
        use RejectReason::BaggageMalformed;
        let b = parse_baggage(" a = 1 ;p1; p2 = x ,b=%E2%82%AC, c=, d%25=%zz%").err();
        assert_eq!(b, Some(BaggageMalformed), "%zz is not an escape");
        let b = parse_baggage(" a = 1 ;p1; p2 = x ,b=%E2%82%AC, c=,d%25=ok").expect("valid");
        assert_eq!(b.get("a").map(|v| v.as_str()), Some("1"));
        let (_, meta) = b.get_with_metadata("a").expect("a");
        assert_eq!(meta.as_str(), "p1;p2=x");
        assert_eq!(b.get("b").map(|v| v.as_str()), Some("\u{20ac}"));
        assert_eq!(b.get("c").map(|v| v.as_str()), Some(""));
        assert_eq!(
            b.get("d%25").map(|v| v.as_str()),
            Some("ok"),
            "% is a token char, keys are not decoded"
        );
        // Escapes that are not UTF-8 become U+FFFD (W3C Baggage).
        let b = parse_baggage("k=%FF%C3").expect("valid");
        assert_eq!(b.get("k").map(|v| v.as_str()), Some("\u{fffd}\u{fffd}"));
        for bad in [
            "k=a b",
            "k=\"q\"",
            "k=back\\slash",
            "k=\u{e9}",
            "k=v;p=\u{e9}",
            "k=v;(p)",
            "k(=v",
            "k",
            "k=v\n",
        ] {
            assert_eq!(parse_baggage(bad).err(), Some(BaggageMalformed), "{bad:?}");
        }
    }

    #[test]
    fn baggage_outbound_stays_within_limits() {
        use opentelemetry::KeyValue;
        let b = Baggage::from_iter([KeyValue::new("b", "x y"), KeyValue::new("a", "1%,;")]);
        assert_eq!(
            format_baggage_limited(&b),
            ("a=1%25%2C%3B,b=x%20y".to_owned(), 0)
        );
        // Metadata that does not follow the grammar is never written.
        let mut b = Baggage::new();
        b.insert_with_metadata("ok", "1", "p=1");
        b.insert_with_metadata("bad", "2", "p=\u{e9}");
        assert_eq!(format_baggage_limited(&b), ("ok=1;p=1".to_owned(), 1));
        // Percent-encoding can triple a value: what does not fit is left out.
        let mut b = Baggage::new();
        for k in ["a", "b", "c", "d"] {
            b.insert(k, " ".repeat(1000));
        }
        let (out, dropped) = format_baggage_limited(&b);
        assert!(out.len() <= MAX_BAGGAGE_LEN, "{}", out.len());
        assert_eq!(dropped, 2);
        assert!(out.starts_with("a=%20") && out.contains(",b=%20"));
        let parsed = parse_baggage(&out).expect("what is sent parses back");
        assert_eq!(parsed.get("a").map(|v| v.as_str().len()), Some(1000));
    }
}
