"""maetok models where diffusers code expects its own (issue 21, points 2 and 3): ``encode(x).latent_dist`` on every
tokenizer, the latent statistics as ``scaling_factor`` / ``shift_factor``, each loader reading the other format,
``maetok convert --to {maetok,diffusers}`` both ways, and ``torch_dtype`` / ``device`` on every loader, bfloat16 on
the CPU included."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")

from conftest import tiny_cfg  # noqa: E402
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from test_diffusers import tiny_generator, tiny_tokenizer  # noqa: E402

from maetok.cli import main  # noqa: E402
from maetok.config import ConfigError  # noqa: E402
from maetok.data.latents import read_latent_stats  # noqa: E402
from maetok.diffusion.generator import LatentGenerator  # noqa: E402
from maetok.integrations.diffusers import MAETokAutoencoder, MAETokSiTPipeline, MAETokTransformer  # noqa: E402
from maetok.model_folders import load_diffusion_model, load_tokenizer  # noqa: E402
from maetok.models.sit import SiT  # noqa: E402
from maetok.models.tokenizer import MAETok  # noqa: E402
from maetok.train.tokenizer import TokenizerTrainer  # noqa: E402

IMAGES = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("dropin")
    tok = tiny_tokenizer(root / "tok")
    return tok, tiny_generator(root / "sit", tok)


def with_statistics(folder, mean: float, std: float):
    """``folder``'s config.json with scalar latent statistics, as the tokenizer trainer writes them."""
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "latent_mean": mean, "latent_std": std}))
    return folder


# -- 2. latent_dist ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["ae", "maetok", "vae"])
def test_every_tokenizer_encodes_to_a_latent_dist(tmp_path, variant):
    tok = tiny_tokenizer(tmp_path / variant, variant)
    vae = MAETokAutoencoder.from_maetok(tok)
    with torch.no_grad():
        out = vae.encode(IMAGES)
        mean, logvar = MAETok.from_pretrained(tok).encode_posterior(IMAGES)
        ours = MAETok.from_pretrained(tok).encode_distribution(IMAGES)
    dist = out.latent_dist
    assert torch.equal(dist.mode(), mean) and torch.equal(out.latent, mean) and torch.equal(ours.mode(), mean)
    assert torch.equal(vae.encode(IMAGES, return_dict=False)[0].mode(), mean)  # (latent_dist,), as AutoencoderKL
    # diffusers' own helper, as its img2img pipelines call it
    assert torch.equal(retrieve_latents(out, sample_mode="argmax"), mean)
    sampled = retrieve_latents(out, generator=torch.Generator().manual_seed(3))
    kl = dist.kl()
    assert kl.shape == (2,) and dist.nll(sampled).shape == (2,)
    if variant == "vae":  # the diagonal Gaussian over (B, N, C): diffusers' formulas, summed over N and C
        noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
        assert torch.allclose(sampled, mean + (0.5 * logvar).exp() * noise)
        assert torch.allclose(kl, 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum(dim=(1, 2)))
        assert torch.allclose(dist.kl(dist), torch.zeros(2), atol=1e-5)
        per_sample = [torch.Generator().manual_seed(s) for s in (5, 6)]
        assert not torch.equal(dist.sample(per_sample)[0], dist.sample(per_sample[:1] * 2)[1])
    else:  # a point mass: zero variance
        assert logvar is None and dist.deterministic
        assert torch.equal(sampled, mean) and torch.equal(dist.sample(), dist.mode())
        assert torch.equal(kl, torch.zeros(2)) and torch.equal(dist.std, torch.zeros_like(mean))
        with torch.no_grad():
            assert torch.equal(vae(IMAGES, sample_posterior=True).sample, vae(IMAGES).sample)


def test_latent_statistics_are_measured_at_export_and_reach_the_diffusers_config(image_folder, tmp_path, capsys):
    TokenizerTrainer(tiny_cfg(image_folder, "train.steps=1"), tmp_path / "run").fit()
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    mean, std = config["latent_mean"], config["latent_std"]
    tokenizer = MAETok.from_pretrained(tmp_path / "run")
    assert (tokenizer.latent_mean, tokenizer.latent_std) == (mean, std) and std > 0
    # the same statistics as cache-latents measures on the training images (all of them: fewer than the sample)
    capsys.readouterr()
    assert main(["cache-latents", "--model", str(tmp_path / "run"), "--data", str(image_folder), "--out",
                 str(tmp_path / "cache")]) == 0
    stats = read_latent_stats(tmp_path / "cache")
    assert mean == pytest.approx(stats["mean"], rel=1e-9, abs=1e-12) and std == pytest.approx(stats["std"], rel=1e-9)
    assert f"latent mean {stats['mean']:.6g}, std {stats['std']:.6g}" in capsys.readouterr().out
    # diffusers' convention: z = (latent - shift_factor) * scaling_factor, standardised over the measured images
    vae = MAETokAutoencoder.from_pretrained(tmp_path / "run")
    assert vae.config.shift_factor == mean and vae.config.scaling_factor == pytest.approx(1 / std)
    assert tokenizer.latent_mean is not None  # the sampling path's --latent-norm tokenizer reads the same values
    from maetok.diffusion.generator import tokenizer_latent_scalars

    assert tokenizer_latent_scalars(tokenizer) == (mean, std)
    # a tokenizer never measured: the identity, and its folder has no statistics
    plain = MAETokAutoencoder.from_maetok(tiny_tokenizer(tmp_path / "plain"))
    assert (plain.config.scaling_factor, plain.config.shift_factor) == (1.0, 0.0)


def test_the_authors_scalars_become_the_diffusers_scaling(tmp_path):
    from released_standins import write_authors_folder

    folder = write_authors_folder(tmp_path / "authors")  # their config.json: vq_mean 0.25, vq_std 1.5
    for vae in (MAETokAutoencoder.from_pretrained(folder), MAETokAutoencoder.from_maetok(folder)):
        assert (vae.config.scaling_factor, vae.config.shift_factor) == (1 / 1.5, 0.25)
    assert main(["convert", "--from", str(folder), "--out", str(tmp_path / "diffusers"), "--to", "diffusers"]) == 0
    written = json.loads((tmp_path / "diffusers" / "config.json").read_text())
    assert (written["scaling_factor"], written["shift_factor"]) == (1 / 1.5, 0.25)


# -- 2. loaders read the other format; convert both ways ------------------------------------------------------


def test_diffusers_loaders_read_maetok_folders(folders, tmp_path):
    tok, sit = folders
    vae = MAETokAutoencoder.from_pretrained(tok)
    with torch.no_grad():
        assert torch.equal(vae.encode(IMAGES).latent, MAETok.from_pretrained(tok).encode(IMAGES))
    transformer = MAETokTransformer.from_pretrained(sit)
    generator = LatentGenerator.load(sit)
    assert all(torch.equal(v, generator.model.state_dict()[k]) for k, v in transformer.model.state_dict().items())
    assert transformer.config.latent_norm == generator.normalizer.to_dict()
    assert list(transformer.config.class_names) == generator.class_names
    # a run directory and the subfolder spelling of diffusers
    (tmp_path / "run").mkdir()
    MAETok.from_pretrained(tok).save_pretrained(tmp_path / "run" / "model")
    assert MAETokAutoencoder.from_pretrained(tmp_path / "run").latent_shape == (4, 4)
    assert MAETokAutoencoder.from_pretrained(tmp_path, subfolder="run").latent_shape == (4, 4)
    with pytest.raises(TypeError, match="variant apply to diffusers folders only"):
        MAETokAutoencoder.from_pretrained(tok, variant="fp16")


def test_pickle_weights_are_refused_in_one_line_never_loaded(folders, tmp_path, capsys, caplog):
    tok, _ = folders
    MAETokAutoencoder.from_maetok(tok).save_pretrained(tmp_path / "vae")
    (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    (tmp_path / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"not a pickle: loading it would fail otherwise")
    for load in (MAETokAutoencoder.from_pretrained, MAETok.from_pretrained):
        with pytest.raises(ValueError, match="holds pickle weights only \\(diffusion_pytorch_model.bin\\), which "
                                             "maetok never loads") as err:
            load(tmp_path / "vae")
        assert "\n" not in str(err.value)
    assert "unsafe serialization" not in capsys.readouterr().err + caplog.text


def test_convert_both_ways_round_trips_bit_identically(folders, tmp_path):
    tok, sit = folders
    source = with_statistics(tiny_tokenizer(tmp_path / "tok", "vae"), 0.25, 2.0)
    assert main(["convert", "--from", str(source), "--out", str(tmp_path / "diffusers"), "--to", "diffusers"]) == 0
    vae = MAETokAutoencoder.from_pretrained(tmp_path / "diffusers")  # diffusers' own loader reads it
    assert (vae.config.scaling_factor, vae.config.shift_factor) == (0.5, 0.25)
    vae.save_pretrained(tmp_path / "resaved")  # what diffusers writes: the same config and tensors
    written = json.loads((tmp_path / "diffusers" / "config.json").read_text())
    resaved = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert {k: v for k, v in resaved.items() if k != "_name_or_path"} == written
    weights = "diffusion_pytorch_model.safetensors"
    assert load_file(str(tmp_path / "resaved" / weights)).keys() == load_file(str(tmp_path / "diffusers" / weights)).keys()
    assert main(["convert", "--from", str(tmp_path / "diffusers"), "--out", str(tmp_path / "back")]) == 0
    assert (tmp_path / "back" / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == json.loads((source / "config.json").read_text())
    # a diffusion model: the weights, classes and latent normalisation (its sampling settings live in a pipeline)
    assert main(["convert", "--from", str(sit), "--out", str(tmp_path / "sit-diffusers"), "--to", "diffusers"]) == 0
    transformer = MAETokTransformer.from_pretrained(tmp_path / "sit-diffusers")
    assert transformer.config.latent_norm == LatentGenerator.load(sit).normalizer.to_dict()
    assert main(["convert", "--from", str(tmp_path / "sit-diffusers"), "--out", str(tmp_path / "sit-back")]) == 0
    assert (tmp_path / "sit-back" / "model.safetensors").read_bytes() == (sit / "model.safetensors").read_bytes()
    back = LatentGenerator.load(tmp_path / "sit-back")
    assert back.class_names == ["a", "b", "c"] and back.normalizer.to_dict() == LatentGenerator.load(sit).normalizer.to_dict()


# -- 3. torch_dtype and device --------------------------------------------------------------------------------


def test_every_loader_takes_torch_dtype(folders, tmp_path):
    tok, sit = folders
    bf16 = torch.bfloat16
    MAETokAutoencoder.from_maetok(tok).save_pretrained(tmp_path / "vae")
    models = {
        "MAETok.from_pretrained": MAETok.from_pretrained(tok, torch_dtype=bf16, device="cpu"),
        "model_folders.load_tokenizer": load_tokenizer(tok, torch_dtype="bfloat16"),
        "SiT.from_pretrained": SiT.from_pretrained(sit, torch_dtype=bf16),
        "model_folders.load_diffusion_model": load_diffusion_model(sit, "cpu", bf16)[0],
        "LatentGenerator.load": LatentGenerator.load(sit, torch_dtype=bf16).model,
        "MAETokAutoencoder (maetok folder)": MAETokAutoencoder.from_pretrained(tok, torch_dtype=bf16),
        "MAETokAutoencoder (diffusers folder)": MAETokAutoencoder.from_pretrained(tmp_path / "vae", torch_dtype=bf16),
        "MAETokAutoencoder.from_maetok": MAETokAutoencoder.from_maetok(tok, torch_dtype=bf16),
        "MAETokTransformer": MAETokTransformer.from_pretrained(sit, torch_dtype=bf16, device="cpu"),
    }
    for name, model in models.items():
        assert {p.dtype for p in model.parameters()} == {bf16} and not model.training, name
    # float32 inputs are cast to the model's dtype; the outputs come in it, as in diffusers
    tokenizer, reference = models["MAETok.from_pretrained"], MAETok.from_pretrained(tok)
    with torch.no_grad():
        latents = tokenizer.encode(IMAGES)
        assert latents.dtype == bf16 and torch.allclose(latents.float(), reference.encode(IMAGES), atol=0.1)
        images = tokenizer.decode(reference.encode(IMAGES))
        assert images.dtype == bf16 and torch.isfinite(images.float()).all()
        dist = models["MAETokAutoencoder (diffusers folder)"].encode(IMAGES).latent_dist
        assert dist.sample(torch.Generator().manual_seed(0)).dtype == bf16
        velocity = models["SiT.from_pretrained"](torch.randn(2, 4, 4), torch.rand(2), torch.tensor([0, 1]))
        assert velocity.dtype == bf16 and torch.isfinite(velocity.float()).all()
    latents = LatentGenerator.load(sit, torch_dtype=bf16).sample_latents(torch.tensor([0, 1]), 2, steps=2,
                                                                         generator=torch.Generator().manual_seed(0))
    assert latents.dtype == torch.float32 and torch.isfinite(latents).all()
    with pytest.raises(ConfigError, match="torch_dtype must be a floating dtype .* got 'int8'"):
        MAETok.from_pretrained(tok, torch_dtype="int8")


def test_loaders_default_to_the_cpu_even_with_a_gpu(folders, monkeypatch):
    tok, sit = folders
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine: CPU unless asked
    for model in (MAETok.from_pretrained(tok), SiT.from_pretrained(sit), load_diffusion_model(sit)[0],
                  LatentGenerator.load(sit).model):
        assert {p.device.type for p in model.parameters()} == {"cpu"}
        assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_the_pipeline_runs_in_bfloat16(folders, tmp_path):
    _, sit = folders
    pipe = MAETokSiTPipeline.from_maetok(sit)
    call = dict(class_labels=[0, 2], num_inference_steps=3, output_type="pt")
    reference = pipe(generator=torch.Generator().manual_seed(0), **call).images
    pipe.save_pretrained(tmp_path / "pipe")
    pipes = {
        "pipe.to(torch.bfloat16)": pipe.to(torch.bfloat16),
        "from_pretrained(torch_dtype=)": MAETokSiTPipeline.from_pretrained(tmp_path / "pipe", torch_dtype=torch.bfloat16),
        "from_pretrained(dtype=)": MAETokSiTPipeline.from_pretrained(tmp_path / "pipe", dtype=torch.bfloat16),
        "from_maetok(torch_dtype=)": MAETokSiTPipeline.from_maetok(sit, torch_dtype=torch.bfloat16),
    }
    for name, bf16 in pipes.items():
        assert bf16.vae.dtype == bf16.transformer.dtype == torch.bfloat16, name
        images = bf16(generator=torch.Generator().manual_seed(0), **call).images
        assert images.shape == reference.shape and images.dtype == torch.float32, name
        assert torch.isfinite(images).all() and (images - reference).abs().max() < 0.1, name
