"""``diffmoe-train --config FILE [--set key=value ...]`` (also ``python -m diffmoe_dist.train``)."""

from __future__ import annotations

import argparse
import logging
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="diffmoe-train", description=__doc__)
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.steps=100 (repeatable)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    # First: a preemption signal that arrives while we import and build is remembered, not lost.
    from diffmoe_dist.trainer import preemption

    preemption.install()
    from diffmoe_dist.config import load_config  # imports torch (the choices' home modules)

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
    except ValueError as e:
        print(f"diffmoe-train: error: {e}", file=sys.stderr)
        return 2
    from diffmoe_dist.parallel.distributed import cleanup

    try:
        from diffmoe_dist.checkpoint import CheckpointWriteError
        from diffmoe_dist.trainer.nonfinite import NonFiniteError

        if cfg.engine == "deepspeed":
            from diffmoe_dist.trainer.deepspeed_engine import DeepSpeedTrainer as TrainerCls
        else:
            from diffmoe_dist.trainer.trainer import Trainer as TrainerCls
        try:
            trainer = TrainerCls(cfg)
        except ValueError as e:
            print(f"diffmoe-train: error: {e}", file=sys.stderr)
            return 2
        try:
            result = trainer.train()
        except (NonFiniteError, CheckpointWriteError) as e:  # every rank; rank 0 says it once
            if trainer.rank == 0:
                print(f"diffmoe-train: error: {e}", file=sys.stderr, flush=True)
            # 3: non-finite loss; 4: a save failed (disk full, permission): the last checkpoint stands
            return 3 if isinstance(e, NonFiniteError) else 4
        if result.get("interrupted"):
            return 130  # Ctrl-C: saved, but the run did not finish (scripts must not go on)
        if trainer.rank == 0:
            print(f"diffmoe-train: done {result}", flush=True)
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
