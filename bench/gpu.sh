#!/usr/bin/env bash
# Every GPU check of the benchmarks in one call, for a session lent the device machine
# (one H100/H200, about 15 minutes in all): the real architectures with random weights.
#
#   on the device:   bash bench/gpu.sh                 (figures and logs under $OUT)
#   here, on a CPU:  SMOKE=1 bash bench/gpu.sh         (tiny sizes: checks the script runs)
#
# The device image has torch, transformers, timm, accelerate, pyarrow, opencv and scikit-image;
# the rest travels as wheels in .whl (see /work/.library/device/README.md), installed first here.
# generate and ground need about 9 MB of wheels: diffusers, open_clip_torch, ftfy, wcwidth,
# pycocotools, segment-anything. score runs the real stage over a catalog and needs duckdb,
# polars and lancedb too (about 240 MB, over the 64 MiB a call carries): it is skipped unless
# NO_SCORE=0, until it gets a path without the catalog.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/gpu}
mkdir -p "$OUT"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null \
    || echo "no GPU"; date -u) > "$OUT/card.txt"

run() {  # name, time limit (s), command...
    local name=$1 limit=$2; shift 2
    echo "== $name: $*"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "   exit $? (log: $OUT/$name.log)"; tail -n 12 "$OUT/$name.log"
}

if [ "${SMOKE:-0}" = 1 ]; then
    TINY=$(mktemp -d)
    run generate 600 "$PY" bench/generate.py --device cpu --size 64 --pairs 4 --stock-pairs 2 --batch 4
    run score 600 "$PY" bench/score.py --device cpu --size 64 --pairs 8 --naive-pairs 4 --out "$OUT/score.json"
    run ground 600 "$PY" bench/masks.py --real --device cpu --tiny "$TINY" --anchors 2 --edits-per-anchor 2
else
    run generate 300 "$PY" bench/generate.py --real-arch --device cuda --size 512 --pairs 64 --batch 16
    [ "${NO_SCORE:-1}" = 0 ] && run score 240 "$PY" bench/score.py --real --device cuda --out "$OUT/score.json"
    run ground 180 "$PY" bench/masks.py --real --device cuda --anchors 16 --edits-per-anchor 2
fi
