"""Nothing lost, nothing silently wrong (issue 12, item 1): an unreadable image leaves no row and is counted and
named; every input of `maetok reconstruct` gets its own output; an image folder has one class list for all its
splits; folder scans walk each real folder once and report what they leave out; a pixel limit read from the
header, and JPEG draft decoding. Ends with a folder of more than 50 malformed or odd files, built here, going
through train-tokenizer, cache-latents, reconstruct and eval-recon."""

from __future__ import annotations

import json
import logging
import os
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_cfg
from PIL import Image
from safetensors.torch import load_file

from maetok.cli import build_parser, main
from maetok.config import ConfigError, DataConfig, TokenizerTrainConfig, load_config
from maetok.data import (
    DEFAULT_MAX_IMAGE_PIXELS,
    BadImageError,
    DatasetSubset,
    ImageFolder,
    build_dataset,
    draw_order,
    hash_split,
    iter_batches,
    list_image_files,
    load_image,
    scan_image_folder,
    subset_indices,
)
from maetok.data.latents import LatentDataset, read_shard_skips, read_skipped
from maetok.encode import cache_latents, reconstruct_files, reconstruction_paths
from maetok.models.tokenizer import MAETok
from maetok.train.tokenizer import TokenizerTrainer

LOGGER = "maetok.data.datasets"


def _noise(height: int, width: int, seed: int, channels: int = 3) -> np.ndarray:
    shape = (height, width, channels) if channels > 1 else (height, width)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _save(path: Path, image: Image.Image, **options) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG signature and IHDR announcing width x height, and no pixel data (huge by header, a few bytes on disk)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# ------------------------------------------------------------------------------------------------ folder scans


def test_scan_walks_each_real_folder_once_and_reports_links(tmp_path: Path, caplog) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    for rel in ("c0/a.png", "c0/deep/b.png", "c1/c.png"):
        _save(root / rel, Image.new("RGB", (4, 4)))
    _save(outside / "o.png", Image.new("RGB", (4, 4)))
    os.symlink(root, root / "c0" / "deep" / "up")  # a loop back to the root
    os.symlink("..", root / "c1" / "parent")  # a second loop
    os.symlink(root / "c1", root / "c1_again")  # a second path to c1: listed once, under c1
    os.symlink(outside, root / "ext")  # a folder outside the root: followed
    os.symlink(root / "ext", root / "ext2")  # ... and a second link to it
    os.symlink(tmp_path / "gone.png", root / "c0" / "gone.png")  # dangling
    os.symlink("y.png", root / "c1" / "x.png")  # a chain of links that never ends
    os.symlink("x.png", root / "c1" / "y.png")
    os.symlink(root / "c0" / "a.png", root / "c1" / "a_link.png")  # a link to a file: followed

    start = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        scan = scan_image_folder(root)
    assert time.perf_counter() - start < 5  # two loops, and the scan ends
    assert scan.files == ["c0/a.png", "c0/deep/b.png", "c1/a_link.png", "c1/c.png", "ext/o.png"]
    assert scan.left_out_by_kind() == {
        "dangling symlink": ["c0/gone.png"],
        "duplicate folder link": ["c1_again", "ext2"],
        "symlink loop": ["c0/deep/up", "c1/parent", "c1/x.png", "c1/y.png"],
    }
    lines = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(lines) == 3  # one line per kind, with the count and the first names
    assert any("left out 4 symlink loop(s): c0/deep/up, c1/parent, c1/x.png, ..." in line for line in lines)
    assert any("left out 1 dangling symlink(s): c0/gone.png" in line for line in lines)
    assert [p.relative_to(root).as_posix() for p in list_image_files(root)] == scan.files
    dataset = ImageFolder(root, image_size=4)
    assert dataset.relative_paths == scan.files and dataset.left_out == scan.left_out
    assert dataset.class_names == ["c0", "c1", "ext"]  # the link's name is the class of what it leads to


# --------------------------------------------------------------------------------------------------- classes


def test_one_class_list_for_every_split(tmp_path: Path) -> None:
    root = tmp_path / "plain"
    names = {}
    for cls in ("a", "b", "c"):
        for i in range(6):
            names[f"{cls}/{i}.png"] = hash_split(f"{cls}/{i}.png", 0.5)
    # class "b" holds only files of the train side, so the test split has no "b" folder
    only_train = [rel for rel, side in names.items() if side == "train" and rel.startswith("b/")]
    keep = [rel for rel in names if not rel.startswith("b/")] + only_train
    for index, rel in enumerate(sorted(keep)):
        _save(root / rel, Image.new("L", (4, 4), index))
    train = build_dataset(str(root), "train", 4, 1, holdout_fraction=0.5)
    test = build_dataset(str(root), "test", 4, 1, holdout_fraction=0.5)
    assert not any(rel.startswith("b/") for rel in test.relative_paths)
    assert train.class_names == test.class_names == ["a", "b", "c"]
    for dataset in (train, test):
        expected = [["a", "b", "c"].index(rel.split("/")[0]) for rel in dataset.relative_paths]
        assert dataset.labels.tolist() == expected
    assert 2 in test.labels.tolist() and 1 not in test.labels.tolist()  # "c" is label 2 in both splits

    imagenet = tmp_path / "imagenet"
    for split_dir, classes in (("train", ("n01", "n02")), ("val", ("n01", "n03"))):
        for cls in classes:
            _save(imagenet / split_dir / cls / "x.png", Image.new("RGB", (4, 4)))
    train, val = build_dataset(str(imagenet), "train", 4, 3), build_dataset(str(imagenet), "val", 4, 3)
    assert train.class_names == val.class_names == ["n01", "n02", "n03"]
    assert train.labels.tolist() == [0, 1] and val.labels.tolist() == [0, 2]


# ---------------------------------------------------------------------------------- pixel limit, JPEG draft


def test_pixel_limit_from_the_header_and_jpeg_draft(tmp_path: Path, capsys) -> None:
    _png_header_only(tmp_path / "huge.png", 9000, 9000)  # 81 megapixels announced, under 100 bytes on disk
    with pytest.raises(BadImageError, match=r"too large: 9000x9000 = 81000000 pixels, above the limit of 64000000"):
        load_image(tmp_path / "huge.png")
    assert DataConfig().max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS == 64_000_000
    for command in ("reconstruct", "cache-latents", "eval-recon"):  # the flag's default is the same limit
        action = next(a for a in build_parser()._subparsers._group_actions[0].choices[command]._actions
                      if a.dest == "max_image_pixels")
        assert action.default == DEFAULT_MAX_IMAGE_PIXELS
    Image.fromarray(_noise(60, 50, 0)).save(tmp_path / "big.png")
    assert load_image(tmp_path / "big.png", max_pixels=3000).shape == (60, 50, 3)
    with pytest.raises(BadImageError, match="50x60"):  # width x height
        load_image(tmp_path / "big.png", max_pixels=2999)
    assert load_image(tmp_path / "big.png", max_pixels=None).shape == (60, 50, 3)

    # JPEG draft: decoded at 1/2, 1/4 or 1/8 scale while both sides stay >= the size asked for
    Image.fromarray(_noise(256, 320, 1)).save(tmp_path / "photo.jpg", quality=90)
    assert load_image(tmp_path / "photo.jpg").shape == (256, 320, 3)
    assert load_image(tmp_path / "photo.jpg", draft_size=32).shape == (32, 40, 3)
    assert load_image(tmp_path / "photo.jpg", draft_size=100).shape == (128, 160, 3)
    assert load_image(tmp_path / "photo.jpg", draft_size=200).shape == (256, 320, 3)  # 1/2 would be too small
    assert load_image(tmp_path / "big.png", draft_size=8).shape == (60, 50, 3)  # only JPEG has draft mode
    folder = ImageFolder(tmp_path, image_size=16, max_image_pixels=100_000)
    assert folder.relative_paths == ["big.png", "huge.png", "photo.jpg"]
    assert folder[2][0].shape == (3, 16, 16)
    with pytest.raises(BadImageError, match="too large") as error:
        folder[1]
    assert error.value.path == "huge.png"  # relative to the folder
    with pytest.raises(BadImageError, match="too large: 50x60"):
        ImageFolder(tmp_path, 16, max_image_pixels=2999)[0]

    with pytest.raises(ConfigError, match="data.max_image_pixels must be a number of pixels >= 0"):
        load_config(TokenizerTrainConfig, "fashion-mnist-maetok", ["data.max_image_pixels=-1"])
    assert load_config(TokenizerTrainConfig, "fashion-mnist-maetok", ["data.max_image_pixels=0"]).data.max_image_pixels == 0
    assert main(["eval-recon", "--model", str(tmp_path), "--data", str(tmp_path), "--max-image-pixels", "-5"]) == 2
    assert "--max-image-pixels must be a number of pixels >= 0" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- no row for a bad file


def test_batches_leave_bad_files_out_and_name_them(tmp_path: Path) -> None:
    for i in range(7):
        Image.fromarray(_noise(8, 8, i)).save(tmp_path / f"{i}.png")
    (tmp_path / "3.png").write_bytes(b"<html>not an image</html>")
    (tmp_path / "5.png").write_bytes(b"")
    dataset = ImageFolder(tmp_path, image_size=8)
    with pytest.raises(BadImageError, match="empty file") as error:  # an item is its own file, or an error naming it
        dataset[5]
    assert error.value.path == "5.png"
    skipped: list = []
    batches = list(iter_batches(dataset, batch_size=3, skipped=skipped))
    assert [b.indices.tolist() for b in batches] == [[0, 1, 2], [4], [6]]
    assert [b.slots.tolist() for b in batches] == [[0, 1, 2], [1], [0]]  # places among the positions asked
    assert [(s.index, s.file) for b in batches for s in b.skipped] == [(3, "3.png"), (5, "5.png")]
    assert [(s.index, s.file) for s in skipped] == [(3, "3.png"), (5, "5.png")]
    assert "empty file" in batches[1].skipped[1].reason
    for batch in batches:
        for row, index in enumerate(batch.indices.tolist()):
            assert torch.equal(batch.images[row], dataset.load(index))  # each row is its own file
    assert dataset.num_skipped == 2 and dataset.skipped_files == ["3.png", "5.png"]

    skipped = []
    images = torch.cat([batch.images for batch in iter_batches(dataset, 2, num_workers=1, skipped=skipped)])
    assert images.shape[0] == 5 and [s.file for s in skipped] == ["3.png", "5.png"]
    # a draw of n readable images: the bad ones are replaced by the next images of the same seeded draw
    order, limit = draw_order(len(dataset), 4, seed=1)
    assert order[:4].tolist() == subset_indices(len(dataset), 4, seed=1).tolist() and limit == 4
    skipped = []
    drawn = torch.cat([batch.images for batch in iter_batches(DatasetSubset(dataset, order), 3, skipped=skipped,
                                                              limit=limit)])
    readable = [i for i in order.tolist() if i not in (3, 5)][:4]
    assert torch.equal(drawn, torch.stack([dataset.load(i) for i in readable]))
    met = order[: order.tolist().index(readable[-1]) + 1].tolist()
    assert sorted(s.file for s in skipped) == sorted(f"{i}.png" for i in met if i in (3, 5))


def test_cache_rows_match_their_files_and_resume(tokenizer_dir: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    for i in range(10):
        _save(images / f"k{i % 2}" / f"{i}.png", Image.fromarray(_noise(12, 12, i)))
    (images / "k0" / "2.png").write_text("not an image")
    _truncate(images / "k1" / "5.png", 0.3)
    dataset = build_dataset(str(images), "all", 16, 3)
    tokenizer = MAETok.from_pretrained(tokenizer_dir).eval()
    encode, grad_enabled = tokenizer.encode, []

    def recording_encode(*args, **kwargs):  # the cache is encoded without autograd (no graph kept per batch)
        grad_enabled.append(torch.is_grad_enabled())
        return encode(*args, **kwargs)

    tokenizer.encode = recording_encode
    cache_latents(tokenizer, dataset, tmp_path / "cache", tokenizer_dir, shard_size=3, batch_size=2, progress=False)
    tokenizer.encode = encode
    assert grad_enabled and not any(grad_enabled)
    cache = LatentDataset(tmp_path / "cache")
    bad = {"k0/2.png", "k1/5.png"}
    assert len(cache) == cache.stats["num_items"] == 8 and cache.stats["num_listed_items"] == 10
    assert cache.stats["num_skipped_images"] == 2 and cache.stats["skipped_list"] == "skipped.json"
    assert {item["file"] for item in read_skipped(tmp_path / "cache")} == bad
    rows = cache.item_indices.tolist()
    assert sorted(set(rows)) == rows and {dataset.relative_path(i) for i in rows} == set(dataset.relative_paths) - bad
    with torch.no_grad():
        expected = tokenizer.encode(torch.stack([dataset.load(i) for i in rows]))
    torch.testing.assert_close(cache.latents, expected, atol=1e-5, rtol=0)
    assert cache.labels.tolist() == [int(dataset.labels[i]) for i in rows]

    # kill after shard 2: the rerun completes it with the same rows and the same skip list
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for f in (tmp_path / "cache").iterdir():
        if f.name not in ("stats.json", "skipped.json", "shard-00002.safetensors"):
            (resumed / f.name).write_bytes(f.read_bytes())
    cache_latents(tokenizer, dataset, resumed, tokenizer_dir, shard_size=3, batch_size=2, progress=False)
    for shard in range(4):
        a = load_file(str(tmp_path / "cache" / f"shard-{shard:05d}.safetensors"))
        b = load_file(str(resumed / f"shard-{shard:05d}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        name = f"shard-{shard:05d}.safetensors"
        assert read_shard_skips(tmp_path / "cache" / name) == read_shard_skips(resumed / name)
    for name in ("stats.json", "skipped.json"):
        assert json.loads((resumed / name).read_text()) == json.loads((tmp_path / "cache" / name).read_text())
    with pytest.raises(ValueError, match="other settings"):  # another pixel limit could skip other files
        cache_latents(tokenizer, build_dataset(str(images), "all", 16, 3, max_image_pixels=100), resumed,
                      tokenizer_dir, shard_size=3, batch_size=2, progress=False)


# ------------------------------------------------------------------------------------ one output per input


def test_reconstruct_gives_every_input_its_own_output(tokenizer_dir: Path, tmp_path: Path, capsys) -> None:
    source = tmp_path / "in"
    _save(source / "a.png", Image.fromarray(_noise(16, 16, 0)))
    _save(source / "a.jpg", Image.fromarray(_noise(16, 16, 1)), quality=95)
    _save(source / "sub" / "a.png", Image.fromarray(_noise(16, 16, 2)))
    _save(source / "sub" / "a.png.png", Image.fromarray(_noise(16, 16, 3)))
    (source / "sub" / "b.jpg").write_bytes(b"")
    assert main(["reconstruct", "--model", str(tokenizer_dir), "--input", str(source), "--out",
                 str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "wrote 4 side-by-side PNGs" in printed and "1 unreadable input(s) skipped" in printed
    written = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.png"))
    assert written == ["a.jpg.png", "a.png.png", "sub/a.png", "sub/a.png.png"]  # a stem shared in a folder keeps its suffix
    originals = {}
    for rel in written:
        with Image.open(tmp_path / "out" / rel) as grid:
            originals[rel] = np.asarray(grid)[2:18, 2:18]  # the original, left of its reconstruction
    assert len({o.tobytes() for o in originals.values()}) == 4  # four different images, none overwritten
    assert np.array_equal(originals["sub/a.png"], _noise(16, 16, 2))
    assert reconstruction_paths(tmp_path / "o", source / "a.jpg", [source / "a.jpg"]) == [tmp_path / "o" / "a.png"]


# ------------------------------------------------------------------- a folder of 50+ malformed or odd files

LIMIT = 200 * 200  # the lowered pixel limit of the folder test


def _odd_and_bad_folder(root: Path) -> tuple[set[str], set[str]]:
    """Builds the folder; returns (files that decode, files that do not). Symlinks are added on top."""
    good: dict[str, Image.Image | tuple] = {}
    for cls in ("c0", "c1", "c2"):
        seed = int(cls[1])
        rgb = Image.fromarray(_noise(20, 24, seed))
        files = {
            f"{cls}/same.png": (rgb, {}),
            f"{cls}/same.jpg": (rgb, {"quality": 95}),  # same stem, other extension
            f"{cls}/same.JPG": (Image.fromarray(_noise(18, 18, seed + 10)), {"quality": 90}),  # upper-case extension
            f"{cls}/cmyk.jpg": (Image.new("RGB", (20, 20), (200, 50, 30)).convert("CMYK"), {"quality": 95}),
            f"{cls}/deep16.png": (Image.fromarray((np.arange(400, dtype=np.uint16) * 160).reshape(20, 20)), {}),
            f"{cls}/palette.png": (rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16), {}),
            f"{cls}/palette_trns.png": (rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=8), {"transparency": 0}),
            f"{cls}/anim.gif": (rgb.convert("P"), {"save_all": True, "append_images": [rgb.rotate(90).convert("P")]}),
            f"{cls}/la.png": (Image.fromarray(_noise(20, 20, seed, 1)).convert("LA"), {}),
            f"{cls}/rgba.png": (Image.fromarray(_noise(20, 20, seed, 1)).convert("RGBA"), {}),
            f"{cls}/bilevel.png": (Image.fromarray(_noise(20, 20, seed, 1)).convert("1"), {}),
            f"{cls}/gray.jpg": (Image.fromarray(_noise(20, 20, seed, 1)), {}),
            f"{cls}/one.png": (Image.new("RGB", (1, 1), (9, 99, 199)), {}),  # tiny 1x1
            f"{cls}/float.tif": (Image.fromarray(np.linspace(0, 1, 400, dtype=np.float32).reshape(20, 20)), {}),
            f"{cls}/wide.bmp": (Image.fromarray(_noise(8, 60, seed)), {}),
            f"{cls}/sub/deeper/nested.png": (Image.fromarray(_noise(17, 19, seed + 20)), {}),
            f"{cls}/photo.jpg": (Image.fromarray(_noise(192, 160, seed + 30)), {"quality": 80}),  # JPEG draft
            f"{cls}/progressive.jpg": (rgb, {"progressive": True, "quality": 90}),
        }
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90 degrees when shown
        files[f"{cls}/exif_rotated.jpg"] = (Image.fromarray(_noise(12, 20, seed + 40)), {"exif": exif})
        for rel, (image, options) in files.items():
            _save(root / rel, image, **options)
        good.update(files)
    bad: set[str] = set()
    for cls in ("c0", "c1", "c2"):
        seed = int(cls[1]) + 50
        for rel, fmt in ((f"{cls}/truncated.png", "PNG"), (f"{cls}/truncated.jpg", "JPEG"), (f"{cls}/trunc.bmp", "BMP")):
            _save(root / rel, Image.fromarray(_noise(40, 40, seed)), format=fmt)
            _truncate(root / rel, 0.4)
            bad.add(rel)
        for rel, content in {
            f"{cls}/zero.jpg": b"",
            f"{cls}/zero.png": b"",
            f"{cls}/page.jpg": b"<!DOCTYPE html><html><body>404 Not Found</body></html>",
            f"{cls}/notes.png": b"just some text\n",
            f"{cls}/random.webp": np.random.default_rng(seed).bytes(300),
            f"{cls}/header_only.gif": b"GIF89a",
            f"{cls}/sub/soi_only.jpg": b"\xff\xd8\xff\xe0" + b"\x00" * 20,
        }.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(content)
            bad.add(rel)
        _png_header_only(root / cls / "huge_header.png", 9000, 9000)  # above any limit, by its header alone
        _save(root / cls / "big.png", Image.fromarray(_noise(201, 200, seed)))  # just above the lowered limit
        bad |= {f"{cls}/huge_header.png", f"{cls}/big.png"}
    os.symlink(root / "nowhere.png", root / "c0" / "dangling.png")
    os.symlink(root, root / "c1" / "sub" / "loop")
    os.symlink(root / "c2", root / "c2_link")  # a duplicate path to c2: not listed twice
    return set(good), bad


def test_a_folder_of_odd_and_bad_files_goes_through_every_command(tmp_path: Path, capsys, caplog) -> None:
    root = tmp_path / "odd"
    good, bad = _odd_and_bad_folder(root)
    assert len(good) + len(bad) >= 50 and len(bad) == 36 and len(good) == 57
    scan = scan_image_folder(root, warn=False)
    assert set(scan.files) == good | bad and len(scan.files) == len(good | bad)
    assert {kind for _, kind in scan.left_out} == {"dangling symlink", "symlink loop", "duplicate folder link"}

    # train-tokenizer: a bad file drawn leaves no row in its batch, and is counted and named
    train_files = [rel for rel in scan.files if hash_split(rel) == "train"]
    train_bad = set(train_files) & bad
    steps = -(-len(train_files) // 16)  # one epoch: every training file is met
    cfg = tiny_cfg(root, f"train.steps={steps}", "train.batch_size=16", f"data.max_image_pixels={LIMIT}",
                   f"train.eval_every={steps}", f"train.ckpt_every={steps}")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        trainer = TokenizerTrainer(cfg, tmp_path / "run")
        trainer.fit()
    assert trainer.train_set.num_skipped == len(train_bad) and set(trainer.train_set.skipped_files) == train_bad
    summary = [r.getMessage() for r in caplog.records if "unreadable image(s) skipped" in r.getMessage()]
    assert summary and summary[-1].startswith(f"{len(train_bad)} unreadable image(s) skipped under")
    model = tmp_path / "run" / "model"

    # cache-latents: one row per decodable file, each the encoding of its own file; the skip list is stored
    assert main(["cache-latents", "--model", str(model), "--data", str(root), "--split", "all", "--out",
                 str(tmp_path / "cache"), "--batch-size", "16", "--max-image-pixels", str(LIMIT)]) == 0
    assert f"cached {len(good)} latents of {len(good) + len(bad)} listed images" in capsys.readouterr().out
    cache = LatentDataset(tmp_path / "cache")
    dataset = build_dataset(str(root), "all", 16, 3, max_image_pixels=LIMIT)
    rows = cache.item_indices.tolist()
    assert len(cache) == len(good) and len(set(rows)) == len(rows)  # no duplicate row
    assert {dataset.relative_path(i) for i in rows} == good
    assert cache.stats["num_skipped_images"] == len(bad) and {s["file"] for s in read_skipped(tmp_path / "cache")} == bad
    tokenizer = MAETok.from_pretrained(model).eval()
    with torch.no_grad():
        expected = tokenizer.encode(torch.stack([dataset.load(i) for i in rows]))
    torch.testing.assert_close(cache.latents, expected, atol=1e-4, rtol=0)
    assert cache.labels.tolist() == [int(dataset.labels[i]) for i in rows] and cache.class_names == ["c0", "c1", "c2"]

    # reconstruct: one output per decodable input, none overwritten (same.png / same.jpg / same.JPG)
    skipped: list = []
    written = reconstruct_files(model, root, tmp_path / "recon", batch_size=16, max_image_pixels=LIMIT, skipped=skipped)
    assert len(written) == len(set(written)) == len(good) and {Path(s.file).relative_to(root).as_posix() for s in skipped} == bad
    assert sorted((tmp_path / "recon").rglob("*.png")) == sorted(written)  # each written once, nothing else

    # eval-recon: the metrics are over the decodable files, the skip count is reported
    assert main(["eval-recon", "--model", str(model), "--data", str(root), "--split", "all", "--no-fid",
                 "--no-lpips", "--max-image-pixels", str(LIMIT), "--json", str(tmp_path / "recon.json")]) == 0
    result = json.loads((tmp_path / "recon.json").read_text())
    assert result["num_images"] == len(good) and result["num_skipped_images"] == len(bad)
    assert {item["file"] for item in result["skipped_images"]} == bad
