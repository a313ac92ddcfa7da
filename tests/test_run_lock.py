"""One run per folder, stopped runs and silent processes (issue 22, points 1 and 4): a folder another process writes
into is refused in one line naming its PID (two real processes; ``kill -9`` leaves no stale lock), ``--resume``
compares with the config stored in the checkpoint, an output folder overlapping the data folder is refused, SIGINT /
SIGTERM end a training run with one line saying what is kept and how to continue, and a frozen rank of a 2-process
gloo job ends the other with a line naming it after ``train.collective_timeout_s``."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, TINY_SIT, tiny_cfg

from maetok.cli import main
from maetok.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
#: a training command's subprocess: ``python DRIVER SECONDS ARGV...`` runs ``maetok ARGV`` with a sleep before each
#: step, so that the test can act while it trains
DRIVER = """
import sys, time
from maetok.train.diffusion import DiffusionTrainer
real_step = DiffusionTrainer.train_step
def slow_step(self, batch):
    time.sleep(float(sys.argv[1]))
    return real_step(self, batch)
DiffusionTrainer.train_step = slow_step
from maetok.cli import main
sys.exit(main(sys.argv[2:]))
"""
#: a process that holds a folder the way every writing command does, until killed
HOLDER = """
import sys, time
from maetok.runs import hold_folder
hold = hold_folder(sys.argv[1], "holding for a test")
print("held", flush=True)
time.sleep(600)
"""


def environment(**extra: str) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                OMP_NUM_THREADS="1", **extra)


def sit_argv(latent_dir: Path, out: Path, *extra: str) -> list[str]:
    """``train-diffusion`` of a tiny SiT; ``extra``: flags (``--resume``, ``--device cpu``) and overrides."""
    flags = [word for i, word in enumerate(extra) if word.startswith("--") or (i and extra[i - 1] == "--device")]
    overrides = [word for word in extra if word not in flags]
    return ["train-diffusion", "--config", "fashion-mnist-sit", "--latents", str(latent_dir), "--out", str(out),
            *flags, *TINY_SIT, "train.eval_every=100000", *overrides]


def start_training(tmp_path: Path, argv: list[str], seconds_per_step: float = 0.05, **env: str) -> subprocess.Popen:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    return subprocess.Popen([sys.executable, str(driver), str(seconds_per_step), *argv], env=environment(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"the process ended ({process.returncode}) before {path} appeared: "
                                 f"{process.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout} s"
        time.sleep(0.1)


def hold_in_another_process(folder: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], env=environment(), stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_line_error(capsys, argv: list[str], *expected: str) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in err, err
    return err


# ---------------------------------------------------------------------------------------------------------
# one process per folder
# ---------------------------------------------------------------------------------------------------------


def test_a_folder_in_training_is_refused_to_every_other_command_and_kill_9_leaves_no_stale_lock(
        latent_dir, tokenizer_dir, image_folder, tmp_path, capsys):
    run = tmp_path / "run"
    training = start_training(tmp_path, sit_argv(latent_dir, run, "train.steps=100000", "train.ckpt_every=2"))
    try:
        wait_for(run / "checkpoints" / "last.pt", training)
        holder = f"pid {training.pid}"
        # the same run again, resumed, or overwritten: refused, and nothing of the running one is touched
        for flags in ([], ["--resume"], ["--overwrite"]):
            one_line_error(capsys, sit_argv(latent_dir, run, "train.steps=4", *flags), str(run), "in use by another",
                           holder)
            assert (run / "config.yaml").exists() and (run / "checkpoints" / "last.pt").exists()
        one_line_error(capsys, ["train-tokenizer", "--config", "fashion-mnist-maetok", "--data", str(image_folder),
                                "--out", str(run), "--overwrite", *TINY], holder)
        one_line_error(capsys, ["cache-latents", "--model", str(tokenizer_dir), "--data", str(image_folder),
                                "--split", "all", "--out", str(run)], holder)
        assert not (run / "cache_plan.json").exists()
        assert training.poll() is None  # still training
    finally:
        training.send_signal(signal.SIGKILL)
        training.wait()
    # killed with -9: its lock died with it, and its run resumes
    assert (run / ".maetok.lock").exists()  # the file is left; no process holds it
    steps = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] + 2
    assert main(sit_argv(latent_dir, run, "--resume", "--allow-config-change", f"train.steps={steps}")) == 0
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == steps
    assert not (run / ".maetok.lock").exists()  # a run that ended lets its folder go


def test_every_rank_of_a_job_is_refused_a_held_folder(latent_dir, tmp_path):
    """Under torchrun rank 0 holds the run directory for the job; when another process holds it, every rank ends
    with the line (none is left waiting in a collective)."""
    run = tmp_path / "run"
    holder = hold_in_another_process(run)
    try:
        port = str(free_port())
        ranks = [start_training(tmp_path, sit_argv(latent_dir, run, "train.steps=2", "--device", "cpu"), 0,
                                MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2", RANK=str(rank),
                                LOCAL_RANK=str(rank)) for rank in (0, 1)]
        errors = [process.communicate(timeout=120)[1] for process in ranks]
    finally:
        holder.kill()
        holder.wait()
    for process, err in zip(ranks, errors):
        assert process.returncode == 2, err[-3000:]
        assert "in use by another maetok process" in err and f"pid {holder.pid}" in err and "Traceback" not in err


def test_finetune_sample_and_cache_refuse_a_held_folder_before_reading_it(
        latent_dir, tokenizer_dir, image_folder, tmp_path, capsys):
    out = tmp_path / "out"
    holder = hold_in_another_process(out)
    try:
        expected = (f"pid {holder.pid}", "holding for a test")
        one_line_error(capsys, ["finetune-decoder", "--from", str(tokenizer_dir), "--out", str(out), *TINY], *expected)
        one_line_error(capsys, ["sample", "--model", str(latent_dir), "--num", "2", "--out", str(out)], *expected)
        one_line_error(capsys, ["cache-latents", "--model", str(tokenizer_dir), "--data", str(image_folder),
                                "--split", "all", "--out", str(out)], *expected)
        assert sorted(p.name for p in out.iterdir()) == [".maetok.lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()


def test_a_latent_cache_in_writing_is_held_against_other_processes(tokenizer_dir, image_folder, tmp_path):
    from maetok import encode
    from maetok.data import build_dataset
    from maetok.models.tokenizer import MAETok

    cache = tmp_path / "cache"
    dataset = build_dataset(str(image_folder), "all", 16, 3)
    seen: list[str] = []
    real_iter = encode.iter_batches

    def probe_then_encode(*args, **kwargs):  # while the first shard is encoded: another process tries the folder
        if not seen:
            probe = subprocess.run([sys.executable, "-c", HOLDER, str(cache)], env=environment(), capture_output=True,
                                   text=True, timeout=120)
            seen.append(probe.stderr)
        return real_iter(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("maetok.encode.iter_batches", probe_then_encode)
        encode.cache_latents(MAETok.from_pretrained(tokenizer_dir), dataset, cache, tokenizer_dir, shard_size=7,
                             progress=False)
    assert "in use by another maetok process" in seen[0] and f"pid {os.getpid()}, caching latents" in seen[0]
    assert not (cache / ".maetok.lock").exists()  # a finished cache lets its folder go
    hold_in_another_process(cache).kill()  # and another process may take it


def test_resume_compares_with_the_config_the_checkpoint_was_trained_with(latent_dir, tmp_path, capsys):
    """The folder holds one run's config.yaml and another run's checkpoint: resuming under config.yaml's config
    would continue the other run's weights under a config they were not trained with."""
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(sit_argv(latent_dir, first, "train.steps=2")) == 0
    assert main(sit_argv(latent_dir, second, "train.steps=4", "optim.lr=0.003")) == 0
    (second / "config.yaml").write_text((first / "config.yaml").read_text())  # the mixture
    (second / "model" / "config.json").unlink()  # unfinished, as when the first was stopped
    one_line_error(capsys, sit_argv(latent_dir, second, "train.steps=2", "--resume"),
                   str(second / "checkpoints" / "last.pt"), "optim.lr: 0.003 -> 0.001", "--allow-config-change")
    # the checkpoint's own config resumes (printing that config.yaml differs), and the flag accepts a change
    assert main(sit_argv(latent_dir, second, "train.steps=4", "optim.lr=0.003", "--resume",
                         "--allow-config-change")) == 0


def test_an_output_folder_overlapping_the_data_folder_is_refused(tokenizer_dir, image_folder, tmp_path, capsys):
    from maetok.train.tokenizer import TokenizerTrainer

    inside = image_folder / "run"
    one_line_error(capsys, ["train-tokenizer", "--config", "fashion-mnist-maetok", "--data", str(image_folder),
                            "--out", str(inside), *TINY], str(inside), str(image_folder), "overlap")
    one_line_error(capsys, ["cache-latents", "--model", str(tokenizer_dir), "--data", str(image_folder), "--split",
                            "all", "--out", str(image_folder)], "overlap")
    one_line_error(capsys, ["demo", "--quick", "--data", str(image_folder), "--out", str(image_folder.parent)],
                   "overlap")
    with pytest.raises(ConfigError, match="overlap"):  # the trainers refuse it too (the demo, the study)
        TokenizerTrainer(tiny_cfg(image_folder), image_folder / "sub" / "run")
    assert not inside.exists() and not (image_folder / "sub").exists()


# ---------------------------------------------------------------------------------------------------------
# SIGINT / SIGTERM, silent processes
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("signal_number, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stop_signal_ends_training_with_one_line_and_the_run_resumes(latent_dir, tmp_path, signal_number, status,
                                                                        capsys):
    run = tmp_path / "run"
    training = start_training(tmp_path, sit_argv(latent_dir, run, "train.steps=12", "train.ckpt_every=2"), 0.2)
    wait_for(run / "checkpoints" / "last.pt", training)
    training.send_signal(signal_number)
    _, err = training.communicate(timeout=60)
    assert training.returncode == status, err[-3000:]
    last = [line for line in err.splitlines() if line.startswith("maetok train-diffusion:")]
    assert len(last) == 1 and "Traceback" not in err, err[-3000:]
    kept = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"]
    assert f"stopped by {signal_number.name}" in last[0]
    assert f"{run / 'checkpoints' / 'last.pt'} (step {kept}) is kept" in last[0]
    command = last[0].split("continue with: ")[1].split()
    assert command[:2] == ["maetok", "train-diffusion"] and command[-1] == "--resume"
    capsys.readouterr()
    assert main(command[1:]) == 0
    assert f"at step {kept}" in capsys.readouterr().out
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 12


def test_collective_timeout_must_be_positive(capsys):
    one_line_error(capsys, ["info", "--config", "fashion-mnist-sit", "train.collective_timeout_s=0"],
                   "train.collective_timeout_s must be > 0")


def test_a_frozen_rank_ends_the_others_with_a_line_naming_it(latent_dir, tmp_path):
    run = tmp_path / "run"
    argv = sit_argv(latent_dir, run, "train.steps=100000", "train.ckpt_every=2", "train.collective_timeout_s=5",
                    "--device", "cpu")
    port = str(free_port())
    ranks = [start_training(tmp_path, argv, 0.02, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2",
                            RANK=str(rank), LOCAL_RANK=str(rank)) for rank in (0, 1)]
    try:
        wait_for(run / "checkpoints" / "last.pt", ranks[0])
        ranks[1].send_signal(signal.SIGSTOP)
        started = time.monotonic()
        _, err = ranks[0].communicate(timeout=60)
        waited = time.monotonic() - started
    finally:
        for process in ranks:
            process.kill()
            process.wait()
    assert ranks[0].returncode == 2, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert "Traceback" not in err and line.startswith("maetok train-diffusion: error:"), err[-3000:]
    assert "rank 1 of 2 did not answer for 5 s" in line and "train.collective_timeout_s" in line
    assert "is kept" in line and 5 <= waited < 40
