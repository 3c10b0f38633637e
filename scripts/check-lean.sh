#!/bin/sh
# The lean library: built with no optional feature, the crate pulls in none of the application's
# dependencies (image, clap, indicatif, candle, tokenizers) and compiles none of its room (src/app, gated by the `app`
# feature, which tests/layers.rs checks); built with no LAPACK backend, it stops with a message
# naming the backend features instead of failing at link time.
set -eu
cd "$(dirname "$0")/.."
CARGO=${CARGO:-cargo}

lean=$($CARGO tree -e normal --no-default-features --features openblas-system --prefix none \
    --format '{p}' | grep -E '^(image|clap|indicatif|png|jpeg-decoder|zune-jpeg|candle-core|candle-nn|candle-transformers|tokenizers) ' || true)
if [ -n "$lean" ]; then
    echo "check-lean: the lean library depends on application crates:" >&2
    echo "$lean" >&2
    exit 1
fi
warnings=$($CARGO check --lib --no-default-features --features openblas-system 2>&1 | grep -c '^warning' || true)
if [ "$warnings" != "0" ]; then
    $CARGO check --lib --no-default-features --features openblas-system >&2
    echo "check-lean: the lean library builds with warnings (dead code behind a feature?)" >&2
    exit 1
fi

out=$($CARGO check --lib --quiet --no-default-features 2>&1 || true)
if ! printf '%s' "$out" | grep -q "needs a LAPACK/BLAS backend"; then
    echo "check-lean: a build without a backend must name the backend features; got:" >&2
    printf '%s\n' "$out" | tail -20 >&2
    exit 1
fi
echo "check-lean: lean library OK (no app dependencies; missing backend is named)"
