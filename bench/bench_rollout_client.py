"""Rollout client: the old one-request-per-server path against the streaming client, plus failover.

    python -m bench rollout_client                   # 250 prompts x 16 samples x 2,000 tokens (8M tokens)
    python -m bench.bench_rollout_client --quick     # 1/8 of that

SYNTHETIC servers: `python -m megafork.testing.synthetic_serve --prebuilt` on loopback. They
answer `/generate` with prebuilt bytes in SGLang's reply shape (random tokens, encoded before
timing, written with one `sendall`), so the table measures what the *client* ingests; the
servers' own CPU time is measured separately (from /proc/PID/stat) and shown in its own column.
Each client mode runs in a fresh subprocess, with one small untimed warm-up step first:

- `single request (old)`: the pre-streaming `SGLangEngine.generate`: one `/generate` per server
  carrying its whole contiguous slice of the prompts, `json.loads` of the reply, Python lists of
  ids and float log-probs per sample;
- `streaming`: `StreamingClient`, one request per prompt group (8 in flight per server), each
  reply read into a reused buffer and parsed by `megafork._C` into int32/float32 arrays;
- `streaming + trajectories`: the same, then every group turned into the trainer's
  `Trajectory`s by `train/rollout_phase.py`'s own code (tensors are views of the group arrays).

Columns: tokens/s over wall time and tokens per client CPU-second (medians of 3 runs), the
servers' CPU-seconds per million tokens served, and the peak RSS growth per stored token:
before each run `/proc/self/clear_refs` resets VmHWM to the current RSS and VmRSS is read as the
baseline; after the run, with its results still alive, (VmHWM - baseline) / tokens stored (the
largest of the 3 runs). Targets: >= 1M tokens/s, <= 16 B/token.

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

N, LEN, PROMPTS, SERVERS, INFLIGHT, REPEATS = 16, 2000, 250, 2, 8, 3


def _proc_status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process (its threads included), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


def _trajectories(result, sampling):
    """What `collect_rollouts` keeps of a round: every group as `Trajectory`s (rollout_phase's code)."""
    from types import SimpleNamespace

    import torch

    from megafork.train.rollout_phase import _Group

    out = []
    for i, g in enumerate(result.groups):
        n = len(g.finish_reasons)
        shaped = torch.tensor([1.0, -1.0] * (n // 2) + [1.0] * (n % 2))
        group = _Group(i, SimpleNamespace(prompt_ids=[1, 2, 3, 4]), g.samples(), shaped, (shaped > 0).float(),
                       torch.from_numpy(g.offsets[1:] - g.offsets[:-1]), True, False, 0, 1e-6)
        out += group.trajectories(i)
    return out


def _client(mode: str, urls: list[str], prompts: int, repeats: int) -> dict:
    """Run in a fresh process: ingest `prompts` x N x LEN tokens `repeats` times; report rates and peak RSS."""
    from megafork.rollout import SamplingParams
    from megafork.rollout.stream import StreamConfig, StreamingClient

    sampling = SamplingParams(n=N, max_new_tokens=LEN, seed=1)

    def step(count: int):
        ps = [[1, 2, 3, 4 + i % 100] for i in range(count)]
        if mode == "old":
            out = _old_generate(urls, ps, sampling)
            return out, sum(len(s.response_ids) for s in out)
        res = StreamingClient(urls, StreamConfig(max_inflight_per_server=INFLIGHT, request_timeout_s=600)).run(ps, sampling)
        if mode == "trajectories":
            return (res, _trajectories(res, sampling)), res.tokens
        return res, res.tokens

    _, served = step(SERVERS)  # warm-up: imports, thread start-up, first-use allocations
    walls, cpus, per_token = [], [], []
    for _ in range(repeats):
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = _proc_status("VmRSS")
        t0, c0 = time.perf_counter(), time.process_time()
        out, tokens = step(prompts)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        per_token.append((_proc_status("VmHWM") - base) / tokens)  # `out` is still alive here
        served += tokens
        del out
    return {"tokens": tokens, "served": served, "tok_s": tokens / statistics.median(walls),
            "tok_cpu_s": tokens / statistics.median(cpus), "bytes_per_token": max(per_token)}


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
    load_before = os.getloadavg()[0]
    urls, procs = _servers(SERVERS, "--prebuilt", "--response-len", str(LEN))
    rows = {}
    try:
        # Build every reply shape before timing: the old path's per-server batches, and one group.
        sp = SamplingParams(n=N, max_new_tokens=LEN).to_sglang()
        for url in urls:
            for shape in {prompts // SERVERS, -(-prompts // SERVERS), 1}:
                request_json(url, "/generate", {"input_ids": [[1, 2]] * shape, "sampling_params": sp}, timeout_s=600)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        for mode in ("old", "stream", "trajectories"):
            cpu0 = sum(_cpu_seconds(p.pid) for p in procs)
            out = subprocess.run([sys.executable, "-m", "bench.bench_rollout_client", "--client", mode, ",".join(urls),
                                  str(prompts), str(REPEATS)], capture_output=True, text=True, env=env)
            if out.returncode:
                raise RuntimeError(f"bench client {mode} failed:\n{out.stderr[-3000:]}")
            rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
            rows[mode]["server_cpu_per_m"] = (sum(_cpu_seconds(p.pid) for p in procs) - cpu0) / rows[mode]["served"] * 1e6
    finally:
        stop_servers(procs, grace_s=2)
    old, new, traj = rows["old"], rows["stream"], rows["trajectories"]

    def row(name, r):
        return [name, r["tok_s"], r["tok_cpu_s"], r["server_cpu_per_m"], r["bytes_per_token"]]

    print_table(
        f"Rollout client ingestion: {prompts} prompts x {N} samples x {LEN} tokens = {new['tokens']:,} tokens, "
        f"{SERVERS} SYNTHETIC prebuilt servers on loopback, {INFLIGHT} requests in flight per server "
        f"({os.cpu_count()} CPUs, load avg {load_before:.1f} before, {os.getloadavg()[0]:.1f} after)",
        ["client", "tokens/s (wall)", "tokens per client CPU-s", "server CPU-s per 1M tokens", "peak RSS B/token"],
        [row("single request (old)", old), row("streaming", new), row("streaming + trajectories", traj),
         ["streaming / old", new["tok_s"] / old["tok_s"], new["tok_cpu_s"] / old["tok_cpu_s"],
          new["server_cpu_per_m"] / old["server_cpu_per_m"], new["bytes_per_token"] / old["bytes_per_token"]]],
        note="Targets: >= 1,000,000 tokens/s ingested; <= 16 B per stored token. Rates: medians of "
             f"{REPEATS} runs, each in a fresh client process after a warm-up step. Peak RSS: VmHWM reset by "
             "/proc/self/clear_refs before the run, minus VmRSS then, with the run's results alive, / tokens "
             f"stored (largest of the {REPEATS} runs).")
    fo = _failover()
    print_table("Failover: 2 servers, one SIGKILLed after 1/4 of the groups",
                ["groups present", "servers dropped", "step seconds"],
                [[f"{fo['groups']} / {fo['prompts']}", ", ".join(fo["dropped"]) or "none", fo["seconds"]]],
                note="complete" if fo["groups"] == fo["prompts"] and fo["dropped"] == [fo["killed"]] else "INCOMPLETE")


if __name__ == "__main__":
    main()
