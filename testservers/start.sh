#!/bin/bash
# Start Dovecot, Postfix and Radicale on loopback and wait for each protocol greeting.
# Idempotent: a server that already answers is left alone.  Prints "started: NAME" for
# each server it did start (the pytest fixture stops only those).  Runs setup.sh first
# if the state dir has no configs yet.
set -euo pipefail
. "$(dirname "$0")/env.sh"
t0=$(date +%s%N)
LOGS=$ROOT/logs
[ -s "$DOVECOT_CONF" ] && [ -s "$POSTFIX_DIR/main.cf" ] && [ -s "$ROOT/radicale/config" ] || bash "$HERE/setup.sh"
probe() { "$PYTHON" "$HERE/probe.py" "$@"; }
fail() { echo "$1 did not start; last lines of $2:" >&2; tail -n 20 "$2" >&2; exit 1; }

# ---- Dovecot: IMAP/POP3/LMTP + SASL socket for Postfix (so it goes first)
if probe imap 10143 0; then
  echo "dovecot: already running"
else
  # ~1,100 concurrent IMAP sessions need many descriptors; the daemons inherit this limit
  want=65536
  if [ "$(ulimit -n)" -lt $want ]; then ulimit -n $want 2>/dev/null || ulimit -n "$(ulimit -Hn)"; fi
  # Each IDLE session's imap process (uid 5000) takes an inotify instance; past the default
  # 128 per user Dovecot falls back to checking every 30 s (mailbox_idle_check_interval), and
  # push at 1,000 mailboxes (bench-scale) took 19 s instead of < 1 s. Best effort: needs root.
  if [ "$(cat /proc/sys/fs/inotify/max_user_instances 2>/dev/null || echo 0)" -lt 8192 ]; then
    sysctl -qw fs.inotify.max_user_instances=8192 2>/dev/null || true
  fi
  # stdio to the log: a daemon holding the caller's pipe would hang subprocess.run()
  dovecot -c "$DOVECOT_CONF" </dev/null >>"$LOGS/dovecot.log" 2>&1 || fail dovecot "$LOGS/dovecot.log"
  { probe imap 10143 30 && probe pop3 10110 10 && probe lmtp 10024 10; } || fail dovecot "$LOGS/dovecot.log"
  echo "started: dovecot (ulimit -n $(ulimit -n))"
fi

# ---- Postfix: submission 10025/10465, MX 10026
if probe smtp 10025 0; then
  echo "postfix: already running"
else
  # check the exit code: a failed start would otherwise cost the whole wait below
  postfix -c "$POSTFIX_DIR" start </dev/null >>"$LOGS/postfix.log" 2>&1 || fail postfix "$LOGS/postfix.log"
  { probe smtp 10025 30 && probe smtp 10026 10; } || fail postfix "$LOGS/postfix.log"
  echo "started: postfix"
fi

# ---- Radicale: CalDAV/CardDAV over HTTP
if probe http 15232 0; then
  echo "radicale: already running"
else
  # A simple command, so $! is the python pid itself (setsid execs without forking here):
  # its own session keeps a Ctrl-C in the caller's terminal from killing it.
  setsid nohup "$PYTHON" -m radicale --config "$ROOT/radicale/config" </dev/null >>"$LOGS/radicale.log" 2>&1 &
  echo $! > "$ROOT/radicale/radicale.pid"
  probe http 15232 30 || fail radicale "$LOGS/radicale.log"
  echo "started: radicale"
fi
echo "start.sh done in $(ms "$t0") ms"
