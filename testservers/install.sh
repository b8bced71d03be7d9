#!/bin/bash
# Install the test servers: Dovecot + Postfix from apt, Radicale into the project's venv.
# Idempotent and quick when everything is there.  Debian 12, as root, no systemd needed.
set -euo pipefail
. "$(dirname "$0")/env.sh"
t0=$(date +%s%N)
PKGS=(dovecot-imapd dovecot-pop3d dovecot-lmtpd postfix)
missing=()
for p in "${PKGS[@]}"; do
  [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = "install ok installed" ] || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "apt: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Stop maintainer scripts from starting the packaged daemons (a system Dovecot on
  # 0.0.0.0:143, Postfix on :25).  Docker images usually have this; create it if missing.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  # Without this preseed Postfix picks "Internet Site" and writes /etc/postfix/main.cf.
  # (apt-get purge forgets it, so set it before every install.)
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  echo "postfix postfix/mailname string localhost" | debconf-set-selections
  # not openssl: it would drag in a libssl upgrade; the image has the CLI
  if [ -z "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v -e lock -e partial)" ]; then apt-get update -q; fi
  apt-get install -y -q --no-install-recommends "${missing[@]}" \
    || { apt-get update -q && apt-get install -y -q --no-install-recommends "${missing[@]}"; }  # stale lists
else
  echo "apt: ${PKGS[*]} already installed"
fi
if [ ! -x "$PYTHON" ]; then
  echo "venv: creating $(dirname "$(dirname "$PYTHON")")"
  python3 -m venv "$(dirname "$(dirname "$PYTHON")")"
fi
if "$PYTHON" -c 'import radicale' 2>/dev/null; then
  echo "pip: radicale already installed in $PYTHON"
else
  echo "pip: installing radicale"
  "$PYTHON" -m pip install -q radicale
fi
echo "install.sh done in $(ms "$t0") ms"
