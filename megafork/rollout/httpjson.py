"""JSON over HTTP with timeouts and bounded retries (stdlib only), for talking to SGLang servers.

    status, body = request_json("http://127.0.0.1:30000", "/generate", {"input_ids": [1, 2]}, timeout_s=60)

Connection failures and 5xx answers are retried `retries` times with a short backoff; 4xx and 501
answers are returned at once (they will not get better). When every attempt fails, `RolloutError` names
the URL, the endpoint, the attempts and the last cause, so a dead server is never a silent hang.
"""
from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request

from megafork.rollout.types import RolloutError


def request_json(base_url: str, path: str, body: object = None, timeout_s: float = 60.0, retries: int = 0,
                 backoff_s: float = 0.5, method: str | None = None) -> tuple[int, object]:
    """Send one request (POST when `body` is given, else GET) and decode the JSON answer.

    Args:
        base_url: e.g. "http://127.0.0.1:30000".
        path: endpoint, e.g. "/generate".
        body: JSON-serialisable request body, or None.
        timeout_s: socket timeout per attempt (connect and each read).
        retries: extra attempts after a connection failure, timeout or 5xx.
        backoff_s: sleep before the first retry; doubles each time.
        method: override the HTTP method.

    Returns:
        (HTTP status, decoded JSON or text, None when empty) for any status below 500, and 501.

    Raises:
        RolloutError: every attempt failed to reach the server or got a 5xx.
    """
    url = base_url.rstrip("/") + path
    data = None if body is None else json.dumps(body).encode()
    method = method or ("GET" if body is None else "POST")
    last = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff_s * 2 ** (attempt - 1))
        req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                return resp.status, _decode(resp.read(), resp.headers.get("Content-Type", ""))
        except urllib.error.HTTPError as exc:
            payload = _decode(exc.read(), exc.headers.get("Content-Type", "") if exc.headers else "")
            if exc.code < 500 or exc.code == 501:  # 501 Not Implemented will not get better either
                return exc.code, payload
            last = f"HTTP {exc.code}: {payload!r:.500}"
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            last = f"{type(reason).__name__}: {reason}"
    raise RolloutError(f"{url}: no answer after {retries + 1} attempt(s) (timeout {timeout_s:g}s each); "
                       f"last error {last}")


def _decode(raw: bytes, content_type: str) -> object:
    if not raw:
        return None
    if "json" in content_type:
        return json.loads(raw)
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw.decode(errors="replace")


def succeeded(status: int, payload: object) -> bool:
    """Whether an answer is a success: no HTTP error and no SGLang `success: false`."""
    return status < 400 and not (isinstance(payload, dict) and payload.get("success") is False)


def check_ok(url: str, path: str, status: int, payload: object) -> object:
    """Raise `RolloutError` naming the URL unless the answer is a success (SGLang's `success` flag too)."""
    if not succeeded(status, payload):
        msg = payload.get("message") or payload.get("error") if isinstance(payload, dict) else payload
        raise RolloutError(f"{url.rstrip('/')}{path}: HTTP {status}: {msg}")
    return payload


def get_info(url: str, kind: str, timeout_s: float = 60.0) -> dict:
    """SGLang's `/server_info` or `/model_info` (`kind`), falling back to the pre-0.5 names
    `/get_server_info` / `/get_model_info` on a 404 (older SGLang, older megafork serve).

    Args:
        url: server base URL.
        kind: "server_info" or "model_info".
        timeout_s: per request.
    """
    status, payload = request_json(url, f"/{kind}", timeout_s=timeout_s)
    path = f"/{kind}"
    if status == 404:
        path = f"/get_{kind}"
        status, payload = request_json(url, path, timeout_s=timeout_s)
    check_ok(url, path, status, payload)
    if not isinstance(payload, dict):
        raise RolloutError(f"{url.rstrip('/')}{path}: expected a JSON object, found {payload!r:.200}")
    return payload
