# Shared settings for the testservers/*.sh scripts (sourced, not run).
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# State dir: configs, mail, queue, logs.  It and its parents must be o+x (mail runs as uid 5000).
ROOT=${SERVERSYNC_TESTSERVERS_ROOT:-/srv/serversync-test}
# The project's venv: Radicale is pip-installed there, and the scripts' helpers run with it.
PYTHON=${PYTHON:-$(cd "$HERE/.." && pwd)/.venv/bin/python}
DOVECOT_CONF=$ROOT/dovecot/dovecot.conf
POSTFIX_DIR=$ROOT/postfix/etc
ms() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }
