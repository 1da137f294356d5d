"""`megafork serve` speaks SGLang 0.5.23: sessions, seeds, default fields, info and RL endpoints.

    .venv/bin/python -m pytest tests/test_serve_sglang.py -q

One real `megafork serve` subprocess on a tiny Qwen3, driven over loopback HTTP. What SGLang's own
code says about the same requests is checked by `make sglang-contract` (tests/sglang_contract/).
"""
from __future__ import annotations

import json
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from megafork.rollout import (
    EmbeddedEngine,
    HttpWeightSender,
    RolloutError,
    SamplingParams,
    SGLangEngine,
    WeightSyncConfig,
    launch_servers,
    stop_servers,
)
from megafork.rollout.httpjson import request_json
from megafork.rollout.sglang_client import generate_body
from megafork.rollout.sglang_fields import REQUESTS, SAMPLING_PARAMS
from megafork.testing.multirank import free_port
from megafork.testing.tiny_qwen3 import make_tiny_qwen3

PROMPTS = [[1, 5, 6, 7], [1, 20, 21], [1, 30, 31, 32, 33]]
CAP = 200


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_sglang")
    hf_dir = make_tiny_qwen3(root / "tiny", seed=3)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "megafork", "serve", "--model", str(hf_dir), "--port", str(port), "--device", "cpu",
           "--threads", "1", "--log-level", "WARNING", "--weight-sync-timeout", "60", "--max-new-tokens-cap", str(CAP)]
    procs = launch_servers([cmd], [url], timeout_s=120)
    yield {"url": url, "hf_dir": hf_dir, "root": root}
    stop_servers(procs)


# --------------------------------------------------------------------------- seeds

def test_seeded_group_samples_differ_and_match_the_in_process_engine(served):
    sp = SamplingParams(n=4, temperature=1.0, max_new_tokens=6, seed=11, ignore_eos=True)
    body = generate_body(PROMPTS, sp, 0, len(PROMPTS))
    seeds = [e["sampling_seed"] for e in body["sampling_params"]]
    assert len(set(seeds)) == len(PROMPTS) * 4 and all(e["n"] == 1 for e in body["sampling_params"])
    got = SGLangEngine([served["url"]], timeout_s=60).generate(PROMPTS, sp)
    for i in range(len(PROMPTS)):
        group = [tuple(s.response_ids) for s in got if s.prompt_index == i]
        assert len(group) == 4 and len(set(group)) > 1, group  # the n responses of a group differ
    # The same seed gives the same samples however the prompts are spread, and in process.
    two = SGLangEngine([served["url"], served["url"] + "/"], timeout_s=60).generate(PROMPTS, sp)
    local = EmbeddedEngine.from_pretrained(served["hf_dir"], device="cpu").generate(PROMPTS, sp)
    ids = [[[int(t) for t in s.response_ids] for s in out] for out in (two, got, local)]  # arrays and lists
    assert ids[0] == ids[1] == ids[2]


def test_one_seed_with_n_copies_gives_identical_samples_as_sglang(served):
    """SGLang copies a request's seed to all n copies (deterministic inference: identical outputs)."""
    body = {"input_ids": PROMPTS[0], "sampling_params": {"n": 3, "temperature": 1.0, "max_new_tokens": 8,
                                                         "ignore_eos": True, "sampling_seed": 5}}
    status, out = request_json(served["url"], "/generate", body)
    assert status == 200 and len(out) == 3
    assert out[0]["output_ids"] == out[1]["output_ids"] == out[2]["output_ids"]
    del body["sampling_params"]["sampling_seed"]
    outs = request_json(served["url"], "/generate", body)[1]
    assert len({tuple(o["output_ids"]) for o in outs}) > 1


# --------------------------------------------------------------------------- fields

def _defaults(fields: dict) -> dict:
    return {k: v["default"] for k, v in fields.items() if v["default"] not in ("<required>", "<not a JSON literal>")}


def test_every_sglang_field_at_its_default_is_accepted(served):
    body = {**_defaults(REQUESTS["GenerateReqInput"]), "input_ids": PROMPTS[1],
            "sampling_params": {**_defaults(SAMPLING_PARAMS), "max_new_tokens": 3}}
    assert len(body) > 60  # the whole request class, not a hand-picked part of it
    status, out = request_json(served["url"], "/generate", body)
    assert status == 200, out
    assert len(out["output_ids"]) <= 3
    # The examples, spelled as clients send them.
    extra = {"extra_key": None, "cache_salt": None, "custom_labels": {}, "kv_hints": None, "max_thinking_tokens": None,
             "images_config": None, "no_logs": False, "return_entropy": False}
    assert request_json(served["url"], "/generate", {"input_ids": [1, 2], **extra,
                                                     "sampling_params": {"max_new_tokens": 2}})[0] == 200


@pytest.mark.parametrize("body, message", [
    ({"return_entropy": True}, "return_entropy: this SGLang option is not supported"),
    ({"lora_path": "adapter"}, "lora_path: this SGLang option is not supported"),
    ({"sampling_params": {"max_new_tokens": 2, "stop": ["x"]}}, "sampling_params.stop: this SGLang option"),
    ({"sampling_params": {"max_new_tokens": 2, "repetition_penalty": 1.2}}, "repetition_penalty"),
    ({"retrun_logprob": True}, "retrun_logprob: unknown field"),
])
def test_non_default_unsupported_options_are_refused(served, body, message):
    status, out = request_json(served["url"], "/generate", {"input_ids": [1, 2], **body})
    assert status == 400 and message in out["error"]["message"], out


# --------------------------------------------------------------------------- info

def test_model_info_and_server_info_have_sglang_fields_and_old_names(served):
    url = served["url"]
    info = request_json(url, "/model_info")[1]
    for key in ("model_path", "served_model_name", "tokenizer_path", "is_generation", "preferred_sampling_params",
                "weight_version", "load_format", "reasoning_parser", "tool_call_parser"):
        assert key in info, key
    assert info["tokenizer_path"] == str(served["hf_dir"]) and info["is_generation"] is True
    assert request_json(url, "/get_model_info")[1] == info
    server = request_json(url, "/server_info")[1]
    assert server["max_context_length"] == 256 and server["port"] == int(url.rsplit(":", 1)[1])
    assert server["max_new_tokens_cap"] == CAP and "return_checksums" in server["megafork_extensions"]
    assert request_json(url, "/get_server_info")[1]["model_path"] == server["model_path"]


# --------------------------------------------------------------------------- bounds and aborts

def test_context_and_token_cap_are_400_with_both_numbers(served):
    url = served["url"]
    status, out = request_json(url, "/generate", {"input_ids": [1] * 250, "sampling_params": {"max_new_tokens": 10}})
    assert status == 400 and "maximum context length of 256 tokens" in out["error"]["message"]
    assert "250 tokens from the input messages and 10 tokens for the completion" in out["error"]["message"]
    status, out = request_json(url, "/generate", {"input_ids": [1] * 300, "sampling_params": {"max_new_tokens": 1}})
    assert status == 400 and "The input (300 tokens) is longer than the model's context length (256" in str(out)
    status, out = request_json(url, "/generate", {"input_ids": [1], "sampling_params": {"max_new_tokens": CAP + 1}})
    assert status == 400 and f"{CAP + 1} is over this server's cap of {CAP}" in out["error"]["message"]


def _running(url) -> int:
    return request_json(url, "/server_info")[1]["internal_states"][0]["num_running_reqs"]


def _long_request(url, result, rid="long-1"):
    body = {"input_ids": [1, 2, 3], "rid": rid, "sampling_params": {"max_new_tokens": CAP, "ignore_eos": True}}
    result["answer"] = request_json(url, "/generate", body, timeout_s=120)


def _wait_running(url, want: int, timeout_s: float) -> float:
    t0 = time.monotonic()
    while _running(url) != want:
        assert time.monotonic() - t0 < timeout_s, f"num_running_reqs did not reach {want} in {timeout_s}s"
        time.sleep(0.02)
    return time.monotonic() - t0


def test_abort_request_by_rid_and_abort_all(served):
    url = served["url"]
    for body in ({"rid": "long"}, {"abort_all": True}):  # a prefix of the rid, as SGLang matches
        result = {}
        t = threading.Thread(target=_long_request, args=(url, result))
        t.start()
        _wait_running(url, 1, 30)
        assert request_json(url, "/abort_request", body)[0] == 200
        t.join(30)
        status, out = result["answer"]
        assert status == 200 and out["meta_info"]["finish_reason"]["type"] == "abort", out["meta_info"]
        assert len(out["output_ids"]) < CAP and out["meta_info"]["id"] == "long-1"
    assert request_json(url, "/abort_request", {"rid": "nobody"})[0] == 200  # unknown ids are ignored, as in SGLang
    assert request_json(url, "/abort_request", {"rid": 5})[0] == 400


def test_disconnected_client_generation_stops_within_a_second(served):
    url = served["url"]
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": CAP, "ignore_eos": True}})
    sock = socket.create_connection((host, int(port)))
    sock.sendall(f"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
    _wait_running(url, 1, 30)
    sock.close()
    assert _wait_running(url, 0, 5) < 1.0


# --------------------------------------------------------------------------- weight endpoints

def test_weight_version_weights_by_name_checker_memory_and_tensor(served):
    import hashlib

    from safetensors.torch import load_file

    url = served["url"]
    out = request_json(url, "/update_weight_version", {"new_version": "v7"})[1]
    assert out == {"success": True, "message": "Weight version updated to v7", "new_version": "v7"}
    assert request_json(url, "/model_info")[1]["weight_version"] == "v7"
    state = load_file(str(served["hf_dir"] / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight"
    rows = request_json(url, "/get_weights_by_name", {"name": name, "truncate_size": 3})[1]
    assert torch.equal(torch.tensor(rows), state[name][:3])
    assert request_json(url, "/get_weights_by_name", {"name": "nope"})[0] == 400
    checked = request_json(url, "/weights_checker", {"action": "checksum"})[1]
    sums = checked["ranks"][0]["checksums"]
    want = {n: hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
            for n, t in state.items()}
    assert {n: sums[n] for n in want} == want and checked["success"] is True
    assert request_json(url, "/weights_checker", {"action": "snapshot"})[0] == 400
    for path in ("/release_memory_occupation", "/resume_memory_occupation"):
        status, out = request_json(url, path, {"tags": ["weights"]})
        assert status == 200 and out["success"] is True and "no-op" in out["message"]
    assert request_json(url, "/begin_weight_update", {})[0] == 200
    assert request_json(url, "/begin_weight_update", {})[1]["message"].startswith("a weight-update session is already open")
    status, out = request_json(url, "/update_weights_from_tensor", {"serialized_named_tensors": ["AAAA"]})
    assert status == 501 and "MultiprocessingSerializer" in out["message"]
    assert request_json(url, "/end_weight_update", {})[0] == 200


def test_partial_disk_update_fails_and_keeps_every_old_weight(served):
    """A sharded checkpoint with one shard missing, or a tensor missing, changes nothing."""
    from safetensors.torch import load_file, save_file

    url = served["url"]
    before = request_json(url, "/get_weights_checksum")[1]["checksums"]
    new = load_file(str(make_tiny_qwen3(served["root"] / "other", seed=8) / "model.safetensors"))
    names = sorted(new)
    sharded = served["root"] / "sharded"
    sharded.mkdir()
    shards = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for k, part in enumerate(shards):
        fname = f"model-0000{k + 1}-of-00002.safetensors"
        save_file({n: new[n] for n in part}, str(sharded / fname))
        weight_map.update({n: fname for n in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (sharded / "model-00002-of-00002.safetensors").unlink()
    status, out = request_json(url, "/update_weights_from_disk", {"model_path": str(sharded)})
    assert status == 400 and "model-00002-of-00002.safetensors" in out["message"] and "still serving" in out["message"]
    assert request_json(url, "/get_weights_checksum")[1]["checksums"] == before
    lacking = served["root"] / "lacking"
    lacking.mkdir()
    save_file({n: new[n] for n in names[1:]}, str(lacking / "model.safetensors"))
    status, out = request_json(url, "/update_weights_from_disk", {"model_path": str(lacking)})
    assert status == 400 and names[0] in out["message"], out
    assert request_json(url, "/get_weights_checksum")[1]["checksums"] == before


# --------------------------------------------------------------------------- the sender's session

class _PreSessionProxy:
    """A server from before weight-update sessions: 404 on begin/end; it opens megafork serve's
    session itself around each update, as an old SGLang needed none."""

    def __init__(self, target: str):
        self.target = target
        proxy = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                self._go(None)

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                self._go(json.loads(self.rfile.read(n)) if n else None)

            def _go(self, body):
                path = self.path
                if path in ("/begin_weight_update", "/end_weight_update"):
                    status, out = 404, {"detail": "Not Found"}
                elif path == "/update_weights_from_distributed":
                    request_json(proxy.target, "/begin_weight_update", {})
                    status, out = request_json(proxy.target, path, body, timeout_s=60)
                    request_json(proxy.target, "/end_weight_update", {})
                else:
                    status, out = request_json(proxy.target, path, body, timeout_s=60)
                data = json.dumps(out).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_sender_opens_and_closes_sessions_and_falls_back_once_on_404(served, caplog):
    from safetensors.torch import load_file

    url = served["url"]
    state = load_file(str(served["hf_dir"] / "model.safetensors"))
    sender = HttpWeightSender([url], WeightSyncConfig(bucket_bytes=8 << 10, timeout_s=60, group_name="s1"))
    sender.connect()
    try:
        assert sender.send(state.items(), weight_version="w1").num_tensors == len(state)

        def broken():
            yield from list(state.items())[:3]
            raise RuntimeError("export failed")

        with pytest.raises(RuntimeError, match="export failed"):
            sender.send(broken())
        # The failure path closed the session: a new one opens, and the next sync works.
        assert sender.send(state.items(), weight_version="w2").num_tensors == len(state)
        assert request_json(url, "/model_info")[1]["weight_version"] == "w2"
    finally:
        sender.close()
    proxy = _PreSessionProxy(url)
    old = HttpWeightSender([proxy.url], WeightSyncConfig(timeout_s=60, group_name="s2"))
    old.connect()
    try:
        with caplog.at_level(logging.WARNING, logger="megafork.rollout.weight_sync"):
            old.send(state.items(), weight_version="w3")
            old.send(state.items(), weight_version="w4")
        notes = [r for r in caplog.records if "before weight-update sessions" in r.getMessage()]
        assert len(notes) == 1
        assert request_json(url, "/model_info")[1]["weight_version"] == "w4"
    finally:
        old.close()
        proxy.server.shutdown()


# A trainer that dies as its second sync begins: its group and session stay open on the server.
_KILLED_TRAINER = """
import os, signal, sys
from safetensors.torch import load_file
from megafork.rollout import HttpWeightSender, WeightSyncConfig
url, hf_dir, group = sys.argv[1:]
sender = HttpWeightSender([url], WeightSyncConfig(timeout_s=60, group_name=group))
sender.connect()
sender.send(load_file(hf_dir + "/model.safetensors").items(), weight_version="killed")
sender._begin_session()  # killed as the next sync begins: the session stays open too
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_trainers_group_is_destroyed_before_the_next_init(served, caplog):
    from safetensors.torch import load_file

    url, group = served["url"], "stale"
    absent = {"success": False, "message": "The group to be destroyed does not exist."}  # SGLang 0.5.23's answer
    assert request_json(url, "/destroy_weights_update_group", {"group_name": group}) == (400, absent)
    proc = subprocess.run([sys.executable, "-c", _KILLED_TRAINER, url, str(served["hf_dir"]), group],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert request_json(url, "/model_info")[1]["weight_version"] == "killed"
    # Left open: a plain init of that name is refused, as SGLang refuses a name already in use.
    status, out = request_json(url, "/init_weights_update_group", {
        "master_address": "127.0.0.1", "master_port": free_port(), "rank_offset": 1, "world_size": 2,
        "group_name": group, "backend": "gloo"})
    assert status == 400 and out["success"] is False and "already exists" in out["message"], out
    assert request_json(url, "/begin_weight_update", {"selector": "all"})[1]["message"].startswith(
        "a weight-update session is already open")
    state = load_file(str(served["hf_dir"] / "model.safetensors"))
    for expect_stale in (True, False):  # the next trainer, then one after a clean close
        caplog.clear()
        sender = HttpWeightSender([url], WeightSyncConfig(timeout_s=60, group_name=group))
        with caplog.at_level(logging.WARNING, logger="megafork.rollout.weight_sync"):
            sender.connect()
        try:
            assert sender.send(state.items(), weight_version=f"next-{expect_stale}").num_tensors == len(state)
        finally:
            sender.close()
        destroyed = [r for r in caplog.records if "destroyed it and ended the weight-update session it had left "
                     "open before creating this run's" in r.getMessage()]
        assert len(destroyed) == expect_stale, caplog.text
        assert request_json(url, "/model_info")[1]["weight_version"] == f"next-{expect_stale}"
    assert request_json(url, "/destroy_weights_update_group", {"group_name": group}) == (400, absent)


def test_checksum_verification_is_probed_before_anything_is_sent(served):
    proxy = _PreSessionProxy(served["url"])

    # Pretend to be SGLang: the same server without megafork's extension list.
    def strip(handler_cls):
        orig = handler_cls._go

        def _go(self, body):
            if self.path in ("/server_info", "/get_server_info"):
                info = request_json(proxy.target, self.path)[1]
                info.pop("megafork_extensions")
                data = json.dumps(info).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            orig(self, body)
        handler_cls._go = _go

    strip(proxy.server.RequestHandlerClass)
    sender = HttpWeightSender([proxy.url], WeightSyncConfig(verify_checksums=True, timeout_s=30, group_name="s3"))
    with pytest.raises(RolloutError, match="return_checksums"):
        sender.connect()
    assert sender.pg is None
    proxy.server.shutdown()


# --------------------------------------------------------------------------- start-up errors

def _serve_fails(args, timeout=120) -> str:
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "megafork", "serve", *args, "--device", "cpu", "--log-level", "ERROR"],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_startup_errors_are_one_line_each(served, tmp_path):
    import shutil

    port = served["url"].rsplit(":", 1)[1]
    line = _serve_fails(["--model", str(served["hf_dir"]), "--port", port])
    assert f"cannot listen on 127.0.0.1:{port}: the port is already in use" in line
    truncated = tmp_path / "truncated"
    shutil.copytree(served["hf_dir"], truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    line = _serve_fails(["--model", str(truncated), "--port", str(free_port())])
    assert f"cannot load --model {truncated}" in line
    no_tok = tmp_path / "no_tokenizer_json"
    shutil.copytree(served["hf_dir"], no_tok)
    (no_tok / "tokenizer.json").unlink()
    line = _serve_fails(["--model", str(no_tok), "--port", str(free_port())])
    assert f"{no_tok / 'tokenizer.json'}: missing" in line
