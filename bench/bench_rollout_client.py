"""Rollout client: the old one-request-per-server path against the streaming client, plus failover.

    python -m bench rollout_client             # 250 prompts x 16 samples x 2,000 tokens (8M tokens)
    python -m bench.bench_rollout_client --quick     # 1/8 of that

SYNTHETIC servers: `python -m megafork.testing.synthetic_serve --prebuilt` on loopback, which
answers `/generate` with random tokens from a per-shape reply cache (encoded before timing), so
the table measures what the *client* ingests. Each client mode runs in a fresh subprocess:

- `single request (old)`: the pre-streaming `SGLangEngine.generate`: one `/generate` per server
  carrying its whole contiguous slice of the prompts, `json.loads` of the reply, Python lists of
  ids and float log-probs per sample;
- `streaming`: `StreamingClient`, one request per prompt group (8 in flight per server), each
  reply parsed into int32/float32 arrays.

Columns: tokens/s over wall time (median of 3 runs), tokens per client CPU-second (the same
work without the other processes on the machine), and peak RSS growth per stored token (VmHWM
after the run, reset before it, minus the RSS before it; results kept alive). Targets: >= 1M
tokens/s, <= 16 B/token.

Failover: 2 servers (`megafork serve`'s own HTTP server over the random-token engine, 0.05 s per
request), 64 prompts x 16 x 200 tokens; one server is SIGKILLed after a quarter of the groups.
The step must complete with every group.
"""
from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time

from bench.common import print_table

N, LEN, PROMPTS, SERVERS = 16, 2000, 250, 2


def _proc_status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _old_generate(urls, prompts, sampling):
    """The pre-streaming client, as it was: one request per server, Python lists."""
    from concurrent.futures import ThreadPoolExecutor

    from megafork.rollout.httpjson import check_ok, request_json
    from megafork.rollout.types import Sample

    def post(url, chunk, offset):
        body = {"input_ids": chunk, "sampling_params": sampling.to_sglang(), "return_logprob": True}
        status, out = request_json(url, "/generate", body, timeout_s=3600)
        check_ok(url, "/generate", status, out)
        samples = []
        for j, item in enumerate(out):
            lps = item["meta_info"]["output_token_logprobs"]
            ids = list(item["output_ids"])
            if [int(t) for _, t, *_ in lps] != ids:
                raise RuntimeError("ids mismatch")
            samples.append(Sample(prompt_index=offset + j // sampling.n, response_ids=ids,
                                  logprobs=[float(lp) for lp, *_ in lps], finish_reason=item["meta_info"]["finish_reason"]["type"]))
        return samples

    k = len(urls)
    bounds = [round(i * len(prompts) / k) for i in range(k + 1)]
    with ThreadPoolExecutor(k) as pool:
        futs = [pool.submit(post, urls[i], prompts[bounds[i]:bounds[i + 1]], bounds[i]) for i in range(k)]
        return [s for f in futs for s in f.result()]


def _client(mode: str, urls: list[str], prompts: int, repeats: int) -> dict:
    """Run in a fresh process: ingest `prompts` x N x LEN tokens `repeats` times; report rates and peak RSS."""
    from megafork.rollout import SamplingParams
    from megafork.rollout.stream import StreamConfig, StreamingClient

    sampling = SamplingParams(n=N, max_new_tokens=LEN, seed=1)
    ps = [[1, 2, 3, 4 + i % 100] for i in range(prompts)]
    walls, cpus, per_token = [], [], []
    for _ in range(repeats):
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = _proc_status("VmRSS")
        t0, c0 = time.perf_counter(), time.process_time()
        if mode == "old":
            out = _old_generate(urls, ps, sampling)
            tokens = sum(len(s.response_ids) for s in out)
        else:
            out = StreamingClient(urls, StreamConfig(max_inflight_per_server=8, request_timeout_s=600)).run(ps, sampling)
            tokens = out.tokens
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        gc.collect()
        per_token.append((_proc_status("VmHWM") - base) / tokens)
        del out
    return {"tokens": tokens, "tok_s": tokens / statistics.median(walls), "tok_cpu_s": tokens / statistics.median(cpus),
            "bytes_per_token": max(per_token)}


def _servers(n: int, *args: str):
    from megafork.rollout import launch_servers
    from megafork.testing.multirank import free_port

    ports = [free_port() for _ in range(n)]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    cmds = [[sys.executable, "-m", "megafork.testing.synthetic_serve", "--port", str(p), "--seed", str(i), *args]
            for i, p in enumerate(ports)]
    return urls, launch_servers(cmds, urls, timeout_s=120)


def _failover() -> dict:
    from megafork.rollout import SamplingParams, stop_servers
    from megafork.rollout.stream import StreamConfig, StreamingClient

    urls, procs = _servers(2, "--response-len", "200", "--delay-s", "0.05")
    prompts = 64
    try:
        seen = []

        def kill_second(group):
            seen.append(group.prompt_index)
            if len(seen) == prompts // 4:
                procs[1].kill()
            return False

        res = StreamingClient(urls, StreamConfig(max_inflight_per_server=4, request_timeout_s=60)).run(
            [[1, 2, 3 + i] for i in range(prompts)], SamplingParams(n=N, max_new_tokens=200, seed=2), kill_second)
    finally:
        stop_servers(procs, grace_s=2)
    return {"groups": sum(g is not None for g in res.groups), "prompts": prompts, "dropped": res.dropped_servers,
            "seconds": res.seconds, "killed": urls[1]}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--client":
        print(json.dumps(_client(argv[1], argv[2].split(","), int(argv[3]), int(argv[4]))))
        return
    from megafork.rollout import SamplingParams, stop_servers
    from megafork.rollout.httpjson import request_json

    prompts = PROMPTS // 8 if "--quick" in argv else PROMPTS
    urls, procs = _servers(SERVERS, "--prebuilt", "--response-len", str(LEN))
    rows = {}
    try:
        # Encode both reply shapes before timing: the old path's per-server batch, and one group.
        sp = SamplingParams(n=N, max_new_tokens=LEN).to_sglang()
        per_server = -(-prompts // SERVERS)
        for url in urls:
            for shape in ({prompts // SERVERS, per_server}):
                request_json(url, "/generate", {"input_ids": [[1, 2]] * shape, "sampling_params": sp}, timeout_s=600)
            request_json(url, "/generate", {"input_ids": [1, 2], "sampling_params": sp}, timeout_s=600)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        for mode in ("old", "stream"):
            out = subprocess.run([sys.executable, "-m", "bench.bench_rollout_client", "--client", mode, ",".join(urls),
                                  str(prompts), "3"], capture_output=True, text=True, env=env, check=True)
            rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        stop_servers(procs, grace_s=2)
    old, new = rows["old"], rows["stream"]
    print_table(
        f"Rollout client ingestion: {prompts} prompts x {N} samples x {LEN} tokens = {new['tokens']:,} tokens, "
        f"{SERVERS} SYNTHETIC prebuilt servers on loopback ({os.cpu_count()} CPUs, load avg "
        f"{os.getloadavg()[0]:.0f})",
        ["client", "tokens/s (wall)", "tokens per client CPU-s", "peak RSS B/token"],
        [["single request (old)", old["tok_s"], old["tok_cpu_s"], old["bytes_per_token"]],
         ["streaming", new["tok_s"], new["tok_cpu_s"], new["bytes_per_token"]],
         ["streaming / old", new["tok_s"] / old["tok_s"], new["tok_cpu_s"] / old["tok_cpu_s"],
          new["bytes_per_token"] / old["bytes_per_token"]]],
        note="Targets: >= 1,000,000 tokens/s ingested; <= 16 B per stored token.")
    fo = _failover()
    print_table("Failover: 2 servers, one SIGKILLed after 1/4 of the groups",
                ["groups present", "servers dropped", "step seconds"],
                [[f"{fo['groups']} / {fo['prompts']}", ", ".join(fo["dropped"]) or "none", fo["seconds"]]],
                note="complete" if fo["groups"] == fo["prompts"] and fo["dropped"] == [fo["killed"]] else "INCOMPLETE")


if __name__ == "__main__":
    main()
