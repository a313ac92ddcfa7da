"""Short probes of the CPU tokenizer's architecture and step cost (BENCHMARKS.md, "Convergence per CPU-second").

    python3 scripts/architecture_probe.py train --name base [--steps 600] [--lr 2e-3] [--set KEY=VALUE ...] [--compile]
    python3 scripts/architecture_probe.py throughput

``train``: the ``tiny-maetok`` preset as a plain autoencoder (no masking, no auxiliary decoders; ``--set``
adds config overrides such as ``model.encoder_heads=16``), MSE only, batch 32, AdamW with the preset's betas and
weight-decay rule, 100 warmup steps then cosine to 5%, gradients clipped at 1.0; PSNR (per image, on the float
reconstructions before uint8 rounding) of the raw (non-EMA) weights on the first 1000 test images at a third, two thirds and the end of the run, against training seconds
(evaluation excluded). A line per run is appended to ``--log`` (JSON).

``throughput``: img/s of the same model's training step at batch 32 ... 256, float32 and bfloat16 autocast.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

from maetok.config import TokenizerTrainConfig, load_config
from maetok.data import build_dataset, load_images
from maetok.encode import reconstruct_images
from maetok.models.tokenizer import MAETok
from maetok.train.loop import make_adamw

AE = ["model.variant=ae", "model.mask_ratio_min=0", "model.mask_ratio_max=0", "model.aux_targets=[]"]


def psnr_per_image(model: MAETok, images: torch.Tensor) -> float:
    """Mean over images of the PSNR of ``model``'s reconstructions (images in [-1, 1], peak 2)."""
    model.eval()
    recon = reconstruct_images(model, images)
    model.train()
    mse = ((recon - images) / 2).pow(2).mean(dim=(1, 2, 3))
    return (10 * torch.log10(1 / mse)).mean().item()


def train(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    cfg = load_config(TokenizerTrainConfig, "tiny-maetok", AE + args.set)
    model = MAETok(cfg.model)
    train_set = build_dataset("fashion-mnist", "train", 32, 1)
    test_set = build_dataset("fashion-mnist", "test", 32, 1)
    data, _ = load_images(train_set)
    held_out, _ = load_images(test_set, range(1000))
    cfg.optim.lr = args.lr
    optimizer = make_adamw(model.named_parameters(), cfg.optim)
    forward = torch.compile(model) if args.compile else model
    generator = torch.Generator().manual_seed(0)
    curve, elapsed = [], 0.0
    for step in range(args.steps):
        start = time.perf_counter()
        factor = min(1, (step + 1) / 100) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for group in optimizer.param_groups:
            group["lr"] = args.lr * factor
        batch = data[torch.randint(0, len(data), (32,), generator=generator)]
        loss = F.mse_loss(forward(batch).reconstruction, batch)  # an AE without masking: no random draws
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        elapsed += time.perf_counter() - start
        if (step + 1) % (args.steps // 3) == 0:
            value = psnr_per_image(model, held_out)
            curve.append((step + 1, round(elapsed, 1), round(value, 2)))
            print(f"{args.name} step {step + 1} {elapsed:.0f} s PSNR {value:.2f} dB", flush=True)
    with open(args.log, "a") as handle:
        handle.write(json.dumps({"name": args.name, "set": args.set, "lr": args.lr, "compile": args.compile,
                                 "curve": curve}) + "\n")


def throughput(_: argparse.Namespace) -> None:
    cfg = load_config(TokenizerTrainConfig, "tiny-maetok", AE)
    for dtype in (torch.float32, torch.bfloat16):
        for batch_size in (32, 64, 128, 256):
            model = MAETok(cfg.model)
            optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
            batch = torch.randn(batch_size, 1, 32, 32)

            def step() -> None:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                    loss = F.mse_loss(model(batch).reconstruction.float(), batch)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()

            for _ in range(3):
                step()
            repeats = max(3, 1024 // batch_size)
            start = time.perf_counter()
            for _ in range(repeats):
                step()
            rate = repeats * batch_size / (time.perf_counter() - start)
            print(f"{str(dtype).split('.')[-1]:9s} batch {batch_size:4d}: {rate:6.0f} img/s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    probe = sub.add_parser("train")
    probe.add_argument("--name", required=True)
    probe.add_argument("--steps", type=int, default=600)
    probe.add_argument("--lr", type=float, default=2e-3)
    probe.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    probe.add_argument("--compile", action="store_true")
    probe.add_argument("--log", default="architecture_probe.jsonl")
    sub.add_parser("throughput")
    args = parser.parse_args()
    (train if args.what == "train" else throughput)(args)


if __name__ == "__main__":
    main()
