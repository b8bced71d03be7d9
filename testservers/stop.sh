#!/bin/bash
# Stop the servers started by start.sh, by the pid each one recorded, and wait until they
# are gone.  usage: stop.sh [dovecot] [postfix] [radicale]   (default: all three)
# SIGTERM is each one's orderly stop (= "doveadm stop" / "postfix stop"); all are
# signalled at once because Dovecot's master alone takes ~3 s to exit.
set -euo pipefail
. "$(dirname "$0")/env.sh"
t0=$(date +%s%N)
declare -A PIDFILE=(
  [dovecot]=$ROOT/dovecot/run/master.pid
  [postfix]=$ROOT/postfix/spool/pid/master.pid
  [radicale]=$ROOT/radicale/radicale.pid
)
declare -A COMM=([dovecot]=dovecot [postfix]=master [radicale]=python)
names=("$@"); ((${#names[@]})) || names=(dovecot postfix radicale)
declare -A PIDS=()
for name in "${names[@]}"; do
  file=${PIDFILE[$name]:?unknown server $name}
  [ -s "$file" ] || continue
  pid=$(tr -d ' \n' < "$file")
  # never signal a recycled pid: it must still be the expected program
  if kill -0 "$pid" 2>/dev/null && [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == ${COMM[$name]}* ]]; then
    kill -TERM "$pid"; PIDS[$name]=$pid
  fi
done
for name in "${!PIDS[@]}"; do
  pid=${PIDS[$name]}
  for _ in $(seq 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
  if kill -0 "$pid" 2>/dev/null; then echo "$name ($pid) still running after 10 s: SIGKILL"; kill -KILL "$pid"; fi
  echo "stopped: $name ($pid)"
done
# stale pid files go, so a later run never signals a recycled pid (Dovecot removes its own)
for name in "${names[@]}"; do [ "$name" = dovecot ] || rm -f "${PIDFILE[$name]}"; done
echo "stop.sh done in $(ms "$t0") ms"
