"""Early-stopped dynamic sampling inside the trainer, against a real `megafork serve`.

    .venv/bin/python -m pytest tests/test_train_early_stop.py -q

The trainer (`train(cfg)`, one gloo rank: DP=1) runs one step with dynamic sampling on: 8 prompt
groups (`algo.oversample: 4` x `train.prompts_per_step: 2`) are all sent at once to one
`megafork serve --max-running-requests 1`, which generates them one at a time and queues the
rest (SGLang's waiting queue). The reward (`megafork.testing.rewards:has_digit`) makes about half
of the tiny random model's groups informative, so the step has its 2 groups long before the
queue drains. The test checks, from outside the trainer's own bookkeeping:

* the server's log shows `/abort_request` calls that ended requests still in flight, and right
  after the rollout returned the server runs no request any more (without the abort, the queued
  groups would still be generating);
* the kept groups are the informative groups that arrived, in prompt order, not arrival order;
* the step's metrics log `rollout_wasted_tokens` > 0 and the aborted requests.

A real server delivers groups in roughly prompt order, so that run rarely tests the ordering. A
second test drives `collect_rollouts` with the real embedded engine behind the streaming
interface, delivering every round's groups last prompt first: the kept groups must still come out
in prompt order (the test fails if `collect_rollouts` keeps them in arrival order).
"""
from __future__ import annotations

import json
import sys

from megafork.rollout import launch_servers, stop_servers
from megafork.testing import run_ranks
from megafork.testing.multirank import free_port
from megafork.testing.tiny_qwen3 import make_tiny_qwen3
from megafork.testing.toy_prompts import write_sum_prompts

N = 2
WANT = 2


def _spy_worker(rank, world, cfg_dict, url):
    """Run the trainer with a spy around each step's rollout: the prompts sent, the order groups
    arrived in, the trajectories kept, and the server's running requests right afterwards."""
    from megafork.rollout.httpjson import request_json
    from megafork.train import rollout_ahead
    from megafork.train.config import Config
    from megafork.train.loop import train

    real, seen = rollout_ahead.collect_rollouts, []

    def spy(engine, *args):
        rec = {"sent": [], "arrived": []}
        generate_groups = engine.generate_groups

        def watched(prompts, sampling, on_group):
            rec["sent"].append([list(p) for p in prompts])
            return generate_groups(prompts, sampling, lambda g: (rec["arrived"].append(g.prompt_index), on_group(g))[1])

        engine.generate_groups = watched
        try:
            trajs, stats = real(engine, *args)
        finally:
            del engine.generate_groups
        rec["running_after"] = request_json(url, "/server_info")[1]["internal_states"][0]["num_running_reqs"]
        rec["kept"] = [t.prompt_ids.tolist() for t in trajs[::N]]
        rec["kept_rewards"] = [[t.reward for t in trajs[i:i + N]] for i in range(0, len(trajs), N)]
        seen.append(rec)
        return trajs, stats

    rollout_ahead.collect_rollouts = spy
    train(Config.from_dict(cfg_dict))
    return seen


def test_the_trainer_stops_early_aborts_on_the_server_and_keeps_prompt_order(tmp_path):
    hf = make_tiny_qwen3(tmp_path / "hf", seed=0)
    write_sum_prompts(tmp_path / "train.jsonl", 10, 4)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "serve.log"
    serve = (f"exec {sys.executable} -m megafork serve --model {hf} --port {port} --device cpu --threads 1 "
             f"--max-running-requests 1 --weight-sync-timeout 120 --log-level INFO 2> {log_path}")
    procs = launch_servers([["bash", "-c", serve]], [url], timeout_s=120)
    try:
        cfg = {
            "model": {"hf_path": str(hf), "dtype": "float32", "head_chunk_tokens": 64},
            "parallel": {"tp": 1, "pp": 1, "backend": "gloo"},
            "rollout": {"max_response_len": 8, "engine": "sglang", "sglang_urls": [url], "max_inflight_per_server": 8},
            "algo": {"n": N, "overlong_shaping": False, "dynamic_sampling": True, "oversample": 4.0,
                     "max_sampling_rounds": 3},
            "data": {"train_path": str(tmp_path / "train.jsonl"), "reward": "megafork.testing.rewards:has_digit",
                     "max_prompt_len": 16},
            "optim": {"lr": 1e-2, "warmup_steps": 0},
            "train": {"steps": 1, "prompts_per_step": WANT, "minibatch_prompts": WANT, "micro_batch_size": 2,
                      "save_every": 0, "resume": "none", "seed": 3},
            "log": {"run_name": "early", "dir": str(tmp_path / "runs"), "tensorboard": False, "progress_bar": False},
        }
        (rec,) = run_ranks(_spy_worker, 1, args=(cfg, url), init_process_group=False, timeout=400)[0]
    finally:
        stop_servers(procs)
    (row,) = [json.loads(line) for line in (tmp_path / "runs" / "early" / "metrics.jsonl").read_text().splitlines()]
    server_log = log_path.read_text()

    # One round was enough: it stopped early, and the server heard /abort_request for the open requests.
    (sent,) = rec["sent"]
    assert len(sent) == 8 and row["groups_kept"] == WANT and len(rec["arrived"]) < len(sent), (rec, row)
    aborts = [line for line in server_log.splitlines() if "/abort_request (rid" in line]
    ended = sum(int(line.split("): ")[1].split(" request")[0]) for line in aborts)
    assert len(aborts) == row["rollout_aborted_requests"] == len(sent) - len(rec["arrived"]) and ended >= 1, \
        (aborts, row, rec)
    assert rec["running_after"] == 0
    # Kept: the informative groups that arrived, in prompt order (each group's rewards differ).
    kept_at = [sent.index(p) for p in rec["kept"]]
    assert kept_at == sorted(kept_at) and set(kept_at) <= set(rec["arrived"]), rec
    assert all(len(set(r)) == 2 for r in rec["kept_rewards"]), rec
    assert row["rollout_wasted_tokens"] > 0, row
    print(f"arrived {rec['arrived']}, kept {kept_at}, aborted {row['rollout_aborted_requests']} "
          f"(ended in flight {ended}), wasted tokens {row['rollout_wasted_tokens']}")


class _ReversedArrivals:
    """The real embedded engine behind the streaming interface, its groups arriving last prompt
    first: arrival order then contradicts prompt order on every round, deterministically (a real
    server only sometimes delivers out of order)."""

    def __init__(self, engine):
        self.engine, self.sent, self.arrived = engine, [], []

    def generate(self, prompts, sampling):
        return self.engine.generate(prompts, sampling)

    def generate_groups(self, prompts, sampling, on_group):
        from types import SimpleNamespace

        from megafork.rollout.stream import StreamResult

        samples, n = self.engine.generate(prompts, sampling), sampling.n
        self.sent.append([list(p) for p in prompts])
        self.arrived.append([])
        for i in reversed(range(len(prompts))):
            self.arrived[-1].append(i)
            if on_group(SimpleNamespace(prompt_index=i, samples=lambda i=i: samples[i * n:(i + 1) * n])):
                break
        return StreamResult(groups=[])


def test_kept_groups_follow_prompt_order_when_groups_arrive_in_reverse(tmp_path):
    from megafork.data.dataset import PromptDataset, load_tokenizer
    from megafork.data.sampler import PromptSampler
    from megafork.rollout import EmbeddedEngine
    from megafork.testing.rewards import has_digit
    from megafork.train.config import Config
    from megafork.train.rollout_phase import collect_rollouts

    hf = make_tiny_qwen3(tmp_path / "hf", seed=0)
    write_sum_prompts(tmp_path / "train.jsonl", 10, 4)
    cfg = Config.from_dict({
        "model": {"hf_path": str(hf), "dtype": "float32"},
        "rollout": {"max_response_len": 8},
        "algo": {"n": N, "overlong_shaping": False, "dynamic_sampling": True, "oversample": 4.0,
                 "max_sampling_rounds": 3},
        "data": {"train_path": str(tmp_path / "train.jsonl"), "max_prompt_len": 16},
        "train": {"prompts_per_step": WANT, "minibatch_prompts": WANT, "seed": 3},
        "log": {"dir": str(tmp_path / "runs")},
    })
    tokenizer = load_tokenizer(hf)
    dataset = PromptDataset.from_config(cfg.data, tokenizer)
    sampler = PromptSampler(len(dataset), WANT, cfg.train.seed, cfg.data.shuffle)
    engine = _ReversedArrivals(EmbeddedEngine.from_pretrained(hf))
    trajs, stats = collect_rollouts(engine, dataset, sampler, tokenizer, has_digit, cfg, step=0)

    assert stats.groups_kept == WANT and len(engine.sent) == 1, (stats, engine.arrived)
    (sent,), (arrived,) = engine.sent, engine.arrived
    kept_at = [sent.index(t.prompt_ids.tolist()) for t in trajs[::N]]
    # The round stopped early, last prompt first, and the groups it kept arrived in the opposite
    # order to the one they are kept in.
    assert len(arrived) < len(sent) and arrived == sorted(arrived, reverse=True), arrived
    assert kept_at == sorted(kept_at) and [i for i in arrived if i in kept_at] == kept_at[::-1], (kept_at, arrived)
    assert all(len({t.reward for t in trajs[g:g + N]}) == 2 for g in range(0, len(trajs), N)), trajs
    assert [t.group for t in trajs] == [g for g in range(WANT) for _ in range(N)]
