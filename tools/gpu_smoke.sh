#!/usr/bin/env bash
# What only a GPU machine can show, end to end, on every GPU it has (docs/gpu.md):
#   1. collectives and numerics checks on NCCL (tools/gpu_smoke_checks.py);
#   2. native engine, bf16: an uninterrupted run, and a run stopped at 2/3 and resumed, compared
#      (deterministic mode: the same losses within the GPU tolerance of docs/gpu.md);
#   3. deterministic mode twice: the same losses bit for bit;
#   4. DeepSpeed engine (ZeRO-1, bf16): a run to 2/3 of STEPS, then a resume that continues it;
#   5. sampling (diffmoe-sample, bf16 autocast by default on CUDA), evaluation (diffmoe-eval, the
#      digits judge) and the threshold sweep (tools/threshold_sweep.py), all on N ranks;
#   6. what the training metrics must show on a GPU: a2a_share > 0 with ep > 1 (CUDA events),
#      mfu on a known GPU, peak_mem_mb from CUDA.
#
#   bash tools/gpu_smoke.sh OUT_DIR
#
# Knobs: NGPU (every GPU this process may use, launchers/gpus.sh), STEPS (30), SMOKE_DEVICE (cuda;
# cpu runs the same wiring on gloo CPU workers, NGPU of them, default 2), PYTHON (python3).
# Each step writes OUT_DIR/<step>.log; OUT_DIR/summary.txt lists PASS/FAIL per step; the exit code
# is 1 when any step failed. About 5 minutes on an 8-GPU node (the digits model, 30 steps).
set -uo pipefail

OUT=${1:?usage: bash tools/gpu_smoke.sh OUT_DIR}
HERE=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
STEPS=${STEPS:-30}
((STEPS >= 10)) || { echo "gpu_smoke: STEPS=$STEPS; at least 10" >&2; exit 2; }
HALF=$((STEPS * 2 / 3)) # where the resumed runs stop and restart
SMOKE_DEVICE=${SMOKE_DEVICE:-cuda}
# shellcheck source=launchers/gpus.sh
source "$HERE/launchers/gpus.sh"
if [[ $SMOKE_DEVICE == cuda ]]; then
    N=${NGPU:-$(count_gpus)}
    ((N > 0)) || { echo "gpu_smoke: no GPU visible (set SMOKE_DEVICE=cpu for a wiring run)" >&2; exit 2; }
    BACKEND=nccl
else
    N=${NGPU:-2}
    BACKEND=gloo
fi
if [[ -e $OUT/summary.txt ]]; then
    echo "gpu_smoke: $OUT already has a summary; choose a new OUT_DIR" >&2
    exit 2
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$HERE" || exit 2
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"

# Expert parallelism over as many GPUs as divide the 8 experts; pools of one micro-batch (32).
EP=1
for e in 8 4 2; do
    if ((e <= N && N % e == 0)); then EP=$e; break; fi
done
G=$((32 * N))
TRAIN=(--config configs/digits.yaml --set "parallel.ep=$EP" --set "parallel.backend=$BACKEND"
    --set "train.global_batch_size=$G" --set moe.pool_samples=32 --set train.precision=bf16
    --set train.log_every=5 --set train.ckpt_every=10 --set train.warmup_steps=0
    --set run.progress=false)
SAMPLE=(--set sample.num_samples=$((20 * N)) --set sample.batch_size=20 --set sample.num_steps=8)
TORCHRUN=("$PYTHON" -m torch.distributed.run --standalone "--nproc-per-node=$N")

failed=0
step() { # step NAME command...: run, log, record PASS/FAIL
    local name=$1
    shift
    echo "== $name" >&2
    local t0=$SECONDS
    if "$@" >"$OUT/$name.log" 2>&1; then
        echo "PASS $name ($((SECONDS - t0)) s)" | tee -a "$OUT/summary.txt" >&2
    else
        echo "FAIL $name ($((SECONDS - t0)) s): see $OUT/$name.log" | tee -a "$OUT/summary.txt" >&2
        tail -n 20 "$OUT/$name.log" >&2
        failed=1
    fi
}
train() { # train RUN_DIR STEPS [--set ...]
    local dir=$1 steps=$2
    shift 2
    "${TORCHRUN[@]}" -m diffmoe_dist.train "${TRAIN[@]}" --set "run.dir=$dir" \
        --set "train.steps=$steps" "$@"
}
compare() { # compare RUN_A RUN_B RTOL [FIRST_STEP]: the losses of the common steps
    "$PYTHON" - "$@" <<'EOF'
import json, sys
from pathlib import Path
a, b, rtol = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
first = int(sys.argv[4]) if len(sys.argv) > 4 else 0
def losses(d):
    out = {}
    for line in (d / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out[r["step"]] = r["loss"]
    return out
la, lb = losses(a), losses(b)
common = sorted(s for s in set(la) & set(lb) if s >= first)
assert common, (sorted(la), sorted(lb))
worst = max(abs(la[s] - lb[s]) / max(abs(la[s]), 1e-12) for s in common)
print(f"steps {common[0]}..{common[-1]}: max relative loss difference {worst:.3e} (allowed {rtol:g})")
assert worst <= rtol, worst
EOF
}
resume_run() { # stopped at step HALF (a complete run of HALF steps), then continued to STEPS
    train "$OUT/native_resume" "$HALF" --set train.deterministic=true &&
        train "$OUT/native_resume" "$STEPS" --set train.deterministic=true
}
check_metrics() { # check_metrics RUN_DIR: what a GPU run's metrics.jsonl must hold
    "$PYTHON" - "$1" "$EP" "$SMOKE_DEVICE" <<'EOF'
import json, math, sys
from pathlib import Path
recs = [json.loads(l) for l in (Path(sys.argv[1]) / "metrics.jsonl").read_text().splitlines()]
ep, device = int(sys.argv[2]), sys.argv[3]
last = recs[-1]
print({k: last.get(k) for k in ("step", "loss", "a2a_share", "mfu", "peak_mem_mb", "samples_per_s")})
assert all(math.isfinite(r["loss"]) for r in recs)
if ep > 1:
    assert last["a2a_share"] is not None and last["a2a_share"] > 0.001, last["a2a_share"]
    assert last["a2a_bytes"]["total"]["tokens_sent"] > 0
if device == "cuda":
    assert last["peak_mem_mb"] > 0
    if "mfu" not in last:
        print("note: no mfu (GPU not in diffmoe_dist/models/flops.py's table; set train.peak_tflops)")
EOF
}
check_samples() { # check_samples DIR COUNT PRECISION
    "$PYTHON" - "$@" <<'EOF'
import json, sys
import numpy as np
from pathlib import Path
d, n, precision = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
with np.load(d / "samples.npz") as z:
    assert z["arr_0"].shape[0] == n and z["arr_0"].dtype == np.uint8, z["arr_0"].shape
rep = json.loads((d / "sample_report.json").read_text())
print({k: rep.get(k) for k in ("num_samples", "c_infer", "precision")})
assert rep["precision"] == precision, rep["precision"]
EOF
}

{
    echo "date: $(date -u +%FT%TZ)  host: $(hostname)  ranks: $N ($SMOKE_DEVICE, $BACKEND), ep $EP"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    "$PYTHON" -c 'import torch, deepspeed; print("torch", torch.__version__, "deepspeed", deepspeed.__version__)' 2>/dev/null
} >"$OUT/machine.txt"
cat "$OUT/machine.txt" >&2
PREC=$([[ $SMOKE_DEVICE == cuda ]] && echo bf16 || echo fp32) # sample.precision=auto resolves to this

step checks "${TORCHRUN[@]}" tools/gpu_smoke_checks.py --out "$OUT/checks.json" --device "$SMOKE_DEVICE"
# native engine: uninterrupted vs stopped at 20 and resumed, both in deterministic mode
step native_full train "$OUT/native_full" "$STEPS" --set train.deterministic=true
step native_resume resume_run
step resume_matches compare "$OUT/native_full" "$OUT/native_resume" 1e-5 $((HALF + 1))
step determinism_rerun train "$OUT/native_rerun" 10 --set train.deterministic=true
step deterministic_bitwise compare "$OUT/native_full" "$OUT/native_rerun" 0
step default_vs_deterministic train "$OUT/native_default" "$STEPS"
step default_tolerance compare "$OUT/native_full" "$OUT/native_default" 5e-2
step native_metrics check_metrics "$OUT/native_default"
# DeepSpeed engine: a run, then a resume that continues it to STEPS
step deepspeed_train train "$OUT/deepspeed" "$HALF" --set engine=deepspeed --set deepspeed.zero_stage=1
step deepspeed_resume train "$OUT/deepspeed" "$STEPS" --set engine=deepspeed --set deepspeed.zero_stage=1
step deepspeed_metrics check_metrics "$OUT/deepspeed"
# inference on N ranks from the native run (multi-GPU sampling ends with NCCL gathers)
step sample "${TORCHRUN[@]}" -m diffmoe_dist.sample --run-dir "$OUT/native_full" --out "$OUT/samples" \
    --npz "${SAMPLE[@]}"
step sample_output check_samples "$OUT/samples" $((20 * N)) "$PREC"
step evaluate "${TORCHRUN[@]}" -m diffmoe_dist.evaluate --run-dir "$OUT/native_full" --json "${SAMPLE[@]}"
step sweep "${TORCHRUN[@]}" tools/threshold_sweep.py --run-dir "$OUT/native_full" --out "$OUT/sweep" \
    --gammas 0.3,0.5 "${SAMPLE[@]}"

echo "gpu_smoke: $(grep -c '^PASS' "$OUT/summary.txt") passed, $(grep -c '^FAIL' "$OUT/summary.txt") failed; $OUT/summary.txt" >&2
exit "$failed"
