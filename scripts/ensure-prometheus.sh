#!/usr/bin/env bash
# Make sure `promtool` (rule/config checks, rule unit tests) and `prometheus` (tests/ops run a real one
# on a free port) are installed. When either is missing, Debian's `prometheus` package — which ships
# both — is installed with apt-get (without Recommends, so no node exporter comes along).
#
# The package's postinst enables and starts a system `prometheus` service on :9090 where an init
# system runs services (not in containers whose policy-rc.d forbids it). Nothing here needs that
# service — the tests start their own Prometheus on a free port — and it would hold port 9090 that the
# Compose stack publishes, so when *this* script's install started it, it is stopped and disabled
# again. A prometheus service that was there before is left alone.
set -euo pipefail

have() { command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; }

if have; then
  echo "prometheus: $(prometheus --version 2>&1 | head -n 1) (installed)"
  exit 0
fi

echo "prometheus: promtool/prometheus not on PATH, installing Debian's prometheus package with apt-get"
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
was_active=no  # a prometheus service someone already runs here is theirs: left alone
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
  was_active=yes
fi
install() { $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; }
install || { $SUDO apt-get update -qq && install; }

if [ "$was_active" = no ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
  echo "prometheus: stopping and disabling the system prometheus service the package enabled (port 9090)"
  $SUDO systemctl disable --now prometheus || echo "prometheus: could not stop the system service" >&2
fi

have || { echo "prometheus: promtool/prometheus still not on PATH after the install" >&2; exit 1; }
echo "prometheus: $(prometheus --version 2>&1 | head -n 1) (installed now)"
