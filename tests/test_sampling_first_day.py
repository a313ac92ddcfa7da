"""A researcher's first day with a trained SiT (issue 21, points 4 and 5): model folders that travel (the tokenizer a
SiT folder names, its model card), progress bars with rate and time left, and class labels by name."""

from __future__ import annotations

import io
import json
import re
import shutil

import numpy as np
import pytest
import torch
from conftest import TINY_SIT, tiny_cfg
from released_standins import write_authors_folder

from maetok.cli import main
from maetok.config import DiffusionModelConfig, DiffusionTrainConfig, SamplingConfig, TokenizerConfig, load_config
from maetok.data import build_dataset
from maetok.data.latents import LatentNormalizer
from maetok.diffusion.generator import LatentGenerator, generate_images, resolve_class_labels
from maetok.encode import cache_latents
from maetok.errors import ConfigError
from maetok.model_folders import model_card, save_for_hub, tokenizer_reference
from maetok.models.sit import SiT, build_diffusion_model
from maetok.models.tokenizer import MAETok
from maetok.train.diffusion import DiffusionTrainer
from maetok.train.tokenizer import TokenizerTrainer

NAMES = ["T-shirt", "Sneaker", "Bag"]


def tiny_sit_folder(path, tokenizer_dir, num_classes: int = 3) -> LatentGenerator:
    """A randomly initialised tiny SiT on the 4 x 4 latents of ``tokenizer_dir``, saved to ``path`` with class names."""
    torch.manual_seed(1)
    model = build_diffusion_model(DiffusionModelConfig(arch="sit", width=32, depth=2, num_heads=2)
                                  .for_latents((4, 4), num_classes))
    for parameter in model.parameters():  # off the zero init, so the samples depend on the labels
        parameter.data.add_(0.1 * torch.randn_like(parameter))
    pipe = LatentGenerator(model, LatentNormalizer({"mean": 0.0, "std": 1.0}, "scalar"), NAMES[:num_classes],
                           SamplingConfig(steps=3, sampler="euler"), str(tokenizer_dir))
    pipe.save(path)
    return pipe


@pytest.fixture()
def demo_folder(tokenizer_dir, image_folder, tmp_path):
    """A demo-style output folder: tokenizer/model, latents/ (cached by it), sit/ (a run trained on them)."""
    root = tmp_path / "demo"
    tokenizer = root / "tokenizer" / "model"
    shutil.copytree(tokenizer_dir, tokenizer)
    dataset = build_dataset(str(image_folder), "all", 16, 3)
    cache_latents(MAETok.from_pretrained(tokenizer), dataset, root / "latents", tokenizer, shard_size=32,
                  progress=False)
    cfg = load_config(DiffusionTrainConfig, "fashion-mnist-sit", TINY_SIT + [f"latents={root / 'latents'}",
                                                                             "train.steps=2"])
    DiffusionTrainer(cfg, root / "sit").fit()
    return root


# ---------------------------------------------------------------------------------------------------------
# 4. model folders that travel
# ---------------------------------------------------------------------------------------------------------


def test_a_demo_folder_moved_elsewhere_still_samples(demo_folder, tmp_path, capsys):
    moved = tmp_path / "shared" / "demo"
    shutil.move(str(demo_folder), str(moved))
    out = tmp_path / "samples"
    assert main(["sample", "--model", str(moved / "sit"), "--num", "3", "--out", str(out), "--steps", "2",
                 "--device", "cpu"]) == 0, capsys.readouterr().err
    with np.load(out / "samples.npz") as npz:
        assert npz["arr_0"].shape == (3, 16, 16, 3)
    stored = json.loads((moved / "sit" / "model" / "config.json").read_text())["tokenizer"]
    assert stored == "../../tokenizer/model"  # relative to the SiT folder: the two move together
    # save_pretrained / convert elsewhere: the reference is recomputed against the new place, and still resolves
    copy = SiT.from_pretrained(moved / "sit").save_pretrained(tmp_path / "elsewhere" / "sit")
    expected = str((moved / "tokenizer" / "model").resolve())
    assert LatentGenerator.load(copy).tokenizer_source() == expected
    assert main(["convert", "--from", str(moved / "sit"), "--out", str(tmp_path / "converted")]) == 0
    assert LatentGenerator.load(tmp_path / "converted").tokenizer_source() == expected


def test_a_missing_tokenizer_says_where_its_path_came_from(tokenizer_dir, tmp_path, capsys):
    tokenizer = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, tokenizer)
    tiny_sit_folder(tmp_path / "sit", tokenizer)
    shutil.rmtree(tokenizer)
    argv = ["sample", "--model", str(tmp_path / "sit"), "--num", "2", "--out", str(tmp_path / "out"), "--steps", "2"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"tokenizer {tokenizer} not found" in err and f"came from {tmp_path / 'sit' / 'config.json'}" in err
    assert "--tokenizer DIR_OR_HUB_ID" in err
    assert main(argv + ["--tokenizer", str(tokenizer_dir)]) == 0
    # an older folder holding an absolute path still loads
    config_path = tmp_path / "sit" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "tokenizer": str(tokenizer_dir)}))
    assert main(argv) == 0


def test_a_hub_id_stays_a_hub_id(tmp_path):
    assert tokenizer_reference("MAETok/maetok-b-128", tmp_path / "sit") == "MAETok/maetok-b-128"
    snapshot = tmp_path / "hub" / "models--MAETok--maetok-b-128" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)  # what `cache-latents --model MAETok/maetok-b-128` records
    assert tokenizer_reference(snapshot, tmp_path / "sit") == "MAETok/maetok-b-128"
    local = tmp_path / "runs" / "tok"
    local.mkdir(parents=True)
    assert tokenizer_reference(local, tmp_path / "runs" / "sit" / "model") == "../../tok"
    assert tokenizer_reference(local, tmp_path / "sit", relative=False) == str(local.resolve())


def test_the_model_card_is_written_from_the_model(demo_folder, image_folder, tmp_path):
    cfg = TokenizerConfig(image_size=16, in_channels=1, patch_size=4, encoder_width=32, encoder_depth=1,
                          encoder_heads=2, decoder_width=32, decoder_depth=1, decoder_heads=2, num_latent_tokens=4,
                          latent_dim=6, aux_targets=[], mask_ratio_min=0.0, mask_ratio_max=0.0, variant="ae")
    card = model_card(MAETok(cfg), "me/gray")
    assert "(B, 1, 16, 16)" in card and "(B, 3," not in card and "(B, 4, 6)" in card
    released = MAETok.from_pretrained(write_authors_folder(tmp_path / "released"))  # vq_mean 0.25, vq_std 1.5
    assert "latent_mean 0.25, latent_std 1.5" in model_card(released, "me/released")
    # a diffusion model from its run: classes and names, latent statistics, sampling, the data and steps
    sit = SiT.from_pretrained(demo_folder / "sit")
    written = save_for_hub(sit, tmp_path / "hub", "me/sit")
    card = (written / "README.md").read_text()
    assert "- classes: 2 (cats, dogs)" in card and "latent normalisation undone after sampling: channel" in card
    assert f"trained on the latent cache `{demo_folder / 'latents'}`" in card and "2 training steps" in card
    assert "maetok sample --model me/sit --tokenizer TOKENIZER --num 16 --labels cats" in card
    # a tokenizer from its run: the data and steps, and its own shapes
    TokenizerTrainer(tiny_cfg(image_folder, "train.steps=3", "model.in_channels=1"), tmp_path / "tok-run").fit()
    card = model_card(MAETok.from_pretrained(tmp_path / "tok-run"), "me/tok")
    assert f"trained on `{image_folder}`" in card and "3 training steps" in card and "(B, 1, 16, 16)" in card
    # bound for the hub, a local tokenizer is stored absolute (relative to the upload folder it would mean nothing)
    stored = json.loads((written / "config.json").read_text())["tokenizer"]
    assert stored == str((demo_folder / "tokenizer" / "model").resolve())


# ---------------------------------------------------------------------------------------------------------
# 5. progress bars and labels by name
# ---------------------------------------------------------------------------------------------------------


def test_generate_images_shows_one_bar_over_every_sampling_step(tokenizer_dir, tmp_path, capsys):
    pipe = tiny_sit_folder(tmp_path / "sit", tokenizer_dir)
    tokenizer = MAETok.from_pretrained(tokenizer_dir)
    capsys.readouterr()
    images, labels = generate_images(pipe, tokenizer, 5, None, batch_size=2)  # 3 batches x 3 steps
    err = capsys.readouterr().err
    assert images.shape == (5, 16, 16, 3) and labels.tolist() == [0, 1, 2, 0, 1]
    assert "sample 5 images" in err and " 0/9 " in err and " 9/9 " in err and "images=5/5" in err
    assert re.search(r"9/9 \[\d\d:\d\d<\d\d:\d\d, +[\d.]+(step/s|s/step)", err), err  # elapsed < left, rate


def test_labels_by_name_everywhere(tokenizer_dir, tmp_path, capsys):
    pipe = tiny_sit_folder(tmp_path / "sit", tokenizer_dir)
    assert resolve_class_labels(["Sneaker", 2, "0"], NAMES, 3).tolist() == [1, 2, 0]
    assert resolve_class_labels(torch.tensor([2, 1]), NAMES, 3).tolist() == [2, 1]
    with pytest.raises(ConfigError, match=r"unknown class name 'Sandal'; the model's classes: 0 T-shirt, 1 Sneaker, "
                                          r"2 Bag"):
        resolve_class_labels(["Sandal"], NAMES, 3)
    with pytest.raises(ConfigError, match=r"class label 7 is out of range: the model has 3 classes: 0 T-shirt"):
        resolve_class_labels(7, NAMES, 3)
    with pytest.raises(ConfigError, match=r"out of range: the model has 1000 classes: ids 0..999"):
        resolve_class_labels([1000], [], 1000)
    with pytest.raises(ConfigError, match="unconditional"):
        resolve_class_labels([0], [], 0)
    by_name = pipe.sample_latents(["Bag", "T-shirt"], 2, generator=torch.Generator().manual_seed(0))
    by_id = pipe.sample_latents(torch.tensor([2, 0]), 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(by_name, by_id)
    out = tmp_path / "samples"
    assert main(["sample", "--model", str(tmp_path / "sit"), "--num", "3", "--out", str(out), "--labels",
                 "Sneaker, 2"]) == 0
    with np.load(out / "samples.npz") as npz:
        assert npz["arr_1"].tolist() == [1, 2, 1]
    capsys.readouterr()
    assert main(["sample", "--model", str(tmp_path / "sit"), "--num", "1", "--out", str(out), "--labels", "circle"]) == 2
    assert "unknown class name 'circle'; the model's classes: 0 T-shirt, 1 Sneaker, 2 Bag" in capsys.readouterr().err


def test_diffusers_pipeline_bar_names_and_generators(tokenizer_dir, tmp_path):
    pytest.importorskip("diffusers")
    from maetok.integrations.diffusers import MAETokSiTPipeline

    tiny_sit_folder(tmp_path / "sit", tokenizer_dir)
    pipe = MAETokSiTPipeline.from_maetok(tmp_path / "sit")
    stream = io.StringIO()
    pipe.set_progress_bar_config(file=stream, mininterval=0, ncols=80)
    named = pipe(class_labels=["Sneaker"], num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                 output_type="pt").images
    bar = stream.getvalue()
    assert all(f" {i}/4 " in bar for i in range(5)), bar  # the bar advances once per sampling step
    by_id = pipe(class_labels=1, num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                 output_type="pt").images
    assert torch.equal(named, by_id)
    pipe.set_progress_bar_config(file=stream, disable=True)
    stream.seek(0), stream.truncate()
    # num_images_per_prompt repeats each label; a list of generators gives one per image, each image its own
    seeds = [3, 4, 5, 6]
    images = pipe(class_labels=["Bag", 0], num_images_per_prompt=2, num_inference_steps=3, output_type="pt",
                  generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    assert stream.getvalue() == "" and images.shape == (4, 3, 16, 16)
    alone = pipe(class_labels=[0], num_inference_steps=3, output_type="pt",
                 generator=[torch.Generator().manual_seed(seeds[3])]).images
    torch.testing.assert_close(images[3:], alone, rtol=0, atol=1e-5)
    assert not torch.allclose(images[2], images[3])
    with pytest.raises(ValueError, match="got a list of 3 generators for 4 images"):
        pipe(class_labels=["Bag", 0], num_images_per_prompt=2,
             generator=[torch.Generator().manual_seed(s) for s in seeds[:3]])
    with pytest.raises(ConfigError, match="unknown class name 'Sandal'"):
        pipe(class_labels=["Sandal"])


def test_a_list_of_generators_gives_each_sample_its_own_noise(tokenizer_dir, tmp_path):
    """Euler-Maruyama draws noise at every step: with one generator per sample, a sample is the one its generator
    gives alone, whatever else is in the batch."""
    pipe = tiny_sit_folder(tmp_path / "sit", tokenizer_dir)
    sampling = SamplingConfig(sampler="euler-maruyama", steps=4, cfg_scale=1.5)
    batch = pipe.sample_latents(["Bag", "Sneaker", 0], 3, sampling,
                                generator=[torch.Generator().manual_seed(seed) for seed in (7, 8, 9)])
    alone = pipe.sample_latents(["Sneaker"], 1, sampling, generator=[torch.Generator().manual_seed(8)])
    torch.testing.assert_close(batch[1:2], alone, rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match="got 2 generators for 3 samples"):
        pipe.sample_latents([0, 1, 2], 3, sampling, generator=[torch.Generator(), torch.Generator()])
