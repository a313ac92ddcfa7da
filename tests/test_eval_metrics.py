"""Metrics without Inception weights: Frechet distance, statistics, IS, precision/recall, PSNR/SSIM,
uint8 conversion, ADM .npz I/O, linear probe, GMM analysis and plots."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch
from conftest import StubInception

from maetok.data.images import to_uint8
from maetok.data.npz import NpzFormatError, iter_npz_images, load_sample_batch, save_sample_batch
from maetok.eval.fid import (
    FeatureStats,
    InceptionStats,
    compute_fid_stats,
    extract_features,
    frechet_distance,
    iter_image_batches,
    load_reference_batch,
    load_stats_npz,
    save_reference_stats,
)
from maetok.eval.generation import generation_metrics
from maetok.eval.inception import InceptionFeatures
from maetok.eval.latents import gmm_nll_analysis, linear_probe, plot_gmm_curves, plot_umap, train_test_split
from maetok.eval.metrics import (
    inception_score,
    manifold_radii,
    precision_recall,
    psnr,
    psnr_per_image,
    reconstruction_quality,
    ssim,
    ssim_per_image,
)
from maetok.eval.reconstruction import ReconstructionEvaluator

# ---------------------------------------------------------------------------------------------------------
# Frechet distance: the exact values of docs/EVALUATION.md
# ---------------------------------------------------------------------------------------------------------


def test_frechet_identity_covariances_2048d():
    d = 2048
    assert frechet_distance(np.zeros(d), np.eye(d), np.ones(d), np.eye(d)) == pytest.approx(2048.0, abs=1e-6)


def test_frechet_1d():
    assert frechet_distance([0.0], [[1.0]], [3.0], [[4.0]]) == pytest.approx(10.0, abs=1e-12)


def test_frechet_2d_scaled_identity():
    assert frechet_distance(np.zeros(2), np.eye(2), np.ones(2), 4 * np.eye(2)) == pytest.approx(4.0, abs=1e-12)


def test_frechet_2d_correlated():
    s1 = np.array([[2.0, 1.0], [1.0, 2.0]])
    s2 = np.diag([1.0, 4.0])
    value = frechet_distance(np.zeros(2), s1, np.array([1.0, 2.0]), s2)
    assert value == pytest.approx(5.77122044765434, abs=1e-11)


def test_frechet_3d():
    mu1, mu2 = np.array([1.0, 0.0, -1.0]), np.array([0.0, 0.5, 0.0])
    s1 = np.array([[4, 1, 0.5], [1, 3, 0.2], [0.5, 0.2, 2]])
    s2 = np.array([[1, -0.3, 0], [-0.3, 2, 0.4], [0, 0.4, 1.5]])
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(3.71657330294342, abs=1e-11)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(3.71657330294342, abs=1e-11)


def test_frechet_singular():
    s1 = np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    value = frechet_distance(np.zeros(3), s1, np.zeros(3), np.eye(3))
    assert value == pytest.approx(1.3431457505076194, abs=1e-12)
    assert value == pytest.approx(7 - 4 * math.sqrt(2), abs=1e-12)


def test_frechet_self_zero_and_symmetric():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 24)) @ rng.normal(size=(24, 24))
    b = rng.normal(size=(300, 24)) * 1.3 + 0.2
    mu_a, s_a = a.mean(0), np.cov(a, rowvar=False)
    mu_b, s_b = b.mean(0), np.cov(b, rowvar=False)
    assert abs(frechet_distance(mu_a, s_a, mu_a, s_a)) < 1e-8
    ab, ba = frechet_distance(mu_a, s_a, mu_b, s_b), frechet_distance(mu_b, s_b, mu_a, s_a)
    assert ab > 1.0
    assert ab == pytest.approx(ba, rel=1e-10)


def test_frechet_rank_deficient_matches_sqrtm():
    """Fewer samples than dims (the FID-1k pitfall): finite, and equal to the scipy sqrtm formula."""
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(10, 32)), rng.normal(size=(12, 32)) + 0.3
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    value = frechet_distance(a.mean(0), s_a, b.mean(0), s_b)
    covmean = scipy_linalg.sqrtm(s_a @ s_b).real
    diff = a.mean(0) - b.mean(0)
    reference = diff @ diff + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean)
    assert np.isfinite(value) and value == pytest.approx(reference, rel=1e-6)


def test_frechet_errors():
    with pytest.raises(ValueError, match="equal length"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="sigma2 contains NaN"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.full((2, 2), np.nan))


def test_feature_stats_match_numpy_and_ignore_batch_size():
    rng = np.random.default_rng(0)
    features = (rng.normal(size=(257, 16)) * 3 + 100).astype(np.float32)  # large offset: cancellation check
    results = []
    for batch in (1, 7, 64, 257):
        stats = FeatureStats()
        for i in range(0, len(features), batch):
            stats.update(torch.from_numpy(features[i : i + batch]))
        results.append((stats.mean(), stats.cov()))
        assert stats.num == 257
    ref_cov = np.cov(features.astype(np.float64), rowvar=False)
    for mean, cov in results:
        np.testing.assert_allclose(mean, features.astype(np.float64).mean(0), rtol=0, atol=1e-11)
        np.testing.assert_allclose(cov, ref_cov, rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------------------------------
# Inception Score
# ---------------------------------------------------------------------------------------------------------


def test_inception_score_identical_predictions_is_one():
    logits = torch.randn(1, 1008).repeat(100, 1)
    mean, std = inception_score(logits)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_confident_even_spread_is_num_classes():
    num_classes = 8
    labels = torch.arange(num_classes).repeat(10 * 3)  # every split of 24 sees each class 3 times
    logits = torch.nn.functional.one_hot(labels, num_classes).double() * 1000.0  # exp(-1000) == 0
    mean, std = inception_score(logits, split_size=24)
    assert mean == pytest.approx(num_classes, rel=1e-12) and std == pytest.approx(0.0, abs=1e-9)


def test_inception_score_needs_logits():
    with pytest.raises(ValueError, match="needs the 1008-way Inception logits"):
        inception_score(None)
    with pytest.raises(ValueError, match="at least one sample"):
        inception_score(torch.randn(0, 10))
    with pytest.raises(ValueError, match="split_size must be"):
        inception_score(torch.randn(5, 10), split_size=0)


# ---------------------------------------------------------------------------------------------------------
# Precision / recall
# ---------------------------------------------------------------------------------------------------------


def _brute_force_pr(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    def radii(x):
        d = ((x[:, None] - x[None]) ** 2).sum(-1)
        return np.sort(d, axis=1)[:, k]

    d = ((fake[:, None] - real[None]) ** 2).sum(-1)  # (fake, real)
    precision = (d <= radii(real)[None]).any(1).mean()
    recall = (d.T <= radii(fake)[None]).any(1).mean()
    return float(precision), float(recall)


def test_precision_recall_identical_sets():
    x = torch.randn(120, 16, generator=torch.Generator().manual_seed(0))
    assert precision_recall(x, x.clone()) == {"precision": 1.0, "recall": 1.0}


def test_precision_recall_narrow_vs_wide():
    g = torch.Generator().manual_seed(0)
    fake = 0.1 * torch.randn(200, 16, generator=g)
    real = 3.0 * torch.randn(200, 16, generator=g)
    result = precision_recall(real, fake, k=3)
    assert result["precision"] > 0.8
    assert result["recall"] < 0.3


def test_precision_recall_blocks_match_brute_force():
    rng = np.random.default_rng(3)
    real = rng.normal(size=(90, 8)).astype(np.float32)
    fake = (rng.normal(size=(70, 8)) * 0.8 + 0.4).astype(np.float32)
    blocked = precision_recall(real, fake, k=3, row_batch=16, col_batch=13)
    full = precision_recall(real, fake, k=3)
    assert blocked == full
    precision, recall = _brute_force_pr(real.astype(np.float64), fake.astype(np.float64), 3)
    assert blocked["precision"] == pytest.approx(precision, abs=1.5 / 70)
    assert blocked["recall"] == pytest.approx(recall, abs=1.5 / 90)
    expected_radii = np.sort(((real[:, None] - real[None]) ** 2).sum(-1), axis=1)[:, 3]
    np.testing.assert_allclose(manifold_radii(real, 3, row_batch=7, col_batch=11).numpy(), expected_radii, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# to_uint8, PSNR, SSIM (against scikit-image)
# ---------------------------------------------------------------------------------------------------------


def test_to_uint8_round_trip_and_clamp():
    levels = torch.arange(256, dtype=torch.uint8)
    x = levels.float() / 127.5 - 1.0
    assert torch.equal(to_uint8(x), levels)
    assert to_uint8(torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0])).tolist() == [0, 0, 128, 255, 255]
    assert torch.equal(to_uint8(levels), levels)  # already uint8: unchanged
    assert to_uint8(x.view(1, 1, 16, 16).expand(2, 3, 16, 16), channels_last=True).shape == (2, 16, 16, 3)
    with pytest.raises(TypeError):
        to_uint8(levels.long())
    with pytest.raises(ValueError, match="NaN"):
        to_uint8(torch.tensor([0.0, float("nan")]))  # a broken model must not pass for gray images


def _fixed_pair(seed: int = 0, shape=(3, 3, 23, 17)):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, size=shape, dtype=np.uint8)
    noise = rng.integers(-30, 31, size=shape)
    b = np.clip(a.astype(np.int64) + noise, 0, 255).astype(np.uint8)
    return a, b


def test_psnr_matches_skimage():
    skm = pytest.importorskip("skimage.metrics")
    a, b = _fixed_pair()
    expected = [skm.peak_signal_noise_ratio(a[i], b[i], data_range=255) for i in range(len(a))]
    np.testing.assert_allclose(psnr_per_image(a, b).numpy(), expected, rtol=1e-12)
    assert psnr(a, b) == pytest.approx(np.mean(expected), rel=1e-12)
    af, bf = a / 255.0, b / 255.0
    assert psnr(torch.from_numpy(af), torch.from_numpy(bf)) == pytest.approx(np.mean(expected), rel=1e-12)


@pytest.mark.parametrize("data_range", [1.0, 2.0])
def test_ssim_matches_skimage(data_range):
    skm = pytest.importorskip("skimage.metrics")
    a, b = _fixed_pair(1)
    af, bf = a.astype(np.float64) / 255.0, b.astype(np.float64) / 255.0
    expected = [
        skm.structural_similarity(af[i], bf[i], data_range=data_range, gaussian_weights=True, sigma=1.5,
                                  use_sample_covariance=False, channel_axis=0)
        for i in range(len(a))
    ]
    np.testing.assert_allclose(ssim_per_image(af, bf, data_range).numpy(), expected, rtol=0, atol=1e-12)
    # uint8 input: data_range is in [0, 1] units (skimage on uint8 with data_range=255 * data_range)
    expected_u8 = [
        skm.structural_similarity(a[i], b[i], data_range=255 * data_range, gaussian_weights=True, sigma=1.5,
                                  use_sample_covariance=False, channel_axis=0)
        for i in range(len(a))
    ]
    assert ssim(a, b, data_range) == pytest.approx(np.mean(expected_u8), abs=1e-12)


def test_ssim_convention_gap_and_identity():
    a, b = _fixed_pair(2)
    quality = reconstruction_quality(a, b)
    assert quality["ssim_dr2"] > quality["ssim"]
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(np.zeros((1, 3, 8, 8), np.uint8), np.zeros((1, 3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        psnr(torch.full((1, 3, 16, 16), -0.5), torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(np.zeros((1, 3, 16, 16), np.uint8), np.zeros((1, 3, 16, 15), np.uint8))


def test_reconstruction_evaluator_uses_uint8_conversion():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    y = (x + 0.05 * torch.randn(4, 3, 16, 16, generator=g)).clamp(-1, 1)
    evaluator = ReconstructionEvaluator(chunk=2)  # no Inception: no rFID
    evaluator.update(x[:3], y[:3])
    evaluator.update(x[3:], y[3:])
    result = evaluator.result()
    assert "rfid" not in result
    direct = reconstruction_quality(to_uint8(x), to_uint8(y))
    assert result["num_images"] == 4
    for key in ("psnr", "ssim", "ssim_dr2"):
        assert result[key] == pytest.approx(direct[key], rel=1e-12)


# ---------------------------------------------------------------------------------------------------------
# ADM .npz I/O
# ---------------------------------------------------------------------------------------------------------


def test_sample_batch_round_trip(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(7, 8, 6, 3), dtype=np.uint8)
    labels = np.arange(7) % 3
    path = save_sample_batch(tmp_path / "samples", images, labels)
    assert path.name == "samples.npz"
    loaded, loaded_labels = load_sample_batch(path)
    assert loaded.dtype == np.uint8 and np.array_equal(loaded, images)
    assert np.array_equal(loaded_labels, labels)
    streamed = np.concatenate(list(iter_npz_images(path, batch_size=3)))
    assert np.array_equal(streamed, images)
    assert [b.shape[0] for b in iter_image_batches(str(path), 4)] == [4, 3]
    # torch NCHW uint8 input is written as NHWC
    path2 = save_sample_batch(tmp_path / "t.npz", torch.from_numpy(images).permute(0, 3, 1, 2))
    assert np.array_equal(load_sample_batch(path2)[0], images)


def test_reference_stats_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    stats = InceptionStats(rng.normal(size=5), np.eye(5) * 2, rng.normal(size=3), np.eye(3), None)
    images = rng.integers(0, 256, size=(4, 8, 8, 3), dtype=np.uint8)
    path = save_reference_stats(tmp_path / "ref.npz", stats, images)
    loaded = load_stats_npz(path)
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_array_equal(loaded.sigma_s, stats.sigma_s)
    assert loaded.num_images == 4
    reference = load_reference_batch(path)
    assert reference.has_images and reference.num_images == 4 and reference.stats is not None


def test_npz_errors_name_file_and_key(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, arr_0=np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(NpzFormatError, match=r"bad\.npz.*'arr_0' must be uint8"):
        load_sample_batch(path)
    with pytest.raises(NpzFormatError, match=r"bad\.npz.*missing key 'mu'"):
        load_stats_npz(path)
    np.savez(path, arr_0=np.zeros((2, 3, 4, 4), np.uint8))
    with pytest.raises(NpzFormatError, match="NHWC"):
        list(iter_npz_images(path))
    np.savez(path, mu=np.zeros(3), sigma=np.zeros((3, 2)))
    with pytest.raises(NpzFormatError, match="'sigma' \\(D, D\\)"):
        load_stats_npz(path)
    with pytest.raises(FileNotFoundError, match="nothere.npz"):
        load_stats_npz(tmp_path / "nothere.npz")
    with pytest.raises(TypeError, match="to_uint8"):
        save_sample_batch(tmp_path / "f.npz", np.zeros((1, 4, 4, 3), np.float32))


# ---------------------------------------------------------------------------------------------------------
# Linear probe, GMM, plots
# ---------------------------------------------------------------------------------------------------------


def _separable_latents(num: int = 600, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num) % 4
    centres = torch.randn(4, 8, 6, generator=g) * 3
    latents = centres[labels] + torch.randn(num, 8, 6, generator=g)
    return latents, labels


@pytest.mark.parametrize("optimizer", ["adamw", "lbfgs"])
def test_linear_probe_separable(optimizer):
    latents, labels = _separable_latents()
    train_idx, test_idx = train_test_split(len(labels), 0.25, seed=0)
    kwargs = dict(optimizer=optimizer, epochs=5, seed=1)
    result = linear_probe(latents[train_idx], labels[train_idx], latents[test_idx], labels[test_idx], **kwargs)
    assert result["top1"] >= 0.98 and result["dim"] == 48 and result["num_classes"] == 4
    again = linear_probe(latents[train_idx], labels[train_idx], latents[test_idx], labels[test_idx], **kwargs)
    assert again == result  # deterministic given the seed


def test_linear_probe_bad_labels():
    latents, labels = _separable_latents(40)
    with pytest.raises(ValueError, match="train_labels must have shape"):
        linear_probe(latents, labels[:10], latents, labels)


def test_gmm_two_modes_prefer_k2():
    rng = np.random.default_rng(0)
    modes = rng.integers(0, 2, size=800)
    latents = rng.normal(size=(800, 4, 3)) * 0.5 + np.where(modes, 4.0, -4.0)[:, None, None]
    result = gmm_nll_analysis(latents, ks=(1, 2), seed=0, progress=False)
    assert result["test_nll"][2] < result["test_nll"][1] - 0.2
    assert result["train_nll"][2] < result["train_nll"][1]
    assert result["explained_variance"] >= 0.9 and 1 <= result["pca_dim"] <= 12
    assert result["num_train"] + result["num_test"] == 800


def test_plots_write_png(tmp_path):
    path = plot_gmm_curves({"maetok": {1: 3.0, 2: 2.5, 4: 2.4}, "ae": {1: 3.2, 2: 3.1, 4: 2.9}}, tmp_path / "g.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    latents, labels = _separable_latents(100)
    if importlib.util.find_spec("umap") is None:  # (UMAP itself is too slow to JIT in a unit test)
        with pytest.raises(ImportError, match="pip install umap-learn"):
            plot_umap(latents, labels, tmp_path / "u.png")
        assert plot_umap(latents, labels, tmp_path / "u.png", fallback_to_pca=True).startswith("PCA-2D")
        assert (tmp_path / "u.png").read_bytes()[:4] == b"\x89PNG"
    # too few points for UMAP (its spectral initialisation fails): PCA, with or without umap-learn
    method = plot_umap(latents[:5], labels[:5], tmp_path / "few.png", fallback_to_pca=True)
    assert method.startswith("PCA-2D") and (tmp_path / "few.png").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------------------------------------
# Evaluation pipelines with a cheap stand-in for the Inception network
# ---------------------------------------------------------------------------------------------------------


def _images(num: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(num, 8, 8, 3), dtype=np.uint8)


def _stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    features = features.astype(np.float64)
    return features.mean(0), np.cov(features, rowvar=False)


def test_feature_passes_are_batch_size_independent():
    stub, images = StubInception(), _images(23, 0)
    features = extract_features(images, stub, batch_size=5, progress=False)
    assert features["pool3"].shape == (23, 12) and features["logits"].shape == (23, 10)
    batches = iter([images[:4], torch.from_numpy(images[4:]).permute(0, 3, 1, 2)])  # mixed layouts
    stats = compute_fid_stats(batches, stub, batch_size=3, progress=False)
    mu, sigma = _stats(features["pool3"])
    np.testing.assert_allclose(stats.mu, mu, atol=1e-6)
    np.testing.assert_allclose(stats.sigma, sigma, atol=1e-6)
    np.testing.assert_allclose(stats.sigma_s, _stats(features["spatial"])[1], atol=1e-8)
    assert stats.num_images == 23


def test_generation_metrics_match_metric_functions(tmp_path):
    stub = StubInception()
    reference, samples = _images(60, 1), _images(50, 2)
    ref_path = tmp_path / "ref.npz"
    np.savez(ref_path, arr_0=reference)
    sample_path = save_sample_batch(tmp_path / "samples.npz", samples, np.arange(50) % 10)
    result = generation_metrics(sample_path, ref_path, stub, batch_size=16, inception_score_split_size=10,
                                progress=False)
    ref_features = extract_features(reference, stub, progress=False)
    sample_features = extract_features(samples, stub, progress=False)
    expected_fid = frechet_distance(*_stats(sample_features["pool3"]), *_stats(ref_features["pool3"]))
    expected_sfid = frechet_distance(*_stats(sample_features["spatial"]), *_stats(ref_features["spatial"]))
    assert result["gfid_num_samples"] == 50 and result["gfid_num_reference"] == 60
    assert result["gfid_label"] == "FID-50" and result["sfid_label"] == "sFID-50"
    assert result["gfid"] == pytest.approx(expected_fid, rel=1e-6) and result["gfid"] > 0
    assert result["sfid"] == pytest.approx(expected_sfid, rel=1e-6)
    is_mean, is_std = inception_score(sample_features["logits"], 10)
    assert (result["inception_score_split_size"], result["inception_score_splits"]) == (10, 5)
    assert result["inception_score"] == pytest.approx(is_mean, rel=1e-6)
    assert result["inception_score_std"] == pytest.approx(is_std, rel=1e-5, abs=1e-9)
    pr = precision_recall(ref_features["pool3"], sample_features["pool3"])
    assert (result["precision"], result["recall"]) == (pr["precision"], pr["recall"])
    assert len(result["notes"]) == 1 and "below 2048" in result["notes"][0]  # counts reported, nothing missing

    # reference given as stored statistics only: same FID, no precision / recall; no logits: no IS
    save_reference_stats(tmp_path / "stats.npz", compute_fid_stats(reference, stub, progress=False))
    from_stats = generation_metrics(samples, tmp_path / "stats.npz", StubInception(with_logits=False),
                                    progress=False)
    assert from_stats["gfid"] == pytest.approx(result["gfid"], rel=1e-6)  # float32 features, other batching
    bare = generation_metrics(samples, compute_fid_stats(reference, stub, progress=False), stub, progress=False)
    assert bare["gfid"] == pytest.approx(result["gfid"], rel=1e-6) and bare["precision"] is None
    assert from_stats["precision"] is None and from_stats["inception_score"] is None
    assert any("precision" in note for note in from_stats["notes"])
    assert any("Inception Score not computed" in note for note in from_stats["notes"])


def test_reconstruction_evaluator_with_stub(tmp_path):
    stub = StubInception()
    g = torch.Generator().manual_seed(0)
    originals = torch.rand(40, 3, 16, 16, generator=g) * 2 - 1
    evaluator = ReconstructionEvaluator(stub)
    for i in range(0, 40, 16):
        evaluator.update(originals[i : i + 16], originals[i : i + 16])
    same = evaluator.result()
    assert same["num_images"] == 40 and same["psnr"] == float("inf") and same["ssim"] == pytest.approx(1.0)
    assert abs(same["rfid"]) < 1e-9 and same["rfid_reference"] == "the original images"

    noisy = (originals + 0.1 * torch.randn(40, 3, 16, 16, generator=g)).clamp(-1, 1)
    stats_path = save_reference_stats(tmp_path / "val.npz", compute_fid_stats(to_uint8(originals), stub,
                                                                               progress=False))
    evaluator = ReconstructionEvaluator(stub, reference=stats_path, chunk=16)  # fed through in chunks of 16
    evaluator.update(originals, noisy)
    result = evaluator.result()
    expected = reconstruction_quality(to_uint8(originals), to_uint8(noisy))
    assert result["psnr"] == pytest.approx(expected["psnr"]) and result["ssim_dr2"] == pytest.approx(expected["ssim_dr2"])
    recon_features = extract_features(to_uint8(noisy), stub, progress=False)["pool3"]
    orig_features = extract_features(to_uint8(originals), stub, progress=False)["pool3"]
    assert result["rfid"] == pytest.approx(frechet_distance(*_stats(recon_features), *_stats(orig_features)), rel=1e-6)


class CountingStub(StubInception):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, images) -> InceptionFeatures:
        self.calls += 1
        return super().forward(images)


def test_memoized_inception_reads_fixed_image_sets_from_disk(feature_cache, monkeypatch):
    from maetok.eval.inception import MemoizedInception, memoized

    network = CountingStub()
    memo = memoized(network)
    assert isinstance(memo, MemoizedInception) and memo.directory == feature_cache
    images = torch.from_numpy(_images(20, 3))
    direct = network(images)
    first, second = memo(images), memo(images)
    assert network.calls == 2  # the direct call and the first memoised one; the second was read from disk
    for a, b, c in zip(direct, first, second):
        assert torch.equal(a, b) and torch.equal(a, c)
    stats = compute_fid_stats(images, memo, batch_size=7, progress=False)
    assert np.array_equal(stats.mu, compute_fid_stats(images, network, batch_size=7, progress=False).mu)
    # other content, or the same bytes as another dtype, is another entry
    assert memo.path_for(images) != memo.path_for(images[:19])
    assert memo.path_for(images) != memo.path_for(images.to(torch.int8))
    # an unreadable entry is recomputed and rewritten
    path = memo.path_for(images)
    path.write_bytes(b"broken")
    calls = network.calls
    assert torch.equal(memo(images).pool3, direct.pool3) and network.calls == calls + 1
    assert torch.equal(memo(images).pool3, direct.pool3) and network.calls == calls + 1
    monkeypatch.setenv("MAETOK_FEATURE_CACHE", "off")
    assert memoized(network) is network and memoized(None) is None


def test_memoized_inception_survives_an_unwritable_cache(tmp_path):
    from maetok.eval.inception import MemoizedInception

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    network = CountingStub()
    memo = MemoizedInception(network, blocker / "features")
    images = torch.from_numpy(_images(5, 4))
    with pytest.warns(UserWarning, match="not memoised"):
        first = memo(images)
    second = memo(images)  # warned once; computed again, same values
    assert torch.equal(first.pool3, second.pool3) and network.calls == 2
