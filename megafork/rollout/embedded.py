"""The embedded rollout engine: `transformers.Qwen3ForCausalLM` in this process.

    engine = EmbeddedEngine.from_pretrained("/path/to/hf_dir")        # CPU, or CUDA when present
    samples = engine.generate([[1, 5, 7]], SamplingParams(n=4, temperature=1.0, seed=0))
    engine.update_weights(export_hf_tensors(model, groups))            # HF names, full tensors

Generation is batched with a KV cache: prompts are left-padded, the attention mask hides the
padding and position ids count only real tokens, then one token per row is decoded per step
until every row hits a stop token or `max_new_tokens`. Which log-prob each token reports is
documented in `megafork.rollout.sampling`.

Concurrent `generate` calls (the HTTP server runs one per request thread) interleave step by
step under one lock; they are not merged into one batch. Weight updates take the same lock, so
a forward step never sees half-updated weights.
"""
from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import torch

from megafork.rollout.buckets import copy_bytes, dtype_name, tensor_checksum
from megafork.rollout.sampling import next_tokens, sample_generators, sample_seed
from megafork.rollout.types import RolloutError, Sample, SamplingParams, validate_prompts

log = logging.getLogger(__name__)

PAUSE_MODES = ("abort", "retract", "in_place")


class WeightUpdateError(ValueError):
    """A weight update was rejected before any weight changed; the old weights keep serving."""


class EmbeddedEngine:
    """A Qwen3 (any HF causal LM) served from this process.

    Args:
        model: a `transformers` causal LM (e.g. `Qwen3ForCausalLM`), already on its device.
        model_path: where it came from (reported by `/get_model_info`).
        tokenizer: optional tokenizer with `encode`/`decode` for text prompts.
        max_batch_rows: rows (prompts × n) per forward batch; larger requests run in chunks.
    """

    def __init__(self, model, model_path: str | None = None, tokenizer=None, max_batch_rows: int = 64):
        if max_batch_rows < 1:
            raise ValueError(f"max_batch_rows: expected >= 1, found {max_batch_rows}")
        self.model = model.eval()
        self.model_path = model_path
        self.tokenizer = tokenizer
        self.max_batch_rows = max_batch_rows
        self.weight_version = "default"
        self.config = model.config
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self._lock = threading.RLock()
        self._running = threading.Event()
        self._running.set()
        self._abort_epoch = 0
        eos = self.config.eos_token_id
        self.eos_token_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        pad = self.config.pad_token_id
        self.pad_token_id = int(pad) if pad is not None else (self.eos_token_ids[0] if self.eos_token_ids else 0)
        # transformers 5.x renamed `past_key_values` to `cache`; accept both generations.
        params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"

    @classmethod
    def from_pretrained(cls, model_path: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, **kwargs) -> EmbeddedEngine:
        """Load an HF checkpoint directory (config.json + safetensors, optional tokenizer).

        Args:
            model_path: HF model directory.
            device: default CUDA when available, else CPU.
            dtype: default bf16 on CUDA, the checkpoint's dtype on CPU.
            **kwargs: passed to `EmbeddedEngine` (e.g. `max_batch_rows`).
        """
        from transformers import AutoModelForCausalLM

        path = Path(model_path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: expected an HF checkpoint directory with config.json, found none")
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else "auto"
        tokenizer = load_tokenizer(path)  # first: it is cheap, and a broken one fails before the weights load
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device)
        return cls(model, model_path=str(path), tokenizer=tokenizer, **kwargs)

    # ------------------------------------------------------------------ generation

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], sampling: SamplingParams, row_seeds: list[int | None] | None = None,
                 cancel: threading.Event | list[threading.Event] | None = None) -> list[Sample]:
        """Sample `sampling.n` responses per prompt; returns them prompt-major.

        Args:
            prompts: token-id lists.
            sampling: sampling parameters (validated). With a seed, sample j of prompt i uses
                `sample_seed(seed, i, j, n)`, so every sample has its own seed.
            row_seeds: explicit seeds, one per row (prompts x n, prompt-major; None entries draw
                fresh randomness); overrides `sampling.seed`. `megafork serve` uses it to give
                every copy of a request the request's own seed, as SGLang does.
            cancel: an event, or one per prompt: once set, that prompt's rows still running end
                at their next step with finish reason "abort" (`/abort_request`, a client that
                disconnected).
        """
        prompts = validate_prompts(prompts, self.config.vocab_size)
        rows = [(i, p) for i, p in enumerate(prompts) for _ in range(sampling.n)]
        if row_seeds is None:
            row_seeds = ([None] * len(rows) if sampling.seed is None else
                         [sample_seed(sampling.seed, i, j, sampling.n) for i in range(len(prompts))
                          for j in range(sampling.n)])
        if len(row_seeds) != len(rows):
            raise ValueError(f"row_seeds: expected {len(rows)} seeds (prompts x n), found {len(row_seeds)}")
        gens = None if sampling.greedy else sample_generators(row_seeds, self.device)
        if isinstance(cancel, list):
            if len(cancel) != len(prompts):
                raise ValueError(f"cancel: expected one event per prompt ({len(prompts)}), found {len(cancel)}")
            row_cancel = [cancel[i] for i, _ in rows]
        else:
            row_cancel = [cancel] * len(rows)
        self._wait_until_running()
        epoch = self._abort_epoch
        out: list[Sample] = []
        for start in range(0, len(rows), self.max_batch_rows):
            chunk = rows[start:start + self.max_batch_rows]
            chunk_gens = None if gens is None else gens[start:start + len(chunk)]
            out.extend(self._generate_chunk(chunk, sampling, chunk_gens, epoch,
                                            row_cancel[start:start + len(chunk)]))
        return out

    def _generate_chunk(self, rows, sampling: SamplingParams, gens, epoch, cancel) -> list[Sample]:
        from transformers import DynamicCache

        bsz = len(rows)
        longest = max(len(p) for _, p in rows)
        ids = torch.full((bsz, longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((bsz, longest), dtype=torch.long)
        for r, (_, p) in enumerate(rows):
            ids[r, longest - len(p):] = torch.tensor(p)
            mask[r, longest - len(p):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        stops = set(sampling.stop_token_ids) | (set() if sampling.ignore_eos else set(self.eos_token_ids))
        stop_ids = torch.tensor(sorted(stops), dtype=torch.long, device=self.device)

        cache = DynamicCache(config=self.config)
        # Per-step results stay tensors ([bsz, steps]); rows are cut to length once at the end,
        # so the decode loop does no per-row Python work.
        max_new = sampling.max_new_tokens
        out_tokens = torch.full((bsz, max_new), self.pad_token_id, dtype=torch.long, device=self.device)
        out_lps = torch.zeros((bsz, max_new), dtype=torch.float32, device=self.device)
        lengths = torch.zeros(bsz, dtype=torch.long, device=self.device)
        # The mask of every position there will be; each step reads its growing prefix.
        full_mask = torch.cat([mask, torch.ones((bsz, max_new), dtype=mask.dtype, device=self.device)], 1)
        done = torch.zeros(bsz, dtype=torch.bool, device=self.device)
        stopped = torch.zeros(bsz, dtype=torch.bool, device=self.device)
        cancelled = torch.zeros(bsz, dtype=torch.bool, device=self.device)
        watched = [(r, ev) for r, ev in enumerate(cancel) if ev is not None]  # none in training
        aborted = False
        step_ids, step_pos = ids, positions
        for step in range(max_new):
            if self._abort_epoch != epoch:
                aborted = True
                break
            for r, ev in watched:
                if ev.is_set() and not bool(done[r]):
                    cancelled[r] = done[r] = True
            if bool(done.all()):
                break
            self._wait_until_running()
            with self._lock:
                logits = self.model(input_ids=step_ids, attention_mask=full_mask[:, :longest + step],
                                    position_ids=step_pos, use_cache=True, logits_to_keep=1,
                                    **{self._cache_kwarg: cache}).logits[:, -1]
            tokens, lps = next_tokens(logits, sampling.temperature, sampling.top_k, sampling.top_p, gens)
            tokens = torch.where(done, torch.full_like(tokens, self.pad_token_id), tokens)
            out_tokens[:, step] = tokens
            out_lps[:, step] = lps
            lengths += ~done  # a row takes this step's token while it is not done
            hit_stop = torch.isin(tokens, stop_ids) & ~done
            stopped |= hit_stop
            done |= hit_stop
            if bool(done.all()):
                break
            step_ids = tokens[:, None]
            step_pos = step_pos[:, -1:] + 1
        version = self.weight_version
        lengths, tok_rows, lp_rows = lengths.tolist(), out_tokens.tolist(), out_lps.tolist()
        # Unfinished rows: "abort" when aborted mid-request, else they ran to max_new_tokens.
        unfinished = "abort" if aborted else "length"
        reasons = ["stop" if s else "abort" if c else unfinished
                   for s, c in zip(stopped.tolist(), cancelled.tolist(), strict=True)]
        return [Sample(prompt_index=i, response_ids=tok_rows[r][:lengths[r]], logprobs=lp_rows[r][:lengths[r]],
                       finish_reason=reasons[r], weight_version=version)
                for r, (i, _) in enumerate(rows)]

    # ------------------------------------------------------------------ control

    def pause(self, mode: str = "abort") -> None:
        """Stop generating. New requests wait for `resume()`.

        Args:
            mode: "abort" ends in-flight requests at their next step with finish reason "abort"
                (SGLang's default); "in_place"/"retract" hold them at their next step and let
                them continue after `resume()`.
        """
        if mode not in PAUSE_MODES:
            raise ValueError(f"mode: expected one of {PAUSE_MODES}, found {mode!r}")
        self._running.clear()
        if mode == "abort":
            self.abort_all()

    def abort_all(self) -> None:
        """End every in-flight request at its next step with finish reason "abort"."""
        with self._lock:
            self._abort_epoch += 1

    def resume(self) -> None:
        self._running.set()

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    def health(self) -> bool:
        """True when the model answers a one-token forward pass."""
        try:
            with self._lock, torch.inference_mode():
                out = self.model(input_ids=torch.tensor([[self.pad_token_id]], device=self.device)).logits
            return bool(torch.isfinite(out).all())
        except Exception:  # noqa: BLE001 - health reports, it does not raise
            log.exception("embedded engine health check failed")
            return False

    def _wait_until_running(self) -> None:
        while not self._running.wait(timeout=1.0):
            pass

    # ------------------------------------------------------------------ weights

    def weight_shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """HF name -> (shape, dtype) of every loadable tensor (tied names included)."""
        return {n: (tuple(t.shape), t.dtype) for n, t in self.model.state_dict(keep_vars=True).items()}

    def check_update(self, specs: Iterable[tuple[str, tuple[int, ...], torch.dtype]]) -> dict[str, torch.Tensor]:
        """Validate an update before any weight changes.

        Args:
            specs: (hf_name, shape, dtype) of every tensor the update carries.

        Returns:
            hf_name -> the engine tensor it will overwrite.

        Raises:
            WeightUpdateError: naming the first unknown, repeated, mis-shaped or non-float tensor.
        """
        targets = self.model.state_dict(keep_vars=True)
        dests = {}
        for name, shape, dtype in specs:
            if name not in targets:
                hint = sorted(targets)[:3]
                raise WeightUpdateError(f"names: {name!r} is not a tensor of this model (HF names such as {hint})")
            if name in dests:
                raise WeightUpdateError(f"names: {name!r} appears twice in one update")
            want = targets[name]
            if tuple(shape) != tuple(want.shape):
                raise WeightUpdateError(f"shapes: {name!r} expected shape {list(want.shape)}, found {list(shape)}")
            if dtype.is_floating_point != want.is_floating_point():
                raise WeightUpdateError(f"dtypes: {name!r} expected a {dtype_name(want.dtype)}-compatible dtype, "
                                        f"found {dtype_name(dtype)}")
            dests[name] = want.data
        return dests

    @contextmanager
    def writing_weights(self, weight_version: str | None = None):
        """Hold off generation steps while weights are written in place; then set the version."""
        with self._lock, torch.no_grad():
            yield
            if weight_version is not None:
                self.weight_version = str(weight_version)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]],
                       weight_version: str | None = None) -> dict:
        """Load full HF-named tensors. Everything is checked before anything is written.

        Floating tensors of another dtype are cast to the engine's dtype (a bf16 trainer may
        feed an fp32 engine). Names may be any subset of the model's tensors.

        Args:
            named_tensors: (hf_name, full tensor) pairs.
            weight_version: new version string reported with samples, if given.

        Returns:
            {"num_tensors", "bytes", "seconds"}.

        Raises:
            WeightUpdateError: naming the first bad tensor; no weight has changed.
        """
        t0 = time.perf_counter()
        items = list(named_tensors)
        dests = self.check_update((n, tuple(t.shape), t.dtype) for n, t in items)
        nbytes = 0
        with self.writing_weights(weight_version):
            for name, tensor in items:
                copy_into(dests[name], tensor)
                nbytes += tensor.numel() * tensor.element_size()
        return {"num_tensors": len(items), "bytes": nbytes, "seconds": time.perf_counter() - t0}

    def load_from_disk(self, model_path: str | Path, weight_version: str | None = None) -> dict:
        """Load an HF checkpoint directory's safetensors, all or nothing.

        Every file of `model.safetensors.index.json` must be there and hold the tensors the index
        gives it, and every tensor of the model must arrive (a tied alias such as `lm_head.weight`
        may be left out). Everything is loaded into memory and checked before any weight changes,
        so a missing shard fails the update with the old weights untouched.
        """
        import json

        from safetensors.torch import load_file

        path = Path(model_path)
        index = path / "model.safetensors.index.json"
        weight_map = None
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise WeightUpdateError(f"model_path: {index} is not a readable safetensors index ({exc})") from exc
            files = sorted({path / f for f in weight_map.values()})
            missing_files = [str(f) for f in files if not f.is_file()]
            if missing_files:
                raise WeightUpdateError(f"model_path: {missing_files} listed in {index.name} are missing")
        else:
            files = sorted(path.glob("*.safetensors"))
            if not files:
                raise WeightUpdateError(f"model_path: no *.safetensors files in {path}")
        tensors: dict[str, torch.Tensor] = {}
        for f in files:
            try:
                tensors.update(load_file(str(f)))
            except Exception as exc:  # noqa: BLE001 - safetensors raises several types
                raise WeightUpdateError(f"model_path: {f} is not a readable safetensors file ({exc})") from exc
        absent = sorted(n for n, f in (weight_map or {}).items() if n not in tensors)
        if absent:
            raise WeightUpdateError(f"model_path: {len(absent)} tensors listed in {index.name} are not in their "
                                    f"files: {absent[:5]}")
        missing = self.missing_tensors(tensors)
        if missing:
            raise WeightUpdateError(f"model_path: {path} lacks {len(missing)} of the model's tensors: {missing[:5]}")
        stats = self.update_weights(tensors.items(), weight_version=weight_version)
        self.model_path = str(path)
        return stats

    def missing_tensors(self, names) -> list[str]:
        """Tensors of the model that `names` leaves out; of tied tensors (sharing storage, such as
        a tied `lm_head.weight`) one name is enough."""
        by_storage: dict[int, list[str]] = {}
        for n, t in self.model.state_dict(keep_vars=True).items():
            by_storage.setdefault(t.data_ptr(), []).append(n)
        return sorted(group[0] for group in by_storage.values() if not any(n in names for n in group))

    def weights_checksum(self, names: list[str] | None = None) -> dict[str, str]:
        """sha256 of each named weight's bytes in the engine's dtype (all weights by default)."""
        targets = self.model.state_dict(keep_vars=True)
        names = sorted(targets) if names is None else names
        missing = [n for n in names if n not in targets]
        if missing:
            raise WeightUpdateError(f"names: not tensors of this model: {missing[:5]}")
        with self._lock:
            return {n: tensor_checksum(targets[n]) for n in names}


def copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst <- src, casting when the dtypes differ (a plain memcpy when they agree)."""
    if src.dtype == dst.dtype and dst.is_contiguous():
        copy_bytes(dst, src)
    else:
        dst.copy_(src)


def load_tokenizer(path: Path):
    """The checkpoint's tokenizer, or None when it has no tokenizer files.

    Raises:
        RolloutError: one line naming the file when the tokenizer files are incomplete or broken.
    """
    has_config = (path / "tokenizer_config.json").is_file()
    vocab_files = [f for f in ("tokenizer.json", "tokenizer.model", "vocab.json") if (path / f).is_file()]
    if not has_config and not vocab_files:
        return None
    if not vocab_files:
        raise RolloutError(f"{path / 'tokenizer.json'}: missing, but {path / 'tokenizer_config.json'} is there; add "
                           "tokenizer.json, or remove tokenizer_config.json to serve input_ids only")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # noqa: BLE001 - a bad tokenizer must not stop input_ids serving
        detail = " ".join(str(exc).split())[:300]
        raise RolloutError(f"{path / vocab_files[0]}: could not load the tokenizer ({type(exc).__name__}: {detail}); "
                           "fix it, or remove the tokenizer files to serve input_ids only") from exc
