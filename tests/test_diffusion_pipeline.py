"""Latent caching, diffusion training and sampling, end to end on tiny models."""

import json

import numpy as np
import pytest
import torch
from conftest import TINY_SIT
from safetensors.torch import load_file

from maetok.cli import main
from maetok.config import DiffusionTrainConfig, load_config
from maetok.data import build_dataset
from maetok.data.latents import LatentDataset, LatentNormalizer
from maetok.diffusion.generator import LatentGenerator
from maetok.encode import cache_latents
from maetok.models.tokenizer import MAETok
from maetok.train.diffusion import DiffusionTrainer


def test_cache_holds_latents_labels_flips_and_exact_statistics(latent_dir, tokenizer_dir, image_folder):
    stats = json.loads((latent_dir / "stats.json").read_text())
    data = LatentDataset(latent_dir)
    assert stats["num_items"] == len(data) == 20 and stats["num_shards"] == 4  # 22 files listed, 2 bad: no row
    assert stats["num_listed_items"] == 22 and stats["num_skipped_images"] == 2
    assert stats["latent_shape"] == [4, 4] and stats["num_classes"] == 2
    tokenizer = MAETok.from_pretrained(tokenizer_dir)
    dataset = build_dataset(str(image_folder), "all", 16, 3)
    image, label = dataset[3]
    with torch.no_grad():
        expected = tokenizer.encode(image[None])[0]
        expected_flip = tokenizer.encode(image[None].flip(-1))[0]
    pair, cached_label = data[3]
    assert torch.allclose(pair[0], expected, atol=1e-5) and torch.allclose(pair[1], expected_flip, atol=1e-5)
    assert cached_label == label
    assert np.allclose(stats["channel_mean"], data.latents.double().mean(dim=(0, 1)).numpy(), atol=1e-6)
    assert np.allclose(stats["channel_std"], data.latents.double().std(dim=(0, 1), unbiased=False).numpy(), atol=1e-6)
    assert stats["std"] == pytest.approx(data.latents.double().std(unbiased=False).item(), rel=1e-6)
    assert not list(latent_dir.glob("*.tmp"))


def test_cache_resumes_and_refuses_other_settings(latent_dir, tokenizer_dir, image_folder, tmp_path):
    copy = tmp_path / "cache"
    copy.mkdir()
    for f in latent_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    (copy / "stats.json").unlink()
    (copy / "shard-00002.safetensors").unlink()  # as if interrupted while writing shard 2
    with pytest.raises(FileNotFoundError, match="not a finished latent cache"):
        LatentDataset(copy)
    dataset = build_dataset(str(image_folder), "all", 16, 3)
    tokenizer = MAETok.from_pretrained(tokenizer_dir)
    cache_latents(tokenizer, dataset, copy, tokenizer_dir, flip=True, shard_size=7, progress=False)
    for i in range(4):
        a = load_file(str(latent_dir / f"shard-{i:05d}.safetensors"))
        b = load_file(str(copy / f"shard-{i:05d}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)
    resumed_stats = json.loads((copy / "stats.json").read_text())
    original_stats = json.loads((latent_dir / "stats.json").read_text())
    resumed_stats.pop("num_skipped_images"), original_stats.pop("num_skipped_images")  # counts this invocation's reads
    assert resumed_stats == original_stats
    with pytest.raises(ValueError, match="other settings"):
        cache_latents(tokenizer, dataset, copy, tokenizer_dir, flip=False, shard_size=7, progress=False)
    # a tokenizer retrained in place (same directory, other weights): its old latents are never reused
    with torch.no_grad():
        tokenizer.encoder.latent_tokens.add_(0.5)
    with pytest.raises(ValueError, match="another tokenizer's weights"):
        cache_latents(tokenizer, dataset, copy, tokenizer_dir, flip=True, shard_size=7, progress=False)
    cache_latents(tokenizer, dataset, copy, tokenizer_dir, flip=True, shard_size=7, progress=False,
                  restart_if_stale=True)
    fresh = LatentDataset(copy)
    assert not torch.equal(fresh.latents, LatentDataset(latent_dir).latents)
    expected = torch.stack([tokenizer.encode(dataset[i][0][None])[0] for i in range(3)])
    torch.testing.assert_close(fresh.latents[:3], expected, rtol=1e-5, atol=1e-5)


def test_normalizer_roundtrip():
    stats = {"mean": 0.5, "std": 2.0, "channel_mean": [0.0, 1.0], "channel_std": [1.0, 4.0]}
    x = torch.randn(3, 5, 2)
    for mode in ("channel", "scalar", "none"):
        norm = LatentNormalizer(stats, mode)
        assert torch.allclose(norm.denormalize(norm.normalize(x)), x, atol=1e-6)
        assert torch.allclose(LatentNormalizer.from_dict(norm.to_dict()).normalize(x), norm.normalize(x))
    assert torch.allclose(LatentNormalizer(stats, "channel").normalize(torch.tensor([[[0.0, 5.0]]])), torch.tensor([[[0.0, 1.0]]]))


def test_diffusion_resume_equals_uninterrupted_run(latent_dir, tmp_path):
    cfg = load_config(DiffusionTrainConfig, "fashion-mnist-sit", TINY_SIT + [f"latents={latent_dir}", "train.steps=6"])
    straight = DiffusionTrainer(cfg, tmp_path / "a")
    straight.fit()
    DiffusionTrainer(cfg, tmp_path / "b").fit(stop_at=3)
    resumed = DiffusionTrainer(cfg, tmp_path / "b", resume=True)
    resumed.fit()
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    assert list((tmp_path / "a").glob("samples_step*.png"))
    pipe = LatentGenerator.load(tmp_path / "a")
    assert pipe.num_classes == 2 and pipe.latent_shape == (4, 4)
    for key, value in straight.ema.state_dict().items():
        assert torch.equal(value, pipe.model.state_dict()[key].float())


def test_sample_command_writes_adm_npz_and_respects_labels(latent_dir, tmp_path):
    cfg = load_config(DiffusionTrainConfig, "fashion-mnist-sit", TINY_SIT + [f"latents={latent_dir}", "train.steps=2"])
    DiffusionTrainer(cfg, tmp_path / "run").fit()
    out = tmp_path / "samples"
    assert main(["sample", "--model", str(tmp_path / "run"), "--num", "5", "--out", str(out), "--steps", "3", "--labels", "1", "--cfg-scale", "1.5", "--sampler", "euler"]) == 0
    with np.load(out / "samples.npz") as npz:
        assert npz["arr_0"].dtype == np.uint8 and npz["arr_0"].shape == (5, 16, 16, 3)
        assert npz["arr_1"].tolist() == [1] * 5
    assert (out / "grid.png").exists() and len(list((out / "images").glob("*.png"))) == 5
    assert main(["sample", "--model", str(tmp_path / "run"), "--num", "2", "--out", str(out), "--labels", "7"]) == 2


def test_unconditional_model_and_clear_errors(latent_dir, tmp_path):
    cfg = load_config(DiffusionTrainConfig, "fashion-mnist-sit", TINY_SIT + [f"latents={latent_dir}", "train.steps=1", "model.conditional=false"])
    DiffusionTrainer(cfg, tmp_path / "u").fit()
    pipe = LatentGenerator.load(tmp_path / "u")
    assert pipe.num_classes == 0 and pipe.balanced_labels(4) is None
    assert pipe.sample_latents(None, 3, steps=2).shape == (3, 4, 4)
    with pytest.raises(ValueError, match="--latents"):
        DiffusionTrainer(load_config(DiffusionTrainConfig, "fashion-mnist-sit"), tmp_path / "x")


def test_paper_diffusion_presets():
    from maetok.models.sit import build_diffusion_model

    for preset, expected in (("sit-xl", 675.0e6), ("lightningdit-xl", 675.0e6), ("sit-l", 458.0e6)):
        cfg = load_config(DiffusionTrainConfig, preset)
        with torch.device("meta"):
            model = build_diffusion_model(cfg.model.for_latents((128, 32), 1000))
        count = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
        assert abs(count - expected) / expected < 0.003, (preset, count)
    xl = load_config(DiffusionTrainConfig, "sit-xl")
    assert (xl.sampling.cfg_scale, xl.sampling.guidance_high, xl.sampling.sampler) == (1.9, 0.75, "euler-maruyama")
