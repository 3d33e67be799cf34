#!/bin/bash
# The monitoring job: the blackbox exporter (loopback only) and Prometheus (all pages and APIs
# behind basic auth) on the configuration the platform's node writes into $conf. If either
# process dies the job exits, so the platform sees it and restarts it.
# Reloads: POST /-/reload on Prometheus (with the credentials) re-reads prometheus.yml and
# rules.yml; POST http://127.0.0.1:$BLACKBOX_PORT/-/reload re-reads blackbox.yml. targets/*.json
# need neither: Prometheus watches them.
set -euo pipefail
conf=/etc/orch-monitoring
data=/var/lib/orch-monitoring
private=/run/orch-monitoring  # outside $conf: the password hash never lands where the node writes
shared=/usr/share/orch-monitoring

fail() { echo "orch-monitoring: $*" >&2; exit 1; }
[[ ${PORT:-} =~ ^[0-9]+$ ]] || fail "PORT (Prometheus' web port) must be set"
[[ ${BLACKBOX_PORT:-} =~ ^[0-9]+$ ]] || fail "BLACKBOX_PORT (the blackbox exporter's port) must be set"
[ -n "${MONITOR_USER:-}" ] && [ -n "${MONITOR_PASSWORD:-}" ] || fail "MONITOR_USER and MONITOR_PASSWORD must be set"
[[ $MONITOR_USER =~ ^[A-Za-z0-9._-]+$ ]] || fail "MONITOR_USER may hold only letters, digits, '.', '_' and '-'"
env_name=${ORCH_ENV:-}
[[ $env_name =~ ^[A-Za-z0-9._-]*$ ]] || fail "ORCH_ENV may hold only letters, digits, '.', '_' and '-'"
for file in prometheus.yml rules.yml blackbox.yml; do
  [ -r "$conf/$file" ] || fail "no $conf/$file: the platform writes it before the start"
done

umask 077
mkdir -p "$private/console_libraries" "$data"
hash=$(printf '%s' "$MONITOR_PASSWORD" | htpasswd -inBC 10 "$MONITOR_USER" | cut -d: -f2-)
unset MONITOR_PASSWORD
printf 'basic_auth_users:\n  "%s": "%s"\n' "$MONITOR_USER" "$hash" > "$private/web.yml"
# The console page names its environment through a library the page includes.
cp "$shared"/console_libraries/* "$private/console_libraries/"
printf '{{ define "orch_env" }}%s{{ end }}\n' "$env_name" > "$private/console_libraries/env.lib"

prometheus-blackbox-exporter --config.file="$conf/blackbox.yml" \
  --web.listen-address="127.0.0.1:$BLACKBOX_PORT" --log.level=warn &
blackbox=$!
prometheus --config.file="$conf/prometheus.yml" --web.config.file="$private/web.yml" \
  --storage.tsdb.path="$data" --storage.tsdb.retention.time="${RETENTION:-15d}" \
  --web.enable-lifecycle --web.listen-address="0.0.0.0:$PORT" \
  --web.page-title="Monitoring ${env_name}" \
  --web.console.templates="$shared/consoles" --web.console.libraries="$private/console_libraries" \
  --log.level=warn &
prometheus=$!

stopping=0
trap 'stopping=1; kill -TERM "$blackbox" "$prometheus" 2>/dev/null || :' TERM INT
status=0
wait -n "$blackbox" "$prometheus" || status=$?
kill -TERM "$blackbox" "$prometheus" 2>/dev/null || :
wait || :
[ "$stopping" = 1 ] && exit 0
echo "orch-monitoring: a process exited (status $status): stopping the job" >&2
exit $(( status == 0 ? 1 : status ))
