//! RabbitMQ destinations as the OpenTelemetry messaging conventions name
//! them (v1.44.0, `docs/messaging/rabbitmq.md`), and their low-cardinality
//! templates.
//!
//! | side | `messaging.destination.name` | `messaging.destination.template` |
//! |---|---|---|
//! | send | `{exchange}:{routing key}`; one of them if the other is empty; `amq.default` if both are | `{exchange}:{routing key template}` |
//! | receive, process | `{exchange}:{routing key}:{queue}`, empty parts left out, the routing key left out when it equals the queue | `{exchange}:{routing key template}:{queue}` |
//!
//! A MindBus routing key (`type.topic.action`: `cmd.writer.any`,
//! `evt.task.completed`, `ctl.all.stop`) holds agent ids in its last word,
//! so its template keeps the first two words: `cmd.writer.*`. On the
//! default exchange the routing key is a queue name, and is kept. Any
//! other routing key is left out of the template (nothing guarantees it is
//! low-cardinality, and the conventions forbid using a name as template
//! unless it is), as are server-named and direct reply-to queues
//! (`amq.gen-*`, `amq.rabbitmq.reply-to*`). A destination with nothing
//! left has no template.
//!
//! ```
//! use mindbus_otel::destination::Destination;
//!
//! let sent = Destination::send("mindbus.main", "cmd.writer.any");
//! assert_eq!(sent.name(), "mindbus.main:cmd.writer.any");
//! assert_eq!(sent.template().as_deref(), Some("mindbus.main:cmd.writer.*"));
//!
//! let got = Destination::receive("mindbus.main", "cmd.writer.any", "agent.writer");
//! assert_eq!(got.name(), "mindbus.main:cmd.writer.any:agent.writer");
//! assert_eq!(got.template().as_deref(), Some("mindbus.main:cmd.writer.*:agent.writer"));
//!
//! // A reply on the default exchange to a server-named queue.
//! let reply = Destination::receive("", "amq.gen-3x9", "amq.gen-3x9");
//! assert_eq!(reply.name(), "amq.gen-3x9");
//! assert!(reply.is_temporary() && reply.template().is_none());
//! ```

use crate::semconv::is_temporary_queue;
use std::cell::RefCell;

/// The destination name of a publish to the default exchange with an
/// empty routing key.
pub const DEFAULT_EXCHANGE: &str = "amq.default";

/// The first words of MindBus routing keys (`type.topic.action`).
const MINDBUS_TYPES: [&str; 3] = ["cmd", "evt", "ctl"];

/// Where a message went (send) or came from (receive, process).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Destination<'a> {
    exchange: &'a str,
    routing_key: &'a str,
    /// The queue, on the receiving side.
    queue: Option<&'a str>,
}

impl<'a> Destination<'a> {
    /// A publish to `exchange` with `routing_key`.
    pub fn send(exchange: &'a str, routing_key: &'a str) -> Self {
        Destination {
            exchange,
            routing_key,
            queue: None,
        }
    }

    /// A delivery from `queue`, published to `exchange` with `routing_key`.
    pub fn receive(exchange: &'a str, routing_key: &'a str, queue: &'a str) -> Self {
        Destination {
            exchange,
            routing_key,
            queue: Some(queue),
        }
    }

    /// Whether the destination is a server-named or direct reply-to queue:
    /// the queue a delivery came from, or the queue a publish to the
    /// default exchange addresses.
    pub fn is_temporary(&self) -> bool {
        match self.queue {
            Some(queue) => is_temporary_queue(queue),
            None => self.exchange.is_empty() && is_temporary_queue(self.routing_key),
        }
    }

    /// `messaging.destination.name`.
    pub fn name(&self) -> String {
        let mut out = String::new();
        self.write_name(&mut out);
        out
    }

    /// `messaging.destination.template`, if anything low-cardinality is
    /// left (see the [module docs](self)).
    pub fn template(&self) -> Option<String> {
        let mut out = String::new();
        self.write_template(&mut out).then_some(out)
    }

    /// The parts of the name, empty ones and a routing key equal to the
    /// queue left out.
    fn name_parts(&self) -> [&'a str; 3] {
        let queue = self.queue.unwrap_or("");
        let routing_key = if self.routing_key == queue {
            ""
        } else {
            self.routing_key
        };
        [self.exchange, routing_key, queue]
    }

    /// Appends `messaging.destination.name` to `out`.
    pub(crate) fn write_name(&self, out: &mut String) {
        let [exchange, routing_key, queue] = self.name_parts();
        if !join(out, [(exchange, ""), (routing_key, ""), (queue, "")]) {
            out.push_str(DEFAULT_EXCHANGE);
        }
    }

    /// Appends `messaging.destination.template` to `out`; false (and
    /// nothing appended) if there is none.
    pub(crate) fn write_template(&self, out: &mut String) -> bool {
        let [exchange, routing_key, queue] = self.name_parts();
        if self.queue.is_none() && exchange.is_empty() && routing_key.is_empty() {
            out.push_str(DEFAULT_EXCHANGE);
            return true;
        }
        let queue = if is_temporary_queue(queue) { "" } else { queue };
        let routing_key = routing_key_template(routing_key, exchange.is_empty());
        join(out, [(exchange, ""), routing_key, (queue, "")])
    }
}

impl<'a> Destination<'a> {
    /// Exchange, routing key and (receiving) queue.
    pub(crate) fn parts(&self) -> (&'a str, &'a str, Option<&'a str>) {
        (self.exchange, self.routing_key, self.queue)
    }

    /// A hash of the parts, for caches keyed by destination.
    pub(crate) fn hash(&self) -> u64 {
        use std::hash::{BuildHasher, BuildHasherDefault};
        BuildHasherDefault::<crate::labels::FastHasher>::default().hash_one((
            self.exchange,
            self.routing_key,
            self.queue,
        ))
    }
}

impl Destination<'_> {
    /// Whether the template is the name itself (so the name is known to be
    /// low-cardinality), without building either.
    pub(crate) fn template_is_name(&self) -> bool {
        let [exchange, routing_key, queue] = self.name_parts();
        if is_temporary_queue(queue) {
            return false;
        }
        let (prefix, suffix) = routing_key_template(routing_key, exchange.is_empty());
        let key_kept = prefix.len() + suffix.len() == routing_key.len()
            && routing_key.starts_with(prefix)
            && routing_key.ends_with(suffix);
        key_kept
            && !(exchange.is_empty()
                && routing_key.is_empty()
                && queue.is_empty()
                && self.queue.is_some())
    }
}

/// The template of a routing key, as a prefix of it and a suffix to add.
/// (Byte scans: this runs for every message, and `str::find` with a char
/// pattern cost five times as much here.)
fn routing_key_template(key: &str, default_exchange: bool) -> (&str, &'static str) {
    if key.is_empty() || is_temporary_queue(key) {
        return ("", "");
    }
    let bytes = key.as_bytes();
    if let Some((first, rest)) = bytes.split_at_checked(4)
        && first[3] == b'.'
        && MINDBUS_TYPES.iter().any(|t| t.as_bytes() == &first[..3])
        && let Some(topic) = rest.iter().position(|&b| b == b'.')
        && topic > 0
    {
        return (&key[..4 + topic + 1], "*");
    }
    if default_exchange {
        // The routing key names the queue.
        (key, "")
    } else {
        ("", "")
    }
}

/// Appends the non-empty parts (each a prefix and a suffix) to `out`,
/// separated by `:`; whether anything was appended.
fn join(out: &mut String, parts: [(&str, &str); 3]) -> bool {
    out.reserve(parts.iter().map(|(p, s)| p.len() + s.len() + 1).sum());
    let mut any = false;
    for (part, suffix) in parts {
        if part.is_empty() {
            continue;
        }
        if any {
            out.push(':');
        }
        out.push_str(part);
        out.push_str(suffix);
        any = true;
    }
    any
}

/// `f` with an empty scratch string: the thread's own, reused (no
/// allocation once it has grown), or a fresh one if that is in use.
pub(crate) fn with_scratch<R>(f: impl FnOnce(&mut String) -> R) -> R {
    thread_local! {
        static SCRATCH: RefCell<String> = RefCell::new(String::with_capacity(128));
    }
    let mut f = Some(f);
    let reused = SCRATCH.try_with(|s| {
        let mut s = s.try_borrow_mut().ok()?;
        s.clear();
        f.take().map(|f| f(&mut s))
    });
    match (reused, f) {
        (Ok(Some(r)), _) => r,
        (_, Some(f)) => f(&mut String::new()),
        (_, None) => unreachable!("the scratch closure ran but returned nothing"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn both(d: Destination<'_>) -> (String, Option<String>) {
        (d.name(), d.template())
    }

    #[test]
    fn send_names_follow_the_rabbitmq_conventions() {
        let cases = [
            // (exchange, routing key) -> (name, template)
            (
                ("mindbus.main", "cmd.writer.any"),
                (
                    "mindbus.main:cmd.writer.any",
                    Some("mindbus.main:cmd.writer.*"),
                ),
            ),
            (
                ("mindbus.main", "evt.task.completed"),
                (
                    "mindbus.main:evt.task.completed",
                    Some("mindbus.main:evt.task.*"),
                ),
            ),
            (
                ("mindbus.main", "ctl.all.stop"),
                ("mindbus.main:ctl.all.stop", Some("mindbus.main:ctl.all.*")),
            ),
            // Not a MindBus key: left out of the template.
            (("logs", "user-4711"), ("logs:user-4711", Some("logs"))),
            (("logs", "cmd.x"), ("logs:cmd.x", Some("logs"))),
            (("logs", "cmd..x"), ("logs:cmd..x", Some("logs"))),
            (("logs", ""), ("logs", Some("logs"))),
            // The default exchange: the routing key names a queue.
            (
                ("", "orchestrator.replies"),
                ("orchestrator.replies", Some("orchestrator.replies")),
            ),
            (("", "amq.gen-Xa1"), ("amq.gen-Xa1", None)),
            (
                ("", "amq.rabbitmq.reply-to.g1h2"),
                ("amq.rabbitmq.reply-to.g1h2", None),
            ),
            (("", ""), ("amq.default", Some("amq.default"))),
        ];
        for ((exchange, key), (name, template)) in cases {
            let d = Destination::send(exchange, key);
            assert_eq!(
                both(d),
                (name.to_owned(), template.map(str::to_owned)),
                "{d:?}"
            );
        }
        assert!(Destination::send("", "amq.gen-Xa1").is_temporary());
        assert!(!Destination::send("mindbus.main", "amq.gen-Xa1").is_temporary());
    }

    #[test]
    fn receive_names_follow_the_rabbitmq_conventions() {
        let cases = [
            // (exchange, routing key, queue) -> (name, template)
            (
                ("mindbus.main", "cmd.writer.any", "agent.writer"),
                (
                    "mindbus.main:cmd.writer.any:agent.writer",
                    Some("mindbus.main:cmd.writer.*:agent.writer"),
                ),
            ),
            // A fan-out subscriber on a server-named queue.
            (
                ("mindbus.main", "evt.task.completed", "amq.gen-Q1"),
                (
                    "mindbus.main:evt.task.completed:amq.gen-Q1",
                    Some("mindbus.main:evt.task.*"),
                ),
            ),
            // Routing key equal to the queue: once.
            (("", "orders", "orders"), ("orders", Some("orders"))),
            (
                ("jobs", "orders", "orders"),
                ("jobs:orders", Some("jobs:orders")),
            ),
            (("", "amq.gen-Q2", "amq.gen-Q2"), ("amq.gen-Q2", None)),
            // Dead-lettered: the original exchange and key stay.
            (
                ("dlx", "user-4711", "parked"),
                ("dlx:user-4711:parked", Some("dlx:parked")),
            ),
        ];
        for ((exchange, key, queue), (name, template)) in cases {
            let d = Destination::receive(exchange, key, queue);
            assert_eq!(
                both(d),
                (name.to_owned(), template.map(str::to_owned)),
                "{d:?}"
            );
        }
        assert!(Destination::receive("mindbus.main", "evt.a.b", "amq.gen-Q1").is_temporary());
        assert!(!Destination::receive("", "amq.gen-Q1", "named").is_temporary());
    }

    #[test]
    fn template_is_name_agrees_with_building_both() {
        let sends = [
            ("mindbus.main", "cmd.writer.any"),
            ("mindbus.main", "cmd.writer.*"),
            ("logs", "user-4711"),
            ("logs", ""),
            ("", "orchestrator.replies"),
            ("", "amq.gen-Xa1"),
            ("", ""),
        ];
        let receives = [
            ("mindbus.main", "cmd.writer.any", "agent.writer"),
            ("mindbus.main", "evt.task.completed", "amq.gen-Q1"),
            ("", "orders", "orders"),
            ("jobs", "orders", "orders"),
            ("", "amq.gen-Q2", "amq.gen-Q2"),
            ("dlx", "user-4711", "parked"),
            ("", "", "q"),
        ];
        let all = sends.iter().map(|(e, k)| Destination::send(e, k)).chain(
            receives
                .iter()
                .map(|(e, k, q)| Destination::receive(e, k, q)),
        );
        for d in all {
            assert_eq!(
                d.template_is_name(),
                d.template().as_deref() == Some(d.name().as_str()),
                "{d:?}"
            );
        }
    }

    #[test]
    fn the_scratch_string_is_reused_and_survives_nesting() {
        let outer = with_scratch(|a| {
            a.push_str("outer");
            let inner = with_scratch(|b| {
                assert!(b.is_empty(), "a nested call gets its own string");
                b.push_str("inner");
                b.clone()
            });
            (a.clone(), inner)
        });
        assert_eq!(outer, ("outer".to_owned(), "inner".to_owned()));
        with_scratch(|s| assert!(s.is_empty() && s.capacity() >= 128));
    }
}
