"""One-shot GPU check: the CUDA code paths on tiny runs, then bf16 throughput of the paper-size presets.

    python3 scripts/gpu_check.py --out DIR [--tokenizer-batch 64] [--skip-compile]
    python3 scripts/gpu_check.py --out DIR --device cpu --paths-only     # a dry run of the first part on a CPU

Teachers (DINOv2-L, SigLIP-so400m) and the DINOv2-S discriminator backbone are built with random weights of the
real architectures when their weights are not at hand: throughput and memory do not depend on the values.
Prints one line per figure and writes ``DIR/gpu_check.json``. Every part is guarded, so one failure does not
hide the others.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# the real architectures' shapes (Hugging Face configs of facebook/dinov2-large, google/siglip-so400m-patch14-384,
# facebook/dinov2-small), for randomly initialised stand-ins
DINOV2_L = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, patch_size=14,
                image_size=518)
SIGLIP_SO400M = dict(hidden_size=1152, num_hidden_layers=27, num_attention_heads=16, intermediate_size=4304,
                     patch_size=14, image_size=384)
DINOV2_S = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536, patch_size=14,
                image_size=518)

RESULTS: dict = {}
DEVICE = "cuda"
OUT = None


def section(name: str):
    def wrap(fn):
        def run(*args, **kwargs):
            start = time.perf_counter()
            print(f"\n== {name}", flush=True)
            try:
                RESULTS[name] = fn(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - keep going, report it
                traceback.print_exc()
                RESULTS[name] = {"error": f"{type(err).__name__}: {err}"}
            print(f"   ({time.perf_counter() - start:.1f} s)", flush=True)
            if OUT is not None:  # after every part, so a run cut short still leaves its figures
                (OUT / "gpu_check.json").write_text(json.dumps(RESULTS, indent=2, default=str))
        return run
    return wrap


def image_folder(root: Path, n: int = 64, size: int = 40) -> Path:
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n // 2):
            Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(root / cls / f"{i}.png")
    return root


TINY = ["model.image_size=32", "model.in_channels=3", "model.patch_size=8", "model.encoder_width=64",
        "model.encoder_depth=2", "model.encoder_heads=2", "model.decoder_width=64", "model.decoder_depth=2",
        "model.decoder_heads=2", "model.aux_width=64", "model.aux_heads=2", "model.aux_depth=1",
        "model.num_latent_tokens=8", "model.latent_dim=8", "train.batch_size=16", "train.log_every=1",
        "train.eval_every=4", "train.ckpt_every=2", "optim.warmup_steps=2", "data.eval_images=8",
        "train.precision=bf16"]


@section("cuda paths: tokenizer stage 1 + 2 (GAN hand-over), resume, latent cache, SiT, sampling (bf16)")
def cuda_paths(work: Path) -> dict:
    from maetok.config import DiffusionTrainConfig, TokenizerTrainConfig, load_config
    from maetok.data import build_dataset
    from maetok.diffusion.generator import LatentGenerator
    from maetok.encode import cache_latents
    from maetok.models.tokenizer import MAETok
    from maetok.train.diffusion import DiffusionTrainer
    from maetok.train.tokenizer import TokenizerTrainer

    data = image_folder(work / "images")
    gan = ["loss.gan_weight=0.4", "loss.gan_backbone=vgg16", "loss.gan_start=2", "loss.perceptual_weight=1.0",
           "model.aux_targets=[{name: hog}, {name: pixel}]", "finetune.steps=4"]
    cfg = load_config(TokenizerTrainConfig, "tiny-maetok", TINY + gan + [f"data.dataset={data}", "train.steps=6"])
    straight = TokenizerTrainer(cfg, work / "s1", device=DEVICE)
    straight.fit()
    TokenizerTrainer(cfg, work / "s1b", device=DEVICE).fit(stop_at=3)
    resumed = TokenizerTrainer(cfg, work / "s1b", resume=True, device=DEVICE)
    resumed.fit()
    diffs = [(a - b).abs().max().item() for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values())
             if a.is_floating_point()]
    stage2 = TokenizerTrainer(cfg, work / "s2", stage="finetune", init_from=work / "s1", device=DEVICE)
    continued = stage2.objective.adversarial.generator_start_step == 0
    stage2.fit()
    tok = MAETok.from_pretrained(work / "s2" / "model").to(DEVICE)
    train = build_dataset(str(data), "train", 32, 3)
    cache_latents(tok, train, work / "lat", work / "s2" / "model", progress=False)
    dcfg = load_config(DiffusionTrainConfig, "tiny-sit",
                       [f"latents={work / 'lat'}", "train.steps=6", "train.batch_size=16", "train.eval_every=3",
                        "train.ckpt_every=3", "train.precision=bf16", "sampling.grid_steps=4"])
    DiffusionTrainer(dcfg, work / "sit", device=DEVICE).fit()
    pipe = LatentGenerator.load(work / "sit", device=DEVICE)
    latents = pipe.sample_latents(torch.tensor([0, 1]), 2, steps=8, generator=torch.Generator().manual_seed(0))
    images = tok.decode(latents)
    out = {"resume_max_abs_diff": max(diffs), "stage2_continued_stage1_discriminator": continued,
           "sample_finite": bool(torch.isfinite(images).all()), "sample_shape": list(images.shape)}
    print(out, flush=True)
    return out


def bench(kind: str, **kwargs) -> dict:
    from maetok import bench as b

    fn = {"tokenizer": b.bench_tokenizer, "diffusion": b.bench_diffusion_train, "sampling": b.bench_sampling}[kind]
    result = fn(device=torch.device(DEVICE), **kwargs)
    print(b.format_row(result), flush=True)
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return result


def teachers_override() -> str:
    return ("model.aux_targets=[{name: hog}, "
            f"{{name: dinov2, options: {{size: l, config: {json.dumps(DINOV2_L)}}}}}, "
            f"{{name: siglip, options: {{size: so400m, config: {json.dumps(SIGLIP_SO400M)}}}}}]")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokenizer-batch", type=int, default=64, help="per-GPU batch (paper: 512 over 8 GPUs)")
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--paths-only", action="store_true", help="only the tiny end-to-end runs")
    args = parser.parse_args()
    global DEVICE, OUT
    DEVICE = args.device
    out = OUT = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if DEVICE == "cuda":
        if not torch.cuda.is_available():
            print("no CUDA device", file=sys.stderr)
            return 2
        props = torch.cuda.get_device_properties(0)
        RESULTS["device"] = {"name": props.name, "memory_gib": props.total_memory / 2**30, "torch": torch.__version__,
                             "cuda": torch.version.cuda}
        print(RESULTS["device"], flush=True)
    work = Path(tempfile.mkdtemp())

    cuda_paths(work)
    if args.paths_only:
        (out / "gpu_check.json").write_text(json.dumps(RESULTS, indent=2, default=str))
        return 0

    # a randomly initialised DINOv2-S folder for the paper's discriminator backbone
    import transformers

    disc_dir = work / "dinov2-small-random"
    transformers.Dinov2Model(transformers.Dinov2Config(**DINOV2_S)).save_pretrained(disc_dir)
    tb = args.tokenizer_batch
    full = [teachers_override(), "loss.gan_start=0", f"loss.gan_backbone_weights={disc_dir}"]
    section(f"maetok-b-128 stage 1, full objective (HOG + DINOv2-L + SigLIP-so400m, LPIPS, DINOv2-S GAN), batch {tb}")(
        bench)("tokenizer", preset="maetok-b-128", batch_size=tb, overrides=full)
    section(f"maetok-b-128 stage 1, MSE + mask modeling + HOG only, batch {tb}")(bench)(
        "tokenizer", preset="maetok-b-128", batch_size=tb,
        overrides=["model.aux_targets=[{name: hog}]", "loss.perceptual_weight=0", "loss.gan_weight=0"])
    section("maetok-b-128-512 stage 1, MSE + HOG, batch 16")(bench)(
        "tokenizer", preset="maetok-b-128-512", batch_size=16,
        overrides=["model.aux_targets=[{name: hog}]", "loss.perceptual_weight=0", "loss.gan_weight=0"])
    for preset in ("sit-xl", "lightningdit-xl"):
        section(f"{preset} training, batch 256, 128 x 32 latents")(bench)(
            "diffusion", preset=preset, latent_shape=(128, 32), num_classes=1000, batch_size=256, overrides=[])
    section("sit-xl sampling, Euler-Maruyama 250 steps, CFG 1.9 in [0, 0.75], batch 256")(bench)(
        "sampling", preset="sit-xl", latent_shape=(128, 32), num_classes=1000, batch_size=256, steps=250, overrides=[])
    if not args.skip_compile:
        section("sit-xl training, batch 256, torch.compile")(bench)(
            "diffusion", preset="sit-xl", latent_shape=(128, 32), num_classes=1000, batch_size=256,
            overrides=["train.compile=true"])
    (out / "gpu_check.json").write_text(json.dumps(RESULTS, indent=2, default=str))
    print(json.dumps(RESULTS, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
