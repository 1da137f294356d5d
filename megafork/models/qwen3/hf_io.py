"""Stream HF safetensors into a sharded Qwen3, and HF-named full tensors out of it.

    load_hf_weights(model, hf_dir, groups)            # every rank reads only its own slices
    for name, tensor in export_hf_tensors(model, groups):   # call on every rank
        ...                                           # tensors arrive on global rank 0 only

Memory: loading reads each parameter's TP/PP slice straight from the file with
`safe_open(...).get_slice`, so a rank's peak is its own shard plus one slice. Exporting gathers
one parameter at a time onto TP rank 0 of its stage and forwards it to rank 0: a rank never
holds more than its shard plus one full tensor (plus the q/k/v or gate/up pieces being split).
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
import torch.distributed as dist

from megafork.models.qwen3.config import Qwen3HFConfig
from megafork.models.qwen3.mapping import Rule, hf_shapes, megatron_name, merge_shards, read_shard, rules

SAFETENSORS_INDEX = "model.safetensors.index.json"


class HFCheckpoint:
    """The tensors of an HF checkpoint directory, by name, read lazily with `safe_open`.

    Args:
        hf_dir: directory holding `model.safetensors` or `model.safetensors.index.json` + shards.
    """

    def __init__(self, hf_dir: str | Path):
        from safetensors import safe_open

        self.dir = Path(hf_dir)
        index = self.dir / SAFETENSORS_INDEX
        single = self.dir / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{index}: unreadable safetensors index ({exc!r}); expected a JSON "
                                 "object with a 'weight_map'") from exc
            files = sorted(set(weight_map.values()))
        elif single.is_file():
            weight_map, files = None, ["model.safetensors"]
        else:
            raise FileNotFoundError(f"{self.dir}: no model.safetensors or {SAFETENSORS_INDEX} found")
        self._stack = ExitStack()
        self._handles = {}
        for f in files:
            path = self.dir / f
            if not path.is_file():
                raise FileNotFoundError(f"{path}: listed in {SAFETENSORS_INDEX} but missing")
            try:
                self._handles[f] = self._stack.enter_context(safe_open(str(path), framework="pt"))
            except Exception as exc:  # noqa: BLE001 - safetensors raises several types
                raise ValueError(f"{path}: not a readable safetensors file ({exc})") from exc
        if weight_map is None:
            weight_map = {k: "model.safetensors" for k in self._handles["model.safetensors"].keys()}
        else:
            for name, f in weight_map.items():
                if name not in self._handles[f].keys():
                    raise ValueError(f"{self.dir / f}: tensor {name!r} listed in {SAFETENSORS_INDEX} "
                                     "is not in this file")
        self.weight_map: dict[str, str] = weight_map

    def close(self) -> None:
        self._stack.close()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self.weight_map[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return self._handles[self.weight_map[name]].get_slice(name).get_dtype()

    def read(self, name: str, dim: int = 0, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) of `name` along `dim` (0 or 1), read from disk without the rest."""
        sl = self._handles[self.weight_map[name]].get_slice(name)
        if start == 0 and stop is None:
            return sl[:]
        return sl[start:stop] if dim == 0 else sl[:, start:stop]

    def check(self, hf: Qwen3HFConfig) -> None:
        """Raise naming the tensor and file if any tensor is missing, extra, mis-shaped or not float.

        Args:
            hf: the config the checkpoint must match.
        """
        expected = hf_shapes(hf)
        missing = [n for n in expected if n not in self.weight_map]
        if missing:
            raise ValueError(f"{self.dir}: tensor {missing[0]!r} is missing (expected shape "
                             f"{list(expected[missing[0]])}; {len(missing)} missing in all, "
                             f"files: {sorted(set(self.weight_map.values()))})")
        extra = [n for n in self.weight_map if n not in expected]
        if extra:
            hint = " (config.json says tie_word_embeddings=true)" if extra[0] == "lm_head.weight" else ""
            raise ValueError(f"{self.dir / self.weight_map[extra[0]]}: unexpected tensor {extra[0]!r}{hint}; "
                             f"{len(extra)} unexpected in all")
        for name, shape in expected.items():
            found = self.shape(name)
            if found != shape:
                raise ValueError(f"{self.dir / self.weight_map[name]}: tensor {name!r} has shape {list(found)}, "
                                 f"expected {list(shape)} from config.json")
            if self.dtype(name) not in ("F32", "BF16", "F16", "F64"):
                raise ValueError(f"{self.dir / self.weight_map[name]}: tensor {name!r} has dtype "
                                 f"{self.dtype(name)}, expected a float type")


def uses_te_names(model) -> bool:
    """True when the model was built with the TE spec (norms fused into LayerNormLinear)."""
    return any(n.endswith("linear_qkv.layer_norm_weight") for n, _ in model.named_parameters())


def stage_rules(model, pp_rank: int, pp_size: int) -> list[tuple[Rule, int | None, int | None]]:
    """This stage's (rule, local layer, global layer) triples, in HF order.

    Args:
        model: a `Qwen3GPTModel` stage.
        pp_rank: this stage's index.
        pp_size: number of stages.
    """
    hf = model.hf_config
    per_stage = hf.num_hidden_layers // pp_size
    offset = pp_rank * per_stage
    layers = list(model.decoder.layers)
    found = [layer.layer_number - 1 for layer in layers]
    if found != list(range(offset, offset + per_stage)):
        raise ValueError(f"pipeline stage {pp_rank}: holds global layers {found}, expected "
                         f"{offset}..{offset + per_stage - 1} (an even split of {hf.num_hidden_layers} layers)")
    table = rules(hf, te_names=uses_te_names(model))
    out: list[tuple[Rule, int | None, int | None]] = []
    for rule in table:
        if rule.stage == "first" and model.pre_process:
            out.append((rule, None, None))
    for i in range(per_stage):
        out.extend((rule, i, offset + i) for rule in table if rule.stage == "layer")
    for rule in table:
        # With tied embeddings on one stage, GPTModel's output layer has no weight of its own.
        if rule.stage == "last" and model.post_process and (rule.export or not model.pre_process):
            out.append((rule, None, None))
    params = dict(model.named_parameters())
    names = {megatron_name(r, i) for r, i, _ in out}
    if names != set(params):
        raise ValueError(f"pipeline stage {pp_rank}: model parameters and the Qwen3 mapping disagree; "
                         f"unmapped parameters {sorted(set(params) - names)}, "
                         f"mapped but absent {sorted(names - set(params))}")
    return out


def load_hf_weights(model, hf_dir: str | Path, groups) -> None:
    """Copy an HF checkpoint into this rank's shard of `model`, streaming from safetensors.

    Each rank opens the files and reads only the slices of its own parameters, so no rank
    holds the whole model (nor even a whole tensor of a TP-split parameter).

    Args:
        model: a `Qwen3GPTModel` stage built for `groups`.
        hf_dir: HF checkpoint directory (config.json + safetensors).
        groups: this rank's `ParallelGroups`.

    Raises:
        ValueError / FileNotFoundError: naming the tensor and file that is missing, extra or
            mis-shaped (checked for the whole checkpoint before any tensor is read).
    """
    hf = model.hf_config
    ckpt = HFCheckpoint(hf_dir)
    try:
        ckpt.check(hf)
        params = dict(model.named_parameters())
        padded = model.vocab_size
        with torch.no_grad():
            for rule, local, global_layer in stage_rules(model, groups.pp_rank, groups.pp_size):
                shard = read_shard(rule, global_layer, hf, groups.tp_rank, groups.tp_size, padded, ckpt.read)
                param = params[megatron_name(rule, local)]
                if tuple(shard.shape) != tuple(param.shape):
                    raise ValueError(f"tensor {rule.hf[0].format(g=global_layer)}: TP shard {groups.tp_rank} has "
                                     f"shape {list(shard.shape)}, but megatron parameter "
                                     f"{megatron_name(rule, local)} expects {list(param.shape)}")
                param.copy_(shard)
    finally:
        ckpt.close()


def export_hf_tensors(
    model,
    groups,
    to_rank0: bool = True,
    source: Callable[[torch.nn.Parameter], torch.Tensor] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream a sharded Qwen3 as full, HF-named tensors, one at a time.

    Every rank must call this and exhaust the iterator (the generator drives the collectives).
    Per parameter, in HF order (embed_tokens, layers 0..L-1, norm, lm_head):
      1. the TP shards are gathered onto TP rank 0 of the stage that holds it;
      2. that rank splits/unpads them into HF tensors (q/k/v, gate/up, vocab rows removed);
      3. with `to_rank0` they are sent to global rank 0 (stage 0, TP 0, DP 0), which yields them.

    What each rank yields:
      - to_rank0=True: global rank 0 yields every tensor of the model; every other rank yields nothing.
      - to_rank0=False: TP rank 0 of DP replica 0 of each stage yields its own stage's tensors
        (for writing shards per stage in parallel); other ranks yield nothing.
    Ranks of other DP/CP replicas return immediately without communicating.

    The tied LM head is not yielded (HF stores it as model.embed_tokens.weight). Yielded tensors
    are contiguous, in the parameters' dtype, on `groups.device`, and are fresh copies: they never
    alias the parameter, so they stay valid after the model changes.

    Args:
        model: a `Qwen3GPTModel` stage.
        groups: this rank's `ParallelGroups`.
        to_rank0: forward every tensor to global rank 0 (default) or yield per stage.
        source: which tensor of a parameter to export (default the parameter itself;
            e.g. `lambda p: p.main_grad` exports gradients under HF names).
    """
    if groups.dp_rank != 0 or groups.cp_rank != 0:
        return
    hf = model.hf_config
    get = source or (lambda p: p.data)
    params = dict(model.named_parameters())
    dtype = next(iter(params.values())).dtype
    shapes = hf_shapes(hf)
    mine = stage_rules(model, groups.pp_rank, groups.pp_size)
    if not to_rank0 or groups.pp_size == 1:
        for rule, local, global_layer in mine:
            if rule.export:
                out = _gather_merge(rule, local, global_layer, hf, get(params[megatron_name(rule, local)]), groups)
                yield from out or []
        return
    # Stage-by-stage plan, identical on every rank: stage s holds layers [s*L/pp, (s+1)*L/pp).
    per_stage = hf.num_hidden_layers // groups.pp_size
    table = [r for r in rules(hf, te_names=uses_te_names(model)) if r.export]
    for stage in range(groups.pp_size):
        plan = [(r, None, None) for r in table if r.stage == "first" and stage == 0]
        plan += [(r, i, stage * per_stage + i) for i in range(per_stage) for r in table if r.stage == "layer"]
        plan += [(r, None, None) for r in table if r.stage == "last" and stage == groups.pp_size - 1]
        src = dist.get_global_rank(groups.pp, stage)
        dst = dist.get_global_rank(groups.pp, 0)
        for rule, local, global_layer in plan:
            if stage == groups.pp_rank:
                out = _gather_merge(rule, local, global_layer, hf, get(params[megatron_name(rule, local)]), groups)
                if out is None:
                    continue
                if stage == 0:
                    yield from out
                else:
                    for _, t in out:
                        dist.send(t, dst=dst)
            elif groups.pp_rank == 0 and groups.tp_rank == 0:
                for name in (n.format(g=global_layer) for n in rule.hf):
                    buf = torch.empty(shapes[name], dtype=dtype, device=groups.device)
                    dist.recv(buf, src=src)
                    yield name, buf


def _gather_merge(rule, local, global_layer, hf, shard, groups):
    """Gather a parameter's TP shards onto TP rank 0 and merge them; None on other TP ranks."""
    if groups.tp_size == 1:
        # A copy: merged tensors may be views of the parameter (or grad), which keeps changing.
        return merge_shards(rule, global_layer, hf, [shard.detach().clone()])
    if rule.kind == "replicate":
        return merge_shards(rule, global_layer, hf, [shard.detach().clone()]) if groups.tp_rank == 0 else None
    shard = shard.detach().contiguous()
    bufs = [torch.empty_like(shard) for _ in range(groups.tp_size)] if groups.tp_rank == 0 else None
    dist.gather(shard, bufs, group=groups.tp, group_dst=0)
    return merge_shards(rule, global_layer, hf, bufs) if groups.tp_rank == 0 else None
