"""Token log-probs, entropy and the policy-gradient loss over a vocab-parallel LM head.

    from megafork.ops import (vocab_parallel_logprobs_entropy, fused_head_logprobs_entropy,
                              fused_head_policy_loss)

* `vocab_parallel_logprobs_entropy(logits_shard, labels, tp_group=None, temperature=1.0,
  vocab_size=None)`: from the [..., V_local] logits a Megatron output layer produces with
  `parallel_output=True`.
* `fused_head_logprobs_entropy(hidden, weight_shard, labels, tp_group=None, temperature=1.0,
  vocab_size=None, chunk_size=None)`: from the final hidden states and the output-layer
  weight shard, one [chunk, V_local] logits block at a time (the old/no-grad pass and
  analysis use this).
* `fused_head_policy_loss(hidden, weight_shard, labels, old_logprobs, advantages, loss_mask,
  ...)`: the DAPO loss with the LM-head gradients formed in the forward pass for the masked
  rows only (the update pass). See `megafork.ops.fused_policy` for how it plugs into
  megatron-core's forward_step / loss_func contract and DDP.

All results are exact fp32: per row block, one MAX and one SUM all-reduce over `tp_group`
(max, sum-exp, sum p*z, target logit). Rank r holds global ids [r*V_local, (r+1)*V_local);
`vocab_size` excludes Megatron's vocab padding from the softmax. The `hidden` gradient is summed
over the TP group (ColumnParallelLinear's input-gradient semantics); the weight gradient is the
local shard's, accumulated in fp32 and, for a parameter under megatron DDP, added into its fp32
`main_grad` (`megafork.ops.weight_grad`); a bf16 weight gets fp32 logits (`megafork.ops.head_gemm`).
Every function works unchanged with `tp_group=None` on one process.
"""
from megafork.ops.fused_head import fused_head_logprobs_entropy
from megafork.ops.fused_policy import fused_head_policy_loss
from megafork.ops.vocab_parallel import vocab_parallel_logprobs_entropy
from megafork.ops.vocab_stats import deferred_checks

__all__ = ["deferred_checks", "fused_head_logprobs_entropy", "fused_head_policy_loss",
           "vocab_parallel_logprobs_entropy"]
