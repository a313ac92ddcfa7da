"""`maetok study` and `maetok demo` end to end at a tiny budget on Fashion-MNIST, with a stub FID network."""

import json

import pytest
import torch
from PIL import Image

from maetok.study import QUICK_BUDGET, VARIANTS, run_study
from test_data import needs_fashion_mnist
from test_eval_metrics import StubInception

TINY_TOKENIZER = [
    "model.encoder_width=32", "model.encoder_depth=1", "model.encoder_heads=2",
    "model.decoder_width=32", "model.decoder_depth=1", "model.decoder_heads=2",
    "model.aux_width=32", "model.aux_heads=2", "model.aux_depth=1",
    "model.num_latent_tokens=4", "model.latent_dim=4", "train.batch_size=8", "data.eval_images=4",
]
TINY_SIT = ["model.width=32", "model.depth=1", "model.num_heads=2", "train.batch_size=16"]


def test_variants_differ_in_one_choice():
    from maetok.config import TokenizerTrainConfig, load_config

    models = {slug: load_config(TokenizerTrainConfig, "fashion-mnist-maetok", overrides).model
              for slug, (_, overrides) in VARIANTS.items()}
    assert models["ae"].variant == "ae" and models["vae"].variant == "vae" and models["maetok"].variant == "maetok"
    assert models["maetok"].mask_ratio_max == 0.6 and len(models["maetok"].aux_targets) == 3
    assert models["maetok-no-aux"].aux_targets == [] and models["maetok-no-aux"].mask_ratio_max == 0.6
    assert models["maetok-no-mask"].mask_ratio_max == 0 and len(models["maetok-no-mask"].aux_targets) == 3
    widths = {(m.encoder_width, m.encoder_depth, m.num_latent_tokens, m.latent_dim) for m in models.values()}
    assert len(widths) == 1  # the same architecture everywhere


@needs_fashion_mnist
def test_study_writes_table_and_plots_and_resumes(tmp_path, monkeypatch):
    stub = StubInception()
    report = run_study(tmp_path, ["ae", "maetok"], budget=QUICK_BUDGET, tokenizer_overrides=TINY_TOKENIZER,
                       diffusion_overrides=TINY_SIT, inception=stub, progress=False)
    text = report.read_text()
    assert "| AE |" in text and "| MAETok |" in text and "gFID-24" in text and "LPIPS (VGG)" in text
    saved = json.loads((tmp_path / "study.json").read_text())
    shared = saved["gmm_pca"]["pca_dim"]
    assert shared == max(saved["gmm_pca"]["own_pca_dims"].values()) and f"d={shared})" in text
    for slug in ("ae", "maetok"):
        r = saved["results"][slug]
        assert r["rfid"] >= 0 and r["gfid"] >= 0 and 0 <= r["linear_probe_top1"] <= 1
        assert set(r["gmm_test_nll"]) == {"1", "2"} and r["psnr"] > 0 and r["lpips"] > 0
        assert r["gmm_pca_dim"] == shared and r["gmm_own_pca_dim"] == saved["gmm_pca"]["own_pca_dims"][slug]
    assert saved["results"]["maetok"]["aux_targets"] == ["hog", "pixel", "vgg16"]
    for name in ("gfid_vs_lp.png", "gmm_nll.png", "reconstructions.png", "samples.png", "ae/latent_map.png"):
        with Image.open(tmp_path / name) as image:
            assert image.size[0] > 50
    with Image.open(tmp_path / "reconstructions.png") as image:  # originals + one row per tokenizer, 16 wide
        assert image.size[1] == 3 * (32 + 2) + 2 and image.size[0] == 16 * (32 + 2) + 2

    # a second run reuses the finished tokenizers instead of training them again
    def no_training(*args, **kwargs):
        raise AssertionError("a finished variant was trained again")

    monkeypatch.setattr("maetok.study.TokenizerTrainer", no_training)
    again = run_study(tmp_path, ["ae", "maetok"], budget=QUICK_BUDGET, tokenizer_overrides=TINY_TOKENIZER,
                      diffusion_overrides=TINY_SIT, inception=stub, progress=False)
    assert json.loads((tmp_path / "study.json").read_text())["results"] == saved["results"]
    assert again == report
    with pytest.raises(ValueError, match="unknown study variants"):
        run_study(tmp_path, ["gan"], budget=QUICK_BUDGET, inception=stub)


@needs_fashion_mnist
def test_demo_quick_writes_the_report(tmp_path):
    from maetok.demo import run_demo

    report = run_demo(tmp_path, quick=True, inception=StubInception()).read_text()
    for heading in ("## Tokenizer", "## Latent diffusion", "## Latent space", "## Wall time", "rFID", "gFID", "GMM"):
        assert heading in report
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["reconstruction"]) == {"stage 1", "stage 2: MSE only", "stage 2: MSE + LPIPS + GAN"}
    assert "LPIPS (VGG)" in report and all(r["lpips"] > 0 for r in metrics["reconstruction"].values())
    assert 0 <= metrics["linear_probe"]["top1"] <= 1 and metrics["gmm"]["ks"] == [1, 2]
    for name in ("reconstructions.png", "samples.png", "gmm_nll.png", "latent_map.png", "tokenizer_curves.png"):
        assert (tmp_path / name).stat().st_size > 1000
    assert torch.isfinite(torch.tensor(metrics["generation"]["CFG 2.0"]["fid"]))
