"""Multi-process training is the 1-process run at the same global batch: ``torchrun --nproc_per_node 2`` with
gloo on the CPU, for a tiny tokenizer with the adversarial loss on from step 0 (masks of different sizes per
process, HOG and pixel targets, DiffAugment, LeCAM, adaptive weight), its stage 2 (frozen encoder, decaying mask,
stage 1's discriminator continued), a tiny SiT (flips, times, noise, label dropout), and the AE and VAE presets
(whose mask token is never used).

One ``torchrun`` launch runs every job (this file is its worker script, see ``__main__``); each process saves
its own model, EMA and discriminator, so the test also sees that the processes agree with each other exactly.

Tolerance: the processes agree bit for bit (they apply the same all-reduced gradients). Against the
1-process run the gradient of the global mean is summed in another order (two half-batch means averaged by the
all-reduce instead of one mean), which changes float32 results in the last bits (~1e-7 relative); Adam divides
each gradient by its own running scale, so after three steps the weights differ by up to ~2e-6 (measured: 2.2e-6
on a discriminator weight of the GAN run, 3e-8 for the SiT, AE and VAE) and the logged losses by up to 1.1e-5
relative. We allow 1e-3 relative + 1e-5 absolute on weights and 3e-4 relative on logged values: over 25 times
the measured rounding, and over 25 times below what a real fault gives (measured by breaking one piece at a
time: a per-process mean over masked tokens, per-process adaptive-weight norms, or per-process random streams
move weights by 4e-3 to 2e-2 and logged losses by 8e-3 to 0.4; a discriminator without the gradient all-reduce,
or LeCAM anchors from local means, leave the two processes with different discriminators).
"""

from __future__ import annotations

import csv
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
RTOL, ATOL = 1e-3, 1e-5  # weights (see above)
LOG_RTOL = 3e-4  # logged losses

TOKENIZER = [  # a 16 px tokenizer, width 16, batch 8 (4 per process)
    "model.image_size=16", "model.in_channels=3", "model.patch_size=4",
    "model.encoder_width=16", "model.encoder_depth=1", "model.encoder_heads=2",
    "model.decoder_width=16", "model.decoder_depth=1", "model.decoder_heads=2",
    "model.aux_width=16", "model.aux_heads=2", "model.aux_depth=1",
    "model.num_latent_tokens=4", "model.latent_dim=4",
    "train.batch_size=8", "train.log_every=1", "train.eval_every=100", "train.ckpt_every=100",
    "optim.warmup_steps=1", "data.eval_images=2", "loss.perceptual_weight=0",
]
GAN = ["train.steps=3", "loss.gan_weight=0.4", "loss.gan_backbone=vgg16", "loss.gan_start=0"]
JOBS = {  # name: (what it trains, its overrides); run in this order ("finetune" starts from "gan")
    "gan": ("tokenizer", TOKENIZER + GAN),
    "gan_resumed": ("tokenizer", TOKENIZER + GAN),  # stopped after step 1 and resumed
    "finetune": ("finetune", TOKENIZER + GAN + ["finetune.steps=2", "finetune.mask_decay_steps=2"]),
    "ae": ("tokenizer", TOKENIZER + ["train.steps=2", "model.variant=ae", "model.mask_ratio_min=0",
                                     "model.mask_ratio_max=0", "model.aux_targets=[]", "loss.gan_weight=0"]),
    "vae": ("tokenizer", TOKENIZER + ["train.steps=2", "model.variant=vae", "model.mask_ratio_min=0",
                                      "model.mask_ratio_max=0", "model.aux_targets=[]", "loss.gan_weight=0"]),
    "sit": ("diffusion", ["model.width=16", "model.depth=1", "model.num_heads=2", "model.class_dropout_prob=0.5",
                          "train.batch_size=8", "train.steps=3", "train.log_every=1", "train.eval_every=100",
                          "train.ckpt_every=100", "optim.warmup_steps=1", f"latents={V0_LATENTS}"]),
}


def use_tiny_discriminator(patch: pytest.MonkeyPatch) -> None:
    """The VGG16 discriminator with random weights (two taps, 8 channels): no packaged weights needed."""
    import maetok.losses.discriminator as discriminator

    original = discriminator.build_discriminator
    if getattr(original, "tiny", False):
        return

    def tiny(backbone: str = "vgg16", **_options):
        return original("vgg16", pretrained=False, taps=("relu1_2", "relu2_2"), hidden_channels=8)

    tiny.tiny = True
    patch.setattr(discriminator, "build_discriminator", tiny)


def run_job(name: str, out_dir: Path, images: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Train job ``name`` into ``out_dir`` (with :func:`use_tiny_discriminator` in force); returns this process's
    model, EMA and discriminator tensors."""
    from maetok.config import DiffusionTrainConfig, TokenizerTrainConfig, load_config
    from maetok.train.diffusion import DiffusionTrainer
    from maetok.train.tokenizer import TokenizerTrainer

    kind, overrides = JOBS[name]
    if kind in ("tokenizer", "finetune"):
        cfg = load_config(TokenizerTrainConfig, "fashion-mnist-maetok", overrides + [f"data.dataset={images}"])
        if kind == "finetune":  # stage 2 from this run's stage 1, continuing its discriminator
            trainer = TokenizerTrainer(cfg, out_dir, stage="finetune", init_from=out_dir.parent / "gan")
        elif name == "gan_resumed":
            TokenizerTrainer(cfg, out_dir).fit(stop_at=1)
            if torch.distributed.is_initialized():
                torch.distributed.barrier()  # rank 0 has written the checkpoint
            trainer = TokenizerTrainer(cfg, out_dir, resume=True)
        else:
            trainer = TokenizerTrainer(cfg, out_dir)
    else:
        trainer = DiffusionTrainer(load_config(DiffusionTrainConfig, "fashion-mnist-sit", overrides), out_dir)
    trainer.fit()
    adversarial = getattr(getattr(trainer, "objective", None), "adversarial", None)

    def tensors(state: dict) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in state.items() if isinstance(v, torch.Tensor)}

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
    result = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    with pytest.MonkeyPatch.context() as patch:
        use_tiny_discriminator(patch)
        one = {name: run_job(name, root / "one" / name, images) for name in JOBS}
    two = {name: [torch.load(root / "two" / name / f"rank{r}.pt", weights_only=True) for r in (0, 1)] for name in JOBS}
    return root, one, two


def assert_states_close(expected: dict, actual: dict, what: str) -> None:
    assert expected.keys() == actual.keys(), what
    for part in expected:
        assert expected[part].keys() == actual[part].keys(), f"{what} {part}"
        for key, value in expected[part].items():
            where = f"{what} {part}.{key}"
            torch.testing.assert_close(actual[part][key], value, rtol=RTOL, atol=ATOL, msg=lambda m, w=where: f"{w}: {m}")


@pytest.mark.parametrize("name", list(JOBS))
def test_two_processes_hold_the_same_state(runs, name):
    """DDP keeps the model identical; the discriminator's gradients are all-reduced, so it is identical too."""
    _, _, two = runs
    rank0, rank1 = two[name]
    for part in rank0:
        for key, value in rank0[part].items():
            assert torch.equal(value, rank1[part][key]), f"{name}: {part}.{key} differs between the processes"
    if name in ("gan", "finetune"):
        assert len(rank0["disc"]) > 10 and int(rank0["disc"]["lecam.num_updates"]) == {"gan": 3, "finetune": 5}[name]


@pytest.mark.parametrize("name", list(JOBS))
def test_two_processes_equal_one_process_at_the_same_global_batch(runs, name):
    root, one, two = runs
    assert_states_close(one[name], two[name][0], name)
    changed = [k for k, v in one[name]["model"].items() if not torch.equal(v, two[name][0]["model"][k])]
    assert len(changed) < len(one[name]["model"])  # most tensors agree only to rounding, some exactly
    log_one, log_two = read_log(root / "one" / name / "log.csv"), read_log(root / "two" / name / "log.csv")
    key = "finetune.steps=" if name == "finetune" else "train.steps="
    steps = [int(o.split("=")[1]) for o in JOBS[name][1] if o.startswith(key)][-1]
    assert len(log_one) == len(log_two) == steps
    for row_one, row_two in zip(log_one, log_two):
        assert row_one.keys() == row_two.keys()
        for key in row_one:
            assert row_two[key] == pytest.approx(row_one[key], rel=LOG_RTOL, abs=1e-7), f"{name} log {key} step {row_one['step']}"
    if name == "gan":
        assert {"adv/d_loss", "adv/lecam", "adv/adaptive_weight", "aux_hog", "aux_pixel", "mask_ratio"} <= log_one[0].keys()
        assert log_one[0]["adv/adaptive_weight"] > 0


def test_a_resumed_run_equals_the_uninterrupted_one_in_either_number_of_processes(runs):
    """Every process resumes the discriminator rank 0 saved, and it is the one every process held."""
    _, one, two = runs
    for resumed, straight in [(one["gan_resumed"], one["gan"])] + list(zip(two["gan_resumed"], two["gan"])):
        for part in straight:
            for key, value in straight[part].items():
                assert torch.equal(resumed[part][key], value), f"{part}.{key}"


def test_a_checkpoint_resumes_under_another_number_of_processes(runs, tmp_path, monkeypatch):
    """Nothing in a checkpoint depends on the number of processes: the 2-process run's last checkpoint, resumed
    by one process for one more step, equals the 1-process run continued for that step."""
    import shutil

    from maetok.config import TokenizerTrainConfig, load_config
    from maetok.train.tokenizer import TokenizerTrainer

    root, _, _ = runs
    use_tiny_discriminator(monkeypatch)
    overrides = JOBS["gan"][1] + ["train.steps=4", f"data.dataset={root / 'images'}"]
    cfg = load_config(TokenizerTrainConfig, "fashion-mnist-maetok", overrides)
    finished = {}
    for source in ("one", "two"):
        run = tmp_path / source
        shutil.copytree(root / source / "gan", run)
        trainer = TokenizerTrainer(cfg, run, resume=True, device="cpu", allow_config_change=True)  # 3 -> 4 steps
        assert trainer.step == 3
        trainer.fit()
        finished[source] = trainer.model.state_dict()
    for key, value in finished["one"].items():
        torch.testing.assert_close(finished["two"][key], value, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------------------------------------
# The per-sample draws and the global-batch statistics, in one process
# ---------------------------------------------------------------------------------------------------------


def _triple32(x: int) -> int:
    """Chris Wellons' triple32 in plain Python (the reference for the tensor version)."""
    for shift, constant in ((17, 0xED5AD4BB), (11, 0xAC4C1B51), (15, 0x31848BAB)):
        x = ((x ^ (x >> shift)) * constant) & 0xFFFFFFFF
    return x ^ (x >> 14)


def test_hash_is_triple32_without_overflow():
    from maetok.global_batch import hash32

    words = [0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 123456789, 0xDEADBEEF]
    assert hash32(torch.tensor(words)).tolist() == [_triple32(w) for w in words]
    assert _triple32(1) != 1 and len({_triple32(w) for w in range(1000)}) == 1000  # a bijection


def test_a_samples_draws_depend_on_its_global_position_only():
    from maetok.global_batch import SampleRandom

    whole = SampleRandom.for_batch(seed=3, step=7, batch_size=8)
    halves = [SampleRandom.for_batch(3, 7, 4, offset=0), SampleRandom(3, 7, [4, 5, 6, 7])]
    for draw in (lambda r: r.uniform("a", (5,)), lambda r: r.normal("b", (3, 3)), lambda r: r.bits("c"),
                 lambda r: r.integers("d", -2, 3, (4,)), lambda r: r.child("e").uniform("a")):
        assert torch.equal(torch.cat([draw(h) for h in halves]), draw(whole))
    reference = whole.uniform("a", (5,))
    for other in (SampleRandom.for_batch(4, 7, 8), SampleRandom.for_batch(3, 8, 8)):
        assert not torch.equal(other.uniform("a", (5,)), reference)  # another seed, another step
    assert not torch.equal(whole.uniform("b", (5,)), reference)  # another stream
    assert not torch.equal(whole.child("x").uniform("a", (5,)), reference)
    assert not torch.equal(reference[0], reference[1])  # samples differ


def test_draw_ranges_and_moments():
    from maetok.global_batch import SampleRandom

    draws = SampleRandom.for_batch(0, 0, 512)
    u = draws.uniform("u", (256,))
    assert u.dtype == torch.float32 and 0 <= float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002
    z = draws.normal("z", (255,))  # odd: Box-Muller pairs are cut
    assert z.shape == (512, 255) and abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
    k = draws.integers("k", -3, 4, (64,))
    assert torch.bincount((k + 3).flatten()).tolist() == pytest.approx([512 * 64 / 7] * 7, rel=0.05)
    with pytest.raises(ValueError, match="sample_index"):
        SampleRandom(0, 0, [[0, 1]])


def test_masks_and_posterior_noise_per_image():
    from maetok.global_batch import SampleRandom
    from maetok.models.tokenizer import MAETok

    draws = SampleRandom.for_batch(1, 2, 64)
    mask = MAETok.random_mask(64, 50, (0.4, 0.6), draws)
    ratios = 0.4 + 0.2 * draws.uniform("mask_ratio").double()
    assert torch.equal(mask.sum(1), torch.round(ratios * 50).long())
    half = MAETok.random_mask(32, 50, (0.4, 0.6), SampleRandom.for_batch(1, 2, 32, offset=32))
    assert torch.equal(half, mask[32:])
    mean, logvar = torch.zeros(64, 4, 3), torch.zeros(64, 4, 3)
    noise = MAETok.sample_posterior(mean, logvar, draws)
    assert torch.equal(noise[32:], MAETok.sample_posterior(mean[32:], logvar[32:], SampleRandom.for_batch(1, 2, 32, 32)))
    with pytest.raises(ValueError, match="holds 64 samples, the batch has 8"):
        MAETok.random_mask(8, 50, 0.5, draws)


def test_global_weighted_mean_in_one_process():
    from maetok.losses.objective import masked_token_loss
    from maetok.global_batch import global_weighted_mean

    values = torch.arange(6.0).view(2, 3).requires_grad_()
    weights = torch.tensor([[True, False, True], [False, False, True]])
    mean = global_weighted_mean(values, weights)
    assert mean.item() == pytest.approx((0 + 2 + 5) / 3)
    mean.backward()
    assert torch.equal(values.grad, weights.float() / 3)
    assert global_weighted_mean(values, torch.zeros(2, 3, dtype=torch.bool)).item() == 0.0
    prediction, target = torch.ones(2, 3, 4), torch.zeros(2, 3, 4)
    prediction[0, 0] = 3.0
    assert masked_token_loss(prediction, target, weights, "mse").item() == pytest.approx((9 + 1 + 1) / 3)
    nothing = torch.zeros(2, 3, dtype=torch.bool)  # no token masked: the mean over all tokens
    assert masked_token_loss(prediction, target, nothing, "mse").item() == pytest.approx((9 + 5) / 6)


def test_the_ae_names_its_unused_mask_token():
    from maetok.config import TokenizerConfig
    from maetok.models.tokenizer import MAETok

    small = {"image_size": 16, "patch_size": 4, "encoder_width": 16, "encoder_heads": 2, "encoder_depth": 1,
             "decoder_width": 16, "decoder_heads": 2, "decoder_depth": 1, "num_latent_tokens": 4, "latent_dim": 4,
             "aux_targets": []}
    ae = MAETok(TokenizerConfig(variant="ae", mask_ratio_min=0.0, mask_ratio_max=0.0, **small))
    assert ae.unused_in_training() == ["encoder.mask_token"] and "encoder.mask_token" in ae.state_dict()
    assert MAETok(TokenizerConfig(**small)).unused_in_training() == []


def _worker(out_root: Path, images: Path, names: list[str]) -> None:
    """Under torchrun: run each job, then save this process's state as ``out_root/JOB/rank{r}.pt``."""
    rank = int(os.environ.get("RANK", "0"))
    use_tiny_discriminator(pytest.MonkeyPatch())
    for name in names:
        state = run_job(name, out_root / name, images)
        (out_root / name).mkdir(parents=True, exist_ok=True)
        torch.save(state, out_root / name / f"rank{rank}.pt")
        torch.distributed.barrier()  # rank 0 exports the model after the others return (finetune reads it)


if __name__ == "__main__":
    torch.set_num_threads(1)
    _worker(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:])
