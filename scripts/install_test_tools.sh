#!/usr/bin/env bash
# System tools the tests drive that PyPI does not ship: Prometheus and promtool, from Debian's
# `prometheus` package. Needs root (or passwordless sudo) and apt; where neither is available
# it says so, and the tests that need Prometheus skip with that reason.
set -uo pipefail
if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "install_test_tools: no apt-get here; Prometheus tests will skip" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "install_test_tools: not root and no sudo; Prometheus tests will skip" >&2
    exit 0
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null 2>&1 || true
if ! $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1; then
  echo "install_test_tools: apt-get install prometheus failed; Prometheus tests will skip" >&2
fi
exit 0
