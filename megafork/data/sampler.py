"""Deterministic, resumable, DP-sharded order over a dataset's rows.

    sampler = PromptSampler(len(ds), prompts_per_step=512, seed=1234, dp_rank=r, dp_size=d)
    idx = sampler.next_batch()          # this rank's 512 / d row indices for the step
    ckpt["data"] = sampler.state_dict() # ... later: sampler.load_state_dict(ckpt["data"])

Every rank draws the same global permutation (numpy PCG64 seeded with (seed, epoch)) and takes
its contiguous slice of each global batch, so no communication is needed and the global batch
does not depend on the DP size. A batch that crosses an epoch end finishes the epoch and
continues with the next epoch's permutation.
"""
from __future__ import annotations

import numpy as np


class PromptSampler:
    """Row indices per step.

    Args:
        num_rows: dataset size.
        prompts_per_step: global prompts per step (all DP ranks together).
        seed: shuffling seed.
        shuffle: False gives file order every epoch.
        dp_rank: this rank's index in the data-parallel group.
        dp_size: data-parallel size; must divide `prompts_per_step`.
    """

    def __init__(self, num_rows: int, prompts_per_step: int, seed: int, shuffle: bool = True,
                 dp_rank: int = 0, dp_size: int = 1):
        if num_rows < 1:
            raise ValueError(f"PromptSampler.num_rows: expected >= 1, found {num_rows}")
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"PromptSampler: expected 0 <= dp_rank < dp_size, found dp_rank={dp_rank}, dp_size={dp_size}")
        if prompts_per_step < 1 or prompts_per_step % dp_size:
            raise ValueError(f"train.prompts_per_step: expected a positive multiple of the DP size {dp_size}, "
                             f"found {prompts_per_step}")
        self.num_rows, self.prompts_per_step, self.seed, self.shuffle = num_rows, prompts_per_step, seed, shuffle
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_rows)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)

    def next_global_batch(self) -> list[int]:
        """The whole step's row indices (all ranks), advancing the position."""
        out: list[int] = []
        while len(out) < self.prompts_per_step:
            take = min(self.prompts_per_step - len(out), self.num_rows - self.position)
            out.extend(int(i) for i in self._order[self.position:self.position + take])
            self.position += take
            if self.position == self.num_rows:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
        return out

    def next_batch(self) -> list[int]:
        """This rank's contiguous slice of the next global batch."""
        per_rank = self.prompts_per_step // self.dp_size
        batch = self.next_global_batch()
        return batch[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]

    def state_dict(self) -> dict:
        """Position in the stream (enough to resume bit-exactly)."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_rows": self.num_rows,
                "shuffle": self.shuffle, "prompts_per_step": self.prompts_per_step}

    def load_state_dict(self, state: dict) -> None:
        """Resume from `state_dict()`; the dataset, seed, shuffle and batch size must match.

        Args:
            state: a dict from `state_dict`.
        """
        for key in ("seed", "num_rows", "shuffle", "prompts_per_step"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"data sampler checkpoint: expected {key}={getattr(self, key)!r} (this run), "
                                 f"found {state.get(key)!r} in the checkpoint")
        epoch, position = state["epoch"], state["position"]
        if not (isinstance(epoch, int) and epoch >= 0 and isinstance(position, int) and 0 <= position < self.num_rows):
            raise ValueError(f"data sampler checkpoint: expected epoch >= 0 and 0 <= position < {self.num_rows}, "
                             f"found epoch={epoch!r}, position={position!r}")
        self.epoch, self.position = epoch, position
        self._order = self._permutation(epoch)
