"""The streaming SGLang client against real server processes: failover, timeouts, compact results.

    .venv/bin/python -m pytest tests/test_rollout_stream.py -q

The servers are `megafork serve`'s HTTP server over the SYNTHETIC random-token engine
(`python -m megafork.testing.synthetic_serve`), started as subprocesses and killed for real.
"""
from __future__ import annotations

import logging
import sys
import time

import numpy as np
import pytest

from megafork.rollout import RolloutError, SamplingParams, SGLangEngine, launch_servers, stop_servers
from megafork.rollout.stream import StreamConfig, StreamingClient
from megafork.testing.multirank import free_port

SP = SamplingParams(n=2, max_new_tokens=50, seed=5)


def _serve(*args: str):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "megafork.testing.synthetic_serve", "--port", str(port), "--vocab-size", "1000",
           "--response-len", "40", *args]
    (proc,) = launch_servers([cmd], [url], timeout_s=60)
    return url, proc


@pytest.fixture
def two_servers():
    a, pa = _serve("--delay-s", "0.2", "--seed", "1")
    b, pb = _serve("--delay-s", "0.2", "--seed", "2")
    yield (a, pa), (b, pb)
    stop_servers([pa, pb], grace_s=2)


def _prompts(k: int) -> list[list[int]]:
    return [[1 + i % 7, 2, 3 + i % 5] for i in range(k)]


def test_groups_are_compact_arrays_in_prompt_order(two_servers):
    (a, _), (b, _) = two_servers
    engine = SGLangEngine([a, b], timeout_s=30, max_inflight_per_server=3)
    res = engine.generate_groups(_prompts(12), SP)
    assert [g.prompt_index for g in res.groups] == list(range(12))
    assert {g.url for g in res.groups} == {a, b}  # both servers took work
    for g in res.groups:
        assert g.ids.dtype == np.int32 and g.logprobs.dtype == np.float32
        assert g.offsets.tolist() == [0, 40, 80] and g.finish_reasons == ["stop", "stop"]
        assert (g.logprobs <= 0).all() and ((0 <= g.ids) & (g.ids < 1000)).all()
    assert res.tokens == 12 * 2 * 40 and res.dropped_servers == [] and res.retries == 0
    samples = engine.generate(_prompts(3), SP)
    assert [s.prompt_index for s in samples] == [0, 0, 1, 1, 2, 2]
    assert all(len(s.response_ids) == 40 and s.response_ids.dtype == np.int32 for s in samples)


def test_a_server_killed_mid_step_fails_over_and_both_killed_names_both(two_servers, caplog):
    (a, pa), (b, pb) = two_servers
    client = StreamingClient([a, b], StreamConfig(max_inflight_per_server=2, request_timeout_s=30))
    seen = []

    def kill_b_after_four(group):
        seen.append(group.prompt_index)
        if len(seen) == 4:
            pb.kill()
        return False

    with caplog.at_level(logging.WARNING, logger="megafork.rollout.stream"):
        res = client.run(_prompts(20), SP, on_group=kill_b_after_four)
    assert all(g is not None for g in res.groups) and len(seen) == 20  # every group is there
    assert res.dropped_servers == [b]
    assert any(b in r.getMessage() and "dropped" in r.getMessage() for r in caplog.records), caplog.text
    assert {g.url for g in res.groups[-6:]} == {a}  # the late groups all came from the survivor

    def kill_a(group):
        pa.kill()
        return False

    with pytest.raises(RolloutError) as err:
        client.run(_prompts(20), SP, on_group=kill_a)
    assert a in str(err.value) and b in str(err.value) and "no SGLang server left" in str(err.value)


def test_a_stalling_server_times_out_and_its_requests_are_retried_elsewhere():
    stall, ps = _serve("--delay-s", "60")
    good, pg = _serve()
    try:
        client = StreamingClient([stall, good], StreamConfig(max_inflight_per_server=1, request_timeout_s=1.5,
                                                             retries=2))
        t0 = time.monotonic()
        res = client.run(_prompts(6), SP)
        assert all(g is not None and g.url == good for g in res.groups)
        assert res.retries >= 1
        assert time.monotonic() - t0 < 30
        # Alone, the stalling server exhausts the retries: the error names it and the timeout.
        alone = StreamingClient([stall], StreamConfig(max_inflight_per_server=1, request_timeout_s=1.0, retries=1))
        t0 = time.monotonic()
        with pytest.raises(RolloutError, match=stall) as err:
            alone.run(_prompts(1), SP)
        assert "request_timeout_s=1" in str(err.value)
        assert time.monotonic() - t0 < 10
    finally:
        stop_servers([ps, pg], grace_s=2)


@pytest.mark.parametrize("bad", [0, -3])
def test_max_inflight_per_server_must_be_positive(bad):
    with pytest.raises(ValueError, match=r"rollout.max_inflight_per_server: expected an integer >= 1"):
        StreamConfig(max_inflight_per_server=bad)
    with pytest.raises(ValueError, match="rollout.max_inflight_per_server"):
        SGLangEngine(["http://127.0.0.1:9"], max_inflight_per_server=bad)
    from megafork.train.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"rollout.max_inflight_per_server: expected > 0"):
        load_config(None, [f"rollout.max_inflight_per_server={bad}"])


def test_fast_decode_equals_json_decode_and_falls_back_on_texts():
    import json

    from megafork.rollout.stream import decode_reply, parse_group

    rng = np.random.default_rng(0)
    items = []
    for length in (5, 0, 3):
        lps = [[float(lp), int(t), None] for lp, t in zip(-rng.exponential(size=length), rng.integers(0, 9999, length))]
        items.append({"text": "x", "output_ids": [t for _, t, _ in lps],
                      "meta_info": {"finish_reason": {"type": "stop"}, "output_token_logprobs": lps, "weight_version": "4"}})
    items[0]["meta_info"]["output_token_logprobs"][1][0] = -1e-05  # exponent notation
    raw = json.dumps(items).encode()
    fast, ref = decode_reply(raw, 3, 7, "http://s"), parse_group(json.loads(raw), 3, 7, "http://s")
    assert fast.offsets.tolist() == ref.offsets.tolist() == [0, 5, 5, 8]
    assert np.array_equal(fast.ids, ref.ids) and np.array_equal(fast.logprobs, ref.logprobs)
    assert fast.logprobs[1] == np.float32(-1e-05) and fast.weight_version == "4"
    items[2]["meta_info"]["output_token_logprobs"][0][2] = "tok"  # token texts: the general path
    assert np.array_equal(decode_reply(json.dumps(items).encode(), 3, 7, "http://s").ids, ref.ids)
    items[2]["output_ids"][0] += 1
    with pytest.raises(RolloutError, match=r"http://s/generate \(prompt 7\): output 2: output_token_logprobs do not"):
        decode_reply(json.dumps(items).encode(), 3, 7, "http://s")


def test_early_stop_aborts_the_open_requests_and_the_server_stops_generating_them():
    from megafork.rollout.httpjson import request_json

    url, proc = _serve("--stall-token", "999", "--stall-s", "60")
    try:
        # Prompts 0-3 answer at once; prompts 4-7 stall until aborted.
        prompts = [[1, 2, 3]] * 4 + [[999, 2, 3]] * 4
        client = StreamingClient([url], StreamConfig(max_inflight_per_server=8, request_timeout_s=120))
        done = []

        def enough(group):
            done.append(group.prompt_index)
            return len(done) == 3

        t0 = time.monotonic()
        res = client.run(prompts, SP, on_group=enough)
        assert time.monotonic() - t0 < 30  # nobody waited for the stalled requests
        assert res.stopped_early and res.aborted_requests >= 4
        assert sorted(done) == sorted(set(done)) and set(done) <= {0, 1, 2, 3}
        assert all(res.groups[i] is None for i in range(4, 8))
        info = request_json(url, "/server_info", timeout_s=10)[1]
        assert info["internal_states"][0]["num_running_reqs"] == 0  # the server stopped generating them
    finally:
        stop_servers([proc], grace_s=2)
