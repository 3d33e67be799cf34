#!/bin/sh
set -e
if [ "${1#-}" != "$1" ]; then set -- mysqld "$@"; fi
if [ "$1" = mysqld ]; then
  mkdir -p /var/lib/mysql /run/mysqld
  chown -R mysql:mysql /var/lib/mysql /run/mysqld
  if [ ! -d /var/lib/mysql/mysql ]; then
    : "${MYSQL_ROOT_PASSWORD:?MYSQL_ROOT_PASSWORD must be set}"
    mariadb-install-db --user=mysql --datadir=/var/lib/mysql --auth-root-authentication-method=normal --skip-test-db >/dev/null
    sql=$(mktemp)
    {
      echo "FLUSH PRIVILEGES;"
      echo "DELETE FROM mysql.global_priv WHERE User='';"
      echo "ALTER USER 'root'@'localhost' IDENTIFIED BY '$MYSQL_ROOT_PASSWORD';"
      [ -n "$MYSQL_DATABASE" ] && echo "CREATE DATABASE IF NOT EXISTS \`$MYSQL_DATABASE\`;"
      if [ -n "$MYSQL_USER" ]; then
        echo "CREATE USER '$MYSQL_USER'@'%' IDENTIFIED BY '$MYSQL_PASSWORD';"
        [ -n "$MYSQL_DATABASE" ] && echo "GRANT ALL ON \`$MYSQL_DATABASE\`.* TO '$MYSQL_USER'@'%';"
      fi
      echo "FLUSH PRIVILEGES;"
    } > "$sql"
    chown mysql "$sql"
    mysqld --user=mysql --datadir=/var/lib/mysql --bootstrap --skip-networking < "$sql"
    rm -f "$sql"
  fi
  shift
  exec mysqld --user=mysql --datadir=/var/lib/mysql --bind-address=127.0.0.1 "$@"
fi
exec "$@"
