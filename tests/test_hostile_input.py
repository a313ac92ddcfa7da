"""Faults and hostile input (issue 22, points 3 and 4): sizes and values are checked before anything is allocated,
files maetok reads are size-capped and refused in one line when corrupt, non-finite outputs are never written,
file names that are not UTF-8 are read like any other, and refusals are one line.

The size cases run the CLI in a subprocess under an address-space limit (``RLIMIT_AS``): on code that builds the
module first they end in an allocation failure (a traceback, exit status 1) instead of a one-line refusal."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_SIT
from PIL import Image

from maetok.cli import main
from maetok.config import ConfigError, DiffusionTrainConfig, TokenizerTrainConfig, load_config, read_preset
from maetok.data.npz import NpzFormatError, iter_npz_images, load_sample_batch
from maetok.errors import DataError, NonFiniteError

REPO = Path(__file__).resolve().parent.parent
MEMORY_LIMIT = 3 * 2**30  # bytes of address space the size cases run under

_LIMITED_RUNNER = """
import contextlib, io, json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
from maetok.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    results.append([code, err.getvalue()])
print(json.dumps(results))
"""


def run_limited(commands: list[list[str]], timeout: float = 120) -> list[tuple[int, str]]:
    """``(exit status, stderr)`` of each ``maetok`` command line, run one after the other in one subprocess whose
    address space is capped at :data:`MEMORY_LIMIT`."""
    done = subprocess.run([sys.executable, "-c", _LIMITED_RUNNER.format(limit=MEMORY_LIMIT), json.dumps(commands)],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    return [tuple(result) for result in json.loads(done.stdout.splitlines()[-1])]


def error_line(stderr: str) -> str:
    """The one ``maetok ...: error:`` line of a refusal (and no traceback)."""
    lines = [line for line in stderr.splitlines() if line.startswith("maetok ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def one_line_error(capsys, argv: list[str], *expected: str) -> str:
    capsys.readouterr()
    assert main(argv) == 2, argv
    line = error_line(capsys.readouterr().err)
    for text in expected:
        assert text in line, (text, line)
    return line


def _tokenizer_copy(tokenizer_dir: Path, out: Path, **changes) -> Path:
    """A copy of the tiny tokenizer folder with ``changes`` written into its config.json."""
    shutil.copytree(tokenizer_dir, out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, **changes}))
    return out


def _diffusion_folder(out: Path) -> Path:
    from maetok.config import DiffusionModelConfig
    from maetok.model_folders import save_diffusion_model
    from maetok.models.sit import build_diffusion_model

    cfg = DiffusionModelConfig(width=32, depth=1, num_heads=2, latent_dim=4, num_latent_tokens=4, num_classes=2)
    return save_diffusion_model(build_diffusion_model(cfg), out)


def _save_noise(path: Path, seed: int, size: int = 16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, format="PNG")


# ------------------------------------------------------------------------- 3. sizes checked before allocation


def test_model_sizes_are_refused_before_anything_is_allocated(tokenizer_dir, tmp_path):
    """config.json asking for width 10**9, 10**9 latent tokens, depth 10**6 or patch size 0 (ours, diffusion, the
    authors' SiT), or linked to /dev/zero: one line naming the key and its bound, under a 3 GB address space."""
    folders = {
        "model.encoder_width must lie in [1, 65536], got 1000000000":
            _tokenizer_copy(tokenizer_dir, tmp_path / "width", encoder_width=10**9, decoder_width=10**9),
        "model.num_latent_tokens must lie in [1, 8192], got 1000000000":
            _tokenizer_copy(tokenizer_dir, tmp_path / "tokens", num_latent_tokens=10**9),
        "model.decoder_depth must lie in [1, 2048], got 1000000":
            _tokenizer_copy(tokenizer_dir, tmp_path / "depth", decoder_depth=10**6),
        "model.patch_size must lie in [1, 32768], got 0": _tokenizer_copy(tokenizer_dir, tmp_path / "patch", patch_size=0),
    }
    sit = _diffusion_folder(tmp_path / "sit")
    config = json.loads((sit / "config.json").read_text())
    config["model"]["num_latent_tokens"] = 10**9
    (sit / "config.json").write_text(json.dumps(config))
    folders["model.num_latent_tokens must lie in [1, 8192], got 1000000000"] = sit
    authors = tmp_path / "authors-sit"
    authors.mkdir()
    (authors / "config.json").write_text(json.dumps({"hidden_size": 2 * 10**9, "depth": 1, "num_heads": 2,
                                                     "in_channels": 4, "input_size": 4, "vae_1d": True, "patch_size": 1}))
    folders["model.width must lie in [1, 65536], got 2000000000"] = authors
    from released_standins import authors_config, write_authors_folder

    rope = write_authors_folder(tmp_path / "authors-rope", config=authors_config(base_image_size=4 * 10**6))
    folders["released_architecture.rope_grid must lie in [1, 32768], got 1000000"] = rope
    zero = _tokenizer_copy(tokenizer_dir, tmp_path / "zero")
    (zero / "config.json").unlink()
    (zero / "config.json").symlink_to("/dev/zero")
    folders[f"{zero / 'config.json'} is a device, pipe or socket, not a file"] = zero

    start = time.monotonic()
    results = run_limited([["info", "--model", str(folder)] for folder in folders.values()])
    assert [code for code, _ in results] == [2] * len(folders), [stderr[-300:] for _, stderr in results]
    for (expected, folder), (code, stderr) in zip(folders.items(), results):
        line = error_line(stderr)
        assert expected in line and str(folder) in line, line
    assert time.monotonic() - start < 60


def test_a_nonfinite_model_config_is_refused_where_it_is_read(tokenizer_dir, image_folder, tmp_path, capsys):
    """"rope_theta": NaN in config.json: cache-latents and reconstruct refuse the folder instead of writing NaN
    latents or gray images."""
    folder = _tokenizer_copy(tokenizer_dir, tmp_path / "nan", rope_theta=float("nan"))
    assert "NaN" in (folder / "config.json").read_text()
    from released_standins import authors_config, write_authors_folder
    from maetok.model_folders import load_tokenizer

    released = write_authors_folder(tmp_path / "authors", config=authors_config(vq_std=float("nan")))
    with pytest.raises(ConfigError, match=r"config.json: released_architecture.latent_std must be a finite number"):
        load_tokenizer(released)
    one_line_error(capsys, ["cache-latents", "--model", str(folder), "--data", str(image_folder), "--out",
                            str(tmp_path / "cache")], "model.rope_theta must be a finite number, got nan",
                   str(folder / "config.json"))
    one_line_error(capsys, ["reconstruct", "--model", str(folder), "--input", str(image_folder), "--out",
                            str(tmp_path / "recon")], "model.rope_theta must be a finite number")
    assert not list((tmp_path / "recon").rglob("*.png"))


@pytest.mark.parametrize("override, key", [
    ("sampling.cfg_scale=.nan", "sampling.cfg_scale"),
    ("model.mlp_ratio=.inf", "model.mlp_ratio"),
    ("train.ema_warmup=.nan", "train.ema_warmup"),
])
def test_nonfinite_training_config_values_are_refused(override, key):
    with pytest.raises(ConfigError, match=rf"^{key} must be a finite number"):
        load_config(DiffusionTrainConfig, "fashion-mnist-sit", [override])


def test_tokenizer_training_config_sizes_are_bounded():
    with pytest.raises(ConfigError, match=r"^model.encoder_heads must lie in \[1, 1024\], got 0"):
        load_config(TokenizerTrainConfig, "fashion-mnist-maetok", ["model.encoder_heads=0"])
    with pytest.raises(ConfigError, match=r"aux_width=48 / aux_heads=5 must give a head dim divisible by 4"):
        load_config(TokenizerTrainConfig, "fashion-mnist-maetok", ["model.aux_width=48", "model.aux_heads=5"])


def test_nonfinite_outputs_are_never_written(tokenizer_dir, image_folder, tmp_path, monkeypatch):
    """A tokenizer whose output is NaN (finite weights, finite config): cache-latents writes no shard and no
    stats.json, reconstruct no PNG; both name the items."""
    from maetok.data import build_dataset
    from maetok.encode import cache_latents, reconstruct_files
    from maetok.models.tokenizer import MAETok

    tokenizer = MAETok.from_pretrained(tokenizer_dir)
    encode = tokenizer.encode
    tokenizer.encode = lambda images, *args, **kwargs: encode(images, *args, **kwargs) * float("nan")
    dataset = build_dataset(str(image_folder), "all", 16, 3)
    with pytest.raises(NonFiniteError, match=r"output for dataset items 0\.\.\d+ \(nothing of shard 0 is written\)"):
        cache_latents(tokenizer, dataset, tmp_path / "cache", tokenizer_dir, shard_size=7, progress=False)
    assert not list((tmp_path / "cache").glob("shard-*")) and not (tmp_path / "cache" / "stats.json").exists()

    monkeypatch.setattr(MAETok, "decode", lambda self, latents: torch.full(
        (len(latents), 3, 16, 16), float("nan")))
    with pytest.raises(NonFiniteError, match="the tokenizer's output for .*0.png"):
        reconstruct_files(tokenizer_dir, image_folder / "cats", tmp_path / "recon")
    assert not list((tmp_path / "recon").rglob("*.png"))


def _alias_bomb(levels: int = 5, width: int = 10) -> str:
    """A YAML flow sequence whose aliases expand it to ``width ** levels`` numbers."""
    text = f"&a0 [{', '.join(['0.9'] * width)}]"
    for level in range(1, levels):
        text = f"&a{level} [{text}, {', '.join([f'*a{level - 1}'] * (width - 1))}]"
    return text


def test_a_yaml_alias_bomb_is_refused_before_it_is_built(tmp_path, capsys):
    bomb = _alias_bomb()
    path = tmp_path / "bomb.yaml"
    path.write_text(f"base: fashion-mnist-ae\noptim:\n  betas: {bomb}\n")
    start = time.monotonic()
    with pytest.raises(ConfigError, match="alias bomb") as refused:
        read_preset(str(path))
    assert str(path) in str(refused.value) and len(str(refused.value)) < 300
    with pytest.raises(ConfigError, match="alias bomb") as refused:
        load_config(TokenizerTrainConfig, "fashion-mnist-ae", [f"optim.betas={bomb}"])
    assert "override optim.betas" in str(refused.value) and len(str(refused.value)) < 300
    assert time.monotonic() - start < 5
    # aliases in proportion are fine
    path.write_text("base: fashion-mnist-ae\noptim:\n  betas: &b [0.9, 0.95]\nloss: {}\nx: *b\n")
    assert read_preset(str(path))["x"] == [0.9, 0.95]


def _npz_with_header(path: Path, shape: tuple, payload: bytes) -> Path:
    """An .npz whose arr_0.npy header claims uint8 ``shape`` but holds ``payload``."""
    header = np.lib.format.header_data_from_array_1_0(np.zeros((1, 1, 1, 3), np.uint8))
    header["shape"] = shape
    import io

    member = io.BytesIO()
    np.lib.format.write_array_header_1_0(member, header)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("arr_0.npy", member.getvalue() + payload)
    return path


def test_an_npz_header_claiming_more_than_the_file_holds_is_refused(tmp_path):
    forged = _npz_with_header(tmp_path / "forged.npz", (10**9, 256, 256, 3), bytes(256 * 256 * 3))
    with pytest.raises(NpzFormatError, match=r"claims shape \(1000000000, 256, 256, 3\) \(196608000000000 bytes\) but "
                                             r"holds \d+ bytes"):
        load_sample_batch(forged)
    with pytest.raises(NpzFormatError, match="claims shape"):
        next(iter_npz_images(forged))
    honest = _npz_with_header(tmp_path / "honest.npz", (2, 4, 4, 3), bytes(range(96)))
    assert load_sample_batch(honest)[0].shape == (2, 4, 4, 3)


def test_config_files_are_read_with_a_size_cap(tmp_path):
    from maetok.runs import read_text_capped

    big = tmp_path / "big.yaml"
    big.write_bytes(b"a: 1\n" * 30)
    with pytest.raises(ConfigError, match=f"{big} is 150 bytes, more than the 100"):
        read_text_capped(big, limit=100)
    with pytest.raises(ConfigError, match="is a folder, not a file"):
        read_text_capped(tmp_path)
    (tmp_path / "bad.yaml").write_bytes(b"a: \xff\n")
    with pytest.raises(ConfigError, match="bad.yaml is not UTF-8 text"):
        read_preset(str(tmp_path / "bad.yaml"))


# ----------------------------------------------------------------- 4. file names, one-line refusals, last.pt


def _folder_with_undecodable_names(root: Path) -> Path:
    """40 noise PNGs in two classes, one named b'\\xff.png' (readable) and one b'\\xfe.png' (not an image)."""
    for i in range(40):
        _save_noise(root / f"c{i % 2}" / f"{i}.png", i)
    _save_noise(Path(os.fsdecode(bytes(root / "c0") + b"/\xff.png")), 99)
    Path(os.fsdecode(bytes(root / "c1") + b"/\xfe.png")).write_text("not an image")
    return root


def test_a_file_name_that_is_not_utf8_is_read_like_any_other(tokenizer_dir, tmp_path, capsys):
    from conftest import TINY

    images = _folder_with_undecodable_names(tmp_path / "images")
    cache = tmp_path / "cache"
    assert main(["cache-latents", "--model", str(tokenizer_dir), "--data", str(images), "--out", str(cache)]) == 0
    stats = json.loads((cache / "stats.json").read_text())
    from maetok.data import build_dataset

    train = build_dataset(str(images), "train", 16, 3)  # the split is drawn from each name's own bytes
    assert os.fsdecode(b"c0/\xff.png") in train.relative_paths and stats["num_listed_items"] == len(train)
    assert stats["num_items"] == len(train) - 1 and stats["num_skipped_images"] == 1
    skipped = json.loads((cache / "skipped.json").read_text(encoding="utf-8"))["skipped"]
    assert [item["file"] for item in skipped] == ["c1/\\xfe.png"]
    assert main(["train-tokenizer", "--config", "fashion-mnist-ae", "--data", str(images), "--out",
                 str(tmp_path / "run"), *TINY, "model.aux_targets=[]", "loss.perceptual_weight=0", "loss.gan_weight=0",
                 "train.steps=1", "train.num_workers=0"]) == 0
    assert main(["reconstruct", "--model", str(tokenizer_dir), "--input", str(images), "--out",
                 str(tmp_path / "recon")]) == 0
    assert "c1/\\xfe.png: not a recognised image format" in capsys.readouterr().out
    assert (tmp_path / "recon" / "c0" / os.fsdecode(b"\xff.png")).is_file()  # a.png -> a.png


def test_a_cache_plan_refusal_is_one_line(tokenizer_dir, image_folder, tmp_path, capsys):
    cache = tmp_path / "cache"
    argv = ["cache-latents", "--model", str(tokenizer_dir), "--data", str(image_folder), "--out", str(cache)]
    assert main(argv) == 0
    line = one_line_error(capsys, argv + ["--flip"], "flip False -> True", "use another --out or delete it")
    assert "{" not in line and len(line) < 400


def test_corrupt_maetok_files_are_one_line_naming_the_file(tokenizer_dir, image_folder, latent_dir, tmp_path, capsys):
    # a truncated stats.json of a finished cache
    cache = tmp_path / "cache"
    shutil.copytree(latent_dir, cache)
    stats = cache / "stats.json"
    stats.write_text(stats.read_text()[:40])
    one_line_error(capsys, ["train-diffusion", "--config", "fashion-mnist-sit", "--latents", str(cache), "--out",
                            str(tmp_path / "sit"), *TINY_SIT, "train.steps=1"],
                   f"{stats} is not valid JSON (truncated or corrupt?", "delete it and rerun cache-latents")
    # a truncated skipped.json
    from maetok.data.latents import read_skipped

    (cache / "skipped.json").write_text("{\"skipped\": [")
    with pytest.raises(DataError, match="skipped.json is not valid JSON"):
        read_skipped(cache)
    # a corrupt cache_plan.json: a rerun cannot tell what the shards hold
    (cache / "cache_plan.json").write_bytes(b"\x00\x00")
    one_line_error(capsys, ["cache-latents", "--model", str(tokenizer_dir), "--data", str(image_folder), "--out",
                            str(cache), "--flip"], "cache_plan.json is not", f"delete {cache}")
    # a run's config.yaml that does not parse, then one that is not a mapping
    run = tmp_path / "run"
    argv = ["train-diffusion", "--config", "fashion-mnist-sit", "--latents", str(latent_dir), "--out", str(run),
            *TINY_SIT, "train.steps=2"]
    assert main(argv) == 0
    (run / "config.yaml").write_text("model: {width: [32\n")
    one_line_error(capsys, argv + ["--resume"], f"cannot parse {run / 'config.yaml'}", "pass --overwrite")
    (run / "config.yaml").write_text("- 1\n")
    one_line_error(capsys, argv + ["--resume"], f"{run / 'config.yaml'} does not hold a config")


def test_a_checkpoint_that_is_a_device_or_empty_says_what_it_is(latent_dir, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train-diffusion", "--config", "fashion-mnist-sit", "--latents", str(latent_dir), "--out", str(run),
            *TINY_SIT, "train.steps=2"]
    assert main(argv) == 0
    checkpoint = run / "checkpoints" / "last.pt"
    checkpoint.unlink()
    checkpoint.symlink_to("/dev/zero")
    line = one_line_error(capsys, argv + ["--resume"], f"cannot read checkpoint {checkpoint}: it is a device")
    assert "pickled code" not in line
    checkpoint.unlink()
    checkpoint.write_bytes(b"")
    one_line_error(capsys, argv + ["--resume"], "it is empty, not a maetok checkpoint")
