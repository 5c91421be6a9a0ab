#!/usr/bin/env bash
# Install the tools the tests drive (openssl, mosquitto, mosquitto_pub/_sub, strace for fault
# injection, chromium + chromedriver for the dashboard test, promtool from prometheus) when
# they are missing. Never fails the build: when installing is impossible it says why, and the tests that
# need the tool skip with that reason.
set -u
missing=()
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
command -v mosquitto_pub >/dev/null 2>&1 || missing+=(mosquitto-clients)
command -v strace >/dev/null 2>&1 || missing+=(strace)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
if [ ${#missing[@]} -eq 0 ]; then
  echo "tools: openssl, mosquitto, mosquitto-clients, strace, chromium, chromedriver and promtool are present"
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "tools: missing ${missing[*]} and cannot install (needs root and apt-get); tests needing them will be skipped"
  exit 0
fi
echo "tools: installing ${missing[*]} with apt-get"
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }; then
  echo "tools: apt-get could not install ${missing[*]}; tests needing them will be skipped"
fi
exit 0
