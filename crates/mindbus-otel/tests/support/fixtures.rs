//! The MindBus fixtures of `testdata/mindbus` (copied from the protocol
//! notes) as messages: exchange, routing key, AMQP properties and body.
//!
//! Shared, with `#[path]`, by the crate's unit tests and its integration
//! tests.

use lapin::BasicProperties;
use lapin::types::ShortString;
use serde_json::Value;

/// The fixture names, one per MindBus message kind.
pub const NAMES: [&str; 5] = ["command", "result", "error", "event", "control"];

/// One fixture message.
#[derive(Debug, Clone)]
pub struct Fixture {
    /// The exchange it is published to (`""`: the default exchange).
    pub exchange: String,
    /// Its routing key.
    pub routing_key: String,
    /// Its AMQP properties (the string and integer ones of the fixture).
    pub properties: BasicProperties,
    /// Its body, as compact JSON bytes.
    pub body: Vec<u8>,
}

/// Reads fixture `name` (one of [`NAMES`]).
pub fn fixture(name: &str) -> Fixture {
    let path = format!(
        "{}/../../testdata/mindbus/{name}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let v: Value = serde_json::from_str(&text).expect("fixture is JSON");
    let text_of =
        |key: &str| -> Option<ShortString> { v["properties"][key].as_str().map(ShortString::from) };
    let mut properties = BasicProperties::default();
    if let Some(t) = text_of("content_type") {
        properties = properties.with_content_type(t);
    }
    if let Some(t) = text_of("expiration") {
        properties = properties.with_expiration(t);
    }
    if let Some(t) = text_of("reply_to") {
        properties = properties.with_reply_to(t);
    }
    if let Some(t) = text_of("correlation_id") {
        properties = properties.with_correlation_id(t);
    }
    if let Some(t) = text_of("message_id") {
        properties = properties.with_message_id(t);
    }
    if let Some(n) = v["properties"]["delivery_mode"].as_u64() {
        properties = properties.with_delivery_mode(n as u8);
    }
    if let Some(n) = v["properties"]["priority"].as_u64() {
        properties = properties.with_priority(n as u8);
    }
    Fixture {
        exchange: v["exchange"].as_str().expect("exchange").to_owned(),
        routing_key: v["routing_key"].as_str().expect("routing_key").to_owned(),
        properties,
        body: serde_json::to_vec(&v["body"]).expect("body"),
    }
}
