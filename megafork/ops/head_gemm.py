"""The LM head's three matrix products, with fp32 results from a bf16/fp16 weight.

    mm = HeadGemms(w_valid, compute_dtype(w_valid.dtype))   # once per op call
    z = mm.logits(h, out=ws.z)                 # [c, valid] logits, compute dtype
    mm.add_grads(dz, h_sel, rows, dh, dw)      # dh[rows] = dz W ; dw += dz^T h_sel (dz is consumed)

For fp32/fp64 weights every product is a plain one in that dtype. For a half-precision weight
and hidden (Megatron's bf16 model):

* Logits z = h W^T: the operands are exact in bf16, so a product with fp32 accumulation and an
  fp32 result gives the logits an fp32 GEMM of the same values would. A bf16 result (what
  Megatron's output layer returns) would move each logit by up to 2^-9 of its size, ~0.03 at
  |z| ~ 16: not small against the log-prob differences a PPO ratio measures.
* dW += dz^T h: fp32 accumulation into the fp32 gradient buffer. Rounding dz to bf16 first would
  lose as much as rounding dW itself (the per-row errors do not average out: 1.6e-3 relative
  either way, measured at V = 128..8000). So dz is split into hi = bf16(dz) and
  lo = bf16(dz - hi), 16 significant bits between them, and dW += hi^T h + lo^T h: two
  tensor-core products (~2e-6 relative; fp32 operands: ~2e-7, at about 15x the time on an H100).
* dh = dz W: one bf16 product of hi (fp32 accumulation, bf16 result). Kept in bf16 on purpose:
  dh is the gradient of a bf16 activation, so its own rounding is of the size rounding dz adds,
  and this is the precision of Megatron's own output-layer backward.

On CUDA (torch >= 2.8) `torch.mm(..., out_dtype=torch.float32, out=z)` and
`torch.addmm(dw, a, b, out_dtype=torch.float32, out=dw)` run cuBLAS with bf16 operands and an
fp32 result or accumulator (beta = 1): no [V, H] temporary. Where these are not implemented
(the CPU), the operands are upcast to fp32; bf16 products are exact in fp32, so the numbers are
those of the CUDA path up to summation order, at the cost of an fp32 copy of the weight for the
call.
"""
from __future__ import annotations

import warnings

import torch

_NATIVE: dict[tuple[str, torch.dtype], bool] = {}


def native_mixed_mm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `torch.mm`/`torch.addmm` take `dtype` operands with an fp32 result on `device`.

    Probed once per (device type, dtype) with a 1x1 product. A CUDA device without it (torch
    older than 2.8) still gets fp32 results, through upcast operands, with a warning that names
    the cost.
    """
    key = (device.type, dtype)
    if key not in _NATIVE:
        a = torch.zeros(1, 1, dtype=dtype, device=device)
        acc = torch.zeros(1, 1, dtype=torch.float32, device=device)
        try:
            torch.mm(a, a, out_dtype=torch.float32, out=acc)
            torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
            _NATIVE[key] = True
        except (TypeError, RuntimeError):  # NotImplementedError is a RuntimeError
            _NATIVE[key] = False
            if device.type != "cpu":
                warnings.warn(f"torch {torch.__version__} has no {dtype} x {dtype} -> float32 mm/addmm on "
                              f"{device.type} (torch >= 2.8 has): the fused LM head upcasts its operands to "
                              "float32 instead (same numbers, an fp32 copy of the weight shard and slower "
                              "products)", RuntimeWarning, stacklevel=2)
    return _NATIVE[key]


class HeadGemms:
    """The logits and gradient products of one op call over a weight shard's valid rows.

    Args:
        w_valid: [valid, H] weight rows (padding excluded).
        cd: the compute dtype (fp32, or fp64 for fp64 weights): logits and dW are in it.
    """

    def __init__(self, w_valid: torch.Tensor, cd: torch.dtype):
        self.w, self.cd = w_valid, cd
        self.mixed = w_valid.dtype != cd
        self.native = self.mixed and native_mixed_mm(w_valid.device, w_valid.dtype)
        self._w_up: torch.Tensor | None = None

    def _w_cd(self) -> torch.Tensor:
        if self._w_up is None:  # upcast path only: one copy per call, not per block
            self._w_up = self.w.to(self.cd)
        return self._w_up

    def logits(self, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """[c, valid] logits of a row block in the compute dtype, in the first c rows of `out`."""
        z = out[:h.shape[0]]
        if not self.mixed:
            torch.matmul(h, self.w.T, out=z)
        elif self.native:
            torch.mm(h, self.w.T, out_dtype=z.dtype, out=z)
        else:
            torch.matmul(h.to(self.cd), self._w_cd().T, out=z)
        return z

    def add_grads(self, dz: torch.Tensor, h_sel: torch.Tensor, rows: torch.Tensor | None,
                  dh: torch.Tensor | None, dw: torch.Tensor | None) -> None:
        """dh[rows] = dz @ W and dw += dz^T @ h_sel for one block: the gradient products.

        Args:
            dz: [k, valid] logits gradient of the selected rows (compute dtype); used as scratch.
            h_sel: [k, H] hidden states of the selected rows.
            rows: [k] indices of the selected rows within the block, or None for every row.
            dh: [c, H] slice of the hidden-gradient buffer (weight dtype) to fill, or None.
            dw: [valid, H] weight-gradient accumulator (compute dtype), or None.
        """
        if not self.mixed:
            if dh is not None:
                _hidden_rows(dz, self.w, rows, dh)
            if dw is not None:
                dw.addmm_(dz.T, h_sel)
            return
        hi = dz.to(self.w.dtype)
        if dh is not None:
            _hidden_rows(hi, self.w, rows, dh)
        if dw is None:
            return
        h_acc = h_sel if self.native else h_sel.to(self.cd)
        self._accumulate(dw, hi, h_acc)
        hi.copy_(dz.sub_(hi))  # lo = bf16(dz - hi), in hi's buffer
        self._accumulate(dw, hi, h_acc)

    def _accumulate(self, dw: torch.Tensor, part: torch.Tensor, h: torch.Tensor) -> None:
        if self.native:
            torch.addmm(dw, part.T, h, out_dtype=dw.dtype, out=dw)
        else:
            dw.addmm_(part.to(self.cd).T, h)


def _hidden_rows(dz: torch.Tensor, w: torch.Tensor, rows: torch.Tensor | None, dh: torch.Tensor) -> None:
    if rows is None:
        torch.matmul(dz, w, out=dh)
    else:
        dh.index_copy_(0, rows, dz @ w)
