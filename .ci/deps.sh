#!/usr/bin/env bash
# What the demo and the tests need on this machine: installed when missing,
# started when down. `bash .ci/deps.sh` on its own, or through `.ci/run`.
#
#   bash .ci/deps.sh         RabbitMQ (Debian's rabbitmq-server) on 127.0.0.1:5672,
#                            with the management API on 127.0.0.1:15672
#   bash .ci/deps.sh --all   also Debian's prometheus 2.42 (for promtool), and Jaeger v2,
#                            the OpenTelemetry Collector and Prometheus 3.16, built
#                            from their Go modules into $MINDBUS_TOOLS (default
#                            ~/.cache/mindbus-otel), once per version: about
#                            10 minutes the first time; and pika (the reference Python
#                            client's AMQP library) in a venv; the end-to-end tests use them
#
# Idempotent: on a ready machine it installs nothing, runs no `apt-get update`
# and returns at once. Each failure is one line on stderr naming what is
# missing and the command that fixes it, then exit 1.
set -euo pipefail
cd "$(dirname "$0")/.."

all=
case "${1:-}" in
  --all) all=1 ;;
  "") ;;
  *) echo "usage: bash .ci/deps.sh [--all]" >&2; exit 2 ;;
esac

fail() { echo "deps: $*" >&2; exit 1; }
port_answers() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() { # wait_port PORT SECONDS
  local i
  for ((i = 0; i < $2; i++)); do port_answers "$1" && return 0; sleep 1; done
  port_answers "$1"
}

apt_updated=
# Installs Debian packages; `apt-get update` once, and only when something is missing.
apt_install() {
  [ "$(id -u)" = 0 ] || fail "$* is missing: run 'sudo apt-get install -y $*' (or this script as root)"
  command -v apt-get >/dev/null || fail "$* is missing and this machine has no apt-get: install $* by hand"
  echo "deps: installing $*"
  if [ -z "$apt_updated" ]; then
    apt-get update -qq >/dev/null || fail "'apt-get update' failed: run it by hand to see why, then 'bash .ci/deps.sh'"
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null 2>&1 \
    || fail "installing $* failed: run 'DEBIAN_FRONTEND=noninteractive apt-get install -y $*' to see why"
}

command -v cargo >/dev/null || fail "cargo is missing: install the Rust toolchain (rustup), then 'bash .ci/deps.sh'"

# --- RabbitMQ ---------------------------------------------------------------
if ! port_answers 5672; then
  command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
fi
if ! port_answers 5672; then
  # Enabled before the node starts, so the HTTP API comes up with it.
  rabbitmq-plugins enable --offline rabbitmq_management >/dev/null 2>&1 || true
  echo "deps: starting RabbitMQ"
  rabbitmq-server -detached >/dev/null 2>&1 || true
  # `rabbitmqctl await_startup` fails at once until the node has registered
  # with epmd, which is about when the AMQP port opens: wait for the port first.
  wait_port 5672 90 \
    || fail "RabbitMQ did not start on 127.0.0.1:5672: see /var/log/rabbitmq/ and run 'rabbitmq-server' in the foreground to see why"
  timeout 120 rabbitmqctl await_startup >/dev/null 2>&1 \
    || fail "RabbitMQ answers on 5672 but did not finish booting: run 'rabbitmqctl await_startup' to see why"
fi
if ! port_answers 15672; then
  command -v rabbitmq-plugins >/dev/null \
    || fail "the RabbitMQ management API (127.0.0.1:15672) is off and rabbitmq-plugins is missing: enable rabbitmq_management on the broker"
  echo "deps: enabling the RabbitMQ management plugin"
  rabbitmq-plugins enable rabbitmq_management >/dev/null 2>&1 \
    || fail "the RabbitMQ management API is off: run 'rabbitmq-plugins enable rabbitmq_management' to see why it fails"
  wait_port 15672 60 \
    || fail "the RabbitMQ management API does not answer on 127.0.0.1:15672: run 'rabbitmq-plugins enable rabbitmq_management'"
fi

# --- Jaeger v2 and the OpenTelemetry Collector (--all) ------------------------
# Versions: one place. The Jaeger Go module v1.75.0 is Jaeger 2.12.
JAEGER_MODULE=v1.75.0
COLLECTOR_BUILDER=v0.165.0
# The Go module v0.316.0 is Prometheus 3.16, the version docker-compose.yml pins.
PROMETHEUS_MODULE=v0.316.0
TOOLS="${MINDBUS_TOOLS:-$HOME/.cache/mindbus-otel}"

build_jaeger() { # -> $TOOLS/jaeger-$JAEGER_MODULE/jaeger
  local dir="$TOOLS/jaeger-$JAEGER_MODULE"
  [ -x "$dir/jaeger" ] && return 0
  command -v go >/dev/null || fail "go is missing: install Go 1.26 (Jaeger is built from its Go module)"
  echo "deps: building Jaeger $JAEGER_MODULE (about 7 minutes, once)"
  local work; work=$(mktemp -d)
  # `go install` refuses Jaeger's module (its go.mod has a replace
  # directive): build it as a tool of a throw-away module instead.
  ( cd "$work" && go mod init jaegerbuild >/dev/null 2>&1 \
      && go get -tool "github.com/jaegertracing/jaeger/cmd/jaeger@$JAEGER_MODULE" >/dev/null 2>&1 \
      && go build -o jaeger github.com/jaegertracing/jaeger/cmd/jaeger ) \
    || fail "building Jaeger failed: run, in an empty folder, 'go mod init j && go get -tool github.com/jaegertracing/jaeger/cmd/jaeger@$JAEGER_MODULE && go build github.com/jaegertracing/jaeger/cmd/jaeger' to see why"
  mkdir -p "$dir" && mv "$work/jaeger" "$dir/jaeger" && rm -rf "$work"
}

build_collector() { # -> $TOOLS/otelcol-<manifest hash>/otelcol-mindbus
  local manifest=deploy/otel-collector/builder.yaml hash dir
  hash=$(sha256sum "$manifest" | cut -c1-16)
  dir="$TOOLS/otelcol-$hash"
  OTELCOL="$dir/otelcol-mindbus"
  [ -x "$OTELCOL" ] && return 0
  command -v go >/dev/null || fail "go is missing: install Go 1.26 (the collector is built with its builder)"
  echo "deps: building the OpenTelemetry Collector from $manifest (about 2 minutes, once)"
  local gobin="$TOOLS/go-bin"
  [ -x "$gobin/builder" ] && "$gobin/builder" version 2>/dev/null | grep -q "${COLLECTOR_BUILDER#v}" \
    || GOBIN="$gobin" go install "go.opentelemetry.io/collector/cmd/builder@$COLLECTOR_BUILDER" >/dev/null 2>&1 \
    || fail "installing the collector builder failed: run 'go install go.opentelemetry.io/collector/cmd/builder@$COLLECTOR_BUILDER' to see why"
  local work; work=$(mktemp -d)
  cp "$manifest" "$work/builder.yaml"
  ( cd "$work" && "$gobin/builder" --config builder.yaml >build.log 2>&1 ) \
    || fail "building the collector failed: see $work/build.log, or run '$gobin/builder --config $manifest'"
  mkdir -p "$dir" && mv "$work/otelcol-mindbus/otelcol-mindbus" "$OTELCOL" && rm -rf "$work"
}

build_prometheus() { # -> $TOOLS/prometheus-$PROMETHEUS_MODULE/{prometheus,promtool}
  local dir="$TOOLS/prometheus-$PROMETHEUS_MODULE"
  # Module v0.X.Y is Prometheus 3.X.Y; stamped into the binaries, as the
  # release build does, so that --version and /api/v1/status/buildinfo say it.
  local version; version=$(echo "$PROMETHEUS_MODULE" | sed -E 's/^v0\.([0-9]+)([0-9]{2})\.([0-9]+)$/3.\2.\3/; s/^3\.0/3./')
  [ -x "$dir/prometheus" ] && [ -x "$dir/promtool" ] \
    && "$dir/prometheus" --version 2>&1 | grep -q "version $version " && return 0
  command -v go >/dev/null || fail "go is missing: install Go 1.26 (Prometheus 3 is built from its Go module)"
  echo "deps: building Prometheus $version (module $PROMETHEUS_MODULE, about 7 minutes, once)"
  GOBIN="$dir" go install -ldflags "-X github.com/prometheus/common/version.Version=$version" \
      "github.com/prometheus/prometheus/cmd/prometheus@$PROMETHEUS_MODULE" \
      "github.com/prometheus/prometheus/cmd/promtool@$PROMETHEUS_MODULE" >/dev/null 2>&1 \
    || fail "building Prometheus failed: run 'go install github.com/prometheus/prometheus/cmd/prometheus@$PROMETHEUS_MODULE' to see why"
}

# pika, the AMQP library of the reference Python client: the interop tests
# run a pika orchestrator against the demo's agents.
PIKA_VERSION=1.3.2
setup_pika() { # -> $TOOLS/venv-pika-$PIKA_VERSION/bin/python
  local dir="$TOOLS/venv-pika-$PIKA_VERSION"
  [ -x "$dir/bin/python" ] && "$dir/bin/python" -c "import pika" 2>/dev/null && return 0
  command -v python3 >/dev/null || fail "python3 is missing: install Python 3.11 (pika runs in a venv)"
  echo "deps: installing pika $PIKA_VERSION into $dir"
  rm -rf "$dir"
  # Debian's python3 makes venvs only with python3-venv installed.
  python3 -m venv "$dir" >/dev/null 2>&1 \
    || { rm -rf "$dir"; apt_install python3-venv; python3 -m venv "$dir" >/dev/null 2>&1; } \
    || fail "'python3 -m venv $dir' failed: run it to see why (python3-venv is installed)"
  "$dir/bin/pip" install -q "pika==$PIKA_VERSION" >/dev/null 2>&1 \
    || fail "installing pika failed: run '$dir/bin/pip install pika==$PIKA_VERSION' to see why"
}

if [ -n "$all" ]; then
  # promtool (Debian's prometheus 2.42) checks the Prometheus config.
  command -v promtool >/dev/null || apt_install prometheus
  # amtool (Debian's prometheus-alertmanager) checks the Alertmanager config.
  command -v amtool >/dev/null || apt_install prometheus-alertmanager
  build_jaeger
  build_collector
  build_prometheus
  setup_pika
  # Stable names for the tests: $TOOLS/bin/jaeger and $TOOLS/bin/otelcol.
  mkdir -p "$TOOLS/bin"
  ln -sfn "$TOOLS/jaeger-$JAEGER_MODULE/jaeger" "$TOOLS/bin/jaeger"
  ln -sfn "$OTELCOL" "$TOOLS/bin/otelcol"
  ln -sfn "$TOOLS/prometheus-$PROMETHEUS_MODULE/prometheus" "$TOOLS/bin/prometheus3"
  ln -sfn "$TOOLS/prometheus-$PROMETHEUS_MODULE/promtool" "$TOOLS/bin/promtool3"
  # A wrapper, not a link: a venv's python finds its packages only when run
  # by its own path.
  rm -f "$TOOLS/bin/python-pika"
  printf '#!/bin/sh\nexec "%s" "$@"\n' "$TOOLS/venv-pika-$PIKA_VERSION/bin/python" >"$TOOLS/bin/python-pika"
  chmod +x "$TOOLS/bin/python-pika"
  echo "deps: ready (Jaeger, the collector, Prometheus 3 and pika in $TOOLS/bin)"
fi
echo "deps: ready (RabbitMQ on 127.0.0.1:5672, management API on 127.0.0.1:15672)"
