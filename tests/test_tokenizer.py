"""The tokenizer model: shapes, masking, RoPE, HOG, persistence, and that it learns."""

import math

import pytest
import torch

from maetok.config import ConfigError, TargetConfig, TokenizerConfig, TokenizerTrainConfig, load_config
from maetok.global_batch import SampleRandom
from maetok.models.blocks import Attention, apply_rope, patchify, rope_angles_2d, rope_from_angles, unpatchify
from maetok.models.tokenizer import MAETok
from maetok.targets import build_target
from maetok.targets.hog import HOGTarget


def tiny_config(**changes) -> TokenizerConfig:
    base = dict(
        image_size=16,
        in_channels=3,
        patch_size=4,
        encoder_width=32,
        encoder_depth=2,
        encoder_heads=2,
        decoder_width=32,
        decoder_depth=2,
        decoder_heads=2,
        num_latent_tokens=8,
        latent_dim=4,
        aux_depth=1,
        aux_targets=[TargetConfig("hog"), TargetConfig("pixel")],
    )
    base.update(changes)
    return TokenizerConfig(**base)


def build(cfg: TokenizerConfig) -> MAETok:
    dims = {t.name: build_target(t.name, cfg.image_size, cfg.patch_size, cfg.in_channels).dim for t in cfg.aux_targets}
    return MAETok(cfg, dims)


@pytest.mark.parametrize(
    "changes",
    [
        dict(variant="maetok"),
        dict(variant="ae", mask_ratio_min=0.0, mask_ratio_max=0.0, aux_targets=[]),
        dict(variant="vae"),
        dict(variant="maetok", in_channels=1),
    ],
)
def test_shapes_of_every_variant(changes):
    torch.manual_seed(0)
    cfg = tiny_config(**changes)
    model = build(cfg)
    images = torch.rand(3, cfg.in_channels, 16, 16) * 2 - 1
    draws = SampleRandom.for_batch(seed=0, step=0, batch_size=3)
    out = model(images, (cfg.mask_ratio_min, cfg.mask_ratio_max) if cfg.mask_ratio_max > 0 else None, draws)
    assert out.reconstruction.shape == images.shape
    assert out.latents.shape == (3, 8, 4)
    assert model.encode(images).shape == (3, 8, 4)
    assert model.decode(out.latents).shape == images.shape
    for target in cfg.aux_targets:
        dim = build_target(target.name, 16, 4, cfg.in_channels).dim
        assert out.aux_predictions[target.name].shape == (3, 16, dim)
    if cfg.variant == "vae":
        assert out.posterior_mean.shape == out.posterior_logvar.shape == (3, 8, 4)
        # the posterior mean of the unmasked images is what encode returns; a sample differs from it
        unmasked = model(images, None, draws)
        assert torch.allclose(model.encode(images), unmasked.posterior_mean, atol=1e-6)
        assert torch.equal(model.encode(images, sample=True, draws=draws), unmasked.latents)  # the same noise
        assert not torch.allclose(model.encode(images, sample=True, draws=draws), unmasked.posterior_mean)


def test_random_draws_need_sample_random():
    """Masks and posterior samples come from keyed draws only: none (or a torch.Generator) is a clear error,
    and a pass that draws nothing (an AE without masking, a VAE's posterior mean) needs none."""
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    vae = build(tiny_config(variant="vae", mask_ratio_min=0.0, mask_ratio_max=0.0, aux_targets=[]))
    ae = build(tiny_config(variant="ae", mask_ratio_min=0.0, mask_ratio_max=0.0, aux_targets=[]))
    for call, what in [(lambda: MAETok.random_mask(2, 16, 0.5), "MAETok.random_mask"),
                       (lambda: build(tiny_config())(images, 0.5), "MAETok.random_mask"),
                       (lambda: vae(images), "MAETok.sample_posterior"),
                       (lambda: vae.encode(images, sample=True), "MAETok.sample_posterior"),
                       (lambda: MAETok.random_mask(2, 16, 0.5, torch.Generator()), "got a Generator")]:
        with pytest.raises(ValueError, match=what):
            call()
    assert ae(images).mask is None and vae.encode(images).shape == (2, 8, 4)
    with pytest.raises(ValueError, match="SampleRandom holds 3 samples, the batch has 2"):
        vae(images, None, SampleRandom.for_batch(0, 0, 3))


def test_other_resolutions_encode_and_decode():
    model = build(tiny_config())
    images = torch.rand(2, 3, 24, 32) * 2 - 1
    latents = model.encode(images)
    assert latents.shape == (2, 8, 4)
    assert model.decode(latents, image_size=(24, 32)).shape == images.shape


def test_mask_ratio_is_applied_per_image():
    mask = MAETok.random_mask(512, 100, (0.4, 0.6), SampleRandom.for_batch(0, 0, 512))
    fractions = mask.float().mean(dim=1)
    assert fractions.min() >= 0.4 and fractions.max() <= 0.6
    assert fractions.std() > 0.03  # drawn per image, not one value per batch
    assert abs(fractions.mean().item() - 0.5) < 0.02
    fixed = MAETok.random_mask(4, 64, 0.25, SampleRandom.for_batch(0, 1, 4))
    assert (fixed.sum(dim=1) == 16).all()


def test_masked_tokens_replaced_by_mask_token_not_dropped():
    torch.manual_seed(0)
    model = build(tiny_config())
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :8] = True
    # changing the pixels under the masked patches leaves the latents unchanged
    altered = images.clone()
    altered[:, :, :8, :] = torch.rand(2, 3, 8, 16)  # patches 0..7 are the top two rows of the 4x4 grid
    a = model.encoder(images, mask)
    b = model.encoder(altered, mask)
    assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(model.encoder(images, None), model.encoder(altered, None))
    out = model(images, 0.5, SampleRandom.for_batch(1, 0, 2))
    assert out.mask.shape == (2, 16) and (out.mask.sum(dim=1) == 8).all()


def test_rope_scores_invariant_to_a_shift_of_all_positions():
    torch.manual_seed(0)
    head_dim, n = 16, 6
    q, k = torch.randn(1, 1, n, head_dim), torch.randn(1, 1, n, head_dim)
    rows = torch.tensor([0, 0, 1, 2, 3, 3])
    cols = torch.tensor([0, 2, 1, 3, 0, 2])

    def scores(dr, dc):
        from maetok.models.blocks import rope_angles_1d

        angles = torch.cat([rope_angles_1d(rows + dr, head_dim // 2, 100.0), rope_angles_1d(cols + dc, head_dim // 2, 100.0)], -1)
        rope = rope_from_angles(angles)
        return apply_rope(q, rope) @ apply_rope(k, rope).transpose(-1, -2)

    base = scores(0, 0)
    assert torch.allclose(base, scores(5, 0), atol=1e-4)
    assert torch.allclose(base, scores(3, 7), atol=1e-4)
    assert not torch.allclose(base, q @ k.transpose(-1, -2), atol=1e-2)  # rotation does something
    # the grid helper uses row-major order: token (r, c) -> index r * W + c
    grid = rope_angles_2d(3, 4, head_dim, 100.0)
    assert torch.allclose(grid[1 * 4 + 2, : head_dim // 4], rope_angles_2d(3, 4, head_dim, 100.0)[1 * 4 + 0, : head_dim // 4])


def test_rope_leaves_latent_tokens_unrotated():
    angles = rope_angles_2d(2, 2, 8, 100.0)
    cos, sin = rope_from_angles(angles, num_unrotated=3)
    x = torch.randn(1, 1, 7, 8)
    y = apply_rope(x, (cos, sin))
    assert torch.equal(y[:, :, 4:], x[:, :, 4:])
    assert not torch.allclose(y[:, :, 1:4], x[:, :, 1:4])


def test_attention_matches_manual_softmax():
    torch.manual_seed(0)
    attn = Attention(16, 2)
    x = torch.randn(2, 5, 16)
    q, k, v = attn.qkv(x).view(2, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
    manual = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1) @ v
    expected = attn.proj(manual.transpose(1, 2).reshape(2, 5, 16))
    assert torch.allclose(attn(x), expected, atol=1e-5)


def test_patchify_roundtrip():
    x = torch.randn(2, 3, 8, 12)
    p = patchify(x, 4)
    assert p.shape == (2, 6, 48)
    assert torch.equal(unpatchify(p, 4, 2, 3, 3), x)
    assert torch.equal(p[0, 1].view(4, 4, 3)[..., 0], x[0, 0, :4, 4:8])


def test_hog_on_known_patterns():
    hog = HOGTarget(patch_size=16, in_channels=3)
    assert hog.dim == 108  # 4 cells x 3 channels x 9 bins, as in the paper's 16px patches
    x = torch.arange(32.0)
    vertical_stripes = torch.sin(x / 2).view(1, 1, 1, 32).expand(1, 3, 32, 32)  # varies along x only
    horizontal_stripes = vertical_stripes.transpose(-1, -2)
    hist_v = hog.cell_histograms(vertical_stripes)  # (1, 3, 9, 4, 4)
    hist_h = hog.cell_histograms(horizontal_stripes)
    assert torch.allclose(hist_v[:, :, 0], torch.ones_like(hist_v[:, :, 0]), atol=1e-5)  # gradient angle 0
    assert torch.allclose(hist_h[:, :, 4], torch.ones_like(hist_h[:, :, 4]), atol=1e-5)  # angle pi/2 -> bin 4
    assert torch.allclose(hist_v.norm(dim=2), torch.ones(1, 3, 4, 4), atol=1e-5)  # L2 per cell
    features = hog(vertical_stripes, (2, 2))
    assert features.shape == (1, 4, 108)
    # a 45-degree ramp votes into bin 2 (40-60 degrees)
    ramp = (torch.arange(32.0).view(1, 32) + torch.arange(32.0).view(32, 1)).expand(1, 1, 32, 32) / 64
    hist_d = HOGTarget(16, 1).cell_histograms(ramp)
    assert hist_d[0, 0, 2, 1:3, 1:3].min() > 0.99
    # grayscale, small patches: cell size adapts to the patch
    small = HOGTarget(patch_size=4, in_channels=1)
    assert small.dim == 9 and small(torch.rand(2, 1, 32, 32), (8, 8)).shape == (2, 64, 9)


def test_hog_at_other_resolutions():
    hog = build_target("hog", 256, 16, 3)
    for size in (256, 512):
        assert hog(torch.rand(1, 3, size, size) * 2 - 1, (size // 16, size // 16)).shape == (1, (size // 16) ** 2, 108)


def test_save_load_roundtrip_is_bit_exact(tmp_path):
    torch.manual_seed(0)
    model = build(tiny_config(variant="vae")).eval()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    latents = model.encode(images)
    recon = model.decode(latents)
    model.save_pretrained(tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["config.json", "model.safetensors"]
    loaded = MAETok.from_pretrained(tmp_path / "tok")
    assert loaded.config == model.config
    assert not loaded.aux_decoders  # auxiliary decoders are training-only
    assert torch.equal(loaded.encode(images), latents)
    assert torch.equal(loaded.decode(latents), recon)


def test_from_pretrained_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        MAETok.from_pretrained(tmp_path)
    model = build(tiny_config())
    model.save_pretrained(tmp_path / "tok")
    other = build(tiny_config(latent_dim=8))
    other.save_pretrained(tmp_path / "other")
    (tmp_path / "other" / "config.json").write_text((tmp_path / "tok" / "config.json").read_text())
    with pytest.raises((ValueError, RuntimeError)):
        MAETok.from_pretrained(tmp_path / "other")


def test_bad_inputs_give_clear_errors():
    model = build(tiny_config())
    with pytest.raises(ValueError, match="divisible by the patch size"):
        model.encode(torch.rand(1, 3, 18, 16))
    with pytest.raises(ValueError, match=r"expected images \(B, 3, H, W\)"):
        model.encode(torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError, match=r"expected latents \(B, 8, 4\)"):
        model.decode(torch.rand(1, 8, 5))


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="unknown config key 'model.widht'"):
        load_config(TokenizerTrainConfig, "fashion-mnist-maetok", ["model.widht=3"])
    with pytest.raises(ConfigError, match="train.steps: expected an integer"):
        load_config(TokenizerTrainConfig, "fashion-mnist-maetok", ["train.steps=many"])
    with pytest.raises(ConfigError, match="no preset"):
        load_config(TokenizerTrainConfig, "no-such-preset")
    with pytest.raises(ConfigError, match="variant='ae'"):
        load_config(TokenizerTrainConfig, "fashion-mnist-maetok", ["model.variant=ae"])
    cfg = load_config(TokenizerTrainConfig, "fashion-mnist-ae", ["train.steps=7", "optim.betas=[0.8, 0.9]"])
    assert cfg.train.steps == 7 and cfg.optim.betas == (0.8, 0.9) and cfg.model.aux_targets == []
    assert cfg.model.image_size == 32  # inherited through base:


def test_paper_preset_size():
    cfg = load_config(TokenizerTrainConfig, "maetok-b-128")
    with torch.device("meta"):
        model = MAETok(cfg.model)
    counts = model.parameter_counts()
    assert abs(counts["encoder"] / 1e6 - 85.9) < 0.5
    assert 170e6 < counts["tokenizer (encoder + decoder)"] < 178e6  # paper: 176M in total
    assert load_config(TokenizerTrainConfig, "maetok-b-128-512").model.image_size == 512


def test_fixed_batch_overfits():
    torch.manual_seed(0)
    cfg = tiny_config(aux_targets=[TargetConfig("hog")])
    model = build(cfg)
    hog = build_target("hog", 16, 4, 3)
    images = torch.nn.functional.interpolate(torch.rand(4, 3, 4, 4) * 2 - 1, size=16, mode="bilinear")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(300):
        out = model(images, (0.4, 0.6), SampleRandom.for_batch(0, step, 4))
        rec = (out.reconstruction - images).pow(2).mean()
        aux = ((out.aux_predictions["hog"] - hog(images, (4, 4))).pow(2).mean(-1) * out.mask).sum() / out.mask.sum()
        loss = rec + aux
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(rec.item())
    assert losses[-1] < losses[0] / 10
