"""``maetok demo``: the main job on the embedded Fashion-MNIST, sized for a 2-core CPU.

Stage 1 (mask modeling + HOG/pixel auxiliary decoders) and stage 2 (pixel-decoder fine-tuning) of the
``fashion-mnist-maetok`` preset, then PSNR/SSIM on the test split, training curves, a reconstruction grid,
and ``DIR/report.md`` tying them together.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from maetok.config import TokenizerTrainConfig, load_config
from maetok.data import build_dataset, save_side_by_side
from maetok.eval.plots import plot_training_curves
from maetok.eval.reconstruction import evaluate_reconstruction
from maetok.models.tokenizer import MAETok
from maetok.train.tokenizer import TokenizerTrainer


@dataclass
class DemoBudget:
    stage1_steps: int
    stage2_steps: int
    eval_images: Optional[int]  # None = the whole test split


FULL = DemoBudget(stage1_steps=1200, stage2_steps=300, eval_images=None)
QUICK = DemoBudget(stage1_steps=12, stage2_steps=6, eval_images=256)


def _fmt(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def run_demo(out: Path, quick: bool = False, device: Optional[str] = None) -> Path:
    budget = QUICK if quick else FULL
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    eval_every = max(1, budget.stage1_steps // 4)
    overrides = [
        f"train.steps={budget.stage1_steps}",
        f"train.eval_every={eval_every}",
        f"train.ckpt_every={eval_every}",
        f"train.log_every={max(1, min(20, budget.stage1_steps // 6))}",
        f"finetune.steps={budget.stage2_steps}",
        f"finetune.mask_decay_steps={max(1, int(budget.stage2_steps * 0.8))}",
    ]
    cfg = load_config(TokenizerTrainConfig, "fashion-mnist-maetok", overrides)

    start = time.perf_counter()
    TokenizerTrainer(cfg, out / "stage1", stage="pretrain", device=device).fit()
    timings["stage 1 (mask modeling)"] = time.perf_counter() - start

    start = time.perf_counter()
    TokenizerTrainer(cfg, out / "tokenizer", stage="finetune", init_from=out / "stage1", device=device).fit()
    timings["stage 2 (decoder fine-tuning)"] = time.perf_counter() - start

    start = time.perf_counter()
    test_set = build_dataset(cfg.data.dataset, "test", cfg.model.image_size, cfg.model.in_channels)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    results = {}
    for name, model_dir in (("stage 1", out / "stage1" / "model"), ("stage 2", out / "tokenizer" / "model")):
        model = MAETok.from_pretrained(model_dir).to(dev)
        results[name] = evaluate_reconstruction(model, test_set, budget.eval_images)
    timings["evaluation"] = time.perf_counter() - start

    originals = torch.stack([test_set[i][0] for i in range(16)]).to(dev)
    with torch.no_grad():
        recon = model.decode(model.encode(originals)).clamp(-1, 1)
    save_side_by_side(originals, recon, out / "reconstructions.png", pairs_per_row=8)
    plot_training_curves(
        {"stage 1": out / "stage1" / "log.csv", "stage 2": out / "tokenizer" / "log.csv"},
        out / "training_curves.png",
        keys=("loss", "mse", "aux_hog", "eval_psnr"),
        step_offsets={"stage 2": budget.stage1_steps},
    )
    (out / "metrics.json").write_text(json.dumps({"reconstruction": results, "timings_s": timings}, indent=2))
    report = _write_report(out, cfg, budget, results, timings)
    return report


def _write_report(out: Path, cfg: TokenizerTrainConfig, budget: DemoBudget, results: dict, timings: dict) -> Path:
    m = cfg.model
    n_eval = next(iter(results.values()))["num_images"]
    lines = [
        "# maetok demo: MAETok on Fashion-MNIST",
        "",
        f"Tokenizer `fashion-mnist-maetok`: {m.image_size}x{m.image_size}x{m.in_channels} images, patch {m.patch_size} "
        f"({m.grid_size[0] * m.grid_size[1]} tokens) -> {m.num_latent_tokens} latent tokens x {m.latent_dim} channels; "
        f"encoder/decoder {m.encoder_depth}/{m.decoder_depth} blocks of width {m.encoder_width}; "
        f"auxiliary decoders ({m.aux_depth} blocks): {', '.join(t.name for t in m.aux_targets)}; "
        f"mask ratio {m.mask_ratio_min:.0%}-{m.mask_ratio_max:.0%}.",
        "",
        f"Stage 1: {budget.stage1_steps} steps of batch {cfg.train.batch_size}. "
        f"Stage 2: {budget.stage2_steps} steps, encoder frozen, mask ratio "
        f"{cfg.finetune.mask_ratio_start:.0%} -> {cfg.finetune.mask_ratio_end:.0%}.",
        "",
        f"## Reconstruction on the Fashion-MNIST test split ({n_eval} images)",
        "",
        "| model | PSNR (dB) | SSIM (data_range=1) | SSIM (data_range=2, common convention) |",
        "|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(f"| {name} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['ssim_dr2']:.4f} |")
    lines += [
        "",
        "![reconstructions](reconstructions.png)",
        "",
        "Pairs of original | stage-2 reconstruction.",
        "",
        "## Training curves",
        "",
        "![training curves](training_curves.png)",
        "",
        "## Wall time",
        "",
        "| phase | time |",
        "|---|---|",
    ]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in timings.items()]
    lines += [f"| total | {_fmt(sum(timings.values()))} |", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
