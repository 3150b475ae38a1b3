//! Connecting to the broker with a bound on each attempt. Shared by
//! `examples/ai_team.rs` and the tests (`tests/common`) through `#[path]`.
#![allow(dead_code)]

use mindbus_otel::lapin::{Connection, ConnectionProperties};
use std::time::Duration;

/// `Connection::connect`, each attempt bounded: lapin 4.12's connect has
/// been seen to never return (a refused connection whose error was not
/// delivered, under load; once in a CI run), so an attempt that gives no
/// answer within 5 s is retried, three attempts in all; the last one's
/// silence is an I/O timeout error. An attempt that answers, with a
/// connection or an error, is the answer.
pub async fn connect_bounded(
    url: &str,
    props: ConnectionProperties,
) -> Result<Connection, mindbus_otel::lapin::Error> {
    for _ in 0..3 {
        let attempt = Connection::connect(url, props.clone());
        if let Ok(answer) = tokio::time::timeout(Duration::from_secs(5), attempt).await {
            return answer;
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "no answer in 3 attempts of 5 s",
    )
    .into())
}
