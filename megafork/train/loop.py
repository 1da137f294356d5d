"""The RLVR loop: DAPO on forking tokens, one screen long.

    torchrun --nproc_per_node=2 -m megafork train --config examples/configs/tiny_cpu.yaml
    megafork train --config examples/configs/tiny_cpu.yaml train.steps=4     # one process

Per step: rank 0 generates and verifies (dynamic sampling, GRPO advantages) -> every rank takes
its DP share (balanced by cost when train.dp_balance is on) and packs it into micro-batches
(token budget or padded rows, the same count on every DP rank) -> no-grad old pass (fused head: old log-probs + entropy) -> forking selection over
the scope -> mini-batch updates through megatron's forward_backward_func -> weight sync to the
engine -> metrics, evaluation, checkpoint.
"""
from __future__ import annotations

import json
import logging
import math
import time

from megafork.distributed import init_distributed
from megafork.train import checkpoint
from megafork.train.control import ControlPlane
from megafork.train.engine_start import sync_engine_at_start
from megafork.train.metrics import MetricsLogger, RunClock, Timer, eval_progress
from megafork.train.packing import pack_minibatches
from megafork.train.rollout_ahead import RolloutFeed
from megafork.train.rollout_phase import evaluate
from megafork.train.setup import build_run
from megafork.train.step_metrics import dump_entropy, step_metrics
from megafork.train.update import old_pass, select, train_minibatches

log = logging.getLogger(__name__)


def train(cfg) -> dict:
    """Run `cfg.train.steps` RL steps; returns the summary written to `summary.json` (rank 0)."""
    t_start = time.perf_counter()
    groups = init_distributed(cfg.parallel)
    run = build_run(cfg, groups)
    run_dir = cfg.log.run_dir
    start, extra = checkpoint.resume(cfg, run, run_dir)
    sync_engine_at_start(run, start)  # an engine may serve other weights (an earlier run's): give it ours
    summary = extra.get("summary", {"initial_accuracy": None, "final_accuracy": None})
    clock = RunClock(t_start, before=extra.get("wall_seconds", 0.0))
    logger = MetricsLogger(run_dir, cfg, start_step=start)
    control = ControlPlane(groups, cfg.rollout.step_timeout_minutes)  # waits on gloo, never in NCCL
    rollouts = RolloutFeed(run, control)  # train.rollout_ahead: 1 generates the next step's batch during this one
    if start == 0 and run.eval_dataset is not None:
        summary["initial_accuracy"] = _eval(run, control, step=0)
        logger.log_start({"eval_accuracy": summary["initial_accuracy"]})

    for step in range(start, cfg.train.steps):
        timer = Timer()
        with timer("rollout"):  # rank 0 generates (or takes what it prefetched) and hands out the DP shares
            my_share, rstats = rollouts.take(step)
        # host tensors; moved to the device one at a time
        mbs, minis = pack_minibatches(my_share, run.packing, groups.dp, groups.device)
        threshold, sums = math.nan, {}
        if mbs:
            with timer("old_pass"):
                old_pass(run.model, mbs, groups, run.vocab_size, cfg.rollout.temperature, run.loss_cfg.chunk_size)
                threshold = select(mbs, cfg.forking, minis, groups, seed=cfg.train.seed + step)
            with timer("update"):
                sums = train_minibatches(run.model, run.optimizer, mbs, minis, run.loss_cfg, groups, run.vocab_size)
        run.scheduler.step(increment=1)
        with timer("sync"):
            rollouts.settle()  # an in-flight generation finishes on the weights it started with
            _sync(run, step)
        metrics = step_metrics(run, step, mbs, sums, rstats, threshold, timer, spans=minis)
        if cfg.log.entropy_dump_every and (step + 1) % cfg.log.entropy_dump_every == 0:
            dump_entropy(run, run_dir, step, mbs, threshold)
        if run.eval_dataset is not None and cfg.eval.every and (step + 1) % cfg.eval.every == 0:
            metrics["eval_accuracy"] = summary["final_accuracy"] = _eval(run, control, step + 1)
        logger.log(step, metrics)  # 0-based index; the row's "step" is steps completed, like checkpoints
        if _due(cfg.train.save_every, step, cfg.train.steps):
            checkpoint.save(run, run_dir, step + 1, {"summary": summary, **clock.state()})

    if run.eval_dataset is not None and (summary["final_accuracy"] is None or cfg.eval.every == 0
                                          or cfg.train.steps % cfg.eval.every):
        summary["final_accuracy"] = _eval(run, control, cfg.train.steps)
    summary.update(steps=cfg.train.steps, **clock.summary())
    logger.close()
    rollouts.close()
    control.close()
    if hasattr(run.sender, "close"):  # leave no weight-update group open on the servers
        run.sender.close()
    if groups.rank == 0:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _eval(run, control, step: int) -> float | None:
    acc = None
    if run.groups.rank == 0:
        with eval_progress(run.cfg, len(run.eval_dataset), step) as done:
            acc = done(evaluate(run.engine, run.eval_dataset, run.tokenizer, run.reward_fn, run.cfg, step))
    return control.broadcast(acc)


def _sync(run, step: int) -> None:
    from megafork.models.qwen3 import export_hf_tensors
    from megafork.rollout import sync_weights

    sync_weights(run.sender, export_hf_tensors(run.unwrapped, run.groups), weight_version=str(step + 1))


def _due(every: int, step: int, steps: int) -> bool:
    return step + 1 == steps or (every > 0 and (step + 1) % every == 0)
