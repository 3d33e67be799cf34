#!/bin/sh
set -e
if [ "${1#-}" != "$1" ]; then set -- memcached -u nobody -l 127.0.0.1 -U 0 "$@"; fi
exec "$@"
