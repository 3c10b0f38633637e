#!/bin/sh
# The training step of fips and of the PyTorch peer (../shared/tools/peer_fips_step.py: autograd +
# AdamW, the reference implementation's way) on the same shapes and threads, in one run, and the
# ratio of their median step times (> 1: fips is faster).
#
#   sh scripts/peer.sh [THREADS] [STEPS]          (defaults: 2 threads, 20 steps)
#   PYTHON=/path/to/venv/bin/python sh scripts/peer.sh 2
#
# Shapes: a DeiT-tiny group (d 192, I 768, 4 blocks, 2048 tokens) and a DeiT-B group (d 768,
# I 3072, 4 blocks, 1024 tokens), p = 0.5, s = 0.75. The peer runs in both of its modes
# (factored: (X U) V; dense: W = U V first) and the ratio is taken against its faster mode.
# Needs PyTorch for $PYTHON (pip install torch); prints the machine (lscpu model name) first.
set -eu
THREADS=${1:-2}
STEPS=${2:-20}
PYTHON=${PYTHON:-python3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PEER=${PEER:-$ROOT/../shared/tools/peer_fips_step.py}
cd "$ROOT"
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "PyTorch is not importable by $PYTHON (set PYTHON=... or pip install torch)" >&2
    exit 1
fi
cargo build --release --quiet --example step_speed
echo "machine: $(lscpu | sed -n 's/^Model name: *//p') ($(nproc) cores), load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "threads $THREADS (OPENBLAS_NUM_THREADS and torch.set_num_threads), $STEPS timed steps each"
printf '%-10s %12s %14s %14s %10s\n' shape "fips (ms)" "torch fact." "torch dense" "ratio"
for case in "tiny 192 768 4 2048" "base 768 3072 4 1024"; do
    set -- $case
    name=$1 d=$2 i=$3 n=$4 tokens=$5
    steps=$STEPS
    [ "$name" = base ] && steps=$(( STEPS / 4 > 3 ? STEPS / 4 : 3 ))
    fips_ms=$(OPENBLAS_NUM_THREADS=$THREADS ./target/release/examples/step_speed "$name" "$steps" "$THREADS" "$tokens" \
        | awk '/^step /{print $3}')
    fact_s=$(OMP_NUM_THREADS=$THREADS "$PYTHON" "$PEER" "$d" "$i" "$n" 0.5 0.75 "$tokens" "$steps" factored "$THREADS" 2>/dev/null \
        | sed -n 's/.*median_step_s=\([0-9.]*\).*/\1/p')
    dense_s=$(OMP_NUM_THREADS=$THREADS "$PYTHON" "$PEER" "$d" "$i" "$n" 0.5 0.75 "$tokens" "$steps" dense "$THREADS" 2>/dev/null \
        | sed -n 's/.*median_step_s=\([0-9.]*\).*/\1/p')
    awk -v name="$name" -v f="$fips_ms" -v a="$fact_s" -v b="$dense_s" 'BEGIN {
        best = (a < b ? a : b) * 1000;
        printf "%-10s %12.1f %14.1f %14.1f %9.2fx\n", name, f, a * 1000, b * 1000, best / f }'
done
