"""The diffusers wrappers (maetok[diffusers]) round-trip tiny models: encode, decode, save / load, pipeline calls."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from PIL import Image  # noqa: E402

from maetok.config import DiffusionModelConfig, SamplingConfig, TokenizerConfig, to_dict  # noqa: E402
from maetok.data.latents import LatentNormalizer  # noqa: E402
from maetok.diffusion.generator import LatentGenerator  # noqa: E402
from maetok.models.sit import SiT, build_diffusion_model  # noqa: E402
from maetok.integrations.diffusers import (  # noqa: E402
    MAETokAutoencoder,
    MAETokSampler,
    MAETokSiTPipeline,
    MAETokTransformer,
)
from maetok.models.tokenizer import MAETok  # noqa: E402


def tiny_tokenizer(path, variant: str = "ae"):
    torch.manual_seed(0)
    cfg = TokenizerConfig(
        image_size=16, in_channels=3, patch_size=4, encoder_width=32, encoder_depth=1, encoder_heads=2,
        decoder_width=32, decoder_depth=1, decoder_heads=2, num_latent_tokens=4, latent_dim=4, aux_targets=[],
        mask_ratio_min=0.0, mask_ratio_max=0.0, variant=variant,
    )
    model = MAETok(cfg)
    for parameter in model.parameters():  # off the zero / identity init, so decode depends on its input
        parameter.data.add_(0.05 * torch.randn_like(parameter))
    model.save_pretrained(path)
    return path


def tiny_generator(path, tokenizer_dir, num_classes: int = 3):
    torch.manual_seed(1)
    model_cfg = DiffusionModelConfig(arch="sit", width=32, depth=2, num_heads=2)
    model = build_diffusion_model(model_cfg.for_latents((4, 4), num_classes))
    for parameter in model.parameters():
        parameter.data.add_(0.1 * torch.randn_like(parameter))
    stats = {"channel_mean": [0.1, -0.2, 0.0, 0.3], "channel_std": [1.5, 0.5, 1.0, 2.0]}
    pipe = LatentGenerator(model, LatentNormalizer(stats), ["a", "b", "c"],
                           SamplingConfig(steps=3, cfg_scale=1.5, guidance_high=0.75), str(tokenizer_dir))
    pipe.save(path)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusers")
    tok = tiny_tokenizer(root / "tok")
    return tok, tiny_generator(root / "sit", tok)


def test_autoencoder_wraps_the_tokenizer_and_round_trips(folders, tmp_path):
    tok, _ = folders
    vae = MAETokAutoencoder.from_maetok(tok)
    ours = MAETok.from_pretrained(tok)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        latents = vae.encode(images).latent
        decoded = vae.decode(latents).sample
        assert torch.equal(latents, ours.encode(images)) and latents.shape == (2, 4, 4)
        assert torch.equal(decoded, ours.decode(latents)) and decoded.shape == (2, 3, 16, 16)
        assert torch.equal(vae(images).sample, decoded)
        assert torch.equal(vae.encode(images, return_dict=False)[0].mode(), latents)  # (latent_dist,), as AutoencoderKL
    vae.save_pretrained(tmp_path / "vae")
    assert (tmp_path / "vae" / "config.json").exists()
    assert (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").exists()
    again = MAETokAutoencoder.from_pretrained(tmp_path / "vae")
    assert again.config.tokenizer_config == to_dict(ours.config)
    # maetok's own loader reads the diffusers folder too (model_folders: format "diffusers-tokenizer")
    plain = MAETok.from_pretrained(tmp_path / "vae")
    assert type(plain) is MAETok and all(torch.equal(v, ours.state_dict()[k]) for k, v in plain.state_dict().items())
    with torch.no_grad():
        assert torch.equal(again.encode(images).latent, latents)
        assert torch.equal(again.decode(latents).sample, decoded)
    # strict, as every maetok loader: a missing tensor fails in one line (diffusers alone would initialise it at
    # random with a warning)
    from safetensors.torch import load_file, save_file

    weights = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    dropped = sorted(state)[0]
    del state[dropped]
    save_file(state, str(weights))
    with pytest.raises(ValueError, match=rf"does not match MAETokAutoencoder: 1 missing \({dropped}\)"):
        MAETokAutoencoder.from_pretrained(tmp_path / "vae")


def test_vae_tokenizer_gives_a_latent_dist(tmp_path):
    tok = tiny_tokenizer(tmp_path / "vae-tok", variant="vae")
    vae = MAETokAutoencoder.from_maetok(tok)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        dist = vae.encode(images).latent_dist
        mean, logvar = MAETok.from_pretrained(tok).encode_posterior(images)
    assert torch.equal(dist.mode(), mean) and torch.allclose(dist.std, (0.5 * logvar).exp())


def test_pipeline_call_save_and_load(folders, tmp_path):
    tok, sit = folders
    pipe = MAETokSiTPipeline.from_maetok(sit)
    assert isinstance(pipe.scheduler, MAETokSampler) and isinstance(pipe.transformer, MAETokTransformer)
    out = pipe(class_labels=[0, 2, 1], num_inference_steps=3, generator=torch.Generator().manual_seed(0),
               output_type="pt")
    assert out.images.shape == (3, 3, 16, 16) and 0 <= out.images.min() and out.images.max() <= 1
    # the same images as maetok's own path: LatentGenerator latents, decoded by the tokenizer
    generator = LatentGenerator.load(sit, "cpu")
    latents = generator.sample_latents(torch.tensor([0, 2, 1]), 3, generator=torch.Generator().manual_seed(0))
    expected = (MAETok.from_pretrained(tok).decode(latents).clamp(-1, 1) + 1) / 2
    assert torch.allclose(out.images, expected, atol=1e-6)
    pil = pipe(class_labels=1, num_inference_steps=2, generator=torch.Generator().manual_seed(3)).images
    assert len(pil) == 1 and isinstance(pil[0], Image.Image) and pil[0].size == (16, 16)
    arrays = pipe(class_labels=[1, 1], num_inference_steps=2, guidance_scale=1.0, output_type="np",
                  generator=torch.Generator().manual_seed(3)).images
    assert arrays.shape == (2, 16, 16, 3) and arrays.dtype == np.float32
    # save_pretrained / from_pretrained: identical images for the same generator
    pipe.save_pretrained(tmp_path / "pipe")
    for part in ("model_index.json", "transformer/config.json", "vae/config.json", "scheduler/scheduler_config.json"):
        assert (tmp_path / "pipe" / part).exists(), part
    # maetok's loaders read the pipeline's components (a transformer with the default sampling settings)
    sit_model = SiT.from_pretrained(tmp_path / "pipe" / "transformer")
    assert all(torch.equal(v, pipe.transformer.model.state_dict()[k]) for k, v in sit_model.state_dict().items())
    assert LatentGenerator.load(tmp_path / "pipe" / "transformer").normalizer.to_dict() == generator.normalizer.to_dict()
    with pytest.raises(ValueError, match="is a diffusers pipeline: name its vae/ or transformer/ folder"):
        MAETok.from_pretrained(tmp_path / "pipe")
    loaded = MAETokSiTPipeline.from_pretrained(tmp_path / "pipe")
    again = loaded(class_labels=[0, 2, 1], num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                   output_type="pt")
    assert torch.equal(again.images, out.images)
    assert loaded.scheduler.sampling_config() == pipe.scheduler.sampling_config()
    assert loaded.transformer.config.latent_norm == generator.normalizer.to_dict()
    with pytest.raises(ValueError, match="output_type"):
        pipe(class_labels=[0], output_type="jpg")


def test_pipeline_on_the_authors_sit_with_their_conventions(folders, tmp_path):
    tok, _ = folders
    from test_pretrained_diffusion import write_authors_sit

    write_authors_sit(tmp_path / "authors-sit")
    with pytest.raises(ValueError, match="names no tokenizer"):
        MAETokSiTPipeline.from_maetok(tmp_path / "authors-sit")
    pipe = MAETokSiTPipeline.from_maetok(tmp_path / "authors-sit", tokenizer=tok, latent_scalars=(0.5, 2.0))
    sampling = pipe.scheduler.sampling_config()
    assert (sampling.cfg_on, sampling.precision) == ("drift", "float64")
    assert pipe.transformer.config.latent_norm == {"mode": "scalar", "mean": 0.5, "std": 2.0}
    images = pipe(class_labels=[2, 0], num_inference_steps=3, guidance_scale=1.9, guidance_interval=(0.0, 0.75),
                  generator=torch.Generator().manual_seed(1), output_type="pt").images
    generator = LatentGenerator.load(tmp_path / "authors-sit", "cpu")
    normalizer = LatentNormalizer.from_dict({"mode": "scalar", "mean": 0.5, "std": 2.0})
    latents = generator.sample_latents(torch.tensor([2, 0]), 2, generator.sampling.__class__(
        **{**to_dict(generator.sampling), "cfg_scale": 1.9, "guidance_high": 0.75}), torch.Generator().manual_seed(1),
        steps=3, normalizer=normalizer)
    expected = (MAETok.from_pretrained(tok).decode(latents).clamp(-1, 1) + 1) / 2
    assert torch.allclose(images, expected, atol=1e-6)


def test_import_maetok_needs_no_diffusers():
    code = ("import sys; sys.modules['diffusers'] = None; import maetok; from maetok import SiT\n"
            "try:\n    import maetok.integrations.diffusers\nexcept ImportError as e:\n    print(e)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "maetok.integrations.diffusers needs diffusers: pip install 'maetok[diffusers]'"


def test_released_tokenizer_round_trips_through_the_wrapper(tmp_path):
    """The authors' released tokenizer format: wrapped, saved and loaded in diffusers' layout with the same encode /
    decode."""
    from released_standins import write_authors_folder

    from maetok.encode import load_tokenizer

    folder = write_authors_folder(tmp_path / "tok")
    ours = load_tokenizer(folder, "cpu")
    vae = MAETokAutoencoder.from_maetok(folder)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    vae.save_pretrained(tmp_path / "vae")
    again = MAETokAutoencoder.from_pretrained(tmp_path / "vae")
    assert (again.tokenizer.latent_mean, again.tokenizer.latent_std) == (0.25, 1.5)
    with torch.no_grad():
        latents = ours.encode(images)
        assert torch.equal(vae.encode(images).latent, latents) and torch.equal(again.encode(images).latent, latents)
        assert torch.equal(again.decode(latents).sample, ours.decode(latents))
