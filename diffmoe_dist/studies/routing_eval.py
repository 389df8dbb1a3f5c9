"""Evaluate one trained run of the routing study (studies/reproduce_routing.py), on its EMA weights:

* per inference rule, the digits judge through inference/evaluate.py (as ``diffmoe-eval``): Frechet
  distance to the held-out digits, conditional accuracy and C_infer, from a fixed number of samples
  drawn with a fixed sampler and noise (sample.seed);
* per inference rule, the held-out loss of the objective (flow-matching MSE, or DDPM's hybrid loss
  with t = floor(1000 u) of the same draws): the 179 held-out digits cycled to ``heldout_samples``
  samples, each with a fixed noise and t ~ U(0, 1) keyed by (HELDOUT_SEED, position), identical
  for every model, so differences between rows are paired.

    python -m diffmoe_dist.studies.routing_eval RUN_DIR --rules static,dynamic,independent \
        --heldout-samples 512 --out RUN_DIR/eval.json [--set sample.batch_size=32 ...]

The study's runner starts this once per trained run, as its own process: runs are evaluated while
others train (``--jobs``), each with its own torch threads and process-group state, and a crash
stays in that run's eval.log. Reading the run never writes into it except ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from diffmoe_dist.studies.common import write_json

HELDOUT_SEED = 4242  # the held-out loss draws: fixed for every model of every study
METRICS = ("fd", "accuracy", "heldout_loss", "c_infer")  # what each rule reports


def rule_overrides(rule: str) -> list[str]:
    """The --set items that select inference rule ``rule`` (at the training capacity C = 1)."""
    return [f"moe.infer_mode={rule}", "moe.infer_capacity=1.0"]


def heldout_set(image_size: int, num: int) -> tuple[torch.Tensor, ...]:
    """(x1, x0, t, y): the held-out digits cycled to ``num`` samples with fixed noise and t."""
    from diffmoe_dist.data import TIME_STREAM, per_sample_normal, per_sample_uniform
    from diffmoe_dist.data.digits import DigitsDataset

    ds = DigitsDataset(image_size, split="heldout")
    idx = torch.arange(num) % len(ds)
    x1, y = ds.get_batch(idx, torch.zeros(num, dtype=torch.bool))
    ids = torch.arange(num)
    x0 = per_sample_normal(HELDOUT_SEED, 0, ids, x1.shape[1:])
    t = per_sample_uniform(HELDOUT_SEED, 0, ids, TIME_STREAM)
    return x1.float(), x0, t, y


@torch.no_grad()
def heldout_loss(
    net: torch.nn.Module,
    data: tuple[torch.Tensor, ...],
    batch_size: int,
    device: torch.device,
    objective: str = "flow",
) -> float:
    """Mean per-sample objective loss (conditional labels, no dropout) over the held-out set: the
    flow-matching MSE, or DDPM's hybrid loss (t = floor(u * 1000) of the same uniform draws)."""
    from diffmoe_dist.transport.objective import get_objective

    obj = get_objective(objective)
    x1, x0, u, y = (v.to(device) for v in data)
    t = obj.time_from_uniform(u)
    total = 0.0
    for s in range(0, x1.shape[0], batch_size):
        b = slice(s, s + batch_size)
        z = obj.noisy(x1[b], x0[b], t[b])
        out = net(z, obj.model_time(t[b]), y[b])
        total += float(obj.losses(out.float(), x1[b], x0[b], z, t[b])[obj.loss_key].sum())
    return total / x1.shape[0]


def evaluate_run(
    run_dir: Path, rules: Sequence[str], overrides: Sequence[str], heldout_samples: int
) -> dict[str, dict[str, Any]]:
    """{rule: {accuracy, fd, c_infer, heldout_loss, ...}} for the run's latest checkpoint (EMA)."""
    from diffmoe_dist.inference import evaluate_checkpoint, load_model, resolve_with_config
    from diffmoe_dist.parallel.distributed import cleanup

    ckpt, cfg = resolve_with_config(str(run_dir), None, list(overrides))
    if cfg.data.name != "digits":
        raise ValueError(f"the routing study runs on the digits; {run_dir} has {cfg.data.name}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = load_model(cfg, ckpt, device=device, follow_latest=True).net  # one model, EMA by default
    data = heldout_set(cfg.model.input_size, heldout_samples)
    # The held-out loss runs whole training pools (DiffMoE) so static top-k sees the training S.
    loss_bs = cfg.moe.pool_samples if cfg.moe.mode == "diffmoe" else 64
    out: dict[str, dict[str, Any]] = {}
    try:
        for rule in rules:
            res = evaluate_checkpoint(str(run_dir), None, [*overrides, *rule_overrides(rule)])
            assert res is not None  # world 1: this process is rank 0
            if cfg.moe.mode != "dense":
                net.set_inference(rule, 1.0, cfg.moe.gamma)
            res["heldout_loss"] = heldout_loss(net, data, loss_bs, device, cfg.objective)
            res.pop("telemetry", None)
            out[rule] = res
    finally:
        cleanup()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m diffmoe_dist.studies.routing_eval",
        description="Evaluate one run of the routing study (its runner calls this per run).",
    )
    p.add_argument("run_dir", type=Path)
    p.add_argument("--rules", default="static", help="comma-separated inference rules")
    p.add_argument("--heldout-samples", type=int, default=512)
    p.add_argument("--out", type=Path, required=True, help="JSON file for {rule: metrics}")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    try:
        rules = [r for r in args.rules.split(",") if r]
        out = evaluate_run(args.run_dir, rules, args.overrides, args.heldout_samples)
    except ValueError as e:
        print(f"routing_eval: error: {e}", file=sys.stderr)
        return 2
    write_json(args.out, out)
    print(json.dumps({k: {m: v.get(m) for m in METRICS} for k, v in out.items()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
