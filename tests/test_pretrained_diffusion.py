"""SiT / LightningDiT from_pretrained / save_pretrained (ours and the authors' released SiT format, folders and hub
ids), and the authors' sampling conventions (issue 13)."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import released_standins
import torch
import torch.nn.functional as F
from released_standins import COMPAT_SIT, TINY_AUTHORS_CONFIG, authors_shapes, write_authors_sit
from safetensors.torch import save_file

from maetok import LightningDiT, SiT
from maetok.cli import main
from maetok.config import AUTHORS_SAMPLING, DiffusionModelConfig, SamplingConfig, TokenizerConfig
from maetok.data.images import to_uint8
from maetok.diffusion.generator import LatentGenerator, tokenizer_latent_scalars
from maetok.diffusion.samplers import euler_maruyama_sample, euler_sample, make_model_fn
from maetok.encode import load_tokenizer
from maetok.model_folders import load_state_strict, read_diffusion_folder
from maetok.models.sit import build_diffusion_model
from maetok.models.tokenizer import MAETok

# ---------------------------------------------------------------------------------------------------------
# the authors' format, read independently of our model classes
# ---------------------------------------------------------------------------------------------------------


def authors_velocity(state: dict, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, heads: int) -> torch.Tensor:
    """Their SiT forward pass written out in plain torch (DiT blocks with adaLN-Zero, LayerNorm eps 1e-6 without
    affine, tanh-GELU MLP, unfused attention), computed in float64 (the time code in float32, as theirs)."""
    s = {k: v.double() for k, v in state.items()}
    x, t = x.double(), t.double()

    def linear(h, name):
        return h @ s[name + ".weight"].T + s[name + ".bias"]

    def norm(h):
        return F.layer_norm(h, h.shape[-1:], eps=1e-6)

    def modulate(h, shift, scale):
        return h * (1 + scale[:, None]) + shift[:, None]

    h = linear(x, "x_embedder") + s["pos_embed"]
    half = 128  # their time code is computed in float32 whatever the model's dtype
    frequency = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    angles = t.float()[:, None] * frequency[None]
    t_frequencies = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1).double()
    c = linear(F.silu(linear(t_frequencies, "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = c + s["y_embedder.embedding_table.weight"][y]
    batch, tokens, width = h.shape
    head_dim = width // heads
    depth = len({k.split(".")[1] for k in s if k.startswith("blocks.")})
    for i in range(depth):
        p = f"blocks.{i}."
        shift1, scale1, gate1, shift2, scale2, gate2 = linear(F.silu(c), p + "adaLN_modulation.1").chunk(6, dim=-1)
        qkv = linear(modulate(norm(h), shift1, scale1), p + "attn.qkv").reshape(batch, tokens, 3, heads, head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        weights = ((q * head_dim**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        attended = (weights @ v).transpose(1, 2).reshape(batch, tokens, width)
        h = h + gate1[:, None] * linear(attended, p + "attn.proj")
        hidden = F.gelu(linear(modulate(norm(h), shift2, scale2), p + "mlp.fc1"), approximate="tanh")
        h = h + gate2[:, None] * linear(hidden, p + "mlp.fc2")
    shift, scale = linear(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=-1)
    return linear(modulate(norm(h), shift, scale), "final_layer.linear")


@pytest.fixture()
def authors_folder(tmp_path):
    folder = tmp_path / "sit-tiny"
    return folder, write_authors_sit(folder)


# ---------------------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------------------


def test_released_sit_xl_maps_every_key_on_meta(tmp_path):
    compat = json.loads(COMPAT_SIT.read_text())
    folder = tmp_path / "sit-xl"
    folder.mkdir()
    (folder / "config.json").write_text(compat["config_json_text"])
    described = read_diffusion_folder(folder)
    assert described.source_format == "authors-sit" and described.model_cfg.latent_shape == (128, 32)
    with torch.device("meta"):
        model = build_diffusion_model(described.model_cfg)
    assert isinstance(model, SiT)
    state = {name: torch.empty(shape, device="meta") for name, shape in compat["keys"].items()}
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == compat["keys"]
    load_state_strict(model, state, folder)  # nothing missing, unexpected or mis-shaped
    assert sum(v.numel() for v in state.values()) == compat["num_elements"] == 675_000_608
    assert authors_shapes(compat["config_json_as_written_by_save_pretrained"]) == compat["keys"]


def test_tiny_authors_sit_loads_strictly_and_matches_their_equations(authors_folder):
    folder, state = authors_folder
    model = SiT.from_pretrained(folder, device="cpu")
    assert not model.training and model.num_classes == 3 and model.has_null_class
    for name, value in state.items():
        assert torch.equal(model.state_dict()[name], value), name
    model = model.double()
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 4, generator=generator, dtype=torch.float64)
    t = torch.tensor([0.9, 0.3, 0.04], dtype=torch.float64)
    y = torch.tensor([0, 2, 1])
    with torch.no_grad():
        ours = model(x, t, y)
        cond, uncond = model.forward_pair(x, t, y)
    expected = authors_velocity(state, x, t, y, heads=2)
    assert torch.allclose(ours, expected, atol=1e-9, rtol=0)
    assert torch.allclose(cond, expected, atol=1e-9, rtol=0)
    null = torch.full_like(y, 3)  # their null class is index num_classes
    assert torch.allclose(uncond, authors_velocity(state, x, t, null, heads=2), atol=1e-9, rtol=0)
    assert ours.abs().max() > 1e-3  # random weights: a non-trivial velocity


def test_mismatched_weights_fail_listing_the_differences(authors_folder, caplog):
    folder, state = authors_folder
    state = dict(state)
    del state["blocks.1.mlp.fc2.bias"]
    state["blocks.0.attn.extra"] = torch.zeros(2)
    state["final_layer.linear.weight"] = torch.zeros(5, 32)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ValueError) as err:
        SiT.from_pretrained(folder)
    message = str(err.value)
    assert "\n" not in message and "model.safetensors does not match SiT" in message
    assert "1 missing (blocks.1.mlp.fc2.bias); 1 unexpected (blocks.0.attn.extra); 1 mis-shaped" in message
    assert "final_layer.linear.weight (file [5, 32], model [4, 32])" in message
    assert "blocks.1.mlp.fc2.bias" in caplog.text  # the full lists go to the log
    # the CLI turns it into one error line
    tok = tmp_tokenizer(folder.parent / "tok")
    assert main(["sample", "--model", str(folder), "--tokenizer", str(tok), "--num", "1", "--out",
                 str(folder.parent / "out")]) == 2


def test_hub_id_resolves_offline_to_the_refs_main_snapshot(authors_folder, tmp_path, monkeypatch):
    folder, state = authors_folder
    hub = tmp_path / "hub"
    repo = hub / "models--MAETok--sit-tiny"
    stale, current = "0" * 40, "a" * 40  # the stale snapshot sorts first
    write_authors_sit(repo / "snapshots" / stale, seed=9)
    shutil.copytree(folder, repo / "snapshots" / current)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(current)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    model = SiT.from_pretrained("MAETok/sit-tiny")
    for name, value in state.items():
        assert torch.equal(model.state_dict()[name], value), name
    with pytest.raises(FileNotFoundError, match="'MAETok/not-there' not in the hub cache"):
        SiT.from_pretrained("MAETok/not-there")


def test_save_pretrained_round_trips_our_format(authors_folder, tmp_path):
    folder, state = authors_folder
    model = SiT.from_pretrained(folder)
    out = model.save_pretrained(tmp_path / "ours")
    written = json.loads((out / "config.json").read_text())
    assert written["model_type"] == "maetok-diffusion"
    assert (written["model"]["num_latent_tokens"], written["model"]["latent_dim"]) == (4, 4)
    assert written["sampling"]["cfg_on"] == "drift" and written["sampling"]["latent_norm"] == "tokenizer"
    again = SiT.from_pretrained(out)
    for name, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], value), name
    pipe = LatentGenerator.load(out)
    assert pipe.sampling == SamplingConfig(**AUTHORS_SAMPLING) and pipe.num_classes == 3
    # LightningDiT: our format only; the authors' SiT is not one
    torch.manual_seed(0)
    lightning = LightningDiT(DiffusionModelConfig.from_size(
        "LightningDiT-B", width=32, depth=1, num_heads=2, latent_dim=4, num_latent_tokens=4, num_classes=3))
    lightning_dir = lightning.save_pretrained(tmp_path / "ldit", class_names=["a", "b", "c"])
    loaded = LightningDiT.from_pretrained(lightning_dir)
    for name, value in lightning.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    assert LatentGenerator.load(lightning_dir).class_names == ["a", "b", "c"]
    with pytest.raises(ValueError, match="holds a SiT, not a LightningDiT"):
        LightningDiT.from_pretrained(folder)
    with pytest.raises(ValueError, match="holds a LightningDiT, not a SiT"):
        SiT.from_pretrained(lightning_dir)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"encoder_model": "vit_base_patch14_dinov2.lvd142m"}')
    with pytest.raises(ValueError, match="other/config.json is not a maetok model folder .* nor the authors' MAETok or SiT"):
        SiT.from_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="holds a maetok-diffusion model, not a tokenizer"):
        MAETok.from_pretrained(lightning_dir)


def test_push_to_hub_uploads_the_saved_folder(authors_folder, tmp_path, monkeypatch):
    import huggingface_hub

    folder, _ = authors_folder
    calls = []

    class FakeApi:  # records what would be sent (no network here)
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo_id, private=False, exist_ok=False, repo_type=None):
            calls.append(("create", repo_id, private, exist_ok, repo_type))

        def upload_folder(self, repo_id, folder_path, commit_message, repo_type=None):
            shutil.copytree(folder_path, tmp_path / "uploaded")
            calls.append(("upload", repo_id, commit_message, repo_type))
            return "commit"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    model = SiT.from_pretrained(folder)
    assert model.push_to_hub("me/sit-tiny", private=True, token="t") == "commit"
    assert calls == [("token", "t"), ("create", "me/sit-tiny", True, True, "model"),
                     ("upload", "me/sit-tiny", "Upload maetok diffusion model", "model")]
    assert "LatentGenerator.load(\"me/sit-tiny\")" in (tmp_path / "uploaded" / "README.md").read_text()
    uploaded = SiT.from_pretrained(tmp_path / "uploaded")
    for name, value in model.state_dict().items():
        assert torch.equal(uploaded.state_dict()[name], value), name


# ---------------------------------------------------------------------------------------------------------
# samplers on known values
# ---------------------------------------------------------------------------------------------------------


def gaussian_velocity(sigma: float):
    """The exact velocity E[eps - x0 | x_t] for data x0 ~ N(0, sigma^2 I): linear in x_t."""

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        variance = (1 - t) ** 2 * sigma**2 + t**2
        return (t - (1 - t) * sigma**2) / variance * x

    return velocity


def test_euler_follows_the_exact_gaussian_flow():
    # the probability-flow ODE of N(0, sigma^2) data maps the noise z at t=1 to sigma * z at t=0; Euler's error
    # falls as 1/N
    sigma = 0.5
    z = torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = [(euler_sample(gaussian_velocity(sigma), z, num_steps=n) - sigma * z).abs().max().item()
              for n in (100, 2000)]
    assert errors[1] < 1e-3 and 15 < errors[0] / errors[1] < 25


def em_variance(sigma: float, steps: int, t_end: float) -> float:
    """The exact output variance of the Euler-Maruyama sampler for v = c(t) x (unit-variance noise): each step is
    linear, x' = (1 + a dt) x + sqrt(2 t |dt|) z with a = 1 + (2 - t) c(t) (the drift x + (2 - t) v)."""
    c = lambda t: (t - (1 - t) * sigma**2) / ((1 - t) ** 2 * sigma**2 + t**2)
    times = torch.linspace(1.0, t_end, steps, dtype=torch.float64).tolist() + [0.0]
    variance = 1.0
    for t_cur, t_next in zip(times[:-2], times[1:-1]):
        dt = t_next - t_cur
        variance = (1 + (1 + (2 - t_cur) * c(t_cur)) * dt) ** 2 * variance + 2 * t_cur * abs(dt)
    t_cur = times[-2]
    return variance * (1 + (1 + (2 - t_cur) * c(t_cur)) * (0.0 - t_cur)) ** 2


def test_euler_maruyama_variance_equals_its_closed_form_and_the_data_variance():
    sigma = 0.5
    # the schedule samples the data distribution: 2% low with the final noise-free step from 0.04, exact as
    # t_end -> 0 and the steps grow
    assert 0.97 * sigma**2 < em_variance(sigma, 250, 0.04) < 0.99 * sigma**2
    assert abs(em_variance(sigma, 5000, 0.004) - sigma**2) < 0.001 * sigma**2
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(40000, 1, 1, generator=generator, dtype=torch.float64)
    samples = euler_maruyama_sample(gaussian_velocity(sigma), noise, num_steps=50, generator=generator)
    expected = em_variance(sigma, 50, 0.04)
    assert abs(samples.var().item() - expected) < 0.025 * expected  # 40000 samples: 2.2% at 3 sigma
    shifted = euler_maruyama_sample(gaussian_velocity(sigma), noise, num_steps=50, generator=generator, t_end=0.2)
    assert abs(shifted.var().item() - em_variance(sigma, 50, 0.2)) < 0.025 * em_variance(sigma, 50, 0.2)


def authors_euler_maruyama(model, noise, y, steps, cfg_scale, low, high, draws):
    """Their Euler-Maruyama loop (METHOD.md §5) written out: float64 state, diffusion 2t, score from the velocity,
    guidance on the drift inside [low, high] when cfg_scale > 1, a last noise-free drift step; ``draws`` gives
    the standard normals of the noisy steps."""
    times = torch.linspace(1.0, 0.04, steps, dtype=torch.float64)
    times = torch.cat([times, torch.tensor([0.0], dtype=torch.float64)])
    x_next = noise.to(torch.float64)
    null = torch.full_like(y, model.num_classes)

    def drift(x_cur, t_cur):
        guided = cfg_scale > 1.0 and low <= t_cur <= high
        model_input = torch.cat([x_cur, x_cur]) if guided else x_cur
        labels = torch.cat([y, null]) if guided else y
        time = torch.ones(model_input.shape[0], dtype=torch.float64) * t_cur
        v = model(model_input.float(), time.float(), labels).double()
        score = ((1 - time)[:, None, None] / -1 * v - model_input) / (time**2 + (1 - time) * time)[:, None, None]
        d = v - 0.5 * (2 * t_cur) * score
        if guided:
            d_cond, d_uncond = d.chunk(2)
            d = d_uncond + cfg_scale * (d_cond - d_uncond)
        return d

    for i, (t_cur, t_next) in enumerate(zip(times[:-2], times[1:-1])):
        dt = t_next - t_cur
        x_cur = x_next
        x_next = x_cur + drift(x_cur, t_cur) * dt + torch.sqrt(2 * t_cur) * draws[i] * torch.sqrt(dt.abs())
    t_cur, t_next = times[-2], times[-1]
    return x_next + (t_next - t_cur) * drift(x_next, t_cur)


def test_authors_conventions_equal_their_sampler_loop(authors_folder):
    folder, _ = authors_folder
    model = SiT.from_pretrained(folder)
    y = torch.tensor([0, 2, 1])
    noise = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(3))
    steps, scale, low, high = 6, 1.7, 0.0, 0.75
    draws_generator = torch.Generator().manual_seed(11)
    draws = [torch.randn(3, 4, 4, generator=draws_generator).double() for _ in range(steps - 1)]
    with torch.no_grad():
        expected = authors_euler_maruyama(model, noise, y, steps, scale, low, high, draws)
    model_fn = make_model_fn(model, y, scale, (low, high))

    def sample(fn, start, cfg_on):
        return euler_maruyama_sample(fn, start, num_steps=steps, generator=torch.Generator().manual_seed(11),
                                     state_dtype=torch.float64, cfg_on=cfg_on)

    raw = sample(model_fn, noise.double(), "drift")
    assert torch.allclose(raw, expected, atol=1e-9, rtol=0)  # the same float32 model calls, float64 state
    assert sample(model_fn, noise, "drift").dtype == torch.float32  # returned in the noise's dtype
    # guidance on the velocity is the same map up to rounding (the drift is affine in the velocity)
    assert torch.allclose(sample(model_fn, noise.double(), "velocity"), raw, atol=1e-3, rtol=0)  # float32 combine
    assert (sample(make_model_fn(model, y), noise.double(), "drift") - raw).abs().max() > 1e-2  # guidance acts
    # the float32 state (our default) differs from the authors' float64 one by rounding only
    float32 = euler_maruyama_sample(model_fn, noise, num_steps=steps, generator=torch.Generator().manual_seed(11))
    assert torch.allclose(float32.double(), raw, atol=1e-3, rtol=0)


def test_latent_normalisation_follows_the_convention(authors_folder):
    folder, _ = authors_folder
    pipe = LatentGenerator.load(folder, "cpu")
    assert pipe.sampling.latent_norm == "tokenizer" and pipe.normalizer.mode == "none"
    released_like = SimpleNamespace(latent_mean=0.5, latent_std=2.0)  # what a released tokenizer carries
    normalizer = pipe.normalizer_for(None, released_like)
    assert torch.equal(normalizer.denormalize(torch.tensor([1.0, -1.0])), torch.tensor([2.5, -1.5]))
    ours = SamplingConfig(latent_norm="model")
    assert pipe.normalizer_for(ours, released_like) is pipe.normalizer
    assert pipe.normalizer_for(ours, None, (1.0, 3.0)).denormalize(torch.tensor([1.0])).item() == 4.0
    with pytest.raises(ValueError, match="carries no scalar latent mean / std"):
        pipe.normalizer_for(None, SimpleNamespace(config=TokenizerConfig()))
    with pytest.raises(ValueError, match="std must be positive"):
        pipe.normalizer_for(None, None, (0.0, 0.0))


def test_latent_scalars_come_from_the_tokenizer_config():
    assert tokenizer_latent_scalars(SimpleNamespace(latent_mean=0.25, latent_std=2.0)) == (0.25, 2.0)
    assert tokenizer_latent_scalars({"vq_mean": -0.5, "vq_std": 3.0}) == (-0.5, 3.0)
    assert tokenizer_latent_scalars(SimpleNamespace(config=SimpleNamespace(latent_mean=1.0, latent_std=0.5))) == (1.0, 0.5)
    assert tokenizer_latent_scalars(SimpleNamespace(latent_mean=None, latent_std=None, vq_mean=0.0, vq_std=4.0)) == (0.0, 4.0)
    with pytest.raises(ValueError, match="carries no scalar latent mean / std"):
        tokenizer_latent_scalars(SimpleNamespace(image_size=16))


# ---------------------------------------------------------------------------------------------------------
# maetok sample on the authors' format
# ---------------------------------------------------------------------------------------------------------


def tmp_tokenizer(path: Path) -> Path:
    torch.manual_seed(0)
    cfg = TokenizerConfig(
        image_size=16, in_channels=3, patch_size=4, encoder_width=32, encoder_depth=1, encoder_heads=2,
        decoder_width=32, decoder_depth=1, decoder_heads=2, num_latent_tokens=4, latent_dim=4, aux_targets=[],
        mask_ratio_min=0.0, mask_ratio_max=0.0, variant="ae",
    )
    MAETok(cfg).save_pretrained(path)
    return path


def test_sample_command_on_the_authors_sit(authors_folder, tmp_path):
    folder, _ = authors_folder
    tok = tmp_tokenizer(tmp_path / "tok")
    out = tmp_path / "samples"
    argv = ["sample", "--model", str(folder), "--tokenizer", str(tok), "--num", "3", "--out", str(out), "--steps",
            "4", "--cfg-scale", "1.9", "--guidance-interval", "0", "0.75", "--labels", "2,0", "--latent-scalars",
            "0.1", "2.0", "--seed", "7", "--device", "cpu"]
    assert main(argv) == 0
    with np.load(out / "samples.npz") as npz:
        images, labels = npz["arr_0"], npz["arr_1"]
    assert images.shape == (3, 16, 16, 3) and labels.tolist() == [2, 0, 2]
    # the same images from the API: the authors' conventions, x * 2.0 + 0.1 before decoding
    pipe = LatentGenerator.load(folder, "cpu")
    sampling = SamplingConfig(**{**AUTHORS_SAMPLING, "steps": 4, "cfg_scale": 1.9, "guidance_high": 0.75})
    normalizer = pipe.normalizer_for(sampling, None, (0.1, 2.0))
    generator = torch.Generator().manual_seed(7)
    latents = pipe.sample_latents(torch.tensor([2, 0, 2]), 3, sampling, generator, normalizer=normalizer)
    decoded = load_tokenizer(tok, "cpu").decode(latents).clamp(-1, 1)
    assert np.array_equal(to_uint8(decoded, channels_last=True).numpy(), images)
    # a different latent normalisation gives different images; no tokenizer is one error line
    assert main(argv[:-7] + ["--latent-scalars", "0.0", "1.0", "--seed", "7"]) == 0
    with np.load(out / "samples.npz") as npz:
        assert not np.array_equal(npz["arr_0"], images)
    assert main(["sample", "--model", str(folder), "--num", "1", "--out", str(out)]) == 2


def test_released_sit_and_tokenizer_together(tmp_path):
    """Both released formats in one command: the authors' SiT with their tokenizer's scalar latent mean / std."""
    tokenizer_dir = released_standins.write_authors_folder(tmp_path / "tok")  # vq_mean 0.25, vq_std 1.5
    tiny = released_standins.TINY
    sit_dir = tmp_path / "sit"
    write_authors_sit(sit_dir, {**TINY_AUTHORS_CONFIG, "in_channels": tiny["latent_dim"], "input_size": tiny["latents"]})
    out = tmp_path / "samples"
    assert main(["sample", "--model", str(sit_dir), "--tokenizer", str(tokenizer_dir), "--num", "2", "--out", str(out),
                 "--steps", "3", "--labels", "1", "--seed", "2", "--device", "cpu"]) == 0
    pipe = LatentGenerator.load(sit_dir, "cpu")
    tokenizer = load_tokenizer(tokenizer_dir, "cpu")
    normalizer = pipe.normalizer_for(None, tokenizer)
    assert (normalizer.mode, normalizer.mean.item(), normalizer.std.item()) == ("scalar", 0.25, 1.5)
    sampling = dataclasses.replace(pipe.sampling, steps=3)
    latents = pipe.sample_latents(torch.tensor([1, 1]), 2, sampling, torch.Generator().manual_seed(2),
                                  normalizer=normalizer)
    with np.load(out / "samples.npz") as npz:
        expected = to_uint8(tokenizer.decode(latents).clamp(-1, 1), channels_last=True).numpy()
        assert np.array_equal(npz["arr_0"], expected)


def test_convert_and_info_on_the_authors_sit(authors_folder, tmp_path, capsys):
    folder, _ = authors_folder
    out = tmp_path / "converted"
    assert main(["convert", "--from", str(folder), "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "maetok-diffusion"
    theirs, ours = SiT.from_pretrained(folder, "cpu"), SiT.from_pretrained(out, "cpu")
    x, t, y = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([0.3, 0.8]), torch.tensor([0, 2])
    with torch.no_grad():
        assert torch.equal(theirs(x, t, y), ours(x, t, y))
    capsys.readouterr()
    assert main(["info", "--model", str(folder)]) == 0
    printed = capsys.readouterr().out
    assert "format authors-sit" in printed and "on 4 x 4 latents, 3 classes" in printed and "parameters" in printed
    assert "latent normalisation: the tokenizer's scalar mean / std (the authors' convention)" in printed
    assert main(["info", "--model", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "format maetok" in printed and "latent normalisation: none (stored with the model)" in printed
