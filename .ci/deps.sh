#!/usr/bin/env bash
# What the demo and the tests need on this machine: installed when missing,
# started when down. `bash .ci/deps.sh` on its own, or through `.ci/run`.
#
# Idempotent: on a ready machine it installs nothing, runs no `apt-get update`
# and returns at once (two port probes). Each failure is one line on stderr
# naming what is missing and the command that fixes it, then exit 1.
#
# Today: RabbitMQ (Debian's rabbitmq-server) on 127.0.0.1:5672 with the
# management plugin on 127.0.0.1:15672.
set -euo pipefail

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
echo "deps: ready (RabbitMQ on 127.0.0.1:5672, management API on 127.0.0.1:15672)"
