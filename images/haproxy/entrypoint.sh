#!/bin/sh
# The proxy job: HAProxy's master (reloads through its master socket) on the platform's config.
set -e
dir=${PROXY_DIR:-/run/orch-proxy}
[ -f "$dir/haproxy.cfg" ] || { echo "no $dir/haproxy.cfg: the platform writes it before the start" >&2; exit 1; }
exec haproxy -W -db -S "$dir/master.sock,mode,600" -f "$dir/haproxy.cfg" "$@"
