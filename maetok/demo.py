"""``maetok demo``: the whole pipeline (:mod:`maetok.pipeline`) on one dataset, sized for a 2-core CPU, with the
simplest baselines beside every figure.

1. tokenizer stage 1 (mask modeling, auxiliary decoders) and stage 2 (decoder fine-tuning with the paper's
   MSE + LPIPS + adversarial loss), plus a stage 2 with MSE alone, to show what the perceptual and adversarial
   terms buy;
2. reconstruction metrics on held-out images (PSNR, SSIM, LPIPS (VGG), rFID) beside PCA with as many
   components as the tokenizer has latent numbers per image;
3. the training set encoded once into a latent cache; a small SiT trained on it;
4. a sample grid (one row per class) and gFID beside a Gaussian fitted in the PCA space (per class) and the
   real-vs-real FID floor of the same reference images;
5. linear probing, GMM NLL vs K and a latent map of the latents;
``DIR/report.md`` with every figure and the wall time of each phase. ``--data FOLDER`` runs it on an image
folder (1 or 3 channels; without class sub-folders it runs unconditionally). A rerun into the same folder reuses
every finished phase.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from maetok.config import Budget, DiffusionTrainConfig, TokenizerTrainConfig, load_config
from maetok.data import data_shape_overrides, save_image_grid
from maetok.encode import load_tokenizer, reconstruct_images
from maetok.eval.metrics import LPIPS_LABEL
from maetok.eval.reconstruction import ReconstructionEvaluator
from maetok.pipeline import EvalData, convergence, load_eval_data, measure_baselines, run_pipeline
from maetok.runs import is_finished, read_json_file, resolve_device, save_torch, write_json, write_text

TOKENIZER_CONFIG = "tiny-maetok"
DIFFUSION_CONFIG = "tiny-sit"

FULL = Budget(
    stage1_steps=2000,  # batch 32 (the preset's)
    stage2_steps=200,  # 10% of stage 1, as the paper's 50K after 500K
    diffusion_steps=300,
    eval_images=1000,
    fid_samples=1000,
    fid_sampling_steps=40,
    probe_train=10000,
    gmm_ks=(1, 2, 5, 10, 20, 50),
    gmm_train=5000,
    cache_limit=20000,
)
QUICK = Budget(
    stage1_steps=4, stage2_steps=2, diffusion_steps=4, eval_images=48, fid_samples=48, fid_sampling_steps=3,
    probe_train=256, gmm_ks=(1, 2), gmm_train=256, cache_limit=256, stage2_batch=16, baseline_train=512,
)


def format_seconds(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def dataset_shape(data: str, image_size: Optional[int], channels: Optional[int], tokenizer_config: str = TOKENIZER_CONFIG,
                  tokenizer_overrides: Sequence[str] = ()) -> tuple[int, int]:
    """The image size and channels of a demo / study run: as given (``image_size`` / ``channels``, or
    ``model.*`` in ``tokenizer_overrides``), else from the data (:func:`~maetok.data.data_shape_overrides`;
    Fashion-MNIST: the preset's 32 x 32 x 1), said in one line."""
    given = [f"model.{key}={value}" for key, value in (("image_size", image_size), ("in_channels", channels))
             if value is not None]
    _, shape = data_shape_overrides(data, tokenizer_config, [*given, *tokenizer_overrides])
    print(f"[maetok] data: {shape.reason}", flush=True)
    return shape.image_size, shape.channels


def run_demo(out: Path, quick: bool = False, device: Optional[str] = None,
             inception: Optional[torch.nn.Module] = None, data: str = "fashion-mnist",
             image_size: Optional[int] = None, channels: Optional[int] = None,
             tokenizer_extra: tuple[str, ...] = (), diffusion_extra: tuple[str, ...] = ()) -> Path:
    """Run the demo into ``out`` and return ``out/report.md``. ``inception``: the FID network (default: the
    TF-2015 Inception weights found by :func:`~maetok.eval.inception.load_inception`)."""
    from maetok.eval.plots import plot_training_curves
    from maetok.pipeline import Timer, tokenizer_configs, train_tokenizer

    budget = QUICK if quick else FULL
    size, channels = dataset_shape(data, image_size, channels, TOKENIZER_CONFIG, tokenizer_extra)
    shape = [f"model.image_size={size}", f"model.in_channels={channels}", *tokenizer_extra]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timer = Timer()
    with timer.phase("held-out images and their Inception statistics"):
        evald = load_eval_data(data, size, channels, budget.eval_images, device, inception, progress=not quick)
    result = run_pipeline(out, evald, budget, TOKENIZER_CONFIG, DIFFUSION_CONFIG, shape, diffusion_extra,
                          device=device, progress=True, label="MAETok (demo)")
    latent_dim = result["latent_dim"]

    # what LPIPS + GAN buy: stage 2 from the same stage 1 with MSE alone (PSNR / SSIM / LPIPS, no rFID)
    reused = []
    mse_dir = out / "mse-only"
    if is_finished(mse_dir / "tokenizer"):
        reused.append("stage 2 with MSE only, for comparison")
    with timer.phase("stage 2 with MSE only, for comparison"):
        mse_budget = Budget(**{**asdict(budget), "stage2_loss": "mse"})
        train_tokenizer(mse_dir, data, TOKENIZER_CONFIG, mse_budget, shape, device=device, stage1_dir=out / "stage1")
        stage1, mse_only = load_tokenizer(out / "stage1", "cpu"), load_tokenizer(mse_dir / "tokenizer", "cpu")
        comparison = {}
        for name, model in (("stage 1", stage1), ("stage 2: MSE only", mse_only)):
            # PSNR / SSIM / LPIPS; the rFID is the final tokenizer's alone
            evaluator = ReconstructionEvaluator(progress=True)
            evaluator.update(evald.images, reconstruct_images(model, evald.images))
            comparison[name] = evaluator.result()

    baselines_path = out / "baselines.json"
    baselines_phase = f"baselines: PCA-{latent_dim}, Gaussian in its space, real vs real"
    if baselines_path.exists():
        reused.append(baselines_phase)
    with timer.phase(baselines_phase):
        if baselines_path.exists():
            baselines = read_json_file(baselines_path, what_to_do="delete it to measure the baselines again")
            pca_rows = torch.load(out / "baseline_grids.pt", weights_only=True)
        else:
            baselines, b = measure_baselines(evald, latent_dim, budget, sample_labels=_grid_labels(evald, 10),
                                             progress=True)
            pca_rows = {"reconstructions": b["reconstructions"][:16], "samples": b["samples"][:100]}
            save_torch(pca_rows, out / "baseline_grids.pt")
            write_json(baselines_path, baselines)

    tokenizer = load_tokenizer(out / "tokenizer", "cpu")
    rows = [evald.images[:16], *(reconstruct_images(model, evald.images[:16]) for model in (stage1, mse_only, tokenizer)),
            pca_rows["reconstructions"]]
    save_image_grid(torch.cat(rows), out / "reconstructions.png", nrow=16)
    save_image_grid(pca_rows["samples"], out / "baseline_samples.png", nrow=10)
    plot_training_curves(
        {"stage 1": out / "stage1" / "log.csv", "stage 2 (full loss)": out / "tokenizer" / "log.csv",
         "stage 2 (MSE)": mse_dir / "tokenizer" / "log.csv"},
        out / "tokenizer_curves.png",
        keys=("loss", "mse", "aux_hog", "lpips", "eval_psnr"),
        step_offsets={"stage 2 (full loss)": budget.stage1_steps, "stage 2 (MSE)": budget.stage1_steps},
    )
    plot_training_curves({"SiT": out / "sit" / "log.csv"}, out / "sit_curves.png", keys=("loss", "lr"))
    # a phase reused from an earlier invocation keeps the time it took then
    previous = read_json_file(out / "metrics.json", what_to_do="delete it (it is written again)").get("timings_s", {}) \
        if (out / "metrics.json").exists() else {}
    for name in reused:
        timer.phases[name] = previous.get(name, timer.phases[name])
    held_out = "held-out images and their Inception statistics"
    timings = {held_out: timer.phases.pop(held_out), **result["timings_s"], **timer.phases}
    metrics = {
        "data": data,
        "budget": asdict(budget),
        "reconstruction": {**comparison, "stage 2: MSE + LPIPS + GAN": result["reconstruction"]},
        "generation": result["generation"],
        "sit_heldout": result.get("sit_heldout"),
        "baselines": baselines,
        "num_cached_latents": result["num_cached_latents"],
        "convergence": result.get("convergence") or convergence(out / "stage1" / "log.csv"),
        "linear_probe": result["linear_probe"],
        "gmm": result["gmm"],
        "latent_map_method": result["latent_map_method"],
        "timings_s": timings,
        "device": str(resolve_device(device)),
        "machine": machine_description(),
    }
    write_json(out / "metrics.json", metrics)
    tok_cfg = load_config(TokenizerTrainConfig, TOKENIZER_CONFIG, list(shape))
    dif_cfg = load_config(DiffusionTrainConfig, DIFFUSION_CONFIG, list(diffusion_extra))
    stage2_cfg = tokenizer_configs(data, TOKENIZER_CONFIG, budget, shape)[1]
    return _write_report(out, tok_cfg, dif_cfg, budget, evald, metrics,
                         discriminator_sentence(out / "stage1", stage2_cfg))


def _grid_labels(evald: EvalData, per_class: int) -> Optional[torch.Tensor]:
    """``per_class`` samples of each of the first 10 classes, as the SiT's grid (None: unconditional)."""
    if not evald.conditional:
        return None
    rows = min(10, len(evald.class_names))
    labels = torch.arange(rows).repeat_interleave(per_class)
    rest = torch.arange(max(0, len(evald.images) - len(labels))) % len(evald.class_names)
    return torch.cat([labels, rest])[: len(evald.images)]


def machine_description() -> str:
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {torch.get_num_threads()} threads{gpu}, torch {torch.__version__}"


def _convergence_sentence(c: dict[str, Any]) -> str:
    if c.get("gain_last_20pct_db") is None:
        return "Stage 1 logged too few evaluations for the convergence check."
    state = "converged by the 0.2 dB criterion" if c["converged"] else "still learning (criterion: < 0.2 dB)"
    return (f"Stage 1's held-out PSNR{held_out_count(c)} went {c['psnr_at_80pct']:.2f} -> {c['psnr_final']:.2f} dB "
            f"over its last 20% of steps: {state}; the end of the cosine schedule slows it too.")


def held_out_count(c: dict[str, Any]) -> str:
    """`` (17 test images)``: the images a convergence record (:func:`~maetok.pipeline.convergence`) was measured on,
    or nothing when its log predates that count."""
    return f" ({c['num_images']} test images)" if c.get("num_images") else ""


def discriminator_sentence(stage1_dir: Path, stage2: TokenizerTrainConfig) -> str:
    """How stage 2's discriminator trained, in the words its trainer printed: it continues stage 1's, or a new one
    warms up for ``finetune.disc_warmup_steps``."""
    from maetok.train.tokenizer import new_discriminator_schedule, stage1_discriminator

    if stage1_discriminator(stage1_dir)[1] is not None:
        return "stage 2 continues stage 1's discriminator, whose adversarial loss reaches the decoder from step 0"
    return new_discriminator_schedule(stage2.finetune.disc_warmup_steps)


def format_optional(value: Any, spec: str = ".2f") -> str:
    """A number in ``spec``, or '-' when it is missing."""
    return "-" if value is None else format(value, spec)


def differences_from_paper(cfg: TokenizerTrainConfig, budget: Budget) -> str:
    """How this run's tokenizer recipe differs from the paper's (``maetok-b-128``, METHOD.md), in one paragraph."""
    paper = load_config(TokenizerTrainConfig, "maetok-b-128")
    m, p = cfg.model, paper.model
    rows = [
        ("images", f"{m.image_size} px", f"{p.image_size} px ImageNet"),
        ("image tokens", f"{m.grid_size[0] ** 2} (patch {m.patch_size})", f"{p.grid_size[0] ** 2} (patch {p.patch_size})"),
        ("latents", f"{m.num_latent_tokens} x {m.latent_dim}", f"{p.num_latent_tokens} x {p.latent_dim}"),
        ("encoder / decoder", f"{m.encoder_depth} blocks of width {m.encoder_width}",
         f"ViT-B ({p.encoder_depth} blocks of width {p.encoder_width})"),
        ("auxiliary targets", " + ".join(t.name for t in m.aux_targets) or "none",
         " + ".join(t.name for t in p.aux_targets) + " (no DINOv2 / SigLIP weights can be had here)"),
        ("mask ratio", f"{m.mask_ratio_min:.0%}-{m.mask_ratio_max:.0%}", f"{p.mask_ratio_min:.0%}-{p.mask_ratio_max:.0%}"),
        ("stage-1 loss", "MSE + auxiliary" if budget.stage1_loss == "mse" else "Eq. 6 + auxiliary",
         f"Eq. 6 + auxiliary, GAN from step {paper.loss.gan_start}"),
        ("stage 1", f"{budget.stage1_steps} steps of batch {cfg.train.batch_size}",
         f"{paper.train.steps} steps of batch {paper.train.batch_size}"),
        ("stage 2", f"{budget.stage2_steps} steps", f"{paper.finetune.steps} steps"),
        ("discriminator backbone", cfg.loss.gan_backbone, paper.loss.gan_backbone),
    ]
    changed = "; ".join(f"{name} {ours} (paper: {theirs})" for name, ours, theirs in rows if ours != theirs)
    return f"Differences from the paper's recipe (`maetok-b-128`, Table 7): {changed}."


def decoder_free_cells(free: Optional[dict[str, Any]]) -> str:
    """The decoder-free cells of a generator row: FID (floor) | ratio | precision / recall (floor's)."""
    if not free:
        return "- | - | -"
    pr = "-"
    if free.get("precision") is not None:
        pr = (f"{free['precision']:.2f} / {free['recall']:.2f} ({free['floor_precision']:.2f} / "
              f"{free['floor_recall']:.2f})")
    return f"{free['fid']:.1f} ({free['floor_fid']:.1f}) | {format_optional(free.get('fid_ratio'))}x | {pr}"


def heldout_sentence(h: Optional[dict[str, Any]]) -> str:
    """One sentence on the SiT's held-out denoising loss against a Gaussian's (no decoder, no Inception)."""
    if not h:
        return ""
    return (f"In latent space, with no decoder and no Inception network: the SiT's velocity loss on the {h['num_latents']} "
            f"held-out latents (normalised, {h['num_times']} fixed times, per number) is {h['loss']:.3f} ({h['train_loss']:.3f} "
            f"on as many training latents), against {h['gaussian_loss']:.3f} for the best predictor a Gaussian fitted to "
            f"the training latents allows: ratio {h['ratio']:.3f} (below 1: structure learned beyond a Gaussian).")


def _write_report(out: Path, cfg: TokenizerTrainConfig, dif_cfg: DiffusionTrainConfig, budget: Budget,
                  evald: EvalData, results: dict, discriminator: str) -> Path:
    """``out/report.md``; ``discriminator``: how stage 2's discriminator trained (:func:`discriminator_sentence`)."""
    from maetok.eval.fid import fid_label

    m = cfg.model
    n_eval = len(evald.images)
    fid = f"FID-{fid_label(n_eval)}"
    base = results["baselines"]
    pca, gauss, floor = base["pca"], base["gaussian"], base["real_vs_real"]
    dim = m.num_latent_tokens * m.latent_dim
    gen = results["generation"]
    grid_rows = f"; one row per class ({', '.join(evald.class_names[:10])})" if evald.conditional else ""
    lines = [
        f"# maetok demo: MAETok + SiT on {evald.data}",
        "",
        f"Measured on {results['machine']} by `maetok demo`. Small models at a CPU budget, each beside the simplest "
        "model that does the same job: these numbers show whether training worked at this scale; they are not "
        "comparable with the paper's ImageNet figures.",
        "",
        "## Tokenizer",
        "",
        f"`{TOKENIZER_CONFIG}` on `{evald.data}`: {m.image_size}x{m.image_size}x{m.in_channels} images, patch {m.patch_size} "
        f"({m.grid_size[0] * m.grid_size[1]} tokens) -> {m.num_latent_tokens} latent tokens x {m.latent_dim} channels "
        f"= {dim} numbers per image; ViT encoder / decoder of {m.encoder_depth} / {m.decoder_depth} blocks, width "
        f"{m.encoder_width}; auxiliary decoders ({m.aux_depth} blocks) for {', '.join(t.name for t in m.aux_targets)}; "
        f"mask ratio {m.mask_ratio_min:.0%}-{m.mask_ratio_max:.0%}. Stage 1: {budget.stage1_steps} steps of batch "
        f"{cfg.train.batch_size} ({'MSE + LPIPS + GAN' if budget.stage1_loss == 'full' else 'MSE + auxiliary losses'}). "
        f"Stage 2: {budget.stage2_steps} steps of batch {budget.stage2_batch or cfg.train.batch_size} (encoder frozen, "
        f"mask ratio {cfg.finetune.mask_ratio_start:.0%} -> 0% over the whole stage) with the paper's Eq. 6 loss (MSE + "
        f"LPIPS 1.0 + adversarial 0.4, adaptive weight, LeCAM, VGG16-backbone discriminator: {discriminator}), and once "
        "more with MSE alone.",
        "",
        differences_from_paper(cfg, budget),
        "",
        f"### Reconstruction of {n_eval} held-out images",
        "",
        f"The held-out images: {evald.draw}, the same on every run.",
        "",
        f"| model | PSNR (dB) | SSIM | SSIM (data_range=2) | {LPIPS_LABEL} | r{fid} |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results["reconstruction"].items():
        lines.append(f"| {name} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['ssim_dr2']:.4f} | {format_optional(r.get('lpips'), '.4f')} "
                     f"| {format_optional(r.get('rfid'))} |")
    lines.append(f"| **baseline: PCA-{pca['dim']}** ({pca['explained_variance']:.1%} of the pixel variance; fitted on "
                 f"{pca['num_train']} training images) | {pca['psnr']:.2f} | {pca['ssim']:.4f} | {pca['ssim_dr2']:.4f} | "
                 f"{format_optional(pca.get('lpips'), '.4f')} | {format_optional(pca.get('rfid'))} |")
    tok = results["reconstruction"]["stage 2: MSE + LPIPS + GAN"]
    verdict = "above" if tok["psnr"] > pca["psnr"] else "BELOW"
    lines += [
        "",
        f"The tokenizer the SiT is trained on is **{verdict}** PCA with the same {dim} numbers per image in PSNR "
        f"({tok['psnr']:.2f} vs {pca['psnr']:.2f} dB)"
        + (f" and r{fid} {tok['rfid']:.1f} vs {pca['rfid']:.1f}." if tok.get("rfid") is not None and pca.get("rfid") is not None else "."),
        _convergence_sentence(results["convergence"]),
        "On Fashion-MNIST at this scale, masked training costs MAETok about 4 dB against the same ViT trained as a "
        "plain AE on as many images, for any patch size, mask range or stage-2 length that 2 cores can train, and "
        "stage 2 does not win it back: the masked encoder's 128 numbers hold less of the image (the measurements: "
        "`docs/regime` in the repository).",
        "",
        "SSIM with data_range=1 is the correct value; data_range=2 is the convention of many tokenizer papers (higher). "
        f"{LPIPS_LABEL}: VGG16 LPIPS (v0.1 heads) on images in [-1, 1], mean over images (lower is better). "
        f"rFID compares the reconstructions with the same {n_eval} originals (Inception pool3, TF-2015 weights).",
        "",
        "![reconstructions](reconstructions.png)",
        "",
        f"Rows: originals; stage 1; stage 2 MSE only; stage 2 MSE + LPIPS + GAN (the tokenizer); PCA-{pca['dim']}.",
        "",
        "![tokenizer curves](tokenizer_curves.png)",
        "",
        "## Latent diffusion",
        "",
        f"SiT ({dif_cfg.model.depth} blocks, width {dif_cfg.model.width}, patch size 1 on the {m.num_latent_tokens} x "
        f"{m.latent_dim} latents, per-channel normalised) trained {budget.diffusion_steps} steps of batch "
        f"{dif_cfg.train.batch_size} on {results['num_cached_latents']} cached training latents"
        f"{'' if evald.conditional else ', unconditional (the data has no classes)'}.",
        "",
        "![samples](samples.png)",
        "",
        f"Drawn from the {gen['num_samples']} samples the gFID below measures ({gen['steps']} {gen['sampler']} steps, "
        f"CFG {gen['cfg_scale']}){grid_rows}. Beside it, the {'class-conditional ' if gauss['conditional'] else ''}"
        "Gaussian baseline (a full-covariance Gaussian per class in the PCA space, decoded by the PCA):",
        "",
        "![Gaussian baseline samples](baseline_samples.png)",
        "",
        f"| generator ({gen['num_samples']} samples{', classes balanced' if evald.conditional else ''}) | g{fid} | sFID "
        f"| decoder-free {fid} (its floor) | ratio to floor | precision / recall vs reconstructions (floor) |",
        "|---|---|---|---|---|---|",
        f"| SiT, {gen['steps']} {gen['sampler']} steps, CFG {gen['cfg_scale']} | {format_optional(gen.get('gfid'))} | "
        f"{format_optional(gen.get('sfid'))} | {decoder_free_cells(gen.get('decoder_free'))} |",
        f"| **baseline: {'class-conditional ' if gauss['conditional'] else ''}Gaussian in the PCA-{pca['dim']} space** | "
        f"{format_optional(gauss.get('gfid'))} | {format_optional(gauss.get('sfid'))} | "
        f"{decoder_free_cells(gauss.get('decoder_free'))} |",
        f"| floor: {floor['num_images']} real training images | {format_optional(floor.get('fid'))} | - | - | - | - |",
        "",
        f"gFID: against the {n_eval} held-out images above. The floor is the FID of real images at this sample count: "
        "no generator can be expected below it. gFID mixes two errors, the decoder's (rFID) and the generator's; the "
        "decoder-free columns take the decoder out: the samples against the tokenizer's own reconstructions of the same "
        f"{n_eval} held-out images, beside that figure's floor (the reconstructions of {n_eval} training images against "
        "them, what a generator that reproduced the encoded distribution exactly would score). Blurrier "
        "reconstructions spread less in Inception space and shrink every FID among them, floor included, so compare "
        "generators by the ratio to the floor, and by precision / recall (which a uniform shrinking leaves unchanged). "
        "The Gaussian is measured the same way in its own space: its samples against the PCA reconstructions.",
        "",
        heldout_sentence(results.get("sit_heldout")),
        "",
        "![SiT curves](sit_curves.png)",
        "",
        "## Latent space",
        "",
    ]
    probe = results["linear_probe"]
    if probe is not None:
        lines += [
            f"Linear probe (non-affine BatchNorm + linear, L-BFGS) on flattened latents: {probe['top1'] * 100:.1f}% top-1 "
            f"on {probe['num_test']} held-out images (trained on {probe['num_train']} training latents; "
            f"{probe['train_top1'] * 100:.1f}% train).",
            "",
        ]
    g = results["gmm"]
    ks = list(g["test_nll"])
    lines += [
        f"GMM held-out NLL vs K (flattened latents, PCA to {g['pca_dim']} dims = {g['explained_variance']:.0%} of the "
        f"variance, standardised, full covariance; fitted on {budget.gmm_train} training latents, NLL per sample on the "
        "held-out latents). The paper's argument: a latent space whose NLL falls fast with few components has few, "
        "separated modes, which diffusion learns more easily. `maetok study` puts AE, VAE and MAETok on one such plot.",
        "",
        "| K | " + " | ".join(ks) + " |",
        "|---|" + "---|" * len(ks),
        "| NLL | " + " | ".join(f"{g['test_nll'][k]:.2f}" for k in ks) + " |",
        "",
        f"![latent map](latent_map.png)  Latent map of the held-out latents: {results['latent_map_method']}.",
        "",
        "## Wall time",
        "",
        "| phase | time |",
        "|---|---|",
    ]
    lines += [f"| {k} | {format_seconds(v)} |" for k, v in results["timings_s"].items()]
    lines += [f"| total | {format_seconds(sum(results['timings_s'].values()))} |", "",
              "A rerun into the same folder reuses the finished phases; their times are those of the run that made them.", ""]
    return write_text(out / "report.md", "\n".join(lines))

