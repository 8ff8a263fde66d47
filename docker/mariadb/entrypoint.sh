#!/bin/sh
# First start on an empty datadir: install the system tables, then let mariadbd
# create the database and user from the environment (--init-file runs before it
# accepts connections, so the healthcheck passes only once they exist).
# Later starts run mariadbd as is. Extra arguments go to mariadbd.
set -eu
datadir=/var/lib/mysql
set -- --datadir="$datadir" --bind-address=0.0.0.0 --port=3306 "$@"
if [ ! -d "$datadir/mysql" ]; then
  : "${MARIADB_DATABASE:?set MARIADB_DATABASE}" "${MARIADB_USER:?set MARIADB_USER}" \
    "${MARIADB_PASSWORD:?set MARIADB_PASSWORD}"
  mariadb-install-db --user=mysql --datadir="$datadir" --auth-root-authentication-method=socket \
    --skip-test-db >/dev/null
  init=/run/mysqld/init.sql
  cat >"$init" <<SQL
CREATE DATABASE IF NOT EXISTS \`$MARIADB_DATABASE\`;
CREATE USER IF NOT EXISTS '$MARIADB_USER'@'%' IDENTIFIED BY '$MARIADB_PASSWORD';
GRANT ALL ON \`$MARIADB_DATABASE\`.* TO '$MARIADB_USER'@'%';
SQL
  set -- "$@" --init-file="$init"
fi
exec mariadbd "$@"
