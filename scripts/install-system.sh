#!/usr/bin/env bash
# Installs the system programs the local stack needs, from Debian/Ubuntu packages, when missing:
# Mosquitto (MQTT broker), a Java runtime and Maven (Kafka from Maven Central), Node.js and npm
# (Anvil, solc-js, the dashboard's uPlot), Chromium (the dashboard's browser tests, driven by
# Playwright with this executable: nothing downloads a browser build), Python venv support. Idempotent: installs nothing that is already there.
set -euo pipefail

# Go builds SeaweedFS's weed (the lake's S3 server) from the Go module proxy. Debian's golang
# is too old for it (the module asks for 1.26; a Go >= 1.21 fetches that toolchain itself), so
# it is not installed from here: say where to get it, before anything else takes minutes.
go_bin=$(command -v go 2>/dev/null || { [ -x /usr/local/go/bin/go ] && echo /usr/local/go/bin/go; } || true)
if [ -z "$go_bin" ] || ! "$go_bin" env GOVERSION | grep -Eq '^go1\.(2[1-9]|[3-9][0-9])'; then
  echo "go >= 1.21 not found (on PATH or /usr/local/go): install it from https://go.dev/dl/" >&2
  exit 1
fi

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
