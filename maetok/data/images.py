"""Image I/O and conversions: robust loading, ADM-style resize + center crop, tensor <-> uint8, PNG grids.

Conventions used throughout ``maetok``:

* decoded images are ``np.ndarray`` of dtype uint8 and shape (H, W, C), C = 1 (gray) or 3 (RGB);
* model images are float tensors (C, H, W) or (B, C, H, W) with values in [-1, 1], made by ``u / 127.5 - 1``;
* back to uint8 with ``clamp(127.5 * x + 128, 0, 255)`` truncated to an integer (what ``.to(torch.uint8)``
  does in the reference code bases). The truncation, not round-half-to-even, makes
  ``to_uint8(to_tensor(u)) == u`` exact for every uint8 value ``u`` (127.5 * (u / 127.5 - 1) + 128 = u + 0.5).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from maetok.config import DEFAULT_MAX_IMAGE_PIXELS
from maetok.errors import ConfigError, DataError, NonFiniteError
from maetok.runs import atomic_path

__all__ = [
    "BadImageError",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "pixel_limit",
    "load_image",
    "resize_center_crop",
    "to_tensor",
    "to_rgb",
    "to_uint8",
    "make_image_grid",
    "save_image_grid",
    "save_png",
    "save_side_by_side",
]

PathLike = str | os.PathLike

# modes PIL can turn into RGB / L directly, without alpha and without range issues
_DIRECT_MODES = {"1", "L", "RGB", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"}
_ALPHA_MODES = {"LA", "La", "PA", "RGBA", "RGBa"}
_RESAMPLING = getattr(Image, "Resampling", Image)  # Pillow < 9.1 has the filters on Image itself
_BOX, _BICUBIC = _RESAMPLING.BOX, _RESAMPLING.BICUBIC

# Files whose header announces more pixels than DEFAULT_MAX_IMAGE_PIXELS (maetok.config: ``data.max_image_pixels``,
# ``--max-image-pixels``) are skipped before decoding: 64 megapixels, e.g. 8000 x 8000, about 192 MB decoded as RGB.
# Pillow's own decompression-bomb error (above 2 * ``PIL.Image.MAX_IMAGE_PIXELS``) still applies on top of it.


def pixel_limit(value: int | None, name: str = "max_image_pixels") -> int | None:
    """A pixel limit as given by a user (``data.max_image_pixels``, ``--max-image-pixels``): a positive number
    of pixels, or 0 / None for no limit of ours (returned as None). Anything else raises ``ValueError`` naming
    ``name``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ConfigError(f"{name} must be a number of pixels >= 0 (0: no limit), got {value!r}")
    return int(value) or None


class BadImageError(DataError):
    """An image file that cannot be decoded (missing, empty, truncated, corrupt or of an unknown format).

    Attributes:
        path: the file that failed.
        reason: a short human-readable reason.
    """

    def __init__(self, path: PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image '{self.path}': {reason}")

    def __reduce__(self):  # keep it picklable across DataLoader worker processes
        return (type(self), (self.path, self.reason))


def _scale_16bit_to_8bit(values: np.ndarray) -> np.ndarray:
    """Map 0..65535 to 0..255 with rounding (v * 255 / 65535, so 257 * k -> k and 65535 -> 255)."""
    wide = np.clip(values.astype(np.int64), 0, 65535)
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)


def _high_bit_depth_to_l(img: Image.Image) -> Image.Image:
    """Convert single-channel high-bit-depth modes (I;16*, I, F) to 8-bit 'L' by scaling, never clipping."""
    values = np.asarray(img)
    if img.mode.startswith("I;16"):
        gray8 = _scale_16bit_to_8bit(values)
    elif img.mode == "I":
        # PNG cannot hold 32-bit integers: an 'I' PNG is 16-bit (older Pillow decodes them as 'I').
        low, high = int(values.min()), int(values.max())
        if img.format == "PNG" or (low >= 0 and high <= 65535 and high > 255):
            gray8 = _scale_16bit_to_8bit(values)
        elif low >= 0 and high <= 255:
            gray8 = values.astype(np.uint8)
        else:  # genuine 32-bit data with an unknown range: stretch it
            gray8 = _stretch_to_uint8(values.astype(np.float64))
    elif img.mode == "F":
        values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        low, high = float(values.min()), float(values.max())
        if low >= 0.0 and high <= 1.0:  # normalised float image
            gray8 = np.rint(values * 255.0).astype(np.uint8)
        elif low >= 0.0 and high <= 255.0:
            gray8 = np.rint(values).astype(np.uint8)
        else:
            gray8 = _stretch_to_uint8(values)
    else:  # pragma: no cover - guarded by the caller
        raise ValueError(f"unexpected mode {img.mode}")
    return Image.fromarray(np.ascontiguousarray(gray8), mode="L")


def _stretch_to_uint8(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint((values - low) * (255.0 / (high - low))).astype(np.uint8)


def _composite_on_background(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Flatten an image with alpha over an opaque background colour; returns mode 'RGB'."""
    rgba = img.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, tuple(background) + (255,))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


def _to_target_mode(img: Image.Image, channels: int, background: tuple[int, int, int]) -> Image.Image:
    """Convert a decoded PIL image of any mode to 'RGB' (channels=3) or 'L' (channels=1)."""
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        img = _high_bit_depth_to_l(img)
    elif mode == "P":
        has_alpha = "transparency" in img.info or img.palette is not None and img.palette.mode == "RGBA"
        img = _composite_on_background(img, background) if has_alpha else img.convert("RGB")
    elif mode in _ALPHA_MODES:
        img = _composite_on_background(img, background)
    elif mode not in _DIRECT_MODES:
        # anything else Pillow can decode (e.g. 'BGR;16'); let Pillow try and report failures as bad images
        img = img.convert("RGB")
    target = "RGB" if channels == 3 else "L"
    if img.mode != target:
        if img.mode in ("LAB", "HSV") and target == "L":
            img = img.convert("RGB")
        img = img.convert(target)
    return img


def load_image(
    path: PathLike,
    channels: int = 3,
    *,
    errors: Literal["raise", "none"] = "raise",
    background: tuple[int, int, int] = (255, 255, 255),
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    draft_size: int | None = None,
) -> np.ndarray | None:
    """Decode an image file to a uint8 array of shape (H, W, channels).

    Every Pillow mode is handled: 1, L, P (with transparency), LA, RGBA, CMYK, YCbCr, I;16 / I (16-bit,
    scaled to 8 bits with ``v * 255 / 65535``, never clipped), F (float) ... Transparent pixels are
    composited over ``background`` (white by default). The EXIF orientation tag is applied. For animated
    files (GIF, multi-page TIFF) the first frame is used.

    Args:
        path: image file.
        channels: 3 for RGB, 1 for grayscale (ITU-R 601-2 luma).
        errors: "raise" raises ``BadImageError`` for missing, empty, truncated, corrupt or non-image files;
            "none" returns None for them instead.
        background: RGB colour (0..255) behind transparent pixels.
        max_pixels: a file whose header announces more than ``width * height > max_pixels`` pixels is a bad
            image ("too large"), refused before anything is decoded; None: no limit of ours.
        draft_size: the side length the caller will bring the image to. A JPEG is then decoded at a reduced
            scale (1/2, 1/4 or 1/8, Pillow's ``draft`` mode) as long as both sides stay >= ``draft_size``, so a
            large photo costs little for a small model. None (default): decode at full size. Other formats are
            always decoded at full size.

    Returns:
        uint8 array (H, W, channels), or None (only with errors="none").
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if errors not in ("raise", "none"):
        raise ValueError(f"errors must be 'raise' or 'none', got {errors!r}")
    if max_pixels is not None and max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive (or None for no limit), got {max_pixels}")
    if draft_size is not None and draft_size <= 0:
        raise ValueError(f"draft_size must be positive (or None), got {draft_size}")
    try:
        return _load_image_or_raise(path, channels, background, max_pixels, draft_size)
    except BadImageError:
        if errors == "none":
            return None
        raise


def displayed_size(path: PathLike) -> tuple[int, int]:
    """``(width, height)`` of a readable image file as :func:`load_image` shows it before any ``draft_size``
    reduction (EXIF orientation applied), from its header."""
    with Image.open(path) as img:
        width, height = img.size
        try:
            orientation = img.getexif().get(0x0112, 1)
        except Exception:  # a broken EXIF block: load_image ignores it too
            orientation = 1
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _load_image_or_raise(
    path: PathLike, channels: int, background: tuple[int, int, int], max_pixels: int | None, draft_size: int | None
) -> np.ndarray:
    try:
        size_bytes = os.path.getsize(path)
    except OSError as error:
        raise BadImageError(path, f"file not accessible ({error.strerror or error})") from None
    if size_bytes == 0:
        raise BadImageError(path, "empty file (0 bytes)")
    try:
        with Image.open(path) as img:  # reads the header only
            width, height = img.size
            if max_pixels is not None and width * height > max_pixels:
                raise BadImageError(
                    path, f"too large: {width}x{height} = {width * height} pixels, above the limit of {max_pixels} "
                    "(data.max_image_pixels / --max-image-pixels)"
                )
            img.seek(0)  # first frame of animations
            if draft_size is not None and img.format == "JPEG":
                img.draft(img.mode, (draft_size, draft_size))  # DCT scaling; both sides stay >= draft_size
            img.load()  # decode now: truncated / corrupt data raises here
            if img.width <= 0 or img.height <= 0:
                raise BadImageError(path, f"image has zero size {img.width}x{img.height}")
            try:
                img = ImageOps.exif_transpose(img) or img
            except Exception:  # a broken EXIF block must not lose an otherwise fine image
                pass
            img = _to_target_mode(img, channels, background)
            array = np.array(img, dtype=np.uint8)  # a writable copy
    except BadImageError:
        raise
    except UnidentifiedImageError:
        raise BadImageError(path, "not a recognised image format") from None
    except Image.DecompressionBombError as error:
        raise BadImageError(path, f"too large: {error}") from None
    except OSError as error:
        raise BadImageError(path, f"corrupt or truncated ({error})") from None
    except Exception as error:  # decoders raise SyntaxError, ValueError, struct.error ... on bad data
        raise BadImageError(path, f"{type(error).__name__}: {error}") from None
    if array.ndim == 2:
        array = array[:, :, None]
    return np.ascontiguousarray(array)


def _as_hwc_uint8(img: np.ndarray | Image.Image) -> np.ndarray:
    if isinstance(img, Image.Image):
        img = np.asarray(img)
    if not isinstance(img, np.ndarray):
        raise TypeError(f"expected a numpy array (H, W, C) or a PIL image, got {type(img).__name__}")
    if img.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got dtype {img.dtype}")
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in (1, 3):
        raise ValueError(f"expected an image of shape (H, W) or (H, W, 1|3), got {tuple(img.shape)}")
    if img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f"image has zero size {tuple(img.shape)}")
    return img


def _to_pil(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(arr[:, :, 0] if arr.shape[2] == 1 else arr))


def _from_pil(img: Image.Image) -> np.ndarray:
    array = np.array(img, dtype=np.uint8)  # a writable copy
    return np.ascontiguousarray(array[:, :, None] if array.ndim == 2 else array)


def resize_center_crop(
    img: np.ndarray | Image.Image,
    size: int,
    mode: Literal["crop", "pad"] = "crop",
    pad_value: int = 0,
) -> np.ndarray:
    """Bring an image to (size, size).

    mode="crop" (default; the ADM / guided-diffusion center crop used for ImageNet FID references): halve with
    a box filter while the shorter side is >= 2 * size, resize with bicubic so the shorter side is exactly
    ``size`` (smaller images are upscaled), then crop the center.

    mode="pad" (Fashion-MNIST style, e.g. 28 -> 32): images larger than ``size`` are first shrunk
    (bicubic, aspect kept) so the longer side is ``size``; the image is then centered on a
    (size, size) canvas filled with ``pad_value`` (0 = black, which maps to -1 after ``to_tensor``).

    Args:
        img: uint8 array (H, W), (H, W, 1) or (H, W, 3), or a PIL image of mode L / RGB.
        size: output side length in pixels.

    Returns:
        uint8 array (size, size, C).
    """
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    arr = _as_hwc_uint8(img)
    height, width, num_channels = arr.shape
    if mode == "crop":
        if height == size and width == size:
            return arr
        if min(height, width) != size:
            pil = _to_pil(arr)
            while min(pil.size) >= 2 * size:
                pil = pil.resize((pil.width // 2, pil.height // 2), resample=_BOX)
            scale = size / min(pil.size)
            new_size = (max(size, round(pil.width * scale)), max(size, round(pil.height * scale)))
            pil = pil.resize(new_size, resample=_BICUBIC)
            arr = _from_pil(pil)
            height, width = arr.shape[:2]
        top, left = (height - size) // 2, (width - size) // 2
        return np.ascontiguousarray(arr[top : top + size, left : left + size])
    if mode == "pad":
        if height > size or width > size:
            scale = size / max(height, width)
            new_size = (max(1, min(size, round(width * scale))), max(1, min(size, round(height * scale))))
            arr = _from_pil(_to_pil(arr).resize(new_size, resample=_BICUBIC))
            height, width = arr.shape[:2]
        canvas = np.full((size, size, num_channels), pad_value, dtype=np.uint8)
        top, left = (size - height) // 2, (size - width) // 2
        canvas[top : top + height, left : left + width] = arr
        return canvas
    raise ValueError(f"mode must be 'crop' or 'pad', got {mode!r}")


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 image(s) to float32 in [-1, 1] (``u / 127.5 - 1``), channels first.

    Args:
        img: uint8 array (H, W), (H, W, C) or a batch (B, H, W, C).

    Returns:
        float32 tensor (C, H, W) or (B, C, H, W) in [-1, 1].
    """
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8:
        kind = img.dtype if isinstance(img, np.ndarray) else type(img).__name__
        raise TypeError(f"to_tensor expects a uint8 numpy array, got {kind}")
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim not in (3, 4):
        raise ValueError(f"expected (H, W), (H, W, C) or (B, H, W, C), got shape {tuple(img.shape)}")
    if not img.flags.writeable:
        img = img.copy()
    tensor = torch.from_numpy(np.ascontiguousarray(img))
    tensor = tensor.permute(2, 0, 1) if img.ndim == 3 else tensor.permute(0, 3, 1, 2)
    return tensor.to(torch.float32).div_(127.5).sub_(1.0).contiguous()


def to_uint8(images: torch.Tensor | np.ndarray, channels_last: bool = False) -> torch.Tensor:
    """Float images in [-1, 1] -> uint8: ``trunc(clamp(127.5 * x + 128, 0, 255))``, the one conversion of the package.

    The truncation equals rounding ``127.5 (x + 1)`` to the nearest level (the DiT / ADM / MAETok sampling code)
    and makes ``to_uint8(to_tensor(u)) == u`` exact. images: float tensor / array of any shape, typically
    ``(B, C, H, W)``; uint8 input is returned as it is. ``channels_last``: ``(C, H, W)`` / ``(B, C, H, W)`` come
    back as ``(H, W, C)`` / ``(B, H, W, C)`` (the ``arr_0`` layout of ADM ``.npz`` files). NaN or inf raise
    ``ValueError``: a broken model must not pass for gray images.
    """
    x = torch.as_tensor(images).detach()
    if x.dtype == torch.uint8:
        values = x
    elif not x.is_floating_point():
        raise TypeError(f"to_uint8 expects float images in [-1, 1] or uint8, got dtype {x.dtype}")
    elif x.numel() and not bool(torch.isfinite(x).all()):
        raise NonFiniteError("to_uint8: images contain NaN or inf")
    else:
        values = torch.clamp(127.5 * x.float() + 128.0, 0.0, 255.0).to(torch.uint8)  # to(uint8) truncates
    if channels_last:
        if values.ndim not in (3, 4):
            raise ValueError(f"expected (C, H, W) or (B, C, H, W), got shape {tuple(values.shape)}")
        values = values.movedim(-3, -1).contiguous()
    return values


def to_rgb(images: torch.Tensor | np.ndarray, what: str = "images") -> torch.Tensor | np.ndarray:
    """Gray images as RGB by repeating the channel: ``(B, 1, H, W)`` tensors -> ``(B, 3, H, W)`` (a view),
    ``(..., H, W, 1)`` numpy arrays (channels last) -> ``(..., H, W, 3)``; RGB images are returned unchanged. A
    tensor that is not ``(B, 1 or 3, H, W)`` raises ``ValueError`` naming ``what`` reads it."""
    if isinstance(images, np.ndarray):
        return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"{what} expects images (B, 1 or 3, H, W), got shape {tuple(images.shape)}")
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def make_image_grid(
    images: torch.Tensor | Sequence[torch.Tensor], nrow: int = 8, pad: int = 2, pad_value: float = 1.0
) -> np.ndarray:
    """Tile images into one uint8 grid.

    Args:
        images: (B, C, H, W) in [-1, 1] or uint8 (or a list of (C, H, W)), C = 1 or 3; NaN is drawn gray.
        nrow: images per grid row.
        pad: pixels of border around and between images.
        pad_value: border colour in [-1, 1] (1.0 = white).

    Returns:
        uint8 array (rows * (H + pad) + pad, cols * (W + pad) + pad, C), cols = min(nrow, B).
    """
    if not isinstance(images, torch.Tensor):
        images = torch.stack(list(images))
    if images.ndim != 4 or images.shape[1] not in (1, 3) or images.shape[0] == 0:
        raise ValueError(f"expected images (B, C, H, W) with B >= 1 and C in (1, 3), got {tuple(images.shape)}")
    if nrow <= 0 or pad < 0:
        raise ValueError(f"nrow must be positive and pad non-negative, got nrow={nrow}, pad={pad}")
    batch, num_channels, height, width = images.shape
    cols = min(nrow, batch)
    rows = math.ceil(batch / cols)
    drawable = torch.nan_to_num(images.detach().float(), nan=0.0) if images.is_floating_point() else images
    tiles = to_uint8(drawable, channels_last=True).cpu().numpy()
    fill = to_uint8(torch.full((1, 1, 1), float(pad_value)), channels_last=True)[0, 0, 0].numpy()
    grid = np.full((rows * (height + pad) + pad, cols * (width + pad) + pad, num_channels), fill, dtype=np.uint8)
    for index in range(batch):
        row, col = divmod(index, cols)
        top, left = pad + row * (height + pad), pad + col * (width + pad)
        grid[top : top + height, left : left + width] = tiles[index]
    return grid


def save_image_grid(
    images: torch.Tensor | Sequence[torch.Tensor],
    path: PathLike,
    nrow: int = 8,
    pad: int = 2,
    pad_value: float = 1.0,
) -> Path:
    """Write a grid of images (B, C, H, W) in [-1, 1] as a PNG (grayscale for C=1, RGB for C=3).

    The PNG is (rows * (H + pad) + pad) pixels high and (cols * (W + pad) + pad) wide, cols = min(nrow, B).
    Parent folders are created. Returns the path written.
    """
    return save_png(make_image_grid(images, nrow=nrow, pad=pad, pad_value=pad_value), path)


def save_png(image: np.ndarray, path: PathLike) -> Path:
    """Write one uint8 image ``(H, W, C)``, C in (1, 3), as a PNG, atomically (:func:`maetok.runs.atomic_path`:
    never a partial PNG under ``path``); parent folders are created. Returns the path."""
    with atomic_path(path, image.nbytes) as tmp:
        _to_pil(image).save(tmp, format="PNG")
    return Path(path)


def save_side_by_side(
    originals: torch.Tensor,
    reconstructions: torch.Tensor,
    path: PathLike,
    pairs_per_row: int = 4,
    pad: int = 2,
    pad_value: float = 1.0,
) -> Path:
    """Write originals next to their reconstructions as one PNG: each row holds ``pairs_per_row`` pairs
    laid out ``original_0, reconstruction_0, original_1, reconstruction_1, ...``.

    Args:
        originals, reconstructions: (B, C, H, W) in [-1, 1], same shape.
    """
    if originals.shape != reconstructions.shape:
        raise ValueError(
            f"originals {tuple(originals.shape)} and reconstructions {tuple(reconstructions.shape)} differ in shape"
        )
    if originals.ndim != 4:
        raise ValueError(f"expected (B, C, H, W), got {tuple(originals.shape)}")
    paired = torch.stack([originals.detach().cpu(), reconstructions.detach().cpu()], dim=1)  # (B, 2, C, H, W)
    paired = paired.flatten(0, 1)
    return save_image_grid(paired, path, nrow=2 * pairs_per_row, pad=pad, pad_value=pad_value)
