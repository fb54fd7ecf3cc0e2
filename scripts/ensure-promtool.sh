#!/usr/bin/env bash
# The test suite checks /metrics and the alert rules with promtool, from
# Debian's prometheus package. Install it when missing and we may (root + apt).
set -euo pipefail
if command -v promtool >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing promtool (apt-get install prometheus)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  exit 0
fi
echo "promtool is missing: install Debian's prometheus package (apt-get install prometheus)" >&2
exit 1
