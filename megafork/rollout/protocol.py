"""SGLang's HTTP request bodies, parsed and validated (sglang 0.5.23 `srt/managers/io_struct.py`).

Every parser raises `BadRequest` naming the field, what was expected and what was found; the
server turns it into HTTP 400. SGLang fields that megafork serve does not implement are accepted
only at their default value (so clients that send the full default body still work); any other
value is a 400 saying the option is unsupported rather than silently ignored.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megafork.rollout.buckets import dtype_from_name
from megafork.rollout.types import SamplingParams

DEFAULT_GROUP = "weight_update_group"


class BadRequest(ValueError):
    """A malformed request; the message names the field."""


# --------------------------------------------------------------------------- field checks

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _want(cond: bool, field: str, expected: str, found) -> None:
    if not cond:
        raise BadRequest(f"{field}: expected {expected}, found {found!r:.200}")


def _defaultish(v) -> bool:
    return v is None or v is False or v == 0 or v == -1 or v == "" or v == [] or v == {}


def _reject_unknown(body: dict, known: set[str], tolerated: set[str], where: str) -> None:
    for key, value in body.items():
        if key in known:
            continue
        if key in tolerated:
            if not _defaultish(value):
                raise BadRequest(f"{where}{key}: this SGLang option is not supported by megafork serve "
                                 f"(only its default is accepted), found {value!r:.200}")
            continue
        raise BadRequest(f"{where}{key}: unknown field")


def _body(body, endpoint: str) -> dict:
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise BadRequest(f"{endpoint}: expected a JSON object body, found {type(body).__name__}")
    return body


# --------------------------------------------------------------------------- /generate

SAMPLING_KEYS = {"n", "temperature", "top_p", "top_k", "max_new_tokens", "stop_token_ids", "ignore_eos",
                 "sampling_seed"}
# Options that only shape the returned text, which megafork decodes without stop strings.
SAMPLING_TEXT_ONLY = {"skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim", "stream_interval"}
SAMPLING_TOLERATED = {"stop", "stop_regex", "min_p", "frequency_penalty", "presence_penalty", "min_new_tokens",
                      "beam_width", "json_schema", "regex", "ebnf", "structural_tag", "logit_bias",
                      "custom_params", "watermark"}
GENERATE_KEYS = {"text", "input_ids", "sampling_params", "return_logprob", "logprob_start_len", "rid",
                 "return_text_in_logprobs", "stream", "log_metrics", "top_logprobs_num"}
GENERATE_TOLERATED = {
    "session_id", "input_embeds", "image_data", "video_data", "audio_data", "mm_hashes", "mm_content_hashes",
    "use_audio_in_video", "video_config", "watermark", "token_ids_logprob", "return_sampling_mask",
    "sampling_logprobs_mode", "return_flat_raw_top_logprobs", "return_flat_raw_output_top_logprobs",
    "return_flat_raw_top_logprobs_b64", "return_hidden_states", "return_routed_experts", "routed_experts_start_len",
    "return_indexer_topk", "modalities", "session_params", "lora_path", "lora_id", "custom_logit_processor",
    "positional_embed_overrides", "bootstrap_host", "bootstrap_port", "bootstrap_room", "bootstrap_pair_key",
    "decode_tp_size", "routed_dp_rank", "data_parallel_rank", "disagg_prefill_dp_rank", "routing_key",
    "conversation_id", "background", "require_reasoning", "priority", "return_prompt_token_ids",
}


def parse_sampling_params(raw, where: str = "sampling_params") -> SamplingParams:
    """SGLang `sampling_params` JSON -> `SamplingParams` (`sampling_seed` becomes `seed`)."""
    raw = {} if raw is None else raw
    _want(isinstance(raw, dict), where, "a JSON object", raw)
    if raw.get("repetition_penalty", 1.0) != 1.0:
        raise BadRequest(f"{where}.repetition_penalty: not supported by megafork serve (only 1.0), "
                         f"found {raw['repetition_penalty']!r}")
    _reject_unknown(raw, SAMPLING_KEYS | SAMPLING_TEXT_ONLY | {"repetition_penalty"}, SAMPLING_TOLERATED, where + ".")
    kwargs = {k: raw[k] for k in ("n", "temperature", "top_p", "top_k", "stop_token_ids", "ignore_eos")
              if raw.get(k) is not None}
    if raw.get("max_new_tokens") is not None:
        kwargs["max_new_tokens"] = raw["max_new_tokens"]
    if raw.get("sampling_seed") is not None:
        kwargs["seed"] = raw["sampling_seed"]
    if _is_int(kwargs.get("top_k")) and kwargs["top_k"] >= 1 << 30:
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
    _reject_unknown(body, GENERATE_KEYS, GENERATE_TOLERATED, "")
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
        _want(isinstance(ids, list) and len(ids) > 0, "input_ids", "a non-empty list of token ids or of lists", ids)
        is_single = not isinstance(ids[0], list)
        prompts = [ids] if is_single else ids
        for i, p in enumerate(prompts):
            name = "input_ids" if is_single else f"input_ids[{i}]"
            _want(isinstance(p, list) and len(p) > 0, name, "a non-empty list of token ids", p)
            for j, t in enumerate(p):
                _want(_is_int(t) and t >= 0, f"{name}[{j}]", "a token id (int >= 0)", t)
    else:
        text = body["text"]
        is_single = isinstance(text, str)
        texts = [text] if is_single else text
        _want(isinstance(texts, list) and len(texts) > 0 and all(isinstance(t, str) for t in texts),
              "text", "a string or a non-empty list of strings", text)
    batch = len(prompts if prompts is not None else texts)

    sp = body.get("sampling_params")
    if isinstance(sp, list):
        _want(len(sp) == batch, "sampling_params", f"one object per prompt ({batch})", f"{len(sp)} objects")
        sampling = [parse_sampling_params(s, f"sampling_params[{i}]") for i, s in enumerate(sp)]
        if len({s.n for s in sampling}) > 1:
            raise BadRequest("sampling_params: n must be the same for every prompt of a batch (as in SGLang)")
    else:
        sampling = [parse_sampling_params(sp)] * batch
    if sampling[0].n > 1:
        is_single = False  # SGLang answers parallel sampling with a list

    rl = body.get("return_logprob")
    if isinstance(rl, list):
        _want(len(rl) == batch and all(isinstance(x, bool) for x in rl), "return_logprob",
              f"a bool or {batch} bools", rl)
        return_logprob = rl
    else:
        _want(rl is None or isinstance(rl, bool), "return_logprob", "a bool", rl)
        return_logprob = [bool(rl)] * batch
    rtl = body.get("return_text_in_logprobs", False)
    _want(isinstance(rtl, bool), "return_text_in_logprobs", "a bool", rtl)

    rid = body.get("rid")
    rids = None
    if isinstance(rid, str):
        rids = [rid] if batch == 1 else [f"{rid}_{i}" for i in range(batch)]
    elif rid is not None:
        _want(isinstance(rid, list) and len(rid) == batch and all(isinstance(r, str) for r in rid), "rid",
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
    body = _body(body, "/init_weights_update_group")
    _reject_unknown(body, {"master_address", "master_port", "rank_offset", "world_size", "group_name", "backend"},
                    set(), "")
    for key in ("master_address", "master_port", "rank_offset", "world_size"):
        if key not in body:
            raise BadRequest(f"{key}: required field is missing")
    req = InitGroupRequest(**body)
    _want(isinstance(req.master_address, str) and req.master_address != "", "master_address", "a host name", req.master_address)
    _want(_is_int(req.master_port) and 0 < req.master_port < 65536, "master_port", "a TCP port", req.master_port)
    _want(_is_int(req.world_size) and req.world_size >= 2, "world_size", "an integer >= 2 (trainer + engine)", req.world_size)
    _want(_is_int(req.rank_offset) and 1 <= req.rank_offset < req.world_size, "rank_offset",
          f"an integer in [1, world_size={req.world_size}) (rank 0 is the trainer)", req.rank_offset)
    _want(isinstance(req.group_name, str) and req.group_name != "", "group_name", "a non-empty string", req.group_name)
    _want(req.backend in ("gloo", "nccl"), "backend", "'gloo' or 'nccl'", req.backend)
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
    body = _body(body, "/update_weights_from_distributed")
    _reject_unknown(body, {"names", "dtypes", "shapes", "group_name", "flush_cache", "abort_all_requests",
                           "weight_version", "load_format", "selector", "torch_empty_cache", "return_checksums"},
                    set(), "")
    names, dtypes, shapes = body.get("names"), body.get("dtypes"), body.get("shapes")
    _want(isinstance(names, list) and len(names) > 0 and all(isinstance(n, str) for n in names), "names",
          "a non-empty list of tensor names", names)
    _want(isinstance(dtypes, list) and len(dtypes) == len(names), "dtypes", f"a list of {len(names)} dtype names", dtypes)
    _want(isinstance(shapes, list) and len(shapes) == len(names), "shapes", f"a list of {len(names)} shapes", shapes)
    parsed_dtypes = [dtype_from_name(d, f"dtypes[{i}]") for i, d in enumerate(dtypes)]
    parsed_shapes = []
    for i, s in enumerate(shapes):
        _want(isinstance(s, list) and all(_is_int(d) and d >= 0 for d in s), f"shapes[{i}]",
              "a list of non-negative ints", s)
        parsed_shapes.append(tuple(s))
    load_format = body.get("load_format")
    _want(load_format in (None, "flattened_bucket"), "load_format", "null (one broadcast per tensor) or "
          "'flattened_bucket'", load_format)
    selector = body.get("selector", "all")
    _want(selector in ("all", "target"), "selector", "'all' or 'target' (megafork serve has no draft model)", selector)
    version = body.get("weight_version")
    _want(version is None or isinstance(version, str), "weight_version", "a string", version)
    group = body.get("group_name", DEFAULT_GROUP)
    _want(isinstance(group, str), "group_name", "a string", group)
    for flag in ("flush_cache", "abort_all_requests", "torch_empty_cache", "return_checksums"):
        _want(isinstance(body.get(flag, False), bool), flag, "a bool", body.get(flag))
    return DistributedUpdateRequest(names, parsed_dtypes, parsed_shapes, group, load_format, version,
                                    bool(body.get("abort_all_requests", False)), bool(body.get("return_checksums", False)))


def parse_group_name(body, endpoint: str) -> str:
    body = _body(body, endpoint)
    _reject_unknown(body, {"group_name"}, set(), "")
    group = body.get("group_name", DEFAULT_GROUP)
    _want(isinstance(group, str) and group != "", "group_name", "a non-empty string", group)
    return group


@dataclass
class DiskUpdateRequest:
    model_path: str
    weight_version: str | None
    abort_all_requests: bool
    keep_pause: bool


def parse_disk_update(body) -> DiskUpdateRequest:
    body = _body(body, "/update_weights_from_disk")
    _reject_unknown(body, {"model_path", "load_format", "abort_all_requests", "weight_version", "flush_cache",
                           "torch_empty_cache", "keep_pause", "token_step", "recapture_cuda_graph"},
                    {"is_async", "manifest"}, "")
    path = body.get("model_path")
    _want(isinstance(path, str) and path != "", "model_path", "a checkpoint directory", path)
    _want(body.get("load_format") in (None, "auto", "safetensors"), "load_format", "null, 'auto' or 'safetensors'",
          body.get("load_format"))
    version = body.get("weight_version")
    _want(version is None or isinstance(version, str), "weight_version", "a string", version)
    return DiskUpdateRequest(path, version, bool(body.get("abort_all_requests", False)),
                             bool(body.get("keep_pause", False)))


def parse_pause(body) -> str:
    body = _body(body, "/pause_generation")
    _reject_unknown(body, {"mode"}, set(), "")
    mode = body.get("mode", "abort")
    _want(mode in ("abort", "retract", "in_place"), "mode", "'abort', 'retract' or 'in_place'", mode)
    return mode


def parse_checksum_request(body) -> list[str] | None:
    body = _body(body, "/get_weights_checksum")
    _reject_unknown(body, {"names"}, set(), "")
    names = body.get("names")
    _want(names is None or (isinstance(names, list) and all(isinstance(n, str) for n in names)), "names",
          "a list of tensor names", names)
    return names
