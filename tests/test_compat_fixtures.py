"""Files written by the code before the restructure (tests/fixtures/v0, version 0: no format version inside)
load with today's code and give the same outputs: tokenizer and SiT folders, run directories (resume), and a
latent cache (read, and completed by a rerun)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from maetok.config import DiffusionTrainConfig, TokenizerTrainConfig, load_config
from maetok.data import build_dataset
from maetok.data.latents import LatentDataset, LatentNormalizer
from maetok.diffusion.generator import LatentGenerator
from maetok.encode import cache_latents, load_tokenizer
from maetok.models.tokenizer import MAETok
from maetok.train.diffusion import DiffusionTrainer
from maetok.train.tokenizer import TokenizerTrainer

V0 = Path(__file__).parent / "fixtures" / "v0"
ATOL = 1e-5  # another CPU may round differently in the last bits


@pytest.fixture(scope="module")
def expected():
    return load_file(str(V0 / "expected.safetensors"))


def _run_copy(tmp_path: Path, name: str) -> Path:
    """A writable copy of a fixture with the paths inside pointing at the copy (as on the machine that wrote it)."""
    root = tmp_path / "v0"
    if not root.exists():
        shutil.copytree(V0, root)
        for path in list(root.rglob("*.json")) + list(root.rglob("*.yaml")):
            path.write_text(path.read_text().replace("/tmp/fixtures_v0", str(root)))
    return root / name


@pytest.mark.parametrize("folder", ["tokenizer_run/model", "tokenizer_run"])
def test_v0_tokenizer_folder_encodes_and_decodes_as_before(folder, expected):
    tokenizer = load_tokenizer(V0 / folder, "cpu")
    with torch.no_grad():
        latents = tokenizer.encode(expected["images"])
        torch.testing.assert_close(latents, expected["latents"], atol=ATOL, rtol=0)
        torch.testing.assert_close(tokenizer.decode(expected["latents"]), expected["reconstructions"], atol=ATOL, rtol=0)
    assert MAETok.from_pretrained(V0 / "tokenizer_run" / "model").config == tokenizer.config


@pytest.mark.parametrize("folder", ["sit_run/model", "sit_run"])
def test_v0_sit_folder_predicts_and_samples_as_before(folder, expected):
    pipe = LatentGenerator.load(V0 / folder, device="cpu")
    assert pipe.num_classes == 2 and pipe.latent_shape == (4, 4)
    with torch.no_grad():
        velocity = pipe.model(expected["x_t"], expected["t"], expected["y"])
    torch.testing.assert_close(velocity.float(), expected["velocity"], atol=ATOL, rtol=0)
    samples = pipe.sample_latents(torch.tensor([0, 1]), 2, generator=torch.Generator().manual_seed(1), steps=3)
    torch.testing.assert_close(samples.float(), expected["sampled_latents"], atol=1e-4, rtol=0)


def test_v0_latent_cache_reads_and_matches_its_tokenizer():
    cache = LatentDataset(V0 / "latents")
    assert len(cache) == 48 and cache.num_classes == 2 and cache.class_names == ["a", "b"]
    tokenizer = MAETok.from_pretrained(V0 / "tokenizer_run" / "model").eval()
    dataset = build_dataset(str(V0 / "images"), "all", 16, 3)
    images = torch.stack([dataset[i][0] for i in range(5)])
    with torch.no_grad():
        torch.testing.assert_close(cache.latents[:5], tokenizer.encode(images), atol=ATOL, rtol=0)
        torch.testing.assert_close(cache.latents_flip[:5], tokenizer.encode(images.flip(-1)), atol=ATOL, rtol=0)
    norm = LatentNormalizer(cache.stats)
    assert norm.normalize(cache.latents).mean().abs() < 1e-5


def test_v0_latent_cache_is_completed_by_a_rerun(tmp_path):
    cache_dir = _run_copy(tmp_path, "latents")
    model_dir = _run_copy(tmp_path, "tokenizer_run/model")
    before = load_file(str(cache_dir / "shard-00006.safetensors"))
    (cache_dir / "shard-00006.safetensors").unlink()
    (cache_dir / "stats.json").unlink()
    dataset = build_dataset(str(_run_copy(tmp_path, "images")), "all", 16, 3)
    cache_latents(MAETok.from_pretrained(model_dir), dataset, cache_dir, model_dir, flip=True, shard_size=7, progress=False)
    after = load_file(str(cache_dir / "shard-00006.safetensors"))
    torch.testing.assert_close(after["latents"], before["latents"], atol=ATOL, rtol=0)
    assert torch.equal(after["labels"], before["labels"])
    assert json.loads((cache_dir / "stats.json").read_text())["num_items"] == 48


@pytest.mark.parametrize("name", ["tokenizer_run", "sit_run"])
def test_v0_runs_resume(name, tmp_path):
    config_cls, trainer_cls, load = {
        "tokenizer_run": (TokenizerTrainConfig, TokenizerTrainer, MAETok.from_pretrained),
        "sit_run": (DiffusionTrainConfig, DiffusionTrainer, LatentGenerator.load),
    }[name]
    run = _run_copy(tmp_path, name)
    trainer = trainer_cls(load_config(config_cls, run / "config.yaml", ["train.steps=3"]), run, resume=True,
                          allow_config_change=True)  # steps 2 -> 3: a change resumed on purpose
    assert trainer.step == 2
    trainer.fit()
    assert trainer.step == 3
    assert len((run / "log.csv").read_text().strip().splitlines()) == 1 + 3
    load(run)  # the run directory names its new model folder


def test_written_files_carry_the_format_version_and_newer_ones_are_refused(tmp_path):
    from maetok.runs import FORMAT_VERSION

    cache, model_dir = _run_copy(tmp_path, "latents"), _run_copy(tmp_path, "tokenizer_run/model")
    (cache / "stats.json").unlink()
    dataset = build_dataset(str(_run_copy(tmp_path, "images")), "all", 16, 3)
    cache_latents(MAETok.from_pretrained(model_dir), dataset, cache, model_dir, flip=True, shard_size=7, progress=False)
    for name in ("stats.json", "cache_plan.json"):
        assert json.loads((cache / name).read_text())["format_version"] == FORMAT_VERSION
    run = _run_copy(tmp_path, "tokenizer_run")
    trainer = TokenizerTrainer(load_config(TokenizerTrainConfig, run / "config.yaml", ["train.steps=3"]), run, resume=True,
                               allow_config_change=True)
    trainer.fit()  # writes a new checkpoint and model folder
    checkpoint = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    config_path = run / "model" / "config.json"
    assert checkpoint["format_version"] == json.loads(config_path.read_text())["format_version"] == FORMAT_VERSION

    newer = json.loads(config_path.read_text()) | {"format_version": FORMAT_VERSION + 1}
    config_path.write_text(json.dumps(newer))
    with pytest.raises(ValueError, match=rf"config\.json has format_version {FORMAT_VERSION + 1}, written by a newer"):
        MAETok.from_pretrained(run)
    torch.save(checkpoint | {"format_version": FORMAT_VERSION + 1}, run / "checkpoints" / "last.pt")
    with pytest.raises(ValueError, match=r"last\.pt has format_version"):
        TokenizerTrainer(load_config(TokenizerTrainConfig, run / "config.yaml", ["train.steps=4"]), run, resume=True,
                         allow_config_change=True)
    stats = json.loads((cache / "stats.json").read_text()) | {"format_version": FORMAT_VERSION + 1}
    (cache / "stats.json").write_text(json.dumps(stats))
    with pytest.raises(ValueError, match=r"stats\.json has format_version"):
        LatentDataset(cache)
