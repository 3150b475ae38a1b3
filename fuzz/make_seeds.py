#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets into corpus/<target>/.

Sources: the MindBus fixtures in ../testdata/mindbus (their bodies,
serialised compactly as serde_json does) and trace-context header samples.
The header_carrier input format is described in src/lib.rs.
"""
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "testdata", "mindbus")
ROUTING_KEYS = ["cmd.writer.any", "evt.task.completed", "ctl.all.stop", "orchestrator.results"]

TP = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def fixtures():
    for name in ["command", "result", "error", "event", "control"]:
        with open(os.path.join(FIXTURES, name + ".json"), encoding="utf-8") as f:
            doc = json.load(f)
        body = json.dumps(doc["body"], separators=(",", ":"), ensure_ascii=False).encode()
        yield name, doc["routing_key"], body


def long(key, value, tag=13):
    """A LongString (13) or ByteArray (14) record."""
    key = key.encode()
    return bytes([tag, len(key)]) + key + struct.pack("<H", len(value)) + value


def short(key, value):
    key = key.encode()
    return bytes([12, len(key)]) + key + bytes([len(value)]) + value


def huge(key, prefix, fill, units, tag=18):
    key = key.encode()
    return bytes([tag, len(key)]) + key + bytes([fill]) + struct.pack("<H", units) + bytes([len(prefix)]) + prefix


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def main():
    fx = list(fixtures())
    # envelope: routing-key selector byte, then the body.
    for name, rk, body in fx:
        write("envelope", "fixture-" + name, bytes([ROUTING_KEYS.index(rk)]) + body)
    write("envelope", "not-json", b"\x00plain text")
    write("envelope", "array", b"\x01[1,{\"type\":\"ai.team.event\"}]")
    write("envelope", "escaped", b"\x04" + json.dumps(
        {"specversion": "1.0", "type": "ai.team.error", "source": "a\"\u00e9",
         "data": {"error": {"code": "INTERNAL"}, "metrics": {"tokens_used": "12"}}}).encode())
    write("envelope", "own-routing-key", b"\x8ecmd.writer.any{\"type\":\"x\"}")

    # header_carrier: records, then 0xff and the body.
    command = fx[0][2]
    samples = {
        "traceparent": long("traceparent", TP) + b"\xff",
        "full-context": long("traceparent", TP)
        + long("tracestate", b"congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")
        + long("baggage", b"userId=alice%20b,tenant=acme;prop=1")
        + b"\xff",
        "python-flags-03": long("traceparent", TP[:-2] + b"03") + b"\xff" + command,
        "dotnet-bytes": long("traceparent", TP, tag=14) + long("baggage", b"k=v", tag=14) + b"\xff",
        "short-string": short("traceparent", TP) + b"\xff",
        "wrong-type": bytes([7, 11]) + b"traceparent" + struct.pack("<q", 42) + b"\xff",
        "case-variants": long("Traceparent", TP) + long("TraceState", b"a=1") + b"\xff",
        "huge-tracestate": long("traceparent", TP) + huge("tracestate", b"k=", ord("v"), 4096) + b"\xff",
        "huge-baggage": long("traceparent", TP) + huge("baggage", b"k=", ord("v"), 600, tag=19) + b"\xff",
        "baggage-100-members": long("baggage", b",".join(b"k%d=v" % i for i in range(100))) + b"\xff",
        "tracestate-33-members": long("traceparent", TP)
        + long("tracestate", b",".join(b"k%d=v" % i for i in range(33)))
        + b"\xff",
        # #28: what the current W3C text has a receiver inherit.
        "tracestate-duplicates-and-at-keys": long("traceparent", TP)
        + long("tracestate", b"foo=1,foo=2,foo@@bar=1,a@b@c=2,t@" + b"v" * 15 + b"=3,bar=4")
        + b"\xff",
        "nested-table": bytes([17, 6]) + b"nested" + bytes([1]) + long("traceparent", TP) + b"\xff",
        "malformed": long("traceparent", b"00-not-a-trace-context-01") + long("baggage", b"=novalue,,;") + b"\xff",
    }
    for name, data in samples.items():
        write("header_carrier", name, data)
    for name, _, body in fx:
        write("header_carrier", "body-only-" + name, b"\xff" + body)


if __name__ == "__main__":
    main()
