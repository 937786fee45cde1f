#!/usr/bin/env bash
# Make sure the mosquitto binary is installed (tests start private brokers to stop and restart them)
# and that a broker answers on 127.0.0.1:1883. A broker already listening there is reused, never
# fought over; otherwise Mosquitto is installed (apt-get) when absent and started.
set -euo pipefail
HOST=127.0.0.1 PORT=1883

answers() { (exec 3<>"/dev/tcp/$HOST/$PORT") 2>/dev/null; }
have_mosquitto() { command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; }

if ! have_mosquitto; then
  echo "mosquitto: not installed, installing with apt-get"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mosquitto mosquitto-clients
fi
if answers; then echo "mosquitto: a broker answers on $HOST:$PORT (reused)"; exit 0; fi
MOSQ=$(command -v mosquitto || echo /usr/sbin/mosquitto)
if [ -f /etc/mosquitto/mosquitto.conf ]; then "$MOSQ" -d -c /etc/mosquitto/mosquitto.conf
else "$MOSQ" -d -p "$PORT"; fi
for _ in $(seq 1 50); do answers && { echo "mosquitto: started on $HOST:$PORT"; exit 0; }; sleep 0.2; done
echo "mosquitto: failed to start on $HOST:$PORT" >&2; exit 1
