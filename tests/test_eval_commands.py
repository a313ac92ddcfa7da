"""eval-recon, eval-gen and analyze-latents on tiny tokenizers, with a stub feature network for FIDs."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from maetok.cli import main
from maetok.config import TokenizerConfig
from maetok.data import build_dataset
from maetok.eval.commands import analyze_latents, eval_gen, eval_recon, fid_label
from maetok.eval.reconstruction import evaluate_reconstruction
from maetok.models.tokenizer import MAETok
from test_eval_metrics import StubInception


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
    assert result["num_images"] == result["rfid_num_images"] == 22
    assert result["rfid_label"] == "rFID-22" and result["rfid"] >= 0
    direct = evaluate_reconstruction(MAETok.from_pretrained(tokenizers["ae"]), build_dataset(str(image_folder), "all", 16, 3), progress=False)
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
