"""The planner's activation bytes against what autograd really saves, for a tiny Qwen3 (local spec).

    .venv/bin/python -m pytest tests/test_plan_activations.py -q -s     # -s prints the table

On two gloo ranks, megafork's Qwen3 runs one forward (`return_hidden=True`, the trainer's path)
under `torch.autograd.graph.saved_tensors_hooks`, at TP=1 and TP=2, recompute none / selective
(core_attn; core_attn+mlp) / full (uniform, block), SP off and on. The bytes of the unique
storages saved for the backward (parameters excluded) must be within 10% of
`megafork.plan.activations.stage_bytes`.
"""
from __future__ import annotations

import torch

from megafork.testing import run_ranks
from megafork.testing.tiny_qwen3 import make_tiny_qwen3

B, S = 2, 96
SETTINGS = [
    ("none", {}),
    ("selective core_attn", {"recompute": "selective", "recompute_modules": ["core_attn"]}),
    ("selective core_attn+mlp", {"recompute": "selective", "recompute_modules": ["core_attn", "mlp"]}),
    ("full uniform 1", {"recompute": "full", "recompute_method": "uniform", "recompute_num_layers": 1}),
    ("full block 1", {"recompute": "full", "recompute_method": "block", "recompute_num_layers": 1}),
]


def measure_saved_bytes(model, ids) -> int:
    """Bytes of the unique non-parameter storages autograd saves in one forward of `model`."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params and t.device.type != "meta":
            seen[st.data_ptr()] = st.nbytes()
        return t

    pos = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, pos, None, return_hidden=True)
    del out
    return sum(seen.values())


def _worker(rank, world, hf_dir):
    from megafork.distributed import ParallelConfig, init_distributed
    from megafork.models.qwen3 import Qwen3BuildOptions, build_qwen3, read_hf_config
    from megafork.train.config import ModelConfig

    hf = read_hf_config(hf_dir)
    ids = torch.randint(3, 120, (B, S), generator=torch.Generator().manual_seed(0))
    out = []
    for tp, sp in ((1, False), (2, False), (2, True)):
        groups = init_distributed(ParallelConfig(tp=tp, sequence_parallel=sp))
        for name, kw in SETTINGS:
            opts = Qwen3BuildOptions(dtype="fp32", sequence_parallel=sp, **ModelConfig(**kw).build_options())
            model = build_qwen3(hf, opts, groups)
            model.train()
            out.append({"tp": tp, "sp": sp, "setting": name, "kw": kw, "bytes": measure_saved_bytes(model, ids)})
    return out


def predicted(hf, tp, sp, kw) -> float:
    from megafork.plan.activations import LayerShape, stage_bytes

    ls = LayerShape(hidden=hf.hidden_size, ffn=hf.intermediate_size, heads=hf.num_attention_heads,
                    kv_heads=hf.num_key_value_heads, head_dim=hf.head_dim, tp=tp, sequence_parallel=sp, act_bytes=4)
    return stage_bytes(ls, B, S, hf.num_hidden_layers, first_stage=True, last_stage=True, recompute=kw.get("recompute", "none"),
                       method=kw.get("recompute_method", "uniform"), num_layers=kw.get("recompute_num_layers", 1),
                       modules=tuple(kw.get("recompute_modules", ())))


def test_activation_bytes_match_saved_tensors(tmp_path):
    from megafork.models.qwen3 import read_hf_config

    hf_dir = make_tiny_qwen3(tmp_path / "hf", seed=1, num_hidden_layers=3)
    hf = read_hf_config(hf_dir)
    rows = run_ranks(_worker, 2, args=(str(hf_dir),), timeout=300)[0]
    print("\n| TP | SP | recompute | measured (KiB) | planner (KiB) | planner / measured |\n|---|---|---|---|---|---|")
    bad = []
    for r in rows:
        want = predicted(hf, r["tp"], r["sp"], r["kw"])
        ratio = want / r["bytes"]
        print(f"| {r['tp']} | {'on' if r['sp'] else 'off'} | {r['setting']} | {r['bytes'] / 1024:.1f} | "
              f"{want / 1024:.1f} | {ratio:.3f} |")
        if not 0.9 <= ratio <= 1.1:
            bad.append((r["tp"], r["sp"], r["setting"], r["bytes"], want))
    assert not bad, bad
