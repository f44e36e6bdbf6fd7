#!/usr/bin/env bash
# Builds build/ngx_event_piper_module.so against Debian's nginx-dev sources (nginx 1.22.1,
# configured --with-compat with Debian's own flags, so the module loads into /usr/sbin/nginx).
#   scripts/build.sh               -> build/ngx_event_piper_module.so
#   SANITIZE=1 scripts/build.sh    -> build/asan/ngx_event_piper_module.so (ASan + UBSan)
# nginx's configure runs only when its inputs change (the repo's `config`, the source list, the
# flags); after that, `make modules` rebuilds only what changed.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NGX_SRC=${NGX_SRC:-/usr/share/nginx/src}
JOBS=${JOBS:-2}
MODULE=ngx_event_piper_module.so

die() { echo "build: $*" >&2; exit 1; }

[[ -f $ROOT/config ]] || die "$ROOT/config is missing (the nginx addon config)"
[[ -r $NGX_SRC/conf_flags && -x $NGX_SRC/configure ]] ||
    die "$NGX_SRC not found: install nginx-dev (scripts/deps.sh)"

if [[ ${SANITIZE:-0} == 1 ]]; then
    OUT=$ROOT/build/asan
    EXTRA_FLAGS=(
        "--with-cc-opt=-fsanitize=address,undefined -fno-omit-frame-pointer -g -O1"
        "--with-ld-opt=-fsanitize=address,undefined"
    )
else
    OUT=$ROOT/build
    EXTRA_FLAGS=("--with-cc-opt=-g -O2 -fstack-protector-strong -D_FORTIFY_SOURCE=2")
fi
TREE=$OUT/nginx-src

# A private copy of the nginx sources: configure writes objs/ next to them.
if [[ ! -x $TREE/configure ]]; then
    echo "build: copying $NGX_SRC to $TREE"
    mkdir -p "$OUT"
    rm -rf "$TREE.tmp"
    cp -a "$NGX_SRC" "$TREE.tmp"
    mv "$TREE.tmp" "$TREE"
fi

# shellcheck source=/dev/null
source "$NGX_SRC/conf_flags" # defines the bash array NGX_CONF_FLAGS
CONFIGURE_ARGS=("${NGX_CONF_FLAGS[@]}" "${EXTRA_FLAGS[@]}" "--add-dynamic-module=$ROOT")

# Re-run configure when `config` changes, and also when a source file is added or removed
# (config may list or glob them; objs/Makefile holds the resulting list).
stamp_file=$TREE/.event_piper_configure.stamp
stamp=$({
    printf '%s\n' "${CONFIGURE_ARGS[@]}"
    sha256sum "$ROOT/config"
    cd "$ROOT" && find . -maxdepth 1 -name '*.cpp' && find src -type f 2>/dev/null | LC_ALL=C sort
} | sha256sum | cut -d' ' -f1)

if [[ ! -f $TREE/objs/Makefile || ! -d $TREE/objs/addon || ! -f $stamp_file || $(cat "$stamp_file") != "$stamp" ]]; then
    echo "build: configuring nginx in $TREE (log: $TREE/configure.log)"
    rm -f "$stamp_file"
    if ! (cd "$TREE" && ./configure "${CONFIGURE_ARGS[@]}") >"$TREE/configure.log" 2>&1; then
        tail -n 30 "$TREE/configure.log" >&2
        [[ -s $TREE/objs/autoconf.err ]] && tail -n 20 "$TREE/objs/autoconf.err" >&2
        die "nginx configure failed"
    fi
    echo "$stamp" >"$stamp_file"
fi

# nginx's Makefile only knows the headers that `config` lists in ngx_module_deps: if any of our
# headers is newer than the module, recompile the addon objects so a stale .so is never installed.
built=$TREE/objs/$MODULE
if [[ -f $built ]] &&
    [[ -n $(find "$ROOT" -path "$ROOT/build" -prune -o -path "$ROOT/.git" -prune -o \
        -type f \( -name '*.h' -o -name '*.hpp' \) -newer "$built" -print -quit) ]]; then
    find "$TREE/objs" -path "$TREE/objs/addon/*" -name '*.o' -delete
fi

make -C "$TREE" -f objs/Makefile modules -j"$JOBS"

[[ -f $built ]] || die "$built was not produced (is ngx_module_name ngx_event_piper_module?)"
# Install by rename, never in place: a running nginx has the old file mapped.
if ! cmp -s "$built" "$OUT/$MODULE"; then
    cp "$built" "$OUT/$MODULE.tmp"
    mv -f "$OUT/$MODULE.tmp" "$OUT/$MODULE"
fi
echo "build: $OUT/$MODULE"
