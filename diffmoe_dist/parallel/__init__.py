"""Expert and data parallelism, kept out of the model (DESIGN.md section 2).

    layout.py       rank arithmetic: ep / edp / pool groups as rank lists, start-up refusals
    parallelize.py  ParallelState, build_parallel_state, parallelize_model (shard experts, install
                    the dispatcher), apply_compile (train.compile)
    grad_reduce.py  GradReducer (train.grad_reduce overlap / flat: DDP + async expert buckets),
                    average_gradients, reduce_thresholds: the reductions of a step
    dispatch.py     AllToAllDispatcher (the MoE layer's dispatcher under ep > 1), a2a_bytes_summary
    comm.py         autograd-aware all_to_all_single with uneven splits, count exchange, all-gather

Import the submodules directly; this package imports nothing so that models/ never pulls in
torch.distributed through it.
"""
