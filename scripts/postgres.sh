#!/usr/bin/env bash
# A throwaway PostgreSQL for tests and trials (the coordinator's "postgres" store backend).
#   scripts/postgres.sh install     installs Debian's PostgreSQL 15 if no initdb is found
#   scripts/postgres.sh start DIR   creates a cluster in DIR unless DIR holds one, starts it on
#                                   a Unix socket in DIR (no TCP port), prints its connection
#                                   string
#   scripts/postgres.sh stop DIR    stops it (the files stay; delete DIR)
# PostgreSQL refuses to run as root: as root, the cluster runs as the `postgres` user.
set -euo pipefail

bindir() {
  local d
  for d in /usr/lib/postgresql/*/bin; do
    [[ -x "$d/initdb" ]] && { echo "$d"; return 0; }
  done
  command -v initdb >/dev/null && { dirname "$(command -v initdb)"; return 0; }
  return 1
}

as_owner() {
  if [[ $(id -u) == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

case "${1:-}" in
  install)
    # A DIR argument is accepted and ignored (the tests pass one to every verb).
    if bindir >/dev/null; then exit 0; fi
    [[ $(id -u) == 0 ]] || { echo "postgres.sh: PostgreSQL is not installed and installing needs root" >&2; exit 1; }
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq postgresql-15 >/dev/null
    bindir >/dev/null
    ;;
  start)
    dir=$(realpath -m "${2:?usage: postgres.sh start DIR}")
    bin=$(bindir) || { echo "postgres.sh: no PostgreSQL found: run scripts/postgres.sh install" >&2; exit 1; }
    mkdir -p "$dir"
    [[ $(id -u) == 0 ]] && chown postgres "$dir"
    if [[ ! -f "$dir/data/PG_VERSION" ]]; then
      as_owner "$bin/initdb" -D "$dir/data" -U spa --auth=trust -E UTF8 --no-sync >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; exit 1; }
    fi
    as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 30 \
      -o "-k $dir -c listen_addresses= -c fsync=on" start >/dev/null \
      || { cat "$dir/server.log" >&2; exit 1; }
    echo "host=$dir user=spa dbname=postgres"
    ;;
  stop)
    dir=$(realpath -m "${2:?usage: postgres.sh stop DIR}")
    bin=$(bindir)
    as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null
    ;;
  *)
    sed -n '2,8p' "$0" >&2
    exit 2
    ;;
esac
