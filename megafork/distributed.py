"""Start torch.distributed and megatron-core's parallel state; hand out explicit groups.

This is the only module in megafork that touches `megatron.core.parallel_state`. Everything
else takes the groups it needs as arguments (and works with `None` on a single process).

    from megafork.distributed import ParallelConfig, init_distributed
    groups = init_distributed(ParallelConfig(tp=2, pp=1, cp=1))
    model = build(..., pg_collection=groups.pg_collection)
    loss = f(..., tp_group=groups.tp, dp_group=groups.dp_cp)

Launch with `torchrun --nproc_per_node=N ...`; a plain `python ...` runs as one process.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megafork.compat import apply_cpu_patches


@dataclass
class ParallelConfig:
    """Model-parallel layout. Data parallelism takes whatever the world size leaves over.

    Attributes:
        tp: tensor-parallel size.
        pp: pipeline-parallel size.
        cp: context-parallel size (needs transformer-engine on GPU).
        backend: "gloo", "nccl" or "auto" (nccl when CUDA is available, else gloo).
        timeout_minutes: collective timeout (> 0; fractions allowed). Rank 0's rollout is waited for on
            the gloo control plane (`rollout.step_timeout_minutes`), not under this timeout.
        seed: base seed for torch and megatron's RNG tracker.
        sequence_parallel: megatron sequence parallelism: activations outside attention/MLP
            (norms, residuals, dropout) are split over the TP ranks along the sequence (needs tp > 1).
    """

    tp: int = 1
    pp: int = 1
    cp: int = 1
    backend: str = "auto"
    timeout_minutes: float = 30.0
    seed: int = 1234
    sequence_parallel: bool = False

    def __post_init__(self):
        for name in ("tp", "pp", "cp"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"parallel.{name}: expected an integer >= 1, found {value!r}")
        t = self.timeout_minutes
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < float("inf"):
            raise ValueError(f"parallel.timeout_minutes: expected a number > 0, found {t!r}")
        self.timeout_minutes = float(t)
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"parallel.backend: expected 'auto', 'gloo' or 'nccl', found {self.backend!r}")
        if self.sequence_parallel is True and self.tp == 1:
            raise ValueError("parallel.sequence_parallel: expected false with parallel.tp=1 (sequence parallelism "
                             "splits activations over the TP ranks), found true")


@dataclass
class ParallelGroups:
    """The process groups of one rank, plus its coordinates. Groups are None on one process."""

    tp: dist.ProcessGroup | None
    pp: dist.ProcessGroup | None
    dp: dist.ProcessGroup | None
    cp: dist.ProcessGroup | None
    dp_cp: dist.ProcessGroup | None
    embd: dist.ProcessGroup | None
    pg_collection: object  # megatron.core.process_groups_config.ProcessGroupCollection
    rank: int
    world_size: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int
    cp_rank: int
    cp_size: int
    device: torch.device

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def init_distributed(cfg: ParallelConfig | None = None) -> ParallelGroups:
    """Initialise torch.distributed (if needed) and megatron-core model parallelism.

    Reads RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT as set by torchrun; without them it starts a
    one-process group on a free loopback port, so the same code runs under `python` and
    `torchrun`. On a CPU-only torch it applies `megafork.compat` first.

    Args:
        cfg: the parallel layout; defaults to TP=PP=CP=1.

    Returns:
        The explicit groups and coordinates of this rank.

    Raises:
        ValueError: if the world size is not divisible by tp*pp*cp, or CP is asked for without
            transformer-engine.
    """
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel import random as mcore_random

    cfg = cfg or ParallelConfig()
    cuda = torch.cuda.is_available()
    if not cuda:
        apply_cpu_patches()
    backend = ("nccl" if cuda else "gloo") if cfg.backend == "auto" else cfg.backend
    if cfg.cp > 1:
        _require_te("parallel.cp > 1 (context parallelism)")

    if not dist.is_initialized():
        if "RANK" not in os.environ:
            from megafork.testing.multirank import free_port

            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    if cuda:  # also when the caller started the group (e.g. gloo ranks sharing one GPU)
        torch.cuda.set_device(local_cuda_device(os.environ.get("LOCAL_RANK", "0"), torch.cuda.device_count()))
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=cfg.timeout_minutes))

    world = dist.get_world_size()
    model_parallel = cfg.tp * cfg.pp * cfg.cp
    if world % model_parallel:
        raise ValueError(f"world size {world} is not divisible by tp*pp*cp = "
                         f"{cfg.tp}*{cfg.pp}*{cfg.cp} = {model_parallel}")

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tp,
        pipeline_model_parallel_size=cfg.pp,
        context_parallel_size=cfg.cp,
        distributed_timeout_minutes=cfg.timeout_minutes,
        # megatron's optimizer setup asks for the gloo DP groups even when the backend is gloo.
        create_gloo_process_groups=True,
    )
    torch.manual_seed(cfg.seed)
    if cuda:
        mcore_random.model_parallel_cuda_manual_seed(cfg.seed)
    else:
        # No CUDA generator to track: megatron's inference tracker turns its fork() into a no-op.
        # Dropout is then drawn from the CPU generator (megafork's models use dropout 0).
        mcore_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)

    ps = parallel_state
    pgc = ProcessGroupCollection.use_mpu_process_groups()
    one = world == 1
    return ParallelGroups(
        tp=None if one else ps.get_tensor_model_parallel_group(),
        pp=None if one else ps.get_pipeline_model_parallel_group(),
        dp=None if one else ps.get_data_parallel_group(),
        cp=None if one else ps.get_context_parallel_group(),
        dp_cp=None if one else ps.get_data_parallel_group(with_context_parallel=True),
        # Middle pipeline stages are in no embedding group: None there.
        embd=None if one else ps.get_embedding_group(check_initialized=False),
        pg_collection=pgc,
        rank=dist.get_rank(),
        world_size=world,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=cfg.tp,
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp_size=cfg.pp,
        dp_rank=ps.get_data_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        cp_rank=ps.get_context_parallel_rank(),
        cp_size=cfg.cp,
        device=torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu"),
    )


def local_cuda_device(local_rank: str, device_count: int) -> int:
    """The CUDA ordinal of this process: LOCAL_RANK, checked against the visible devices.

    Args:
        local_rank: the LOCAL_RANK environment value (as torchrun sets it).
        device_count: `torch.cuda.device_count()`.

    Raises:
        ValueError: LOCAL_RANK is not an integer in [0, device_count), e.g. more processes per
            node than visible GPUs (CUDA would report only "invalid device ordinal").
    """
    try:
        ordinal = int(local_rank)
    except ValueError:
        raise ValueError(f"LOCAL_RANK: expected an integer, found {local_rank!r}") from None
    if not 0 <= ordinal < device_count:
        raise ValueError(f"LOCAL_RANK={ordinal}: expected a CUDA device ordinal in [0, {device_count}) "
                         f"({device_count} visible device(s), CUDA_VISIBLE_DEVICES="
                         f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!r}); start at most {device_count} "
                         "processes per node (torchrun --nproc_per_node), or hide CUDA "
                         "(CUDA_VISIBLE_DEVICES='') to run on CPU with gloo")
    return ordinal


def destroy_distributed() -> None:
    """Tear down megatron's parallel state and the default process group."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _require_te(what: str) -> None:
    try:
        import transformer_engine  # noqa: F401
    except ImportError as exc:
        raise ValueError(f"{what} needs transformer-engine, which is not installed "
                         "(pip install 'megafork[te]' on a GPU machine)") from exc


def init_fake_layout(cfg: ParallelConfig, rank: int) -> ParallelGroups:
    """Megatron's parallel state for one rank of a `tp*pp*cp` world, on torch's fake process group.

    No other process exists and no collective runs: the fake backend answers every call at once.
    It is for building a rank's model (e.g. on the meta device) to read its layout and shapes,
    as `megafork plan` does; tear down with `destroy_distributed()`.

    Args:
        cfg: the layout (data parallel size 1).
        rank: the global rank to impersonate, in megatron's order (tp fastest, then cp, dp, pp).
    """
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection
    from torch.testing._internal.distributed.fake_pg import FakeStore

    world = cfg.tp * cfg.pp * cfg.cp
    if not 0 <= rank < world:
        raise ValueError(f"rank: expected 0 <= rank < tp*pp*cp = {world}, found {rank}")
    destroy_distributed()
    if not torch.cuda.is_available():
        apply_cpu_patches()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=cfg.tp, pipeline_model_parallel_size=cfg.pp,
                                             context_parallel_size=cfg.cp, create_gloo_process_groups=False)
    ps = parallel_state
    return ParallelGroups(
        tp=ps.get_tensor_model_parallel_group(), pp=ps.get_pipeline_model_parallel_group(),
        dp=ps.get_data_parallel_group(), cp=ps.get_context_parallel_group(),
        dp_cp=ps.get_data_parallel_group(with_context_parallel=True),
        embd=ps.get_embedding_group(check_initialized=False),
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(), rank=rank, world_size=world,
        tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=cfg.tp, pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp_size=cfg.pp, dp_rank=0, dp_size=1, cp_rank=ps.get_context_parallel_rank(), cp_size=cfg.cp,
        device=torch.device("meta"))
