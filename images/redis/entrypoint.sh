#!/bin/sh
set -e
if [ "${1#-}" != "$1" ]; then set -- redis-server --bind 127.0.0.1 --protected-mode no "$@"; fi
exec "$@"
