#!/usr/bin/env bash
# Installs the system programs the local stack needs, from Debian/Ubuntu packages, when missing:
# Mosquitto (MQTT broker), a Java runtime and Maven (Kafka from Maven Central), Node.js and npm
# (Anvil, solc-js, the dashboard's uPlot), Chromium (the dashboard's browser tests, driven by
# Playwright with this executable: nothing downloads a browser build), Python venv support. Idempotent: installs nothing that is already there.
set -euo pipefail

need=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v mosquitto_sub >/dev/null 2>&1 || need+=(mosquitto-clients)
command -v java >/dev/null 2>&1 || need+=(default-jre-headless)
command -v mvn >/dev/null 2>&1 || need+=(maven)
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v npm >/dev/null 2>&1 || need+=(npm)
command -v chromium >/dev/null 2>&1 || need+=(chromium fonts-dejavu-core)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)

if [ ${#need[@]} -eq 0 ]; then
  echo "system prerequisites: all present"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "need root or sudo to apt-get install: ${need[*]}" >&2; exit 1; }
  SUDO="sudo"
fi
echo "installing: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# The Debian package enables a system-wide broker on port 1883; ours runs on its own port with
# its own config, so the system one is not needed.
if [ -d /run/systemd/system ] && systemctl is-active --quiet mosquitto 2>/dev/null; then
  $SUDO systemctl disable --now mosquitto >/dev/null 2>&1 || true
fi
