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

**Files are written whole or not at all.** Every file a later command trusts (checkpoints, model folders, run
configs, latent caches, samples, evaluation and demo results) goes through :func:`atomic_path`: written to a
temporary name in its folder, flushed to disk and renamed, the temporary file removed on any failure. A full disk
or quota (``ENOSPC`` / ``EDQUOT``, also when torch or safetensors report it in their own words) becomes one
:class:`~maetok.errors.DiskFullError` naming the folder, the bytes needed where known and the bytes free
(:func:`disk_full_error`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import hashlib
import json
import math
import os
import secrets
import shutil
import stat
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator, Mapping, Optional, Union

import numpy as np
import torch

from maetok.errors import ConfigError, DiskFullError, MaetokError, MissingFileError, ModelFolderError, NonFiniteError

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


#: the errno values of a full disk or quota
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
#: how torch / safetensors word a full disk when they raise their own exception types (safetensors quotes the
#: OS error; torch's zip writer only says "unexpected pos", so a failed write also counts as a full disk when the
#: folder has less than DISK_FULL_MARGIN bytes free)
DISK_FULL_WORDS = ("no space left on device", "disk quota exceeded", "os error 28", "os error 122")
DISK_FULL_MARGIN = 64 * 1024


def format_bytes(count: int) -> str:
    """``512`` -> ``'512 B'``, ``1536`` -> ``'1.5 KiB'`` (up to GiB)."""
    if count < 1024:
        return f"{count} B"
    value = count / 1024
    for unit in ("KiB", "MiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def disk_full_error(error: BaseException, folder: Optional[PathLike] = None,
                    needed_bytes: Optional[int] = None) -> Optional[DiskFullError]:
    """The one-line :class:`DiskFullError` for ``error`` when it is a full disk or quota (an ``OSError`` with
    ``ENOSPC`` / ``EDQUOT`` anywhere in its chain, or torch's or safetensors' own words for it); None for any other
    error. ``folder``: where a write failed (:func:`atomic_path`), also the test of last resort: a failed write into
    a folder with less than :data:`DISK_FULL_MARGIN` bytes free is a full disk; without it the folder is that of the
    file the ``OSError`` names. ``needed_bytes``: the size of the file being written, where known."""
    if isinstance(error, DiskFullError):
        return error
    if not isinstance(error, Exception):  # KeyboardInterrupt, SystemExit: never a disk error
        return None
    chain: list[BaseException] = []
    link: Optional[BaseException] = error
    while link is not None and link not in chain:
        chain.append(link)
        link = link.__cause__ or link.__context__
    full = any(isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS for e in chain) or \
        any(word in str(e).lower() for e in chain for word in DISK_FULL_WORDS)
    if not full and folder is None:
        return None
    if folder is None:
        named = [e.filename for e in chain if isinstance(e, OSError) and e.filename]
        folder = Path(os.fsdecode(named[0])).parent if named else None
    try:
        free: Optional[int] = shutil.disk_usage(folder).free if folder is not None else None
    except OSError:
        free = None
    if not full and (free is None or free >= DISK_FULL_MARGIN or isinstance(error, (ValueError, TypeError))):
        return None
    where = f"the disk of {folder}" if folder is not None else "the disk"
    needed = f"{format_bytes(needed_bytes)} needed, " if needed_bytes is not None else ""
    free_text = f"{format_bytes(free)} free" if free is not None else "free space unknown"
    full_error = DiskFullError(f"no space left on {where} ({needed}{free_text}): free some space or write elsewhere")
    full_error.errno = errno.ENOSPC
    return full_error


@contextlib.contextmanager
def atomic_path(final: PathLike, needed_bytes: Optional[int] = None) -> Iterator[Path]:
    """A temporary path beside ``final`` to write to: on success it is flushed to disk (fsync) and renamed to
    ``final``, so a reader never sees half a file; on any failure it is removed and ``final`` is left as it was
    (an earlier version stays intact). A full disk raises :class:`DiskFullError` (:func:`disk_full_error`;
    ``needed_bytes``: the file's size where known, for the message). The temporary name starts with a dot and
    ends with ``.tmp``, so no reader takes it for a finished file."""
    final = Path(final)
    folder = final.parent
    tmp = folder / f".{final.name}.{secrets.token_hex(4)}.tmp"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask's permissions, as open() gives
    except OSError as err:
        raise (disk_full_error(err, folder, needed_bytes) or err) from None
    try:
        yield tmp
        with open(tmp, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(tmp, final)
    except BaseException as err:
        full = disk_full_error(err, folder, needed_bytes)  # before the removal frees the partial file's space
        tmp.unlink(missing_ok=True)
        if full is None:
            raise
        # the failed writer's frames hold its file open (torch's zip writer, in a reference cycle), and with it the
        # space of the removed temporary file: release them now
        link: Optional[BaseException] = err
        while link is not None:
            traceback.clear_frames(link.__traceback__)
            link = link.__context__
        gc.collect()
        raise full from err


def write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_path`); returns the path."""
    with atomic_path(path, len(data)) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_path`); returns the path."""
    return write_bytes(path, text.encode())


def tensor_bytes(obj: Any) -> int:
    """The bytes of every tensor / array in a nested structure (dicts, lists, tuples): a file's size estimate."""
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return int(obj.nbytes)
    if isinstance(obj, Mapping):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def save_torch(obj: Any, path: PathLike) -> Path:
    """``torch.save`` to ``path`` atomically (:func:`atomic_path`; checkpoints, tensors for later phases)."""
    with atomic_path(path, tensor_bytes(obj)) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: PathLike,
                     metadata: Optional[Mapping[str, str]] = None) -> Path:
    """A safetensors file (contiguous CPU tensors, string ``metadata``) written atomically (:func:`atomic_path`)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path, tensor_bytes(tensors)) as tmp:
        save_file(tensors, str(tmp), metadata=dict(metadata) if metadata is not None else None)
    return Path(path)


def save_npz(path: PathLike, arrays: Mapping[str, np.ndarray]) -> Path:
    """``np.savez`` of ``arrays`` to exactly ``path`` (no suffix appended), atomically (:func:`atomic_path`)."""
    with atomic_path(path, tensor_bytes(arrays)) as tmp, open(tmp, "wb") as file:
        np.savez(file, **arrays)
    return Path(path)


def write_json(path: PathLike, data: Mapping[str, Any]) -> Path:
    """Write ``data`` as indented JSON (numpy values converted, NaN / inf as null), atomically
    (:func:`atomic_path`); returns the path."""
    return write_text(path, json.dumps(jsonable(data), indent=2) + "\n")
