"""``maetok bench``: throughput of the training steps and of sampling, with FLOPs counted by PyTorch's
``FlopCounterMode`` (so achieved TFLOP/s and, on GPUs with a known peak, MFU are real measurements),
and peak memory. Synthetic inputs of the right shapes; nothing is trained to convergence.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from maetok.config import DiffusionTrainConfig, TokenizerTrainConfig, load_config
from maetok.global_batch import SampleRandom
from maetok.train.loop import autocast

# dense bf16 peak (TFLOP/s) of GPUs we know, for MFU
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.0}


def _peak_tflops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step: Callable[[], None], items_per_step: int, device: torch.device, warmup: int, iters: int,
            count_step: Optional[Callable[[], None]] = None) -> dict:
    """Time ``step`` (after ``warmup`` calls), count its FLOPs once (on ``count_step``, the same work without
    ``torch.compile``, when given); returns img/s, TFLOP/s, MFU, peak memory."""
    with FlopCounterMode(display=False) as counter:
        (count_step or step)()
    flops = counter.get_total_flops()
    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    seconds = (time.perf_counter() - start) / iters
    result = {
        "img_per_s": items_per_step / seconds,
        "step_s": seconds,
        "gflop_per_img": flops / items_per_step / 1e9,
        "achieved_tflops": flops / seconds / 1e12,
    }
    peak = _peak_tflops(device)
    if peak:
        result["mfu"] = result["achieved_tflops"] / peak
    if device.type == "cuda":
        result["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def bench_tokenizer(preset: str, batch_size: int, device: torch.device, overrides: list[str], warmup: int = 2, iters: int = 5) -> dict:
    """One stage-1 training step (forward with masking, the full configured objective, backward, AdamW)."""
    from maetok.models.tokenizer import MAETok
    from maetok.train.loop import make_adamw
    from maetok.train.tokenizer import build_objective

    cfg = load_config(TokenizerTrainConfig, preset, overrides)
    m = cfg.model
    objective = build_objective(cfg, with_targets=True, device=device)
    model = MAETok(m, {n: t.dim for n, t in objective.targets.items()}).to(device)
    optimizer = make_adamw(model.named_parameters(), cfg.optim)
    images = torch.rand(batch_size, m.in_channels, m.image_size, m.image_size, device=device) * 2 - 1
    draws = SampleRandom.for_batch(0, 0, batch_size)  # masks, VAE noise, DiffAugment, as a trainer's step draws
    ratio = (m.mask_ratio_min, m.mask_ratio_max) if m.mask_ratio_max > 0 else None
    step_index = [max(cfg.loss.gan_start, 0)]

    def step() -> None:
        with autocast(cfg.train.precision, device):
            out = model(images, ratio, draws)
        loss, _ = objective.generator_loss(out, images, step_index[0], model.last_decoder_layer(), draws=draws)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with autocast(cfg.train.precision, device):
            objective.discriminator_step(images, out.reconstruction.detach(), step_index[0], draws=draws)

    counts = model.parameter_counts()
    return {"what": f"tokenizer train step ({preset}, batch {batch_size})", "params_m": counts["tokenizer (encoder + decoder)"] / 1e6,
            **measure(step, batch_size, device, warmup, iters)}


def tokenizer_latent_shape(preset: str, overrides: list[str]) -> tuple[int, int]:
    """``(L, H)``: the latents of a tokenizer preset, what a diffusion model trained on its cache sees."""
    m = load_config(TokenizerTrainConfig, preset, overrides).model
    return m.num_latent_tokens, m.latent_dim


def _diffusion_model(preset: str, latent_shape: tuple[int, int], num_classes: int, overrides: list[str]):
    from maetok.models.sit import build_diffusion_model

    cfg = load_config(DiffusionTrainConfig, preset, overrides)
    return cfg, build_diffusion_model(cfg.model.for_latents(latent_shape, num_classes))


def bench_diffusion_train(preset: str, latent_shape: tuple[int, int], num_classes: int, batch_size: int, device: torch.device,
                          overrides: list[str], warmup: int = 2, iters: int = 5) -> dict:
    from maetok.diffusion.transport import training_loss
    from maetok.train.loop import make_adamw

    cfg, model = _diffusion_model(preset, latent_shape, num_classes, overrides)
    model = model.to(device).train()
    optimizer = make_adamw(model.named_parameters(), cfg.optim)
    x0 = torch.randn(batch_size, *latent_shape, device=device)
    y = torch.randint(0, max(num_classes, 1), (batch_size,), device=device) if num_classes else None
    network = torch.compile(model) if cfg.train.compile else model
    draws = SampleRandom.for_batch(0, 0, batch_size)  # times, noise, label dropout, as a trainer's step draws
    label_dropout = model.y_embedder.dropout_prob if model.y_embedder is not None else 0.0

    def step(net: torch.nn.Module = network) -> None:
        with autocast(cfg.train.precision, device):
            loss, _ = training_loss(net, x0, y, draws, time_sampling=cfg.transport.time_sampling,
                                    cosine_loss_weight=cfg.transport.cosine_loss_weight, label_dropout=label_dropout)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    params = sum(p.numel() for p in model.parameters()) / 1e6
    compiled = ", torch.compile" if cfg.train.compile else ""
    return {"what": f"diffusion train step ({preset}, batch {batch_size}, latents {latent_shape}{compiled})", "params_m": params,
            **measure(step, batch_size, device, warmup, iters, count_step=lambda: step(model))}


def bench_sampling(preset: str, latent_shape: tuple[int, int], num_classes: int, batch_size: int, steps: int, device: torch.device,
                   overrides: list[str], iters: int = 1) -> dict:
    """Generating ``batch_size`` latents with the preset's sampler, steps and CFG (decoding excluded)."""
    from maetok.data.latents import LatentNormalizer
    from maetok.diffusion.generator import LatentGenerator

    cfg, model = _diffusion_model(preset, latent_shape, num_classes, overrides)
    model = model.to(device).eval()
    norm = LatentNormalizer({"mean": 0.0, "std": 1.0}, "scalar")
    pipe = LatentGenerator(model, norm, [], cfg.sampling, None)
    labels = torch.arange(batch_size) % num_classes if num_classes else None
    s = cfg.sampling

    def step() -> None:
        with autocast(cfg.train.precision, device):
            pipe.sample_latents(labels, batch_size, steps=steps, generator=torch.Generator().manual_seed(0))

    what = f"sampling ({preset}, {s.sampler}, {steps} steps, CFG {s.cfg_scale} in [{s.guidance_low}, {s.guidance_high}], batch {batch_size})"
    return {"what": what, **measure(step, batch_size, device, warmup=0, iters=iters)}


def format_row(result: dict) -> str:
    parts = [f"{result['img_per_s']:9.1f} img/s", f"{result['gflop_per_img']:8.3f} GFLOP/img", f"{result['achieved_tflops']:7.3f} TFLOP/s"]
    if "mfu" in result:
        parts.append(f"MFU {result['mfu'] * 100:5.1f}%")
    if "peak_mem_gib" in result:
        parts.append(f"peak {result['peak_mem_gib']:.2f} GiB")
    return f"{result['what']}\n    " + "  ".join(parts)
