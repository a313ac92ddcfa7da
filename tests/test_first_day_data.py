"""Issue 21, point 1: a folder's images set the channels and size of the model trained on them (said in one line,
explicit settings win, a model given data of other channels converts them with a word or refuses to train on them),
the small presets are named for what they are (the old names kept as aliases), and the held-out images are a seeded,
class-balanced draw (the same on every run) instead of the first classes of a class-sorted folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TINY, StubInception
from PIL import Image

from maetok.cli import main

# TINY without its channels and size: here the data sets them
TINY_FROM_DATA = [o for o in TINY if not o.startswith(("model.in_channels=", "model.image_size="))]
MSE_ONLY = ["loss.perceptual_weight=0", "loss.gan_weight=0"]


def write_folder(root, mode: str, classes: int = 0, per_class: int = 6, size: int = 16, seed: int = 0):
    """PNGs of ``mode`` ("RGB" or "L") of one size: ``classes`` class sub-folders of ``per_class`` images each, or
    ``per_class`` loose images when ``classes`` is 0."""
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    for c in range(max(classes, 1)):
        folder = root / f"class{c}" if classes else root
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray((rng.random(shape) * 255).astype(np.uint8), mode).save(folder / f"{i:03d}.png")
    return root


def train(folder, out, *extra: str, config: str = "tiny-maetok") -> int:
    return main(["train-tokenizer", "--config", config, "--data", str(folder), "--out", str(out), "train.steps=2",
                 *TINY_FROM_DATA, *MSE_ONLY, *extra])


def model_config(run_dir) -> dict:
    return json.loads((run_dir / "model" / "config.json").read_text())


@pytest.fixture(scope="module")
def gray_run(tmp_path_factory):
    """A 2-step tokenizer trained on a grayscale folder, and the folder."""
    root = tmp_path_factory.mktemp("gray")
    folder = write_folder(root / "digits", "L", per_class=80)
    assert train(folder, root / "run") == 0
    return root / "run", folder


def test_a_colour_folder_trains_a_three_channel_model_said_in_one_line(tmp_path, capsys):
    folder = write_folder(tmp_path / "photos", "RGB", per_class=80)
    assert train(folder, tmp_path / "run", config="fashion-mnist-maetok") == 0  # the command, old name
    cfg = model_config(tmp_path / "run")
    assert (cfg["in_channels"], cfg["image_size"]) == (3, 16)  # the preset says 1 channel, 32 px
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("[maetok] data:"))
    assert "3 channels (colour images" in line and "16 px (the images' size)" in line


def test_a_grayscale_folder_trains_a_one_channel_model(gray_run, capsys):
    run, _ = gray_run
    assert model_config(run)["in_channels"] == 1
    assert main(["info", "--model", str(run / "model")]) == 0
    assert "16px, 1 channel, patch 4" in capsys.readouterr().out


def test_the_demo_takes_the_channels_of_a_grayscale_folder(tmp_path, capsys):
    from maetok.demo import dataset_shape

    gray = write_folder(tmp_path / "mnist", "L", classes=2, size=28)
    assert dataset_shape(str(gray), None, None) == (32, 1)  # 28 px: not a multiple of patch 8, the preset's 32
    assert "32 px (the config's; the images are 28x28: not a multiple of the patch size 8)" in capsys.readouterr().out
    colour = write_folder(tmp_path / "photos", "RGB", size=16)
    assert dataset_shape(str(colour), None, None) == (16, 3)
    assert dataset_shape(str(colour), None, 1) == (16, 1)  # --channels wins
    assert "1 channel (as set; the colour images are converted)" in capsys.readouterr().out


def test_the_embedded_fashion_mnist_keeps_its_shape():
    from maetok.data import data_shape_overrides

    overrides, shape = data_shape_overrides("fashion-mnist", "tiny-maetok")
    assert overrides == ["model.image_size=32", "model.in_channels=1"] and (shape.channels, shape.image_size) == (1, 32)


def test_explicit_settings_and_a_users_yaml_win_over_the_data(tmp_path):
    from maetok.data import data_shape_overrides

    folder = write_folder(tmp_path / "photos", "RGB")
    overrides, _ = data_shape_overrides(str(folder), "tiny-maetok", ["model.in_channels=1", "model.image_size=32"])
    assert overrides == ["model.image_size=32", "model.in_channels=1"]
    own = tmp_path / "mine.yaml"
    own.write_text("base: tiny-maetok\nmodel: {in_channels: 1}\n")
    overrides, _ = data_shape_overrides(str(folder), str(own))
    assert overrides == ["model.image_size=16", "model.in_channels=1"]  # the user's channels, the data's size


def test_a_model_reading_other_channels_says_it_converts(gray_run, tmp_path, capsys):
    run, _ = gray_run
    colour = write_folder(tmp_path / "photos", "RGB", per_class=4)
    assert main(["cache-latents", "--model", str(run), "--data", str(colour), "--split", "all",
                 "--out", str(tmp_path / "latents")]) == 0
    assert (f"[maetok] data: {colour} holds colour images and the model takes 1 channel: they are read as grayscale"
            in capsys.readouterr().out)


def test_finetuning_on_data_of_other_channels_is_an_error_naming_both(gray_run, tmp_path, capsys):
    run, _ = gray_run
    colour = write_folder(tmp_path / "photos", "RGB", per_class=4)
    assert main(["finetune-decoder", "--from", str(run), "--out", str(tmp_path / "ft"),
                 f"data.dataset={colour}", "finetune.steps=1"]) == 2
    err = capsys.readouterr().err
    assert f"{run} is a tokenizer of 1-channel images and {colour} holds colour images (3 channels)" in err
    assert not (tmp_path / "ft").exists() or not any((tmp_path / "ft").iterdir())


def test_old_preset_names_are_aliases_of_the_tiny_presets(capsys):
    from maetok.config import PRESET_ALIASES, list_presets, read_preset

    assert {"tiny-maetok", "tiny-ae", "tiny-vae", "tiny-sit"} <= set(list_presets())
    assert not any(name.startswith("fashion-mnist") for name in list_presets())
    for old, new in PRESET_ALIASES.items():
        assert read_preset(old) == read_preset(new)
    assert main(["info", "--config", "fashion-mnist-ae"]) == 0
    assert main(["info", "--latent-shape", "16", "8", "--classes", "10"]) == 0
    out = capsys.readouterr().out
    assert "fashion-mnist-maetok = tiny-maetok" in out and "\ntiny-maetok: maetok, 32px, 1 channel" in out


def test_held_out_images_of_a_class_sorted_folder_cover_every_class(tmp_path):
    from maetok.pipeline import load_eval_data

    root = tmp_path / "imagenet"
    for split, per_class in (("train", 3), ("val", 4)):
        write_folder(root / split, "RGB", classes=10, per_class=per_class, size=8, seed=len(split))
    evald = load_eval_data(str(root), 8, 3, 10, inception=StubInception(), progress=False)
    assert sorted(evald.labels.tolist()) == list(range(10))  # the first 10 in path order: classes 0, 0, 0, 0, 1 ...
    assert evald.draw == "10 of the 40 test images, 1 per class (10 classes), a seeded class-balanced draw (seed 0)"
    again = load_eval_data(str(root), 8, 3, 10, inception=StubInception(), progress=False)
    assert (again.images == evald.images).all() and (again.labels == evald.labels).all()


def test_the_balanced_draw_spreads_the_remainder_and_keeps_small_classes():
    from maetok.data import balanced_order, draw_order

    labels = np.repeat(np.arange(10), 200)
    order, limit = draw_order(len(labels), 1005, 0, labels)
    counts = np.bincount(labels[order[:limit]], minlength=10)
    assert counts.min() == 100 and counts.max() == 101 and counts.sum() == 1005
    assert sorted(order.tolist()) == list(range(len(labels)))  # a permutation: bad files give way to the next
    assert (balanced_order(labels, 0) == order).all() and not (balanced_order(labels, 1) == order).all()
    uneven = np.array([0] * 2 + [1] * 10 + [2] * 10)
    first = uneven[balanced_order(uneven, 3)[:12]]
    assert np.bincount(first).tolist() == [2, 5, 5]  # class 0 gives what it has, the others share the rest
    unlabelled, _ = draw_order(50, 10, 0)
    assert (unlabelled == np.random.default_rng(0).permutation(50)).all()  # an unlabelled draw is unchanged
