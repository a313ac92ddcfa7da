"""What every training run shares: devices and processes, precision, the learning-rate schedule, EMA,
a deterministic resumable batch stream, atomic checkpoints, and the progress/CSV log.

A resumed run continues exactly as the uninterrupted one would, and a run on W processes (``torchrun``) is the
1-process run at the same global batch (to float rounding): the batch order is a pure function of (seed, step),
and every other random draw of a step is a pure function of (seed, step, the sample's position in the global
batch) (:func:`step_sample_random`); batch statistics are taken over the global batch
(:mod:`maetok.global_batch`).
"""

from __future__ import annotations

import atexit
import contextlib
import csv
import datetime
import io
import math
import os
import pickle
import re
import signal
import stat
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Dataset, Sampler

from maetok.config import OptimConfig, TrainConfig, to_dict
from maetok.data import ItemBatch, item_loader
from maetok.errors import (
    ConfigError,
    DataError,
    Interrupted,
    MissingFileError,
    ModelFolderError,
    NonFiniteError,
    ProcessGroupError,
    first_line,
)
from maetok.global_batch import SampleRandom, all_finite_everywhere
from maetok.model_folders import check_state_keys
from maetok.runs import (
    FORMAT_KEY,
    FORMAT_VERSION,
    MODEL_DIR,
    FolderHold,
    check_finite_tensors,
    check_format_version,
    check_output_folder,
    clear_held_folder,
    hold_folder,
    resolve_device,
    save_torch,
    write_text,
)

# ---------------------------------------------------------------------------------------------------------
# Processes and devices
# ---------------------------------------------------------------------------------------------------------


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: Optional[str] = None, collective_timeout_s: Optional[float] = None) -> DistInfo:
    """One process (CPU or one GPU) or many under ``torchrun`` (NCCL on GPUs, gloo on CPUs); a collective that waits
    ``collective_timeout_s`` (default: torch's) for a process that does not answer fails on the others."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = resolve_device(device)  # a device this machine lacks: one line
    if dev.type == "cuda" and dev.index is None:  # "--device cuda": this process's GPU
        dev = torch.device("cuda", local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world_size > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(seconds=collective_timeout_s) if collective_timeout_s else None
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", timeout=timeout)
        # torn down before the interpreter exits, however the command ends: a group left alive when a peer has
        # already gone (a refused or failed job) aborts the process in C++ ("terminate called ...") at exit
        atexit.register(_teardown_distributed)
    return DistInfo(rank, world_size, local_rank, dev)


def _teardown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast where the device supports it (``auto``: CUDA with bf16 only), else a no-op."""
    use_bf16 = precision == "bf16" or (
        precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def mean_across_processes(values: dict[str, float], device: torch.device) -> dict[str, float]:
    if not (dist.is_available() and dist.is_initialized()) or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


# ---------------------------------------------------------------------------------------------------------
# Optimisation helpers
# ---------------------------------------------------------------------------------------------------------


def lr_factor(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Linear warmup then cosine (to ``min_lr_ratio``) or constant; multiplies ``optim.lr``."""
    if optim.warmup_steps and step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return 1.0
    span = max(1, total_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / span)
    return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


NO_DECAY_SUFFIXES = ("token", "tokens", "pos_embed")


def decays(name: str, param: Tensor) -> bool:
    """Whether AdamW decays this parameter (the MAE / timm convention): matrices and conv kernels do; biases,
    norm scales, LayerScale gammas and other vectors, position embeddings and learnable tokens (``mask_token``,
    ``latent_tokens``, ``query_tokens``, ``cls_token``, ``latent_pos_embed``, ...) do not."""
    leaf = name.rsplit(".", 1)[-1]
    if param.dim() <= 1 or leaf == "bias":
        return False
    return not leaf.endswith(NO_DECAY_SUFFIXES)


def make_adamw(
    named_params: Sequence[tuple[str, nn.Parameter]] | Iterator[tuple[str, nn.Parameter]],
    optim: OptimConfig,
    lr: Optional[float] = None,
) -> torch.optim.AdamW:
    """AdamW over the trainable ``(name, parameter)`` pairs: two groups, with and without weight decay
    (:func:`decays`); the group without decay is listed second."""
    decay, no_decay = [], []
    for name, p in named_params:
        if p.requires_grad:
            (decay if decays(name, p) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr or optim.lr, betas=tuple(optim.betas))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class EMA:
    """Exponential moving average of a module's parameters and buffers (a detached copy kept in fp32).

    ``warmup`` (``train.ema_warmup``): the decay at step ``s`` is ``min(decay, (1 + s) / (warmup + s))`` (the
    TF / timm-style warm-up), so that short runs are not dominated by the random initialisation (with 0.999 and
    no warm-up, 30% of the average after 1200 steps would still be the initial weights). It reaches ``decay``
    at step :meth:`full_decay_step`: about 90K steps for 0.9999 with ``warmup=10``. ``warmup <= 1``: no
    warm-up, the full decay from step 0 (DiT / SiT)."""

    def __init__(self, model: nn.Module, decay: float, warmup: float = 10.0):
        self.decay = decay
        self.warmup = warmup
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    def decay_at(self, step: int) -> float:
        if self.warmup <= 1:
            return self.decay
        return min(self.decay, (1 + step) / (self.warmup + step))

    def full_decay_step(self) -> int:
        """The first step at which the warm-up gives the full decay."""
        return ema_full_decay_step(self.decay, self.warmup)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        current = model.state_dict()
        floats = [k for k, v in self.shadow.items() if v.is_floating_point()]
        weight = 1 - self.decay_at(step)
        torch._foreach_lerp_([self.shadow[k] for k in floats], [current[k].float() for k in floats], weight)
        for k, v in self.shadow.items():
            if not v.is_floating_point():
                v.copy_(current[k])

    def state_dict(self) -> dict[str, Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise ModelFolderError(f"EMA state lacks keys {sorted(missing)[:5]}")
        for k in self.shadow:
            self.shadow[k].copy_(state[k])


def ema_full_decay_step(decay: float, warmup: float) -> int:
    """First step ``s`` with ``(1 + s) / (warmup + s) >= decay`` (0 without warm-up)."""
    if warmup <= 1 or decay <= 0:
        return 0
    step = max(0, math.floor((decay * warmup - 1) / (1 - decay)) - 2)  # the closed form, less float rounding
    while min(decay, (1 + step) / (warmup + step)) < decay:
        step += 1
    return step


def describe_ema(train: TrainConfig) -> str:
    """One line on a run's EMA: its decay and when its warm-up reaches it (``maetok info``)."""
    if train.ema_decay <= 0:
        return "no EMA"
    if train.ema_warmup <= 1:
        return f"EMA {train.ema_decay:g} from step 0 (no warm-up)"
    full = ema_full_decay_step(train.ema_decay, train.ema_warmup)
    return (f"EMA {train.ema_decay:g}, warm-up min(decay, (1 + s) / ({train.ema_warmup:g} + s)): "
            f"full decay from step {full:,} of {train.steps:,}{' (not reached)' if full > train.steps else ''}")


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel; the parameters it names in ``unused_in_training()`` (if it has that
    method) are left out of the gradient reduction (without DDP's per-step search for unused parameters)."""
    from torch.nn.parallel import DistributedDataParallel

    unused = list(getattr(model, "unused_in_training", lambda: [])())
    ignore = getattr(DistributedDataParallel, "_set_params_and_buffers_to_ignore_for_model", None)
    if unused and ignore is not None:
        ignore(model, unused)
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=bool(unused) and ignore is None)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


# ---------------------------------------------------------------------------------------------------------
# Deterministic, resumable batches
# ---------------------------------------------------------------------------------------------------------


class StepBatchSampler(Sampler[list[int]]):
    """Global batch ``k`` holds positions ``[k*B, (k+1)*B)`` of the endless stream of per-epoch random
    permutations (epoch ``e`` permuted with seed ``seed + e``). Each process takes its slice of each global
    batch. Starting at ``start_step`` reproduces exactly the batches an uninterrupted run would see."""

    def __init__(self, num_items: int, batch_size: int, seed: int, start_step: int = 0, rank: int = 0, world_size: int = 1):
        if num_items < 1:
            raise DataError("the dataset is empty")
        if batch_size % world_size:
            raise ConfigError(f"batch size {batch_size} is not divisible by {world_size} processes")
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.start_step = start_step
        self.rank = rank
        self.world_size = world_size
        self._perm_epoch = -1
        self._perm: Optional[Tensor] = None

    def _permutation(self, epoch: int) -> Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.num_items, generator=g)
            self._perm_epoch = epoch
        return self._perm

    def batch_indices(self, step: int) -> list[int]:
        start = step * self.batch_size
        out = []
        for pos in range(start, start + self.batch_size):
            epoch, offset = divmod(pos, self.num_items)
            out.append(int(self._permutation(epoch)[offset]))
        per_rank = self.batch_size // self.world_size
        return out[self.rank * per_rank : (self.rank + 1) * per_rank]

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            yield self.batch_indices(step)
            step += 1


def batch_stream(
    dataset: Dataset, batch_size: int, seed: int, start_step: int, dist_info: DistInfo, num_workers: int
) -> Iterator[ItemBatch]:
    """Endless iterator of this process's :class:`~maetok.data.ItemBatch` es beginning at ``start_step``. An
    unreadable file leaves no row (:func:`~maetok.data.item_loader`): its step trains on the rest of the batch, each
    row keeping its draws (:meth:`Trainer.sample_random`); with several processes such a step weighs each process's
    rows by their own count (DDP averages per-process means), so it equals the 1-process step only when the
    processes lost as many rows."""
    sampler = StepBatchSampler(len(dataset), batch_size, seed, start_step, dist_info.rank, dist_info.world_size)
    loader = item_loader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=dist_info.device.type == "cuda",
        persistent_workers=num_workers > 0,
    )
    return iter(loader)


def step_sample_random(seed: int, step: int, local_batch_size: int, dist_info: DistInfo,
                       slots: Optional[Tensor] = None) -> SampleRandom:
    """The per-sample random draws of ``step`` for this process's slice of the global batch: sample ``i`` of
    rank ``r`` sits at global position ``r * local_batch_size + i`` (the slice :class:`StepBatchSampler` gives
    it), so every draw of a sample is the same whatever the number of processes, and on a resume. ``slots``: the
    places ``i`` of the samples present when the batch left some out (unreadable files; default: all)."""
    if slots is None:
        return SampleRandom.for_batch(seed, step, local_batch_size, offset=dist_info.rank * local_batch_size)
    return SampleRandom(seed, step, dist_info.rank * local_batch_size + slots)


def flip_mask(draws: SampleRandom, device: Optional[torch.device] = None) -> Tensor:
    """``(B,)`` bool: which samples of the step are flipped left-right (probability 0.5; stream ``flip``)."""
    return draws.uniform("flip", (), device) < 0.5


# ---------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint written by :func:`maetok.runs.save_torch` without executing pickled code."""
    if not path.exists():
        raise MissingFileError(f"no checkpoint at {path}")
    info = path.stat()
    kind = ("a folder" if stat.S_ISDIR(info.st_mode) else "a device, pipe or socket" if not stat.S_ISREG(info.st_mode)
            else "empty" if info.st_size == 0 else None if zipfile.is_zipfile(path) else "not a zip file")
    if kind:  # torch.load would read a device without end, or call a foreign file pickled code
        raise ModelFolderError(f"cannot read checkpoint {path}: it is {kind}, not a maetok checkpoint (a torch zip file; "
                               "truncated?): delete it to restart the run, or restore it")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only refuses anything but tensors and plain containers
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        first = f"it references {found.group(1)}" if found else "unsupported content"
        raise ModelFolderError(f"checkpoint {path} was refused: it holds pickled code or objects beyond tensors and plain "
                               f"containers, which maetok never executes ({first})") from None
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file: name it, in one line
        first = first_line(err)
        raise ModelFolderError(f"cannot read checkpoint {path} (truncated or not a maetok checkpoint: {first}); "
                               f"delete it to restart the run, or restore it") from None
    if not isinstance(state, dict) or "step" not in state or "model" not in state:
        raise ModelFolderError(f"{path} is not a maetok training checkpoint (no 'step' / 'model' entries)")
    check_format_version(state, path)
    return state


# ---------------------------------------------------------------------------------------------------------
# Run directories: never destroy a run, never resume silently under another config
# ---------------------------------------------------------------------------------------------------------

#: What a training run writes; a folder holding any of them holds a run.
RUN_MARKERS = ("config.yaml", "log.csv", str(Path("checkpoints") / "last.pt"), str(Path(MODEL_DIR) / "config.json"))
#: Keys a resumed run may change without ``--allow-config-change``: they change no number the run computes.
BOOKKEEPING_KEYS = frozenset({"train.num_workers", "train.log_every", "train.eval_every", "train.ckpt_every",
                              "train.collective_timeout_s"})


def flatten_config(config: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"steps": 5}}`` -> ``{"train.steps": 5}`` (lists and scalars are leaves)."""
    if not isinstance(config, dict):
        return {prefix: config}
    flat: dict[str, Any] = {}
    for key, value in config.items():
        flat.update(flatten_config(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def config_changes(earlier: dict, now: dict) -> list[tuple[str, Any, Any]]:
    """``(key, earlier value, new value)`` for every dotted key that differs (absent: ``None``), sorted by key."""
    old, new = flatten_config(earlier), flatten_config(now)
    return [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def holds_run(out_dir: Path) -> bool:
    """Whether ``out_dir`` holds a training run's files (:data:`RUN_MARKERS`)."""
    return out_dir.is_dir() and any((out_dir / marker).exists() for marker in RUN_MARKERS)


def complete_config(config_class: type, raw: dict) -> dict:
    """A saved config as the dataclass ``config_class`` would write it today (defaults for keys an older maetok did
    not write), so that a new key is not a change; as written when it names a key this maetok no longer knows."""
    from maetok.config import ConfigError, from_dict

    try:
        return to_dict(from_dict(config_class, raw))
    except ConfigError:
        return raw


def changes_since(config_path: Path, cfg: Any, unused: Sequence[str] = ()) -> list[tuple[str, Any, Any]]:
    """Every change from the ``config.yaml`` at ``config_path`` (defaults filled in: :func:`complete_config`) to the
    dataclass config ``cfg``, leaving out the keys under the prefixes ``unused`` (sections the run never reads, such
    as stage 2's ``finetune.`` in a stage-1 run); ``[]`` when there is no such file."""
    from maetok.config import read_yaml_file

    if not config_path.exists():
        return []
    earlier = read_yaml_file(config_path, "restore it, or pass --overwrite to train the run again") or {}
    if not isinstance(earlier, dict):
        raise ConfigError(f"{config_path} does not hold a config (a mapping): restore it, or pass --overwrite to "
                          "train the run again")
    return changes_from(earlier, cfg, unused)


def changes_from(earlier: dict, cfg: Any, unused: Sequence[str] = ()) -> list[tuple[str, Any, Any]]:
    """Every change from the saved config ``earlier`` (defaults filled in: :func:`complete_config`) to the dataclass
    config ``cfg``, leaving out the keys under the prefixes ``unused``."""
    earlier = complete_config(type(cfg), earlier)
    return [change for change in config_changes(earlier, to_dict(cfg)) if not change[0].startswith(tuple(unused))]


def significant_changes(changes: Sequence[tuple[str, Any, Any]]) -> list[tuple[str, Any, Any]]:
    """The config changes beyond :data:`BOOKKEEPING_KEYS`: those a resumed run needs ``--allow-config-change`` for."""
    return [change for change in changes if change[0] not in BOOKKEEPING_KEYS]


def run_config_changes(run_dir: Path, cfg: Any, unused: Sequence[str] = ()) -> list[tuple[str, Any, Any]]:
    """The changes beyond :data:`BOOKKEEPING_KEYS` (and the ``unused`` sections) from the ``config.yaml`` that
    ``run_dir`` ran under to the dataclass config ``cfg`` (``[]`` when it holds none)."""
    return significant_changes(changes_since(Path(run_dir) / "config.yaml", cfg, unused))


def prepare_run_directory(
    out_dir: Path, cfg: Any, resume: bool, overwrite: bool, allow_config_change: bool, is_main: bool = True,
    inputs: Sequence[Union[str, Path]] = (), unused: Sequence[str] = (),
) -> Optional[str]:
    """Check ``out_dir`` before a run under the dataclass config ``cfg`` starts; returns the earlier ``config.yaml``
    text when a resumed run accepts a changed config (the caller keeps it beside the new one), else ``None``.

    - ``out_dir`` an existing file: ``ValueError``.
    - ``out_dir`` holds a run (:data:`RUN_MARKERS`) and neither ``resume`` nor ``overwrite``: ``ValueError`` naming
      both flags (nothing is touched).
    - ``overwrite``: the run starts from step 0 and the old run directory is deleted when training starts
      (:meth:`Trainer.fit`, once the inputs have loaded); refused when one of the run's ``inputs`` (a stage-1 run,
      a latent cache, an image folder) lies in ``out_dir`` or holds it.
    - ``resume`` of a finished run whose checkpoint is gone: ``ValueError`` (it would restart from step 0).
    - ``resume`` with a config that differs from the run's ``config.yaml``: the differences are printed; changes
      beyond :data:`BOOKKEEPING_KEYS` need ``allow_config_change`` (changes of the model's shape are refused
      later, when the checkpoint's tensors do not fit: :meth:`Trainer.resume`). Keys the earlier config lacks
      (written by an older maetok) take their defaults, so a new key is not a change; keys under the prefixes
      ``unused`` (sections this run never reads) are no change either.
    """
    check_output_folder(out_dir)
    if resume and overwrite:
        raise ModelFolderError("pass --resume (continue the run) or --overwrite (delete it and start again), not both")
    if not holds_run(out_dir):
        return None
    if overwrite:
        out = out_dir.resolve()
        for source in inputs:
            path = Path(source).resolve()
            if path == out or out in path.parents or path in out.parents:
                raise ModelFolderError(f"--overwrite would delete {source}, an input of this run ({out_dir} holds it or lies "
                                       f"in it): choose another --out")
        return None
    if resume and (out_dir / MODEL_DIR / "config.json").exists() and not (out_dir / CHECKPOINT).exists():
        raise ModelFolderError(f"{out_dir} holds a finished run without {CHECKPOINT}: --resume cannot continue it (it would "
                               f"start again from step 0); pass --overwrite to train it again")
    if not resume:
        if (out_dir / MODEL_DIR / "config.json").exists():
            state = "a finished run"
        elif (out_dir / CHECKPOINT).exists():
            state = "an unfinished run with a checkpoint"
        else:
            state = "a run's files"
        raise ModelFolderError(f"{out_dir} already holds {state}: pass --resume to continue it, or --overwrite to delete "
                               f"it and start again (or choose another --out)")
    config_path = out_dir / "config.yaml"
    changes = changes_since(config_path, cfg, unused)
    if not changes:
        return None
    if is_main:
        print(f"[maetok] --resume: the config differs from {config_path}:")
        for key, old, new in changes:
            print(f"  {key}: {old!r} -> {new!r}")
    significant = [key for key, _, _ in significant_changes(changes)]
    if significant and not allow_config_change:
        raise ModelFolderError(f"--resume with a changed config ({', '.join(significant[:4])}"
                               f"{' ...' if len(significant) > 4 else ''}) of {config_path}: pass --allow-config-change to "
                               f"continue under the new values (the earlier config is kept beside it), or resume unchanged")
    return config_path.read_text()


def hold_run_directory(out_dir: Path, what: str, dist_info: DistInfo) -> Optional[FolderHold]:
    """Hold the run directory for this job (:func:`~maetok.runs.hold_folder`; ``what``: what it does): its main
    process holds it, and when another job holds it every process of this one is refused alike (the main process
    tells the others). Returns the main process's hold (``None`` on the others)."""
    hold, refusal = None, None
    if dist_info.is_main:
        try:
            hold = hold_folder(out_dir, what)
        except ModelFolderError as err:
            refusal = str(err)
    if dist_info.world_size > 1:
        shared = [refusal]
        dist.broadcast_object_list(shared, src=0)
        refusal = shared[0]
    if refusal is not None:
        raise ModelFolderError(refusal)
    return hold


def keep_earlier_config(out_dir: Path, earlier_text: str, step: int) -> Path:
    """Write the config a resumed run replaced to ``config.step<N>.yaml`` (``.2``, ``.3`` ... when taken)."""
    path = out_dir / f"config.step{step}.yaml"
    k = 2
    while path.exists():
        path = out_dir / f"config.step{step}.{k}.yaml"
        k += 1
    return write_text(path, earlier_text)


# ---------------------------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------------------------


def open_tensorboard(log_dir: Path, start_step: int) -> Optional[Any]:
    """A ``SummaryWriter`` on ``log_dir`` when the ``tensorboard`` package is installed (else None). On a resume
    (``start_step > 0``) events after ``start_step`` left by the interrupted run are purged."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(log_dir), purge_step=start_step if start_step > 0 else None)


class RunLog:
    """Appends rows to ``DIR/log.csv`` (header grows when new columns appear), drives a tqdm bar (rate, ETA),
    and mirrors every row and image grid to TensorBoard (``DIR/tensorboard``) when it is installed."""

    def __init__(self, path: Path, total_steps: int, start_step: int, enabled: bool = True, desc: str = "train"):
        self.path = path
        self.enabled = enabled
        self.rows: list[dict[str, float]] = []
        if enabled and path.exists():
            with path.open() as f:
                self.rows = [
                    {k: float(v) for k, v in row.items() if v not in ("", None)}
                    for row in csv.DictReader(f)
                    if float(row["step"]) <= start_step
                ]
        self.bar = None
        self.tensorboard = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True, smoothing=0.1)
            self.tensorboard = open_tensorboard(path.parent / "tensorboard", start_step)
        self._last_time = time.perf_counter()

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def log(self, row: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.rows.append(row)
        if self.bar is not None:
            shown = {k: f"{v:.4g}" for k, v in row.items() if k in ("loss", "img_per_s", "psnr", "lr")}
            self.bar.set_postfix(shown, refresh=False)
        if self.tensorboard is not None:
            step = int(row["step"])
            for key, value in row.items():
                if key != "step":
                    self.tensorboard.add_scalar(key, value, step)
            self.tensorboard.flush()
        columns: list[str] = []
        for r in self.rows:
            columns += [k for k in r if k not in columns]
        table = io.StringIO(newline="")
        writer = csv.DictWriter(table, fieldnames=columns)
        writer.writeheader()
        writer.writerows(self.rows)
        write_text(self.path, table.getvalue())  # the whole log, atomically: never a torn row

    def image(self, tag: str, grid: np.ndarray, step: int) -> None:
        """A uint8 image grid ``(H, W, C)`` (from :func:`maetok.data.make_image_grid`) to TensorBoard."""
        if self.tensorboard is not None:
            self.tensorboard.add_image(tag, grid, step, dataformats="HWC")
            self.tensorboard.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


# ---------------------------------------------------------------------------------------------------------
# Signals and silent processes
# ---------------------------------------------------------------------------------------------------------

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def raise_on_stop_signals() -> Optional[dict]:
    """From now on SIGINT and SIGTERM raise :class:`~maetok.errors.Interrupted`; returns the handlers they had (for
    :func:`restore_signal_handlers`), or ``None`` off the main thread (where Python cannot handle signals)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signal_number: int, _frame: Any) -> None:
        raise Interrupted(signal_number)

    return {number: signal.signal(number, stop) for number in STOP_SIGNALS}


def restore_signal_handlers(previous: Optional[dict]) -> None:
    for number, handler in (previous or {}).items():
        signal.signal(number, handler)


def is_collective_timeout(error: BaseException) -> bool:
    """Whether ``error`` is a collective that waited past the process group's timeout (gloo: "Timed out waiting")."""
    return dist.is_available() and dist.is_initialized() and bool(re.search(r"timed? ?out", str(error), re.IGNORECASE))


def silent_ranks(step: int, wait_s: float) -> Optional[list[int]]:
    """After a collective timed out: the ranks that do not answer, through the job's rendezvous store (each live
    process writes its rank there and waits up to ``wait_s`` seconds for the others'); ``None`` when the store cannot
    tell (it is unreachable)."""
    try:
        store = dist.distributed_c10d._get_default_store()
        keys = {rank: f"maetok/alive/step{step}/rank{rank}" for rank in range(dist.get_world_size())}
        store.set(keys[dist.get_rank()], "1")
        deadline = time.monotonic() + wait_s
        while True:
            silent = [rank for rank, key in keys.items() if not store.check([key])]
            if not silent or time.monotonic() > deadline:
                return silent
            time.sleep(0.2)
    except Exception:  # noqa: BLE001 - the store lives in a silent process, or this torch lacks it: cannot tell
        return None


# ---------------------------------------------------------------------------------------------------------
# The loop every trainer shares
# ---------------------------------------------------------------------------------------------------------

CHECKPOINT = Path("checkpoints") / "last.pt"


class Trainer:
    """Fit / checkpoint / resume / log, shared by the tokenizer and diffusion trainers.

    A subclass hands the base constructor everything it reads (the run's config, what the run reads, the
    sections of the config it never reads) in the call, then builds its data and model, calls
    :meth:`setup_optimization`, and implements :meth:`train_step` (one optimisation step on one
    :class:`~maetok.data.ItemBatch`, returning floats to log; draws for its rows: :meth:`sample_random`), :meth:`evaluate` (periodic, on the main process) and
    :meth:`export` (the final model directory). ``run_kind`` names the run in its checkpoints, so a checkpoint of
    another kind is never resumed.
    """

    run_kind = "run"

    def __init__(self, cfg: Any, out_dir: Union[str, Path], *, optim: OptimConfig, total_steps: int,
                 inputs: Sequence[Union[str, Path]], device: Optional[str], resume: bool = False,
                 overwrite: bool = False, allow_config_change: bool = False,
                 unused_config_sections: Sequence[str] = ()):
        """``cfg``: the run's dataclass config (with a ``train`` section), written to ``config.yaml`` and the
        checkpoints; ``optim`` / ``total_steps``: what this run optimises with and for how long; ``inputs``: what
        the run reads (a stage-1 run, a latent cache, an image folder), which ``--overwrite`` never deletes;
        ``unused_config_sections``: key prefixes of ``cfg`` this run never reads (changing them is no change).
        The run directory is checked here (:func:`prepare_run_directory`), before anything is built."""
        self.cfg = cfg
        self.inputs = [Path(path) for path in inputs]
        self.unused_config_sections = tuple(unused_config_sections)
        self.allow_config_change = allow_config_change
        self.out_dir = Path(out_dir)
        self.train_cfg: TrainConfig = cfg.train
        self.optim_cfg = optim
        self.total_steps = total_steps
        self.dist = setup_distributed(device, cfg.train.collective_timeout_s)
        self.device = self.dist.device
        # one job at a time in out_dir, held before anything there is read (released with the Trainer or the process)
        self.folder_hold = hold_run_directory(self.out_dir, f"training {self.run_kind}", self.dist)
        self.folder_released = False  # fit() lets the folder go when it ends, and takes it again
        # refuse to touch a finished run or to resume it under another config
        self.earlier_config = prepare_run_directory(
            self.out_dir, self.cfg, resume, overwrite, allow_config_change, self.dist.is_main, self.inputs,
            self.unused_config_sections,
        )
        self.delete_old_run = overwrite and holds_run(self.out_dir)  # in fit(), once everything has loaded
        self.nonfinite_in_a_row = 0
        self.checkpoint_step: Optional[int] = None  # the step of the checkpoint in out_dir (None: none yet)
        self.step = 0  # random draws: self.sample_random(batch), a function of (seed, step, global position)
        self.ema: Optional[EMA] = None
        self.run_log: Optional[RunLog] = None

    # -- to implement ------------------------------------------------------------------------------------

    train_set: Dataset

    def train_step(self, batch: Any) -> dict[str, float]:
        raise NotImplementedError

    def evaluate(self, step: int) -> dict[str, float]:
        return {}

    def save_grid(self, images: Tensor, path: Path, nrow: int, tag: str) -> Path:
        """Write an image grid ``(B, C, H, W)`` in [-1, 1] as a PNG, and to TensorBoard under ``tag``."""
        from maetok.data.images import make_image_grid, save_image_grid

        save_image_grid(images, path, nrow=nrow)
        if self.run_log is not None:
            self.run_log.image(tag, make_image_grid(images, nrow=nrow), self.step)
        return path

    @property
    def model_dir(self) -> Path:
        """Where the finished run's model folder goes (``out_dir/model``)."""
        return self.out_dir / MODEL_DIR

    def export(self) -> Path:
        """Write the model folder to :attr:`model_dir`; returns it."""
        raise NotImplementedError

    def config_dict(self) -> dict:
        """The run's config as written to ``config.yaml`` and the checkpoints."""
        return to_dict(self.cfg)

    def describe(self) -> str:
        return f"{self.run_kind}: {len(self.train_set)} training items; device {self.device}"

    def extra_state(self) -> dict:
        """Run-specific state to checkpoint beside model / EMA / optimizer (e.g. a discriminator)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    # -- shared machinery --------------------------------------------------------------------------------

    def setup_optimization(self, model: nn.Module, resume: bool) -> None:
        """Move the model to the device, build EMA and AdamW over its trainable parameters, resume if asked,
        then wrap it for DDP / torch.compile as ``self.ddp_model``.

        Parameters the model names in ``unused_in_training()`` (the mask token of a model that never masks)
        are left out of DDP's gradient reduction; any other trainable parameter without a gradient is an error
        DDP reports at the second step."""
        self.model = model.to(self.device)
        cfg = self.train_cfg
        self.ema = EMA(self.model, cfg.ema_decay, cfg.ema_warmup) if cfg.ema_decay > 0 else None
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_adamw(self.model.named_parameters(), self.optim_cfg)
        if resume:
            self.resume()
        self.ddp_model: nn.Module = self.model
        if self.dist.world_size > 1:
            self.ddp_model = wrap_ddp(self.model, self.device)
        if self.train_cfg.compile:
            self.ddp_model = torch.compile(self.ddp_model)

    def sample_random(self, batch: ItemBatch) -> SampleRandom:
        """The current step's per-sample draws for the rows of this process's ``batch`` (:func:`step_sample_random`;
        a row keeps its draws when another item of the batch was left out)."""
        local_batch_size = self.train_cfg.batch_size // self.dist.world_size
        return step_sample_random(self.train_cfg.seed, self.step, local_batch_size, self.dist, batch.slots)

    def lr_factor(self) -> float:
        """The schedule's factor (warmup, then cosine or constant) at the current step."""
        return lr_factor(self.step, self.optim_cfg, self.total_steps)

    def current_lr(self) -> float:
        return self.optim_cfg.lr * self.lr_factor()

    def optimizer_step(self, loss: Tensor) -> dict[str, float]:
        """Backward, clip, step, EMA; returns the gradient norm (when clipping) and the learning rate."""
        lr = self.current_lr()
        set_lr(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        logs = {"lr": lr}
        clip = self.optim_cfg.grad_clip if self.optim_cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, clip)
        if not all_finite_everywhere(loss, grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            self.skip_nonfinite_step(loss)
            return logs | {"skipped": 1.0}
        self.nonfinite_in_a_row = 0
        if self.optim_cfg.grad_clip > 0:
            logs["grad_norm"] = grad_norm.item()
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model, self.step)
        return logs | {"skipped": 0.0}

    def skip_nonfinite_step(self, loss: Tensor) -> None:
        """Count a step whose loss or gradients were NaN / inf (its update is dropped); raise
        :class:`NonFiniteError` after ``train.max_nonfinite_steps`` of them in a row."""
        self.nonfinite_in_a_row += 1
        limit = self.train_cfg.max_nonfinite_steps
        if self.dist.is_main:
            print(f"[maetok] {self.run_kind} step {self.step + 1}: non-finite loss or gradients (loss "
                  f"{loss.detach().float().item():.4g}); the step is skipped ({self.nonfinite_in_a_row} of {limit} "
                  "allowed in a row)", flush=True)
        if self.nonfinite_in_a_row >= limit:
            checkpoint = self.out_dir / CHECKPOINT
            kept = f"{checkpoint} is intact" if checkpoint.exists() else "no checkpoint was written"
            raise NonFiniteError(
                f"{self.run_kind} stopped at step {self.step + 1}: the loss or its gradients were NaN / inf in "
                f"{limit} steps in a row (train.max_nonfinite_steps); nothing non-finite was saved and {kept}. "
                f"Lower optim.lr (now {self.optim_cfg.lr:g}) or set optim.grad_clip, then --resume "
                f"--allow-config-change"
            )

    def ema_or_live_state(self) -> dict[str, Tensor]:
        return self.ema.state_dict() if self.ema is not None else self.model.state_dict()

    def save_checkpoint(self) -> None:
        """Rank 0 writes the state every process holds alike (model, EMA, optimizer, discriminator). There is no
        random-generator state: every draw is a function of (seed, step, global position)."""
        if not self.dist.is_main:
            self.checkpoint_step = self.step  # the step rank 0 writes
            return
        check_finite_tensors(self.model.state_dict(), f"{self.run_kind} model at step {self.step}")
        if self.ema is not None:
            check_finite_tensors(self.ema.state_dict(), f"{self.run_kind} EMA at step {self.step}")
        state = {
            FORMAT_KEY: FORMAT_VERSION,
            "kind": self.run_kind,
            "step": self.step,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "extra": self.extra_state(),
            "config": self.config_dict(),
        }
        save_torch(state, self.out_dir / CHECKPOINT)  # atomic: a failed save leaves the previous one intact
        self.checkpoint_step = self.step

    def resume(self) -> None:
        path = self.out_dir / CHECKPOINT
        if not path.exists():
            if self.dist.is_main:
                print(f"[maetok] nothing to resume: no checkpoint at {path}, starting from step 0")
            return
        state = load_checkpoint(path)
        if state.get("kind") != self.run_kind:
            raise ModelFolderError(f"{path} is a {state.get('kind')!r} checkpoint, this run is {self.run_kind!r}")
        self.check_checkpoint_config(state.get("config"), path)
        self.check_resumable_shapes(state["model"], path)
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.load_extra_state(state["extra"])
        # checkpoints written before the per-sample draws hold the states of per-process generators under
        # "generator": nothing reads them now, and any number of processes may resume any checkpoint
        self.step = self.checkpoint_step = int(state["step"])
        if self.dist.is_main:
            print(f"[maetok] resumed from {path} at step {self.step}")

    def kept_checkpoint(self) -> str:
        """What a stopped run leaves to resume from, in words."""
        if self.checkpoint_step is None:
            return "no checkpoint was written yet (a resumed run starts from step 0)"
        return f"{self.out_dir / CHECKPOINT} (step {self.checkpoint_step}) is kept"

    def silent_process_error(self) -> ProcessGroupError:
        """The error that ends every live process of the job when a collective timed out: which ranks do not answer
        (:func:`silent_ranks`), after how long, and what is kept."""
        timeout = self.train_cfg.collective_timeout_s
        silent = silent_ranks(self.step, min(timeout, 30.0))
        who = (f"rank {', '.join(map(str, silent))} of {self.dist.world_size}" if silent
               else f"a process of the {self.dist.world_size}")
        return ProcessGroupError(
            f"{self.run_kind} step {self.step + 1}: {who} did not answer for {timeout:g} s (train.collective_timeout_s;"
            f" stopped, stuck or unreachable), so every process ends; {self.kept_checkpoint()}: --resume once it is "
            f"fixed")

    def check_checkpoint_config(self, saved: Optional[dict], path: Path) -> None:
        """The run resumes under the config its checkpoint was trained with (its ``config.yaml`` may be another
        run's): changes beyond :data:`BOOKKEEPING_KEYS` need ``--allow-config-change``, as for ``config.yaml``."""
        if saved is None or self.allow_config_change:  # checkpoints always hold their config; fixtures may not
            return
        significant = significant_changes(changes_from(saved, self.cfg, self.unused_config_sections))
        if significant:
            shown = ", ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in significant[:3])
            raise ModelFolderError(f"--resume with a config other than the one {path} was trained with ({shown}"
                                   f"{' ...' if len(significant) > 3 else ''}): resume with that config, or pass "
                                   f"--allow-config-change")

    def check_resumable_shapes(self, saved: dict[str, Tensor], path: Path) -> None:
        """A checkpoint resumes only into a model of its shape: a changed width / depth / latent size ... is
        refused in one line (even with ``--allow-config-change``)."""
        ours = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
        try:
            check_state_keys(ours, {k: tuple(v.shape) for k, v in saved.items()}, path)
        except ValueError as err:
            raise ModelFolderError(f"cannot resume: the config changes the model's shape, {err}; start a new run "
                                   f"(another --out, or --overwrite)") from None

    def fit(self, stop_at: Optional[int] = None) -> Path:
        """Train to ``total_steps`` (or only up to ``stop_at``, checkpointing there: for time-limited jobs
        that continue with ``--resume``); export the final model when the run is complete. The run directory is
        held while it runs and let go when it ends, however it ends."""
        if self.folder_released:  # an earlier fit() let it go
            self.folder_hold = hold_run_directory(self.out_dir, f"training {self.run_kind}", self.dist)
            self.folder_released = False
        try:
            return self._fit(stop_at)
        finally:
            if self.folder_hold is not None:
                self.folder_hold.release()
            self.folder_released = True

    def _fit(self, stop_at: Optional[int]) -> Path:
        cfg, dist_info = self.train_cfg, self.dist
        if dist_info.is_main:
            if self.delete_old_run:
                print(f"[maetok] --overwrite: deleting the earlier run in {self.out_dir}")
                clear_held_folder(self.out_dir)
                self.delete_old_run = False
            self.out_dir.mkdir(parents=True, exist_ok=True)
            import yaml

            if self.earlier_config is not None:
                kept = keep_earlier_config(self.out_dir, self.earlier_config, self.step)
                print(f"[maetok] --allow-config-change: the earlier config is kept as {kept}")
                self.earlier_config = None
            write_text(self.out_dir / "config.yaml", yaml.safe_dump(self.config_dict(), sort_keys=False))
            print(f"[maetok] {self.describe()}")
        stream = batch_stream(self.train_set, cfg.batch_size, cfg.seed, self.step, dist_info, cfg.num_workers)
        log = RunLog(self.out_dir / "log.csv", self.total_steps, self.step, enabled=dist_info.is_main, desc=self.run_kind)
        self.run_log = log
        window_start, window_items, window_steps, sums = time.perf_counter(), 0, 0, {}
        self.model.train()
        end = min(self.total_steps, stop_at) if stop_at is not None else self.total_steps
        previous_handlers = raise_on_stop_signals()  # SIGINT / SIGTERM: one line on what is kept
        try:
            while self.step < end:
                batch = next(stream)
                if not len(batch.labels):
                    names = ", ".join(f"{item.file} ({item.reason})" for item in batch.skipped[:3])
                    raise DataError(f"{self.run_kind} step {self.step + 1}: every image of the batch was unreadable "
                                    f"({names}, ...): the dataset looks corrupt")
                logs = self.train_step(batch)
                self.step += 1
                window_items += len(batch.labels) * dist_info.world_size
                window_steps += 1
                for k, v in logs.items():
                    sums[k] = sums.get(k, 0.0) + v
                log.advance()
                last = self.step == self.total_steps
                do_eval = self.step % cfg.eval_every == 0 or last
                if self.step % cfg.log_every == 0 or do_eval:
                    elapsed = time.perf_counter() - window_start
                    row = mean_across_processes({k: v / window_steps for k, v in sums.items()}, self.device)
                    row.update(step=self.step, img_per_s=window_items / max(elapsed, 1e-9))
                    if do_eval and dist_info.is_main:
                        self.model.eval()
                        row.update(self.evaluate(self.step))
                        self.model.train()
                    log.log(row)
                    window_start, window_items, window_steps, sums = time.perf_counter(), 0, 0, {}
                if self.step % cfg.ckpt_every == 0 or last or self.step == end:
                    self.save_checkpoint()
        except Interrupted as stop:
            name = signal.Signals(stop.signal_number).name
            raise Interrupted(stop.signal_number, f"{self.run_kind} stopped by {name} at step {self.step}: "
                                                  f"{self.kept_checkpoint()}") from None
        except RuntimeError as err:
            if dist_info.world_size == 1 or not is_collective_timeout(err):
                raise
            raise self.silent_process_error() from None
        finally:
            restore_signal_handlers(previous_handlers)
            log.close()
            self.run_log = None
        if hasattr(self.train_set, "log_skipped"):
            self.train_set.log_skipped()
        if dist_info.is_main and self.step == self.total_steps:
            path = self.export()
            print(f"[maetok] {self.run_kind} done: saved to {path}")
        return self.model_dir
