"""HF Qwen3 `config.json` -> megatron-core `TransformerConfig`, and nothing else builds one.

    hf = read_hf_config("Qwen/Qwen3-8B")                  # validated, typed
    opts = Qwen3BuildOptions(dtype="bf16", recompute_granularity="full",
                             recompute_method="uniform", recompute_num_layers=1)
    tcfg = to_transformer_config(hf, opts, tp=8, pp=2)

Every field of a dense Qwen3 config is either translated or checked to hold the value we
support; anything else (rope_scaling types, sliding window, MoE, biases) raises naming the field.

Activation recomputation (for 20k-29k token responses), passed straight to megatron-core:
  - `recompute_granularity="selective"` with `recompute_modules` (default ["core_attn"]):
    recompute the attention scores/softmax only; cheap and usually enough with flash attention.
    Other modules: "mlp" (dense MLP), "layernorm".
  - `recompute_granularity="full"` with `recompute_method="uniform"` and `recompute_num_layers=N`:
    keep only each N-layer chunk's input, recompute the rest in backward (the most memory saved).
  - `recompute_granularity="full"` with `recompute_method="block"` and `recompute_num_layers=N`:
    recompute the first N layers of each pipeline stage, keep the others' activations.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

# Qwen3 fields that must hold one of these values for the dense model we build.
_MUST_EQUAL = {
    "hidden_act": ("silu",),
    "attention_bias": (False,),
    "use_sliding_window": (False,),
    "sliding_window": (None,),
    "num_experts": (None, 0),
    "rope_scaling": (None,),
}
# Fields that carry no information for the forward pass (tokenizer ids, HF runtime switches).
_IGNORED = {
    "architectures", "model_type", "bos_token_id", "eos_token_id", "pad_token_id", "dtype",
    "torch_dtype", "transformers_version", "use_cache", "initializer_range", "max_window_layers",
    "layer_types", "attention_dropout", "output_attentions", "output_hidden_states",
    "return_dict", "_name_or_path", "rope_parameters", "rope_theta",
}
SUPPORTED_ARCHITECTURES = ("Qwen3ForCausalLM",)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Qwen3HFConfig:
    """The fields of an HF Qwen3 config.json that define the model. Built by `read_hf_config`."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    source: str = "<dict>"
    raw: dict = field(default_factory=dict, compare=False, repr=False)


@dataclass
class Qwen3BuildOptions:
    """How to build the megatron model (not what the model is: that is the HF config).

    Attributes:
        dtype: parameter dtype, "fp32", "bf16" or "fp16".
        vocab_multiple: the padded vocab is a multiple of vocab_multiple * tp (megatron's
            make-vocab-size-divisible-by convention).
        sequence_parallel: megatron sequence parallelism (tp > 1; TE's norms on GPU, megafork.compat's
            shim for megatron's torch norm on CPU).
        recompute_granularity: None, "selective" or "full" (see module docstring).
        recompute_method: None, "uniform" or "block" (with granularity "full").
        recompute_num_layers: layers per recompute chunk (uniform) or per stage (block).
        recompute_modules: modules for selective recompute, e.g. ["core_attn", "mlp"].
        use_cpu_initialization: create weights on the CPU first (forced on a CPU-only torch).
        perform_initialization: run the random init; False when weights are loaded right after.
        init_method_std: std of the random init.
        spec: "auto" (TE when importable), "te" or "local".
    """

    dtype: str = "fp32"
    vocab_multiple: int = 128
    sequence_parallel: bool = False
    recompute_granularity: str | None = None
    recompute_method: str | None = None
    recompute_num_layers: int | None = None
    recompute_modules: list[str] | None = None
    use_cpu_initialization: bool = False
    perform_initialization: bool = True
    init_method_std: float = 0.02
    spec: str = "auto"

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype: expected one of {sorted(DTYPES)}, found {self.dtype!r}")
        if self.vocab_multiple < 1:
            raise ValueError(f"model.vocab_multiple: expected >= 1, found {self.vocab_multiple}")
        if self.recompute_granularity not in (None, "selective", "full"):
            raise ValueError("model.recompute_granularity: expected None, 'selective' or 'full', "
                             f"found {self.recompute_granularity!r}")
        if self.recompute_method not in (None, "uniform", "block"):
            raise ValueError("model.recompute_method: expected None, 'uniform' or 'block', "
                             f"found {self.recompute_method!r}")
        if self.recompute_granularity == "full" and (self.recompute_method is None
                                                     or self.recompute_num_layers is None):
            raise ValueError("model.recompute_granularity='full' needs recompute_method and "
                             "recompute_num_layers")
        if self.recompute_granularity != "full" and self.recompute_num_layers is not None:
            raise ValueError("model.recompute_num_layers is only used with recompute_granularity='full', "
                             f"found granularity {self.recompute_granularity!r}")
        if self.recompute_modules is not None and self.recompute_granularity != "selective":
            raise ValueError("model.recompute_modules is only used with recompute_granularity='selective'")
        if self.spec not in ("auto", "te", "local"):
            raise ValueError(f"model.spec: expected 'auto', 'te' or 'local', found {self.spec!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def read_hf_config(source: str | Path | dict) -> Qwen3HFConfig:
    """Read and validate an HF Qwen3 config (a directory, a config.json path, or a dict).

    Args:
        source: HF checkpoint directory, path of its config.json, or the parsed dict.

    Returns:
        The typed config.

    Raises:
        FileNotFoundError / ValueError: naming the file and the field that is missing, of an
            unsupported architecture, or holding a value this dense Qwen3 builder does not support.
    """
    if isinstance(source, dict):
        raw, where = dict(source), "<dict>"
    else:
        path = Path(source)
        path = path / "config.json" if path.is_dir() else path
        where = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"{where}: HF config.json not found")
        try:
            raw = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{where}: not a readable JSON config ({exc})") from exc
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: expected a JSON object, found {type(raw).__name__}")

    archs = raw.get("architectures")
    if archs is not None and (not isinstance(archs, list) or any(a not in SUPPORTED_ARCHITECTURES for a in archs)):
        raise ValueError(f"{where}: field 'architectures' = {archs!r}; expected {list(SUPPORTED_ARCHITECTURES)}")
    if raw.get("model_type") != "qwen3":
        raise ValueError(f"{where}: field 'model_type' = {raw.get('model_type')!r}; expected 'qwen3'")

    for name, allowed in _MUST_EQUAL.items():
        if name in raw and raw[name] not in allowed:
            raise ValueError(f"{where}: field {name!r} = {raw[name]!r} is not supported "
                             f"(expected {' or '.join(map(repr, allowed))})")
    rope_theta = _rope_theta(raw, where)
    if raw.get("layer_types") is not None and any(t != "full_attention" for t in raw["layer_types"]):
        raise ValueError(f"{where}: field 'layer_types' contains {sorted(set(raw['layer_types']))}; "
                         "only 'full_attention' is supported (sliding window is not)")
    for name in ("attention_dropout",):
        if float(raw.get(name, 0.0)) != 0.0:
            raise ValueError(f"{where}: field {name!r} = {raw[name]} is not supported (expected 0.0)")

    def need(name, kind=int, default=None):
        if name not in raw or raw[name] is None:
            if default is not None:
                return default
            raise ValueError(f"{where}: required field {name!r} is missing")
        value = raw[name]
        if kind is int and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{where}: field {name!r} = {value!r}; expected a positive integer")
        if kind is float and (not isinstance(value, (int, float)) or value <= 0):
            raise ValueError(f"{where}: field {name!r} = {value!r}; expected a positive number")
        if kind is bool and not isinstance(value, bool):
            raise ValueError(f"{where}: field {name!r} = {value!r}; expected true or false")
        return value

    heads = need("num_attention_heads")
    hidden = need("hidden_size")
    cfg = Qwen3HFConfig(
        vocab_size=need("vocab_size"),
        hidden_size=hidden,
        intermediate_size=need("intermediate_size"),
        num_hidden_layers=need("num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=need("num_key_value_heads", default=heads),
        head_dim=need("head_dim", default=hidden // heads),
        rms_norm_eps=float(need("rms_norm_eps", float)),
        rope_theta=rope_theta,
        max_position_embeddings=need("max_position_embeddings"),
        tie_word_embeddings=need("tie_word_embeddings", bool, default=False),
        source=where,
        raw=raw,
    )
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ValueError(f"{where}: field 'num_attention_heads' = {heads} is not a multiple of "
                         f"'num_key_value_heads' = {cfg.num_key_value_heads}")
    known = set(_MUST_EQUAL) | _IGNORED | {f for f in Qwen3HFConfig.__dataclass_fields__}
    unknown = sorted(k for k in raw if k not in known and not _is_default_hf_field(k, raw[k]))
    if unknown:
        raise ValueError(f"{where}: fields {unknown} are not understood by megafork's Qwen3 builder; "
                         "refusing to drop them silently")
    return cfg


def _rope_theta(raw: dict, where: str) -> float:
    # transformers >= 5 nests RoPE under rope_parameters; released Qwen3 configs use rope_theta.
    params = raw.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict):
            raise ValueError(f"{where}: field 'rope_parameters' = {params!r}; expected an object")
        rope_type = params.get("rope_type", "default")
        if rope_type != "default":
            raise ValueError(f"{where}: field 'rope_parameters.rope_type' = {rope_type!r} is not supported "
                             "(expected 'default'; RoPE scaling is not implemented)")
        extra = sorted(set(params) - {"rope_type", "rope_theta"})
        if extra:
            raise ValueError(f"{where}: field 'rope_parameters' has unsupported keys {extra}")
        if "rope_theta" in params:
            return float(params["rope_theta"])
    if "rope_theta" in raw:
        return float(raw["rope_theta"])
    raise ValueError(f"{where}: required field 'rope_theta' (or 'rope_parameters.rope_theta') is missing")


def _is_default_hf_field(name: str, value) -> bool:
    # Generic PretrainedConfig fields that transformers may write with neutral values.
    neutral = {"tie_encoder_decoder": False, "is_encoder_decoder": False, "chunk_size_feed_forward": 0,
               "problem_type": None, "id2label": None, "label2id": None, "add_cross_attention": False,
               "pruned_heads": {}, "tokenizer_class": None, "task_specific_params": None}
    return name in neutral and value in (neutral[name], None)


def padded_vocab_size(vocab_size: int, tp: int, multiple: int = 128) -> int:
    """The vocab rounded up to a multiple of `multiple * tp`, so every TP shard is equal.

    Args:
        vocab_size: HF vocab size.
        tp: tensor-parallel size.
        multiple: per-shard granularity (megatron's make-vocab-size-divisible-by).
    """
    step = multiple * tp
    return -(-vocab_size // step) * step


def check_parallel_layout(hf: Qwen3HFConfig, tp: int, pp: int) -> None:
    """Raise naming the field if heads, KV heads or layers do not divide over TP/PP.

    Args:
        hf: the HF config.
        tp: tensor-parallel size.
        pp: pipeline-parallel size.
    """
    where = hf.source
    for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        value = getattr(hf, name)
        if value % tp:
            raise ValueError(f"{where}: field {name!r} = {value} is not divisible by tensor-parallel size {tp}")
    if hf.num_hidden_layers % pp:
        raise ValueError(f"{where}: field 'num_hidden_layers' = {hf.num_hidden_layers} is not divisible by "
                         f"pipeline-parallel size {pp}")


def to_transformer_config(hf: Qwen3HFConfig, opts: Qwen3BuildOptions, tp: int = 1, pp: int = 1,
                          cp: int = 1):
    """The one translation of a Qwen3 config into megatron-core's `TransformerConfig`.

    Args:
        hf: validated HF config (`read_hf_config`).
        opts: build options (dtype, recompute, sequence parallelism, ...).
        tp: tensor-parallel size.
        pp: pipeline-parallel size.
        cp: context-parallel size.

    Returns:
        megatron.core.transformer.TransformerConfig.

    Raises:
        ValueError: heads/layers not divisible, or SP/CP asked for without transformer-engine.
    """
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    check_parallel_layout(hf, tp, pp)
    cuda = torch.cuda.is_available()
    if cp > 1 and not te_available():
        raise ValueError(f"parallel.cp = {cp} (context parallelism) needs transformer-engine attention, "
                         "which is not importable here; set cp=1")
    if opts.sequence_parallel and tp == 1:
        raise ValueError("parallel.sequence_parallel: expected false with tp=1, found true")
    uses_te = opts.spec == "te" or (opts.spec == "auto" and te_available())
    if opts.sequence_parallel and cuda and not uses_te:
        # On CPU megafork.compat lets megatron's torch norm run under SP; a GPU run uses TE's norms.
        raise ValueError("parallel.sequence_parallel with model.transformer_impl='local' on GPU: megatron's "
                         "torch norm refuses sequence parallelism; use transformer_engine")
    if opts.recompute_granularity == "full":
        per_stage = hf.num_hidden_layers // pp
        if not 1 <= opts.recompute_num_layers <= per_stage:
            raise ValueError(f"model.recompute_num_layers: expected 1..{per_stage} (the layers of one pipeline "
                             f"stage: {hf.num_hidden_layers} / pp {pp}), found {opts.recompute_num_layers}")
    dtype = opts.torch_dtype
    return TransformerConfig(
        num_layers=hf.num_hidden_layers,
        hidden_size=hf.hidden_size,
        ffn_hidden_size=hf.intermediate_size,
        num_attention_heads=hf.num_attention_heads,
        num_query_groups=hf.num_key_value_heads,
        kv_channels=hf.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=hf.rms_norm_eps,
        qk_layernorm=True,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
        init_method_std=opts.init_method_std,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        sequence_parallel=opts.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=opts.use_cpu_initialization or not cuda,
        perform_initialization=opts.perform_initialization,
        # Fused kernels exist only on GPU (TE/apex); the unfused paths are exact.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        recompute_granularity=opts.recompute_granularity,
        recompute_method=opts.recompute_method,
        recompute_num_layers=opts.recompute_num_layers,
        recompute_modules=opts.recompute_modules,
        # No CUDA graphs are captured; megatron-core 0.16's default scope "full" only trips its own
        # deprecation warning on every build ([] is the same whole-layer scope).
        cuda_graph_scope=[],
    )


def te_available() -> bool:
    """True when transformer-engine's PyTorch bindings import."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "no TE"
        return False
    return True
