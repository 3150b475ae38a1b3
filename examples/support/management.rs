//! The few calls to the RabbitMQ management HTTP API that the demo makes to
//! set up dead-lettering as RabbitMQ recommends it (a policy, not queue
//! arguments), and that the tests make to clean up after it. Plain HTTP/1.0
//! on the broker's host: three calls do not need an HTTP client dependency.
//!
//! Shared by `examples/ai_team.rs` and `tests/demo.rs` through `#[path]`.
#![allow(dead_code)]

use mindbus_otel::lapin::uri::AMQPUri;
use serde_json::Value;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long one management call may take before it is given up.
const TIMEOUT: Duration = Duration::from_secs(5);

/// The management API of the broker an AMQP URL points at: same host, same
/// credentials, same vhost; port 15672 (`MINDBUS_MANAGEMENT_PORT` overrides).
pub struct Management {
    host: String,
    port: u16,
    authorization: String,
    vhost: String,
}

impl Management {
    /// The API beside the broker of `amqp_url`.
    pub fn for_broker(amqp_url: &str) -> Result<Management, String> {
        let uri: AMQPUri = amqp_url.parse()?;
        let port = std::env::var("MINDBUS_MANAGEMENT_PORT")
            .ok()
            .and_then(|p| p.parse().ok())
            .unwrap_or(15672);
        let user = &uri.authority.userinfo;
        Ok(Management {
            host: uri.authority.host,
            port,
            authorization: base64(format!("{}:{}", user.username, user.password).as_bytes()),
            vhost: uri.vhost,
        })
    }

    /// `host:port`, for messages.
    pub fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// The vhost, as the broker names it (`/` by default).
    pub fn vhost(&self) -> &str {
        &self.vhost
    }

    fn policy_path(&self, name: &str) -> String {
        format!("/api/policies/{}/{}", encode(&self.vhost), encode(name))
    }

    /// Creates or replaces a policy that applies to queues.
    pub async fn put_policy(
        &self,
        name: &str,
        pattern: &str,
        definition: Value,
    ) -> Result<(), String> {
        let body = serde_json::json!({
            "pattern": pattern, "definition": definition, "apply-to": "queues", "priority": 0,
        });
        let path = self.policy_path(name);
        match self.call("PUT", &path, Some(&body.to_string())).await? {
            (201 | 204, _) => Ok(()),
            (status, body) => Err(format!("PUT {path}: HTTP {status} {body}")),
        }
    }

    /// Deletes a policy; a missing one is not an error.
    pub async fn delete_policy(&self, name: &str) -> Result<(), String> {
        let path = self.policy_path(name);
        match self.call("DELETE", &path, None).await? {
            (204 | 404, _) => Ok(()),
            (status, body) => Err(format!("DELETE {path}: HTTP {status} {body}")),
        }
    }

    /// Whether a policy of that name exists.
    pub async fn has_policy(&self, name: &str) -> Result<bool, String> {
        let path = self.policy_path(name);
        match self.call("GET", &path, None).await? {
            (200, _) => Ok(true),
            (404, _) => Ok(false),
            (status, body) => Err(format!("GET {path}: HTTP {status} {body}")),
        }
    }

    /// Whether a queue (`kind` `queues`) or an exchange (`exchanges`) of
    /// that name exists in the vhost.
    pub async fn exists(&self, kind: &str, name: &str) -> Result<bool, String> {
        let path = format!("/api/{kind}/{}/{}", encode(&self.vhost), encode(name));
        match self.call("GET", &path, None).await? {
            (200, _) => Ok(true),
            (404, _) => Ok(false),
            (status, body) => Err(format!("GET {path}: HTTP {status} {body}")),
        }
    }

    /// Closes (as an operator would, from the management UI) the broker
    /// connections whose client named them `connection_name`; how many.
    pub async fn close_connections_named(&self, connection_name: &str) -> Result<usize, String> {
        let (status, body) = self.call("GET", "/api/connections", None).await?;
        if status != 200 {
            return Err(format!("GET /api/connections: HTTP {status} {body}"));
        }
        let list: Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
        let mut closed = 0;
        for c in list.as_array().into_iter().flatten() {
            if c["client_properties"]["connection_name"] != connection_name {
                continue;
            }
            let Some(name) = c["name"].as_str() else {
                continue;
            };
            let path = format!("/api/connections/{}", encode(name));
            match self.call("DELETE", &path, None).await? {
                (204 | 404, _) => closed += 1,
                (status, body) => return Err(format!("DELETE {path}: HTTP {status} {body}")),
            }
        }
        Ok(closed)
    }

    /// The name of the policy in effect on a queue and its definition, if any.
    pub async fn queue_policy(&self, queue: &str) -> Result<Option<(String, Value)>, String> {
        let path = format!("/api/queues/{}/{}", encode(&self.vhost), encode(queue));
        match self.call("GET", &path, None).await? {
            (200, body) => {
                let q: Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
                Ok(q["policy"].as_str().map(|name| {
                    let definition = q["effective_policy_definition"].clone();
                    (name.to_owned(), definition)
                }))
            }
            (404, _) => Ok(None),
            (status, body) => Err(format!("GET {path}: HTTP {status} {body}")),
        }
    }

    /// One request; the status code and the body.
    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<(u16, String), String> {
        let exchange = async {
            let mut stream = TcpStream::connect((self.host.as_str(), self.port)).await?;
            let body = body.unwrap_or("");
            let request = format!(
                "{method} {path} HTTP/1.0\r\nHost: {}\r\nAuthorization: Basic {}\r\n\
                 Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                self.address(),
                self.authorization,
                body.len()
            );
            stream.write_all(request.as_bytes()).await?;
            let mut response = Vec::new();
            stream.read_to_end(&mut response).await?;
            Ok::<_, std::io::Error>(String::from_utf8_lossy(&response).into_owned())
        };
        let response = tokio::time::timeout(TIMEOUT, exchange)
            .await
            .map_err(|_| format!("no answer from {} in {TIMEOUT:?}", self.address()))?
            .map_err(|e| format!("{}: {e}", self.address()))?;
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("{}: not an HTTP answer", self.address()))?;
        Ok((status, body.to_owned()))
    }
}

/// Percent-encodes a path segment (a vhost `/` becomes `%2F`).
pub fn encode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Escapes a literal for a policy's regular-expression pattern.
pub fn regex_escape(literal: &str) -> String {
    let mut out = String::with_capacity(literal.len());
    for c in literal.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_and_escapes() {
        assert_eq!(base64(b"guest:guest"), "Z3Vlc3Q6Z3Vlc3Q=");
        assert_eq!(base64(b"ab"), "YWI=");
        assert_eq!(base64(b"abc"), "YWJj");
        assert_eq!(encode("/"), "%2F");
        assert_eq!(encode("test.a-1"), "test.a-1");
        assert_eq!(regex_escape("test.x."), "test\\.x\\.");
    }
}
