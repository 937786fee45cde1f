#!/usr/bin/env bash
# Debian's nats-server for the cluster tests (tests/cluster: a private 3-node cluster on free ports;
# the machine's own nats-server on 127.0.0.1:4222 is never touched): installed with apt-get when absent.
set -euo pipefail
if command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ]; then
  echo "nats-server: $( (command -v nats-server || echo /usr/sbin/nats-server) )"; exit 0
fi
echo "nats-server: not installed, installing with apt-get"
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nats-server >/dev/null
