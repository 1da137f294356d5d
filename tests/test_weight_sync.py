"""Weight sync end to end: a TP=2 megatron Qwen3 trainer (gloo) into a running `megafork serve`.

    .venv/bin/python -m pytest tests/test_weight_sync.py -q

Two trainer ranks build megafork's megatron-core Qwen3 from the served checkpoint, change their
weights, and sync them into two running servers (one group: trainer rank 0, servers at ranks 1
and 2) through `/init_weights_update_group` + `/update_weights_from_distributed` (flattened
buckets, then per-tensor broadcasts; checksums verified). Afterwards the servers' greedy outputs
equal transformers' greedy generation on the exported weights, their log-probs equal the
trainer's own (TP=2) log-probs, and their weight checksums equal the trainer's.
"""
from __future__ import annotations

import sys

import pytest
import torch

from megafork.rollout import launch_servers, stop_servers
from megafork.testing import run_ranks
from megafork.testing.multirank import free_port
from megafork.testing.tiny_qwen3 import make_tiny_qwen3

PROMPTS = [[1, 5, 6, 7, 8, 9, 10, 11], [1, 20, 21], [1, 30, 31, 32, 33]]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Two servers of the same checkpoint: the sync reaches both through one group (ranks 1 and 2)."""
    hf_dir = make_tiny_qwen3(tmp_path_factory.mktemp("wsync") / "tiny", seed=7, tie_word_embeddings=False)
    ports = [free_port(), free_port()]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    cmds = [[sys.executable, "-m", "megafork", "serve", "--model", str(hf_dir), "--port", str(p), "--device", "cpu",
             "--threads", "1", "--log-level", "WARNING", "--weight-sync-timeout", "120"] for p in ports]
    procs = launch_servers(cmds, urls, timeout_s=120)
    yield str(hf_dir), urls
    stop_servers(procs)


def _perturb(model, groups, seed: int) -> None:
    """Change every weight; TP-split shards get per-rank noise, replicated ones identical noise."""
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            split = bool(getattr(p, "tensor_model_parallel", False))
            g = torch.Generator().manual_seed(seed * 1000 + i * 10 + (groups.tp_rank if split else 0))
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _trainer_logprobs(model, groups, seqs):
    """Log-probs of each response under the sharded trainer model (every rank calls this)."""
    from megafork.models.qwen3.forward import forward_logits

    out = []
    for prompt, response in seqs:
        logits = forward_logits(model, groups, torch.tensor([prompt + response]))[0].double()
        logp = torch.log_softmax(logits[len(prompt) - 1:-1], -1)
        out.append(logp.gather(-1, torch.tensor(response)[:, None]).squeeze(-1))
    return out


def _hf_greedy(hf_dir, state, prompts):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    with torch.no_grad():
        return [ref.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)[
            0, len(p):].tolist() for p in prompts]


def _trainer(rank, world, hf_dir, urls):
    import torch.distributed as dist

    from megafork.distributed import ParallelConfig, init_distributed
    from megafork.models.qwen3 import (
        Qwen3BuildOptions,
        build_qwen3,
        export_hf_tensors,
        load_hf_weights,
        read_hf_config,
    )
    from megafork.rollout import (
        HttpWeightSender,
        RolloutError,
        SamplingParams,
        SGLangEngine,
        WeightSyncConfig,
        rollout_logprob_drift,
        sync_weights,
    )
    from megafork.rollout.buckets import tensor_checksum
    from megafork.rollout.httpjson import request_json

    groups = init_distributed(ParallelConfig(tp=2))
    model = build_qwen3(read_hf_config(hf_dir), Qwen3BuildOptions(dtype="fp32", spec="local"), groups)
    load_hf_weights(model, hf_dir, groups)
    engine = SGLangEngine(urls, timeout_s=120) if rank == 0 else None  # prompts spread over both
    greedy = SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    res: dict = {}

    def served_and_trainer():
        """Served greedy samples (rank 0) and the trainer's log-probs of the same tokens (all ranks)."""
        samples = engine.generate(PROMPTS, greedy) if rank == 0 else None
        box = [None if samples is None else [(PROMPTS[s.prompt_index], s.response_ids.tolist(), s.logprobs.tolist())
                                           for s in samples]]
        dist.broadcast_object_list(box, src=0)
        trainer = _trainer_logprobs(model, groups, [(p, r) for p, r, _ in box[0]])
        served = torch.cat([torch.tensor(lp, dtype=torch.float64) for _, _, lp in box[0]])
        return [r for _, r, _ in box[0]], served, torch.cat(trainer)

    def export(kept):
        for name, t in export_hf_tensors(model, groups):
            kept[name] = t.clone()
            yield name, t

    # Before any sync the server serves the checkpoint, i.e. the trainer's initial weights.
    _, served, trainer = served_and_trainer()
    res["drift_initial"] = rollout_logprob_drift(served, trainer)
    _perturb(model, groups, seed=1)
    _, served, trainer = served_and_trainer()
    res["drift_stale"] = rollout_logprob_drift(served, trainer)

    # Sync 1: flattened buckets, several per model, checksums verified per bucket.
    kept: dict[str, torch.Tensor] = {}
    sender = None
    if rank == 0:
        sender = HttpWeightSender(urls, WeightSyncConfig(bucket_bytes=16 << 10, load_format="flattened_bucket",
                                                         verify_checksums=True, timeout_s=120))
        sender.connect()
    stats = sync_weights(sender, export(kept), weight_version="step-1")
    responses, served, trainer = served_and_trainer()
    res["drift_synced"] = rollout_logprob_drift(served, trainer)
    if rank == 0:
        res["stats"] = stats.as_dict()
        res["exported_bytes"] = sum(t.numel() * t.element_size() for t in kept.values())
        res["greedy_1"] = (responses, _hf_greedy(hf_dir, kept, PROMPTS))
        want = {n: tensor_checksum(t) for n, t in kept.items()}
        got = [request_json(u, "/get_weights_checksum", {"names": sorted(kept)})[1] for u in urls]
        res["checksums_1"] = [g["checksums"] == want for g in got]
        res["version_1"] = [g["weight_version"] for g in got]
        sender.close()

    # Sync 2: new weights, the default format (per-tensor broadcasts on gloo), a fresh group.
    _perturb(model, groups, seed=2)
    kept = {}
    if rank == 0:
        sender = HttpWeightSender(urls, WeightSyncConfig(group_name="second", verify_checksums=True, timeout_s=120))
        assert sender.config.resolved_load_format() == "per_tensor"
        sender.connect()
    sync_weights(sender, export(kept), weight_version="step-2")
    responses, served, trainer = served_and_trainer()
    res["drift_synced_2"] = rollout_logprob_drift(served, trainer)
    if rank == 0:
        res["greedy_2"] = (responses, _hf_greedy(hf_dir, kept, PROMPTS))
        sums = [request_json(u, "/get_weights_checksum")[1]["checksums"] for u in urls]
        res["checksums_2"] = [all(s[n] == tensor_checksum(t) for n, t in kept.items()) for s in sums]
        # A wrong-shaped tensor is received, rejected, and the step-2 weights keep serving.
        try:
            sender.send([("model.norm.weight", torch.zeros(65))], weight_version="bad")
            res["wrong_shape_error"] = None
        except RolloutError as exc:
            res["wrong_shape_error"] = str(exc)
        res["checksums_after_reject"] = [request_json(u, "/get_weights_checksum")[1]["checksums"] for u in urls] == sums
        res["greedy_after_reject"] = [s.response_ids.tolist() for s in engine.generate(PROMPTS, greedy)] == responses
        # The group is still in step: a valid update goes through on it.
        res["after_reject_ok"] = sender.send([("model.norm.weight", kept["model.norm.weight"])]).num_tensors == 1
        sender.close()
    return res


def test_tp2_trainer_syncs_into_running_server(served):
    hf_dir, urls = served
    res = run_ranks(_trainer, 2, args=(hf_dir, urls), timeout=240)
    r0, r1 = res
    assert r0["drift_initial"] < 1e-5, r0["drift_initial"]  # megatron TP=2 and the server agree before changes
    assert r0["drift_stale"] > 1e-2, r0["drift_stale"]  # the trainer moved away from what is served
    assert r0["drift_synced"] < 1e-5 and r0["drift_synced_2"] < 1e-5, (r0["drift_synced"], r0["drift_synced_2"])
    assert r1["drift_synced"] == r0["drift_synced"]  # reduced on the same tokens on both ranks
    assert r0["stats"]["num_buckets"] > 3 and r0["stats"]["bytes"] == r0["exported_bytes"]
    assert r0["stats"]["gb_per_s"] > 0
    served_1, hf_1 = r0["greedy_1"]
    assert served_1 == hf_1
    served_2, hf_2 = r0["greedy_2"]
    assert served_2 == hf_2 and served_2 != served_1
    assert r0["checksums_1"] == [True, True] and r0["checksums_2"] == [True, True]
    assert r0["version_1"] == ["step-1", "step-1"]
    assert "expected shape [64], found [65]" in r0["wrong_shape_error"] and "still serving" in r0["wrong_shape_error"]
    assert r0["checksums_after_reject"] and r0["greedy_after_reject"] and r0["after_reject_ok"]
