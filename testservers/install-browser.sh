#!/bin/bash
# Install Debian's Chromium for the admin UI's end-to-end tests (Playwright drives it at
# /usr/bin/chromium; Playwright's own browser downloads are never used). Idempotent and quick
# when it is there. Debian 12, as root.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  echo "apt: chromium already installed"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if [ -z "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v -e lock -e partial)" ]; then apt-get update -q; fi
apt-get install -y -q --no-install-recommends chromium \
  || { apt-get update -q && apt-get install -y -q --no-install-recommends chromium; }  # stale lists
