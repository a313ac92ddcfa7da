"""A full disk is one line and never leaves a file that looks finished (issue 22, point 2), and eval-gen says when
samples and reference differ in size (point 4).

Each disk case runs twice: with a simulated ``ENOSPC`` (a writer that writes part of its file, then fails as the
library does on a full disk), which always runs, and on a real tmpfs filled down to a few pages where this machine
lets the tests mount one (as root; skipped elsewhere, e.g. on CI)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, TINY_SIT, StubInception
from PIL import Image

from maetok.cli import main
from maetok.config import DiffusionTrainConfig, load_config
from maetok.data.latents import LatentDataset
from maetok.data.npz import save_sample_batch
from maetok.errors import DataError, DiskFullError
from maetok.eval.generation import eval_gen, load_samples
from maetok.runs import atomic_path, disk_full_error, save_torch, write_json
from maetok.train.diffusion import DiffusionTrainer

PAGE = 4096  # tmpfs allocates whole pages


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------


def one_line_error(capsys, command: str) -> str:
    """The error of a failed command: one line ``maetok COMMAND: error: ...`` ending its stderr (before it only
    progress bars, perhaps one left open on the same line, and warnings; no traceback)."""
    err = capsys.readouterr().err.strip().splitlines()
    prefix = f"maetok {command}: error: "
    assert not any("Traceback" in line or "internal error" in line for line in err), err
    assert err and prefix in err[-1], err
    return err[-1][err[-1].index(prefix):]


def leftover_temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def fail_after_writing(monkeypatch, owner, name: str, fail_on: int, error: Exception, path_arg: int = 1) -> list[int]:
    """Replace ``owner.name`` (a writer taking a path) by one that, on its ``fail_on``-th call, writes half a file
    to that path and raises ``error``, as a library does when the disk fills mid-write; returns the call log."""
    real = getattr(owner, name)
    calls: list[int] = []

    def writer(*args, **kwargs):
        calls.append(len(calls) + 1)
        if len(calls) == fail_on:
            target = args[path_arg]
            with open(target, "wb") if not hasattr(target, "write") else target as f:
                f.write(b"\x89PNG half a file" * 8)
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, writer)
    return calls


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs mounted on a fresh folder (16 MiB: a tiny run's checkpoint takes 4; tests fill it down with a
    filler file), or a skip where the machine does not allow mounting one."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount_point)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip() or done.returncode}")
    try:
        yield mount_point
    finally:
        unmounted = subprocess.run(["umount", str(mount_point)], capture_output=True)
        if unmounted.returncode != 0:  # busy: a file left open on it (a failed writer's, holding its space)
            subprocess.run(["umount", "-l", str(mount_point)])
            pytest.fail(f"the tmpfs stayed busy: {unmounted.stderr.decode().strip()}")


def report_free_space(monkeypatch, free: int) -> None:
    """Every folder's disk reports ``free`` bytes free."""
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(1 << 20, (1 << 20) - free, free))


def fill_disk(mount_point: Path, leave_bytes: int) -> Path:
    """Fill the tmpfs so that about ``leave_bytes`` stay free; returns the filler file (delete it to free the disk)."""
    filler = mount_point / "filler"
    free = shutil.disk_usage(mount_point).free
    filler.write_bytes(b"\0" * max(0, free - leave_bytes))
    return filler


# ---------------------------------------------------------------------------------------------------------
# the atomic writer itself
# ---------------------------------------------------------------------------------------------------------


def test_a_failed_write_leaves_the_earlier_file_and_no_temporary(tmp_path):
    target = tmp_path / "result.json"
    write_json(target, {"a": 1})
    with pytest.raises(ZeroDivisionError):
        with atomic_path(target) as tmp:
            tmp.write_text('{"a": 2, "half')
            1 / 0
    assert json.loads(target.read_text()) == {"a": 1} and leftover_temporaries(tmp_path) == []
    with pytest.raises(DiskFullError, match=r"no space left on the disk of .* \(1\.0 KiB needed, .* free\)"):
        with atomic_path(target, needed_bytes=1024) as tmp:
            tmp.write_text('{"a": 3, "half')
            raise OSError(errno.ENOSPC, "No space left on device")
    assert json.loads(target.read_text()) == {"a": 1} and leftover_temporaries(tmp_path) == []


def test_a_written_file_has_the_permissions_of_a_plain_write(tmp_path):
    plain = tmp_path / "plain.json"
    plain.write_text("{}")
    assert os.stat(write_json(tmp_path / "atomic.json", {})).st_mode == os.stat(plain).st_mode


def test_a_full_disk_outside_the_atomic_writer_is_one_line_too(tmp_path, monkeypatch, capsys):
    from maetok import cli

    def full(args):  # e.g. TensorBoard's event file, appended as TensorBoard writes it
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "tensorboard" / "events"))

    monkeypatch.setitem(cli.COMMANDS, "info", full)
    assert main(["info"]) == 2
    assert f"no space left on the disk of {tmp_path / 'tensorboard'}" in one_line_error(capsys, "info")


def test_full_disk_errors_in_the_words_of_torch_and_safetensors_are_recognised(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    quota = OSError(errno.EDQUOT, "Disk quota exceeded")
    assert isinstance(disk_full_error(quota), DiskFullError)
    assert isinstance(disk_full_error(SafetensorError("Error while serializing: I/O error: No space left on device "
                                                      "(os error 28)"), tmp_path), DiskFullError)
    torch_words = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    assert disk_full_error(torch_words, tmp_path) is None  # a folder with room: torch's error is not a full disk
    assert disk_full_error(ValueError("a bug"), tmp_path) is None and disk_full_error(KeyboardInterrupt()) is None
    report_free_space(monkeypatch, 0)
    assert "0 B free" in str(disk_full_error(torch_words, tmp_path))  # ... but it is on a full one


# ---------------------------------------------------------------------------------------------------------
# train-tokenizer: a checkpoint on a full disk
# ---------------------------------------------------------------------------------------------------------


def train_tokenizer(image_folder, out: Path, steps: int, *extra: str) -> int:
    return main(["train-tokenizer", "--config", "fashion-mnist-maetok", "--data", str(image_folder), "--out", str(out),
                 *extra, *TINY, f"train.steps={steps}", "train.eval_every=100"])


def test_checkpoint_on_a_full_disk_is_one_line_and_keeps_the_earlier_checkpoint(image_folder, tmp_path, monkeypatch,
                                                                               capsys):
    run = tmp_path / "run"
    disk_full = OSError(errno.ENOSPC, "No space left on device")
    calls = fail_after_writing(monkeypatch, torch, "save", fail_on=2, error=disk_full)
    assert train_tokenizer(image_folder, run, 4) == 2
    assert len(calls) == 2  # the step-2 checkpoint was written, the step-4 one failed
    line = one_line_error(capsys, "train-tokenizer")
    assert f"no space left on the disk of {run / 'checkpoints'}" in line and "needed" in line
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 2  # the earlier one, intact
    assert leftover_temporaries(run) == [] and not (run / "model").exists()


def test_checkpoint_on_a_real_full_disk(image_folder, small_disk, capsys):
    run = small_disk / "run"
    assert train_tokenizer(image_folder, run, 2) == 0  # fits: config, log, the step-2 checkpoint, the model
    capsys.readouterr()
    checkpoint = run / "checkpoints" / "last.pt"
    before = checkpoint.read_bytes()
    fill_disk(small_disk, len(before) // 2)  # room for half a checkpoint
    assert train_tokenizer(image_folder, run, 4, "--resume", "--allow-config-change") == 2
    line = one_line_error(capsys, "train-tokenizer")
    assert "no space left on the disk of" in line and str(run) in line
    assert checkpoint.read_bytes() == before and leftover_temporaries(run) == []


# ---------------------------------------------------------------------------------------------------------
# cache-latents: a shard on a full disk
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def small_shards(monkeypatch):
    """cache-latents writes shards of 7 items (4 shards for the 22 files of ``image_folder``)."""
    import functools

    from maetok import encode

    monkeypatch.setattr(encode, "cache_latents", functools.partial(encode.cache_latents, shard_size=7))


def cache(tokenizer_dir, image_folder, out: Path) -> int:
    return main(["cache-latents", "--model", str(tokenizer_dir), "--data", str(image_folder), "--split", "all",
                 "--out", str(out)])


def finished_shards(out: Path) -> list[Path]:
    shards = sorted(out.glob("shard-*.safetensors"))
    from safetensors.torch import load_file

    for shard in shards:
        load_file(str(shard))  # every shard under its final name reads whole
    return shards


def test_cache_latents_on_a_full_disk_is_one_line_and_resumes(tokenizer_dir, image_folder, tmp_path, small_shards,
                                                               monkeypatch, capsys):
    import safetensors.torch
    from safetensors import SafetensorError

    from maetok.data import latents

    out = tmp_path / "cache"
    full = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    real_save_file = safetensors.torch.save_file
    fail_after_writing(monkeypatch, safetensors.torch, "save_file", fail_on=3, error=full)
    if hasattr(latents, "save_file"):  # the module's own name for it, where it has one
        monkeypatch.setattr(latents, "save_file", safetensors.torch.save_file)
    assert cache(tokenizer_dir, image_folder, out) == 2
    assert "no space left on the disk of" in one_line_error(capsys, "cache-latents")
    assert len(finished_shards(out)) == 2 and not (out / "stats.json").exists() and leftover_temporaries(out) == []
    monkeypatch.setattr(safetensors.torch, "save_file", real_save_file)
    monkeypatch.setattr(latents, "save_file", real_save_file, raising=False)
    assert cache(tokenizer_dir, image_folder, out) == 0  # the disk freed: the same command completes the cache
    assert len(LatentDataset(out)) == 20


def test_cache_latents_on_a_real_full_disk(tokenizer_dir, image_folder, small_disk, small_shards, capsys):
    out = small_disk / "cache"
    filler = fill_disk(small_disk, 2 * PAGE)  # the plan and a shard or two
    assert cache(tokenizer_dir, image_folder, out) == 2
    assert "no space left on the disk of" in one_line_error(capsys, "cache-latents")
    assert len(finished_shards(out)) < 4 and not (out / "stats.json").exists() and leftover_temporaries(out) == []
    filler.unlink()
    assert cache(tokenizer_dir, image_folder, out) == 0
    assert len(LatentDataset(out)) == 20


# ---------------------------------------------------------------------------------------------------------
# sample: PNGs and samples.npz on a full disk; eval-gen refuses what an interrupted run left
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sit_run(latent_dir, tmp_path_factory):
    cfg = load_config(DiffusionTrainConfig, "fashion-mnist-sit", TINY_SIT + [f"latents={latent_dir}", "train.steps=2"])
    out = tmp_path_factory.mktemp("sit") / "run"
    DiffusionTrainer(cfg, out).fit()
    return out


def sample(sit_run, out: Path, num: int) -> int:
    return main(["sample", "--model", str(sit_run), "--num", str(num), "--out", str(out), "--steps", "2",
                 "--sampler", "euler"])


def assert_whole_pngs(out: Path) -> int:
    """Every PNG under ``out/images`` decodes whole (no 0-byte or cut file under a final name); returns the count."""
    pngs = sorted((out / "images").glob("*.png")) if (out / "images").is_dir() else []
    for png in pngs:
        with Image.open(png) as image:
            image.load()
    return len(pngs)


def test_sample_on_a_full_disk_is_one_line_and_eval_gen_refuses_the_folder(sit_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "samples"
    disk_full = OSError(errno.ENOSPC, "No space left on device")
    fail_after_writing(monkeypatch, Image.Image, "save", fail_on=3, error=disk_full)
    assert sample(sit_run, out, 5) == 2
    assert "no space left on the disk of" in one_line_error(capsys, "sample")
    assert assert_whole_pngs(out) == 2 and not (out / "samples.npz").exists() and leftover_temporaries(out) == []
    monkeypatch.undo()
    for samples in (out, out / "images"):
        assert main(["eval-gen", "--samples", str(samples), "--ref", "fashion-mnist"]) == 2
        line = one_line_error(capsys, "eval-gen")
        assert "interrupted `maetok sample` run of 5 samples: 2 of 5 PNGs written, samples.npz missing" in line
        assert f"--out {out}" in line
    assert sample(sit_run, out, 5) == 0  # completed by the same command
    assert assert_whole_pngs(out) == 5 and len(load_samples(out)[0]) == 5


def test_samples_npz_on_a_full_disk_leaves_no_npz_and_the_earlier_one_is_not_trusted(sit_run, tmp_path, monkeypatch,
                                                                                       capsys):
    out = tmp_path / "samples"
    assert sample(sit_run, out, 4) == 0
    earlier = (out / "samples.npz").read_bytes()
    fail_after_writing(monkeypatch, np, "savez", fail_on=1, error=OSError(errno.ENOSPC, "No space left on device"),
                       path_arg=0)
    assert sample(sit_run, out, 3) == 2
    assert "no space left on the disk of" in one_line_error(capsys, "sample")
    assert (out / "samples.npz").read_bytes() == earlier and leftover_temporaries(out) == []
    with pytest.raises(DataError, match="3 of 3 PNGs written, samples.npz present but unconfirmed"):
        load_samples(out / "samples.npz")


def test_a_rerun_with_fewer_samples_removes_its_stale_pngs_and_keeps_user_files(sit_run, tmp_path):
    out = tmp_path / "samples"
    assert sample(sit_run, out, 5) == 0
    (out / "images" / "mine.png").write_bytes((out / "images" / "000000.png").read_bytes())
    (out / "notes.txt").write_text("mine")
    assert sample(sit_run, out, 3) == 0
    names = sorted(p.name for p in (out / "images").iterdir())
    assert names == ["000000.png", "000001.png", "000002.png", "mine.png"] and (out / "notes.txt").exists()
    manifest = json.loads((out / "samples.json").read_text())
    assert manifest["complete"] and manifest["num_samples"] == manifest["num_png"] == 3
    assert len(load_samples(out)[0]) == 3


def test_sample_on_a_real_full_disk(sit_run, small_disk, capsys):
    out = small_disk / "samples"
    fill_disk(small_disk, 3 * PAGE)  # the manifest and a PNG or two
    assert sample(sit_run, out, 6) == 2
    assert "no space left on the disk of" in one_line_error(capsys, "sample")
    written = assert_whole_pngs(out)
    assert written < 6 and not (out / "samples.npz").exists() and leftover_temporaries(out) == []
    assert main(["eval-gen", "--samples", str(out), "--ref", "fashion-mnist"]) == 2
    assert f"{written} of 6 PNGs written" in one_line_error(capsys, "eval-gen")


def test_a_folder_of_the_users_own_pngs_is_still_scored(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    images, labels, source = load_samples(tmp_path)
    assert images.shape == (3, 8, 8, 3) and labels is None and "3 image files" in source


# ---------------------------------------------------------------------------------------------------------
# eval-gen: samples and reference of different sizes (point 4)
# ---------------------------------------------------------------------------------------------------------


def test_eval_gen_says_when_samples_and_reference_differ_in_size(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(0)
    save_sample_batch(tmp_path / "samples.npz", rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8))
    save_sample_batch(tmp_path / "ref.npz", rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8))
    save_sample_batch(tmp_path / "ref16.npz", rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8))
    stub = StubInception()
    result = eval_gen(tmp_path / "samples.npz", str(tmp_path / "ref.npz"), inception=stub, progress=False)
    note = "the samples are 16x16, the reference images 8x8: the Inception network resizes both to 299x299"
    assert result["size_note"].startswith(note) and result["size_note"] in result["notes"]
    same = eval_gen(tmp_path / "samples.npz", str(tmp_path / "ref16.npz"), inception=stub, progress=False)
    assert "size_note" not in same and not any("resizes" in n for n in same["notes"])
    from maetok.eval import inception

    monkeypatch.setattr(inception, "load_fid_network", lambda *args: (stub, None))
    assert main(["eval-gen", "--samples", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref.npz"),
                 "--json", str(tmp_path / "gen.json")]) == 0
    assert f"maetok eval-gen: note: {note}" in capsys.readouterr().err
    assert json.loads((tmp_path / "gen.json").read_text())["size_note"].startswith(note)


def test_save_torch_on_a_full_disk_names_the_size_it_needed(tmp_path, monkeypatch):
    fail_after_writing(monkeypatch, torch, "save", fail_on=1, error=RuntimeError("unexpected pos 704 vs 598"))
    report_free_space(monkeypatch, 512)
    with pytest.raises(DiskFullError, match=r"\(4\.0 KiB needed, 512 B free\)"):
        save_torch({"weights": torch.zeros(1024)}, tmp_path / "x.pt")
    assert list(tmp_path.iterdir()) == []
