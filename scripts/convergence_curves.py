"""PSNR of held-out reconstructions against training wall-clock time, for candidate tokenizer recipes.

    python3 scripts/convergence_curves.py --out DIR [--candidates NAME ...] [--eval-images 1000]

Each candidate is the ``tiny-maetok`` preset plus overrides (below). Stage 1 trains for its step count,
then stage 2 (frozen encoder, decoder fine-tuned while the mask ratio decays) from the stage-1 model; every
``--points`` of each stage the EMA model reconstructs the first ``--eval-images`` test images and the PSNR is
recorded against the training seconds spent so far (evaluation time excluded). Writes ``DIR/curves.json`` and
``DIR/curves.png``, with the PSNR of PCA with as many components as the latents have numbers (fitted on 20k
training images) as the line to cross; run it alone on the machine, since the time axis is wall clock.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from maetok.config import TokenizerTrainConfig, load_config
from maetok.data import build_dataset, load_images
from maetok.data.images import to_uint8
from maetok.encode import reconstruct_images
from maetok.eval.metrics import psnr
from maetok.train.tokenizer import TokenizerTrainer

MSE_ONLY = ["loss.perceptual_weight=0", "loss.gan_weight=0"]
HOG_PIXEL = "model.aux_targets=[{name: hog}, {name: pixel}]"
CANDIDATES: dict[str, list[str]] = {
    "preset (p8 w128 d4, lr 1e-3, b128, HOG+pixel+VGG16)": [],
    "lr 2e-3": ["optim.lr=2e-3"],
    "batch 64": ["train.batch_size=64"],
    "HOG + pixel aux only": [HOG_PIXEL],
    "patch 4 (64 tokens)": ["model.patch_size=4"],
    "w192 d4": ["model.encoder_width=192", "model.decoder_width=192", "model.encoder_heads=4",
                "model.decoder_heads=4"],
    "b32 lr 2e-3": ["train.batch_size=32", "optim.lr=2e-3"],
    "b32 lr 2e-3 HOG+pixel": ["train.batch_size=32", "optim.lr=2e-3", HOG_PIXEL],
    "b32 lr 2e-3 no mask (AE)": ["train.batch_size=32", "optim.lr=2e-3", "model.variant=ae",
                                 "model.mask_ratio_min=0", "model.mask_ratio_max=0", "model.aux_targets=[]"],
    "b32 lr 5e-3 no mask (AE)": ["train.batch_size=32", "optim.lr=5e-3", "model.variant=ae",
                                 "model.mask_ratio_min=0", "model.mask_ratio_max=0", "model.aux_targets=[]"],
    "b32 lr 2e-3 patch 4 no mask (AE)": ["train.batch_size=32", "optim.lr=2e-3", "model.variant=ae", "model.patch_size=4",
                                         "model.mask_ratio_min=0", "model.mask_ratio_max=0", "model.aux_targets=[]"],
    "b32 lr 2e-3 HOG+pixel patch 4": ["train.batch_size=32", "optim.lr=2e-3", HOG_PIXEL, "model.patch_size=4"],
}


def eval_psnr(trainer: TokenizerTrainer, images: torch.Tensor) -> float:
    return psnr(to_uint8(images), to_uint8(reconstruct_images(trainer.inference_model(), images)))


def run_stage(trainer: TokenizerTrainer, total: int, points: int, images: torch.Tensor, offset_s: float,
              curve: list, stage: str) -> float:
    """Train ``trainer`` to ``total`` steps in ``points`` pieces; append (seconds, step, psnr, stage) rows."""
    elapsed = offset_s
    marks = sorted({max(1, round(total * (i + 1) / points)) for i in range(points)})
    for mark in marks:
        start = time.perf_counter()
        trainer.fit(stop_at=mark)
        elapsed += time.perf_counter() - start
        value = eval_psnr(trainer, images)
        curve.append({"seconds": elapsed, "step": mark, "psnr": value, "stage": stage})
        print(f"  {stage} step {mark:5d}  {elapsed:7.1f} s  PSNR {value:.2f} dB", flush=True)
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--candidates", nargs="*", default=None, help="names of CANDIDATES (default all)")
    parser.add_argument("--extra", nargs="*", default=[], help="overrides added to every candidate")
    parser.add_argument("--stage1-steps", type=int, default=300)
    parser.add_argument("--stage2-steps", type=int, default=100)
    parser.add_argument("--points", type=int, default=5, help="evaluations per stage")
    parser.add_argument("--eval-images", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    test = build_dataset("fashion-mnist", "test", 32, 1)
    images, _ = load_images(test, range(args.eval_images))
    results_path = out / "curves.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if "pca" not in results:
        results["pca"] = pca_reference(images)
        results_path.write_text(json.dumps(results, indent=2))
    print(f"[curves] PCA-{results['pca']['dim']}: {results['pca']['psnr']:.2f} dB", flush=True)
    for name in args.candidates if args.candidates is not None else list(CANDIDATES):
        overrides = CANDIDATES.get(name, [])
        label = name if not args.extra else f"{name} + {' '.join(args.extra)}"
        if label in results:
            print(f"[curves] {label}: done before, kept")
            continue
        s1, s2 = args.stage1_steps, args.stage2_steps
        steps = [f"train.steps={s1}", f"finetune.steps={s2}", f"finetune.mask_decay_steps={max(1, int(s2 * 0.7))}",
                 f"train.eval_every={10 * s1}", f"train.ckpt_every={10 * s1}", "train.log_every=10"]
        cfg = load_config(TokenizerTrainConfig, "tiny-maetok", steps + MSE_ONLY + overrides + args.extra)
        print(f"[curves] {label}", flush=True)
        run_dir = out / f"run{len(results)}"
        curve: list = []
        stage1 = TokenizerTrainer(cfg, run_dir / "stage1")
        elapsed = run_stage(stage1, s1, args.points, images, 0.0, curve, "stage 1")
        stage2 = TokenizerTrainer(cfg, run_dir / "stage2", stage="finetune", init_from=run_dir / "stage1")
        run_stage(stage2, s2, args.points, images, elapsed, curve, "stage 2")
        results[label] = {"overrides": overrides + args.extra, "curve": curve}
        results_path.write_text(json.dumps(results, indent=2))
    plot(results, out / "curves.png")
    return 0


def pca_reference(images: torch.Tensor, num_train: int = 20000) -> dict:
    """PSNR of PCA with as many components as the preset's latent numbers (L x H), fitted on the first
    ``num_train`` training images: the line every candidate has to cross."""
    from maetok.eval.baselines import PCABaseline

    cfg = load_config(TokenizerTrainConfig, "tiny-maetok")
    dim = cfg.model.num_latent_tokens * cfg.model.latent_dim
    train = build_dataset("fashion-mnist", "train", 32, 1)
    fit, _ = load_images(train, range(num_train))
    pca = PCABaseline.fit(fit, dim)
    return {"dim": dim, "num_train": num_train, "psnr": psnr(to_uint8(images), to_uint8(pca.reconstruct(images)))}


def plot(results: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for label, entry in results.items():
        if label == "pca":
            ax.axhline(entry["psnr"], color="k", linestyle="--", label=f"PCA-{entry['dim']} ({entry['psnr']:.2f} dB)")
            continue
        curve = entry["curve"]
        ax.plot([p["seconds"] / 60 for p in curve], [p["psnr"] for p in curve], marker="o", label=label)
    ax.set_xlabel("training wall-clock minutes (2-core CPU; evaluation excluded)")
    ax.set_ylabel("PSNR, 1000 Fashion-MNIST test images (dB)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
