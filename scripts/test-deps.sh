#!/usr/bin/env bash
# Installs everything the test suite needs that a fresh Debian machine lacks,
# with pinned versions, and prints what is installed. Idempotent; needs root
# for apt. Run it once before `cargo nextest run`; .ci/run calls it.
#
#   Debian:  PostgreSQL 15 server and client tools (psql, pgbench), pgjdbc
#            (libpostgresql-jdbc-java), Java, Node.js and npm, promtool
#            (prometheus; tests/deploy.rs checks deploy/prometheus with it),
#            Chromium and chromedriver (chromium, chromium-driver: the
#            dashboard's browser test)
#   PyPI:    tests/drivers/python/requirements.txt (psycopg 3, asyncpg, psycopg2)
#   npm:     tests/drivers/node/package-lock.json (pg, pg-copy-streams, postgres)
#   PostgreSQL 17 (scripts/install-pg17.sh), cargo-nextest
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { echo; echo "=== test-deps: $* ($(date -u +%H:%M:%S)) ==="; }

step "Debian packages"
PG15_BIN=/usr/lib/postgresql/15/bin
missing=()
[ -x "$PG15_BIN/postgres" ] || missing+=(postgresql-15)
{ [ -x "$PG15_BIN/psql" ] && [ -x "$PG15_BIN/pgbench" ]; } || missing+=(postgresql-client-15)
[ -f /usr/share/java/postgresql.jar ] || missing+=(libpostgresql-jdbc-java)
command -v java >/dev/null 2>&1 || missing+=(default-jre-headless)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
command -v runuser >/dev/null 2>&1 || missing+=(util-linux)
[ -x /bin/kill ] || [ -x /usr/bin/kill ] || missing+=(procps)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing: ${missing[*]}"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
    echo "all present"
fi
id postgres >/dev/null 2>&1 || { echo "no 'postgres' OS user" >&2; exit 1; }
"$PG15_BIN/postgres" --version
"$PG15_BIN/psql" --version
java -version 2>&1 | head -n1
ls /usr/share/java/postgresql-[0-9]*.jar
promtool --version 2>&1 | head -n1
/usr/bin/chromium --version
/usr/bin/chromedriver --version

step "Python drivers"
python3 -m pip install --quiet -r tests/drivers/python/requirements.txt
python3 -c "import psycopg, asyncpg, psycopg2; print('psycopg', psycopg.__version__, '| asyncpg', asyncpg.__version__, '| psycopg2', psycopg2.__version__.split()[0])"

step "Node drivers"
node --version
(cd tests/drivers/node && npm ci --no-audit --no-fund --loglevel=error)
(cd tests/drivers/node && npm ls --depth=0)

step "PostgreSQL 17"
PG17_BIN="$(bash scripts/install-pg17.sh | tail -n1)"
"$PG17_BIN/postgres" --version

step "cargo-nextest"
if ! cargo nextest --version >/dev/null 2>&1; then
    cargo install --locked cargo-nextest
fi
cargo nextest --version | head -n1
