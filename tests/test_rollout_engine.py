"""The embedded rollout engine in process: sampling maths, generation, log-probs, weight loading.

    .venv/bin/python -m pytest tests/test_rollout_engine.py -q
"""
from __future__ import annotations

import pytest
import torch

from megafork.rollout import (
    EmbeddedEngine,
    LocalWeightSender,
    SamplingParams,
    WeightSyncConfig,
    WeightUpdateError,
)
from megafork.rollout.buckets import iter_buckets, layout, pack, tensor_checksum, unpack
from megafork.rollout.drift import rollout_logprob_drift
from megafork.rollout.sampling import sampling_log_probs
from megafork.testing.tiny_qwen3 import make_tiny_qwen3

PROMPTS = [[1, 5, 6, 7, 8, 9, 10, 11], [1, 20, 21], [1, 30, 31, 32, 33]]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_tiny_qwen3(tmp_path_factory.mktemp("rollout") / "tiny", seed=3, tie_word_embeddings=False)


@pytest.fixture()
def engine(hf_dir):
    torch.set_num_threads(1)
    return EmbeddedEngine.from_pretrained(hf_dir, device="cpu")


def _score(model, prompt, response):
    """Logits at the positions that predicted each response token (one unpadded forward pass)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0]
    return logits[len(prompt) - 1:-1].double()


# --------------------------------------------------------------------------- sampling maths

def test_sampling_distribution_matches_brute_force():
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    for temperature, top_k, top_p in [(1.0, -1, 1.0), (0.7, 10, 1.0), (1.3, -1, 0.8), (0.9, 7, 0.6)]:
        got = sampling_log_probs(logits, temperature, top_k, top_p)
        for row in range(logits.shape[0]):
            z = logits[row].double() / temperature
            order = torch.argsort(z, descending=True).tolist()
            keep = order[:top_k] if top_k != -1 else order
            p = torch.softmax(z[keep], 0)
            mass, nucleus = 0.0, []
            for tok, pk in zip(keep, p.tolist()):
                if mass >= top_p:
                    break
                nucleus.append(tok)
                mass += pk
            want = torch.full_like(z, float("-inf"))
            want[nucleus] = torch.log_softmax(z[nucleus], 0)
            assert torch.equal(torch.isinf(got[row]), torch.isinf(want)), (temperature, top_k, top_p, row)
            fin = torch.isfinite(want)
            assert torch.allclose(got[row][fin].double(), want[fin], atol=1e-5)


def test_sampling_params_errors_name_the_field():
    for kwargs, field in [({"n": 0}, "n"), ({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"),
                          ({"top_k": 0}, "top_k"), ({"max_new_tokens": 0}, "max_new_tokens"),
                          ({"stop_token_ids": [1, -2]}, "stop_token_ids[1]"), ({"seed": 1.5}, "seed")]:
        with pytest.raises(ValueError, match=rf"sampling_params\.{field.replace('[', '.').replace(']', '.')}"):
            SamplingParams(**kwargs)


# --------------------------------------------------------------------------- generation

def test_greedy_matches_transformers_generate_and_logprobs_match_scoring(engine):
    samples = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True))
    assert [s.prompt_index for s in samples] == [0, 1, 2]
    for s, prompt in zip(samples, PROMPTS):
        with torch.no_grad():
            ref = engine.model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                                        eos_token_id=None)[0, len(prompt):].tolist()
        assert s.response_ids == ref
        assert s.finish_reason == "length" and len(s.logprobs) == 10
        want = torch.log_softmax(_score(engine.model, prompt, s.response_ids), -1)
        want = want.gather(-1, torch.tensor(s.response_ids)[:, None]).squeeze(-1)
        assert torch.allclose(torch.tensor(s.logprobs, dtype=torch.float64), want, atol=1e-5, rtol=0)


def test_sampled_logprobs_are_those_of_the_truncated_distribution(engine):
    sp = SamplingParams(n=3, temperature=0.8, top_k=40, top_p=0.9, max_new_tokens=8, seed=11, ignore_eos=True)
    samples = engine.generate(PROMPTS, sp)
    assert [s.prompt_index for s in samples] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert len({tuple(s.response_ids) for s in samples}) > 3  # n>1 samples differ
    for s in samples:
        logp = sampling_log_probs(_score(engine.model, PROMPTS[s.prompt_index], s.response_ids), 0.8, 40, 0.9)
        want = logp.gather(-1, torch.tensor(s.response_ids)[:, None]).squeeze(-1).double()
        assert torch.isfinite(want).all()  # every sampled token lies inside its nucleus
        assert torch.allclose(torch.tensor(s.logprobs, dtype=torch.float64), want, atol=1e-5, rtol=0)


def test_seeded_sampling_is_reproducible(engine):
    sp = SamplingParams(n=2, temperature=1.0, max_new_tokens=12, seed=5, ignore_eos=True)
    a, b = engine.generate(PROMPTS, sp), engine.generate(PROMPTS, sp)
    assert [s.response_ids for s in a] == [s.response_ids for s in b]
    assert [s.logprobs for s in a] == [s.logprobs for s in b]
    c = engine.generate(PROMPTS, SamplingParams(n=2, temperature=1.0, max_new_tokens=12, seed=6, ignore_eos=True))
    assert [s.response_ids for s in a] != [s.response_ids for s in c]
    # Chunking the batch differently does not change a seeded result.
    engine.max_batch_rows = 2
    d = engine.generate(PROMPTS, sp)
    assert [s.response_ids for s in a] == [s.response_ids for s in d]


def test_stop_token_ends_the_response_and_is_included(engine):
    first = engine.generate([PROMPTS[0]], SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True))[0]
    stop = first.response_ids[2]
    cut = first.response_ids.index(stop)
    s = engine.generate([PROMPTS[0]], SamplingParams(temperature=0.0, max_new_tokens=6, stop_token_ids=[stop],
                                                     ignore_eos=True))[0]
    assert s.response_ids == first.response_ids[:cut + 1]
    assert s.finish_reason == "stop" and len(s.logprobs) == cut + 1


def test_prompt_ids_out_of_vocab_are_rejected(engine):
    with pytest.raises(ValueError, match=r"input_ids\[1\]\[0\].*< 128.*found 999"):
        engine.generate([[1, 2], [999]], SamplingParams(max_new_tokens=2))


def test_abort_ends_in_flight_requests(engine):
    import threading

    engine.pause("in_place")
    result = {}
    t = threading.Thread(target=lambda: result.update(s=engine.generate([PROMPTS[1]], SamplingParams(max_new_tokens=5))))
    t.start()
    t.join(0.3)
    assert t.is_alive()  # held while paused
    engine.resume()
    t.join(10)
    assert result["s"][0].finish_reason in ("length", "stop")
    engine.abort_all()  # no request in flight: nothing to abort, later requests run normally
    assert engine.generate([PROMPTS[1]], SamplingParams(max_new_tokens=3, ignore_eos=True))[0].finish_reason == "length"


# --------------------------------------------------------------------------- weights

def test_wrong_shape_update_is_rejected_and_old_weights_keep_serving(engine):
    sp = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)
    before = engine.generate(PROMPTS, sp)
    sums = engine.weights_checksum()
    good = ("model.norm.weight", torch.zeros(64))
    bad = ("model.layers.0.mlp.up_proj.weight", torch.zeros(129, 64))
    with pytest.raises(WeightUpdateError, match=r"shapes: 'model.layers.0.mlp.up_proj.weight' expected shape "
                                                r"\[128, 64\], found \[129, 64\]"):
        engine.update_weights([good, bad])
    with pytest.raises(WeightUpdateError, match=r"names: 'model.nope.weight' is not a tensor"):
        engine.update_weights([good, ("model.nope.weight", torch.zeros(3))])
    with pytest.raises(WeightUpdateError, match=r"dtypes: 'model.norm.weight'"):
        engine.update_weights([("model.norm.weight", torch.zeros(64, dtype=torch.int64))])
    assert engine.weights_checksum() == sums  # nothing was written, not even the good tensor
    after = engine.generate(PROMPTS, sp)
    assert [s.response_ids for s in after] == [s.response_ids for s in before]


def test_local_sender_updates_in_buckets_with_checksums(engine, hf_dir):
    from transformers import AutoModelForCausalLM

    new = AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sender = LocalWeightSender(engine, WeightSyncConfig(bucket_bytes=20_000, verify_checksums=True))
    # bf16 on the wire (as a bf16 trainer sends), cast to the engine's fp32 on load.
    stats = sender.send(((n, t.detach().to(torch.bfloat16)) for n, t in new.state_dict().items()), weight_version="v7")
    assert stats.num_buckets > 3 and stats.num_tensors == len(new.state_dict())
    assert stats.bytes == sum(t.numel() * 2 for t in new.state_dict().values())
    with torch.no_grad():
        for p in new.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    got = engine.weights_checksum()
    assert got == {n: tensor_checksum(t) for n, t in new.state_dict().items()}
    sp = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)
    s = engine.generate([PROMPTS[0]], sp)[0]
    with torch.no_grad():
        ref = new.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=8, do_sample=False, eos_token_id=None)
    assert s.response_ids == ref[0, len(PROMPTS[0]):].tolist() and s.weight_version == "v7"


# --------------------------------------------------------------------------- buckets, drift

def test_bucket_pack_roundtrip_mixed_dtypes_and_alignment():
    tensors = [("a", torch.arange(3, dtype=torch.bfloat16)), ("b", torch.randn(5, 3)),
               ("c", torch.arange(7, dtype=torch.int8)), ("d", torch.randn(2, dtype=torch.float64))]
    flat, names, dtypes, shapes = pack(tensors)
    assert names == ["d", "b", "a", "c"]  # decreasing itemsize keeps every offset aligned
    assert flat.dtype == torch.uint8 and flat.numel() == 16 + 60 + 6 + 7
    back = dict(unpack(flat.clone(), layout(names, dtypes, shapes)))
    for n, t in tensors:
        assert torch.equal(back[n], t) and back[n].dtype == t.dtype
    with pytest.raises(ValueError, match=r"'b' \(float32\) would start at byte 6"):
        layout(["a", "b"], [torch.bfloat16, torch.float32], [(3,), (2,)])
    sizes = [sum(t.numel() * t.element_size() for _, t in b) for b in iter_buckets(tensors, 66)]
    assert sizes == [6 + 60, 7 + 16]


def test_rollout_drift():
    roll = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -3.0]])
    train = torch.tensor([[-1.5, -2.0, 9.0], [-0.5, -0.25, 7.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    assert rollout_logprob_drift(roll, train, mask) == pytest.approx((0.5 + 0 + 0 + 0.25) / 4)
    with pytest.raises(ValueError, match="mask has shape"):
        rollout_logprob_drift(roll, train, mask[:, :2])


def test_batched_draw_equals_per_row_multinomial():
    from megafork.rollout.sampling import draw

    torch.manual_seed(0)
    for vocab in (3, 64, 1000):
        probs = torch.softmax(torch.randn(9, vocab) * 3, -1)
        probs[::2, vocab // 2:] = 0  # truncated rows, as top-k/top-p leave them
        seeds = [17 * i + vocab for i in range(9)]
        ref_gens = [torch.Generator().manual_seed(s) for s in seeds]
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        want = torch.stack([torch.multinomial(probs[i], 1, generator=g)[0] for i, g in enumerate(ref_gens)])
        assert torch.equal(draw(probs, gens), want)
        # The generators advanced alike: the next draws agree too.
        assert [torch.rand(1, generator=g).item() for g in gens] == [torch.rand(1, generator=g).item() for g in ref_gens]
    bad = torch.full((2, 5), 0.2)
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match="probabilities must be finite"):
        draw(bad, [torch.Generator().manual_seed(0) for _ in range(2)])
