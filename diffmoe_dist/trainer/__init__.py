"""The training loop and what it needs, one concept per module (DESIGN.md section 4).

    trainer.py          Trainer: __init__ in numbered stages, train_step, train(); the engine's
                        override points (setup_engine, zero_grad, accumulation_context, backward,
                        optimizer_step, checkpoint_optimizer)
    deepspeed_engine.py DeepSpeedTrainer: those override points and nothing else (engine=deepspeed)
    deepspeed_config.py the DeepSpeed JSON generated from our config (and a user file merged in)
    batch.py            this rank's part of a step's global batch, with its per-sample draws
    optim.py            AdamW (torch / apex), the learning-rate schedule
    ema.py              the EMA update
    nonfinite.py        train.nonfinite (stop / skip_step), the finite-weights check before a save
    throughput.py       samples/s, TFLOP/s per rank, MFU between log steps
    metrics.py          metrics.jsonl (and W&B)
    run_dir.py          claiming run.dir (lock + write probe), PREEMPTED, final.json
    runlock.py          the run directory's flock
    preemption.py       SIGUSR1 / SIGTERM / SIGINT -> checkpoint at the end of the step
    convert_ds.py       old DeepSpeed checkpoints -> the project format
    telemetry_plots.py  plots of the MoE telemetry in metrics.jsonl

Import the submodules directly.
"""
