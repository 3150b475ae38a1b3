//! W3C Trace Context (`traceparent`, `tracestate`) and W3C Baggage, parsed
//! strictly and bounded, with a reason for every rejection.
//!
//! The OpenTelemetry SDK propagators return the parent context when a value
//! is invalid, which is right, but they cannot say *why*; we count rejections
//! by reason, so we parse ourselves. Limits follow the specifications:
//! `tracestate` at most [`MAX_TRACESTATE_MEMBERS`] members and
//! [`MAX_TRACESTATE_LEN`] characters, `baggage` at most
//! [`MAX_BAGGAGE_MEMBERS`] members and [`MAX_BAGGAGE_LEN`] bytes.

use opentelemetry::baggage::{Baggage, BaggageMetadata};
use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
use opentelemetry::{Key, StringValue};
use std::fmt::Write as _;
use std::str::FromStr;

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
/// W3C Trace Context: `tracestate` values longer than 512 characters may be
/// discarded; we discard them.
pub const MAX_TRACESTATE_LEN: usize = 512;
/// W3C Baggage: at most 180 list members.
pub const MAX_BAGGAGE_MEMBERS: usize = 180;
/// W3C Baggage: at most 8192 bytes.
pub const MAX_BAGGAGE_LEN: usize = 8192;

/// Why an inbound trace-context value was not used.
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
}

impl RejectReason {
    /// Every reason, in a stable order.
    pub const ALL: [RejectReason; 8] = [
        RejectReason::Malformed,
        RejectReason::Oversized,
        RejectReason::NotUtf8,
        RejectReason::WrongType,
        RejectReason::TracestateMalformed,
        RejectReason::TracestateOversized,
        RejectReason::BaggageMalformed,
        RejectReason::BaggageOversized,
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
        }
    }

    pub(crate) const fn index(self) -> usize {
        self as usize
    }
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

fn parse_hex<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    if s.len() != N * 2 {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        out[i] = (hex_val(pair[0])? << 4) | hex_val(pair[1])?;
    }
    Some(out)
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
    let mut s = String::with_capacity(55);
    let _ = write!(
        s,
        "00-{}-{}-{:02x}",
        cx.trace_id(),
        cx.span_id(),
        cx.trace_flags().to_u8() & TraceFlags::SAMPLED.to_u8()
    );
    s
}

/// Parses a `tracestate` value within the W3C limits.
pub fn parse_tracestate(value: &str) -> Result<TraceState, RejectReason> {
    if value.len() > MAX_TRACESTATE_LEN {
        return Err(RejectReason::TracestateOversized);
    }
    let members = value.split(',').filter(|m| !m.trim().is_empty()).count();
    if members > MAX_TRACESTATE_MEMBERS {
        return Err(RejectReason::TracestateOversized);
    }
    if members == 0 {
        return Ok(TraceState::NONE);
    }
    // Every member must be key=value; the API validates keys and values.
    let normalised: Vec<&str> = value
        .split(',')
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .collect();
    if normalised.iter().any(|m| !m.contains('=')) {
        return Err(RejectReason::TracestateMalformed);
    }
    TraceState::from_str(&normalised.join(",")).map_err(|_| RejectReason::TracestateMalformed)
}

fn percent_decode(s: &str) -> Option<String> {
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
    String::from_utf8(out).ok()
}

fn hex_val_any(b: u8) -> Option<u8> {
    hex_val(b.to_ascii_lowercase())
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"!#$&'*+-.^_`|~".contains(&c))
}

/// Parses a `baggage` value within the W3C limits.
pub fn parse_baggage(value: &str) -> Result<Baggage, RejectReason> {
    if value.len() > MAX_BAGGAGE_LEN {
        return Err(RejectReason::BaggageOversized);
    }
    let mut entries: Vec<(Key, (StringValue, BaggageMetadata))> = Vec::new();
    for member in value.split(',') {
        let member = member.trim();
        if member.is_empty() {
            continue;
        }
        if entries.len() == MAX_BAGGAGE_MEMBERS {
            return Err(RejectReason::BaggageOversized);
        }
        let (kv, props) = match member.split_once(';') {
            Some((kv, props)) => (kv, props.trim()),
            None => (member, ""),
        };
        let (k, v) = kv.split_once('=').ok_or(RejectReason::BaggageMalformed)?;
        let k = k.trim();
        if !is_token(k) {
            return Err(RejectReason::BaggageMalformed);
        }
        let v = percent_decode(v.trim()).ok_or(RejectReason::BaggageMalformed)?;
        entries.push((
            Key::new(k.to_owned()),
            (StringValue::from(v), BaggageMetadata::from(props)),
        ));
    }
    Ok(entries.into_iter().collect())
}

fn percent_encode_into(out: &mut String, s: &str) {
    for b in s.bytes() {
        // baggage-octet minus '%' (which we encode) per W3C Baggage.
        if b.is_ascii_graphic() && !matches!(b, b'"' | b',' | b';' | b'\\' | b'%') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
}

/// Formats baggage as a W3C `baggage` header value (empty when empty).
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

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparent_round_trips() {
        let cx = parse_traceparent(TP).expect("valid");
        assert!(cx.is_remote() && cx.is_sampled());
        assert_eq!(format_traceparent(&cx), TP);
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
}
