"""eval-recon, eval-gen and analyze-latents on tiny tokenizers, with a stub feature network for FIDs."""

import json

import numpy as np
import pytest
import torch
from conftest import StubInception
from PIL import Image

from maetok.cli import main
from maetok.config import TokenizerConfig
from maetok.data import build_dataset
from maetok.eval.fid import fid_label
from maetok.eval.generation import eval_gen
from maetok.eval.latents import analyze_latents
from maetok.eval.reconstruction import eval_recon, evaluate_tokenizer
from maetok.models.tokenizer import MAETok


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    paths = {}
    for name, variant in (("ae", "ae"), ("vae", "vae")):
        torch.manual_seed(len(name))
        cfg = TokenizerConfig(
            variant=variant, image_size=16, in_channels=3, patch_size=4, encoder_width=32, encoder_depth=1,
            encoder_heads=2, decoder_width=32, decoder_depth=1, decoder_heads=2, num_latent_tokens=4, latent_dim=4,
            aux_targets=[], mask_ratio_min=0.0, mask_ratio_max=0.0,
        )
        paths[name] = tmp_path_factory.mktemp(name) / "model"
        MAETok(cfg).save_pretrained(paths[name])
    return paths


def test_fid_labels():
    assert [fid_label(n) for n in (500, 1000, 1500, 50000)] == ["500", "1k", "1.5k", "50k"]


def test_eval_recon_reports_counts_and_matches_the_metric_functions(tokenizers, image_folder):
    result = eval_recon(tokenizers["ae"], str(image_folder), split="all", inception=StubInception(), progress=False)
    assert result["num_images"] == result["rfid_num_images"] == 20  # 22 files, 2 unreadable: left out
    assert result["num_skipped_images"] == 2 and result["rfid_label"] == "rFID-20" and result["rfid"] >= 0
    direct = evaluate_tokenizer(MAETok.from_pretrained(tokenizers["ae"]), build_dataset(str(image_folder), "all", 16, 3), progress=False)
    assert result["psnr"] == pytest.approx(direct["psnr"]) and result["ssim_dr2"] > result["ssim"]
    no_fid = eval_recon(tokenizers["ae"], str(image_folder), split="all", fid=False, progress=False)
    assert no_fid["rfid"] is None and "not computed" in no_fid["rfid_note"]


def test_eval_gen_against_a_dataset_and_a_saved_reference(image_folder, tmp_path):
    rng = np.random.default_rng(0)
    samples = rng.integers(0, 256, size=(12, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", arr_0=samples, arr_1=np.arange(12) % 2)
    stub = StubInception()
    ref_npz = tmp_path / "ref.npz"
    first = eval_gen(tmp_path / "samples.npz", str(image_folder), num_ref=10, save_ref=ref_npz, inception=stub, progress=False,
                     ref_split="all")
    assert first["gfid_num_samples"] == 12 and first["gfid_num_reference"] == 10 and first["gfid_label"] == "FID-12"
    assert first["precision"] is not None and first["inception_score"] is not None
    again = eval_gen(tmp_path / "samples.npz", str(ref_npz), inception=stub, progress=False)
    assert again["gfid"] == pytest.approx(first["gfid"], rel=1e-9)
    assert again["num_classes_in_samples"] == 2
    same = eval_gen(ref_npz, str(ref_npz), inception=stub, progress=False)
    assert abs(same["gfid"]) < 1e-6


def test_analyze_latents_writes_json_and_plots(tokenizers, image_folder, tmp_path):
    report = analyze_latents({"AE": tokenizers["ae"], "VAE": tokenizers["vae"]}, str(image_folder), tmp_path,
                             num_train=None, num_test=None, ks=(1, 2), gmm_train=None, probe_epochs=3, progress=False)
    saved = json.loads((tmp_path / "latent_analysis.json").read_text())
    assert set(saved["models"]) == {"AE", "VAE"}
    for entry in saved["models"].values():
        assert 0.0 <= entry["linear_probe_top1"] <= 1.0 and entry["latent_shape"] == [4, 4]
    with Image.open(tmp_path / "gmm_nll.png") as image:
        assert image.size[0] > 100
    assert (tmp_path / report["models"]["AE"]["latent_map"]).exists()


def test_cli_eval_recon_without_fid(tokenizers, image_folder, tmp_path, capsys):
    out = tmp_path / "recon.json"
    assert main(["eval-recon", "--model", str(tokenizers["ae"]), "--data", str(image_folder), "--split", "all",
                 "--num", "8", "--no-fid", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["num_images"] == 8
    assert '"psnr"' in capsys.readouterr().out


def test_eval_recon_reports_lpips(tokenizers, image_folder):
    result = eval_recon(tokenizers["ae"], str(image_folder), split="all", num=8, fid=False, progress=False)
    assert result["lpips_label"] == "LPIPS (VGG)" and result["lpips"] > 0
    skipped = eval_recon(tokenizers["ae"], str(image_folder), split="all", num=8, fid=False, lpips=False, progress=False)
    assert skipped["lpips"] is None and "not computed" in skipped["lpips_note"]
    assert skipped["psnr"] == pytest.approx(result["psnr"])


def _fake_encode_dataset(ranks: dict[str, int]):
    """encode_dataset stand-in: latents (N, 16) of intrinsic dimension ranks[model name] (from the progress label)."""

    def encode(tokenizer, dataset, batch_size=256, progress=True, desc="encode"):
        _, name, part = desc.split()
        rng = np.random.default_rng(len(name) + len(part))
        num = 200 if part == "train" else 60
        basis = np.linalg.qr(rng.normal(size=(16, 16)))[0][:, : ranks[name]]
        latents = rng.normal(size=(num, ranks[name])) @ basis.T + 1e-3 * rng.normal(size=(num, 16))
        return torch.from_numpy(latents).float(), torch.arange(num) % 2

    return encode


def test_analyze_latents_fits_all_gmms_in_one_shared_dim(tokenizers, image_folder, tmp_path, monkeypatch):
    monkeypatch.setattr("maetok.encode.encode_dataset", _fake_encode_dataset({"AE": 2, "VAE": 10}))
    report = analyze_latents({"AE": tokenizers["ae"], "VAE": tokenizers["vae"]}, str(image_folder), tmp_path,
                             ks=(1, 2), gmm_train=None, probe_epochs=1, umap=False, progress=False)
    own = report["gmm_pca"]["own_pca_dims"]
    assert own["AE"] == 2 and own["VAE"] > own["AE"]  # per tokenizer the dimensions would differ
    saved = json.loads((tmp_path / "latent_analysis.json").read_text())
    for name, entry in saved["models"].items():
        assert entry["gmm"]["pca_dim"] == own["VAE"] == saved["gmm_pca"]["pca_dim"]
        assert entry["gmm"]["own_pca_dim"] == own[name]
    assert saved["models"]["AE"]["gmm"]["explained_variance"] > 0.999
    assert str(own["VAE"]) in saved["protocol"]["gmm"]


def test_cli_analyze_latents_pca_dim(tokenizers, image_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("maetok.encode.encode_dataset", _fake_encode_dataset({"AE": 2, "VAE": 10}))
    assert main(["analyze-latents", "--model", f"AE={tokenizers['ae']}", "--model", f"VAE={tokenizers['vae']}",
                 "--data", str(image_folder), "--out", str(tmp_path), "--ks", "1", "2", "--pca-dim", "4",
                 "--no-map"]) == 0
    saved = json.loads((tmp_path / "latent_analysis.json").read_text())
    assert saved["gmm_pca"]["pca_dim"] == 4 and "given" in saved["gmm_pca"]["pca_dim_source"]
    assert {entry["gmm"]["pca_dim"] for entry in saved["models"].values()} == {4}
    assert "GMM in PCA dim 4" in capsys.readouterr().out
