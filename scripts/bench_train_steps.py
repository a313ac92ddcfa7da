"""Seconds per training step of the real trainers (tokenizer stage 1 on Fashion-MNIST, SiT on a latent cache), for
comparing two trees on one machine: PYTHONPATH=TREE python3 scripts/bench_train_steps.py LATENT_CACHE LABEL."""
import sys
import tempfile
import time
from pathlib import Path

import torch

from maetok.config import DiffusionTrainConfig, TokenizerTrainConfig, load_config
from maetok.train.diffusion import DiffusionTrainer
from maetok.train.tokenizer import TokenizerTrainer

torch.set_num_threads(2)
latents, steps = sys.argv[1], 80
common = [f"train.steps={steps}", "train.eval_every=100000", "train.ckpt_every=100000", "train.log_every=100000"]


def timed(trainer) -> float:
    """Median seconds of the training steps after the 10th (data loading included; logs / checkpoints excluded)."""
    stamps, step = [], trainer.train_step

    def stamped(batch):
        out = step(batch)
        stamps.append(time.perf_counter())
        return out

    trainer.train_step = stamped
    trainer.fit(stop_at=steps - 1)  # no export, no final evaluation
    gaps = sorted(b - a for a, b in zip(stamps[10:], stamps[11:]))
    return gaps[len(gaps) // 2]


with tempfile.TemporaryDirectory() as tmp:
    cfg = load_config(TokenizerTrainConfig, "tiny-maetok", common)
    tok = timed(TokenizerTrainer(cfg, Path(tmp) / "tok", device="cpu"))
    cfg = load_config(DiffusionTrainConfig, "tiny-sit", common + [f"latents={latents}"])
    sit = timed(DiffusionTrainer(cfg, Path(tmp) / "sit", device="cpu"))
print(f"{sys.argv[2]}: tokenizer stage-1 step (batch 32) {tok * 1000:.1f} ms, SiT step (batch 128) {sit * 1000:.1f} ms")
