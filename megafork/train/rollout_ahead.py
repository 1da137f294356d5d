"""Each step's rollouts on every rank; with `train.rollout_ahead: 1`, generated one step ahead.

    feed = RolloutFeed(run, control)           # once, on every rank (control: train.control.ControlPlane)
    my_share, rstats = feed.take(step)         # the loop's rollout phase
    feed.settle()                              # before the weight sync after the step's update

`rollout_ahead: 0` (default): rank 0 generates step k's prompts when step k starts, with the
weights synced after step k-1, then every rank takes its DP share (the synchronous loop).

`rollout_ahead: 1` (one-step off-policy): as soon as rank 0 has handed out step k's batch, a
background thread on rank 0 starts generating step k+1's prompts while every rank trains on
step k. The engine still serves the weights synced after step k-1, so step k+1 trains on
samples one version old: staleness = trainer version − the sample's weight version = 1 after
the first step (pair it with `algo.rollout_correction`, which then also corrects for the lag).
The weight sync after step k first waits for that generation to finish (`settle`), so a
generation never straddles two weight versions and eval never runs beside it. Only engines
outside the trainer's processes can overlap (SGLang, `megafork serve`): the embedded engine
shares the trainer's CPU/GPU and the config rejects it.

Resume: the thread works on a copy of the prompt sampler and the loop's sampler only moves to
the copy's state when the batch is taken, so a checkpoint after step k holds the sampler
exactly where step k+1's draws begin. A resumed run regenerates that in-flight batch from it
with the same per-step seeds, so given the same server outputs it equals the straight run.

Staleness per sample uses the weight version the engine reports with each sample (SGLang's
`meta_info.weight_version`; the loop syncs version s + 1 after step s and version `start` at
start-up), falling back to the version the feed knows it launched with when the engine reports
none or a non-numeric one.
"""
from __future__ import annotations

import concurrent.futures
import copy
import time

from megafork.train.rollout_phase import collect_rollouts
from megafork.train.shard import split_for_dp


class RolloutFeed:
    """Rollouts for every step, generated synchronously or one step ahead (see module docstring).

    Args:
        run: the `megafork.train.setup.Run` (engine, data, sampler, config, groups).
        control: the `ControlPlane` that hands rank 0's batch to every rank over gloo.
    """

    def __init__(self, run, control):
        self.run = run
        self.ahead = run.cfg.train.rollout_ahead
        self.control = control
        self._pool = None
        self._inflight: tuple[int, concurrent.futures.Future] | None = None
        self._stats = None

    def take(self, step: int):
        """This rank's share of step `step`'s trajectories, and the step's rollout statistics.

        Rank 0 takes the batch prefetched during the previous step (or generates it now), starts
        the next step's generation when `rollout_ahead` is 1, and scatters the shares.

        Returns:
            (this rank's mini-batches of trajectories, `RolloutStats` with `extra` holding
            `staleness_mean`, `staleness_max`, `rollout_weight_version` and, on rank 0,
            `seconds_rollout_wait`).
        """
        run, cfg = self.run, self.run.cfg
        payload = shares = None
        if run.groups.rank == 0:
            t0 = time.perf_counter()
            if self._inflight is not None and self._inflight[0] == step:
                trajs, rstats, sampler_state = self._inflight[1].result()
            else:  # the first step, or the first after a resume: generate now with the served weights
                trajs, rstats, sampler_state = self._generate(step, copy.deepcopy(run.sampler), version=step)
            waited = time.perf_counter() - t0
            self._inflight = None
            versions = [t.weight_version for t in trajs]
            stale = [step - v for v in versions]
            rstats.extra.update(staleness_mean=sum(stale) / len(stale) if stale else 0.0,
                                staleness_max=float(max(stale, default=0)),
                                rollout_weight_version=float(max(versions, default=step)))
            if self.ahead and step + 1 < cfg.train.steps:
                sampler = copy.deepcopy(run.sampler)
                sampler.load_state_dict(sampler_state)
                # The engine serves the weights synced after step - 1 until `settle` lets the sync run.
                self._inflight = (step + 1, self._executor().submit(self._generate, step + 1, sampler, step))
            shares = split_for_dp(trajs, cfg.algo.n, cfg.train.minibatch_prompts, run.groups.dp_size,
                                  cfg.train.dp_balance, cfg.train.balance_quadratic)
            payload = (rstats, sampler_state)
            rstats.extra["seconds_rollout_wait"] = waited
        (rstats, sampler_state), my_share = self.control.distribute(payload, shares)
        run.sampler.load_state_dict(sampler_state)
        self._stats = rstats
        return my_share, rstats

    def settle(self) -> None:
        """Wait for the in-flight generation (rank 0) so the weight sync cannot change its weights.

        The wait is added to this step's `seconds_rollout_wait`. A failed generation is not raised
        here (the other ranks are entering the sync's collectives); it is raised by the next
        `take`, where a synchronous rollout would have failed too.
        """
        if self._inflight is None:
            return
        t0 = time.perf_counter()
        concurrent.futures.wait([self._inflight[1]])
        if self._stats is not None:
            self._stats.extra["seconds_rollout_wait"] = (self._stats.extra.get("seconds_rollout_wait", 0.0)
                                                         + time.perf_counter() - t0)

    def close(self) -> None:
        """Finish any in-flight generation and stop the worker thread."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout-ahead")
        return self._pool

    def _generate(self, step: int, sampler, version: int):
        """Collect step `step`'s rollouts on `sampler` (a copy); tag each sample's weight version."""
        run = self.run
        trajs, rstats = collect_rollouts(run.engine, run.dataset, sampler, run.tokenizer, run.reward_fn, run.cfg,
                                         step)
        for t in trajs:
            t.weight_version = _as_version(t.weight_version, version)
        return trajs, rstats, sampler.state_dict()


def _as_version(reported, launched: int) -> int:
    """The engine's reported weight version when it is a step count, else the one launched with."""
    if isinstance(reported, int) and not isinstance(reported, bool):
        return reported
    if isinstance(reported, str) and reported.isdigit():
        return int(reported)
    return launched
