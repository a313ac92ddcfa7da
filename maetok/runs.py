"""What every command needs about where things run and where they are written: the device, the layout of a run
directory, JSON files, and the format version stamped into every file the package writes.

A **run directory** is what a training command writes (``config.yaml``, ``log.csv``, ``checkpoints/last.pt``
and, once finished, ``model/``); a **model directory** is ``model/`` itself (``config.json`` +
``model.safetensors``). Every command that reads a model takes either: :func:`model_directory` is the one rule.

**Format versions.** ``config.json`` of tokenizer and diffusion models, training checkpoints and the metadata of
latent caches (``cache_plan.json``, ``stats.json``) carry ``"format_version": FORMAT_VERSION``. Files written
before versions existed read as version 0 and load unchanged (``tests/fixtures/v0``); a file from a newer maetok
is refused with a message naming it (:func:`check_format_version`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np
import torch
from safetensors.torch import load_file, save_file

PathLike = Union[str, Path]

logger = logging.getLogger(__name__)

#: The version of every file layout this package writes (bump it when a layout changes, and teach the readers).
FORMAT_VERSION = 1
FORMAT_KEY = "format_version"
MODEL_DIR = "model"
MODEL_CONFIG = "config.json"
MODEL_WEIGHTS = "model.safetensors"


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name when empty): for one-line errors."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def resolve_device(device: Optional[Union[str, torch.device]] = None) -> torch.device:
    """``device`` as a :class:`torch.device`; by default the first GPU when there is one, else the CPU. A device
    this machine lacks (``cuda`` without a GPU, ``cuda:3`` with two) raises ``ValueError`` naming it."""
    if device is None or device == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device name (cpu, cuda, cuda:1, mps ...)") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build of torch" if torch.version.cuda is None else f"torch built for CUDA {torch.version.cuda}"
            raise ValueError(f"--device {device}: no CUDA GPU is available on this machine ({build}); use --device cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available on this machine; use --device cpu")
    return resolved


def check_output_folder(path: PathLike, flag: str = "--out") -> Path:
    """``path`` as a folder to write into: it may exist as a folder or not at all; an existing file raises
    ``ValueError`` naming it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is an existing file, not a folder: name a folder to write into")
    return path


def check_finite_tensors(tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise ``ValueError`` naming ``source`` and the first tensors holding NaN / inf (a diverged model is never
    written, and never sampled from or evaluated)."""
    bad = [name for name, t in tensors.items()
           if t.is_floating_point() and not t.is_meta and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"{source} holds non-finite values (NaN / inf) in {len(bad)} tensor(s), e.g. "
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
        raise ValueError(f"{source}: {FORMAT_KEY} must be a non-negative integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(f"{source} has {FORMAT_KEY} {version}, written by a newer maetok (this one reads up to "
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


# ---------------------------------------------------------------------------------------------------------
# Model folders: config.json + model.safetensors
# ---------------------------------------------------------------------------------------------------------


def save_model_folder(directory: PathLike, model_type: str, config: Mapping[str, Any],
                      state_dict: Mapping[str, torch.Tensor]) -> Path:
    """Write a model folder: ``model.safetensors`` (``state_dict`` on the CPU; no pickles), then ``config.json``
    (``model_type``, the format version and ``config``), both through a temporary file and a rename. The config is
    written last, so its presence means the folder is complete. Returns the directory."""
    directory = Path(directory)
    check_finite_tensors(state_dict, f"the {model_type} to be saved to {directory}")
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (MODEL_WEIGHTS + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(tmp), metadata={"format": "pt"})
    tmp.replace(directory / MODEL_WEIGHTS)
    write_json(directory / MODEL_CONFIG, {"model_type": model_type, FORMAT_KEY: FORMAT_VERSION, **config}, atomic=True)
    return directory


def read_config_json(path: PathLike, what: str) -> tuple[Path, dict[str, Any]]:
    """``(model directory, config.json as written)`` of the folder ``path`` names (itself, or the ``model/`` of a run
    directory), in any format (ours or the authors'). A missing file, invalid JSON or a non-object raise one line
    naming the file; ``what`` names the kind of model."""
    from maetok.config import ConfigError

    directory = model_directory(path)
    config_path = directory / MODEL_CONFIG
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} not found: a {what} directory holds {MODEL_CONFIG} and {MODEL_WEIGHTS}")
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{config_path} is not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{config_path} must hold a JSON object")
    return directory, raw


def read_model_config(path: PathLike, model_type: str, what: str) -> tuple[Path, dict[str, Any]]:
    """``(model directory, config)`` of the model folder ``path`` names (itself, or the ``model/`` of a run
    directory): ``config.json`` without its ``model_type`` (absent: ``model_type`` is assumed) and format version.
    ``what`` names the kind of model in the errors (missing file, invalid JSON, newer version, another type)."""
    from maetok.config import ConfigError

    directory, raw = read_config_json(path, what)
    config_path = directory / MODEL_CONFIG
    check_format_version(raw, config_path)
    raw.pop(FORMAT_KEY, None)
    found = raw.pop("model_type", model_type)
    if found != model_type:
        raise ConfigError(f"{config_path}: model_type {found!r} is not a maetok {what}")
    return directory, raw


def read_safetensors(path: PathLike, map_location: str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; a missing file raises ``FileNotFoundError``, a truncated or corrupt one
    a one-line ``ValueError`` naming it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    try:
        return load_file(str(path), device=map_location)
    except Exception as err:  # safetensors raises its own SafetensorError (and OSError / ValueError) on bad files
        first = first_line(err)
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {first}") from None


def safetensors_shapes(path: PathLike) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of a safetensors file, read from its header only (no tensor is loaded)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except Exception as err:
        first = first_line(err)
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {first}") from None


#: how many names a key-mismatch error line shows per kind (the full list goes to stderr)
MISMATCH_NAMES_SHOWN = 3


def check_state_keys(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]],
                     source: PathLike, model_name: str = "the model") -> None:
    """Strict key check of a checkpoint: ``found`` (name -> shape, from ``source``) must hold exactly the names
    of ``expected`` (the model's), with the same shapes. Otherwise the full list of differences goes to the log
    (``maetok.runs``, on stderr by default) and a ``ValueError`` of one line gives the counts of missing, unexpected
    and mis-shaped keys with the first few names of each."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = [k for k in sorted(set(expected) & set(found)) if tuple(expected[k]) != tuple(found[k])]
    if not (missing or unexpected or misshaped):
        return
    described = {
        "missing": missing,
        "unexpected": unexpected,
        "mis-shaped": [f"{k} (file {list(found[k])}, model {list(expected[k])})" for k in misshaped],
    }
    logger.error("%s does not match %s:\n%s", source, model_name,
                 "\n".join(f"  {kind}: {name}" for kind, names in described.items() for name in names))
    parts = []
    for kind, names in described.items():
        if names:
            more = ", ..." if len(names) > MISMATCH_NAMES_SHOWN else ""
            parts.append(f"{len(names)} {kind} ({', '.join(names[:MISMATCH_NAMES_SHOWN])}{more})")
    raise ValueError(f"{source} does not match {model_name}: {'; '.join(parts)} (the full list is in the log)")


def load_state_strict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: PathLike) -> torch.nn.Module:
    """Load ``state`` into ``model`` only if every key and shape matches (:func:`check_state_keys`): nothing
    loads partially; and only finite weights (a diverged model is never sampled from or evaluated). Values are
    cast to the model's dtypes."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_state_keys(expected, {k: tuple(v.shape) for k, v in state.items()}, source, type(model).__name__)
    check_finite_tensors(state, str(source))
    model.load_state_dict(state, strict=True)
    return model


def load_model_weights(model: torch.nn.Module, directory: PathLike, map_location: str = "cpu") -> torch.nn.Module:
    """Load ``directory/model.safetensors`` into ``model``, strictly: a missing, truncated or mismatching file
    (another preset's weights: mis-shaped keys) raises one line naming the file (:func:`load_state_strict`)."""
    weights = Path(directory) / MODEL_WEIGHTS
    return load_state_strict(model, read_safetensors(weights, map_location), weights)


def require_config_fields(config: Mapping[str, Any], fields: Any, source: PathLike) -> None:
    """``ConfigError`` naming ``source`` and the first field of ``fields`` that ``config`` lacks (and how many more)."""
    from maetok.config import ConfigError

    missing = [name for name in fields if name not in config]
    if missing:
        more = f" (and {len(missing) - 1} more: {', '.join(missing[1:])})" if len(missing) > 1 else ""
        raise ConfigError(f"{source} lacks the field {missing[0]!r}{more}")
