"""Sharded, atomic, verified checkpoints that can be resumed on another world size or ep degree.

One format for every engine (native and DeepSpeed), in four modules:

    state.py      the flat state: every tensor under a layout-independent key (experts by global
                  index), so a checkpoint reshards by key lookup
    manifest.py   the on-disk format (``step-XXXXXXXX/``: DCP files, meta.json, manifest.json) and
                  its verification (sizes + sha256), ``latest_verified``; read-only
    load.py       ``check_compatible`` (same model, objective and pool), ``load_checkpoint`` (each
                  rank its experts), ``load_for_reading`` (inference), the trainer's prechecks
    manager.py    ``CheckpointManager``: atomic save and publish, keep-k pruning, resume point

How it stays consistent:
- All ranks write into ``.tmp-step-XXXXXXXX``; rank 0 then writes the manifest and renames the
  directory to ``step-XXXXXXXX`` (a rename is atomic): a checkpoint is complete or not there at all.
- On load, the newest checkpoint is verified against its manifest (every file's size and sha256); a
  truncated or corrupted one is skipped with a warning naming the file, and the previous good one is
  used. Training resume and every reader (sample, eval, sweep, studies) go through the same
  ``latest_verified``.

Readers never write: ``latest_verified`` / ``load_for_reading`` open files read-only and never
create, delete or lock anything under ``checkpoints/``, so sampling a live run cannot disturb the
trainer. Only the trainer that holds the run (its lock, trainer/trainer.py) writes there: it
publishes, prunes, and removes the ``.tmp-*`` directories of saves that died
(``CheckpointManager.remove_stale_saves``).
"""

from diffmoe_dist.checkpoint.load import (
    OLD_DEEPSPEED_DIR,
    check_compatible,
    load_checkpoint,
    load_for_reading,
    precheck_resume,
    refuse_old_deepspeed_dir,
)
from diffmoe_dist.checkpoint.manager import CheckpointManager, CheckpointWriteError
from diffmoe_dist.checkpoint.manifest import (
    CKPT_PREFIX,
    FORMAT_VERSION,
    CheckpointVanished,
    latest_verified,
    list_checkpoints,
    no_verified_checkpoint_message,
    read_meta,
    require_verified,
    verify_checkpoint,
)
from diffmoe_dist.checkpoint.state import expert_params, model_state, optimizer_state, split_experts

__all__ = [
    "CKPT_PREFIX",
    "FORMAT_VERSION",
    "OLD_DEEPSPEED_DIR",
    "CheckpointManager",
    "CheckpointVanished",
    "CheckpointWriteError",
    "check_compatible",
    "expert_params",
    "latest_verified",
    "list_checkpoints",
    "load_checkpoint",
    "load_for_reading",
    "model_state",
    "no_verified_checkpoint_message",
    "optimizer_state",
    "precheck_resume",
    "read_meta",
    "refuse_old_deepspeed_dir",
    "require_verified",
    "split_experts",
    "verify_checkpoint",
]
