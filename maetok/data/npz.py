"""ADM ``.npz`` image batches (the format of the guided-diffusion evaluation suite): ``arr_0`` uint8 NHWC
images, ``arr_1`` int64 labels. ``arr_0`` is read in streaming batches (50k 256x256 images are 10 GB); reference
statistics (``mu, sigma, mu_s, sigma_s``) are read and written by :mod:`maetok.eval.fid`."""

from __future__ import annotations

import contextlib
import math
import zipfile
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np
import torch
from torch import Tensor

from maetok.errors import DataError, MissingFileError, first_line
from maetok.runs import save_npz

__all__ = ["NpzFormatError", "iter_npz_images", "load_sample_batch", "save_sample_batch"]

PathLike = Union[str, Path]


class NpzFormatError(DataError):
    """An ``.npz`` batch lacks a key or holds an array of the wrong dtype / shape; the message names both."""


def npz_keys(path: Path) -> list[str]:
    """The array names of an ``.npz`` archive (``FileNotFoundError`` / :class:`NpzFormatError` naming the file)."""
    if not path.is_file():
        raise MissingFileError(f"npz file not found: {path}")
    if not zipfile.is_zipfile(path):
        raise NpzFormatError(f"{path}: not an .npz archive")
    with zipfile.ZipFile(path) as archive:
        return [n[:-4] for n in archive.namelist() if n.endswith(".npy")]


def require_key(path: Path, key: str, keys: list[str]) -> None:
    """:class:`NpzFormatError` naming the file and the keys present when ``key`` is missing."""
    if key not in keys:
        raise NpzFormatError(f"{path}: missing key {key!r} (keys present: {sorted(keys)})")


def check_images_header(path: Path, key: str, shape: tuple, dtype: np.dtype) -> None:
    """:class:`NpzFormatError` unless ``key`` holds uint8 NHWC RGB images ``(N, H, W, 3)``."""
    if dtype != np.uint8:
        raise NpzFormatError(f"{path}: {key!r} must be uint8 images, got dtype {dtype}")
    if len(shape) != 4 or shape[-1] != 3:
        raise NpzFormatError(f"{path}: {key!r} must be NHWC images (N, H, W, 3), got shape {tuple(shape)}")


@contextlib.contextmanager
def open_npy_member(path: Path, key: str) -> Iterator[tuple[Any, tuple, np.dtype, bool]]:
    """``(open member, shape, dtype, fortran_order)`` of one array without reading it (shape None: unknown header).
    A header that claims more bytes than the member holds (a forged or truncated file, which would make numpy
    allocate what it claims) is an :class:`NpzFormatError` naming the file, the key and both sizes."""
    with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as member:
        member_size = archive.getinfo(f"{key}.npy").file_size  # uncompressed, from the archive's directory
        try:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(member)
            elif version == (2, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(member)
            else:
                shape, fortran_order, dtype = None, True, None  # unknown header: caller falls back to np.load
        except ValueError as err:  # numpy's own words for a malformed header
            raise NpzFormatError(f"{path}: {key!r} has no valid .npy header ({first_line(err)})") from None
        if shape is not None and not dtype.hasobject:
            claimed = math.prod(shape) * dtype.itemsize
            if claimed > member_size:
                raise NpzFormatError(f"{path}: {key!r} claims shape {tuple(shape)} ({claimed} bytes) but holds "
                                     f"{member_size} bytes: truncated or corrupt")
        yield member, shape, dtype, bool(fortran_order)


def iter_npz_images(path: PathLike, batch_size: int = 256, key: str = "arr_0") -> Iterator[np.ndarray]:
    """Stream uint8 NHWC images ``(b, H, W, 3)`` from an ADM ``.npz`` without loading the whole array."""
    path = Path(path)
    require_key(path, key, npz_keys(path))
    with open_npy_member(path, key) as (member, shape, dtype, fortran_order):
        if shape is None or fortran_order or dtype.hasobject:
            images = load_array(path, key)
            check_images_header(path, key, images.shape, images.dtype)
            for i in range(0, images.shape[0], batch_size):
                yield images[i : i + batch_size]
            return
        check_images_header(path, key, shape, dtype)
        per_image = int(np.prod(shape[1:]))
        remaining = shape[0]
        while remaining > 0:
            count = min(batch_size, remaining)
            nbytes = count * per_image * dtype.itemsize
            data = member.read(nbytes)
            if len(data) != nbytes:
                raise NpzFormatError(f"{path}: {key!r} is truncated ({len(data)} of {nbytes} bytes in a batch)")
            yield np.frombuffer(data, dtype=dtype).reshape((count,) + tuple(shape[1:]))
            remaining -= count


def npz_array_length(path: Path, key: str) -> int:
    """The first dimension of array ``key``, read from its header."""
    with open_npy_member(path, key) as (_, shape, _dtype, _fortran):
        if shape is None:
            return len(load_array(path, key))
        return int(shape[0])


def npz_image_size(path: Path, key: str = "arr_0") -> Optional[tuple[int, int]]:
    """``(H, W)`` of the NHWC images under ``key``, read from its header; None when the archive has no ``key``."""
    if key not in npz_keys(path):
        return None
    with open_npy_member(path, key) as (_, shape, _dtype, _fortran):
        if shape is None:
            shape = load_array(path, key).shape
    return int(shape[1]), int(shape[2])


def load_array(path: Path, key: str) -> np.ndarray:
    """Array ``key`` in full (no pickles), its header's claimed size checked first (:func:`open_npy_member`)."""
    with open_npy_member(path, key):
        pass
    with np.load(path, allow_pickle=False) as data:
        return data[key]


def load_sample_batch(path: PathLike) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Read a whole ADM sample batch: ``(images uint8 (N, H, W, 3), labels (N,) or None)``."""
    path = Path(path)
    keys = npz_keys(path)
    require_key(path, "arr_0", keys)
    images = load_array(path, "arr_0")
    check_images_header(path, "arr_0", images.shape, images.dtype)
    labels = load_array(path, "arr_1") if "arr_1" in keys else None
    if labels is not None and labels.shape != (images.shape[0],):
        raise NpzFormatError(f"{path}: 'arr_1' labels must have shape ({images.shape[0]},), got {labels.shape}")
    return images, labels


def as_nhwc_uint8(images: Union[Tensor, np.ndarray], what: str) -> np.ndarray:
    """uint8 ``(N, H, W, 3)`` array of ``images`` (also a uint8 ``(N, 3, H, W)`` tensor); errors name ``what``."""
    if isinstance(images, Tensor):
        if images.ndim == 4 and images.shape[1] == 3 and images.shape[-1] != 3:
            images = images.permute(0, 2, 3, 1)
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"{what}: images must be uint8 (use maetok.data.images.to_uint8), got {images.dtype}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{what}: images must be (N, H, W, 3) or a torch (N, 3, H, W) tensor, got {images.shape}")
    return np.ascontiguousarray(images)


def save_sample_batch(path: PathLike, images: Union[Tensor, np.ndarray],
                      labels: Optional[Union[Tensor, np.ndarray]] = None) -> Path:
    """Write an ADM sample batch: ``np.savez(path, arr_0=uint8 NHWC, arr_1=int64 labels)``, atomically
    (:func:`maetok.runs.save_npz`: a file under ``path`` is always complete).

    images: uint8 ``(N, H, W, 3)`` array or uint8 ``(N, 3, H, W)`` tensor. Returns the written path
    (``.npz`` appended when missing, as numpy does).
    """
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    array = as_nhwc_uint8(images, f"save_sample_batch({path})")
    payload = {"arr_0": array}
    if labels is not None:
        label_array = np.asarray(torch.as_tensor(labels).cpu().numpy()).astype(np.int64)
        if label_array.shape != (array.shape[0],):
            raise ValueError(f"labels must have shape ({array.shape[0]},), got {label_array.shape}")
        payload["arr_1"] = label_array
    return save_npz(path, payload)


#: the keys of a reconstructions batch (the reference of the decoder-free generation figures, ``maetok eval-gen``)
RECONSTRUCTION_KEYS = ("reference", "floor")


def save_reconstruction_batch(path: PathLike, reference: np.ndarray, floor: np.ndarray) -> Path:
    """Write a tokenizer's reconstructions for the decoder-free figures: ``reference`` uint8 ``(N, H, W, 3)`` (of
    the reference images, in their order) and ``floor`` uint8 ``(M, H, W, 3)`` (of as many training images), written
    to a temporary name and renamed, so a file under ``path`` is always complete. Returns the path (``.npz``
    appended when missing)."""
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    arrays = {key: as_nhwc_uint8(images, f"{path}: {key!r}") for key, images in zip(RECONSTRUCTION_KEYS, (reference, floor))}
    if arrays["reference"].shape[1:] != arrays["floor"].shape[1:]:
        raise DataError(f"{path}: reference {arrays['reference'].shape[1:]} and floor {arrays['floor'].shape[1:]} "
                        "reconstructions must share one image size")
    return save_npz(path, arrays)


def load_reconstruction_batch(path: PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read :func:`save_reconstruction_batch`'s file: ``(reference, floor)`` uint8 ``(N, H, W, 3)`` arrays (no
    pickles; a missing key, another dtype or layout is a :class:`NpzFormatError` naming the file and key)."""
    path = Path(path)
    keys = npz_keys(path)
    arrays = []
    for key in RECONSTRUCTION_KEYS:
        require_key(path, key, keys)
        images = load_array(path, key)
        check_images_header(path, key, images.shape, images.dtype)
        arrays.append(images)
    if arrays[0].shape[1:] != arrays[1].shape[1:]:
        raise NpzFormatError(f"{path}: 'reference' {arrays[0].shape[1:]} and 'floor' {arrays[1].shape[1:]} images "
                             "differ in size")
    return arrays[0], arrays[1]
