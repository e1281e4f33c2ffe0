#!/usr/bin/env bash
# Every GPU benchmark of the pipeline's compute in one call, for a session lent the device
# machine (one H100/H200, about 15 minutes in all): generate, score and ground, the real
# architectures with random weights, each against its baseline in the same run.
#
#   here, first:     .venv/bin/python bench/wheels.py   (fills .whl/ with the wheels to carry;
#                                                        fails unless they and the working
#                                                        tree total under 64 MiB)
#   on the device:   bash bench/gpu.sh                   (run with carry [".whl"]; figures
#                                                        and logs under $OUT)
#   here, on a CPU:  SMOKE=1 bash bench/gpu.sh           (tiny models and sizes, the same code
#                                                        paths; tests/test_gpu_bench.py runs it)
#
# Each benchmark runs a stage's compute without the catalog (ultracurate.generation,
# ultracurate.scoring, ultracurate.grounding): nothing here imports DuckDB, polars or LanceDB.
# The device image has torch, transformers, timm, accelerate, pyarrow, opencv and scikit-image;
# bench/device-wheels.txt lists what travels as wheels (diffusers, open_clip_torch,
# segment-anything, pycocotools, our transformers and huggingface_hub, ...): about 23 MiB.
# Each benchmark writes its figures as JSON beside its log; the script exits 1 when any of them
# fails (a non-zero exit, or a timeout). The device limits add up to 570 s, inside the 600 s
# one device command may run: give the call timeout_s 600.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/gpu}
mkdir -p "$OUT"
if [ "${SMOKE:-0}" != 1 ] && ls .whl/*.whl >/dev/null 2>&1; then
    # the device's Python 3.12 wheels; a smoke run uses the environment it is given
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# offline, and no progress bars in the logs (model loading draws them)
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 TQDM_DISABLE=1 HF_HUB_DISABLE_PROGRESS_BARS=1
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null \
    || echo "no GPU"; date -u) > "$OUT/card.txt"

failed=()
run() {  # name, time limit (s), command...
    local name=$1 limit=$2 rc; shift 2
    echo "== $name: $*"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    echo "   exit $rc (log: $OUT/$name.log)"; tail -n 8 "$OUT/$name.log"
    [ "$rc" = 0 ] || failed+=("$name")
}

if [ "${SMOKE:-0}" = 1 ]; then
    TINY=$(mktemp -d)
    trap 'rm -rf "$TINY"' EXIT
    run generate 300 "$PY" bench/generate.py --device cpu --size 64 --pairs 2 --stock-pairs 1 \
        --batch 2 --out "$OUT/generate.json"
    run score 300 "$PY" bench/score.py --device cpu --size 64 --pairs 4 --naive-pairs 2 \
        --batch-size 2 --out "$OUT/score.json"
    run ground 300 "$PY" bench/masks.py --real --device cpu --tiny "$TINY" --anchors 1 \
        --edits-per-anchor 2 --batch 2 --out "$OUT/ground.json"
else
    run generate 220 "$PY" bench/generate.py --real-arch --device cuda --size 512 --pairs 64 \
        --batch 16 --out "$OUT/generate.json"
    run score 200 "$PY" bench/score.py --real --device cuda --out "$OUT/score.json"
    run ground 150 "$PY" bench/masks.py --real --device cuda --anchors 16 --edits-per-anchor 2 \
        --out "$OUT/ground.json"
fi

if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "all benchmarks passed: figures in $OUT/{generate,score,ground}.json"
