"""Tests for maetok.data: image decoding of every odd mode, resize / crop / pad, tensor <-> uint8, PNG grids,
Fashion-MNIST (packaged and synthetic IDX files), ImageFolder with bad files, the stable split, build_dataset."""

from __future__ import annotations

import gzip
import logging
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import needs_fashion_mnist
from PIL import Image
from torch.utils.data import DataLoader

from maetok.data import (
    BadImageError,
    DatasetNotFoundError,
    FashionMNIST,
    ImageFolder,
    build_dataset,
    hash_split,
    iter_batches,
    load_image,
    read_idx,
    resize_center_crop,
    save_image_grid,
    save_side_by_side,
    split_paths,
    to_tensor,
    to_uint8,
)

# ------------------------------------------------------------------------------------------------ fixtures


def _gradient_rgb(height: int, width: int) -> np.ndarray:
    rows = np.linspace(0, 255, height, dtype=np.float64)[:, None]
    cols = np.linspace(0, 255, width, dtype=np.float64)[None, :]
    red = np.broadcast_to(rows, (height, width))
    green = np.broadcast_to(cols, (height, width))
    blue = np.full((height, width), 90.0)
    return np.stack([red, green, blue], axis=-1).round().astype(np.uint8)


def _write_truncated_jpeg(path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, format="JPEG", quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture
def messy_folder(tmp_path: Path) -> Path:
    """Three class folders: 6 readable images of odd modes / sizes and 3 unreadable files."""
    root = tmp_path / "messy"
    for name in ("cats", "dogs", "fish"):
        (root / name).mkdir(parents=True)
    Image.fromarray(_gradient_rgb(40, 60)).save(root / "cats" / "good.jpg", quality=95)
    (root / "cats" / "good.txt").write_text("  a cat on a mat \n", encoding="utf-8")
    Image.new("L", (33, 33), 77).save(root / "cats" / "gray.png")
    Image.new("RGB", (36, 36), (200, 50, 30)).convert("CMYK").save(root / "dogs" / "cmyk.jpeg", quality=95)
    Image.fromarray(np.full((34, 34), 100 * 257, dtype=np.uint16)).save(root / "dogs" / "deep16.png")
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[:, :16] = (255, 0, 0, 0)  # fully transparent red -> background white
    rgba[:, 16:] = (0, 0, 255, 255)  # opaque blue
    Image.fromarray(rgba, mode="RGBA").save(root / "dogs" / "rgba.png")
    Image.fromarray(_gradient_rgb(3, 5)).save(root / "fish" / "tiny.png")
    _write_truncated_jpeg(root / "fish" / "truncated.jpg")
    (root / "fish" / "empty.jpg").write_bytes(b"")
    (root / "fish" / "text.png").write_text("this is not an image\n")
    (root / "fish" / ".hidden.jpg").write_bytes(b"junk")  # hidden files are ignored
    (root / "fish" / "notes.md").write_text("ignored: not an image extension")
    return root


VALID_FILES = {"cats/good.jpg", "cats/gray.png", "dogs/cmyk.jpeg", "dogs/deep16.png", "dogs/rgba.png", "fish/tiny.png"}
BAD_FILES = {"fish/truncated.jpg", "fish/empty.jpg", "fish/text.png"}


# ------------------------------------------------------------------------------------------- load_image


def test_load_image_modes(tmp_path: Path) -> None:
    # 16-bit grayscale: scaled by 255 / 65535, not clipped (257 * k -> k)
    ramp16 = (np.arange(256, dtype=np.uint32) * 257).astype(np.uint16).reshape(16, 16)
    Image.fromarray(ramp16).save(tmp_path / "ramp16.png")
    gray = load_image(tmp_path / "ramp16.png", channels=1)
    assert gray.shape == (16, 16, 1) and gray.dtype == np.uint8
    np.testing.assert_array_equal(gray[..., 0], np.arange(256, dtype=np.uint8).reshape(16, 16))
    rgb = load_image(tmp_path / "ramp16.png", channels=3)
    assert rgb.shape == (16, 16, 3) and (rgb[..., 0] == rgb[..., 2]).all()

    # CMYK jpeg comes back as the RGB colour it was made from
    Image.new("RGB", (16, 16), (200, 50, 30)).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    assert np.abs(load_image(tmp_path / "cmyk.jpg")[8, 8].astype(int) - (200, 50, 30)).max() <= 4

    # palette with a transparent index: transparent pixels become the background (white), others keep colour
    palette_image = Image.new("P", (4, 4), 0)
    palette_image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette_image.putpixel((0, 0), 1)
    palette_image.save(tmp_path / "p.gif", transparency=0)
    decoded = load_image(tmp_path / "p.gif")
    np.testing.assert_array_equal(decoded[0, 0], (0, 0, 255))
    np.testing.assert_array_equal(decoded[3, 3], (255, 255, 255))
    assert (load_image(tmp_path / "p.gif", background=(0, 0, 0))[3, 3] == 0).all()

    # LA with alpha 0 -> white; mode '1' -> 0 / 255; float image in [0, 1] -> 0..255
    Image.new("LA", (2, 2), (0, 0)).save(tmp_path / "la.png")
    assert (load_image(tmp_path / "la.png", channels=1) == 255).all()
    Image.new("1", (3, 3), 1).save(tmp_path / "one.png")
    assert (load_image(tmp_path / "one.png") == 255).all()
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(tmp_path / "f.tif")
    np.testing.assert_array_equal(load_image(tmp_path / "f.tif", channels=1)[0, :, 0], (0, 128, 255))

    # RGB -> L uses the luma weights
    Image.new("RGB", (2, 2), (255, 0, 0)).save(tmp_path / "red.png")
    assert abs(int(load_image(tmp_path / "red.png", channels=1)[0, 0, 0]) - 76) <= 1


def test_load_image_applies_exif_orientation(tmp_path: Path) -> None:
    pixels = np.zeros((10, 30, 3), dtype=np.uint8)
    pixels[:, :5] = 255  # white stripe on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(pixels).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    shown = load_image(tmp_path / "rotated.jpg")
    assert shown.shape == (30, 10, 3)
    assert shown[:5].mean() > 200 and shown[10:].mean() < 30  # the stripe is now at the top


def test_load_image_bad_files(tmp_path: Path) -> None:
    _write_truncated_jpeg(tmp_path / "truncated.jpg")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello")
    cases = {
        "truncated.jpg": "truncated",
        "empty.png": "0 bytes",
        "text.png": "not a recognised",
        "gone.png": "not accessible",
    }
    for name, reason in cases.items():
        with pytest.raises(BadImageError) as info:
            load_image(tmp_path / name)
        assert name in str(info.value) and reason in info.value.reason
        assert load_image(tmp_path / name, errors="none") is None
    with pytest.raises(ValueError, match="channels"):
        load_image(tmp_path / "text.png", channels=4)


# ---------------------------------------------------------------------------------- resize / tensor / grid


def test_resize_center_crop_and_pad() -> None:
    wide = _gradient_rgb(40, 60)
    cropped = resize_center_crop(wide, 32)
    assert cropped.shape == (32, 32, 3) and cropped.dtype == np.uint8
    # shorter side -> 32, so width 48 and a crop of 8 pixels on each side: the green ramp is centered
    assert abs(int(cropped[:, 0, 1].mean()) + int(cropped[:, -1, 1].mean()) - 255) <= 6
    assert resize_center_crop(_gradient_rgb(3, 5), 32).shape == (32, 32, 3)  # upscaled
    big_constant = np.full((300, 200, 1), 123, dtype=np.uint8)  # box halving path, then bicubic
    np.testing.assert_array_equal(resize_center_crop(big_constant, 32), np.full((32, 32, 1), 123, np.uint8))
    np.testing.assert_array_equal(resize_center_crop(wide[:32, :32], 32), wide[:32, :32])  # already the size
    np.testing.assert_array_equal(resize_center_crop(wide[:32], 32), wide[:32, 14:46])  # crop only, no resampling

    digit = np.random.default_rng(1).integers(1, 256, (28, 28), dtype=np.uint8)
    padded = resize_center_crop(digit, 32, mode="pad")
    assert padded.shape == (32, 32, 1)
    np.testing.assert_array_equal(padded[2:30, 2:30, 0], digit)
    assert padded[:2].max() == 0 and padded[30:].max() == 0 and padded[:, :2].max() == 0 and padded[:, 30:].max() == 0
    assert resize_center_crop(np.zeros((64, 32), np.uint8), 32, mode="pad").shape == (32, 32, 1)
    with pytest.raises(ValueError, match="mode"):
        resize_center_crop(digit, 32, mode="stretch")


def test_tensor_uint8_round_trip() -> None:
    every_value = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)
    tensor = to_tensor(every_value)
    assert tensor.shape == (1, 16, 16) and tensor.dtype == torch.float32
    assert tensor.min() == -1.0 and tensor.max() == 1.0
    np.testing.assert_array_equal(to_uint8(tensor, channels_last=True).numpy(), every_value)  # exact for all 256 values
    batch = to_tensor(np.stack([every_value, every_value]))
    assert batch.shape == (2, 1, 16, 16)
    extremes = torch.tensor([-3.0, -1.0, 0.0, 1.0, 5.0]).view(1, 1, 5)
    np.testing.assert_array_equal(to_uint8(extremes, channels_last=True).numpy()[0, :, 0], (0, 0, 128, 255, 255))


def test_save_image_grid_and_side_by_side(tmp_path: Path) -> None:
    images = torch.linspace(-1, 1, 5).view(5, 1, 1, 1).expand(5, 1, 8, 8)
    path = save_image_grid(images, tmp_path / "sub" / "grid.png", nrow=3, pad=2)
    with Image.open(path) as grid:
        assert grid.format == "PNG" and grid.mode == "L"
        assert grid.size == (3 * (8 + 2) + 2, 2 * (8 + 2) + 2)  # (width, height)
        pixels = np.asarray(grid)
    assert pixels[2, 2] == 0 and pixels[12, 12 + 10] == 255  # first tile black, fifth tile white
    assert pixels[0, 0] == 255 and pixels[12, 32 - 8] == 255  # border and the empty sixth slot are white

    rgb = torch.rand(3, 3, 6, 6) * 2 - 1
    side = save_side_by_side(rgb, -rgb, tmp_path / "pairs.png", pairs_per_row=2, pad=1)
    with Image.open(side) as pairs:
        assert pairs.mode == "RGB" and pairs.size == (4 * 7 + 1, 2 * 7 + 1)
        pairs_pixels = np.asarray(pairs)
    np.testing.assert_array_equal(pairs_pixels[1:7, 8:14], to_uint8(-rgb[0], channels_last=True).numpy())  # reconstruction of #0
    with pytest.raises(ValueError, match="shape"):
        save_side_by_side(rgb, rgb[:2], tmp_path / "bad.png")


# ---------------------------------------------------------------------------------------- Fashion-MNIST


def _write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_synthetic_idx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = np.random.default_rng(0).integers(0, 256, (7, 28, 28), dtype=np.uint8)
    labels = np.array([0, 1, 2, 3, 4, 5, 9], dtype=np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images, 0x803)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels, 0x801)
    monkeypatch.setenv("MAETOK_FASHION_MNIST", str(tmp_path))
    dataset = FashionMNIST("test", image_size=32)
    assert len(dataset) == 7 and dataset.num_classes == 10 and dataset.class_names[9] == "Ankle boot"
    image, label = dataset[6]
    assert image.shape == (1, 32, 32) and label == 9
    np.testing.assert_array_equal(to_uint8(image, channels_last=True).numpy()[2:30, 2:30, 0], images[6])
    assert (image[:, :2] == -1).all() and (image[:, :, 30:] == -1).all()
    batch_images, batch_labels = dataset.get_batch([6, 0])
    assert torch.equal(batch_images[0], image) and batch_labels.tolist() == [9, 0]
    small = FashionMNIST("val", root=tmp_path, image_size=14, channels=3)
    assert small[0][0].shape == (3, 14, 14) and torch.equal(small[0][0][0], small[0][0][2])

    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels, 0x803)  # wrong magic
    with pytest.raises(ValueError, match="magic number 0x00000803, expected 0x00000801"):
        FashionMNIST("test")
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
        FashionMNIST("train")  # no train files in tmp_path
    (tmp_path / "short.idx").write_bytes(struct.pack(">IIII", 0x803, 2, 28, 28) + b"\0" * 10)
    with pytest.raises(ValueError, match="needs"):
        read_idx(tmp_path / "short.idx")


@needs_fashion_mnist
def test_fashion_mnist_packaged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MAETOK_FASHION_MNIST", raising=False)
    start = time.perf_counter()
    train = FashionMNIST("train")
    assert time.perf_counter() - start < 5.0  # about 0.3 s here
    test = build_dataset("fashion-mnist", "test", image_size=32, channels=1)
    assert len(train) == 60000 and len(test) == 10000
    assert train.channels == 1 and train.image_size == 32 and train.num_classes == 10
    image, label = train[0]
    assert image.shape == (1, 32, 32) and image.dtype == torch.float32
    assert label == 9 and test[0][1] == 9  # both first images are ankle boots
    assert image.min() >= -1 and image.max() <= 1 and image.max() > 0.5
    assert (image[:, :2] == -1).all() and (image[:, -2:] == -1).all()  # black padding
    assert train.labels.dtype == np.int64 and set(np.unique(train.labels)) == set(range(10))
    np.testing.assert_array_equal(np.bincount(train.labels), np.full(10, 6000))
    loader = DataLoader(test, batch_size=256, shuffle=False, num_workers=0)
    images, labels = next(iter(loader))
    assert images.shape == (256, 1, 32, 32) and labels.min() >= 0 and labels.max() <= 9


# ------------------------------------------------------------------------------------------- ImageFolder


def test_image_folder_leaves_bad_files_out(messy_folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    dataset = ImageFolder(messy_folder, image_size=32, channels=3)
    assert len(dataset) == 9 and set(dataset.relative_paths) == VALID_FILES | BAD_FILES
    assert dataset.relative_paths == sorted(dataset.relative_paths)
    assert dataset.class_names == ["cats", "dogs", "fish"] and dataset.num_classes == 3
    assert dataset.labels.tolist() == [0, 0, 1, 1, 1, 2, 2, 2, 2]
    valid_tensors = {
        rel: dataset.load(i) for i, rel in enumerate(dataset.relative_paths) if rel in VALID_FILES
    }

    skipped: list = []
    batches = list(iter_batches(dataset, 4, skipped=skipped))
    images = torch.cat([batch.images for batch in batches])
    labels = torch.cat([batch.labels for batch in batches])
    indices = torch.cat([batch.indices for batch in batches]).tolist()
    assert images.shape == (6, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    order = dataset.relative_paths
    assert {order[i] for i in indices} == VALID_FILES  # one row per readable file, none made up
    for image, label, index in zip(images, labels, indices):  # each row is its own file
        assert torch.equal(image, valid_tensors[order[index]]) and label == dataset.labels[index]
    assert {item.file for item in skipped} == BAD_FILES
    assert dataset.num_skipped == 3 and set(dataset.skipped_files) == BAD_FILES
    for rel in BAD_FILES:  # an item is what its file holds, or an error naming the file
        with pytest.raises(BadImageError, match=rel):
            dataset[order.index(rel)]

    # decoded values: 16-bit constant 100 * 257 -> 100; transparent half -> white, opaque half -> blue
    deep = to_uint8(valid_tensors["dogs/deep16.png"], channels_last=True).numpy()
    assert (deep == 100).all()
    rgba = to_uint8(valid_tensors["dogs/rgba.png"], channels_last=True).numpy()
    np.testing.assert_array_equal(rgba[16, 2], (255, 255, 255))
    np.testing.assert_array_equal(rgba[16, 29], (0, 0, 255))
    cmyk = to_uint8(valid_tensors["dogs/cmyk.jpeg"], channels_last=True).numpy()
    assert np.abs(cmyk[16, 16].astype(int) - (200, 50, 30)).max() <= 4
    with caplog.at_level(logging.WARNING, logger="maetok.data.datasets"):
        assert dataset.log_skipped() == 3
    assert sum("3 unreadable image(s) skipped" in record.message for record in caplog.records) == 1  # one line


def test_image_folder_workers_share_skip_count(messy_folder: Path) -> None:
    dataset = ImageFolder(messy_folder, image_size=16, channels=1)
    images = torch.cat([batch.images for batch in iter_batches(dataset, 3, num_workers=1, skipped=[])])
    assert images.shape == (6, 1, 16, 16)
    assert dataset.num_skipped == 3 and set(dataset.skipped_files) == BAD_FILES


def test_image_folder_scan_captions_and_gray(messy_folder: Path) -> None:
    dataset = ImageFolder(messy_folder, image_size=24, channels=1, return_captions=True)
    header_only = dataset.scan(full_decode=False)
    assert {rel for rel, _ in header_only} == {"fish/empty.jpg", "fish/text.png"}  # truncation needs decoding
    assert len(dataset) == 7 and dataset.labels.tolist() == [0, 0, 1, 1, 1, 2, 2]
    assert {rel for rel, _ in dataset.scan()} == {"fish/truncated.jpg"}
    assert len(dataset) == 6 and set(dataset.relative_paths) == VALID_FILES
    assert dataset.num_skipped == 3 and set(dataset.skipped_files) == BAD_FILES
    image, label, caption = dataset[0]
    assert image.shape == (1, 24, 24) and label == 0 and caption == "a cat on a mat"
    assert dataset[1][2] == ""  # no caption file
    assert to_uint8(dataset[1][0], channels_last=True).numpy().max() == 77  # gray.png constant 77


def test_image_folder_labels_and_errors(tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    flat.mkdir()
    for index in range(3):
        Image.new("RGB", (8, 8), (index * 50, 0, 0)).save(flat / f"img{index}.png")
    unlabeled = ImageFolder(flat, image_size=8)
    assert unlabeled.num_classes == 0 and unlabeled.class_names == [] and unlabeled.labels.tolist() == [0, 0, 0]
    (flat / "extra").mkdir()
    Image.new("RGB", (8, 8)).save(flat / "extra" / "a.png")
    mixed = ImageFolder(flat, image_size=8)
    assert mixed.class_names == ["extra"] and mixed.labels.tolist() == [0, -1, -1, -1]
    assert ImageFolder(flat, image_size=8, use_classes=False).num_classes == 0

    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "missing", image_size=8)
    (tmp_path / "no_images").mkdir()
    with pytest.raises(DatasetNotFoundError, match="no images found"):
        ImageFolder(tmp_path / "no_images", image_size=8)
    with pytest.raises(ValueError, match="split"):
        ImageFolder(flat, image_size=8, split="holdout")


# ------------------------------------------------------------------------------------ split and factory


def test_hash_split_is_stable_and_disjoint(tmp_path: Path) -> None:
    # fixed values: the assignment must never change between versions or machines
    assert [hash_split(f"class_{i}/img_{i}.jpg", 0.5) for i in range(8)] == [
        "test", "test", "train", "train", "train", "test", "test", "test"
    ]
    assert hash_split("a/b.jpg", 0.0) == "train" and hash_split("a/b.jpg", 1.0) == "test"
    paths = [f"class_{i % 7}/image_{i:05d}.png" for i in range(2000)]
    test_indices = split_paths(paths, "test", 0.05)
    train_indices = split_paths(paths, "train", 0.05)
    assert set(test_indices).isdisjoint(train_indices) and len(test_indices) + len(train_indices) == 2000
    assert 60 <= len(test_indices) <= 140  # about 5 %
    assert split_paths(paths[:1000], "test", 0.05) == [i for i in test_indices if i < 1000]  # adding files is safe
    assert split_paths(paths, "val", 0.05) == test_indices

    root = tmp_path / "folder"
    for index in range(40):
        (root / f"c{index % 2}").mkdir(parents=True, exist_ok=True)
        Image.new("L", (4, 4), index).save(root / f"c{index % 2}" / f"{index:02d}.png")
    train = ImageFolder(root, image_size=4, channels=1, split="train", holdout_fraction=0.3)
    test = ImageFolder(root, image_size=4, channels=1, split="test", holdout_fraction=0.3)
    again = ImageFolder(root, image_size=4, channels=1, split="test", holdout_fraction=0.3)
    assert set(train.relative_paths).isdisjoint(test.relative_paths)
    assert len(train) + len(test) == 40 and 0 < len(test) < 40
    assert test.relative_paths == again.relative_paths


def test_build_dataset(tmp_path: Path) -> None:
    imagenet = tmp_path / "imagenet"
    for split_dir, classes in (("train", ("n01", "n02", "n03")), ("val", ("n01", "n03"))):
        for class_name in classes:
            (imagenet / split_dir / class_name).mkdir(parents=True)
            Image.new("RGB", (20, 12), (10, 20, 30)).save(imagenet / split_dir / class_name / "x.jpg")
    train = build_dataset(str(imagenet), "train", image_size=16, channels=3)
    val = build_dataset(str(imagenet), "val", image_size=16, channels=3)
    assert len(train) == 3 and train.class_names == ["n01", "n02", "n03"]
    assert len(val) == 2 and val.class_names == train.class_names and val.labels.tolist() == [0, 2]
    assert val[1][0].shape == (3, 16, 16)

    plain = build_dataset(str(imagenet / "train"), "all", image_size=8, channels=1)
    assert isinstance(plain, ImageFolder) and len(plain) == 3 and plain[0][0].shape == (1, 8, 8)
    with pytest.raises(DatasetNotFoundError, match="unknown dataset spec 'cifar-10'"):
        build_dataset("cifar-10", "train", 32, 3)
    with pytest.raises(ValueError, match="is a file"):
        build_dataset(str(imagenet / "train" / "n01" / "x.jpg"), "train", 32, 3)
    with pytest.raises(ValueError, match="'fashion-mnist' has no captions"):  # what the 'text' target asks for
        build_dataset("fashion-mnist", "train", 32, 1, return_captions=True)
