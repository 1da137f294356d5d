"""A rank of `train(cfg)` for multi-rank tests, optionally killed right after a checkpoint.

    run_ranks(loop_worker, 2, args=(cfg.to_dict(), 0), init_process_group=False)   # a straight run
    run_ranks(loop_worker, 2, args=(cfg.to_dict(), 2), init_process_group=False)   # dies after step 2

Rewards a config names must be importable in the spawned ranks: use `module:function` (e.g.
`megafork.testing.rewards:has_digit`), not a name registered by the test module.
"""
from __future__ import annotations


class _Interrupted(Exception):
    pass


def loop_worker(rank: int, world: int, cfg_dict: dict, interrupt_after: int):
    """Run `train(cfg)`; with `interrupt_after`, die (like a killed job) right after that checkpoint.

    Args:
        rank: this rank (from `run_ranks`).
        world: the world size (from `run_ranks`).
        cfg_dict: `Config.to_dict()`-shaped run config.
        interrupt_after: the step whose checkpoint is the last thing the run does (0 = run to the end).

    Returns:
        `train`'s result, or None when interrupted.
    """
    from megafork.train import checkpoint
    from megafork.train.config import Config
    from megafork.train.loop import train

    if interrupt_after:
        real_save = checkpoint.save

        def save_then_stop(run, run_dir, step, *args, **kwargs):
            path = real_save(run, run_dir, step, *args, **kwargs)
            if step == interrupt_after:
                raise _Interrupted
            return path

        checkpoint.save = save_then_stop
    try:
        return train(Config.from_dict(cfg_dict))
    except _Interrupted:
        return None
