"""`megafork._C.parse_generate_reply` (the streaming client's reply parser) against its json twin.

    .venv/bin/python -m pytest tests/test_rollout_reply.py -q

Replies are made the way SGLang's servers write them (Python `json.dumps` with spaces, and the
compact `orjson` layout without), with float32 log-probs printed as doubles, exponents, -0.0,
empty responses and the largest int32 ids; the fast path must give bit-identical arrays to
`json.loads` + numpy, fall back to it on anything else, and the receive buffers must be reused.
"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from megafork import _C
from megafork.rollout.reply import ReplyBuffers, decode_reply, parse_group
from megafork.rollout.types import RolloutError


def _items(lengths, seed=0, vocab=151936):
    rng = np.random.default_rng(seed)
    items = []
    for k, length in enumerate(lengths):
        ids = rng.integers(0, vocab, length).tolist()
        lps = (-rng.exponential(2.0, length).astype(np.float32)).tolist()
        items.append({"text": "héllo \"output_ids\": [9]", "output_ids": ids, "meta_info": {
            "id": f"r{k}", "finish_reason": {"type": "length"} if k % 2 else {"type": "stop", "matched": 2},
            "prompt_tokens": 3, "completion_tokens": length, "weight_version": "7",
            "input_token_logprobs": [[None, 1, None], [-0.5, 2, None]],
            "output_token_logprobs": [[lp, t, None] for lp, t in zip(lps, ids)]}})
    return items


def _layouts(payload):
    return [json.dumps(payload).encode(), json.dumps(payload, separators=(",", ":")).encode()]


def _same(a, b):
    assert a.ids.dtype == np.int32 and a.logprobs.dtype == np.float32 and a.offsets.dtype == np.int64
    assert np.array_equal(a.ids, b.ids) and np.array_equal(a.logprobs.view(np.uint32), b.logprobs.view(np.uint32))
    assert a.offsets.tolist() == b.offsets.tolist()
    assert (a.finish_reasons, a.weight_version, a.prompt_index, a.url) == \
        (b.finish_reasons, b.weight_version, b.prompt_index, b.url)


@pytest.mark.parametrize("lengths", [[40, 0, 7, 1], [2000] * 3, [0, 0]])
def test_fast_path_is_bit_identical_to_json(lengths, monkeypatch):
    import megafork.rollout.reply as reply

    monkeypatch.setattr(reply, "_decode_json", None)  # these replies must not need the fallback
    items = _items(lengths)
    special = [-0.0, -1e-05, -1.1920928955078125e-07, -23.5, -3.4028234663852886e38, 0.0]
    for j, v in enumerate(special):
        if lengths[0] > j:
            items[0]["meta_info"]["output_token_logprobs"][j][0] = v
    if lengths[0]:
        items[0]["output_ids"][0] = items[0]["meta_info"]["output_token_logprobs"][0][1] = 2**31 - 1
    for raw in _layouts(items):
        ids, lps, offsets, spans = _C.parse_generate_reply(raw, len(lengths))
        assert spans.shape == (2 * len(lengths), 2)
        assert all(raw[b:b + 1] == b"[" and raw[e - 1:e] == b"]" for b, e in spans.tolist())
        fast, ref = decode_reply(raw, len(lengths), 5, "http://s"), parse_group(json.loads(raw), len(lengths), 5, "http://s")
        _same(fast, ref)
        assert fast.offsets.tolist() == np.concatenate([[0], np.cumsum(lengths)]).tolist()
        assert fast.finish_reasons == ["stop" if k % 2 == 0 else "length" for k in range(len(lengths))]


def test_a_single_item_reply_and_a_memoryview_of_a_larger_buffer(monkeypatch):
    import megafork.rollout.reply as reply

    monkeypatch.setattr(reply, "_decode_json", None)
    (item,) = _items([30], seed=3)
    raw = json.dumps(item).encode()
    buf = np.zeros(len(raw) + 100, dtype=np.uint8)
    buf[:len(raw)] = np.frombuffer(raw, np.uint8)
    buf[len(raw):] = ord("x")  # bytes past the reply must not be read
    fast = decode_reply(memoryview(buf)[:len(raw)], 1, 0, "http://s")
    _same(fast, parse_group(item, 1, 0, "http://s"))


@pytest.mark.parametrize("change", ["text", "pretty", "inf", "null_logprob"])
def test_anything_else_falls_back_to_json(change):
    items = _items([6, 4], seed=1)
    lp = items[1]["meta_info"]["output_token_logprobs"]
    if change == "text":
        lp[2][2] = "tok"
    if change == "inf":
        lp[0][0] = float("-inf")  # Python's json writes -Infinity
    if change == "null_logprob":
        lp[1][0] = None
    raw = json.dumps(items, indent=2 if change == "pretty" else None).encode()
    if change != "inf":
        with pytest.raises(ValueError):
            _C.parse_generate_reply(raw, 2)
    fast = decode_reply(raw, 2, 2, "http://s")
    _same(fast, parse_group(json.loads(raw), 2, 2, "http://s"))
    if change == "null_logprob":  # numpy reads None as NaN
        assert np.isnan(fast.logprobs[6 + 1]) and np.isfinite(np.delete(fast.logprobs, 7)).all()


@pytest.mark.parametrize("bad, message", [
    ("id_mismatch", "output 0: output_token_logprobs do not match output_ids"),
    ("short", "output 1: 3 output_token_logprobs for 4 output_ids"),
    ("count", "expected 2 outputs, got 1"),
    ("no_ids", r"output 0: KeyError 'output_ids'"),
    ("reason", "finish_reason 'eos': expected stop, length or abort"),
    ("not_json", "reply is not JSON"),
])
def test_malformed_replies_name_the_server_and_the_problem(bad, message):
    items = _items([5, 4], seed=2)
    if bad == "id_mismatch":
        items[0]["output_ids"][3] += 1
    if bad == "short":
        items[1]["meta_info"]["output_token_logprobs"].pop()
    if bad == "count":
        items = items[:1]
    if bad == "no_ids":
        del items[0]["output_ids"]
    if bad == "reason":
        items[1]["meta_info"]["finish_reason"]["type"] = "eos"
    raw = b"{oops" if bad == "not_json" else json.dumps(items).encode()
    with pytest.raises(RolloutError, match=r"http://s/generate \(prompt 9\): " + message):
        decode_reply(raw, 2, 9, "http://s")


def test_receive_buffers_are_reused_and_grow_to_the_largest_reply():
    replies = [json.dumps(_items([k], seed=k)).encode() for k in (50, 10, 300, 20)]

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            data = replies[int(self.path.strip("/"))]
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    import http.client

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        buffers = ReplyBuffers()
        seen = []
        for i in range(4):
            conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
            conn.request("GET", f"/{i}")
            resp = conn.getresponse()
            with buffers.body(resp) as raw:
                assert bytes(raw) == replies[i]
                _same(decode_reply(raw, 1, i, "u"), parse_group(json.loads(replies[i]), 1, i, "u"))
                seen.append(raw.obj)
            conn.close()
        assert seen[0] is seen[1] and seen[2] is seen[3] and seen[1] is not seen[2]  # reused; replaced when too small
        assert len(buffers._free) == 1
        # Eight requests at once, two received at a time: two buffers, never more than two replies held.
        buffers, lock, held, most, errors = ReplyBuffers(max_receiving=2), threading.Lock(), [0], [0], []

        def fetch(i):
            try:
                conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
                conn.request("GET", f"/{i % 4}")
                resp = conn.getresponse()
                with buffers.body(resp) as raw:
                    with lock:
                        held[0] += 1
                        most[0] = max(most[0], held[0])
                    threading.Event().wait(0.05)
                    assert bytes(raw) == replies[i % 4]
                    with lock:
                        held[0] -= 1
                conn.close()
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=fetch, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors and most[0] == 2 and len(buffers._free) == 2
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("seed", [None, 4])
def test_the_prebuilt_synthetic_server_answers_in_sglang_shape(seed):
    """The benchmark's server: every group complete, ids matching their triples (checked by the parser)."""
    import sys

    from megafork.rollout import SamplingParams, launch_servers, stop_servers
    from megafork.rollout.httpjson import request_json
    from megafork.rollout.stream import StreamConfig, StreamingClient
    from megafork.testing.multirank import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    (proc,) = launch_servers([[sys.executable, "-m", "megafork.testing.synthetic_serve", "--prebuilt", "--port",
                               str(port), "--response-len", "30", "--vocab-size", "500"]], [url], timeout_s=60)
    try:
        sp = SamplingParams(n=3, max_new_tokens=20, seed=seed)
        res = StreamingClient([url], StreamConfig(max_inflight_per_server=2, request_timeout_s=30)).run(
            [[1, 2], [3], [4, 5, 6]], sp)
        for i, g in enumerate(res.groups):
            assert g.prompt_index == i and g.offsets.tolist() == [0, 20, 40, 60] and g.finish_reasons == ["length"] * 3
            assert ((0 <= g.ids) & (g.ids < 500)).all() and (g.logprobs <= 0).all()
        assert not np.array_equal(res.groups[0].ids[:20], res.groups[0].ids[20:40])  # distinct samples
        status, single = request_json(url, "/generate", {"input_ids": [7, 8], "sampling_params": {"max_new_tokens": 9}})
        assert status == 200 and isinstance(single, dict) and len(single["output_ids"]) == 9
        assert [t[1] for t in single["meta_info"]["output_token_logprobs"]] == single["output_ids"]
    finally:
        stop_servers([proc], grace_s=2)
