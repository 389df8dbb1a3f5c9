#!/usr/bin/env bash
# The GPU numbers of docs/benchmarks.md in one command, on a machine with one GPU:
#   1. tools/bench_moe.py --device cuda --dtype bf16 at the paper's widths (S 384, B 768, L 1024),
#      E8 / E16, pools of 16384 (64 images) and 65536 tokens: ms, ratio vs dense, TFLOP/s, MFU;
#   2. synthetic latents (tools/make_synthetic_latents.py) and a short bf16 training run of
#      DiffMoE-L-E16 through tools/scaling_study.py (one layout): samples/s, model TFLOP/s and MFU
#      per GPU (diffmoe_dist/models/flops.py), peak memory, after WARMUP logged steps;
#   3. tools/bench_step.py --device cuda --dtype bf16: the whole training step of DiffMoE-L-E16
#      against Dense-DiT-L, one GPU, 32 images (issue 15: MFU against the matmul peak measured in
#      the same run, host syncs per step, peak memory) -> step.json.
#
#   bash tools/gpu_numbers.sh OUT_DIR      (--help: this text)
#
# Everything is overridable from the environment (defaults in brackets): DEVICE [cuda], CONFIG
# [configs/imagenet256/diffmoe_l_e16.yaml], MICRO [64] samples per step, STEPS [40], WARMUP [10],
# WIDTHS [384,768,1024], EXPERTS [8,16], TOKENS [16384,65536], REPEATS [5], PRECISION [bf16],
# STEP_SIZES [L], STEP_IMAGES [32], STEP_ARGS [] (more bench_step.py flags, e.g. --set k=v).
# Memory: the planner's model (diffmoe_dist/planner/cost_model.py) puts DiffMoE-L-E16 at about 61 GB per
# GPU at MICRO=64 (fp32 weights + AdamW + EMA, bf16 activations) and 51 GB at MICRO=32.
# No checkpoint is written (train.ckpt_every past the end, train.save_final=false): the run only
# measures. tests/test_gpu_numbers.py runs it on CPU with a tiny config (that run checks the wiring only).
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
case "${1:-}" in
    -h | --help) usage; exit 0 ;;
    "") echo "usage: bash tools/gpu_numbers.sh OUT_DIR (--help for the knobs)" >&2; exit 2 ;;
    -*) echo "gpu_numbers: unknown option '$1'; usage: bash tools/gpu_numbers.sh OUT_DIR (--help)" >&2; exit 2 ;;
esac
[[ $# -eq 1 ]] || { echo "gpu_numbers: expected one argument OUT_DIR, got $#: $*" >&2; exit 2; }
OUT=$1
DEVICE=${DEVICE:-cuda}
CONFIG=${CONFIG:-configs/imagenet256/diffmoe_l_e16.yaml}
MICRO=${MICRO:-64}
STEPS=${STEPS:-40}
WARMUP=${WARMUP:-10}
WIDTHS=${WIDTHS:-384,768,1024}
EXPERTS=${EXPERTS:-8,16}
TOKENS=${TOKENS:-16384,65536}
REPEATS=${REPEATS:-5}
PRECISION=${PRECISION:-bf16}
STEP_SIZES=${STEP_SIZES:-L}
STEP_IMAGES=${STEP_IMAGES:-32}
STEP_ARGS=${STEP_ARGS:-}
PYTHON=${PYTHON:-python3}
HERE=$(cd "$(dirname "$0")/.." && pwd)

if [[ -e "$OUT/results.csv" || -e "$OUT/bench.json" ]]; then
    echo "gpu_numbers: $OUT already has results; choose a new OUT_DIR" >&2
    exit 2
fi
mkdir -p "$OUT"
DTYPE=$PRECISION
[[ $DTYPE == bf16 || $DTYPE == fp32 ]] || { echo "gpu_numbers: PRECISION=$PRECISION (bf16|fp32)" >&2; exit 2; }

{
    echo "date: $(date -u +%FT%TZ)"
    echo "host: $(hostname)"
    "$PYTHON" -c 'import torch; print("torch", torch.__version__); print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")'
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
} > "$OUT/machine.txt"

echo "== 1/3 bench_moe ($DEVICE, $DTYPE)"
"$PYTHON" "$HERE/tools/bench_moe.py" --device "$DEVICE" --dtype "$DTYPE" --widths "$WIDTHS" \
    --experts "$EXPERTS" --tokens "$TOKENS" --repeats "$REPEATS" --json > "$OUT/bench.json"
"$PYTHON" - "$OUT/bench.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"device: {r['device']}")
for c in r["cases"]:
    mfu = c.get("mfu")
    print(f"{c['mode']:8} D={c['width']:5} E={c['experts']:3} N={c['tokens']:6} "
          f"{c['ms_median']:9.2f} ms  x dense {c['ratio_vs_dense']:.2f}  "
          f"TFLOP/s {c.get('tflops') or 0:7.1f}  MFU {mfu if mfu is not None else '-'}")
EOF

echo "== 2/3 training throughput ($CONFIG, $PRECISION, micro $MICRO, $STEPS steps)"
"$PYTHON" "$HERE/tools/make_synthetic_latents.py" --config "$CONFIG" --out "$OUT/latents" \
    --count $((MICRO * 4))
"$PYTHON" "$HERE/tools/scaling_study.py" --config "$CONFIG" --out "$OUT" --steps "$STEPS" \
    --warmup "$WARMUP" --layouts "nodes=1,nproc=1,ep=1,micro=$MICRO" \
    --set data.name=latents --set "data.path=$OUT/latents" --set "train.precision=$PRECISION" \
    --set "moe.pool_samples=$MICRO" --set train.log_every=1 --set "train.ckpt_every=$((STEPS + 1))" \
    --set train.save_final=false --set run.progress=false
echo "== 3/3 bench_step ($DEVICE, $DTYPE, sizes $STEP_SIZES, $STEP_IMAGES images, 1 process)"
# shellcheck disable=SC2086  # STEP_ARGS is a list of flags
"$PYTHON" "$HERE/tools/bench_step.py" --device "$DEVICE" --dtype "$DTYPE" --sizes "$STEP_SIZES" \
    --images "$STEP_IMAGES" --ranks 1 $STEP_ARGS --json > "$OUT/step.json"
"$PYTHON" "$HERE/tools/bench_step.py" --table "$OUT/step.json"
echo "gpu_numbers: results in $OUT (machine.txt, bench.json, results.md, results.csv, step.json)"
