"""What every command needs about where things run and where they are written: the device, the layout of a run
directory, JSON files, and the format version stamped into every file the package writes.

A **run directory** is what a training command writes (``config.yaml``, ``log.csv``, ``checkpoints/last.pt``
and, once finished, ``model/``); a **model directory** is ``model/`` itself (``config.json`` +
``model.safetensors``). Every command that reads a model takes either: :func:`model_directory` is the one rule.
A command writing into a folder (a run directory, a latent cache, samples) holds it (:func:`hold_folder`): one
process at a time.

**Format versions.** ``config.json`` of tokenizer and diffusion models, training checkpoints and the metadata of
latent caches (``cache_plan.json``, ``stats.json``) carry ``"format_version": FORMAT_VERSION``. Files written
before versions existed read as version 0 and load unchanged (``tests/fixtures/v0``); a file from a newer maetok
is refused with a message naming it (:func:`check_format_version`). Version 2: a diffusion model's ``config.json``
holds its whole architecture under ``model`` (versions 0 / 1 kept the latent shape and classes beside a size
preset). Model folders themselves are read and written by :mod:`maetok.model_folders`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from dataclasses import dataclass
from typing import IO, Any, Mapping, Optional, Union

import numpy as np
import torch

from maetok.errors import ConfigError, ModelFolderError, NonFiniteError

PathLike = Union[str, Path]

#: The version of every file layout this package writes (bump it when a layout changes, and teach the readers).
FORMAT_VERSION = 2
FORMAT_KEY = "format_version"
MODEL_DIR = "model"
MODEL_CONFIG = "config.json"
MODEL_WEIGHTS = "model.safetensors"


def resolve_device(device: Optional[Union[str, torch.device]] = None) -> torch.device:
    """``device`` as a :class:`torch.device`; by default the first GPU when there is one, else the CPU. A device
    this machine lacks (``cuda`` without a GPU, ``cuda:3`` with two) raises ``ValueError`` naming it."""
    if device is None or device == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device!r} is not a device name (cpu, cuda, cuda:1, mps ...)") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build of torch" if torch.version.cuda is None else f"torch built for CUDA {torch.version.cuda}"
            raise ConfigError(f"--device {device}: no CUDA GPU is available on this machine ({build}); use --device cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {device}: MPS is not available on this machine; use --device cpu")
    return resolved


def check_output_folder(path: PathLike, flag: str = "--out") -> Path:
    """``path`` as a folder to write into: it may exist as a folder or not at all; an existing file raises
    ``ValueError`` naming it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path} is an existing file, not a folder: name a folder to write into")
    return path


def check_apart(out: PathLike, data: PathLike, out_flag: str = "--out", data_flag: str = "--data") -> None:
    """Refuse an output folder inside the data folder ``data`` or holding it (real paths compared): what a run writes
    (its PNG grids, a cache) would become rows of its own dataset. ``data`` that is no existing folder (a dataset
    name such as ``fashion-mnist``) is never refused."""
    data_path = Path(data)
    if not data_path.is_dir():
        return
    real_out, real_data = Path(out).resolve(), data_path.resolve()
    if real_out == real_data or real_data in real_out.parents or real_out in real_data.parents:
        raise ConfigError(f"{out_flag} {out} and {data_flag} {data} overlap (one lies in the other): what is written "
                          f"there would be read as data; write to a folder outside {data}")


#: The lock file of a folder held by a process (:func:`hold_folder`); it holds the holder's PID and what it runs.
LOCK_NAME = ".maetok.lock"


@dataclass
class _Lock:
    """A folder's lock as a process holds it: the locked file, how many holds share it, whether the first hold
    created the folder (removed again if left empty) and the PID that locked it (a forked child inherits the entry)."""

    file: IO[str]
    holds: int
    created_folder: bool
    pid: int


_held_folders: dict[Path, _Lock] = {}  # real path -> its lock in this process


class FolderHold:
    """This process's hold on a folder (:func:`hold_folder`): :meth:`release` (or leaving its ``with`` block, or the
    end of the process, even by ``kill -9``) lets it go."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.held = True

    def release(self) -> None:
        """Let the folder go (its lock file is removed when this process holds it no more)."""
        if not self.held:
            return
        self.held = False
        lock = _held_folders.get(self.folder)
        if lock is None or lock.pid != os.getpid():  # a forked child (a data-loader worker) never lets go
            return
        lock.holds -= 1
        if lock.holds == 0:
            del _held_folders[self.folder]
            with contextlib.suppress(OSError):
                os.unlink(self.folder / LOCK_NAME)  # before unlocking: a waiting process then sees another file
            lock.file.close()
            if lock.created_folder:  # removed when nothing was written into it
                with contextlib.suppress(OSError):
                    self.folder.rmdir()

    def __enter__(self) -> "FolderHold":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.release()


def hold_folder(folder: PathLike, what: str, flag: str = "--out") -> FolderHold:
    """Hold ``folder`` (created if missing) for this process, so that no other process writes into it meanwhile: an
    OS lock (``flock``) on ``folder/.maetok.lock``, which dies with its process (``kill -9`` leaves no stale lock).
    ``what`` (e.g. ``"caching latents"``) is written beside the PID for the message another process gets: a folder
    held by another process raises :class:`~maetok.errors.ModelFolderError` naming its PID. This process may hold a
    folder several times (each hold released on its own)."""
    folder = check_output_folder(folder, flag)
    real = folder.resolve()
    held = _held_folders.get(real)
    if held is not None and held.pid == os.getpid():
        held.holds += 1
        return FolderHold(real)
    created = not folder.exists()
    while True:  # until the file we lock is the one at the path (a releasing holder removes it)
        folder.mkdir(parents=True, exist_ok=True)
        try:
            lock_file = open(real / LOCK_NAME, "a+")
        except FileNotFoundError:  # the folder was removed in between
            continue
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.seek(0)
            holder = lock_file.read().strip() or "a process starting up"
            lock_file.close()
            raise ModelFolderError(f"{flag} {folder} is in use by another maetok process ({holder}): wait for it to "
                                   f"end, or choose another {flag}") from None
        try:
            same_file = os.stat(real / LOCK_NAME).st_ino == os.fstat(lock_file.fileno()).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:
            break
        lock_file.close()
    lock_file.truncate(0)
    lock_file.write(f"pid {os.getpid()}, {what}\n")
    lock_file.flush()
    _held_folders[real] = _Lock(lock_file, 1, created, os.getpid())
    return FolderHold(real)


def clear_held_folder(folder: PathLike) -> None:
    """Delete everything in ``folder`` but its lock file (``--overwrite`` of a folder this process holds)."""
    for entry in Path(folder).iterdir():
        if entry.name == LOCK_NAME:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def check_finite_tensors(tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise ``ValueError`` naming ``source`` and the first tensors holding NaN / inf (a diverged model is never
    written, and never sampled from or evaluated)."""
    bad = [name for name, t in tensors.items()
           if t.is_floating_point() and not t.is_meta and not bool(torch.isfinite(t).all())]
    if bad:
        raise NonFiniteError(f"{source} holds non-finite values (NaN / inf) in {len(bad)} tensor(s), e.g. "
                             f"{', '.join(bad[:3])}: the model diverged")


def model_directory(path: PathLike) -> Path:
    """The model directory that ``path`` names: ``path`` itself, or the ``model/`` of the run directory ``path``."""
    path = Path(path)
    return path / MODEL_DIR if (path / MODEL_DIR / MODEL_CONFIG).exists() else path


def run_directory(path: PathLike) -> Path:
    """The run directory behind ``path``: ``path`` itself, or the parent of a run's ``model/`` folder."""
    path = Path(path)
    if path.name == MODEL_DIR and (path.parent / "checkpoints").is_dir():
        return path.parent
    return path


def is_finished(run_dir: PathLike) -> bool:
    """Whether a training run directory holds its exported model (written last, once the run is complete)."""
    return (Path(run_dir) / MODEL_DIR / MODEL_CONFIG).exists()


def weights_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 (hex) of a model's state dict: names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_format_version(data: Mapping[str, Any], source: PathLike) -> int:
    """The format version of a file's content (0 when absent: written before versions existed); a version newer
    than this package's :data:`FORMAT_VERSION` raises ``ValueError`` naming ``source``."""
    version = data.get(FORMAT_KEY, 0)
    if not isinstance(version, int) or version < 0:
        raise ModelFolderError(f"{source}: {FORMAT_KEY} must be a non-negative integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ModelFolderError(f"{source} has {FORMAT_KEY} {version}, written by a newer maetok (this one reads up to "
                               f"{FORMAT_VERSION}): upgrade maetok to read it")
    return version


def jsonable(value: Any) -> Any:
    """numpy scalars / arrays, Paths and non-finite floats -> plain JSON values (NaN and inf become None)."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: PathLike, data: Mapping[str, Any], atomic: bool = False) -> Path:
    """Write ``data`` as indented JSON (numpy values converted, NaN / inf as null); returns the path. ``atomic``:
    through a temporary file and a rename, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(jsonable(data), indent=2) + "\n"
    if not atomic:
        path.write_text(text)
        return path
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path
