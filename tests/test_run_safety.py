"""What a run promises (issue 12, items 2-4): non-finite steps are skipped and never saved, a finished run is never
overwritten, a resumed run never changes its config silently, and every bad input is one line (exit 2)."""

from __future__ import annotations

import hashlib

import pytest
import torch
import yaml
from conftest import TINY, TINY_SIT

from maetok.cli import main
from maetok.config import ConfigError, DiffusionTrainConfig, TokenizerTrainConfig, load_config
from maetok import cli
from maetok.errors import DataError, MaetokError, NonFiniteError
from maetok.model_folders import save_model_folder
from maetok.runs import check_finite_tensors, resolve_device
from maetok.train import diffusion as diffusion_training
from maetok.train.diffusion import DiffusionTrainer
from maetok.train.loop import config_changes

# ---------------------------------------------------------------------------------------------------------
# non-finite losses
# ---------------------------------------------------------------------------------------------------------


def sit_cfg(latent_dir, *extra: str) -> DiffusionTrainConfig:
    return load_config(DiffusionTrainConfig, "fashion-mnist-sit", TINY_SIT + [f"latents={latent_dir}", *extra])


def poison_loss(monkeypatch, bad_steps: set[int]) -> list[int]:
    """Make the diffusion loss NaN at the given 1-based steps (counted by calls); returns the call log."""
    calls: list[int] = []
    real = diffusion_training.training_loss

    def loss(*args, **kwargs):
        loss, logs = real(*args, **kwargs)
        calls.append(len(calls) + 1)
        return (loss * float("nan"), logs) if len(calls) in bad_steps else (loss, logs)

    monkeypatch.setattr(diffusion_training, "training_loss", loss)
    return calls


def test_nonfinite_steps_are_skipped_and_leave_weights_and_ema_untouched(latent_dir, tmp_path, monkeypatch, capsys):
    cfg = sit_cfg(latent_dir, "train.steps=4", "train.ema_decay=0.9")
    trainer = DiffusionTrainer(cfg, tmp_path / "run")
    poison_loss(monkeypatch, {2, 3})
    snapshots = []
    real_step = trainer.train_step

    def step_and_snapshot(batch):
        logs = real_step(batch)
        snapshots.append(({k: v.clone() for k, v in trainer.model.state_dict().items()},
                          {k: v.clone() for k, v in trainer.ema.state_dict().items()}, logs["skipped"]))
        return logs

    trainer.train_step = step_and_snapshot
    trainer.fit()
    assert [s[2] for s in snapshots] == [0.0, 1.0, 1.0, 0.0]
    for k in snapshots[0][0]:  # steps 2 and 3 changed nothing: no update, no EMA step
        assert torch.equal(snapshots[0][0][k], snapshots[2][0][k]) and torch.equal(snapshots[0][1][k], snapshots[2][1][k])
    assert any(not torch.equal(snapshots[2][0][k], snapshots[3][0][k]) for k in snapshots[0][0])
    check_finite_tensors(trainer.model.state_dict(), "trained model")  # finished and finite
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()
    assert "step 2: non-finite loss or gradients" in capsys.readouterr().out


def test_nonfinite_steps_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(latent_dir, tmp_path, monkeypatch):
    cfg = sit_cfg(latent_dir, "train.steps=8", "train.ckpt_every=2", "train.max_nonfinite_steps=3")
    run = tmp_path / "run"
    trainer = DiffusionTrainer(cfg, run)
    poison_loss(monkeypatch, set(range(3, 100)))
    with pytest.raises(NonFiniteError, match=r"NaN / inf in 3 steps in a row .*last\.pt is intact"):
        trainer.fit()
    checkpoint = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["step"] == 4  # written after steps 2 and 4 (step 4 was skipped, its weights are step 2's)
    check_finite_tensors(checkpoint["model"], "checkpoint")
    assert not (run / "model").exists()  # an unfinished run exports nothing


def test_a_nonfinite_model_is_never_written(tmp_path):
    state = {"w": torch.tensor([1.0, float("nan")]), "b": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"non-finite values .* in 1 tensor\(s\), e.g. w"):
        save_model_folder(tmp_path / "m", "tokenizer", {}, state)
    assert not (tmp_path / "m" / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------------------
# run directories
# ---------------------------------------------------------------------------------------------------------


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train_sit(latent_dir, out, *flags: str, overrides: tuple[str, ...] = ()) -> int:
    return main(["train-diffusion", "--config", "fashion-mnist-sit", "--latents", str(latent_dir), "--out", str(out),
                 *flags, *TINY_SIT, "train.steps=2", *overrides])


def test_a_finished_run_is_never_overwritten_without_a_flag(latent_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_sit(latent_dir, run) == 0
    files = [run / "model" / "model.safetensors", run / "checkpoints" / "last.pt", run / "log.csv", run / "config.yaml"]
    before = [digest(f) for f in files]
    capsys.readouterr()
    assert train_sit(latent_dir, run) == 2
    err = capsys.readouterr().err.strip()
    assert "already holds a finished run" in err and "--resume" in err and "--overwrite" in err
    assert len(err.splitlines()) == 1 and [digest(f) for f in files] == before
    # --overwrite deletes the old run first: a stray file of it is gone, the new run is complete
    (run / "stray.txt").write_text("old")
    assert train_sit(latent_dir, run, "--overwrite") == 0
    assert not (run / "stray.txt").exists() and (run / "model" / "config.json").exists()
    assert train_sit(latent_dir, run, "--resume", "--overwrite") == 2


def test_resume_with_a_changed_config_prints_it_and_needs_a_flag(latent_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_sit(latent_dir, run) == 0
    capsys.readouterr()
    # bookkeeping keys (logging / checkpoint periods, workers) change no number: accepted, printed
    assert train_sit(latent_dir, run, "--resume", overrides=("train.log_every=2",)) == 0
    assert "train.log_every: 1 -> 2" in capsys.readouterr().out
    assert train_sit(latent_dir, run, "--resume", overrides=("train.batch_size=4", "optim.lr=0.002")) == 2
    captured = capsys.readouterr()
    assert "train.batch_size: 8 -> 4" in captured.out and "optim.lr: 0.001 -> 0.002" in captured.out
    assert "--allow-config-change" in captured.err and len(captured.err.strip().splitlines()) == 1
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["batch_size"] == 8  # untouched
    overrides = ("train.batch_size=4", "optim.lr=0.002", "train.steps=3")
    assert train_sit(latent_dir, run, "--resume", "--allow-config-change", overrides=overrides) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] == 0.002
    kept = yaml.safe_load((run / "config.step2.yaml").read_text())  # the config it ran under before
    assert kept["optim"]["lr"] == 0.001 and kept["train"]["batch_size"] == 8
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 3
    # the model's shape never changes, flag or not
    one_line_error(capsys, ["train-diffusion", "--config", "fashion-mnist-sit", "--latents", str(latent_dir), "--out",
                            str(run), "--resume", "--allow-config-change", *TINY_SIT, "train.steps=4", "model.width=64"],
                   "cannot resume: the config changes the model's shape", "mis-shaped")


def test_config_changes_lists_dotted_keys():
    assert config_changes({"a": {"b": 1, "c": [1]}}, {"a": {"b": 2, "c": [1]}, "d": 0}) == [("a.b", 1, 2), ("d", None, 0)]


# ---------------------------------------------------------------------------------------------------------
# bad inputs: one line, exit 2
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, key", [
    ("train.batch_size=0", "train.batch_size"), ("train.batch_size=-4", "train.batch_size"),
    ("train.ckpt_every=0", "train.ckpt_every"), ("train.log_every=0", "train.log_every"),
    ("train.steps=0", "train.steps"), ("train.steps=-5", "train.steps"), ("optim.lr=0", "optim.lr"),
    ("train.max_nonfinite_steps=0", "train.max_nonfinite_steps"), ("finetune.steps=0", "finetune.steps"),
])
def test_bad_config_values_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"^{key}"):
        load_config(TokenizerTrainConfig, "fashion-mnist-maetok", [override])
    if not override.startswith("finetune"):
        with pytest.raises(ConfigError, match=rf"^{key}"):
            load_config(DiffusionTrainConfig, "fashion-mnist-sit", [override])


def one_line_error(capsys, argv: list[str], *expected: str) -> None:
    capsys.readouterr()
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("maetok ")]  # (key lists may precede it)
    assert len(errors) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in errors[0], (text, errors[0])


def test_bad_inputs_get_one_line(image_folder, tokenizer_dir, latent_dir, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    one_line_error(capsys, ["train-tokenizer", "--config", "fashion-mnist-maetok", "--data", str(image_folder),
                            "--out", str(tmp_path / "t"), "train.steps=0"], "train.steps must be >= 1, got 0")
    for argv in (
        ["train-tokenizer", "--config", "fashion-mnist-maetok", "--data", str(image_folder)],
        ["reconstruct", "--model", str(tokenizer_dir), "--input", str(image_folder)],
        ["cache-latents", "--model", str(tokenizer_dir), "--data", str(image_folder)],
        ["train-diffusion", "--config", "fashion-mnist-sit", "--latents", str(latent_dir)],
    ):
        one_line_error(capsys, argv + ["--out", str(a_file)], f"--out {a_file} is an existing file")
    one_line_error(capsys, ["reconstruct", "--model", str(tokenizer_dir), "--input", str(image_folder), "--out",
                            str(tmp_path / "r"), "--device", "nonsense"], "--device 'nonsense' is not a device")
    if not torch.cuda.is_available():
        one_line_error(capsys, ["reconstruct", "--model", str(tokenizer_dir), "--input", str(image_folder), "--out",
                                str(tmp_path / "r"), "--device", "cuda"], "--device cuda: no CUDA GPU is available")
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda:0")


def test_truncated_and_pickled_checkpoints_get_one_line(latent_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train-diffusion", "--config", "fashion-mnist-sit", "--latents", str(latent_dir), "--out", str(run),
                 *TINY_SIT, "train.steps=2"]) == 0
    checkpoint = run / "checkpoints" / "last.pt"
    resume = ["train-diffusion", "--config", "fashion-mnist-sit", "--latents", str(latent_dir), "--out", str(run),
              "--resume", *TINY_SIT, "train.steps=2"]
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[: len(data) // 2])
    one_line_error(capsys, resume, f"cannot read checkpoint {checkpoint}", "truncated")

    class Payload:  # what an attacker's pickle would carry: weights_only refuses to build it
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"step": 1, "model": {}, "payload": Payload()}, checkpoint)
    one_line_error(capsys, resume, f"checkpoint {checkpoint} was refused", "it references print")


def test_tokenizer_run_refuses_a_rerun_too(image_folder, tmp_path, capsys):
    """The tokenizer trainer shares the run-directory rules (checked before any data or model is built)."""
    argv = ["train-tokenizer", "--config", "fashion-mnist-maetok", "--data", str(image_folder), "--out",
            str(tmp_path / "tok"), *TINY, "train.steps=1"]
    assert main(argv) == 0
    one_line_error(capsys, argv, "already holds a finished run")


def test_a_nonfinite_model_folder_is_never_loaded(tokenizer_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from maetok.models.tokenizer import MAETok

    broken = tmp_path / "tok"
    broken.mkdir()
    (broken / "config.json").write_text((tokenizer_dir / "config.json").read_text())
    state = load_file(str(tokenizer_dir / "model.safetensors"))
    name = sorted(state)[0]
    state[name] = torch.full_like(state[name], float("inf"))
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match=rf"non-finite values .* e.g. {name}"):
        MAETok.from_pretrained(broken)
    one_line_error(capsys, ["reconstruct", "--model", str(broken), "--input", str(tmp_path), "--out",
                            str(tmp_path / "r")], "non-finite values", "the model diverged")


@pytest.mark.parametrize("argv", [
    ["cache-latents", "--model", "m", "--data", "d", "--out", "o", "--batch-size", "0"],
    ["reconstruct", "--model", "m", "--input", "i", "--out", "o", "--batch-size", "-4"],
    ["sample", "--model", "m", "--num", "0", "--out", "o"],
    ["sample", "--model", "m", "--num", "2", "--out", "o", "--steps", "0"],
    ["eval-recon", "--model", "m", "--data", "d", "--num", "0"],
])
def test_counts_on_the_command_line_must_be_positive(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and "must be >= 1" in capsys.readouterr().err


def test_a_nonfinite_discriminator_step_is_skipped(image_folder):
    """NaN images (a diverging tokenizer) reach the discriminator: no LeCAM anchor update, no update."""
    from conftest import tiny_discriminator

    from maetok.global_batch import SampleRandom
    from maetok.losses.adversarial import AdversarialLoss

    adversarial = AdversarialLoss(tiny_discriminator(0), start_step=0, lr=1e-2)
    real = torch.rand(2, 3, 16, 16) * 2 - 1

    def tensors() -> dict[str, torch.Tensor]:
        """Discriminator weights and LeCAM anchors; not the spectral norm's power-iteration vectors (``_u``, ``_v``),
        which advance on every forward pass from the weights alone."""
        state = dict(adversarial.named_buffers()) | dict(adversarial.named_parameters())
        assert all(torch.isfinite(v).all() for v in state.values())
        return {k: v.detach().clone() for k, v in state.items() if not k.endswith(("._u", "._v"))}

    before = tensors()
    logs = adversarial.discriminator_step(real, torch.full_like(real, float("nan")), step=1,
                                          draws=SampleRandom.for_batch(0, 1, 2))
    assert logs["adv/skipped"] == 1.0 and all(torch.equal(before[k], v) for k, v in tensors().items())
    logs = adversarial.discriminator_step(real, real.flip(0), step=2, draws=SampleRandom.for_batch(0, 2, 2))
    assert logs["adv/skipped"] == 0.0 and any(not torch.equal(before[k], v) for k, v in tensors().items())


def test_overwrite_never_deletes_inputs_or_a_run_before_its_inputs_load(latent_dir, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    assert train_sit(latent_dir, run) == 0
    shutil.copytree(latent_dir, run / "latents")  # the run's own input inside the folder --overwrite would delete
    one_line_error(capsys, ["train-diffusion", "--config", "fashion-mnist-sit", "--latents", str(run / "latents"),
                            "--out", str(run), "--overwrite", *TINY_SIT, "train.steps=2"],
                   "--overwrite would delete", "an input of this run")
    assert (run / "latents" / "stats.json").exists() and (run / "model" / "config.json").exists()
    # a bad input is reported before anything is deleted
    one_line_error(capsys, ["train-diffusion", "--config", "fashion-mnist-sit", "--latents", str(tmp_path / "none"),
                            "--out", str(run), "--overwrite", *TINY_SIT, "train.steps=2"], "none")
    assert (run / "model" / "config.json").exists()
    # a finished run whose checkpoint is gone cannot be "resumed" from step 0
    (run / "checkpoints" / "last.pt").unlink()
    one_line_error(capsys, ["train-diffusion", "--config", "fashion-mnist-sit", "--latents", str(latent_dir), "--out",
                            str(run), "--resume", *TINY_SIT, "train.steps=2"], "finished run without", "--overwrite")


def test_the_pipeline_reuses_a_phase_only_under_its_config(tmp_path):
    """`maetok demo` / `study` rerun: a phase trained under another budget, data set or seed is never passed off as
    this run's (an older config.yaml lacking newer keys still matches)."""
    from maetok.config import to_dict
    from maetok.pipeline import check_same_config

    cfg = load_config(DiffusionTrainConfig, "fashion-mnist-sit")
    run = tmp_path / "sit"
    run.mkdir()
    written = to_dict(cfg)
    del written["train"]["max_nonfinite_steps"]  # as an older maetok wrote it
    (run / "config.yaml").write_text(yaml.safe_dump(written))
    check_same_config(run, "SiT", cfg)
    check_same_config(run, "SiT", load_config(DiffusionTrainConfig, "fashion-mnist-sit", ["train.log_every=7"]))
    with pytest.raises(ValueError, match=r"another config \(train.steps 2000 -> 5\): write this run to another --out"):
        check_same_config(run, "SiT", load_config(DiffusionTrainConfig, "fashion-mnist-sit", ["train.steps=5"]))


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(tmp_path, monkeypatch, capsys):
    """The CLI turns the errors a user causes (MaetokError) into one line with exit 2, and only those: a bug (here a
    KeyError, a ValueError from inside a command) shows its traceback and asks for a report, with exit 1."""
    assert issubclass(ConfigError, MaetokError) and issubclass(ConfigError, ValueError)
    assert issubclass(NonFiniteError, MaetokError) and issubclass(DataError, ValueError)
    for raised, status in ((DataError("folder x: no images"), 2), (KeyError("lookup"), 1), (ValueError("inner"), 1)):
        def command(args, raised=raised):
            raise raised
        monkeypatch.setitem(cli.COMMANDS, "info", command)
        assert main(["info"]) == status
        err = capsys.readouterr().err
        if status == 2:
            assert err == "maetok info: error: folder x: no images\n"
        else:
            assert "Traceback (most recent call last)" in err and "internal error (a bug in maetok" in err
    monkeypatch.setenv("MAETOK_DEBUG", "1")
    monkeypatch.setitem(cli.COMMANDS, "info", lambda args: (_ for _ in ()).throw(DataError("shown with traceback")))
    with pytest.raises(DataError):
        main(["info"])
