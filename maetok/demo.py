"""``maetok demo``: the whole pipeline on the embedded Fashion-MNIST, sized for a 2-core CPU.

1. tokenizer stage 1 (``fashion-mnist-maetok``: mask modeling, HOG / pixel auxiliary decoders);
2. stage 2 twice from the same frozen encoder, at the same budget: with the paper's full Eq. 6 loss
   (MSE + LPIPS + adversarial) and with MSE alone, to show what the perceptual and adversarial terms buy;
3. reconstruction metrics on the test split (PSNR, SSIM, LPIPS (VGG), rFID);
4. the training set encoded once into a latent cache; a small SiT trained on it;
5. a class-conditional sample grid (one row per class) and gFID against the test split;
6. linear probing, GMM NLL vs K and a latent map (UMAP) of the latents;
``DIR/report.md`` with every figure and the wall time of each phase.
"""

from __future__ import annotations

import dataclasses
import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

from maetok.config import DiffusionTrainConfig, TokenizerTrainConfig, load_config
from maetok.data import FASHION_MNIST_CLASSES, build_dataset, save_image_grid
from maetok.data.images import to_uint8_image
from maetok.data.latents import LatentDataset, cache_latents
from maetok.diffusion.generate import generate_images
from maetok.diffusion.pipeline import DiffusionPipeline
from maetok.eval.metrics import LPIPS_LABEL
from maetok.eval.plots import plot_training_curves
from maetok.eval.reconstruction import evaluate_reconstruction
from maetok.models.tokenizer import MAETok
from maetok.train.diffusion import DiffusionTrainer
from maetok.train.tokenizer import TokenizerTrainer


@dataclass
class DemoBudget:
    stage1_steps: int
    stage2_steps: int
    diffusion_steps: int
    eval_images: int  # test images for PSNR / SSIM / rFID and the gFID reference
    fid_samples: int  # generated images for gFID
    fid_sampling_steps: int  # sampler steps for the gFID samples (the grid uses the preset's 250)
    probe_train: int  # latents of the training split for the linear probe
    gmm_ks: tuple[int, ...]  # GMM component counts of the NLL curve
    cache_limit: Optional[int]  # training images encoded for the SiT and the probe (None = all 60k)


FULL = DemoBudget(
    stage1_steps=150,
    stage2_steps=30,
    diffusion_steps=300,
    eval_images=1000,
    fid_samples=1000,
    fid_sampling_steps=40,
    probe_train=10000,
    gmm_ks=(1, 2, 5, 10, 20, 50),
    cache_limit=20000,  # the SiT draws 300 x 128 = 38k latents: ~2 epochs of a third of the training split
)
QUICK = DemoBudget(
    stage1_steps=4,
    stage2_steps=2,
    diffusion_steps=4,
    eval_images=48,
    fid_samples=48,
    fid_sampling_steps=3,
    probe_train=256,
    gmm_ks=(1, 2),
    cache_limit=256,
)
STAGE2_BATCH = 64  # the LPIPS + GAN stage-2 steps cost ~5x a stage-1 step on a CPU


class Timer:
    def __init__(self) -> None:
        self.phases: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        print(f"[maetok demo] {name} ...", flush=True)
        yield
        self.phases[name] = time.perf_counter() - start


def format_seconds(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


@torch.no_grad()
def encode_images(model: MAETok, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Latents ``(B, L, H)`` (on the CPU) of images ``(B, C, H, W)`` in [-1, 1], encoded in batches."""
    device = next(model.parameters()).device
    return torch.cat([model.encode(images[i : i + batch_size].to(device)).cpu() for i in range(0, len(images), batch_size)])


def tokenizer_step_overrides(stage1_steps: int, stage2_steps: int) -> list[str]:
    """Config overrides for a short two-stage run: step counts, four evaluations / checkpoints in stage 1, the
    stage-2 mask ratio reaching 0% at 70% of the fine-tuning steps, and a new stage-2 discriminator (when stage 1
    trained none) warming up alone for the first 20% of them."""
    every = max(1, stage1_steps // 4)
    return [
        f"train.steps={stage1_steps}",
        f"train.eval_every={every}",
        f"train.ckpt_every={every}",
        f"train.log_every={max(1, min(20, stage1_steps // 6))}",
        f"finetune.steps={stage2_steps}",
        f"finetune.mask_decay_steps={max(1, int(stage2_steps * 0.7))}",
        f"finetune.disc_warmup_steps={stage2_steps // 5}",
    ]


def run_demo(out: Path, quick: bool = False, device: Optional[str] = None,
             inception: Optional[torch.nn.Module] = None) -> Path:
    """Run the demo into ``out`` and return ``out/report.md``. ``inception``: the FID network (default: the
    TF-2015 Inception weights found by :func:`~maetok.eval.inception.load_inception`)."""
    from maetok.eval.commands import DatasetSubset, latent_analysis, latent_map
    from maetok.eval.fid import compute_fid_stats, evaluate_samples
    from maetok.eval.gmm import plot_gmm_curves
    from maetok.eval.inception import load_inception

    budget = QUICK if quick else FULL
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    timer = Timer()
    tok_overrides = tokenizer_step_overrides(budget.stage1_steps, budget.stage2_steps)
    no_perceptual_gan = ["loss.perceptual_weight=0", "loss.gan_weight=0"]
    # Stage 1: mask modeling with the HOG / pixel / VGG16-teacher auxiliary decoders and pixel MSE (LPIPS and the
    # GAN are left to stage 2 here: on 2 CPU cores they would cost ~4x the stage-1 budget).
    cfg = load_config(TokenizerTrainConfig, "fashion-mnist-maetok", tok_overrides + no_perceptual_gan)
    # Stage 2 from the same frozen encoder at the same budget: the paper's Eq. 6 (MSE + LPIPS + GAN) vs MSE alone.
    stage2 = [f"train.batch_size={STAGE2_BATCH}", f"train.eval_every={budget.stage2_steps}"]
    full_loss = load_config(TokenizerTrainConfig, "fashion-mnist-maetok", tok_overrides + stage2)
    mse_only = load_config(TokenizerTrainConfig, "fashion-mnist-maetok", tok_overrides + stage2 + no_perceptual_gan)
    with timer.phase("tokenizer stage 1 (mask modeling + aux decoders)"):
        TokenizerTrainer(cfg, out / "stage1", stage="pretrain", device=device).fit()
    with timer.phase("tokenizer stage 2, MSE + LPIPS + GAN"):
        TokenizerTrainer(full_loss, out / "tokenizer", stage="finetune", init_from=out / "stage1", device=device).fit()
    with timer.phase("tokenizer stage 2, MSE only"):
        TokenizerTrainer(mse_only, out / "tokenizer-mse", stage="finetune", init_from=out / "stage1", device=device).fit()

    test_set = build_dataset("fashion-mnist", "test", cfg.model.image_size, cfg.model.in_channels)
    test_items = [test_set[i] for i in range(budget.eval_images)]
    test_images = torch.stack([item[0] for item in test_items])
    test_labels = torch.tensor([item[1] for item in test_items])
    inception = inception if inception is not None else load_inception(device=dev)
    with timer.phase("reconstruction metrics (PSNR, SSIM, LPIPS, rFID)"):
        reference = compute_fid_stats(to_uint8_image(test_images), inception, progress=False)
        recon_results, models = {}, {}
        originals = test_images[:16].to(dev)
        grid_rows = [originals]
        for name, run, with_fid in (
            ("stage 1", "stage1", False),
            ("stage 2: MSE only", "tokenizer-mse", True),  # rFID of both stage-2 losses: what LPIPS + GAN buy
            ("stage 2: MSE + LPIPS + GAN", "tokenizer", True),
        ):
            model = models[run] = MAETok.from_pretrained(out / run / "model").to(dev)
            recon_results[name] = evaluate_reconstruction(
                model, torch.utils.data.TensorDataset(test_images, test_labels),
                inception=inception if with_fid else None, reference_stats=reference if with_fid else None,
            )
            with torch.no_grad():
                grid_rows.append(model.decode(model.encode(originals)).clamp(-1, 1))
    save_image_grid(torch.cat(grid_rows).cpu(), out / "reconstructions.png", nrow=16)
    tokenizer = models["tokenizer"]  # stage 2 with the paper's loss: the tokenizer the SiT is trained on

    with timer.phase("latent cache of the training split"):
        train_set = build_dataset("fashion-mnist", "train", cfg.model.image_size, cfg.model.in_channels)
        if budget.cache_limit:
            train_set = DatasetSubset(train_set, range(min(budget.cache_limit, len(train_set))))
        cache_latents(tokenizer, train_set, out / "latents", out / "tokenizer" / "model", progress=not quick,
                      restart_if_stale=True)

    dif_cfg = load_config(
        DiffusionTrainConfig,
        "fashion-mnist-sit",
        [
            f"latents={out / 'latents'}",
            f"train.steps={budget.diffusion_steps}",
            f"train.eval_every={max(1, budget.diffusion_steps // 3)}",
            f"train.ckpt_every={max(1, budget.diffusion_steps // 3)}",
            f"train.log_every={max(1, min(25, budget.diffusion_steps // 6))}",
        ]
        + (["sampling.steps=4", "sampling.grid_steps=2"] if quick else []),
    )
    with timer.phase("SiT training on the latents"):
        DiffusionTrainer(dif_cfg, out / "sit", device=device).fit()
    pipe = DiffusionPipeline.load(out / "sit", device=str(dev))

    with timer.phase(f"class-conditional sample grid ({pipe.sampling.steps} steps, CFG {pipe.sampling.cfg_scale})"):
        labels = torch.arange(10).repeat_interleave(10)
        grid, _ = generate_images(pipe, tokenizer, 100, labels, batch_size=100, progress=False)
        save_image_grid(torch.from_numpy(grid).permute(0, 3, 1, 2).float() / 127.5 - 1, out / "samples.png", nrow=10)

    with timer.phase(f"gFID ({budget.fid_samples} samples, {budget.fid_sampling_steps} steps)"):
        sampling = dataclasses.replace(pipe.sampling, steps=budget.fid_sampling_steps)
        samples, _ = generate_images(pipe, tokenizer, budget.fid_samples, None, sampling, batch_size=250, seed=1, progress=False)
        gen_results = {f"CFG {sampling.cfg_scale}": evaluate_samples(samples, reference, inception, precision_recall_k=None,
                                                                      progress=False)}

    with timer.phase("latent analysis (linear probe, GMM, latent map)"):
        cache = LatentDataset(out / "latents")
        n_train = min(budget.probe_train, len(cache))
        test_latents = encode_images(tokenizer, test_images)
        analysis = latent_analysis(cache.latents[:n_train], cache.labels[:n_train], test_latents, test_labels,
                                   budget.gmm_ks, gmm_train=5000, probe_optimizer="lbfgs", probe_epochs=10,
                                   progress=False)
        plot_gmm_curves({"MAETok (demo)": analysis["gmm"]}, out / "gmm_nll.png", title="GMM held-out NLL vs K")
        map_method = latent_map(test_latents, test_labels, out / "latent_map.png", "MAETok latents (test split)")

    plot_training_curves(
        {"stage 1": out / "stage1" / "log.csv", "stage 2 (full loss)": out / "tokenizer" / "log.csv", "stage 2 (MSE)": out / "tokenizer-mse" / "log.csv"},
        out / "tokenizer_curves.png",
        keys=("loss", "mse", "aux_hog", "lpips", "eval_psnr"),
        step_offsets={"stage 2 (full loss)": budget.stage1_steps, "stage 2 (MSE)": budget.stage1_steps},
    )
    plot_training_curves({"SiT": out / "sit" / "log.csv"}, out / "sit_curves.png", keys=("loss", "lr"))
    results = {
        "budget": asdict(budget),
        "reconstruction": recon_results,
        "generation": gen_results,
        "num_cached_latents": len(cache),
        "linear_probe": analysis["linear_probe"],
        "gmm": analysis["gmm"],
        "latent_map_method": map_method,
        "timings_s": timer.phases,
        "device": str(dev),
    }
    (out / "metrics.json").write_text(json.dumps(results, indent=2, default=str))
    return _write_report(out, cfg, dif_cfg, pipe, budget, results)


def _write_report(out: Path, cfg: TokenizerTrainConfig, dif_cfg: DiffusionTrainConfig, pipe: DiffusionPipeline, budget: DemoBudget, results: dict) -> Path:
    m = cfg.model
    n_eval = budget.eval_images
    fid_label = f"FID-{n_eval / 1000:g}k" if n_eval >= 1000 else f"FID-{n_eval}"
    lines = [
        "# maetok demo: MAETok + SiT on Fashion-MNIST",
        "",
        f"Measured on `{results['device']}` by `maetok demo`. Small models at a CPU budget: these numbers show the pipeline "
        "working and the effect of each part at this scale; they are not comparable with the paper's ImageNet figures.",
        "",
        "## Tokenizer",
        "",
        f"`fashion-mnist-maetok`: {m.image_size}x{m.image_size}x{m.in_channels} images (28x28 padded), patch {m.patch_size} "
        f"({m.grid_size[0] * m.grid_size[1]} tokens) -> {m.num_latent_tokens} latent tokens x {m.latent_dim} channels; "
        f"ViT encoder / decoder of {m.encoder_depth} / {m.decoder_depth} blocks, width {m.encoder_width}; "
        f"auxiliary decoders ({m.aux_depth} blocks) for {', '.join(t.name for t in m.aux_targets)}; mask ratio "
        f"{m.mask_ratio_min:.0%}-{m.mask_ratio_max:.0%}. Stage 1: {budget.stage1_steps} steps of batch {cfg.train.batch_size}. "
        f"Stage 2: {budget.stage2_steps} steps of batch {STAGE2_BATCH} (encoder frozen, mask ratio {cfg.finetune.mask_ratio_start:.0%} -> 0%), "
        "once with the paper's Eq. 6 loss (MSE + LPIPS 1.0 + adversarial 0.4, adaptive weight, LeCAM, VGG16-backbone "
        "discriminator) and once with MSE alone.",
        "",
        f"### Reconstruction, Fashion-MNIST test split (first {n_eval} images)",
        "",
        f"| model | PSNR (dB) | SSIM | SSIM (data_range=2) | {LPIPS_LABEL} | r{fid_label} |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results["reconstruction"].items():
        rfid = f"{r['rfid']:.2f}" if "rfid" in r else "(not computed: CPU time)"
        lines.append(f"| {name} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['ssim_dr2']:.4f} | {r['lpips']:.4f} | {rfid} |")
    lines += [
        "",
        "SSIM with data_range=1 is the correct value; data_range=2 is the convention of many tokenizer papers (higher). "
        f"{LPIPS_LABEL}: VGG16 LPIPS (v0.1 heads) on images in [-1, 1], mean over images (lower is better). "
        f"rFID compares the reconstructions with the same {n_eval} originals (Inception pool3, TF-2015 weights).",
        "",
        "![reconstructions](reconstructions.png)",
        "",
        "Rows: originals; stage 1; stage 2 MSE only; stage 2 MSE + LPIPS + GAN. Stage 1 trains with MSE and the "
        "auxiliary losses only; LPIPS and the adversarial term enter in stage 2 (their VGG16 passes would cost ~4x the "
        "stage-1 budget on 2 CPU cores). The preset itself applies them in stage 1 too (the GAN from step 300).",
        "",
        "![tokenizer curves](tokenizer_curves.png)",
        "",
        "## Latent diffusion",
        "",
        f"SiT ({dif_cfg.model.depth} blocks, width {dif_cfg.model.width}, patch size 1 on the {m.num_latent_tokens} x {m.latent_dim} "
        f"latents, per-channel normalised) trained {budget.diffusion_steps} steps of batch {dif_cfg.train.batch_size} on the "
        f"{results['num_cached_latents']} cached training latents.",
        "",
        "![samples](samples.png)",
        "",
        f"One row per class ({', '.join(FASHION_MNIST_CLASSES)}): {pipe.sampling.sampler}, {pipe.sampling.steps} steps, "
        f"CFG {pipe.sampling.cfg_scale} in the guidance interval [{pipe.sampling.guidance_low}, {pipe.sampling.guidance_high}].",
        "",
        f"| sampling ({budget.fid_sampling_steps} {pipe.sampling.sampler} steps, classes balanced) | g{fid_label} | sFID |",
        "|---|---|---|",
    ]
    for name, r in results["generation"].items():
        lines.append(f"| {name} | {r['fid']:.2f} | {r['sfid']:.2f} |")
    probe = results["linear_probe"]
    lines += [
        "",
        f"gFID: {budget.fid_samples} samples against the {n_eval} test images above.",
        "",
        "![SiT curves](sit_curves.png)",
        "",
        "## Latent space",
        "",
        f"Linear probe (non-affine BatchNorm + linear, L-BFGS) on flattened latents: {probe['top1'] * 100:.1f}% top-1 on "
        f"{probe['num_test']} test images (trained on {probe['num_train']} training latents; {probe['train_top1'] * 100:.1f}% train).",
        "",
        f"GMM held-out NLL vs K (flattened latents, PCA to {results['gmm']['explained_variance']:.0%} variance "
        f"= {results['gmm']['pca_dim']} dims, standardised, full covariance; fitted on {results['gmm']['num_train']} "
        f"training latents, NLL per sample on the {results['gmm']['num_test']} test latents). The paper's argument: "
        "a latent space whose NLL falls fast with few components has few, separated modes, which diffusion learns "
        "more easily. `maetok study` puts AE, VAE and MAETok on one such plot.",
        "",
        "| K | " + " | ".join(str(k) for k in results["gmm"]["ks"]) + " |",
        "|---|" + "---|" * len(results["gmm"]["ks"]),
        "| NLL | " + " | ".join(f"{results['gmm']['test_nll'][k]:.2f}" for k in results["gmm"]["ks"]) + " |",
        "",
        "![GMM NLL](gmm_nll.png) ![latent map](latent_map.png)",
        "",
        f"Latent map of the test latents coloured by class: {results['latent_map_method']}.",
        "",
        "## Wall time",
        "",
        "| phase | time |",
        "|---|---|",
    ]
    lines += [f"| {k} | {format_seconds(v)} |" for k, v in results["timings_s"].items()]
    lines += [f"| total | {format_seconds(sum(results['timings_s'].values()))} |", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
