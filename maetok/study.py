"""``maetok study``: the paper's Table 1a / Table 6 comparison, runnable at any scale.

Several tokenizers that differ in one design choice (AE, VAE, MAETok, MAETok without auxiliary decoders,
MAETok without masking) are trained on the same data with the same budget; each gets the same decoder
fine-tuning, the same small SiT trained on its latents, and the same evaluation: PSNR / SSIM / LPIPS / rFID of
the tokenizer, gFID of the SiT (without CFG, as in the paper's Table 1), linear-probe accuracy and GMM held-out
NLL of the latents (all tokenizers in one shared PCA dimension, fitted once every variant's latents exist). Writes ``DIR/study.md`` (table + plots), ``DIR/study.json``, ``DIR/gfid_vs_lp.png``
(paper Fig. 5a), ``DIR/gmm_nll.png``, ``DIR/reconstructions.png``, ``DIR/samples.png`` and one latent map per
tokenizer. A finished tokenizer's ``DIR/<variant>/result.json`` is reused when the study is run again, so an
interrupted study resumes where it stopped.

On the CPU the default budget is the demo's (Fashion-MNIST, ~10 minutes per tokenizer on 2 cores); on GPUs
the same command scales to the paper's presets by config, e.g. ``--tokenizer-config maetok-b-128
--diffusion-config sit-l --data /imagenet --full-objective --stage1-steps ...``.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from maetok.config import DiffusionTrainConfig, TokenizerTrainConfig, load_config
from maetok.data import build_dataset, save_image_grid
from maetok.data.latents import LatentDataset, cache_latents
from maetok.data.images import to_uint8_image
from maetok.demo import encode_images, format_seconds, tokenizer_step_overrides
from maetok.diffusion.generate import generate_images
from maetok.diffusion.pipeline import DiffusionPipeline
from maetok.eval.commands import DatasetSubset, latent_analysis, latent_map, write_json
from maetok.eval.metrics import LPIPS_LABEL, lpips_unavailable_reason
from maetok.eval.reconstruction import evaluate_reconstruction
from maetok.models.tokenizer import MAETok
from maetok.train.diffusion import DiffusionTrainer
from maetok.train.tokenizer import TokenizerTrainer


@dataclass
class StudyBudget:
    stage1_steps: int
    stage2_steps: int
    diffusion_steps: int
    eval_images: int  # test images for PSNR / SSIM / rFID and the gFID reference
    fid_samples: int  # generated images per tokenizer for gFID (no CFG)
    fid_sampling_steps: int
    probe_train: int  # training latents for the linear probe
    gmm_ks: tuple[int, ...]  # GMM component counts of the NLL curves
    gmm_table_k: int  # the K whose held-out NLL goes into the table
    gmm_train: int  # training latents the GMMs are fitted on
    cache_limit: Optional[int]  # training images encoded for the SiT (None = all)
    full_objective: bool = False  # LPIPS + GAN in both stages (the paper's Eq. 6; off on the CPU budget)


CPU_BUDGET = StudyBudget(
    stage1_steps=160, stage2_steps=30, diffusion_steps=400, eval_images=1000, fid_samples=1000,
    fid_sampling_steps=50, probe_train=10000, gmm_ks=(1, 2, 5, 10, 20, 50), gmm_table_k=10, gmm_train=5000,
    cache_limit=None,
)
QUICK_BUDGET = StudyBudget(
    stage1_steps=3, stage2_steps=2, diffusion_steps=3, eval_images=24, fid_samples=24, fid_sampling_steps=2,
    probe_train=64, gmm_ks=(1, 2), gmm_table_k=2, gmm_train=64, cache_limit=64,
)

NO_MASK = ["model.mask_ratio_min=0", "model.mask_ratio_max=0"]
# slug -> (label, tokenizer-config overrides that make the variant from the MAETok preset)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "ae": ("AE", ["model.variant=ae", *NO_MASK, "model.aux_targets=[]"]),
    "vae": ("VAE", ["model.variant=vae", *NO_MASK, "model.aux_targets=[]"]),
    "maetok": ("MAETok", []),
    "maetok-no-aux": ("MAETok w/o aux decoders", ["model.aux_targets=[]"]),
    "maetok-no-mask": ("MAETok w/o masking", NO_MASK),
}


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def run_study(
    out: Path,
    variants: Optional[Sequence[str]] = None,
    data: str = "fashion-mnist",
    tokenizer_config: str = "fashion-mnist-maetok",
    diffusion_config: str = "fashion-mnist-sit",
    budget: StudyBudget = CPU_BUDGET,
    tokenizer_overrides: Sequence[str] = (),
    diffusion_overrides: Sequence[str] = (),
    device: Optional[str] = None,
    inception: Optional[torch.nn.Module] = None,
    progress: bool = True,
    gmm_pca_dim: Optional[int] = None,
) -> Path:
    """Train and evaluate every variant (slugs of :data:`VARIANTS`, default all); returns ``out/study.md``.

    The GMM curves of all variants are fitted at the end in one PCA dimension: ``gmm_pca_dim``, or the largest
    of the variants' >= 90% explained-variance dimensions."""
    from maetok.eval.fid import compute_fid_stats
    from maetok.eval.inception import load_inception

    variants = list(variants or VARIANTS)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown study variants {unknown}; known: {list(VARIANTS)}")
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    start = time.perf_counter()
    base = load_config(TokenizerTrainConfig, tokenizer_config, list(tokenizer_overrides))
    test_set = build_dataset(data, "test", base.model.image_size, base.model.in_channels)
    num_eval = min(budget.eval_images, len(test_set))
    test_items = [test_set[i] for i in range(num_eval)]
    test_images = torch.stack([item[0] for item in test_items])
    test_labels = torch.tensor([item[1] for item in test_items])
    inception = inception if inception is not None else load_inception(device=dev)
    print(f"[maetok study] reference statistics of {num_eval} {data} test images ...", flush=True)
    reference = compute_fid_stats(to_uint8_image(test_images), inception, progress=progress)
    results: dict[str, dict[str, Any]] = {}
    for slug in variants:
        result_path = out / slug / "result.json"
        if result_path.exists():
            print(f"[maetok study] {slug}: reusing {result_path}", flush=True)
            results[slug] = json.loads(result_path.read_text())
            continue
        results[slug] = _run_variant(slug, out / slug, data, tokenizer_config, diffusion_config, budget,
                                     list(tokenizer_overrides), list(diffusion_overrides), device, dev, inception,
                                     reference, test_images, test_labels, progress)
        write_json(result_path, results[slug])
    gmm_pca = _shared_gmm(out, results, budget, gmm_pca_dim, test_images, dev, progress)
    return _write_study(out, results, data, tokenizer_config, diffusion_config, budget, test_images, dev,
                        time.perf_counter() - start, gmm_pca)


def _run_variant(
    slug: str, run_dir: Path, data: str, tokenizer_config: str, diffusion_config: str, budget: StudyBudget,
    tokenizer_overrides: list[str], diffusion_overrides: list[str], device: Optional[str], dev: torch.device,
    inception: torch.nn.Module, reference: Any, test_images: torch.Tensor, test_labels: torch.Tensor,
    progress: bool,
) -> dict[str, Any]:
    from maetok.eval.fid import evaluate_samples

    label, variant_overrides = VARIANTS[slug]
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    overrides = [f"data.dataset={data}"] + tokenizer_step_overrides(budget.stage1_steps, budget.stage2_steps)
    if not budget.full_objective:
        overrides += ["loss.perceptual_weight=0", "loss.gan_weight=0"]
    cfg = load_config(TokenizerTrainConfig, tokenizer_config, overrides + variant_overrides + tokenizer_overrides)
    print(f"[maetok study] {label}: tokenizer stage 1 + decoder fine-tuning ...", flush=True)
    TokenizerTrainer(cfg, run_dir / "stage1", stage="pretrain", device=device).fit()
    TokenizerTrainer(cfg, run_dir / "tokenizer", stage="finetune", init_from=run_dir / "stage1", device=device).fit()
    timings["tokenizer"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    tokenizer = MAETok.from_pretrained(run_dir / "tokenizer" / "model").to(dev)
    eval_set = torch.utils.data.TensorDataset(test_images, test_labels)
    recon = evaluate_reconstruction(tokenizer, eval_set, inception=inception, reference_stats=reference,
                                    progress=progress, lpips=lpips_unavailable_reason() is None)
    with torch.no_grad():
        recon_grid = tokenizer.decode(tokenizer.encode(test_images[:16].to(dev))).clamp(-1, 1).cpu()
    timings["reconstruction metrics"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    train_set = build_dataset(data, "train", cfg.model.image_size, cfg.model.in_channels)
    if budget.cache_limit:
        train_set = DatasetSubset(train_set, range(min(budget.cache_limit, len(train_set))))
    cache_latents(tokenizer, train_set, run_dir / "latents", run_dir / "tokenizer" / "model", flip=False,
                  progress=progress, restart_if_stale=True)
    timings["latent cache"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    dif_cfg = load_config(
        DiffusionTrainConfig,
        diffusion_config,
        [
            f"latents={run_dir / 'latents'}",
            f"train.steps={budget.diffusion_steps}",
            f"train.eval_every={budget.diffusion_steps}",
            f"train.ckpt_every={max(1, budget.diffusion_steps // 2)}",
            f"train.log_every={max(1, min(25, budget.diffusion_steps // 6))}",
            f"sampling.grid_steps={min(50, budget.fid_sampling_steps)}",
        ]
        + diffusion_overrides,
    )
    DiffusionTrainer(dif_cfg, run_dir / "sit", device=device).fit()
    timings["SiT training"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    pipe = DiffusionPipeline.load(run_dir / "sit", device=str(dev))
    sampling = dataclasses.replace(pipe.sampling, steps=budget.fid_sampling_steps, cfg_scale=1.0)
    samples, _ = generate_images(pipe, tokenizer, budget.fid_samples, None, sampling, batch_size=250, seed=1,
                                 progress=progress)
    gen = evaluate_samples(samples, reference, inception, precision_recall_k=None, progress=progress)
    timings["gFID"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    cache = LatentDataset(run_dir / "latents")
    n_train = min(budget.probe_train, len(cache))
    test_latents = encode_images(tokenizer, test_images)
    analysis = latent_analysis(cache.latents[:n_train], cache.labels[:n_train], test_latents, test_labels,
                               probe_optimizer="lbfgs", probe_epochs=10, progress=progress, gmm=False)
    # the GMM curves need every variant's latents (one shared PCA dimension): fitted in _shared_gmm
    n_fit = min(n_train, budget.gmm_train)
    torch.save({"fit": cache.latents[:n_fit].flatten(1).float(), "test": test_latents.flatten(1).float()},
               run_dir / GMM_LATENTS)
    map_method = latent_map(test_latents, test_labels, run_dir / "latent_map.png", f"{label} latents ({data} test)")
    timings["latent analysis"] = time.perf_counter() - t0

    sample_grid = torch.from_numpy(samples[:16]).permute(0, 3, 1, 2).float() / 127.5 - 1
    save_image_grid(recon_grid, run_dir / "reconstructions.png", nrow=16)
    save_image_grid(sample_grid, run_dir / "samples.png", nrow=16)
    torch.save({"reconstructions": recon_grid, "samples": sample_grid}, run_dir / "grids.pt")
    return {
        "label": label,
        "overrides": variant_overrides,
        "variant": cfg.model.variant,
        "mask_ratio": [cfg.model.mask_ratio_min, cfg.model.mask_ratio_max],
        "aux_targets": [t.name for t in cfg.model.aux_targets],
        "psnr": recon["psnr"],
        "ssim": recon["ssim"],
        "ssim_dr2": recon["ssim_dr2"],
        "lpips": recon.get("lpips"),  # None without the VGG16/LPIPS weights
        "rfid": recon["rfid"],
        "gfid": gen["fid"],
        "sfid": gen["sfid"],
        "linear_probe_top1": analysis["linear_probe"]["top1"],
        "linear_probe": analysis["linear_probe"],
        "latent_map_method": map_method,
        "timings_s": timings,
    }


GMM_LATENTS = "gmm_latents.pt"  # per variant: {"fit": GMM train latents (n, L*H), "test": (M, L*H)}


def _gmm_latents(run_dir: Path, budget: StudyBudget, test_images: torch.Tensor,
                 dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A variant's (GMM fit latents ``(n, L*H)``, test latents ``(M, L*H)``): saved by :func:`_run_variant`, or
    rebuilt from its latent cache and tokenizer (studies run before the file existed)."""
    path = run_dir / GMM_LATENTS
    if not path.exists():
        cache = LatentDataset(run_dir / "latents")
        tokenizer = MAETok.from_pretrained(run_dir / "tokenizer" / "model").to(dev)
        n_fit = min(budget.probe_train, budget.gmm_train, len(cache))
        torch.save({"fit": cache.latents[:n_fit].flatten(1).float(),
                    "test": encode_images(tokenizer, test_images).flatten(1).float()}, path)
    saved = torch.load(path, weights_only=True)
    return saved["fit"], saved["test"]


def _shared_gmm(out: Path, results: dict[str, dict[str, Any]], budget: StudyBudget, pca_dim: Optional[int],
                test_images: torch.Tensor, dev: torch.device, progress: bool) -> dict[str, Any]:
    """GMM held-out NLL vs K of every variant in ONE PCA dimension (``pca_dim``, default the largest of the
    variants' >= 90% variance dimensions), stored in ``results`` and each ``result.json``; a variant's curve is
    reused when it was fitted at that dimension with the same Ks. Returns the shared-dimension summary."""
    from maetok.eval.gmm import gmm_nll_analysis, own_pca_dim

    sets = {slug: _gmm_latents(out / slug, budget, test_images, dev) for slug in results}
    own = {slug: own_pca_dim(fit) for slug, (fit, _) in sets.items()}
    dim = int(pca_dim) if pca_dim is not None else max(own.values())
    for slug, (fit, test) in sets.items():
        r = results[slug]
        ks = [k for k in budget.gmm_ks if k <= len(fit)]
        if r.get("gmm_pca_dim_requested") == dim and [int(k) for k in r.get("gmm_test_nll", {})] == ks:
            continue
        print(f"[maetok study] {r['label']}: GMM NLL vs K in PCA dim {dim} ...", flush=True)
        t0 = time.perf_counter()
        gmm = gmm_nll_analysis(fit, ks, test_latents=test, progress=progress, pca_dim=dim)
        r.update({
            "gmm_test_nll": {str(k): v for k, v in gmm["test_nll"].items()},
            "gmm_pca_dim": gmm["pca_dim"],
            "gmm_pca_dim_requested": dim,
            "gmm_own_pca_dim": gmm["own_pca_dim"],
            "gmm_explained_variance": gmm["explained_variance"],
            "gmm_notes": gmm["notes"],
        })
        r["timings_s"]["GMM"] = time.perf_counter() - t0
        write_json(out / slug / "result.json", r)
    source = f"given (gmm_pca_dim={pca_dim})" if pca_dim is not None else "the largest of the >= 90% variance dims"
    return {"pca_dim": dim, "pca_dim_source": source, "own_pca_dims": own}


def _write_study(out: Path, results: dict[str, dict[str, Any]], data: str, tokenizer_config: str,
                 diffusion_config: str, budget: StudyBudget, test_images: torch.Tensor, dev: torch.device,
                 wall_s: float, gmm_pca: dict[str, Any]) -> Path:
    from maetok.eval.commands import fid_label
    from maetok.eval.gmm import plot_gmm_curves
    from maetok.eval.plots import plot_labelled_scatter

    labels = {slug: r["label"] for slug, r in results.items()}
    plot_labelled_scatter({labels[s]: (100 * r["linear_probe_top1"], r["gfid"]) for s, r in results.items()},
                          out / "gfid_vs_lp.png", "linear probe top-1 (%)", f"gFID-{fid_label(budget.fid_samples)} (no CFG)",
                          title=f"gFID vs linear probing ({data})")
    plot_gmm_curves({labels[s]: {"test_nll": r["gmm_test_nll"], "pca_dim": r["gmm_pca_dim"],
                                 "own_pca_dim": r["gmm_own_pca_dim"], "explained_variance": r["gmm_explained_variance"]}
                     for s, r in results.items()}, out / "gmm_nll.png", title=f"GMM held-out NLL vs K ({data})")
    grids = {slug: torch.load(out / slug / "grids.pt", weights_only=True) for slug in results}
    save_image_grid(torch.cat([test_images[:16]] + [g["reconstructions"] for g in grids.values()]),
                    out / "reconstructions.png", nrow=16)
    save_image_grid(torch.cat([g["samples"] for g in grids.values()]), out / "samples.png", nrow=16)
    command = "maetok " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith(("maetok", "cli.py")) else "run_study(...)"
    k = budget.gmm_table_k
    fid_n, ref_n = fid_label(budget.fid_samples), fid_label(min(budget.eval_images, len(test_images)))
    report = {
        "data": data,
        "tokenizer_config": tokenizer_config,
        "diffusion_config": diffusion_config,
        "budget": asdict(budget),
        "machine": machine_description(dev),
        "wall_time_s_this_run": wall_s,
        "command": command,
        "gmm_pca": gmm_pca,
        "results": results,
    }
    write_json(out / "study.json", report)
    lines = [
        f"# maetok study: AE vs VAE vs MAETok on {data}",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine_description(dev)}  ",
        f"Wall time: {format_seconds(sum(sum(r['timings_s'].values()) for r in results.values()))} for the "
        f"{len(results)} tokenizers (this invocation: {format_seconds(wall_s)}).",
        "",
        f"Every tokenizer: `{tokenizer_config}` architecture, {budget.stage1_steps} stage-1 steps + "
        f"{budget.stage2_steps} decoder fine-tuning steps (frozen encoder; mask ratio decaying to 0 for the masked "
        f"variants), loss {'MSE + LPIPS + GAN' if budget.full_objective else 'MSE (+ auxiliary / KL terms); no LPIPS / GAN at this budget'}. "
        f"Every SiT: `{diffusion_config}`, {budget.diffusion_steps} steps on the tokenizer's cached training latents. "
        f"gFID: {budget.fid_samples} class-balanced samples, {budget.fid_sampling_steps} Euler-Maruyama steps, "
        f"**no CFG** (as in the paper's Table 1), against the first {ref_n} test images; rFID: reconstructions of "
        f"the same images. Linear probe: BatchNorm + linear (L-BFGS) on flattened latents, "
        f"{budget.probe_train} training latents, top-1 on the test images. GMM: held-out NLL per sample (nats) in "
        f"one standardised PCA space of {gmm_pca['pca_dim']} dims for every tokenizer ({gmm_pca['pca_dim_source']}), "
        f"full covariance. {LPIPS_LABEL}: VGG16 LPIPS on images in [-1, 1], mean over the test images.",
        "",
        f"| tokenizer | PSNR (dB) | SSIM | {LPIPS_LABEL} | rFID-{ref_n} | gFID-{fid_n} | LP top-1 (%) | "
        f"GMM NLL (K={k}, d={gmm_pca['pca_dim']}) | own 90% dim | variance at d |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for slug, r in results.items():
        nll, lpips = r["gmm_test_nll"].get(str(k)), r.get("lpips")
        lines.append(
            f"| {r['label']} | {r['psnr']:.2f} | {r['ssim']:.4f} | {'-' if lpips is None else f'{lpips:.4f}'} | "
            f"{r['rfid']:.2f} | {r['gfid']:.2f} | {100 * r['linear_probe_top1']:.1f} | "
            f"{'-' if nll is None else f'{nll:.2f}'} | {r['gmm_own_pca_dim']} | {r['gmm_explained_variance']:.1%} |"
        )
    lines += [
        "",
        f"All GMM NLLs are in the same {gmm_pca['pca_dim']}-dimensional PCA space (MAETok App. B.3: the largest of "
        "the tokenizers' 90%-variance dimensions, so each keeps >= 90% of its variance), so their levels compare; "
        "lower NLL at small K = fewer, better separated modes."
        + "".join(f" {results[slug]['label']}: {note}." for slug in results for note in results[slug].get("gmm_notes", [])),
        "",
        "![gFID vs LP](gfid_vs_lp.png) ![GMM NLL](gmm_nll.png)",
        "",
        "Reconstructions (first row: originals; then one row per tokenizer, in the table's order):",
        "",
        "![reconstructions](reconstructions.png)",
        "",
        "SiT samples without CFG (one row per tokenizer):",
        "",
        "![samples](samples.png)",
        "",
        "Latent maps of the test latents, coloured by class: "
        + ", ".join(f"[{r['label']}]({slug}/latent_map.png) ({r['latent_map_method']})" for slug, r in results.items()),
        "",
        "| tokenizer | " + " | ".join(next(iter(results.values()))["timings_s"]) + " |",
        "|---|" + "---|" * len(next(iter(results.values()))["timings_s"]),
    ]
    for r in results.values():
        lines.append(f"| {r['label']} | " + " | ".join(format_seconds(v) for v in r["timings_s"].values()) + " |")
    path = out / "study.md"
    path.write_text("\n".join(lines) + "\n")
    return path

