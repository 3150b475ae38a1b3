"""An orchestrator written against pika, as the reference Python client is.

Sends one COMMAND the way the reference client does (CloudEvents 1.0,
structured JSON, the trace context only in the CloudEvents `traceparent`
extension, AMQP properties per the protocol) and waits for its reply on a
server-named, exclusive reply queue. Prints one JSON line: what it sent
and what came back (type, correlation id, the reply's AMQP headers).

    python pika_orchestrator.py AMQP_URL EXCHANGE ROUTING_KEY
"""

import json
import os
import sys
import uuid

import pika


def main():
    url, exchange, routing_key = sys.argv[1:4]
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    replies = ch.queue_declare(queue="", exclusive=True).method.queue

    trace_id = os.urandom(16).hex()
    span_id = os.urandom(8).hex()
    traceparent = f"00-{trace_id}-{span_id}-01"
    command_id = str(uuid.uuid4())
    body = {
        "specversion": "1.0",
        "type": "ai.team.command",
        "source": "orchestrator-core",
        "id": command_id,
        "subject": "task-pika-1",
        "datacontenttype": "application/json",
        "traceparent": traceparent,
        "data": {
            "action": "generate_article",
            "params": {"topic": "interop"},
            "timeout_seconds": 30,
        },
    }
    ch.basic_publish(
        exchange=exchange,
        routing_key=routing_key,
        body=json.dumps(body).encode(),
        properties=pika.BasicProperties(
            content_type="application/json",
            delivery_mode=2,
            priority=20,
            expiration="300000",
            reply_to=replies,
            correlation_id=command_id,
            message_id=command_id,
        ),
    )

    reply = None
    for method, props, data in ch.consume(replies, inactivity_timeout=30):
        if method is None:
            break
        ch.basic_ack(method.delivery_tag)
        reply = {
            "type": json.loads(data).get("type"),
            "correlation_id": props.correlation_id,
            "headers": {
                k: (v.decode() if isinstance(v, bytes) else v)
                for k, v in (props.headers or {}).items()
            },
        }
        break
    ch.cancel()
    conn.close()
    print(json.dumps({
        "traceparent": traceparent,
        "command_id": command_id,
        "reply_queue": replies,
        "reply": reply,
    }))
    return 0 if reply else 1


if __name__ == "__main__":
    sys.exit(main())
