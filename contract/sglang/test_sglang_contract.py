"""megafork against SGLang 0.5.23's own code, on CPU: `make sglang-contract`.

    make sglang-contract        # installs the wheel into .sglang-contract/ once, then runs this

What it proves (every check runs SGLang's code from the wheel, not a copy of it):
- the field table `megafork/rollout/sglang_fields.py` is what the wheel's classes say (also
  checked by `tools/gen_sglang_fields.py --check` in the make target);
- every `/generate` body the client sends passes SGLang's JSON contract gate
  (`api_types.GenerateRequest`) and its request class (`GenerateReqInput`, validated as FastAPI
  does, then `normalize_batch_and_arguments`), and after SGLang's own normalisation every sample
  carries its own seed (the n responses of a group can differ);
- `megafork serve` accepts SGLang's full default `GenerateReqInput` and `SamplingParams` (built
  from the live classes), and its `/generate`, `/model_info` and `/server_info` answers decode
  with SGLang's response schemas (`api_types.py`);
- `HttpWeightSender` syncs weights, per tensor and as flattened buckets, into SGLang's
  weight-receiving path (the session guard, `init_custom_process_group`,
  `receive_weights_from_distributed`, `FlattenedTensorBucket`) bit-exactly, and a sync outside a
  session is refused by SGLang and by `megafork serve` with the same status and message.

What it cannot prove: SGLang's GPU generation (its sampler, CUDA kernels, the tokenizer
manager's ZMQ path and the scheduler's batching do not run here); the receiving model is
transformers' Qwen3 loading by HF name, not SGLang's fused-layer Qwen3; NCCL is replaced by gloo.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import sglang_env
import torch
from pydantic import TypeAdapter
from sglang.api.v1 import api_types
from sglang.srt.entrypoints.api_contract import generate_contract_error
from sglang.srt.managers.io_struct import GenerateReqInput

from megafork.rollout import (
    HttpWeightSender,
    SamplingParams,
    SGLangEngine,
    WeightSyncConfig,
    launch_servers,
    stop_servers,
)
from megafork.rollout.httpjson import request_json
from megafork.rollout.process_group import destroy_weight_update_group
from megafork.rollout.sglang_client import generate_body
from megafork.testing.multirank import free_port
from megafork.testing.sglang_source import generate_table
from megafork.testing.tiny_qwen3 import make_tiny_qwen3

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PROMPTS = [[1, 5, 6, 7], [1, 20, 21], [1, 30, 31, 32, 33]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_qwen3(tmp_path_factory.mktemp("contract") / "tiny", seed=4, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def serve(tiny):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    procs = launch_servers([[sys.executable, "-m", "megafork", "serve", "--model", str(tiny), "--port", str(port),
                             "--device", "cpu", "--threads", "1", "--log-level", "WARNING",
                             "--weight-sync-timeout", "60"]], [url], timeout_s=120)
    yield url
    stop_servers(procs)


@pytest.fixture(scope="module")
def receiver(tiny):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    procs = launch_servers([[sys.executable, str(HERE / "receiver.py"), "--model", str(tiny), "--port", str(port)]],
                           [url], timeout_s=180)
    yield url
    stop_servers(procs)


def test_field_table_is_the_wheels():
    table = (ROOT / "megafork" / "rollout" / "sglang_fields.py").read_text()
    assert generate_table(Path(sglang_env.SITE) / "sglang") == table
    assert "SGLANG_VERSION = '0.5.23'" in table


@pytest.mark.parametrize("n, seed", [(1, None), (3, None), (1, 7), (4, 7)])
def test_client_bodies_pass_sglangs_gate_and_class_and_seed_every_sample(n, seed):
    sp = SamplingParams(n=n, temperature=1.0, max_new_tokens=5, seed=seed)
    for start, end in ((0, 3), (1, 3)):
        body = generate_body(PROMPTS, sp, start, end)
        assert generate_contract_error(body) is None
        obj = TypeAdapter(GenerateReqInput).validate_python(body)
        obj.normalize_batch_and_arguments()
        rows = (end - start) * n
        assert len(obj.input_ids) == rows and len(obj.sampling_params) == rows
        for k in range(rows):
            api_types.SamplingParams.from_json_value(obj.sampling_params[k])
        if seed is None:
            assert obj.input_ids[: end - start] == PROMPTS[start:end]
        else:
            # One entry per sample, prompt-major (SGLang answers a batch in entry order).
            assert obj.input_ids == [p for p in PROMPTS[start:end] for _ in range(n)]
            seeds = [s["sampling_seed"] for s in obj.sampling_params]
            assert len(set(seeds)) == rows, seeds  # every sample has its own seed after SGLang's expansion


def test_one_seed_with_n_is_copied_by_sglang():
    """What the client avoids: SGLang copies a single seed to every copy of the prompt."""
    body = {"input_ids": PROMPTS, "sampling_params": {"n": 3, "sampling_seed": 7}}
    obj = TypeAdapter(GenerateReqInput).validate_python(body)
    obj.normalize_batch_and_arguments()
    assert obj.parallel_sample_num == 3 and len(obj.sampling_params) == 3 * len(PROMPTS)
    assert {s["sampling_seed"] for s in obj.sampling_params} == {7}


def _class_defaults(cls) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if isinstance(default, (type(None), bool, int, float, str, list, dict)):
            out[f.name] = default
    return out


def test_serve_accepts_sglangs_defaults_and_answers_in_its_schema(serve):
    body = {**_class_defaults(GenerateReqInput), "input_ids": PROMPTS[0],
            "sampling_params": {**api_types.SamplingParams().to_json_value(), "max_new_tokens": 4},
            "return_logprob": True}
    assert len(body) > 60
    status, out = request_json(serve, "/generate", body)
    assert status == 200, out
    resp = api_types.GenerateResponse.from_json_value(out)
    assert resp.meta_info.completion_tokens == len(resp.output_ids) and len(resp.meta_info.output_token_logprobs) > 0
    # Batched, n > 1, seeded per sample: every item decodes, and the client reads them back.
    sp = SamplingParams(n=2, temperature=1.0, max_new_tokens=4, seed=3)
    status, items = request_json(serve, "/generate", generate_body(PROMPTS, sp, 0, 3))
    assert status == 200 and len(items) == 6
    for item in items:
        finish = api_types.GenerateResponse.from_json_value(item).meta_info.finish_reason
        assert isinstance(finish, (api_types.FinishLength, api_types.FinishStop))
    assert len(SGLangEngine([serve]).generate(PROMPTS, sp)) == 6
    model = api_types.GetModelInfoResponse.from_json_value(request_json(serve, "/model_info")[1])
    assert model.tokenizer_path and model.is_generation and model.weight_version == "default"
    server = api_types.GetServerInfoResponse.from_json_value(request_json(serve, "/server_info")[1])
    assert server.max_context_length == 256 and server.port == int(serve.rsplit(":", 1)[1])
    # /abort_request takes SGLang's AbortRequest shape and answers an empty 200, as SGLang's route does.
    assert request_json(serve, "/abort_request", api_types.AbortRequest(rid="x").to_json_value())[0] == 200


def _checksums(state: dict) -> dict:
    import hashlib

    return {n: hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest() for n, t in state.items()}


@pytest.mark.parametrize("load_format", ["flattened_bucket", "per_tensor"])
def test_weight_sync_into_sglangs_receiving_path_is_bit_exact(receiver, tiny, load_format):
    from safetensors.torch import load_file

    offset = 1000 if load_format == "per_tensor" else 0  # new weights for each sync
    state = {n: t + 0.5 * torch.randn(t.shape, generator=torch.Generator().manual_seed(offset + i))
             for i, (n, t) in enumerate(sorted(load_file(str(tiny / "model.safetensors")).items()))}
    before = request_json(receiver, "/contract/checksums")[1]["checksums"]
    sender = HttpWeightSender([receiver], WeightSyncConfig(bucket_bytes=16 << 10, load_format=load_format,
                                                           timeout_s=60, group_name=f"g-{load_format}"),
                              engine_ranks=[1])
    sender.connect()
    try:
        stats = sender.send(state.items(), weight_version=f"v-{load_format}")
    finally:
        sender.close()
    assert stats.num_buckets > 3
    got = request_json(receiver, "/contract/checksums")[1]
    want = _checksums(state)
    assert sorted(got["checksums"]) == sorted(want)
    assert [n for n in want if got["checksums"][n] != want[n]] == []
    assert all(got["checksums"][n] != before[n] for n in want)
    assert got["weight_version"] == f"v-{load_format}"


def test_sync_outside_a_session_is_refused_by_sglang_and_by_serve_alike(receiver, serve):
    body = {"names": ["model.norm.weight"], "dtypes": ["float32"], "shapes": [[64]]}
    real = request_json(receiver, "/update_weights_from_distributed", body)
    ours = request_json(serve, "/update_weights_from_distributed", body)
    assert real[0] == ours[0] == 400
    assert real[1] == ours[1] == {"success": False, "message": "update_weights_from_distributed must run between "
                                                               "begin_weight_update() and end_weight_update()"}
    for path in ("/begin_weight_update", "/begin_weight_update", "/end_weight_update", "/end_weight_update"):
        real = request_json(receiver, path, {"selector": "all"} if "begin" in path else {})
        ours = request_json(serve, path, {"selector": "all"} if "begin" in path else {})
        assert real == ours, (path, real, ours)


def test_a_stale_group_is_destroyed_before_init_on_sglang_and_unknown_groups_answer_alike(receiver, serve, tiny):
    from safetensors.torch import load_file

    absent = request_json(receiver, "/destroy_weights_update_group", {"group_name": "never-made"})
    assert absent == request_json(serve, "/destroy_weights_update_group", {"group_name": "never-made"})
    assert absent == (400, {"success": False, "message": "The group to be destroyed does not exist."})
    # A trainer that dies without close(): its group stays open in SGLang's WeightUpdater.
    state = load_file(str(tiny / "model.safetensors"))
    config = WeightSyncConfig(timeout_s=60, group_name="stale", load_format="per_tensor")
    dead = HttpWeightSender([receiver], config, engine_ranks=[1])
    dead.connect()
    dead.send(state.items(), weight_version="dead")
    destroy_weight_update_group(dead.pg)  # gone on this side without telling the server, as in a killed process
    dead.pg = None
    dead.close()
    nxt = HttpWeightSender([receiver], config, engine_ranks=[1])
    nxt.connect()  # destroys SGLang's stale group first, or SGLang's init of the same name fails
    try:
        nxt.send(state.items(), weight_version="after-stale")
    finally:
        nxt.close()
    assert request_json(receiver, "/contract/checksums")[1]["weight_version"] == "after-stale"


def test_sglang_comes_from_the_wheel_and_torch_stays_the_venvs_cpu_build():
    import sglang.srt.managers.io_struct as io

    assert Path(io.__file__).resolve().is_relative_to(Path(sglang_env.SITE).resolve())
    assert torch.version.cuda is None and torch.__version__.startswith("2.13")


def test_replies_written_by_sglangs_encoder_parse_on_the_fast_path(monkeypatch):
    """SGLang's HTTP server writes `/generate` with `dumps_json`: orjson with its
    ORJSON_RESPONSE_OPTIONS. The client's C++ parser reads that byte layout itself (no json
    fallback), bit-identical to json. (The module imports fastapi, which this CPU install lacks,
    so its options are read from the wheel's source and orjson is called as it calls it.)"""
    import ast
    import json

    import numpy as np
    import orjson

    import megafork.rollout.reply as reply

    src = (Path(sglang_env.SITE) / "sglang/srt/utils/json_response.py").read_text()
    assert "return orjson.dumps(content, option=ORJSON_RESPONSE_OPTIONS)" in src
    (options,) = [n.value for n in ast.parse(src).body if isinstance(n, ast.Assign)
                  and getattr(n.targets[0], "id", "") == "ORJSON_RESPONSE_OPTIONS"]
    options = eval(compile(ast.Expression(options), "json_response.py", "eval"), {"orjson": orjson})

    def dumps_json(content):
        return orjson.dumps(content, option=options)

    gen = torch.Generator().manual_seed(0)
    items, sources = [], []
    for k, length in enumerate((7, 0, 300)):
        ids = torch.randint(0, 151936, (length,), generator=gen)
        lps = -torch.empty(length).exponential_(generator=gen)  # float32, as SGLang's log-prob tensors
        lps[:3] = torch.tensor([-0.0, -1.1920928955078125e-07, -31.25])[:length]
        item = {"text": "a \"b\"", "output_ids": ids.tolist(), "meta_info": {
            "id": f"r{k}", "finish_reason": {"type": "length", "length": length}, "prompt_tokens": 3,
            "completion_tokens": length, "cached_tokens": 0, "weight_version": "default",
            "output_token_logprobs": [(lp, t, None) for lp, t in zip(lps.tolist(), ids.tolist())]}}
        assert api_types.GenerateResponse.from_json_value(json.loads(dumps_json(item))).output_ids == ids.tolist()
        items.append(item)
        sources.append((ids, lps))
    raw = dumps_json(items)
    ref = reply.parse_group(json.loads(raw), 3, 0, "http://sglang")
    monkeypatch.setattr(reply, "_decode_json", None)  # must not be needed
    fast = reply.decode_reply(raw, 3, 0, "http://sglang")
    assert np.array_equal(fast.ids, ref.ids) and fast.offsets.tolist() == ref.offsets.tolist() == [0, 7, 7, 307]
    assert np.array_equal(fast.logprobs.view(np.uint32), ref.logprobs.view(np.uint32))
    assert np.array_equal(fast.ids, torch.cat([s[0] for s in sources]).numpy())
    assert np.array_equal(fast.logprobs.view(np.uint32), torch.cat([s[1] for s in sources]).numpy().view(np.uint32))
    assert fast.finish_reasons == ["length"] * 3 and fast.weight_version == "default"
