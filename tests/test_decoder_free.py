"""The decoder-free generation figures (samples against a tokenizer's own reconstructions, with their floor) and the
diffusion model's held-out loss beside a Gaussian's."""

import numpy as np
import pytest
import torch
from conftest import StubInception

from maetok.cli import main
from maetok.config import TokenizerConfig
from maetok.data.npz import NpzFormatError, load_reconstruction_batch, save_reconstruction_batch, save_sample_batch
from maetok.eval.generation import (
    DecoderFreeReference,
    decoder_free_metrics,
    eval_gen,
    heldout_denoising_loss,
    reference_from_images,
)
from maetok.models.tokenizer import MAETok


def random_images(n: int, seed: int, size: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def test_a_set_against_itself_is_zero_and_the_floor_is_the_fid_of_the_floor_set():
    stub = StubInception()
    recon, floor = random_images(30, 1), random_images(30, 2)
    reference = DecoderFreeReference(reference_from_images(recon, stub, progress=False),
                                     reference_from_images(floor, stub, progress=False))
    same = decoder_free_metrics(reference.reconstructions.pool3, reference)
    assert abs(same["fid"]) < 1e-6 and same["precision"] == same["recall"] == 1.0
    assert same["fid_excess"] == pytest.approx(-same["floor_fid"]) and same["fid_ratio"] == pytest.approx(0, abs=1e-6)
    as_samples = decoder_free_metrics(reference.floor.pool3, reference)  # the floor set as the samples: ratio 1
    assert as_samples["fid"] == pytest.approx(as_samples["floor_fid"], rel=1e-9) and as_samples["fid_ratio"] == pytest.approx(1)
    assert (as_samples["precision"], as_samples["recall"]) == (as_samples["floor_precision"], as_samples["floor_recall"])
    assert same["num_samples"] == same["num_reference"] == same["num_floor"] == 30 and same["label"] == "FID-30"


def test_eval_gen_decoder_free_fid_equals_eval_gen_fid_on_the_same_arrays(tmp_path):
    stub = StubInception()
    samples, recon, floor = random_images(24, 0), random_images(20, 1), random_images(20, 2)
    save_sample_batch(tmp_path / "samples.npz", samples)
    save_sample_batch(tmp_path / "recon_ref.npz", recon)  # as an ADM reference batch: eval-gen's plain FID
    save_sample_batch(tmp_path / "floor.npz", floor)
    recon_npz = save_reconstruction_batch(tmp_path / "recon", recon, floor)
    result = eval_gen(tmp_path / "samples.npz", str(tmp_path / "recon_ref.npz"), recon=recon_npz, inception=stub,
                      progress=False)
    free = result["decoder_free"]
    assert free["fid"] == pytest.approx(result["gfid"], rel=1e-6)  # the reference here IS the reconstructions
    plain_floor = eval_gen(tmp_path / "floor.npz", str(tmp_path / "recon_ref.npz"), inception=stub, progress=False)
    assert free["floor_fid"] == pytest.approx(plain_floor["gfid"], rel=1e-6)
    assert free["fid_ratio"] == pytest.approx(free["fid"] / free["floor_fid"])
    assert free["recall"] == pytest.approx(result["recall"]) and free["precision"] == pytest.approx(result["precision"])
    itself = eval_gen(tmp_path / "recon_ref.npz", str(tmp_path / "recon_ref.npz"), recon=recon_npz, inception=stub,
                      progress=False)
    assert abs(itself["decoder_free"]["fid"]) < 1e-6
    with pytest.raises(ValueError, match="very reference images"):  # 24 samples as reference, 20 reconstructions
        eval_gen(tmp_path / "samples.npz", str(tmp_path / "samples.npz"), recon=recon_npz, inception=stub, progress=False)


def test_eval_gen_with_a_tokenizer_reconstructs_the_reference_draw_and_saves_it(image_folder, tmp_path):
    cfg = TokenizerConfig(variant="ae", image_size=16, in_channels=3, patch_size=4, encoder_width=32, encoder_depth=1,
                          encoder_heads=2, decoder_width=32, decoder_depth=1, decoder_heads=2, num_latent_tokens=4,
                          latent_dim=4, aux_targets=[], mask_ratio_min=0.0, mask_ratio_max=0.0)
    torch.manual_seed(0)
    MAETok(cfg).save_pretrained(tmp_path / "tok")
    save_sample_batch(tmp_path / "samples.npz", random_images(10, 3))
    stub = StubInception()
    first = eval_gen(tmp_path / "samples.npz", str(image_folder), num_ref=8, ref_split="all", inception=stub,
                     progress=False, tokenizer=tmp_path / "tok", save_recon=tmp_path / "recon.npz")
    free = first["decoder_free"]
    assert free["num_reference"] == first["gfid_num_reference"] == 8 and free["num_floor"] == 8
    assert free["fid"] >= 0 and free["floor_fid"] > 0 and "tokenizer" in first["decoder_free_source"]
    reference, floor = load_reconstruction_batch(tmp_path / "recon.npz")
    assert reference.shape == floor.shape == (8, 16, 16, 3)
    again = eval_gen(tmp_path / "samples.npz", str(image_folder), num_ref=8, ref_split="all", inception=stub,
                     progress=False, recon=tmp_path / "recon.npz")
    assert again["decoder_free"]["fid"] == pytest.approx(free["fid"], rel=1e-9)
    assert main(["eval-gen", "--samples", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "samples.npz"),
                 "--tokenizer", str(tmp_path / "tok"), "--inception", "/nonexistent"]) == 2  # one line, no traceback


def test_a_reconstructions_file_missing_its_floor_is_one_clear_error(tmp_path):
    np.savez(tmp_path / "bad.npz", reference=random_images(4, 0))
    with pytest.raises(NpzFormatError, match="missing key 'floor'"):
        load_reconstruction_batch(tmp_path / "bad.npz")


class GaussianOptimal(torch.nn.Module):
    """The velocity a Gaussian N(0, diag(lam)) allows: (t - (1 - t) lam) / ((1 - t)^2 lam + t^2) x_t."""

    def __init__(self, lam: torch.Tensor):
        super().__init__()
        self.register_buffer("lam", lam)

    def forward(self, x, t, y=None):
        t = t.view(-1, 1, 1)
        return (t - (1 - t) * self.lam) / ((1 - t) ** 2 * self.lam + t**2) * x


def test_heldout_loss_of_the_gaussian_optimum_equals_the_gaussian_baseline():
    g = torch.Generator().manual_seed(0)
    lam = torch.tensor([4.0, 1.0, 0.25, 0.05]).view(2, 2)
    train = torch.randn(20000, 2, 2, generator=g) * lam.sqrt()
    heldout = torch.randn(1000, 2, 2, generator=g) * lam.sqrt()
    result = heldout_denoising_loss(GaussianOptimal(lam), heldout, train)
    assert result["ratio"] == pytest.approx(1.0, abs=0.02)  # the fitted Gaussian is the true one, up to sampling
    times = (torch.arange(16) + 0.5) / 16
    closed_form = torch.stack([(lam / ((1 - t) ** 2 * lam + t**2)).mean() for t in times]).mean()
    assert result["gaussian_loss"] == pytest.approx(closed_form.item(), rel=0.05)
    zero = heldout_denoising_loss(_Zero(), heldout, train)
    assert zero["loss"] == pytest.approx(1 + lam.mean().item(), rel=0.05)  # E||eps - x||^2 per number
    assert zero["ratio"] > 1


class _Zero(torch.nn.Module):
    def forward(self, x, t, y=None):
        return torch.zeros_like(x)


def test_heldout_loss_fits_one_gaussian_per_class_when_labelled():
    """Two classes with opposite means: a pooled Gaussian cannot tell them apart, the per-class ones can."""
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(4000) % 2
    shift = (2 * labels - 1).float().view(-1, 1, 1) * 3.0
    train = torch.randn(4000, 2, 2, generator=g) * 0.3 + shift
    held = torch.randn(400, 2, 2, generator=g) * 0.3 + shift[:400]
    pooled = heldout_denoising_loss(_Zero(), held, train)
    per_class = heldout_denoising_loss(_Zero(), held, train, labels[:400], labels)
    assert per_class["gaussian"] == "one per class" and pooled["gaussian"] == "one for all latents"
    assert per_class["gaussian_loss"] < 0.6 * pooled["gaussian_loss"]
    assert per_class["loss"] == pytest.approx(pooled["loss"])  # the model's own loss does not depend on the fit
