#!/usr/bin/env bash
# Debian's Chromium for the headless-browser test of /docs (tests/service/test_docs_browser.py):
# installed with apt-get when absent (~25 s here), like Mosquitto and nats-server.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then echo "chromium: $(chromium --version 2>/dev/null | head -1)"; exit 0; fi
echo "chromium: not installed, installing with apt-get"
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
chromium --version
