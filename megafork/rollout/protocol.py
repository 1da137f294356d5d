"""SGLang's HTTP request bodies, parsed and validated (sglang 0.5.23 `srt/managers/io_struct.py`).

The field lists come from SGLang's own request classes (`sglang_fields.py`, generated from the
wheel; `make sglang-contract` checks it). Every field of a request class is accepted at its
default value, so clients that send SGLang's full default body work. A field megafork serve
implements is parsed; a field it does not implement is a 400 saying the option is unsupported
when it carries any other value, never silently ignored; a name SGLang does not know is a 400
"unknown field" (SGLang itself ignores unknown keys; refusing them catches typos).

Every parser raises `BadRequest` naming the field, what was expected and what was found; the
server turns it into HTTP 400.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megafork.rollout.buckets import dtype_from_name
from megafork.rollout.sglang_fields import REQUESTS, REQUIRED, SAMPLING_PARAMS
from megafork.rollout.types import SamplingParams

DEFAULT_GROUP = "weight_update_group"
#: SGLang 0.5.23's answer (HTTP 400, success false) to destroying a weight-update group that does not
#: exist (`model_runner_components/weight_updater.py::destroy_weights_update_group`).
GROUP_ABSENT = "The group to be destroyed does not exist."


class BadRequest(ValueError):
    """A malformed request; the message names the field."""


# --------------------------------------------------------------------------- field checks

def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def want(cond: bool, field: str, expected: str, found) -> None:
    """Raise `BadRequest` naming `field` unless `cond`."""
    if not cond:
        raise BadRequest(f"{field}: expected {expected}, found {found!r:.200}")


def at_default(value, spec: dict) -> bool:
    """Whether `value` means the same as leaving the field out (SGLang's default, or null /
    an empty container where the default is null)."""
    default = spec["default"]
    if value is None:
        return spec["nullable"] or default is None
    if default is None and value in ({}, []):
        return True
    return default != REQUIRED and type(value) in (type(default), int, float) and value == default


def check_fields(body: dict, fields: dict[str, dict], implemented: set[str], where: str,
                 extensions: frozenset[str] = frozenset()) -> None:
    """Refuse unknown fields and non-default values of fields megafork serve does not implement.

    Args:
        body: the JSON object.
        fields: SGLang's fields of this request (from `sglang_fields`).
        implemented: fields whose values the caller parses (any value).
        where: prefix for error messages, e.g. "sampling_params.".
        extensions: megafork fields that SGLang does not have.
    """
    for key, value in body.items():
        if key in implemented or key in extensions:
            continue
        spec = fields.get(key)
        if spec is None:
            raise BadRequest(f"{where}{key}: unknown field")
        if not at_default(value, spec):
            raise BadRequest(f"{where}{key}: this SGLang option is not supported by megafork serve "
                             f"(only its default {spec['default']!r} is accepted), found {value!r:.200}")
    for key, spec in fields.items():
        if spec["default"] == REQUIRED and key not in body:
            raise BadRequest(f"{where}{key}: required field is missing")


def _body(body, endpoint: str) -> dict:
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise BadRequest(f"{endpoint}: expected a JSON object body, found {type(body).__name__}")
    return body


def parse_request(cls_name: str, body, endpoint: str, implemented: set[str] | None = None,
                  extensions: frozenset[str] = frozenset()) -> dict:
    """Check a control request against SGLang's class `cls_name`; returns the body as a dict.

    Args:
        cls_name: the io_struct class, e.g. "UpdateWeightVersionReqInput".
        body: the decoded JSON body (None for an empty one).
        endpoint: for error messages.
        implemented: fields the caller handles; default: every field of the class.
        extensions: megafork-only fields accepted as well.
    """
    body = _body(body, endpoint)
    fields = REQUESTS[cls_name]
    check_fields(body, fields, set(fields) if implemented is None else implemented, "", extensions)
    return body


#: Fields with no observable effect on a single server without a prefix cache or router
#: (logging, metrics labels, routing, cache namespaces, scheduling priority): any value is served.
INERT = {"rid", "http_worker_ipc", "log_metrics", "no_logs", "custom_labels", "priority", "routing_key",
         "conversation_id", "extra_key", "cache_salt", "routed_dp_rank", "data_parallel_rank", "received_time",
         "external_trace_header", "flush_cache", "torch_empty_cache"}

# --------------------------------------------------------------------------- /generate

SAMPLING_KEYS = {"n", "temperature", "top_p", "top_k", "max_new_tokens", "stop_token_ids", "ignore_eos",
                 "sampling_seed"}
# Options that only shape the returned text, which megafork decodes without stop strings.
SAMPLING_TEXT_ONLY = {"skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim", "stream_interval"}
GENERATE_KEYS = {"text", "input_ids", "sampling_params", "return_logprob", "logprob_start_len",
                 "return_text_in_logprobs", "stream", "top_logprobs_num"} | INERT


def parse_sampling_params(raw, where: str = "sampling_params") -> SamplingParams:
    """SGLang `sampling_params` JSON -> `SamplingParams` (`sampling_seed` becomes `seed`)."""
    raw = {} if raw is None else raw
    want(isinstance(raw, dict), where, "a JSON object", raw)
    check_fields(raw, SAMPLING_PARAMS, SAMPLING_KEYS | SAMPLING_TEXT_ONLY, where + ".")
    kwargs = {k: raw[k] for k in ("n", "temperature", "top_p", "top_k", "stop_token_ids", "ignore_eos")
              if raw.get(k) is not None}
    if raw.get("max_new_tokens") is not None:
        kwargs["max_new_tokens"] = raw["max_new_tokens"]
    if raw.get("sampling_seed") is not None:
        kwargs["seed"] = raw["sampling_seed"]
    if is_int(kwargs.get("top_k")) and kwargs["top_k"] >= 1 << 30:
        kwargs["top_k"] = -1  # SGLang's TOP_K_ALL
    try:
        return SamplingParams(**kwargs)
    except (TypeError, ValueError) as exc:
        raise BadRequest(str(exc).replace("sampling_params", where, 1)) from exc


@dataclass
class GenerateRequest:
    """A parsed `/generate` body. `prompts` holds token ids, or None where `texts` must be tokenized."""

    prompts: list[list[int]] | None
    texts: list[str] | None
    is_single: bool
    sampling: list[SamplingParams]  # one per prompt
    return_logprob: list[bool]
    return_text_in_logprobs: bool
    rids: list[str] | None

    @property
    def batch_size(self) -> int:
        return len(self.prompts if self.prompts is not None else self.texts)


def parse_generate(body) -> GenerateRequest:
    """Validate a `/generate` body (single or batched `input_ids` or `text`)."""
    body = _body(body, "/generate")
    check_fields(body, REQUESTS["GenerateReqInput"], GENERATE_KEYS, "")
    if body.get("stream"):
        raise BadRequest("stream: streaming is not supported by megafork serve; send stream=false")
    if body.get("top_logprobs_num"):
        raise BadRequest(f"top_logprobs_num: not supported by megafork serve (only 0), found {body['top_logprobs_num']!r}")
    start = body.get("logprob_start_len")
    if start is not None and not (start == -1 or (isinstance(start, list) and all(s == -1 for s in start))):
        raise BadRequest(f"logprob_start_len: only -1 (output-token log-probs) is supported, found {start!r}")
    has_ids, has_text = body.get("input_ids") is not None, body.get("text") is not None
    if has_ids == has_text:
        raise BadRequest("input_ids: exactly one of input_ids or text is required"
                         + ("" if has_ids else ", found neither"))
    prompts = texts = None
    if has_ids:
        ids = body["input_ids"]
        want(isinstance(ids, list) and len(ids) > 0, "input_ids", "a non-empty list of token ids or of lists", ids)
        is_single = not isinstance(ids[0], list)
        prompts = [ids] if is_single else ids
        for i, p in enumerate(prompts):
            name = "input_ids" if is_single else f"input_ids[{i}]"
            want(isinstance(p, list) and len(p) > 0, name, "a non-empty list of token ids", p)
            for j, t in enumerate(p):
                want(is_int(t) and t >= 0, f"{name}[{j}]", "a token id (int >= 0)", t)
    else:
        text = body["text"]
        is_single = isinstance(text, str)
        texts = [text] if is_single else text
        want(isinstance(texts, list) and len(texts) > 0 and all(isinstance(t, str) for t in texts),
              "text", "a string or a non-empty list of strings", text)
    batch = len(prompts if prompts is not None else texts)

    sp = body.get("sampling_params")
    if isinstance(sp, list):
        want(len(sp) == batch, "sampling_params", f"one object per prompt ({batch})", f"{len(sp)} objects")
        sampling = [parse_sampling_params(s, f"sampling_params[{i}]") for i, s in enumerate(sp)]
        if len({s.n for s in sampling}) > 1:
            raise BadRequest("sampling_params: n must be the same for every prompt of a batch (as in SGLang)")
    else:
        sampling = [parse_sampling_params(sp)] * batch
    if sampling[0].n > 1:
        is_single = False  # SGLang answers parallel sampling with a list

    rl = body.get("return_logprob")
    if isinstance(rl, list):
        want(len(rl) == batch and all(isinstance(x, bool) for x in rl), "return_logprob",
              f"a bool or {batch} bools", rl)
        return_logprob = rl
    else:
        want(rl is None or isinstance(rl, bool), "return_logprob", "a bool", rl)
        return_logprob = [bool(rl)] * batch
    rtl = body.get("return_text_in_logprobs", False)
    want(isinstance(rtl, bool), "return_text_in_logprobs", "a bool", rtl)

    rid = body.get("rid")
    rids = None
    if isinstance(rid, str):
        rids = [rid] if batch == 1 else [f"{rid}_{i}" for i in range(batch)]
    elif rid is not None:
        want(isinstance(rid, list) and len(rid) == batch and all(isinstance(r, str) for r in rid), "rid",
              f"a string or {batch} strings", rid)
        rids = rid
    return GenerateRequest(prompts, texts, is_single, sampling, return_logprob, rtl, rids)


# --------------------------------------------------------------------------- weight endpoints

@dataclass
class InitGroupRequest:
    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    group_name: str = DEFAULT_GROUP
    backend: str = "nccl"


def parse_init_group(body) -> InitGroupRequest:
    body = parse_request("InitWeightsUpdateGroupReqInput", body, "/init_weights_update_group")
    req = InitGroupRequest(**{k: v for k, v in body.items() if k not in INERT})
    want(isinstance(req.master_address, str) and req.master_address != "", "master_address", "a host name", req.master_address)
    want(is_int(req.master_port) and 0 < req.master_port < 65536, "master_port", "a TCP port", req.master_port)
    want(is_int(req.world_size) and req.world_size >= 2, "world_size", "an integer >= 2 (trainer + engine)", req.world_size)
    want(is_int(req.rank_offset) and 1 <= req.rank_offset < req.world_size, "rank_offset",
          f"an integer in [1, world_size={req.world_size}) (rank 0 is the trainer)", req.rank_offset)
    want(isinstance(req.group_name, str) and req.group_name != "", "group_name", "a non-empty string", req.group_name)
    want(req.backend in ("gloo", "nccl"), "backend", "'gloo' or 'nccl'", req.backend)
    return req


@dataclass
class DistributedUpdateRequest:
    names: list[str]
    dtypes: list[torch.dtype]
    shapes: list[tuple[int, ...]]
    group_name: str
    load_format: str | None
    weight_version: str | None
    abort_all_requests: bool
    return_checksums: bool  # megafork extension


def parse_distributed_update(body) -> DistributedUpdateRequest:
    body = parse_request("UpdateWeightsFromDistributedReqInput", body, "/update_weights_from_distributed",
                         extensions=frozenset({"return_checksums"}))
    names, dtypes, shapes = body.get("names"), body.get("dtypes"), body.get("shapes")
    want(isinstance(names, list) and len(names) > 0 and all(isinstance(n, str) for n in names), "names",
          "a non-empty list of tensor names", names)
    want(isinstance(dtypes, list) and len(dtypes) == len(names), "dtypes", f"a list of {len(names)} dtype names", dtypes)
    want(isinstance(shapes, list) and len(shapes) == len(names), "shapes", f"a list of {len(names)} shapes", shapes)
    parsed_dtypes = [dtype_from_name(d, f"dtypes[{i}]") for i, d in enumerate(dtypes)]
    parsed_shapes = []
    for i, s in enumerate(shapes):
        want(isinstance(s, list) and all(is_int(d) and d >= 0 for d in s), f"shapes[{i}]",
              "a list of non-negative ints", s)
        parsed_shapes.append(tuple(s))
    load_format = body.get("load_format")
    want(load_format in (None, "flattened_bucket"), "load_format", "null (one broadcast per tensor) or "
          "'flattened_bucket'", load_format)
    selector = body.get("selector", "all")
    want(selector in ("all", "target"), "selector", "'all' or 'target' (megafork serve has no draft model)", selector)
    version = body.get("weight_version")
    want(version is None or isinstance(version, str), "weight_version", "a string", version)
    group = body.get("group_name", DEFAULT_GROUP)
    want(isinstance(group, str), "group_name", "a string", group)
    for flag in ("flush_cache", "abort_all_requests", "torch_empty_cache", "return_checksums"):
        want(isinstance(body.get(flag, False), bool), flag, "a bool", body.get(flag))
    return DistributedUpdateRequest(names, parsed_dtypes, parsed_shapes, group, load_format, version,
                                    bool(body.get("abort_all_requests", False)), bool(body.get("return_checksums", False)))


def parse_group_name(body, endpoint: str) -> str:
    body = parse_request("DestroyWeightsUpdateGroupReqInput", body, endpoint)
    group = body.get("group_name", DEFAULT_GROUP)
    want(isinstance(group, str) and group != "", "group_name", "a non-empty string", group)
    return group


@dataclass
class DiskUpdateRequest:
    model_path: str
    weight_version: str | None
    abort_all_requests: bool
    keep_pause: bool


def parse_disk_update(body) -> DiskUpdateRequest:
    body = parse_request("UpdateWeightFromDiskReqInput", body, "/update_weights_from_disk",
                         implemented={"model_path", "load_format", "abort_all_requests", "weight_version",
                                      "keep_pause", "token_step", "recapture_cuda_graph"} | INERT)
    path = body.get("model_path")
    want(isinstance(path, str) and path != "", "model_path", "a checkpoint directory", path)
    want(body.get("load_format") in (None, "auto", "safetensors"), "load_format", "null, 'auto' or 'safetensors'",
          body.get("load_format"))
    version = body.get("weight_version")
    want(version is None or isinstance(version, str), "weight_version", "a string", version)
    return DiskUpdateRequest(path, version, bool(body.get("abort_all_requests", False)),
                             bool(body.get("keep_pause", False)))


def parse_pause(body) -> str:
    body = parse_request("PauseGenerationReqInput", body, "/pause_generation")
    mode = body.get("mode", "abort")
    want(mode in ("abort", "retract", "in_place"), "mode", "'abort', 'retract' or 'in_place'", mode)
    return mode


def parse_checksum_request(body) -> list[str] | None:
    body = _body(body, "/get_weights_checksum")
    check_fields(body, {"names": {"default": None, "nullable": True}}, {"names"}, "")
    names = body.get("names")
    want(names is None or (isinstance(names, list) and all(isinstance(n, str) for n in names)), "names",
          "a list of tensor names", names)
    return names


def parse_selector(body, endpoint: str) -> str:
    """`selector` of `/begin_weight_update` (megafork serve has no draft model: 'all' = 'target')."""
    body = parse_request("BeginWeightUpdateReqInput", body, endpoint)
    selector = body.get("selector", "all")
    want(selector in ("all", "target"), "selector", "'all' or 'target' (megafork serve has no draft model)", selector)
    return selector


@dataclass
class AbortRequest:
    rid: str
    abort_all: bool


def parse_abort(body) -> AbortRequest:
    """`/abort_request`: `rid` (every request whose id starts with it, as SGLang's scheduler
    matches) or `abort_all`."""
    body = parse_request("AbortReq", body, "/abort_request", implemented={"rid", "abort_all", "http_worker_ipc"})
    rid, abort_all = body.get("rid") or "", body.get("abort_all", False)
    want(isinstance(rid, str), "rid", "a request id string", rid)
    want(isinstance(abort_all, bool), "abort_all", "a bool", abort_all)
    return AbortRequest(rid, abort_all)
