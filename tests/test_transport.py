"""The linear interpolant, its training loss and the Euler / Euler-Maruyama samplers: exact identities,
exact velocity fields of a point mass and of a Gaussian, CFG wiring, overfitting a fixed batch, and a
2D Gaussian-mixture toy whose mode proportions the trained sampler must reproduce."""

from __future__ import annotations

import contextlib

import pytest
import torch

from maetok.diffusion.samplers import euler_maruyama_sample, euler_sample, make_model_fn
from maetok.diffusion.transport import (
    cosine_direction_loss,
    interpolate,
    sample_time,
    training_loss,
    velocity_target,
    velocity_to_data,
    velocity_to_noise,
    velocity_to_score,
)
from maetok.config import DiffusionModelConfig
from maetok.global_batch import SampleRandom
from maetok.models.sit import SiT


@contextlib.contextmanager
def single_thread():
    """Tiny models are dominated by per-op overhead; one thread is faster on a shared 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def gaussian_velocity(mean: torch.Tensor, std: torch.Tensor):
    """Exact E[eps - x0 | x_t] for x0 ~ N(mean, diag(std^2)), x_t = (1 - t) x0 + t eps.

    x_t ~ N((1-t) m, V), V = (1-t)^2 s^2 + t^2; E[x0|x_t] = m + (1-t) s^2 / V (x_t - (1-t) m) and
    E[eps|x_t] = t / V (x_t - (1-t) m), so v = (t - (1-t) s^2) / V (x_t - (1-t) m) - m.
    """

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.to(x.dtype)[:, None]
        variance = (1 - t) ** 2 * std**2 + t**2
        return (t - (1 - t) * std**2) / variance * (x - (1 - t) * mean) - mean

    return velocity


# ---------------------------------------------------------------------------------------------------------
# interpolant identities
# ---------------------------------------------------------------------------------------------------------


def test_interpolant_endpoints_and_velocity_is_its_time_derivative():
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 7, 3, generator=generator, dtype=torch.float64)
    noise = torch.randn(5, 7, 3, generator=generator, dtype=torch.float64)
    assert torch.equal(interpolate(x0, noise, torch.zeros(5, dtype=torch.float64)), x0)
    assert torch.equal(interpolate(x0, noise, torch.ones(5, dtype=torch.float64)), noise)
    t = torch.rand(5, generator=generator, dtype=torch.float64) * 0.9 + 0.05
    h = 1e-6
    derivative = (interpolate(x0, noise, t + h) - interpolate(x0, noise, t - h)) / (2 * h)
    assert torch.allclose(derivative, velocity_target(x0, noise), atol=1e-8)
    # with the true velocity the posterior-mean formulas return the data and the noise exactly
    x_t = interpolate(x0, noise, t)
    v = velocity_target(x0, noise)
    assert torch.allclose(velocity_to_data(v, x_t, t), x0, atol=1e-12)
    assert torch.allclose(velocity_to_noise(v, x_t, t), noise, atol=1e-12)


def test_one_euler_step_from_noise_recovers_a_point_mass():
    x0 = torch.tensor([[0.5, -1.25, 2.0]], dtype=torch.float64)
    noise = torch.randn(6, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def point_mass_velocity(x, t):  # E[eps - x0 | x_t] = (x_t - x0) / t; at t = 1 exactly eps - x0
        return (x - x0) / t[:, None].to(x.dtype)

    one_step = euler_sample(point_mass_velocity, noise, num_steps=1)
    assert torch.allclose(one_step, x0.expand(6, 3), atol=1e-12)
    # the true velocity eps - x0 at t = 1 gives x0 in one step as well (straight paths)
    assert torch.allclose(noise - 1.0 * velocity_target(x0, noise), x0.expand(6, 3), atol=1e-12)
    many_steps = euler_sample(point_mass_velocity, noise, num_steps=7)
    assert torch.allclose(many_steps, x0.expand(6, 3), atol=1e-10)


def test_score_from_velocity_matches_the_gaussian_score():
    mean, std = torch.tensor([1.0, -2.0], dtype=torch.float64), torch.tensor([0.5, 1.5], dtype=torch.float64)
    velocity = gaussian_velocity(mean, std)
    x = torch.randn(10, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t = torch.linspace(0.05, 1.0, 10, dtype=torch.float64)
    tc = t[:, None]
    analytic = -(x - (1 - tc) * mean) / ((1 - tc) ** 2 * std**2 + tc**2)
    assert torch.allclose(velocity_to_score(velocity(x, t), x, t), analytic, atol=1e-10)


# ---------------------------------------------------------------------------------------------------------
# samplers on exact velocity fields
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["euler", "euler_maruyama"])
def test_samplers_reproduce_gaussian_mean_and_variance(sampler):
    mean = torch.tensor([1.5, -0.5, 0.0], dtype=torch.float64)
    std = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    velocity = gaussian_velocity(mean, std)
    noise = torch.randn(4000, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    if sampler == "euler":
        samples = euler_sample(velocity, noise, num_steps=100)
    else:
        samples = euler_maruyama_sample(velocity, noise, num_steps=100, generator=torch.Generator().manual_seed(1))
    assert samples.dtype == torch.float64 and samples.shape == (4000, 3)
    assert torch.allclose(samples.mean(0), mean, atol=0.06 * std.max().item())
    assert torch.allclose(samples.std(0), std, rtol=0.06)


def test_euler_maruyama_is_reproducible_and_options_work():
    velocity = gaussian_velocity(torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64))
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = euler_maruyama_sample(velocity, noise, 20, generator=torch.Generator().manual_seed(3))
    b = euler_maruyama_sample(velocity, noise, 20, generator=torch.Generator().manual_seed(3))
    c = euler_maruyama_sample(velocity, noise, 20, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    # zero diffusion turns the SDE into the probability-flow ODE
    no_noise = euler_maruyama_sample(velocity, noise, 20, diffusion_coef=lambda t: 0.0, last_step="velocity")
    grid_ode = noise.clone()
    times = torch.linspace(1.0, 0.04, 20, dtype=torch.float64).tolist() + [0.0]
    for t_cur, t_next in zip(times[:-1], times[1:]):
        grid_ode = grid_ode + (t_next - t_cur) * velocity(grid_ode, torch.full((64,), t_cur))
    assert torch.allclose(no_noise, grid_ode, atol=1e-12)
    with pytest.raises(ValueError, match="t_end"):
        euler_maruyama_sample(velocity, noise, 10, t_end=0.0)
    with pytest.raises(ValueError, match="diffusion_coef"):
        euler_maruyama_sample(velocity, noise, 10, diffusion_coef="cubic")
    with pytest.raises(ValueError, match="num_steps"):
        euler_sample(velocity, noise, 0)


# ---------------------------------------------------------------------------------------------------------
# time sampling and the loss
# ---------------------------------------------------------------------------------------------------------


def test_time_sampling():
    draws = SampleRandom.for_batch(seed=0, step=0, batch_size=20000)
    uniform = sample_time(20000, "uniform", draws)
    assert uniform.min() >= 0 and uniform.max() < 1 and abs(uniform.mean().item() - 0.5) < 0.01
    lognormal = sample_time(20000, "lognormal", draws)
    assert lognormal.min() > 0 and lognormal.max() < 1
    logits = torch.logit(lognormal.double())
    assert abs(logits.mean().item()) < 0.03 and abs(logits.std().item() - 1.0) < 0.03
    again = sample_time(20000, "lognormal", SampleRandom.for_batch(seed=0, step=0, batch_size=20000))
    assert torch.equal(lognormal, again)
    small = SampleRandom.for_batch(seed=0, step=0, batch_size=1000)
    clipped = sample_time(1000, "lognormal", small, lognormal_std=20.0, time_eps=1e-3)
    assert clipped.min() >= 1e-3 and clipped.max() <= 1 - 1e-3
    shrunk = sample_time(1000, "uniform", small, time_eps=0.1)
    assert shrunk.min() >= 0.1 and shrunk.max() <= 0.9
    with pytest.raises(ValueError, match="time_sampling"):
        sample_time(4, "cosine")


def test_training_draws_need_sample_random():
    """Times, noise and label drops come from keyed draws only: none, a torch.Generator or draws over another
    batch are clear errors; so is a SiT in training mode left to drop labels without draws."""
    x0 = torch.zeros(4, 2, 3)
    for draws, message in [(None, "sample_time draws random numbers.*none were given"),
                           (torch.Generator(), "got a Generator"),
                           (SampleRandom.for_batch(0, 0, 5), "SampleRandom holds 5 samples, the batch has 4")]:
        with pytest.raises(ValueError, match=message):
            sample_time(4, "uniform", draws)
        with pytest.raises(ValueError, match=message.replace("sample_time", "training_loss")):
            training_loss(lambda x_t, t, y: x_t, x0, None, draws)
    model = SiT(DiffusionModelConfig(width=32, depth=1, num_heads=4, latent_dim=3, num_latent_tokens=2, num_classes=10))
    with pytest.raises(ValueError, match="SiT label dropout"):
        training_loss(model, x0, torch.arange(4), SampleRandom.for_batch(0, 0, 4))  # no label_dropout given


def test_training_loss_terms_and_cosine_term():
    x0 = torch.randn(4, 6, 3, generator=torch.Generator().manual_seed(0))
    captured = {}

    def scaled_target_model(scale):
        def model(x_t, t, y):
            # recover the target from x_t and t the same way the loss built it
            noise = (x_t - (1 - t[:, None, None]) * x0) / t[:, None, None]
            captured["t"] = t
            return scale * (noise - x0)

        return model

    draws = SampleRandom.for_batch(seed=1, step=0, batch_size=4)
    loss, terms = training_loss(scaled_target_model(1.0), x0, None, draws)
    assert loss.item() < 1e-8 and set(terms) == {"loss", "mse", "t_mean"}
    # twice the target: cosine term 0, loss = mse = mean(v^2)
    loss2, terms2 = training_loss(
        scaled_target_model(2.0), x0, None, draws, cosine_loss_weight=1.0
    )
    assert abs(terms2["cosine"].item()) < 1e-6 and torch.isclose(loss2, terms2["mse"], rtol=1e-6)
    # opposite direction: cosine term 2 per token
    loss3, terms3 = training_loss(
        scaled_target_model(-1.0), x0, None, draws, cosine_loss_weight=0.5
    )
    assert abs(terms3["cosine"].item() - 2.0) < 1e-5
    assert torch.isclose(loss3, terms3["mse"] + 0.5 * 2.0, rtol=1e-5)
    # mse of 2v is |v|^2, of -v is |2v|^2
    assert torch.isclose(terms3["mse"], 4 * terms2["mse"], rtol=1e-5)
    a, b = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]]), torch.tensor([[[1.0, 1.0], [0.0, -1.0]]])
    per_token = ((1 - 2**-0.5) + 2.0) / 2
    assert abs(cosine_direction_loss(a, b, "token").item() - per_token) < 1e-6
    assert abs(cosine_direction_loss(a, b, "sample").item() - (1 - (1 - 2) / (5**0.5 * 3**0.5))) < 1e-6


def test_training_loss_is_reproducible_with_keyed_draws():
    model = SiT(DiffusionModelConfig(width=32, depth=1, num_heads=4, latent_dim=4, num_latent_tokens=8, num_classes=10))
    with torch.no_grad():
        model.final_layer.linear.weight.normal_()
    x0 = torch.randn(8, 8, 4, generator=torch.Generator().manual_seed(0))
    y = torch.arange(8)

    def loss(seed: int) -> torch.Tensor:
        return training_loss(model, x0, y, SampleRandom.for_batch(seed, 0, 8), "lognormal", 1.0,
                             label_dropout=model.y_embedder.dropout_prob)[0]

    assert torch.equal(loss(5), loss(5)) and not torch.equal(loss(5), loss(6))


def test_tiny_model_overfits_a_fixed_batch():
    torch.manual_seed(0)
    model = SiT(DiffusionModelConfig(width=64, depth=2, num_heads=4, latent_dim=4, num_latent_tokens=8, num_classes=10))
    x0 = torch.randn(8, 8, 4, generator=torch.Generator().manual_seed(0))
    y = torch.arange(8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    losses = []
    with single_thread():
        for _ in range(150):
            # the same seed every step: the same times, noise and label drops, so the batch is fixed
            loss, _ = training_loss(model, x0, y, SampleRandom.for_batch(0, 0, 8), cosine_loss_weight=0.1,
                                    label_dropout=model.y_embedder.dropout_prob)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert losses[0] > 1.0
    assert min(losses[-10:]) < losses[0] / 100, (losses[0], losses[-10:])


# ---------------------------------------------------------------------------------------------------------
# samplers with real models
# ---------------------------------------------------------------------------------------------------------


def test_make_model_fn_binds_labels_and_guidance():
    torch.manual_seed(0)
    model = SiT(DiffusionModelConfig(width=32, depth=1, num_heads=4, latent_dim=4, num_latent_tokens=8, num_classes=10))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.2)
    model.eval()
    with single_thread():
        x = torch.randn(3, 8, 4)
        t = torch.tensor([0.2, 0.5, 0.9])
        y = torch.tensor([1, 2, 3])
        guided = make_model_fn(model, y, cfg_scale=2.0, guidance_interval=(0.0, 0.6))
        assert torch.allclose(guided(x, t), model.forward_with_cfg(x, t, y, 2.0, (0.0, 0.6)))
        assert torch.allclose(make_model_fn(model, y)(x, t), model(x, t, y))
        assert torch.allclose(make_model_fn(model)(x, t), model(x, t, torch.full((3,), 10)))  # null class
        samples = euler_sample(guided, torch.randn(3, 8, 4), num_steps=5, progress=True)
        assert samples.shape == (3, 8, 4) and torch.isfinite(samples).all()
        # a double-precision state with a float32 model: the function casts both ways
        assert make_model_fn(model, y)(x.double(), t).dtype == torch.float64
        with pytest.raises(ValueError, match="labels"):
            make_model_fn(model, None, cfg_scale=2.0)


def test_two_dimensional_mixture_mode_proportions():
    """Train a tiny unconditional SiT (1 token of 2 channels) on a 3-component mixture in 2D; the samples
    must land near the modes in the data's proportions (0.6 / 0.3 / 0.1)."""
    centers = torch.tensor([[-1.5, -1.0], [1.5, -1.0], [0.0, 1.5]])
    weights = torch.tensor([0.6, 0.3, 0.1])
    generator = torch.Generator().manual_seed(0)

    def data(n):
        component = torch.multinomial(weights, n, replacement=True, generator=generator)
        return (centers[component] + 0.2 * torch.randn(n, 2, generator=generator))[:, None, :]

    torch.manual_seed(0)
    model = SiT(DiffusionModelConfig(width=32, depth=1, num_heads=4, latent_dim=2, num_latent_tokens=1, num_classes=0))
    steps = 700
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    # a linear decay to 0 averages out the minibatch noise of the last steps (mode weights within ~0.02)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    with single_thread():
        for step in range(steps):
            loss, _ = training_loss(model, data(512), None, SampleRandom.for_batch(0, step, 512))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        model.eval()
        model_fn = make_model_fn(model)
        noise = torch.randn(2000, 1, 2, generator=generator)
        for samples in (
            euler_sample(model_fn, noise, num_steps=40),
            euler_maruyama_sample(model_fn, noise, num_steps=40, generator=generator),
        ):
            distances = torch.cdist(samples[:, 0], centers)
            proportions = torch.bincount(distances.argmin(1), minlength=3).float() / len(samples)
            assert torch.allclose(proportions, weights, atol=0.06), proportions
            assert distances.min(1).values.mean() < 0.45  # data: 0.2 * sqrt(pi / 2) = 0.25
