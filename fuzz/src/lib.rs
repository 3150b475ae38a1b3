//! Shared code of the fuzz targets: the input decoder of `header_carrier`
//! and the `serde_json::Value` reference of `envelope`.
//!
//! # `header_carrier` input format
//! A sequence of records, then optionally `0xff` followed by the body:
//!
//! ```text
//! record := tag:u8 key_len:u8 key:[u8; key_len] payload
//! ```
//!
//! `tag % 20` selects the AMQP type of the value and its payload:
//! 0 bool (1 byte), 1 i8, 2 u8, 3 i16, 4 u16, 5 i32, 6 u32, 7 i64,
//! 8 timestamp u64, 9 f32, 10 f64, 11 decimal (1 + 4 bytes),
//! 12 short string (`len:u8` bytes, lossy UTF-8), 13 long string
//! (`len:u16le` bytes, kept raw), 14 byte array (as 13), 15 void,
//! 16 field array (`count:u8` then values: `tag payload`, no key),
//! 17 field table (`count:u8` then records), 18 huge long string and
//! 19 huge byte array (`fill:u8 units:u16le prefix_len:u8 prefix`: the
//! prefix followed by `16 * units` fill bytes, up to 1 MiB). Missing bytes
//! read as zero; keys are lossy UTF-8 cut to 255 bytes. Nesting stops at
//! depth 4.
//!
//! `make_seeds.py` writes seeds in this format.

use mindbus_otel::lapin::types::{
    AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString, ShortString,
};

/// Reads bytes, yielding zeros past the end.
pub struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// A reader over `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Reader { data, pos: 0 }
    }

    fn is_empty(&self) -> bool {
        self.pos >= self.data.len()
    }

    fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        for b in &mut out {
            *b = self.u8();
        }
        out
    }

    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let start = self.pos.min(self.data.len());
        let end = (self.pos + n).min(self.data.len());
        self.pos += n;
        &self.data[start..end]
    }

    /// What is left.
    pub fn rest(&mut self) -> &'a [u8] {
        let start = self.pos.min(self.data.len());
        self.pos = self.data.len();
        &self.data[start..]
    }
}

fn short_string(bytes: &[u8]) -> ShortString {
    let mut s = String::from_utf8_lossy(bytes).into_owned();
    while s.len() > 255 {
        s.pop();
    }
    ShortString::try_new(s).unwrap_or_default()
}

fn huge(r: &mut Reader<'_>) -> Vec<u8> {
    let fill = r.u8();
    let units = u16::from_le_bytes(r.array()) as usize;
    let prefix_len = r.u8() as usize;
    let mut v = r.bytes(prefix_len).to_vec();
    v.resize(v.len() + 16 * units, fill);
    v
}

fn value(r: &mut Reader<'_>, tag: u8, depth: usize) -> AMQPValue {
    match tag % 20 {
        0 => AMQPValue::Boolean(r.u8() & 1 == 1),
        1 => AMQPValue::ShortShortInt(i8::from_le_bytes(r.array())),
        2 => AMQPValue::ShortShortUInt(r.u8()),
        3 => AMQPValue::ShortInt(i16::from_le_bytes(r.array())),
        4 => AMQPValue::ShortUInt(u16::from_le_bytes(r.array())),
        5 => AMQPValue::LongInt(i32::from_le_bytes(r.array())),
        6 => AMQPValue::LongUInt(u32::from_le_bytes(r.array())),
        7 => AMQPValue::LongLongInt(i64::from_le_bytes(r.array())),
        8 => AMQPValue::Timestamp(u64::from_le_bytes(r.array())),
        9 => AMQPValue::Float(f32::from_le_bytes(r.array())),
        10 => AMQPValue::Double(f64::from_le_bytes(r.array())),
        11 => AMQPValue::DecimalValue(DecimalValue {
            scale: r.u8(),
            value: u32::from_le_bytes(r.array()),
        }),
        12 => {
            let n = r.u8() as usize;
            AMQPValue::ShortString(short_string(r.bytes(n)))
        }
        13 | 14 => {
            let n = u16::from_le_bytes(r.array()) as usize;
            let b = r.bytes(n).to_vec();
            if tag % 20 == 13 {
                AMQPValue::LongString(LongString::from(b))
            } else {
                AMQPValue::ByteArray(ByteArray::from(b))
            }
        }
        16 if depth < 4 => {
            let n = r.u8() as usize;
            let mut a = FieldArray::default();
            for _ in 0..n {
                if r.is_empty() {
                    break;
                }
                let t = r.u8();
                a.push(value(r, t, depth + 1));
            }
            AMQPValue::FieldArray(a)
        }
        17 if depth < 4 => {
            let n = r.u8() as usize;
            AMQPValue::FieldTable(records(r, Some(n), depth + 1))
        }
        18 => AMQPValue::LongString(LongString::from(huge(r))),
        19 => AMQPValue::ByteArray(ByteArray::from(huge(r))),
        _ => AMQPValue::Void,
    }
}

fn records(r: &mut Reader<'_>, count: Option<usize>, depth: usize) -> FieldTable {
    let mut t = FieldTable::default();
    let mut i = 0;
    while count.is_none_or(|n| i < n) && !r.is_empty() {
        if count.is_none() && r.data.get(r.pos) == Some(&0xff) {
            r.pos += 1;
            break;
        }
        let tag = r.u8();
        let key_len = r.u8() as usize;
        let key = short_string(r.bytes(key_len));
        let v = value(r, tag, depth);
        t.insert(key, v);
        i += 1;
    }
    t
}

/// Decodes a fuzz input into headers (`None` when the input starts with
/// `0xff`: a message without headers) and a body.
pub fn decode(data: &[u8]) -> (Option<FieldTable>, Vec<u8>) {
    let mut r = Reader::new(data);
    if data.first() == Some(&0xff) {
        r.pos = 1;
        return (None, r.rest().to_vec());
    }
    let t = records(&mut r, None, 0);
    (Some(t), r.rest().to_vec())
}

#[path = "../../crates/mindbus-otel/tests/support/envelope_reference.rs"]
pub mod reference;
