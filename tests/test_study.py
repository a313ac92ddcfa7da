"""`maetok study` and `maetok demo` end to end at a tiny budget on Fashion-MNIST, with a stub FID network."""

import json

import numpy as np
import pytest
import torch
from conftest import StubInception, needs_fashion_mnist
from PIL import Image

from maetok.study import QUICK_BUDGET, VARIANTS, judge, mean_std, run_study

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
              for slug, (_, overrides, _) in VARIANTS.items()}
    assert models["ae"].variant == "ae" and models["vae"].variant == "vae" and models["maetok"].variant == "maetok"
    assert models["maetok"].mask_ratio_max == 0.6 and len(models["maetok"].aux_targets) == 2
    assert models["maetok-no-aux"].aux_targets == [] and models["maetok-no-aux"].mask_ratio_max == 0.6
    assert models["maetok-no-mask"].mask_ratio_max == 0 and len(models["maetok-no-mask"].aux_targets) == 2
    widths = {(m.encoder_width, m.encoder_depth, m.num_latent_tokens, m.latent_dim) for m in models.values()}
    assert len(widths) == 1  # the same architecture everywhere
    assert [VARIANTS[s][2] for s in ("ae", "vae", "maetok")] == [3, 3, 3]  # the compared tokenizers get 3 seeds
    assert models["ae-short"] == models["ae"]  # the information control: the AE itself, trained for less


def test_the_short_ae_trains_a_fifth_of_stage_one(monkeypatch, tmp_path):
    from maetok import study

    seen = {}
    monkeypatch.setattr(study, "run_pipeline", lambda run_dir, evald, budget, *a, **k: seen.update(
        {run_dir.relative_to(tmp_path).as_posix(): (budget.stage1_steps, budget.stage2_steps)}))
    for slug in ("ae", "ae-short"):
        study.run_variant(tmp_path, slug, 1, None, study.CPU_BUDGET, "fashion-mnist-maetok", "fashion-mnist-sit")
    assert seen == {"ae/seed1": (2000, 200), "ae-short/seed1": (400, 200)}


def test_each_claim_is_judged_on_its_own_orderings():
    from maetok.study import CLAIMS, claim_verdicts

    labels = {slug: label for slug, (label, _, _) in VARIANTS.items()}
    judged = {c: None for c in CLAIMS}
    for claim in CLAIMS:  # MAETok beats AE and VAE on every decoder-free figure, but not the short AE
        if claim[0] in ("dfid_ratio", "dfid_recall", "heldout_ratio"):
            judged[claim] = "holds (+0.40, noise +-0.10)" if claim[3] != "ae-short" else "not decided: within seed noise"
    lines = claim_verdicts(judged, labels)
    assert lines[0].startswith("- MAETok's latents are easier") and "**holds**" in lines[0]
    assert "information confound out" in lines[1] and "**cannot be decided at this scale**" in lines[1]
    assert "MAETok vs AE, 1/5 of stage 1 (MAETok's PSNR): dfid_ratio" in lines[1]
    assert all("**cannot be decided**: no comparison" in line for line in lines[2:])


def test_claims_are_judged_against_seed_noise():
    stats = {"maetok": {"gfid": (10.0, 1.0, 3)}, "ae": {"gfid": (20.0, 1.0, 3)}, "vae": {"gfid": (10.5, 1.0, 3)}}
    assert judge(("gfid", "lower", "maetok", "ae"), stats).startswith("holds")
    assert judge(("gfid", "lower", "maetok", "vae"), stats).startswith("not decided")
    assert judge(("gfid", "higher", "maetok", "ae"), stats).startswith("reversed")
    assert judge(("gfid", "lower", "maetok", "ae"), {**stats, "ae": {"gfid": (20.0, None, 1)}}) is None
    assert mean_std([1.0, 3.0, None]) == (2.0, pytest.approx(2 ** 0.5), 2)


@needs_fashion_mnist
def test_study_writes_table_and_plots_and_resumes(tmp_path, monkeypatch):
    stub = StubInception()
    report = run_study(tmp_path, ["ae", "maetok"], budget=QUICK_BUDGET, tokenizer_overrides=TINY_TOKENIZER,
                       diffusion_overrides=TINY_SIT, inception=stub, progress=False, seeds=2)
    text = report.read_text()
    assert "| AE |" in text and "| MAETok |" in text and "LPIPS (VGG)" in text and "baseline: PCA-16" in text
    assert "MAETok vs AE: linear_probe_top1" in text and "floor: real vs real" in text
    assert "decoder-free FID / floor" in text and "recall vs recon." in text
    assert "MAETok vs AE: dfid_ratio" in text and "MAETok vs AE: heldout_ratio" in text
    saved = json.loads((tmp_path / "study.json").read_text())
    shared = saved["gmm_pca"]["pca_dim"]
    assert shared == max(saved["gmm_pca"]["own_pca_dims"].values())
    for slug in ("ae", "maetok"):
        assert [r["seed"] for r in saved["runs"][slug]] == [0, 1]
        for r in saved["runs"][slug]:
            assert r["reconstruction"]["rfid"] >= 0 and r["generation"]["gfid"] >= 0
            assert r["generation"]["decoder_free"]["floor_fid"] > 0 and r["sit_heldout"]["gaussian_loss"] > 0
            assert 0 <= r["linear_probe"]["top1"] <= 1 and r["reconstruction"]["lpips"] > 0
            assert r["gmm_shared"]["pca_dim"] == shared and set(r["gmm_shared"]["test_nll"]) == {"1", "2"}
        assert saved["summary"][slug]["psnr"]["seeds"] == 2 and saved["summary"][slug]["psnr"]["std"] is not None
    seeds = [saved["runs"]["maetok"][k]["reconstruction"]["psnr"] for k in (0, 1)]
    assert seeds[0] != seeds[1]  # two seeds are two different runs
    assert saved["baselines"]["pca"]["dim"] == 16 and saved["baselines"]["real_vs_real"]["fid"] >= 0
    for name in ("gfid_vs_lp.png", "gmm_nll.png", "reconstructions.png", "ae/seed0/latent_map.png",
                 "maetok/seed1/samples.png"):
        with Image.open(tmp_path / name) as image:
            assert image.size[0] > 50
    with Image.open(tmp_path / "reconstructions.png") as image:  # originals + one row per tokenizer, 16 wide
        assert image.size[1] == 3 * (32 + 2) + 2 and image.size[0] == 16 * (32 + 2) + 2

    # a second run reuses the finished runs instead of training them again
    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("maetok.train.tokenizer.TokenizerTrainer.fit", no_training)
    again = run_study(tmp_path, ["ae", "maetok"], budget=QUICK_BUDGET, tokenizer_overrides=TINY_TOKENIZER,
                      diffusion_overrides=TINY_SIT, inception=stub, progress=False, seeds=2)
    assert json.loads((tmp_path / "study.json").read_text())["runs"] == saved["runs"]
    assert again == report
    with pytest.raises(ValueError, match="unknown study variants"):
        run_study(tmp_path, ["gan"], budget=QUICK_BUDGET, inception=stub)


@needs_fashion_mnist
def test_demo_quick_writes_the_report_with_baselines(tmp_path, monkeypatch):
    from maetok.demo import run_demo

    report = run_demo(tmp_path, quick=True, inception=StubInception()).read_text()
    for heading in ("## Tokenizer", "## Latent diffusion", "## Latent space", "## Wall time", "rFID", "gFID", "GMM",
                    "baseline: PCA-128", "Gaussian in the PCA-128 space", "floor:"):
        assert heading in report
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["reconstruction"]) == {"stage 1", "stage 2: MSE only", "stage 2: MSE + LPIPS + GAN"}
    assert "LPIPS (VGG)" in report and all(r["lpips"] > 0 for r in metrics["reconstruction"].values())
    assert 0 <= metrics["linear_probe"]["top1"] <= 1 and list(metrics["gmm"]["test_nll"]) == ["1", "2"]
    assert metrics["baselines"]["pca"]["dim"] == 128 and metrics["baselines"]["gaussian"]["conditional"]
    for name in ("reconstructions.png", "samples.png", "baseline_samples.png", "latent_map.png", "tokenizer_curves.png"):
        assert (tmp_path / name).stat().st_size > 1000
    with Image.open(tmp_path / "reconstructions.png") as image:  # originals, stage 1, MSE, full, PCA
        assert image.size[1] == 5 * (32 + 2) + 2
    assert torch.isfinite(torch.tensor(metrics["generation"]["gfid"]))
    free = metrics["generation"]["decoder_free"]  # the decoder-free figures, beside gFID, for the SiT and the Gaussian
    assert free["num_samples"] == free["num_reference"] == free["num_floor"] == 48 and free["floor_fid"] > 0
    assert metrics["baselines"]["gaussian"]["decoder_free"]["fid"] >= 0 and metrics["sit_heldout"]["ratio"] > 0
    assert "decoder-free FID-48 (its floor)" in report and "ratio to floor" in report

    # the README's first command can be run twice: the second run reuses every finished phase
    def no_training(*args, **kwargs):
        raise AssertionError("a finished phase was run again")

    monkeypatch.setattr("maetok.train.tokenizer.TokenizerTrainer.fit", no_training)
    monkeypatch.setattr("maetok.train.diffusion.DiffusionTrainer.fit", no_training)
    monkeypatch.setattr("maetok.eval.baselines.compute_baselines", no_training)
    assert "baseline: PCA-128" in run_demo(tmp_path, quick=True, inception=StubInception()).read_text()


def test_demo_on_an_unlabelled_rgb_folder(tmp_path):
    from maetok.demo import run_demo

    rng = np.random.default_rng(0)
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(120):  # no class sub-folders: unconditional
        Image.fromarray((rng.random((20, 20, 3)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "demo"
    report = run_demo(out, quick=True, inception=StubInception(), data=str(folder), image_size=16,
                      tokenizer_extra=("model.patch_size=4",) + tuple(TINY_TOKENIZER), diffusion_extra=tuple(TINY_SIT))
    text = report.read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["linear_probe"] is None and "Linear probe" not in text
    assert "unconditional" in text and metrics["baselines"]["gaussian"]["conditional"] is False
    assert metrics["baselines"]["pca"]["dim"] == 16
    with Image.open(out / "reconstructions.png") as image:
        assert image.mode == "RGB"


def test_sample_grid_takes_rows_per_class_from_the_measured_samples():
    from maetok.pipeline import sample_grid

    samples = np.arange(30, dtype=np.uint8).reshape(30, 1, 1, 1)
    labels = np.arange(30) % 3  # balanced, as the gFID draws them
    grid, per_row = sample_grid(samples, labels, rows=2, per_row=4)
    assert per_row == 4 and grid[:, 0, 0, 0].tolist() == [0, 3, 6, 9, 1, 4, 7, 10]
    grid, per_row = sample_grid(samples[:7], labels[:7], per_row=10)  # classes of 3, 2, 2 samples: 2 per row
    assert per_row == 2 and grid[:, 0, 0, 0].tolist() == [0, 3, 1, 4, 2, 5]
    grid, per_row = sample_grid(samples, None, rows=2, per_row=5)
    assert per_row == 5 and grid[:, 0, 0, 0].tolist() == list(range(10))


def test_the_latent_cache_draws_every_class_of_a_folder_sorted_by_class():
    from maetok.pipeline import cache_draw

    class SortedFolder(torch.utils.data.Dataset):  # three classes of 130 images, one after another
        labels = torch.arange(390) // 130

        def __len__(self) -> int:
            return 390

    drawn = cache_draw(SortedFolder(), 256)
    assert len(drawn) == 256 and len(set(drawn.indices.tolist())) == 256
    assert set(SortedFolder.labels[drawn.indices[:30]].tolist()) == {0, 1, 2}  # every prefix is a draw too
    assert drawn.indices.tolist() == cache_draw(SortedFolder(), 256).indices.tolist()  # seeded
    assert sorted(cache_draw(SortedFolder(), None).indices.tolist()) == list(range(390))
