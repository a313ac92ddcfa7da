"""The errors a user causes, and only those, under one base class: :class:`MaetokError`.

``maetok`` (:func:`maetok.cli.main`) prints a :class:`MaetokError` as one line, ``maetok <command>: error: ...``, and
exits with status 2; any other exception is a bug in maetok and keeps its traceback (with a line asking for a bug
report). Each message says what is wrong and where: the file, the key, the shape or the value.

Each class also derives from the built-in exception a caller would catch for it (``ValueError`` or
``FileNotFoundError``), so ``except ValueError`` keeps working around maetok's calls.
"""

from __future__ import annotations


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name when empty): what a one-line error shows."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class MaetokError(Exception):
    """An error the user caused (input, configuration, files, environment); the message is one line saying what
    to fix."""


class ConfigError(MaetokError, ValueError):
    """A configuration value, key or command-line flag is wrong; the message names it."""


class DataError(MaetokError, ValueError):
    """Input data is unusable: an image folder, an image file, a reference batch, a latent cache."""


class ModelFolderError(MaetokError, ValueError):
    """A model folder, a training checkpoint or a run directory is unusable or would be overwritten: a missing or
    extra weight, a wrong shape, a truncated file, a newer format, a finished run."""


class MissingFileError(MaetokError, FileNotFoundError):
    """A file or folder the user named (or that a named folder must hold) does not exist."""


class AssetError(MaetokError, FileNotFoundError):
    """Weights an evaluation or a target needs (Inception, VGG16, DINOv2, ...) are not installed or not found."""


class NonFiniteError(MaetokError, ValueError):
    """Training or a model produced NaN / inf (a diverged run, non-finite weights): nothing non-finite is written
    or loaded."""


class DiskFullError(MaetokError, OSError):
    """The disk (or the user's quota) is full while writing: the message names the folder, the bytes the file
    needed where known and the bytes free. Nothing partial is left under a final name
    (:func:`maetok.runs.atomic_path`)."""


class ProcessGroupError(MaetokError, RuntimeError):
    """A process of a ``torchrun`` job stopped answering (stopped, stuck, unreachable): every other process ends
    with a line naming it once ``train.collective_timeout_s`` has passed."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped a command: a ``KeyboardInterrupt`` (no ``except Exception`` swallows it, and
    ``except KeyboardInterrupt`` still catches Ctrl-C); its message says what is kept, and ``exit_status`` is
    ``128 + the signal's number`` (130, 143)."""

    def __init__(self, signal_number: int, message: str = ""):
        super().__init__(message or f"stopped by signal {signal_number}")
        self.signal_number = signal_number
        self.exit_status = 128 + signal_number
