"""Image datasets: Fashion-MNIST from its IDX files, any folder of images, a stable hash split, hflip.

Every dataset returns ``(image, label)`` with ``image`` a float32 tensor (C, H, W) in [-1, 1] and ``label``
an int (``(image, label, caption)`` for ``ImageFolder(return_captions=True)``), and exposes
``num_classes`` (0 if unlabeled), ``class_names``, ``channels``, ``image_size`` and ``labels``
(int64 array of length ``len(dataset)``).

One bad-file policy: an item is what its file holds, and an unreadable file raises
:class:`~maetok.data.images.BadImageError` naming it (``ImageFolder[i]``). Every reader batches items through
:func:`item_loader`, where an unreadable file leaves no row and is reported (:class:`SkippedItem`), never replaced
by another image: :func:`iter_batches` reads a dataset in order (caches, measurements, :func:`load_images`), and the
training loop's batches leave such a file out of their step.

There is no random augmentation inside datasets: the training loop flips batches with draws keyed by (seed, step,
global position) (``maetok.train.loop.flip_mask``), so a resumed run replays the exact same flips.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from maetok.data.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    BadImageError,
    load_image,
    pixel_limit,
    resize_center_crop,
    to_rgb,
    to_tensor,
    to_uint8,
)
from maetok.errors import ConfigError, DataError, MissingFileError
from maetok.runs import display_path

__all__ = [
    "DatasetNotFoundError",
    "ImageDataset",
    "FashionMNIST",
    "ImageFolder",
    "FASHION_MNIST_CLASSES",
    "IMAGE_EXTENSIONS",
    "DEFAULT_FASHION_MNIST_ROOT",
    "FASHION_MNIST_ENV",
    "DEFAULT_HOLDOUT_FRACTION",
    "read_idx",
    "hash_split",
    "split_paths",
    "build_dataset",
    "DatasetSubset",
    "FolderScan",
    "draw_order",
    "balanced_order",
    "dataset_labels",
    "describe_draw",
    "DataShape",
    "data_shape",
    "data_shape_overrides",
    "note_channel_conversion",
    "image_headers",
    "ItemBatch",
    "SkippedItem",
    "list_image_files",
    "scan_image_folder",
    "subset_indices",
    "item_loader",
    "iter_batches",
    "log_skipped_items",
    "load_images",
    "dataset_images_uint8",
]

logger = logging.getLogger(__name__)

DEFAULT_FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV = "MAETOK_FASHION_MNIST"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
DEFAULT_HOLDOUT_FRACTION = 0.05
_MAX_WARNINGS_PER_PROCESS = 5


class DatasetNotFoundError(MissingFileError):
    """A dataset's files or folder are missing; the message says how to get them."""


class ImageDataset(Dataset):
    """Common attributes of maetok datasets (see module docstring)."""

    num_classes: int
    class_names: list[str]
    channels: int
    image_size: int
    labels: np.ndarray


def _normalise_split(split: str | None, allowed: Sequence[str]) -> str | None:
    if split is None:
        return None
    name = str(split).lower()
    if name == "val":
        name = "test"
    if name not in allowed:
        raise DataError(f"unknown split {split!r}: expected one of {', '.join(repr(a) for a in allowed)}")
    return name


# --------------------------------------------------------------------------------------------- IDX files

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike, expected_magic: int | None = None) -> np.ndarray:
    """Parse an IDX file (the MNIST / Fashion-MNIST format), gzip-compressed or raw (detected from the bytes).

    The header is a big-endian magic number ``0x0000TTNN`` (TT = element type, NN = number of dimensions)
    followed by NN big-endian uint32 sizes, then the data.

    Args:
        path: the file.
        expected_magic: if given, the exact magic number required (0x803 for images, 0x801 for labels).

    Returns:
        array of the file's shape and dtype (a read-only view of the decompressed bytes).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DatasetNotFoundError(f"cannot read IDX file '{path}': {error.strerror or error}") from None
    if raw[:2] == b"\x1f\x8b":  # gzip, whatever the file name says
        try:
            raw = zlib.decompress(raw, wbits=31)
        except zlib.error as error:
            raise DataError(f"IDX file '{path}' is a damaged gzip stream ({error})") from None
    if len(raw) < 4:
        raise DataError(f"IDX file '{path}' is too short ({len(raw)} bytes) to hold a header")
    magic = struct.unpack(">I", raw[:4])[0]
    if expected_magic is not None and magic != expected_magic:
        raise DataError(f"IDX file '{path}' has magic number 0x{magic:08x}, expected 0x{expected_magic:08x}")
    type_code, num_dims = raw[2], raw[3]
    if raw[0] != 0 or raw[1] != 0 or type_code not in _IDX_DTYPES or num_dims == 0:
        raise DataError(f"'{path}' is not an IDX file (magic number 0x{magic:08x})")
    header_bytes = 4 + 4 * num_dims
    if len(raw) < header_bytes:
        raise DataError(f"IDX file '{path}' is truncated inside its header")
    shape = struct.unpack(f">{num_dims}I", raw[4:header_bytes])
    dtype = _IDX_DTYPES[type_code]
    count = int(np.prod(shape, dtype=np.int64))
    expected_bytes = header_bytes + count * dtype.itemsize
    if len(raw) != expected_bytes:
        raise DataError(
            f"IDX file '{path}' has {len(raw)} bytes but its header (shape {shape}, {dtype}) needs {expected_bytes}"
        )
    return np.frombuffer(raw, dtype=dtype, count=count, offset=header_bytes).reshape(shape)


# ------------------------------------------------------------------------------------------ Fashion-MNIST


def _find_idx_file(root: Path, stem: str) -> Path | None:
    dotted = stem.replace("-idx", ".idx")
    for name in (f"{stem}.gz", stem, f"{dotted}.gz", dotted):
        candidate = root / name
        if candidate.is_file():
            return candidate
    return None


class FashionMNIST(ImageDataset):
    """Fashion-MNIST (60,000 train / 10,000 test, 28x28 gray, 10 classes) read from the original IDX files.

    Files are looked up in ``root``, else ``$MAETOK_FASHION_MNIST``, else ``/usr/share/datasets/fashion-mnist``
    (Debian package ``dataset-fashion-mnist``). All images are decoded once into one uint8 array (well under
    a second for the 60k training images).

    Images are zero-padded (centered, black, i.e. -1 after scaling) from 28x28 to ``image_size`` when
    ``image_size >= 28``, or resized (bicubic, antialiased) when smaller.

    Items: ``(image, label)``, image float32 (channels, image_size, image_size) in [-1, 1], label int 0..9.
    With ``channels=3`` the gray image is repeated over RGB. ``images`` holds the uint8 array (N, S, S).
    """

    def __init__(
        self,
        split: str = "train",
        root: str | os.PathLike | None = None,
        image_size: int = 32,
        channels: int = 1,
    ) -> None:
        split_name = _normalise_split(split, ("train", "test"))
        if channels not in (1, 3):
            raise DataError(f"channels must be 1 or 3, got {channels}")
        if image_size <= 0:
            raise DataError(f"image_size must be positive, got {image_size}")
        root_path = Path(root or os.environ.get(FASHION_MNIST_ENV) or DEFAULT_FASHION_MNIST_ROOT).expanduser()
        prefix = "train" if split_name == "train" else "t10k"
        images_file = _find_idx_file(root_path, f"{prefix}-images-idx3-ubyte")
        labels_file = _find_idx_file(root_path, f"{prefix}-labels-idx1-ubyte")
        if images_file is None or labels_file is None:
            missing = f"{prefix}-images-idx3-ubyte.gz" if images_file is None else f"{prefix}-labels-idx1-ubyte.gz"
            raise DatasetNotFoundError(
                f"Fashion-MNIST file '{missing}' not found in '{root_path}'. Install the dataset with "
                f"`apt-get install dataset-fashion-mnist` (files go to {DEFAULT_FASHION_MNIST_ROOT}), or point "
                f"${FASHION_MNIST_ENV} / root= at a folder holding the original IDX .gz files."
            )
        images = read_idx(images_file, expected_magic=0x00000803)
        labels = read_idx(labels_file, expected_magic=0x00000801)
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise DataError(f"'{images_file}' holds images of shape {images.shape[1:]}, expected (28, 28)")
        if len(images) != len(labels):
            raise DataError(f"'{images_file}' has {len(images)} images but '{labels_file}' has {len(labels)} labels")
        if len(labels) and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
            raise DataError(f"'{labels_file}' holds label {int(labels.max())}, expected 0..9")

        self.split = split_name
        self.root = root_path
        self.image_size = int(image_size)
        self.channels = int(channels)
        self.class_names = list(FASHION_MNIST_CLASSES)
        self.num_classes = len(self.class_names)
        self.labels = labels.astype(np.int64)
        self.images = self._fit_size(images, self.image_size)  # uint8 (N, S, S)

    @staticmethod
    def _fit_size(images: np.ndarray, size: int) -> np.ndarray:
        height = images.shape[1]
        if size == height:
            return np.array(images, dtype=np.uint8, copy=True)  # writable (the IDX view is read-only)
        if size > height:
            before = (size - height) // 2
            after = size - height - before
            return np.pad(images, ((0, 0), (before, after), (before, after)), mode="constant", constant_values=0)
        resized = np.empty((len(images), size, size), dtype=np.uint8)
        for start in range(0, len(images), 8192):
            chunk = torch.from_numpy(np.array(images[start : start + 8192], dtype=np.float32))[:, None]
            chunk = torch.nn.functional.interpolate(chunk, size=(size, size), mode="bicubic", antialias=True)
            resized[start : start + 8192] = chunk[:, 0].round().clamp(0, 255).to(torch.uint8).numpy()
        return resized

    def __len__(self) -> int:
        return len(self.labels)

    def _as_float(self, uint8_images: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(uint8_images)).to(torch.float32).div_(127.5).sub_(1.0)
        tensor = tensor.unsqueeze(-3)
        if self.channels == 3:
            tensor = tensor.expand(*tensor.shape[:-3], 3, *tensor.shape[-2:]).contiguous()
        return tensor

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for Fashion-MNIST {self.split} ({len(self)} images)")
        return self._as_float(self.images[index]), int(self.labels[index])

    def get_batch(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Vectorised access: images (B, channels, S, S) float32 in [-1, 1] and labels (B,) int64."""
        index_array = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices, dtype=np.int64)
        return self._as_float(self.images[index_array]), torch.from_numpy(self.labels[index_array])

    def __repr__(self) -> str:
        return (
            f"FashionMNIST(split={self.split!r}, root='{self.root}', image_size={self.image_size}, "
            f"channels={self.channels}, len={len(self)})"
        )


# ------------------------------------------------------------------------------------------------ split


def hash_split(relative_path: str, holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION) -> Literal["train", "test"]:
    """Deterministic train / held-out assignment of one file from its path relative to the dataset root.

    The SHA-1 of the '/'-separated relative path, read as a number in [0, 1), is compared with
    ``holdout_fraction``; the result never changes across runs or machines, nor when other files are added.
    """
    if not 0.0 <= holdout_fraction <= 1.0:
        raise DataError(f"holdout_fraction must be in [0, 1], got {holdout_fraction}")
    key = relative_path.replace(os.sep, "/").encode("utf-8", "surrogateescape")  # a name's own bytes, UTF-8 or not
    position = int.from_bytes(hashlib.sha1(key).digest()[:8], "big") / 2.0**64
    return "test" if position < holdout_fraction else "train"


def split_paths(
    relative_paths: Sequence[str], split: str, holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION
) -> list[int]:
    """Indices of ``relative_paths`` in ``split`` ('train', 'test' / 'val' or 'all') under ``hash_split``."""
    split_name = _normalise_split(split, ("train", "test", "all"))
    if split_name == "all":
        return list(range(len(relative_paths)))
    return [i for i, rel in enumerate(relative_paths) if hash_split(rel, holdout_fraction) == split_name]


# ------------------------------------------------------------------------------------------- ImageFolder


@dataclass
class FolderScan:
    """What :func:`scan_image_folder` found below ``root``.

    ``files``: the image files, '/'-joined paths relative to ``root``, sorted. ``left_out``: ``(relative path,
    kind)`` of each entry the scan did not follow, ``kind`` one of :data:`LEFT_OUT_KINDS`:

    * "dangling symlink": a link whose target does not exist;
    * "symlink loop": a link to a folder that contains the link (or a chain of links that never ends);
    * "duplicate folder link": a link to a folder already listed under another path (listed once, there);
    * "unreadable": a folder or entry the scan could not read (permissions, I/O error).
    """

    root: Path
    files: list[str] = field(default_factory=list)
    left_out: list[tuple[str, str]] = field(default_factory=list)

    def left_out_by_kind(self) -> dict[str, list[str]]:
        grouped: dict[str, list[str]] = {}
        for relative, kind in self.left_out:
            grouped.setdefault(kind, []).append(relative)
        return grouped

    def warn(self, max_names: int = 3) -> None:
        """One warning line per kind of left-out entry, with its count and first names."""
        for kind, names in sorted(self.left_out_by_kind().items()):
            shown = ", ".join(names[:max_names]) + (", ..." if len(names) > max_names else "")
            logger.warning("image folder '%s': left out %d %s(s): %s", self.root, len(names), kind, shown)


LEFT_OUT_KINDS = ("dangling symlink", "symlink loop", "duplicate folder link", "unreadable")


def scan_image_folder(
    folder: str | os.PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS, warn: bool = True
) -> FolderScan:
    """Every image file below ``folder`` (by extension, case-insensitive; hidden files and folders skipped).

    Each real folder is walked once, whatever number of paths lead to it: the folders reached without
    symlinks first, then the symlinked folders in sorted order of their paths; a link to a folder already walked
    (identified by ``(st_dev, st_ino)``) is left out, as a loop when it points to one of its own parents and as a
    duplicate otherwise. The scan therefore always ends and lists no file twice through folder links. Dangling
    links, loops, duplicates and unreadable folders are reported in ``left_out`` and, with ``warn``, logged
    (one line per kind). Links to files are followed.
    """
    root = Path(folder)
    suffixes = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    scan = FolderScan(root)
    found: list[tuple[str, ...]] = []
    try:
        root_stat = os.stat(root)
    except OSError as error:
        raise DatasetNotFoundError(f"image folder '{root}' cannot be read: {error.strerror or error}") from None
    walked: set[tuple[int, int]] = {(root_stat.st_dev, root_stat.st_ino)}
    linked_folders: list[tuple[tuple[str, ...], str]] = []  # (relative parts, path) of links to folders

    def walk(start: str, start_parts: tuple[str, ...]) -> None:
        stack = [(start, start_parts)]
        while stack:
            current, parts = stack.pop()
            try:
                with os.scandir(current) as iterator:
                    entries = sorted(iterator, key=lambda e: e.name)
            except OSError:
                scan.left_out.append(("/".join(parts) or ".", "unreadable"))
                continue
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                entry_parts = parts + (entry.name,)
                relative = "/".join(entry_parts)
                try:
                    if entry.is_symlink():
                        try:
                            target = os.stat(entry.path)  # follows the whole chain of links
                        except FileNotFoundError:
                            scan.left_out.append((relative, "dangling symlink"))
                            continue
                        except OSError as error:
                            kind = "symlink loop" if error.errno == errno.ELOOP else "unreadable"
                            scan.left_out.append((relative, kind))
                            continue
                        if stat.S_ISDIR(target.st_mode):
                            linked_folders.append((entry_parts, entry.path))
                        elif stat.S_ISREG(target.st_mode) and os.path.splitext(entry.name)[1].lower() in suffixes:
                            found.append(entry_parts)
                    elif entry.is_dir(follow_symlinks=False):
                        info = entry.stat(follow_symlinks=False)
                        key = (info.st_dev, info.st_ino)
                        if key in walked:  # a bind mount of a parent, or a folder listed before
                            scan.left_out.append((relative, "symlink loop"))
                            continue
                        walked.add(key)
                        stack.append((entry.path, entry_parts))
                    elif entry.is_file(follow_symlinks=False) and os.path.splitext(entry.name)[1].lower() in suffixes:
                        found.append(entry_parts)
                except OSError:
                    scan.left_out.append((relative, "unreadable"))

    walk(str(root), ())
    while linked_folders:
        linked_folders.sort(reverse=True)
        parts, path = linked_folders.pop()
        relative = "/".join(parts)
        try:
            info = os.stat(path)
        except OSError:
            scan.left_out.append((relative, "unreadable"))
            continue
        key = (info.st_dev, info.st_ino)
        if key in walked:
            target = os.path.realpath(path)
            parent = os.path.realpath(os.path.dirname(path))
            inside = parent == target or parent.startswith(target.rstrip(os.sep) + os.sep)
            scan.left_out.append((relative, "symlink loop" if inside else "duplicate folder link"))
            continue
        walked.add(key)
        walk(path, parts)
    found.sort()
    scan.files = ["/".join(parts) for parts in found]
    scan.left_out.sort()
    if warn:
        scan.warn()
    return scan


def list_image_files(folder: str | os.PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """Every image file below ``folder`` (:func:`scan_image_folder`: by extension, hidden files and folders
    skipped, each real folder once; what was left out is logged), sorted: the one walk that image folders,
    ``maetok reconstruct`` and ``maetok eval-gen`` share."""
    root = Path(folder)
    return [root / relative for relative in scan_image_folder(root, extensions).files]


class _PackedStrings:
    """A list of strings stored as one uint8 buffer + offsets, so DataLoader workers forked from the main
    process do not copy millions of Python objects (copy-on-read through reference counts)."""

    def __init__(self, strings: Sequence[str]) -> None:
        encoded = [s.encode("utf-8", "surrogateescape") for s in strings]  # file names that are not UTF-8 too
        lengths = np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded))
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self.offsets[1:])
        self.buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> str:
        return self.buffer[self.offsets[index] : self.offsets[index + 1]].tobytes().decode("utf-8", "surrogateescape")

    def to_list(self) -> list[str]:
        return [self[i] for i in range(len(self))]


class ImageFolder(ImageDataset):
    """Every image below ``root`` (any depth), sorted by relative path; decoded, converted to RGB / gray,
    resized + center cropped (or padded) to ``image_size`` on access.

    Files: :func:`scan_image_folder` (each real folder once; dangling links and loops are left out, logged, and
    listed in ``left_out``).

    Classes: the names of the top-level sub-folders that hold images (at any depth) anywhere in the folder,
    whatever the split, sorted, are the classes and labels are their indices, so a class has the same label
    in every split; loose images directly in ``root`` then get label -1 (a warning names one).
    Without sub-folders (or with ``use_classes=False``) the dataset is unlabeled: ``num_classes == 0`` and
    every label is 0. An explicit ``class_names`` list (e.g. the classes of an ImageNet-style root for its
    train and val folders) fixes the mapping: top-level folders map to those indices, images anywhere else get
    label -1.

    Split: ``split=None`` or 'all' keeps every file; 'train' / 'test' ('val') keep the files that
    ``hash_split`` assigns to that side with ``holdout_fraction``.

    Decoding: :func:`~maetok.data.images.load_image` with ``max_image_pixels`` (a larger file is a bad file,
    refused from its header; 0 or None: no limit) and, with ``jpeg_draft``, JPEGs decoded at reduced scale while both sides stay
    >= ``image_size``. Odd files (CMYK, 16-bit, palette, LA, EXIF-rotated, tiny ...) are converted and used.

    Bad files (truncated, corrupt, empty, not an image, too large): ``dataset[i]`` raises ``BadImageError`` naming
    the path relative to ``root``, and nothing is substituted; the readers (:func:`item_loader`) leave the item
    out and report it. The bad index is marked in a shared-memory flag array that DataLoader workers write to, so
    ``num_skipped`` / ``skipped_files`` in the main process count and name the distinct bad files met by any
    worker, and ``log_skipped()`` logs a summary with their names. ``scan()`` validates every file up front and
    drops the bad ones.

    Items: ``(image, label)`` or, with ``return_captions=True``, ``(image, label, caption)`` where caption is
    the stripped text of the ``.txt`` file of the same stem next to the image ("" if absent).
    image: float32 (channels, image_size, image_size) in [-1, 1].
    """

    def __init__(
        self,
        root: str | os.PathLike,
        image_size: int,
        channels: int = 3,
        split: str | None = None,
        *,
        return_captions: bool = False,
        holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION,
        resize_mode: Literal["crop", "pad"] = "crop",
        use_classes: bool = True,
        class_names: Sequence[str] | None = None,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        jpeg_draft: bool = True,
    ) -> None:
        if channels not in (1, 3):
            raise DataError(f"channels must be 1 or 3, got {channels}")
        if image_size <= 0:
            raise DataError(f"image_size must be positive, got {image_size}")
        if resize_mode not in ("crop", "pad"):
            raise DataError(f"resize_mode must be 'crop' or 'pad', got {resize_mode!r}")
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DatasetNotFoundError(f"image folder '{self.root}' does not exist or is not a directory")
        self.split = _normalise_split(split, ("train", "test", "all"))
        self.image_size = int(image_size)
        self.channels = int(channels)
        self.return_captions = bool(return_captions)
        self.resize_mode = resize_mode
        self.holdout_fraction = float(holdout_fraction)
        self.max_image_pixels = pixel_limit(max_image_pixels)  # None: no limit
        self.jpeg_draft = bool(jpeg_draft)
        normalised_extensions = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)

        folder_scan = scan_image_folder(self.root, normalised_extensions)
        self.left_out: list[tuple[str, str]] = folder_scan.left_out  # (relative path, kind) the scan left out
        relative_paths = folder_scan.files
        if not relative_paths:
            raise DatasetNotFoundError(
                f"no images found under '{self.root}' (extensions: {', '.join(normalised_extensions)})"
            )
        # one class list for every split: the top-level folders holding images anywhere in the folder
        all_classes = sorted({rel.split("/", 1)[0] for rel in relative_paths if "/" in rel})
        if self.split in ("train", "test"):
            keep = split_paths(relative_paths, self.split, self.holdout_fraction)
            if not keep:
                raise DataError(
                    f"split {self.split!r} of '{self.root}' is empty ({len(relative_paths)} images, "
                    f"holdout_fraction={self.holdout_fraction}); use split=None or a larger folder"
                )
            relative_paths = [relative_paths[i] for i in keep]

        top_folders = [rel.split("/", 1)[0] if "/" in rel else None for rel in relative_paths]
        if class_names is not None:
            self.class_names = list(class_names)
        elif use_classes:
            self.class_names = all_classes
        else:
            self.class_names = []
        if self.class_names:
            index_of = {name: i for i, name in enumerate(self.class_names)}
            labels = [index_of.get(top, -1) if top is not None else -1 for top in top_folders]
            if -1 in labels:
                logger.warning(
                    "%d image(s) under '%s' are outside the %d class folders (e.g. '%s'): label -1",
                    labels.count(-1), self.root, len(self.class_names), relative_paths[labels.index(-1)],
                )
        else:
            labels = [0] * len(relative_paths)
        self.num_classes = len(self.class_names)
        self.labels = np.asarray(labels, dtype=np.int64)
        self._relative_paths = _PackedStrings(relative_paths)
        self._bad_flags = self._new_flags(len(relative_paths))
        self._scanned_out: list[str] = []

    @staticmethod
    def _new_flags(count: int) -> torch.Tensor:
        flags = torch.zeros(max(count, 1), dtype=torch.uint8)
        try:
            flags.share_memory_()
        except (RuntimeError, OSError) as error:  # no shared memory: counts then cover this process only
            logger.warning("shared memory unavailable (%s): bad files met in DataLoader workers are not counted", error)
        return flags

    # -------------------------------------------------------------------------------------- access

    def __len__(self) -> int:
        return len(self._relative_paths)

    def relative_path(self, index: int) -> str:
        """'/'-separated path of item ``index`` relative to ``root``."""
        return self._relative_paths[index]

    @property
    def relative_paths(self) -> list[str]:
        return self._relative_paths.to_list()

    @property
    def paths(self) -> list[Path]:
        return [self.root / rel for rel in self._relative_paths.to_list()]

    def caption(self, index: int) -> str:
        """Text of the ``.txt`` file with the same stem as image ``index`` ("" if there is none)."""
        caption_path = (self.root / self.relative_path(index)).with_suffix(".txt")
        try:
            return caption_path.read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            return ""

    def load(self, index: int) -> torch.Tensor:
        """Decode, convert, resize and crop item ``index``: float32 (channels, S, S) in [-1, 1].
        Raises ``BadImageError`` for an unreadable file (no skipping)."""
        pixels = load_image(
            self.root / self.relative_path(index),
            self.channels,
            max_pixels=self.max_image_pixels,
            draft_size=self.image_size if self.jpeg_draft else None,
        )
        pixels = resize_center_crop(pixels, self.image_size, mode=self.resize_mode)
        return to_tensor(pixels)

    def __getitem__(self, index: int):
        """Item ``index``: ``(image (channels, S, S) in [-1, 1], label)`` (``+ (caption,)`` with ``return_captions``).
        An unreadable file raises ``BadImageError`` whose ``path`` is the file relative to ``root`` (and is flagged
        for ``skipped_files``); nothing is substituted."""
        count = len(self)
        if not -count <= index < count:
            raise IndexError(f"index {index} out of range for ImageFolder '{self.root}' ({count} images)")
        index %= count
        try:
            image = self.load(index)
        except BadImageError as error:
            self._bad_flags[index] = 1
            raise BadImageError(self.relative_path(index), error.reason) from None
        label = int(self.labels[index])
        return (image, label, self.caption(index)) if self.return_captions else (image, label)

    # ------------------------------------------------------------------------------ bad-file bookkeeping

    @property
    def num_skipped(self) -> int:
        """Number of distinct bad files met so far (by any DataLoader worker, or removed by ``scan``)."""
        return int(self._bad_flags[: len(self)].sum()) + len(self._scanned_out)

    @property
    def skipped_files(self) -> list[str]:
        """Relative paths of the bad files met so far (those removed by ``scan`` first)."""
        flagged = torch.nonzero(self._bad_flags[: len(self)]).flatten().tolist()
        return list(self._scanned_out) + [self.relative_path(i) for i in flagged]

    def log_skipped(self, max_names: int = 5) -> int:
        """Log one summary line naming the first ``max_names`` bad files; returns ``num_skipped``."""
        skipped = self.skipped_files
        if skipped:
            names = ", ".join(skipped[:max_names]) + (", ..." if len(skipped) > max_names else "")
            logger.warning("%d unreadable image(s) skipped under '%s': %s", len(skipped), self.root, names)
        return len(skipped)

    def scan(self, full_decode: bool = True, num_threads: int = 4) -> list[tuple[str, str]]:
        """Validate every file now and drop the bad ones from the dataset (indices and ``labels`` shift: call
        it before building samplers / DataLoaders).

        Args:
            full_decode: decode every image fully (finds truncated files; costs about one epoch of decoding).
                False only opens headers (finds empty, non-image and unknown-format files; fast).
            num_threads: decoding threads (Pillow releases the GIL while decoding).

        Returns:
            (relative path, reason) for each bad file found (files already flagged bad included).
        """
        from concurrent.futures import ThreadPoolExecutor

        from PIL import Image

        def check(index: int) -> str | None:
            path = self.root / self.relative_path(index)
            try:
                if full_decode:
                    self.load(index)
                else:
                    if os.path.getsize(path) == 0:
                        return "empty file (0 bytes)"
                    with Image.open(path) as img:
                        if img.width <= 0 or img.height <= 0:
                            return f"image has zero size {img.width}x{img.height}"
                        if self.max_image_pixels is not None and img.width * img.height > self.max_image_pixels:
                            return (f"too large: {img.width}x{img.height} = {img.width * img.height} pixels, above "
                                    f"the limit of {self.max_image_pixels}")
            except BadImageError as error:
                return error.reason
            except Exception as error:  # header-only mode: any failure to open is a bad file
                return f"{type(error).__name__}: {error}"
            return None

        with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
            reasons = list(pool.map(check, range(len(self))))
        already_flagged = self._bad_flags[: len(self)].bool().tolist()
        bad_indices = [i for i, reason in enumerate(reasons) if reason is not None or already_flagged[i]]
        bad = [(self.relative_path(i), reasons[i] or "unreadable (found earlier)") for i in bad_indices]
        if not bad:
            return bad
        for rel, reason in bad[:_MAX_WARNINGS_PER_PROCESS]:
            logger.warning("scan: dropping %s: %s", rel, reason)
        if len(bad) > _MAX_WARNINGS_PER_PROCESS:
            logger.warning("scan: dropped %d unreadable files under '%s' in all", len(bad), self.root)
        bad_set = set(bad_indices)
        keep = [i for i in range(len(self)) if i not in bad_set]
        if not keep:
            raise DataError(f"no readable image in '{self.root}' ({len(self)} files, all unreadable)")
        kept_paths = [self.relative_path(i) for i in keep]
        self._scanned_out.extend(rel for rel, _ in bad)
        self.labels = self.labels[np.asarray(keep, dtype=np.int64)]
        self._relative_paths = _PackedStrings(kept_paths)
        self._bad_flags = self._new_flags(len(kept_paths))
        return bad

    def __repr__(self) -> str:
        return (
            f"ImageFolder(root='{self.root}', split={self.split!r}, image_size={self.image_size}, "
            f"channels={self.channels}, len={len(self)}, num_classes={self.num_classes})"
        )


# ---------------------------------------------------------------------------------------------- factory

_FASHION_MNIST_SPECS = {"fashion-mnist", "fashion_mnist", "fashionmnist"}


def is_fashion_mnist(spec: str) -> bool:
    """Whether a dataset spec names the embedded Fashion-MNIST (``fashion-mnist``, ``fashion_mnist``, ...)."""
    return spec.strip().lower() in _FASHION_MNIST_SPECS


def build_dataset(spec: str, split: str, image_size: int, channels: int, **folder_options) -> ImageDataset:
    """Dataset from a short spec.

    Args:
        spec: 'fashion-mnist' (root from $MAETOK_FASHION_MNIST or the Debian package), or a folder path.
            A folder holding ``train/`` and ``val/`` (or ``test/``) sub-folders is an ImageNet-style root:
            ``train/`` serves split 'train', ``val/`` serves 'test' / 'val'; the classes are the union of the
            sub-folders of both, sorted, so a class has one label in both splits (a val folder without
            sub-folders is unlabeled). Any other folder is split by ``hash_split`` ('all' keeps everything) and
            its classes come from the whole folder.
        split: 'train', 'test' (alias 'val') or, for plain folders, 'all'.
        image_size: output side length S.
        channels: 1 or 3.
        folder_options: extra keyword arguments for ``ImageFolder`` (return_captions, holdout_fraction,
            max_image_pixels, ...); ``max_image_pixels`` is accepted and unused for Fashion-MNIST.

    Returns:
        a dataset of (image (channels, S, S) float32 in [-1, 1], label int) items.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"dataset spec must be 'fashion-mnist' or a folder path, got {spec!r}")
    if is_fashion_mnist(spec):
        if folder_options.get("return_captions"):
            raise DataError(
                f"dataset {spec!r} has no captions (the 'text' auxiliary target needs them): use an image folder "
                "with a .txt caption beside each image"
            )
        folder_options = {k: v for k, v in folder_options.items() if k != "max_image_pixels"}
        if folder_options:
            raise ConfigError(f"options {sorted(folder_options)} do not apply to fashion-mnist")
        return FashionMNIST(split=split, image_size=image_size, channels=channels)
    root = Path(spec).expanduser()
    if not root.exists():
        raise DatasetNotFoundError(
            f"unknown dataset spec '{spec}': it is not 'fashion-mnist' and no such folder exists"
        )
    if not root.is_dir():
        raise DataError(f"dataset spec '{spec}' is a file; expected 'fashion-mnist' or a folder of images")
    held_out_dir = next((root / name for name in ("val", "test") if (root / name).is_dir()), None)
    if (root / "train").is_dir() and held_out_dir is not None:
        split_name = _normalise_split(split, ("train", "test"))
        train_dir = root / "train"
        options = dict(folder_options)
        if "class_names" not in options and options.get("use_classes", True):
            train_classes, held_out_classes = _class_folders(train_dir), _class_folders(held_out_dir)
            own_classes = train_classes if split_name == "train" else held_out_classes
            if own_classes:  # a split without class folders stays unlabeled
                options["class_names"] = sorted(set(train_classes) | set(held_out_classes))
        return ImageFolder(train_dir if split_name == "train" else held_out_dir, image_size, channels, split=None,
                           **options)
    return ImageFolder(root, image_size, channels, split=split, **folder_options)


def _class_folders(folder: Path) -> list[str]:
    """Names of the non-hidden sub-folders of ``folder`` (links to folders included), sorted."""
    try:
        with os.scandir(folder) as iterator:
            return sorted(e.name for e in iterator if not e.name.startswith(".") and _is_dir(e))
    except OSError:
        return []


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


# ------------------------------------------------------------------------------------ what images a model takes

GRAYSCALE_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
SHAPE_SAMPLE = 64  # image files (a seeded draw) whose headers decide a folder's channels and size


@dataclass(frozen=True)
class DataShape:
    """What a dataset's images are read as: ``channels`` (1 or 3) and ``image_size`` (pixels, square), with
    ``reason``: one line saying what was chosen and why."""

    channels: int
    image_size: int
    reason: str


def image_headers(spec: str, count: int = SHAPE_SAMPLE, seed: int = 0) -> list[tuple[str, int, int]]:
    """``(kind, width, height)`` of a seeded draw of ``count`` image files of dataset ``spec``, read from the file
    headers (``kind``: "gray" or "colour" from the PIL mode; a palette of grays is gray); files that do not open are
    left out. Fashion-MNIST: its 28 x 28 grayscale images."""
    from PIL import Image

    if is_fashion_mnist(spec):
        return [("gray", 28, 28)]
    root = Path(spec).expanduser()
    if not root.is_dir():
        build_dataset(spec, "all", 1, 3)  # the one-line error of a missing folder or a file
    files = scan_image_folder(root, warn=False).files
    chosen = np.random.default_rng(seed).permutation(len(files))[:count]
    headers = []
    for index in sorted(chosen.tolist()):
        try:
            with Image.open(root / files[index]) as image:
                palette = image.getpalette() if image.mode == "P" else None
                gray = image.mode in GRAYSCALE_MODES or (
                    palette is not None and palette[0::3] == palette[1::3] == palette[2::3])
                headers.append(("gray" if gray else "colour", image.width, image.height))
        except Exception:  # an unreadable file says nothing about the others (readers skip it)
            continue
    return headers


def data_shape(spec: str, default_size: int, patch_size: int = 1, channels: int | None = None,
               image_size: int | None = None) -> DataShape:
    """The channels and image size a model reads dataset ``spec`` at: the given ``channels`` / ``image_size``
    (explicit settings always win), else from the images (:func:`image_headers`): 1 channel when all are
    grayscale, else 3; the images' size when all are square of one size that ``patch_size`` divides, else
    ``default_size`` (the config's). Fashion-MNIST: 1 channel, 28 px images (padded to a larger size)."""
    headers = image_headers(spec)
    kinds = sorted({kind for kind, _, _ in headers})
    sizes = sorted({(w, h) for _, w, h in headers})
    found = "grayscale" if kinds == ["gray"] else "colour" if kinds else None
    data_channels = {"grayscale": 1, "colour": 3}.get(found)
    looked = f"{len(headers)} file(s) looked at" if not is_fashion_mnist(spec) else "Fashion-MNIST"
    if channels is not None:
        converted = (f"; the {found} images are converted" if data_channels not in (None, channels) else "")
        channel_reason = f"{channels} channel{'s' if channels > 1 else ''} (as set{converted})"
    else:
        channels = data_channels or 3
        channel_reason = (f"{channels} channel{'s' if channels > 1 else ''} ({found} images, {looked})" if found
                          else "3 channels (no image header could be read)")
    span = f"{sizes[0][0]}x{sizes[0][1]}" + (f" .. {sizes[-1][0]}x{sizes[-1][1]}" if len(sizes) > 1 else "")
    if image_size is not None:
        size_reason = f"{image_size} px (as set)"
    elif len(sizes) == 1 and sizes[0][0] == sizes[0][1] and sizes[0][0] % patch_size == 0:
        image_size = sizes[0][0]
        size_reason = f"{image_size} px (the images' size)"
    else:
        image_size = default_size
        why = ("not square or not all one size" if len(sizes) != 1 or sizes[0][0] != sizes[0][1]
               else f"not a multiple of the patch size {patch_size}")
        size_reason = (f"{image_size} px (the config's; the images are {span}: {why})" if sizes
                       else f"{image_size} px (the config's)")
    return DataShape(channels, image_size, f"{spec}: {channel_reason}, {size_reason}")


def data_shape_overrides(spec: str, preset: str | Path, overrides: Sequence[str] = ()) -> tuple[list[str], DataShape]:
    """Tokenizer config ``preset`` (+ ``overrides``) fitted to the images of dataset ``spec`` (:func:`data_shape`):
    the ``model.image_size`` / ``model.in_channels`` overrides to append, and what was chosen. Values set by
    ``overrides`` or in a YAML file of the user's (not a packaged preset, nor one it names as ``base:``) are kept; a
    preset's are defaults."""
    from maetok.config import (TokenizerTrainConfig, is_packaged_preset, load_config, parse_overrides, preset_path,
                               read_yaml_file)

    model = load_config(TokenizerTrainConfig, preset, overrides).model  # checks the file and the overrides
    own = {} if is_packaged_preset(preset) else read_yaml_file(preset_path(preset)) or {}
    given = dict(own.get("model") or {})
    given.update(parse_overrides(overrides).get("model") or {})
    shape = data_shape(spec, model.image_size, model.patch_size, given.get("in_channels"), given.get("image_size"))
    return [f"model.image_size={shape.image_size}", f"model.in_channels={shape.channels}"], shape


def note_channel_conversion(spec: str, channels: int) -> str | None:
    """Say (one line on stdout, returned) that dataset ``spec``'s images are converted to a model's ``channels``
    (grayscale images repeated to RGB, colour images to luma); nothing (None) when they already have them."""
    data_channels = data_shape(spec, 1, channels=None, image_size=1).channels
    if data_channels == channels:
        return None
    line = (f"{spec} holds {'colour' if data_channels == 3 else 'grayscale'} images and the model takes "
            f"{channels} channel{'s' if channels > 1 else ''}: they are read as "
            f"{'grayscale (luma)' if channels == 1 else 'RGB (gray repeated)'}")
    print(f"[maetok] data: {line}", flush=True)
    return line


# ------------------------------------------------------------------------------------------ subsets, batches


def subset_indices(length: int, num: int | None, seed: int = 0) -> np.ndarray:
    """``num`` distinct indices of ``range(length)`` drawn with ``seed`` (all, in order, when ``num`` is None
    or >= ``length``). A random draw, not the first ``num``: image folders list their classes one after
    the other. The order of the draw is kept, so the first ``n`` of a larger draw are a draw of ``n``."""
    if length <= 0:
        raise DataError("the dataset is empty")
    if num is None or num >= length:
        return np.arange(length)
    if num < 1:
        raise DataError(f"number of images must be >= 1, got {num}")
    return np.random.default_rng(seed).permutation(length)[:num]


def dataset_labels(dataset: Dataset) -> np.ndarray | None:
    """The class of each item of ``dataset`` ``(N,)`` int64, or None when it has fewer than 2 classes."""
    labels = getattr(dataset, "labels", None)
    return np.asarray(labels) if labels is not None and int(getattr(dataset, "num_classes", 0) or 0) > 1 else None


def balanced_order(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """A seeded permutation of ``range(len(labels))`` whose every prefix is as class-balanced as the classes
    allow: round r holds the r-th item of each class (a seeded shuffle within each class) in a seeded class order,
    so the first ``n`` hold ``n // K`` of each of the ``K`` classes and one more of ``n % K`` of them (a class with
    fewer items gives what it has)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    classes, class_of = np.unique(labels, return_inverse=True)
    rank = np.empty(len(labels), dtype=np.int64)
    for k in range(len(classes)):
        members = rng.permutation(np.flatnonzero(class_of == k))
        rank[members] = np.arange(len(members))
    place_in_round = rng.random((int(rank.max()) + 1 if len(rank) else 0, len(classes)))[rank, class_of]
    return np.lexsort((place_in_round, rank))


def draw_order(length: int, num: int | None, seed: int = 0,
               labels: np.ndarray | None = None) -> tuple[np.ndarray, int | None]:
    """What to read for a draw of ``num`` readable items: ``(indices, limit)``. All items in order and no limit
    when ``num`` is None or >= ``length``; else the whole seeded permutation with ``limit=num``: reading it in order
    and stopping after ``num`` readable items gives :func:`subset_indices` ``(length, num, seed)`` when no file is
    bad, and otherwise the next items of the same draw in place of the bad ones (pass ``limit`` to
    :func:`iter_batches`). With ``labels`` (:func:`dataset_labels`) the permutation is :func:`balanced_order`: the
    draw holds every class equally."""
    if num is None or num >= length:
        return subset_indices(length, None), None
    subset_indices(length, num, seed)  # the checks
    if labels is not None:
        return balanced_order(labels, seed), int(num)
    return np.random.default_rng(seed).permutation(length), int(num)


def describe_draw(num_images: int, length: int, labels: np.ndarray | None, seed: int, split: str = "test") -> str:
    """How a draw of ``num_images`` of the ``length`` images of a split was made, in words, e.g. "1000 of the 10000
    test images, 100 per class (10 classes), a seeded class-balanced draw (seed 0)"; ``labels``: those of the images
    drawn (None: no classes)."""
    if num_images >= length:
        return f"all {num_images} {split} images"
    if labels is None:
        return f"{num_images} of the {length} {split} images, a seeded uniform draw (seed {seed})"
    counts = np.unique(np.asarray(labels), return_counts=True)[1]
    per_class = f"{counts.min()}" if counts.min() == counts.max() else f"{counts.min()}-{counts.max()}"
    return (f"{num_images} of the {length} {split} images, {per_class} per class ({len(counts)} classes), a seeded "
            f"class-balanced draw (seed {seed})")


class DatasetSubset(Dataset):
    """``dataset`` restricted to ``indices``, keeping the dataset attributes (``num_classes``, ``class_names``,
    ``channels``, ``image_size``, ``labels``) that the latent cache and the trainers read."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]) -> None:
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)
        self.num_classes = int(getattr(dataset, "num_classes", 0) or 0)
        self.class_names = list(getattr(dataset, "class_names", []) or [])
        self.channels = getattr(dataset, "channels", None)
        self.image_size = getattr(dataset, "image_size", None)
        labels = getattr(dataset, "labels", None)
        self.labels = np.asarray(labels)[self.indices] if labels is not None else None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.dataset[int(self.indices[index])]

    def log_skipped(self) -> int:
        return self.dataset.log_skipped() if hasattr(self.dataset, "log_skipped") else 0


@dataclass(frozen=True)
class SkippedItem:
    """An item left out because its file could not be read: ``index`` (position in the dataset iterated),
    ``file`` (the path relative to the image folder's root) and ``reason``."""

    index: int
    file: str
    reason: str

    def to_dict(self) -> dict:
        return {"index": self.index, "file": self.file, "reason": self.reason}


class ItemBatch(NamedTuple):
    """The readable items among the ``n`` a batch asked for, in the order asked.

    images: ``(B, C, S, S)`` float32 in [-1, 1] (a latent cache's items: ``(B, 2, L, H)``), B <= n; labels: ``(B,)``
    int64; indices: ``(B,)`` int64, the index of each row in the dataset read; slots: ``(B,)`` int64, each row's
    place among the ``n`` items asked (``0 .. B - 1`` when every file was readable); skipped: the items asked that
    could not be read; captions: ``B`` strings for a dataset with captions, else None.
    """

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    slots: torch.Tensor
    skipped: list[SkippedItem]
    captions: list[str] | None = None


class _ReadOrSkip(Dataset):
    """``dataset`` whose unreadable items come back as a :class:`SkippedItem` instead of raising (picklable, so
    DataLoader workers can use it): ``(index, item or None, SkippedItem or None)``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            return index, self.dataset[index], None
        except BadImageError as error:
            return index, None, SkippedItem(index, error.path, error.reason)


def _collate_items(items: list) -> ItemBatch:
    """The batch of ``_ReadOrSkip`` items (images stacked as ``default_collate`` does: in shared memory in a worker)."""
    rows = [(slot, index, item) for slot, (index, item, _) in enumerate(items) if item is not None]
    return ItemBatch(
        images=default_collate([item[0] for _, _, item in rows]) if rows else torch.empty(0),
        labels=torch.tensor([int(item[1]) for _, _, item in rows], dtype=torch.int64),
        indices=torch.tensor([index for _, index, _ in rows], dtype=torch.int64),
        slots=torch.tensor([slot for slot, _, _ in rows], dtype=torch.int64),
        skipped=[skipped for _, item, skipped in items if item is None],
        captions=[item[2] for _, _, item in rows] if rows and len(rows[0][2]) > 2 else None,
    )


def item_loader(dataset: Dataset, **options) -> DataLoader:
    """A DataLoader of :class:`ItemBatch` es over ``dataset`` (``options``: those of ``DataLoader``: ``batch_size``
    or ``batch_sampler``, ``num_workers`` ...): each batch holds the readable items asked for, an unreadable file
    leaves no row and is listed in ``skipped`` (never replaced by another image). What every reader of items
    shares: :func:`iter_batches` and the training loop's batches."""
    return DataLoader(_ReadOrSkip(dataset), collate_fn=_collate_items, **options)


def _batches_in_order(dataset: Dataset, batch_size: int, num_workers: int) -> Iterator[ItemBatch]:
    """:class:`ItemBatch` es over positions ``[0, B), [B, 2B) ...`` of ``dataset``, vectorised for Fashion-MNIST (also
    behind a :class:`DatasetSubset`)."""
    base = dataset.dataset if isinstance(dataset, DatasetSubset) else dataset
    if not hasattr(base, "get_batch"):
        yield from item_loader(dataset, batch_size=batch_size, num_workers=num_workers)
        return
    indices = dataset.indices if isinstance(dataset, DatasetSubset) else np.arange(len(dataset))
    for start in range(0, len(indices), batch_size):
        images, labels = base.get_batch(indices[start : start + batch_size])
        positions = torch.arange(start, start + len(labels), dtype=torch.int64)
        yield ItemBatch(images, labels, positions, positions - start, [])


def log_skipped_items(skipped: Sequence[SkippedItem], where: str, max_names: int = 5) -> None:
    """One warning line: how many items of ``where`` were left out as unreadable, naming the first ones."""
    if skipped:
        names = ", ".join(f"{display_path(item.file)} ({item.reason})" for item in skipped[:max_names])
        more = ", ..." if len(skipped) > max_names else ""
        logger.warning("%d unreadable image(s) left out of %s: %s%s", len(skipped), where, names, more)


def iter_batches(dataset: Dataset, batch_size: int, num_workers: int = 0, skipped: list[SkippedItem] | None = None,
                 limit: int | None = None) -> Iterator[ItemBatch]:
    """The one in-order reader: :class:`ItemBatch` es of the readable items of ``dataset``, read in batches of
    ``batch_size`` positions (``indices``: each row's position in ``dataset``; batches left without a row are not
    yielded), stopping after ``limit`` rows when given (see :func:`draw_order`). The unreadable items met are
    appended to ``skipped`` when a list is given, else logged in one line at the end."""
    if batch_size <= 0:
        raise DataError(f"batch_size must be positive, got {batch_size}")
    left_out: list[SkippedItem] = skipped if skipped is not None else []
    remaining = limit
    for batch in _batches_in_order(dataset, batch_size, num_workers):
        rows = len(batch.indices)
        if remaining is not None and rows >= remaining:  # the last batch: keep what precedes the limit
            cut = int(batch.indices[remaining - 1]) if remaining else -1
            left_out.extend(item for item in batch.skipped if item.index < cut)
            if remaining:
                yield ItemBatch(*(part[:remaining] for part in batch[:4]), [s for s in batch.skipped if s.index < cut],
                                batch.captions[:remaining] if batch.captions is not None else None)
            break
        left_out.extend(batch.skipped)
        if rows:
            yield batch
        if remaining is not None:
            remaining -= rows
    if skipped is None:
        base = dataset.dataset if isinstance(dataset, DatasetSubset) else dataset
        log_skipped_items(left_out, f"'{getattr(base, 'root', 'the dataset')}'")


def load_images(dataset: Dataset, indices: Sequence[int] | None = None, limit: int | None = None,
                batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The readable items of ``dataset`` (its items ``indices`` when given; the first ``limit`` readable ones when
    given) in memory, read by :func:`iter_batches`: images ``(N, C, S, S)`` in [-1, 1] and labels ``(N,)`` int64,
    or None for the labels when the dataset has no classes (fewer than 2, or unlabelled items). Unreadable files
    are left out (N is then smaller than asked) and logged."""
    subset = dataset if indices is None else DatasetSubset(dataset, indices)
    batch_size = min(batch_size, limit) if limit else batch_size  # reads no more than it keeps
    batches = list(iter_batches(subset, batch_size, limit=limit))
    if not batches:
        raise DataError(f"none of the {len(subset)} images could be read")
    labels = torch.cat([batch.labels for batch in batches])
    has_classes = int(getattr(dataset, "num_classes", 0) or 0) > 1 and bool((labels >= 0).all())
    return torch.cat([batch.images for batch in batches]), labels if has_classes else None


def dataset_images_uint8(dataset: Dataset, batch_size: int = 256, limit: int | None = None) -> np.ndarray:
    """All readable images of ``dataset`` (the first ``limit`` readable ones when given) as uint8 RGB
    ``(N, H, W, 3)`` (gray repeated), converted with :func:`~maetok.data.images.to_uint8` exactly as
    reconstructions and samples are, batch by batch (:func:`iter_batches`; unreadable files are left out and
    logged)."""
    parts = [to_uint8(to_rgb(batch.images), channels_last=True).numpy()
             for batch in iter_batches(dataset, batch_size, limit=limit)]
    if not parts:
        raise DataError(f"none of the {len(dataset)} images could be read")
    return np.ascontiguousarray(np.concatenate(parts))
