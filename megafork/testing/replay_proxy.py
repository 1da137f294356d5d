"""An HTTP proxy in front of a rollout server that records `/generate` answers and can replay them.

    proxy = ReplayProxy("http://127.0.0.1:30000").start()     # proxy.url -> give it to the trainer
    ...                                                      # straight run: every answer recorded
    proxy.replay = True                                      # resumed run: the same request body gets
    ...                                                      # the recorded answer (proxy.hits counts them)
    proxy.stop()

A test double for "the same server outputs": with `rollout_ahead: 1` the straight run generates
step k+1 with the weights of step k-1, which a resumed run no longer has. Replaying the recorded
answer to an identical request isolates what the resume must get right (the same prompts, seeds
and sampling parameters, regenerated from the checkpointed sampler state). Every other endpoint
(weight updates, health, checksums) is forwarded to the real server unchanged.
"""
from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ReplayProxy:
    """Forwarding proxy with a `/generate` record (see module docstring).

    Args:
        upstream: base URL of the real server.
        host: address to listen on (port chosen by the OS).
    """

    def __init__(self, upstream: str, host: str = "127.0.0.1"):
        self.upstream = upstream.rstrip("/")
        self.replay = False
        self.records: dict[str, bytes] = {}
        self.hits = 0
        self.requests: list[str] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, fmt, *args):
                pass

            def do_GET(self):
                self._relay("GET", None)

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                self._relay("POST", self.rfile.read(n))

            def _relay(self, method, body):
                key = None
                if self.path == "/generate" and body is not None:
                    # The request id ("rid") is unique per run by design; the rest defines the request.
                    key = json.dumps({k: v for k, v in json.loads(body).items() if k != "rid"}, sort_keys=True)
                    with proxy._lock:
                        proxy.requests.append(key)
                        cached = proxy.records.get(key) if proxy.replay else None
                        if cached is not None:
                            proxy.hits += 1
                    if cached is not None:
                        return self._reply(200, cached)
                req = urllib.request.Request(proxy.upstream + self.path, data=body, method=method,
                                             headers={"Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(req, timeout=600) as resp:
                        status, raw = resp.status, resp.read()
                except urllib.error.HTTPError as e:
                    status, raw = e.code, e.read()
                if key is not None and status == 200:
                    with proxy._lock:
                        proxy.records.setdefault(key, raw)
                self._reply(status, raw)

            def _reply(self, status, raw):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        self._server = ThreadingHTTPServer((host, 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://{host}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> ReplayProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
