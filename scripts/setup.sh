#!/usr/bin/env bash
# Installs what Grid needs on a fresh Debian machine (run as root). Idempotent: installs only
# what is missing. Usage: scripts/setup.sh [--bench]
set -euo pipefail

need=()
have() { command -v "$1" >/dev/null 2>&1; }
have redis-server || need+=(redis-server)
have nft || need+=(nftables)
have busybox || need+=(busybox-static)
have ip || need+=(iproute2)
have curl || need+=(curl)
if [ "${1:-}" = "--bench" ]; then
  have wrk || need+=(wrk)
  have hyperfine || need+=(hyperfine)
fi

if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "setup: missing ${need[*]}; run as root or install them" >&2
    exit 1
  fi
  echo "setup: installing ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# Debian's redis-server package enables a system service; Grid starts its own servers, so a
# service that apt started would only hold port 6379. Leave it alone if it was already running.
have cargo || { echo "setup: cargo is missing (install Rust with rustup)" >&2; exit 1; }
