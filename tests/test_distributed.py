"""Multi-process training is the 1-process run at the same global batch: ``torchrun --nproc_per_node 2`` with
gloo on the CPU, for a tiny tokenizer with the adversarial loss on from step 0 (masks of different sizes per
process, HOG and pixel targets, DiffAugment, LeCAM, adaptive weight), a tiny SiT (flips, times, noise, label
dropout), and the AE and VAE presets (whose mask token is never used).

One ``torchrun`` launch runs every job (this file is its worker script, see ``__main__``); each process saves
its own model, EMA and discriminator, so the test also sees that the processes agree with each other exactly.

Tolerance: the processes agree bit for bit (they apply the same all-reduced gradients). Against the
1-process run the gradient of the global mean is summed in another order (two half-batch means averaged by the
all-reduce instead of one mean), which changes float32 results in the last bits (~1e-7 relative); three Adam
steps carry that to ~1e-6 on the weights (Adam divides by the gradient's own scale, so a relative gradient
error becomes an error of that relative size times the learning rate). We allow 1e-4 relative + 1e-6 absolute
(weights) and 1e-4 relative (logged losses): far below what one different random draw, a missing all-reduce or
a per-process mean over masked tokens gives (checked: each of those moves the results by more than 1e-3).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
V0_LATENTS = Path(__file__).parent / "fixtures" / "v0" / "latents"
RTOL, ATOL = 1e-4, 1e-6

TOKENIZER = [  # a 16 px tokenizer, width 16, batch 8 (4 per process)
    "model.image_size=16", "model.in_channels=3", "model.patch_size=4",
    "model.encoder_width=16", "model.encoder_depth=1", "model.encoder_heads=2",
    "model.decoder_width=16", "model.decoder_depth=1", "model.decoder_heads=2",
    "model.aux_width=16", "model.aux_heads=2", "model.aux_depth=1",
    "model.num_latent_tokens=4", "model.latent_dim=4",
    "train.batch_size=8", "train.log_every=1", "train.eval_every=100", "train.ckpt_every=100",
    "optim.warmup_steps=1", "data.eval_images=2", "loss.perceptual_weight=0",
]
JOBS = {
    "gan": ("tokenizer", TOKENIZER + ["train.steps=3", "loss.gan_weight=0.4", "loss.gan_backbone=vgg16", "loss.gan_start=0"]),
    "ae": ("tokenizer", TOKENIZER + ["train.steps=2", "model.variant=ae", "model.mask_ratio_min=0",
                                     "model.mask_ratio_max=0", "model.aux_targets=[]", "loss.gan_weight=0"]),
    "vae": ("tokenizer", TOKENIZER + ["train.steps=2", "model.variant=vae", "model.mask_ratio_min=0",
                                      "model.mask_ratio_max=0", "model.aux_targets=[]", "loss.gan_weight=0"]),
    "sit": ("diffusion", ["model.width=16", "model.depth=1", "model.num_heads=2", "model.class_dropout_prob=0.5",
                          "train.batch_size=8", "train.steps=3", "train.log_every=1", "train.eval_every=100",
                          "train.ckpt_every=100", "optim.warmup_steps=1", f"latents={V0_LATENTS}"]),
}


def use_tiny_discriminator() -> None:
    """The VGG16 discriminator with random weights (two taps, 8 channels): no packaged weights needed."""
    import maetok.losses.discriminator as discriminator

    if getattr(discriminator.build_discriminator, "tiny", False):
        return
    original = discriminator.build_discriminator

    def tiny(backbone: str = "vgg16", **_options):
        return original("vgg16", pretrained=False, taps=("relu1_2", "relu2_2"), hidden_channels=8)

    tiny.tiny = True
    discriminator.build_discriminator = tiny


def run_job(name: str, out_dir: Path, images: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Train job ``name`` into ``out_dir``; returns this process's model, EMA and discriminator tensors."""
    from maetok.config import DiffusionTrainConfig, TokenizerTrainConfig, load_config
    from maetok.train.diffusion import DiffusionTrainer
    from maetok.train.tokenizer import TokenizerTrainer

    use_tiny_discriminator()
    kind, overrides = JOBS[name]
    if kind == "tokenizer":
        cfg = load_config(TokenizerTrainConfig, "fashion-mnist-maetok", overrides + [f"data.dataset={images}"])
        trainer = TokenizerTrainer(cfg, out_dir)
    else:
        trainer = DiffusionTrainer(load_config(DiffusionTrainConfig, "fashion-mnist-sit", overrides), out_dir)
    trainer.fit()
    adversarial = getattr(getattr(trainer, "objective", None), "adversarial", None)
    tensors = lambda state: {k: v.detach().clone() for k, v in state.items() if isinstance(v, torch.Tensor)}  # noqa: E731
    return {
        "model": tensors(trainer.model.state_dict()),
        "ema": tensors(trainer.ema.state_dict()),
        "disc": tensors(adversarial.state_dict()) if adversarial is not None else {},
    }


def read_log(path: Path) -> list[dict[str, float]]:
    with path.open() as f:
        return [{k: float(v) for k, v in row.items() if v and k != "img_per_s"} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 2-process runs (one torchrun launch) and the 1-process runs of every job."""
    root = tmp_path_factory.mktemp("distributed")
    images = root / "images"
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (images / cls).mkdir(parents=True)
        for i in range(20):  # 5% of 40 are held out for evaluation
            Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(images / cls / f"{i}.png")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               __file__, str(root / "two"), str(images), *JOBS]
    result = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    one = {name: run_job(name, root / "one" / name, images) for name in JOBS}
    two = {name: [torch.load(root / "two" / name / f"rank{r}.pt", weights_only=True) for r in (0, 1)] for name in JOBS}
    return root, one, two


def assert_states_close(expected: dict, actual: dict, what: str) -> None:
    assert expected.keys() == actual.keys(), what
    for part in expected:
        assert expected[part].keys() == actual[part].keys(), f"{what} {part}"
        for key, value in expected[part].items():
            torch.testing.assert_close(actual[part][key], value, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what} {part}.{key}: {m}")


@pytest.mark.parametrize("name", list(JOBS))
def test_two_processes_hold_the_same_state(runs, name):
    """DDP keeps the model identical; the discriminator's gradients are all-reduced, so it is identical too."""
    _, _, two = runs
    rank0, rank1 = two[name]
    for part in rank0:
        for key, value in rank0[part].items():
            assert torch.equal(value, rank1[part][key]), f"{name}: {part}.{key} differs between the processes"
    if name == "gan":
        assert len(rank0["disc"]) > 10 and int(rank0["disc"]["lecam.num_updates"]) == 3


@pytest.mark.parametrize("name", list(JOBS))
def test_two_processes_equal_one_process_at_the_same_global_batch(runs, name):
    root, one, two = runs
    assert_states_close(one[name], two[name][0], name)
    changed = [k for k, v in one[name]["model"].items() if not torch.equal(v, two[name][0]["model"][k])]
    assert len(changed) < len(one[name]["model"])  # most tensors agree only to rounding, some exactly
    log_one, log_two = read_log(root / "one" / name / "log.csv"), read_log(root / "two" / name / "log.csv")
    steps = next(int(o.split("=")[1]) for o in JOBS[name][1] if o.startswith("train.steps="))
    assert len(log_one) == len(log_two) == steps
    for row_one, row_two in zip(log_one, log_two):
        assert row_one.keys() == row_two.keys()
        for key in row_one:
            assert row_two[key] == pytest.approx(row_one[key], rel=RTOL, abs=1e-7), f"{name} log {key} step {row_one['step']}"
    if name == "gan":
        assert {"adv/d_loss", "adv/lecam", "adv/adaptive_weight", "aux_hog", "aux_pixel", "mask_ratio"} <= log_one[0].keys()
        assert log_one[0]["adv/adaptive_weight"] > 0


def test_a_checkpoint_resumes_under_another_number_of_processes(runs, tmp_path):
    """Nothing in a checkpoint depends on the number of processes: the 2-process run's last checkpoint, resumed
    by one process for one more step, equals the 1-process run continued for that step."""
    import shutil

    from maetok.config import TokenizerTrainConfig, load_config
    from maetok.train.tokenizer import TokenizerTrainer

    root, _, _ = runs
    use_tiny_discriminator()
    overrides = JOBS["gan"][1] + ["train.steps=4", f"data.dataset={root / 'images'}"]
    cfg = load_config(TokenizerTrainConfig, "fashion-mnist-maetok", overrides)
    finished = {}
    for source in ("one", "two"):
        run = tmp_path / source
        shutil.copytree(root / source / "gan", run)
        trainer = TokenizerTrainer(cfg, run, resume=True, device="cpu")
        assert trainer.step == 3
        trainer.fit()
        finished[source] = trainer.model.state_dict()
    for key, value in finished["one"].items():
        torch.testing.assert_close(finished["two"][key], value, rtol=RTOL, atol=ATOL)


def _worker(out_root: Path, images: Path, names: list[str]) -> None:
    """Under torchrun: run each job, then save this process's state as ``out_root/JOB/rank{r}.pt``."""
    rank = int(os.environ.get("RANK", "0"))
    for name in names:
        state = run_job(name, out_root / name, images)
        (out_root / name).mkdir(parents=True, exist_ok=True)
        torch.save(state, out_root / name / f"rank{rank}.pt")


if __name__ == "__main__":
    torch.set_num_threads(1)
    _worker(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:])
