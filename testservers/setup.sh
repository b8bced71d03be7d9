#!/bin/bash
# Lay out the state dir $SERVERSYNC_TESTSERVERS_ROOT (default /srv/serversync-test):
# (re)write every config from the templates here (replacing @ROOT@), create missing
# dirs and the TLS cert.  Mail, queue, DAV data and a valid cert are kept.
set -euo pipefail
. "$(dirname "$0")/env.sh"
t0=$(date +%s%N)
VMAIL=5000                         # numeric uid/gid for all mail; needs no /etc/passwd entry
case $ROOT in /*) ;; *) echo "SERVERSYNC_TESTSERVERS_ROOT must be absolute: $ROOT" >&2; exit 1;; esac

# IPv6 loopback present?  If not, every ::1 listener must go, or startup fails.
PY=$PYTHON; [ -x "$PY" ] || PY=python3
if [ "${SERVERSYNC_TESTSERVERS_IPV6:-auto}" = 0 ] \
   || ! "$PY" -c 'import socket; socket.socket(socket.AF_INET6).bind(("::1", 0))' 2>/dev/null; then
  V6=0; echo "no IPv6 loopback: ::1 listeners dropped"
else
  V6=1
fi
sub() {  # sub TEMPLATE DEST: copy with @ROOT@ replaced (and ::1 removed without IPv6)
  local tmp=$2.tmp
  sed "s#@ROOT@#$ROOT#g" "$1" > "$tmp"
  if [ "$V6" = 0 ]; then
    case $(basename "$1") in
      dovecot.conf) sed -i 's/^listen = \(.*\), ::1$/listen = \1/' "$tmp" ;;
      main.cf)      sed -i 's/^inet_protocols *= all$/inet_protocols = ipv4/; s# \[::1\]/128##' "$tmp" ;;
      master.cf)    awk '/^\[::1\]:/ {skip=1; next} skip && /^[ \t]/ {next} {skip=0; print}' "$tmp" > "$tmp.2" && mv "$tmp.2" "$tmp" ;;
      config)       sed -i 's/, \[::1\]:15232//' "$tmp" ;;
    esac
  fi
  mv "$tmp" "$2"
}

mkdir -p "$ROOT"/{logs,dovecot/{run,state,mail,shared,ssl},postfix/{etc,spool},radicale/collections}
chmod 755 "$ROOT"
d=$(dirname "$ROOT")   # Dovecot's mail processes (uid 5000) must traverse every parent
while [ "$d" != / ]; do
  [ "$(( 0$(stat -c %a "$d") & 1 ))" = 1 ] || { echo "$d is not o+x; uid $VMAIL cannot reach $ROOT" >&2; exit 1; }
  d=$(dirname "$d")
done

# Dovecot
# bench/scale.py adds bench0001..bench1000 to the live users file (and Postfix's vmailbox);
# keep them, so that a setup run (every `make bench-*`) does not log a running bench out
bench_users=$(grep -hE '^bench[0-9]{4}@' "$ROOT/dovecot/users" 2>/dev/null || true)
bench_boxes=$(grep -hE '^bench[0-9]{4}@' "$POSTFIX_DIR/vmailbox" 2>/dev/null || true)
for f in dovecot.conf users masters; do sub "$HERE/dovecot/$f" "$ROOT/dovecot/$f"; done
[ -z "$bench_users" ] || printf '%s\n' "$bench_users" >> "$ROOT/dovecot/users"
chgrp dovecot "$ROOT/dovecot/users" "$ROOT/dovecot/masters"
chmod 640 "$ROOT/dovecot/users" "$ROOT/dovecot/masters"
chown $VMAIL:$VMAIL "$ROOT/dovecot/mail" "$ROOT/dovecot/shared"
cert=$ROOT/dovecot/ssl/cert.pem key=$ROOT/dovecot/ssl/key.pem
# Throw-away self-signed cert, also the tests' CA.  Its SAN deliberately omits 127.0.0.2.
# Kept across runs (clients may have pinned it) unless missing or expiring within a day.
if [ ! -s "$key" ] || [ ! -s "$cert" ] || ! openssl x509 -checkend 86400 -noout -in "$cert" >/dev/null 2>&1; then
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=localhost" \
    -addext "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1" \
    -keyout "$key" -out "$cert" 2>/dev/null
  echo "TLS: new self-signed cert $cert"
fi
chmod 600 "$key"; chmod 644 "$cert"

# Postfix: the config dir must hold only root-owned files; queue and data dirs live outside it
for f in main.cf master.cf vmailbox virtual_alias.regexp sender_login_maps.regexp defer_recipients.regexp; do
  sub "$HERE/postfix/$f" "$POSTFIX_DIR/$f"
done
[ -z "$bench_boxes" ] || printf '%s\n' "$bench_boxes" >> "$POSTFIX_DIR/vmailbox"
install -d -o postfix -g postfix -m 700 "$ROOT/postfix/lib"   # master.lock lives here

# Radicale
for f in config users rights; do sub "$HERE/radicale/$f" "$ROOT/radicale/$f"; done
chmod 600 "$ROOT/radicale/users"

doveconf -c "$DOVECOT_CONF" -n > /dev/null
postfix -c "$POSTFIX_DIR" check      # also creates missing queue dirs with the right owners

# Servers already running pick up the new configs now.  Radicale reads its rights file
# only at start: restart it (stop.sh radicale && start.sh) if the rights changed.
if [ -s "$ROOT/dovecot/run/master.pid" ] && kill -0 "$(cat "$ROOT/dovecot/run/master.pid")" 2>/dev/null; then
  doveadm -c "$DOVECOT_CONF" reload && echo "dovecot reloaded"
fi
if postfix -c "$POSTFIX_DIR" status >/dev/null 2>&1; then
  postfix -c "$POSTFIX_DIR" reload >/dev/null 2>&1 && echo "postfix reloaded"
fi
echo "setup.sh done in $(ms "$t0") ms (root $ROOT)"
