#!/bin/bash
# orch-logging serve | logship | any other command (run as it is).
set -uo pipefail
fail() { echo "orch-logging: $*" >&2; exit 1; }
check() { local out; out=$(rsyslogd -N1 -f "$1" 2>&1) || { printf '%s\n' "$out" >&2; return 1; }; }

serve() {
  [[ ${SYSLOG_PORT:-} =~ ^[0-9]+$ ]] || fail "SYSLOG_PORT (the RELP port) must be a port number"
  export LOG_DIR=${LOG_DIR:-/var/lib/orch-logs}
  logstore init || exit 1  # the settings (PORT, LOG_USER, LOG_PASSWORD, ...) and the database
  mkdir -p "$LOG_DIR/rsyslog"
  conf=/run/orch-logging/rsyslog.conf
  mkdir -p "${conf%/*}"
  sed -e "s|@LOG_DIR@|$LOG_DIR|g" -e "s|@SYSLOG_PORT@|$SYSLOG_PORT|g" /etc/orch-logging/serve.conf > "$conf"
  check "$conf" || fail "rsyslog refuses $conf"

  # Two processes; when either ends, the other is stopped and the container exits (Docker shows
  # it and its restart policy applies). SIGTERM stops both: rsyslog saves its queue.
  rsyslogd -n -f "$conf" -i /run/orch-logging/rsyslogd.pid & rsyslog=$!
  logstore serve & web=$!
  stopping=0
  trap 'stopping=1; kill -TERM $rsyslog $web 2>/dev/null' TERM INT
  wait -n
  status=$?
  [ $stopping = 1 ] || echo "orch-logging: $( kill -0 $rsyslog 2>/dev/null && echo 'logstore serve' || echo rsyslogd ) ended ($status): stopping" >&2
  kill -TERM $rsyslog $web 2>/dev/null
  wait $rsyslog; wait $web
  [ $stopping = 1 ] && exit 0
  exit $(( status == 0 ? 1 : status ))
}

logship() {
  [ -n "${LOGSHIP_CONF:-}" ] || fail "LOGSHIP_CONF (the shipper's rsyslog configuration) is empty"
  mkdir -p /var/spool/orch-logship /run/orch-logging
  conf=/run/orch-logging/logship.conf
  printf '%s\n' "$LOGSHIP_CONF" > "$conf"
  check "$conf" || fail "rsyslog refuses the configuration in LOGSHIP_CONF"
  exec rsyslogd -n -f "$conf" -i /run/orch-logging/rsyslogd.pid
}

case "${1:-serve}" in
  serve) serve ;;
  logship) logship ;;
  *) exec "$@" ;;
esac
