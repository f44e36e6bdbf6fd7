#!/usr/bin/env bash
# Builds one nginx of the version matrix and the module against it (make test-nginx-versions):
#   scripts/nginx-version.sh SRC_DIR VERSION
# unpacks SRC_DIR/nginx-VERSION.tar.gz (a `git archive` of the release tag: auto/configure, not
# ./configure) into build/nginx-versions/VERSION/, configures it --with-compat with the modules
# the smoke tests use and our addon, and builds nginx and the module with nginx's own CFLAGS
# (gcc: -Werror). Results: build/nginx-versions/VERSION/{nginx,ngx_event_piper_module.so}.
# The output goes to build/nginx-versions/VERSION/build.log; its end is printed on failure.
# Under make -jN the inner make takes its jobs from make's jobserver.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SRC_DIR=${1:?usage: $0 SRC_DIR VERSION}
VERSION=${2:?usage: $0 SRC_DIR VERSION}
OUT=$ROOT/build/nginx-versions/$VERSION
TARBALL=$SRC_DIR/nginx-$VERSION.tar.gz
TREE=$OUT/nginx-$VERSION
LOG=$OUT/build.log
MODULE=ngx_event_piper_module.so

die() { echo "nginx $VERSION: $*" >&2; exit 1; }

[[ -f $TARBALL ]] || die "$TARBALL not found (NGINX_SRC_DIR names the folder of nginx-<version>.tar.gz)"

# nginx adds its warning flags and -Werror only when CFLAGS is empty (auto/cc/conf): keep them.
unset CFLAGS

# Only modules that nginx 1.24 to mainline all have, and that the smoke tests, the harness's
# prelude (the *_temp_path directives) or nginx.conf.example use; the rest is left out to keep
# the build short. http_v2 because the module behaves differently on HTTP/2 streams.
CONFIGURE_ARGS=(
    --prefix="$OUT/prefix"
    --with-compat
    --with-http_auth_request_module
    --with-http_v2_module
    --without-http_gzip_module
    --without-http_ssi_module
    --without-http_userid_module
    --without-http_auth_basic_module
    --without-http_mirror_module
    --without-http_autoindex_module
    --without-http_geo_module
    --without-http_split_clients_module
    --without-http_referer_module
    --without-http_grpc_module
    --without-http_memcached_module
    --without-http_limit_conn_module
    --without-http_limit_req_module
    --without-http_empty_gif_module
    --without-http_browser_module
    --add-dynamic-module="$ROOT"
)

mkdir -p "$OUT"
: >"$LOG"

if [[ ! -f $TREE/auto/configure || $TARBALL -nt $TREE/auto/configure ]]; then
    rm -rf "$TREE" "$TREE.tmp"
    mkdir -p "$TREE.tmp"
    tar -xzf "$TARBALL" -C "$TREE.tmp" --strip-components=1
    touch "$TREE.tmp/auto/configure" # newer than the tarball: unpacked once
    mv "$TREE.tmp" "$TREE"
fi
[[ -x $TREE/auto/configure ]] || die "$TARBALL has no auto/configure (not an nginx source tree?)"

# configure again when its arguments, our addon config or the set of our sources change.
stamp_file=$TREE/.event_piper_configure.stamp
stamp=$({
    printf '%s\n' "${CONFIGURE_ARGS[@]}"
    sha256sum "$ROOT/config"
    cd "$ROOT" && find . -maxdepth 1 -name '*.cpp' && find src -type f | LC_ALL=C sort
} | sha256sum | cut -d' ' -f1)

if [[ ! -f $TREE/objs/Makefile || ! -f $stamp_file || $(cat "$stamp_file") != "$stamp" ]]; then
    rm -f "$stamp_file"
    if ! (cd "$TREE" && auto/configure "${CONFIGURE_ARGS[@]}") >>"$LOG" 2>&1; then
        tail -n 30 "$LOG" >&2
        [[ -s $TREE/objs/autoconf.err ]] && tail -n 20 "$TREE/objs/autoconf.err" >&2
        die "configure failed (log: $LOG)"
    fi
    echo "$stamp" >"$stamp_file"
fi

# nginx's Makefile knows only the headers that `config` lists: recompile the addon objects if
# any of our headers is newer than the module.
built=$TREE/objs/$MODULE
if [[ -f $built ]] &&
    [[ -n $(find "$ROOT/src" -type f \( -name '*.h' -o -name '*.hpp' \) \
       -newer "$built" -print -quit) ]]; then
    find "$TREE/objs" -path "$TREE/objs/addon/*" -name '*.o' -delete
fi

# The repository tree has no top-level Makefile (a release tarball's configure writes one).
if ! make -C "$TREE" -f objs/Makefile >>"$LOG" 2>&1; then
    grep -E -A3 'error|Error' "$LOG" | tail -n 40 >&2
    die "build failed (log: $LOG)"
fi

for f in nginx "$MODULE"; do
    [[ -f $TREE/objs/$f ]] || die "$TREE/objs/$f was not produced"
    # by rename, never in place: a running nginx may have the old file mapped
    cmp -s "$TREE/objs/$f" "$OUT/$f" || { cp "$TREE/objs/$f" "$OUT/$f.tmp" && mv -f "$OUT/$f.tmp" "$OUT/$f"; }
done
echo "nginx $VERSION: $("$OUT/nginx" -v 2>&1 | sed 's/^nginx version: //') and the module in $OUT"
