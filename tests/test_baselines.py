"""The yardstick baselines: PCA as a tokenizer, a (class-conditional) Gaussian as a generator, real-vs-real FID."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import StubInception
from PIL import Image

import maetok.eval.baselines as baselines
from maetok.cli import main
from maetok.eval.baselines import GaussianGenerator, PCABaseline, compute_baselines


def low_rank_images(n: int = 200, rank: int = 5, shape=(1, 8, 8), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    d = int(np.prod(shape))
    basis = torch.randn(rank, d, generator=g)
    coefficients = torch.randn(n, rank, generator=g)
    x = 0.1 + 0.2 / rank * coefficients @ basis  # small enough that nothing reaches the [-1, 1] clamp
    assert x.abs().max() < 1
    return x.reshape(n, *shape)


@pytest.mark.parametrize("exact", [True, False])
def test_pca_reconstruction_is_exact_when_the_rank_allows(monkeypatch, exact):
    if not exact:  # the randomized-SVD path used for large images
        monkeypatch.setattr(baselines, "_EXACT_COVARIANCE_MAX_DIM", 0)
    images = low_rank_images(rank=5)
    pca = PCABaseline.fit(images, dim=5)
    assert pca.dim == 5 and pca.explained_variance == pytest.approx(1.0, abs=1e-9)
    assert torch.allclose(pca.reconstruct(images), images, atol=1e-5)
    assert pca.encode(images).shape == (200, 5)
    fewer = PCABaseline.fit(images, dim=2)  # rank 5 with 2 components: lossy, and keeps the top variance
    error = (fewer.reconstruct(images) - images).pow(2).mean()
    assert 0 < fewer.explained_variance < 1 and error > 1e-6
    with pytest.raises(ValueError, match="dim=500"):
        PCABaseline.fit(images, dim=500)


def test_pca_components_are_the_top_principal_directions():
    g = torch.Generator().manual_seed(1)
    scales = torch.tensor([3.0, 2.0, 1.0, 0.1])
    x = (torch.randn(4000, 4, generator=g) * scales).reshape(4000, 1, 2, 2) * 0.1
    pca = PCABaseline.fit(x, dim=2)
    top = pca.components.abs().argmax(dim=0).tolist()
    assert top == [0, 1]
    assert pca.explained_variance == pytest.approx((9 + 4) / (9 + 4 + 1 + 0.01), abs=0.02)


def test_gaussian_generator_moments_and_classes():
    g = torch.Generator().manual_seed(0)
    means = torch.tensor([[0.0, 0.0, 0.0], [5.0, -3.0, 1.0]], dtype=torch.float64)
    covs = [torch.diag(torch.tensor([1.0, 0.5, 0.2], dtype=torch.float64)),
            torch.tensor([[2.0, 0.8, 0.0], [0.8, 1.0, 0.0], [0.0, 0.0, 0.3]], dtype=torch.float64)]
    codes, labels = [], []
    for c in range(2):
        factor = torch.linalg.cholesky(covs[c])
        codes.append(means[c] + torch.randn(5000, 3, generator=g, dtype=torch.float64) @ factor.T)
        labels.append(torch.full((5000,), 7 + c))  # class ids need not start at 0
    model = GaussianGenerator.fit(torch.cat(codes), torch.cat(labels))
    assert model.conditional and model.classes.tolist() == [7, 8]
    for c in range(2):
        draws = model.sample(torch.full((20000,), 7 + c), generator=torch.Generator().manual_seed(c))
        assert torch.allclose(draws.mean(0), means[c], atol=0.06)
        assert torch.allclose(torch.cov(draws.T), covs[c], atol=0.08)
    with pytest.raises(ValueError, match="classes \\[3\\]"):
        model.sample(torch.tensor([3]))
    pooled = GaussianGenerator.fit(torch.cat(codes))
    assert not pooled.conditional
    assert pooled.sample(num=10, generator=g).shape == (10, 3)


def test_compute_baselines_with_a_stub_inception():
    train = low_rank_images(n=300, rank=20, shape=(3, 16, 16), seed=2)
    labels = torch.arange(300) % 3
    evaluation = low_rank_images(n=60, rank=20, shape=(3, 16, 16), seed=3)
    result = compute_baselines(train, labels, evaluation, dim=8, inception=StubInception(), lpips=False)
    assert result["pca"]["dim"] == 8 and result["pca"]["num_images"] == 60
    assert result["pca"]["psnr"] > 20 and result["pca"]["rfid"] >= 0
    assert result["gaussian"]["conditional"] and result["gaussian"]["gfid"] >= 0
    free = result["gaussian"]["decoder_free"]  # its samples against the PCA reconstructions, over their floor
    assert free["fid"] >= 0 and free["floor_fid"] > 0 and free["num_floor"] == free["num_reference"] == 60
    assert result["real_vs_real"]["fid"] >= 0
    assert result["samples"].shape == (60, 3, 16, 16) and result["reconstructions"].shape == (60, 3, 16, 16)


def test_cli_baselines_on_an_image_folder(image_folder, tmp_path, monkeypatch):
    monkeypatch.setattr("maetok.eval.inception.load_inception", lambda *a, **k: StubInception())
    out = tmp_path / "baselines"
    folder = tmp_path / "images"  # the held-out split of image_folder holds one readable image: add two
    shutil.copytree(image_folder, folder)
    for index in (22, 69):  # names hash_split assigns to the held-out side
        Image.new("RGB", (20, 24), (index, 90, 200)).save(folder / "dogs" / f"extra{index}.png")
    assert main(["baselines", "--data", str(folder), "--dim", "6", "--image-size", "16", "--out", str(out),
                 "--num-eval", "8", "--no-lpips"]) == 0
    result = json.loads((out / "baselines.json").read_text())
    assert result["pca"]["dim"] == 6 and result["gaussian"]["conditional"] is True
    assert (out / "baselines.png").read_bytes()[:4] == b"\x89PNG"
