"""SiT and LightningDiT on 1D latents: shapes, adaLN-Zero init, the reference SiT-XL state dict, label
dropout, classifier-free guidance with a guidance interval, position sensitivity, input checks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from maetok.cli import main
from maetok.config import DIFFUSION_SIZES, ConfigError, DiffusionModelConfig, from_dict, read_preset
from maetok.global_batch import SampleRandom
from maetok.model_folders import authors_sit_config
from maetok.models.lightningdit import LightningDiT
from maetok.models.sit import SiT, apply_guidance, build_diffusion_model

REFERENCE_SIT_XL = Path("/work/shared/compat/sit-xl-maetok.json")
if not REFERENCE_SIT_XL.exists():  # the shared folder next to the repository checkout
    REFERENCE_SIT_XL = Path(__file__).resolve().parents[2] / "shared" / "compat" / "sit-xl-maetok.json"

TINY = dict(width=32, depth=2, num_heads=4, latent_dim=4, num_latent_tokens=8, num_classes=10)


def tiny_model(kind: str, **overrides) -> torch.nn.Module:
    values = {**TINY, **overrides}
    if kind == "lightningdit":
        values = {"qk_norm": True, **values}
    return build_diffusion_model(DiffusionModelConfig(arch=kind, **values))


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Overwrite every parameter (including the zero-initialised adaLN / final layer) with noise."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return model.eval()


def inputs(batch: int = 3, seed: int = 1, tokens: int = 8, channels: int = 4):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, channels, generator=generator)
    t = torch.rand(batch, generator=generator)
    y = torch.randint(0, 10, (batch,), generator=generator)
    return x, t, y


# ---------------------------------------------------------------------------------------------------------
# shapes, init
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sit", "lightningdit"])
def test_output_shape_and_adaln_zero_init(kind):
    model = tiny_model(kind)
    x, t, y = inputs()
    for mode in (model.train(), model.eval()):
        out = mode(x, t, y)
        assert out.shape == (3, 8, 4)
        assert torch.equal(out, torch.zeros_like(out))  # adaLN-Zero: exactly zero, not just small
    out = randomize(model)(x, t, y)
    assert out.shape == (3, 8, 4) and out.abs().max() > 1e-3
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("kind", ["sit", "lightningdit"])
def test_scalar_time_broadcasts(kind):
    model = randomize(tiny_model(kind))
    x, _, y = inputs()
    assert torch.allclose(model(x, 0.3, y), model(x, torch.full((3,), 0.3), y))


def test_unconditional_model_has_no_label_embedding_and_ignores_y():
    model = randomize(tiny_model("sit", num_classes=0))
    assert model.y_embedder is None
    assert not any(name.startswith("y_embedder") for name in model.state_dict())
    x, t, y = inputs()
    assert torch.equal(model(x, t, y), model(x, t, None))
    assert torch.equal(model.forward_with_cfg(x, t, None, 1.0), model(x, t))
    with pytest.raises(ValueError, match="unconditional"):
        model.forward_with_cfg(x, t, y, 2.0)


# ---------------------------------------------------------------------------------------------------------
# reference checkpoint layout and parameter counts (built on the meta device: no memory)
# ---------------------------------------------------------------------------------------------------------


def test_sit_xl_state_dict_matches_reference_checkpoint():
    reference = json.loads(REFERENCE_SIT_XL.read_text())
    with torch.device("meta"):
        model = SiT(DiffusionModelConfig.from_size("SiT-XL", latent_dim=32, num_latent_tokens=128, num_classes=1000))
    shapes = {name: list(tensor.shape) for name, tensor in model.state_dict().items()}
    assert shapes == reference["keys"]  # same names, same shapes, nothing extra or missing
    assert len(shapes) == reference["num_tensors"] == 292
    total = sum(tensor.numel() for tensor in model.state_dict().values())
    assert total == reference["num_elements"] == 675_000_608  # 675.0M, as in the paper
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 675_000_608 - 128 * 1152  # pos_embed is a fixed (stored) buffer
    assert "pos_embed" in dict(model.named_buffers())
    # the authors' config.json maps onto the same architecture
    config = authors_sit_config(reference["config_json_as_written_by_save_pretrained"])
    assert config == DiffusionModelConfig.from_size("SiT-XL")


def test_preset_parameter_counts():
    counts = {}
    with torch.device("meta"):
        for name in DIFFUSION_SIZES:
            counts[name] = sum(p.numel() for p in build_diffusion_model(DiffusionModelConfig.from_size(name)).parameters())
        xl = build_diffusion_model(DiffusionModelConfig.from_size("LightningDiT-XL"))
    assert isinstance(xl, LightningDiT) and xl.config.qk_norm  # LightningDiT's own default
    assert counts["SiT-L"] == 457_857_056  # paper: SiT-L 458M
    assert counts["SiT-XL"] == 674_853_152
    assert counts["LightningDiT-XL"] == 674_965_856  # SwiGLU 2/3 width + RMSNorm/qk-norm scales
    assert 660e6 < counts["LightningDiT-XL"] < 690e6
    assert counts["LightningDiT-B"] == 130_361_120 and counts["LightningDiT-L"] == 457_893_888
    assert counts["SiT-S"] < counts["SiT-B"] < counts["SiT-L"] < counts["SiT-XL"]
    names = set(xl.state_dict())
    assert "pos_embed" not in names and "rope_cos" not in names  # RoPE only, recomputed
    assert "blocks.0.attn.q_norm.weight" in names and "blocks.0.mlp.w3.weight" in names
    assert xl.blocks[0].mlp.w1.out_features == int(2 / 3 * 4 * 1152) == 3072


def test_size_table_is_the_single_source(capsys):
    """config.DIFFUSION_SIZES is the one place a preset's size is written: the configs, `maetok info` and the
    expansion of model.preset all read it, and the paper YAMLs only name a row."""
    xl = DiffusionModelConfig.from_size("SiT-XL")
    assert (xl.width, xl.depth, xl.num_heads) == DIFFUSION_SIZES["SiT-XL"] == (1152, 28, 16)
    for name, size in DIFFUSION_SIZES.items():
        config = DiffusionModelConfig.from_size(name)
        assert (config.width, config.depth, config.num_heads) == size and config.size_name == name
        assert config.arch == ("sit" if name.startswith("SiT-") else "lightningdit")
    assert main(["info", "--sizes"]) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows == {
        name: ["width", str(size.width), "depth", str(size.depth), "heads", str(size.num_heads)]
        for name, size in DIFFUSION_SIZES.items()
    }
    for preset in ("sit-xl", "sit-l", "lightningdit-xl"):
        assert not {"width", "depth", "num_heads"} & set(read_preset(preset)["model"]), preset
    with pytest.raises(ConfigError, match="known: SiT-S, SiT-B, SiT-L, SiT-XL"):
        from_dict(DiffusionModelConfig, {"arch": "sit", "preset": "SiT-XXL"})
    with pytest.raises(ConfigError, match="model.preset 'SiT-XL' is not a lightningdit size"):
        from_dict(DiffusionModelConfig, {"arch": "lightningdit", "preset": "SiT-XL"})
    # a preset expands into the sizes it does not set, and LightningDiT takes its qk-norm by default
    small = from_dict(DiffusionModelConfig, {"arch": "lightningdit", "preset": "LightningDiT-B", "depth": 2})
    assert (small.width, small.depth, small.num_heads, small.qk_norm) == (768, 2, 12, True)


def test_pos_embed_is_interleaved_sincos():
    model = tiny_model("sit")
    pos = model.pos_embed[0]  # (L, width)
    width = pos.shape[1]
    frequencies = 10000.0 ** (-torch.arange(0, width, 2, dtype=torch.float64) / width)
    angles = torch.arange(8, dtype=torch.float64)[:, None] * frequencies
    assert torch.allclose(pos[:, 0::2].double(), angles.sin(), atol=1e-6)
    assert torch.allclose(pos[:, 1::2].double(), angles.cos(), atol=1e-6)
    halves = SiT(DiffusionModelConfig(**TINY, pos_embed_layout="halves")).pos_embed[0]
    assert torch.allclose(halves[:, : width // 2].double(), angles.sin(), atol=1e-6)


@pytest.mark.parametrize("kind", ["sit", "lightningdit"])
def test_output_depends_on_token_positions(kind):
    """Without position information a transformer is permutation-equivariant; SiT's sin-cos embedding and
    LightningDiT's RoPE must break that."""
    model = randomize(tiny_model(kind))
    x, t, y = inputs()
    permutation = torch.randperm(8, generator=torch.Generator().manual_seed(3))
    permuted_out = model(x[:, permutation], t, y)
    assert not torch.allclose(permuted_out, model(x, t, y)[:, permutation], atol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# labels and classifier-free guidance
# ---------------------------------------------------------------------------------------------------------


def test_label_dropout_probability_and_reproducibility():
    embedder = tiny_model("sit", class_dropout_prob=0.3).y_embedder
    labels = torch.randint(0, 10, (20000,), generator=torch.Generator().manual_seed(0))
    first = embedder.drop_labels(labels, draws=SampleRandom.for_batch(5, 0, 20000))
    second = embedder.drop_labels(labels, draws=SampleRandom.for_batch(5, 0, 20000))
    assert torch.equal(first, second)
    assert not torch.equal(first, embedder.drop_labels(labels, draws=SampleRandom.for_batch(5, 1, 20000)))
    dropped = first == 10
    assert abs(dropped.float().mean().item() - 0.3) < 0.02
    assert torch.equal(first[~dropped], labels[~dropped])
    forced = embedder.drop_labels(labels[:4], force_drop_ids=torch.tensor([1, 0, 1, 0]))
    assert forced.tolist() == [10, labels[1].item(), 10, labels[3].item()]
    with pytest.raises(ValueError, match="SiT label dropout.*none were given"):
        embedder.drop_labels(labels)


@pytest.mark.parametrize("kind", ["sit", "lightningdit"])
def test_force_drop_and_training_dropout(kind):
    model = randomize(tiny_model(kind))
    x, t, y = inputs()
    null = model(x, t, None)  # all-null labels
    assert torch.allclose(model(x, t, y, force_drop_ids=torch.ones(3)), null, atol=1e-6)
    assert torch.allclose(model(x, t, torch.full((3,), 10)), null, atol=1e-6)
    assert not torch.allclose(model(x, t, y), null, atol=1e-4)
    # training mode: labels dropped per sample, reproducibly from the keyed draws
    model.train()
    model.y_embedder.dropout_prob = 0.5
    a = model(x, t, y, draws=SampleRandom.for_batch(2, 0, 3))
    b = model(x, t, y, draws=SampleRandom.for_batch(2, 0, 3))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="SiT label dropout"):
        model(x, t, y)
    model.eval()
    cond = model(x, t, y)
    for i in range(3):  # each sample is either the conditional or the null output
        assert torch.allclose(a[i], cond[i], atol=1e-5) or torch.allclose(a[i], null[i], atol=1e-5)


@pytest.mark.parametrize("kind", ["sit", "lightningdit"])
def test_cfg_scale_and_guidance_interval(kind):
    model = randomize(tiny_model(kind))
    x, _, y = inputs(batch=4)
    t = torch.tensor([0.1, 0.5, 0.8, 0.95])
    cond = model(x, t, y)
    uncond = model(x, t, y, force_drop_ids=torch.ones(4))
    assert not torch.allclose(cond, uncond, atol=1e-4)
    # scale 1 is the conditional model, whatever the interval
    assert torch.allclose(model.forward_with_cfg(x, t, y, 1.0, (0.0, 1.0)), cond, atol=1e-6)
    # every t outside the interval: conditional
    assert torch.allclose(model.forward_with_cfg(x, t, y, 3.0, (0.0, 0.05)), cond, atol=1e-6)
    # all inside: u + s (c - u)
    scale = 1.9
    expected = uncond + scale * (cond - uncond)
    assert torch.allclose(model.forward_with_cfg(x, t, y, scale, (0.0, 1.0)), expected, atol=1e-5)
    # mixed, per sample: interval [0, 0.75] guides samples 0 and 1 only
    mixed = model.forward_with_cfg(x, t, y, scale, (0.0, 0.75))
    assert torch.allclose(mixed[:2], expected[:2], atol=1e-5)
    assert torch.allclose(mixed[2:], cond[2:], atol=1e-5)
    # guidance is unaffected by training-mode label dropout
    model.train()
    assert torch.allclose(model.forward_with_cfg(x, t, y, scale, (0.0, 0.75)), mixed, atol=1e-5)


def test_apply_guidance_boundaries_are_inclusive():
    cond, uncond = torch.ones(3, 2, 2), torch.zeros(3, 2, 2)
    out = apply_guidance(cond, uncond, torch.tensor([0.2, 0.7, 0.71]), 4.0, (0.2, 0.7))
    assert out[:, 0, 0].tolist() == [4.0, 4.0, 1.0]
    with pytest.raises(ValueError, match="low"):
        apply_guidance(cond, uncond, torch.zeros(3), 2.0, (0.8, 0.2))


# ---------------------------------------------------------------------------------------------------------
# input checks
# ---------------------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    model = tiny_model("sit")
    x, t, y = inputs()
    with pytest.raises(ValueError, match=r"\(B, 8, 4\)"):
        model(x[:, :, :3], t, y)
    with pytest.raises(ValueError, match="t of shape"):
        model(x, t[:2], y)
    with pytest.raises(ValueError, match=r"\[0, 10\]"):
        model(x, t, torch.tensor([0, 11, 2]))
    with pytest.raises(ValueError, match="integer class labels"):
        model(x, t, y.float())
    with pytest.raises(ConfigError, match="unknown diffusion model size 'SiT-XXL'"):
        DiffusionModelConfig.from_size("SiT-XXL")
    with pytest.raises(ConfigError, match="unknown DiffusionModelConfig field"):
        DiffusionModelConfig.from_size("SiT-B", hidden=3)
    with pytest.raises(ConfigError, match="num_heads"):
        SiT(DiffusionModelConfig(**{**TINY, "num_heads": 5}))
    with pytest.raises(ConfigError, match="unknown diffusion model size 'LightningDiT-S'"):
        DiffusionModelConfig.from_size("LightningDiT-S")
    no_null = tiny_model("sit", class_dropout_prob=0.0)
    assert no_null.y_embedder.embedding_table.num_embeddings == 10
    with pytest.raises(ValueError, match="null class"):
        no_null.forward_with_cfg(x, t, y, 2.0)


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # blocks.RMSNorm under autocast
def test_forward_is_finite_in_bfloat16_autocast():
    model = randomize(tiny_model("lightningdit"))
    x, t, y = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y)
    assert out.shape == (3, 8, 4) and torch.isfinite(out.float()).all()
    assert math.isclose(out.float().std().item(), model(x, t, y).std().item(), rel_tol=0.1)
