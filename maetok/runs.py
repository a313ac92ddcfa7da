"""What every command needs about where things run and where they are written: the device, the layout of a run
directory, JSON files, and the format version stamped into every file the package writes.

A **run directory** is what a training command writes (``config.yaml``, ``log.csv``, ``checkpoints/last.pt``
and, once finished, ``model/``); a **model directory** is ``model/`` itself (``config.json`` +
``model.safetensors``). Every command that reads a model takes either: :func:`model_directory` is the one rule.

**Format versions.** ``config.json`` of tokenizer and diffusion models, training checkpoints and the metadata of
latent caches (``cache_plan.json``, ``stats.json``) carry ``"format_version": FORMAT_VERSION``. Files written
before versions existed read as version 0 and load unchanged (``tests/fixtures/v0``); a file from a newer maetok
is refused with a message naming it (:func:`check_format_version`). Version 2: a diffusion model's ``config.json``
holds its whole architecture under ``model`` (versions 0 / 1 kept the latent shape and classes beside a size
preset). Model folders themselves are read and written by :mod:`maetok.model_folders`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np
import torch

from maetok.errors import ConfigError, MaetokError, MissingFileError, ModelFolderError, NonFiniteError

PathLike = Union[str, Path]

#: The version of every file layout this package writes (bump it when a layout changes, and teach the readers).
FORMAT_VERSION = 2
FORMAT_KEY = "format_version"
MODEL_DIR = "model"
MODEL_CONFIG = "config.json"
MODEL_WEIGHTS = "model.safetensors"
#: the largest config / metadata file (JSON or YAML) read: ours are a few KB (a cache's skip list of a million files
#: ~100 MB would be the largest a user could make); a bigger one, or a device such as /dev/zero, is refused unread
MAX_CONFIG_BYTES = 256 * 2**20


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


def display_path(path: Union[PathLike, str]) -> str:
    """``path`` as printable text that JSON and UTF-8 files can hold: a file name that is not valid UTF-8 (bytes
    Python keeps as surrogates, e.g. ``b'\\xff.png'``) has its bad bytes written as ``\\xff``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def read_text_capped(path: PathLike, limit: int = MAX_CONFIG_BYTES, error: type[MaetokError] = ConfigError,
                     what_to_do: str = "") -> str:
    """The text of a config or metadata file, read only when it is a regular file (a link to one is followed) of at
    most ``limit`` bytes in UTF-8; otherwise ``error`` (a missing file: :class:`MissingFileError`) in one line naming
    it, with ``what_to_do`` appended. At most ``limit + 1`` bytes are ever read (a file that grows while read)."""
    path = Path(path)
    hint = f": {what_to_do}" if what_to_do else ""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise MissingFileError(f"{path} not found") from None
    except OSError as err:
        raise error(f"cannot read {path}: {err.strerror or err}{hint}") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "a device, pipe or socket"
        raise error(f"{path} is {kind}, not a file{hint}")
    if info.st_size > limit:
        raise error(f"{path} is {info.st_size} bytes, more than the {limit} a config or metadata file may hold{hint}")
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    except OSError as err:
        raise error(f"cannot read {path}: {err.strerror or err}{hint}") from None
    if len(data) > limit:
        raise error(f"{path} is more than the {limit} bytes a config or metadata file may hold{hint}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise error(f"{path} is not UTF-8 text (byte {err.start}){hint}") from None


def read_json_file(path: PathLike, error: type[MaetokError] = ConfigError, what_to_do: str = "") -> Any:
    """The JSON value in ``path`` (:func:`read_text_capped`); a truncated or corrupt file is ``error`` in one line
    naming it and what to do about it (``what_to_do``, e.g. "delete it and rerun cache-latents")."""
    text = read_text_capped(path, error=error, what_to_do=what_to_do)
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:
        reason = f"{err.msg} at line {err.lineno} column {err.colno}" if isinstance(err, json.JSONDecodeError) \
            else "nested too deeply"
        raise error(f"{path} is not valid JSON (truncated or corrupt? {reason})"
                    + (f": {what_to_do}" if what_to_do else "")) from None


def jsonable(value: Any) -> Any:
    """numpy scalars / arrays, Paths and non-finite floats -> plain JSON values (NaN and inf become None; a file name
    that is not UTF-8 is escaped: :func:`display_path`)."""
    if isinstance(value, Mapping):
        return {jsonable(str(k)): jsonable(v) for k, v in value.items()}
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
        return display_path(value)
    if isinstance(value, str):
        return display_path(value) if any("\udc80" <= c <= "\udcff" for c in value) else value
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
