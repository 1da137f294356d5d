"""`megafork serve` as a real subprocess, driven over loopback HTTP by the SGLang client.

    .venv/bin/python -m pytest tests/test_rollout_server.py -q

The last test kills the shared server mid-request, so keep it last.
"""
from __future__ import annotations

import re
import sys
import threading
import time

import pytest
import torch

from megafork.rollout import RolloutError, SamplingParams, SGLangEngine, launch_servers, stop_servers
from megafork.rollout.buckets import tensor_checksum
from megafork.rollout.httpjson import request_json
from megafork.testing.multirank import free_port
from megafork.testing.tiny_qwen3 import make_tiny_qwen3

PROMPTS = [[1, 5, 6, 7, 8, 9, 10, 11], [1, 20, 21], [1, 30, 31, 32, 33]]


def serve_command(hf_dir, port) -> list[str]:
    return [sys.executable, "-m", "megafork", "serve", "--model", str(hf_dir), "--host", "127.0.0.1",
            "--port", str(port), "--device", "cpu", "--threads", "1", "--log-level", "WARNING"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    hf_dir = make_tiny_qwen3(root / "tiny", seed=5)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    procs = launch_servers([serve_command(hf_dir, port)], [url], timeout_s=120)
    yield {"url": url, "hf_dir": hf_dir, "root": root, "proc": procs[0]}
    stop_servers(procs)


@pytest.fixture(scope="module")
def reference(served):
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(str(served["hf_dir"])).eval()


def _greedy(model, prompt, n):
    with torch.no_grad():
        return model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None)[
            0, len(prompt):].tolist()


def _token_logprobs(model, prompt, response, temperature=1.0):
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1].double()
    return torch.log_softmax(logits / temperature, -1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


def test_client_greedy_matches_transformers_and_logprobs_match_scoring(served, reference):
    engine = SGLangEngine([served["url"]], timeout_s=60)
    samples = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True))
    assert [s.prompt_index for s in samples] == [0, 1, 2]
    for s, prompt in zip(samples, PROMPTS):
        assert s.response_ids.tolist() == _greedy(reference, prompt, 10)
        assert s.finish_reason == "length" and s.weight_version == "default"
        want = _token_logprobs(reference, prompt, s.response_ids.tolist())
        assert torch.allclose(torch.tensor(s.logprobs, dtype=torch.float64), want, atol=1e-5, rtol=0)


def test_batched_parallel_sampling_and_seeds_over_http(served, reference):
    engine = SGLangEngine([served["url"]], timeout_s=60)
    sp = SamplingParams(n=3, temperature=0.7, max_new_tokens=6, seed=21, ignore_eos=True)
    a = engine.generate(PROMPTS, sp)
    assert [s.prompt_index for s in a] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert len({tuple(s.response_ids) for s in a}) > 3
    for s in a:
        want = _token_logprobs(reference, PROMPTS[s.prompt_index], s.response_ids.tolist(), temperature=0.7)
        assert torch.allclose(torch.tensor(s.logprobs, dtype=torch.float64), want, atol=1e-5, rtol=0)
    b = engine.generate(PROMPTS, sp)
    assert [s.response_ids.tolist() for s in a] == [s.response_ids.tolist() for s in b]
    # Spread over two servers (the same one twice here): same order, same samples (seeds are per prompt).
    two = SGLangEngine([served["url"], served["url"] + "/"], timeout_s=60)
    c = two.generate(PROMPTS, sp)
    assert [s.prompt_index for s in c] == [s.prompt_index for s in a]
    assert [s.response_ids.tolist() for s in c] == [s.response_ids.tolist() for s in a]  # per-prompt seeds


def test_raw_protocol_fields(served):
    url = served["url"]
    status, out = request_json(url, "/generate", {"input_ids": [1, 5, 6], "return_logprob": True,
                                                  "sampling_params": {"temperature": 0, "max_new_tokens": 3,
                                                                      "ignore_eos": True}})
    assert status == 200 and isinstance(out, dict)
    lps = out["meta_info"]["output_token_logprobs"]
    assert [t for _, t, _ in lps] == out["output_ids"] and all(x is None for *_, x in lps)
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 3}
    assert out["meta_info"]["prompt_tokens"] == 3 and out["meta_info"]["completion_tokens"] == 3
    # Text prompts use the checkpoint's tokenizer; a batch answers with a list.
    status, out = request_json(url, "/generate", {"text": ["hi", "yo!"], "sampling_params": {"max_new_tokens": 2}})
    assert status == 200 and len(out) == 2 and all(len(o["output_ids"]) <= 2 for o in out)
    assert all(o["meta_info"]["prompt_tokens"] == len(t) for o, t in zip(out, ["hi", "yo!"]))
    status, info = request_json(url, "/get_model_info")
    assert status == 200 and info["model_path"] == str(served["hf_dir"]) and info["model_type"] == "qwen3"
    assert request_json(url, "/health")[0] == 200 and request_json(url, "/health_generate")[0] == 200
    assert request_json(url, "/flush_cache", {})[0] == 200
    assert request_json(url, "/pause_generation", {"mode": "abort"})[1]["status"] == "ok"
    assert request_json(url, "/continue_generation", {})[1]["status"] == "ok"


@pytest.mark.parametrize("body, field", [
    ({"sampling_params": {"max_new_tokens": 2}}, "input_ids"),
    ({"input_ids": [1, 2], "text": "x"}, "input_ids"),
    ({"input_ids": [1, "a"]}, r"input_ids\[1\]"),
    ({"input_ids": [[1], []]}, r"input_ids\[1\]"),
    ({"input_ids": [1, 500]}, r"input_ids\[0\]\[1\]"),
    ({"input_ids": [1], "sampling_params": {"temperature": -1}}, "sampling_params.temperature"),
    ({"input_ids": [1], "sampling_params": {"top_p": 2}}, "sampling_params.top_p"),
    ({"input_ids": [1], "sampling_params": {"temprature": 1}}, "sampling_params.temprature: unknown"),
    ({"input_ids": [1], "sampling_params": {"min_p": 0.1}}, "sampling_params.min_p: this SGLang option is not"),
    ({"input_ids": [1], "stream": True}, "stream"),
    ({"input_ids": [1], "logprob_start_len": 0}, "logprob_start_len"),
    ({"input_ids": [1], "bogus": 1}, "bogus: unknown field"),
    ([1, 2, 3], "expected a JSON object"),
])
def test_malformed_generate_is_400_naming_the_field(served, body, field):
    status, out = request_json(served["url"], "/generate", body)
    assert status == 400, out
    assert re.search(field, out["error"]["message"]), out


@pytest.mark.parametrize("path, body, field", [
    ("/init_weights_update_group", {"master_address": "127.0.0.1", "master_port": 1234, "world_size": 2}, "rank_offset"),
    ("/init_weights_update_group", {"master_address": "127.0.0.1", "master_port": 1234, "rank_offset": 0,
                                    "world_size": 2, "backend": "gloo"}, "rank_offset"),
    ("/init_weights_update_group", {"master_address": "127.0.0.1", "master_port": 1234, "rank_offset": 1,
                                    "world_size": 2, "backend": "mpi"}, "backend"),
    # SGLang's guard comes before anything else: outside a weight-update session it is refused.
    ("/update_weights_from_distributed", {"names": ["a"], "dtypes": ["float32"], "shapes": [[2]]},
     r"^update_weights_from_distributed must run between begin_weight_update\(\) and end_weight_update\(\)$"),
    ("/end_weight_update", {}, "no weight-update session is open"),
    ("/begin_weight_update", {"selector": "draft"}, "selector"),
    ("/update_weights_from_tensor", {"serialized_named_tensors": []}, "must run between begin_weight_update"),
    ("/update_weights_from_distributed", {"names": ["a"], "dtypes": ["floaty"], "shapes": [[2]]}, r"dtypes\[0\]"),
    ("/update_weights_from_distributed", {"names": ["a", "b"], "dtypes": ["float32"], "shapes": [[2]]}, "dtypes"),
    ("/update_weights_from_distributed", {"names": ["a"], "dtypes": ["float32"], "shapes": [[2]],
                                          "load_format": "direct"}, "load_format"),
    ("/update_weights_from_disk", {"load_format": "auto"}, "model_path"),
])
def test_malformed_weight_requests_are_400_naming_the_field(served, path, body, field):
    status, out = request_json(served["url"], path, body)
    assert status == 400 and out["success"] is False, out
    assert re.search(field, out["message"]), out


def test_rejected_disk_update_keeps_old_weights_serving(served, reference):
    url = served["url"]
    sp = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
    before = request_json(url, "/generate", {"input_ids": PROMPTS[0], "sampling_params": sp})[1]["output_ids"]
    sums = request_json(url, "/get_weights_checksum")[1]["checksums"]
    wider = make_tiny_qwen3(served["root"] / "wider", seed=9, intermediate_size=160)
    status, out = request_json(url, "/update_weights_from_disk", {"model_path": str(wider)})
    assert status == 400 and out["success"] is False
    assert "expected shape [64, 128], found [64, 160]" in out["message"] and "still serving" in out["message"]
    assert request_json(url, "/get_weights_checksum")[1]["checksums"] == sums
    assert request_json(url, "/generate", {"input_ids": PROMPTS[0], "sampling_params": sp})[1]["output_ids"] == before
    assert before == _greedy(reference, PROMPTS[0], 8)
    # A compatible checkpoint loads, and the server then serves exactly its weights.
    other = make_tiny_qwen3(served["root"] / "other", seed=10)
    status, out = request_json(url, "/update_weights_from_disk", {"model_path": str(other), "weight_version": "disk-1"})
    assert status == 200 and out["success"] is True, out
    from safetensors.torch import load_file

    want = {n: tensor_checksum(t) for n, t in load_file(str(other / "model.safetensors")).items()}
    got = request_json(url, "/get_weights_checksum", {"names": sorted(want)})[1]
    assert got["checksums"] == want and got["weight_version"] == "disk-1"
    # Put the original weights back for the tests that follow.
    assert request_json(url, "/update_weights_from_disk", {"model_path": str(served["hf_dir"])})[0] == 200
    assert request_json(url, "/get_weights_checksum")[1]["checksums"] == sums


def test_paused_server_holds_requests_until_continue(served):
    url = served["url"]
    assert request_json(url, "/pause_generation", {"mode": "in_place"})[0] == 200
    result = {}
    body = {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 2}}
    t = threading.Thread(target=lambda: result.update(r=request_json(url, "/generate", body, timeout_s=30)))
    t.start()
    t.join(1.0)
    assert t.is_alive(), "a request must wait while generation is paused"
    assert request_json(url, "/continue_generation", {})[0] == 200
    t.join(30)
    assert result["r"][0] == 200


def test_launch_failure_names_the_command():
    with pytest.raises(RolloutError, match="exited with code 3 during startup"):
        launch_servers([[sys.executable, "-c", "raise SystemExit(3)"]], ["http://127.0.0.1:9"], timeout_s=30)


def test_dead_server_mid_request_is_a_clear_error_within_the_timeout(served):
    """Runs last: it kills the module's server."""
    url, proc = served["url"], served["proc"]
    assert request_json(url, "/pause_generation", {"mode": "in_place"})[0] == 200  # the request will hang there
    engine = SGLangEngine([url], timeout_s=20, retries=2)
    outcome = {}

    def call():
        t0 = time.monotonic()
        try:
            engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=4))
        except RolloutError as exc:
            outcome["error"] = str(exc)
        outcome["seconds"] = time.monotonic() - t0

    t = threading.Thread(target=call)
    t.start()
    time.sleep(0.5)
    proc.kill()
    t.join(60)
    assert not t.is_alive()
    assert "error" in outcome, "a dead server must raise"
    assert url in outcome["error"] and "no SGLang server left" in outcome["error"]
    assert outcome["seconds"] < 20
    with pytest.raises(RolloutError, match=url):
        engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=4))
    assert engine.health() is False
