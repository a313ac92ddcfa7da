"""The ``maetok`` command. Each subcommand is one arrow of the data flow in the README."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from maetok.config import DEFAULT_MAX_IMAGE_PIXELS

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str):
    def wrap(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = fn
        return fn

    return wrap


# ---------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------


def _tokenizer_config(preset: str, data: Optional[str], overrides: list[str]):
    """The config of ``train-tokenizer``: ``preset`` + ``overrides``, its channels and image size fitted to the data
    unless set (:func:`~maetok.data.data_shape_overrides`, said in one line)."""
    from maetok.config import TokenizerTrainConfig, load_config
    from maetok.data import data_shape_overrides

    extra = [f"data.dataset={data}"] if data else []
    cfg = load_config(TokenizerTrainConfig, preset, extra + overrides)
    shape_overrides, shape = data_shape_overrides(cfg.data.dataset, preset, extra + overrides)
    print(f"[maetok] data: {shape.reason}", flush=True)
    return load_config(TokenizerTrainConfig, preset, extra + overrides + shape_overrides)


@command("train-tokenizer")
def cmd_train_tokenizer(args: argparse.Namespace) -> int:
    from maetok.train.tokenizer import TokenizerTrainer

    cfg = _tokenizer_config(args.config, args.data, args.overrides)
    TokenizerTrainer(cfg, args.out, stage="pretrain", resume=args.resume, device=args.device,
                     overwrite=args.overwrite, allow_config_change=args.allow_config_change).fit()
    return 0


@command("finetune-decoder")
def cmd_finetune_decoder(args: argparse.Namespace) -> int:
    from maetok.config import TokenizerTrainConfig, load_config, to_dict
    from maetok.train.tokenizer import TokenizerTrainer, read_run_config

    cfg = load_config(TokenizerTrainConfig, to_dict(read_run_config(args.source)), args.overrides)
    TokenizerTrainer(cfg, args.out, stage="finetune", init_from=args.source, resume=args.resume, device=args.device,
                     overwrite=args.overwrite, allow_config_change=args.allow_config_change).fit()
    return 0


@command("reconstruct")
def cmd_reconstruct(args: argparse.Namespace) -> int:
    from maetok.data import pixel_limit
    from maetok.encode import reconstruct_files

    skipped: list = []
    written = reconstruct_files(args.model, args.input, args.out, device=args.device, batch_size=args.batch_size,
                                max_image_pixels=pixel_limit(args.max_image_pixels, "--max-image-pixels"),
                                skipped=skipped, recon_only=args.recon_only)
    kind = "reconstruction" if args.recon_only else "side-by-side"
    print(f"[maetok] wrote {len(written)} {kind} PNGs to {args.out} ({len(skipped)} unreadable input(s) skipped)")
    return 0


@command("convert")
def cmd_convert(args: argparse.Namespace) -> int:
    from maetok.model_folders import convert

    out = convert(args.source, args.out, args.to)
    files = "config.json + model.safetensors" if args.to == "maetok" else "config.json + diffusion_pytorch_model.safetensors"
    print(f"[maetok] {args.source} -> {out} ({args.to} format: {files})")
    return 0


def _print_diffusion_info(source: str, folder: Any) -> None:
    """``maetok info --model`` of a diffusion model (``folder``, read from ``source``): format, architecture,
    parameters, latents, classes."""
    from maetok.model_folders import load_diffusion_model

    model, folder = load_diffusion_model(folder, "cpu")
    arch = model.config
    params = sum(p.numel() for p in model.parameters())
    print(f"{source}: {arch.arch} (width {arch.width}, depth {arch.depth}, {arch.num_heads} heads), "
          f"format {folder.source_format}")
    print(f"  folder {folder.directory}")
    print(f"  on {arch.num_latent_tokens} x {arch.latent_dim} latents, {model.num_classes or 'no'} classes")
    print(f"  {'parameters':<32} {params / 1e6:8.2f}M")
    norm = folder.extras.get("latent_norm") or {}
    if folder.source_format == "authors-sit":
        print("  latent normalisation: the tokenizer's scalar mean / std (the authors' convention)")
    else:
        print(f"  latent normalisation: {norm.get('mode', 'none')} (stored with the model)")


def _print_model_info(source: str) -> None:
    """``maetok info --model``: detected format, parameter counts, latent shape and latent statistics."""
    from maetok.model_folders import is_diffusion_folder, read_folder, summarize

    folder = read_folder(source)  # config.json read and its format detected once
    if is_diffusion_folder(folder):
        _print_diffusion_info(source, folder)
        return
    s = summarize(folder)
    grid = s["image_size"] // s["patch_size"]
    print(f"{source}: {s['architecture']}, format {s['format']}")
    print(f"  folder {s['folder']}")
    print(f"  {s['image_size']}px, {s['channels']} channel{'s' if s['channels'] > 1 else ''}, patch {s['patch_size']} "
          f"({grid * grid} tokens) -> latents "
          f"{s['latent_shape'][0]} x {s['latent_shape'][1]}")
    for part, n in s["parameters"].items():
        print(f"  {part:<32} {n / 1e6:8.2f}M")
    stats = s["latent_statistics"]
    if stats is not None:
        print(f"  latent statistics: scalar mean {stats['mean']:g}, std {stats['std']:g} (their diffusion models "
              f"train on (latents - mean) / std)")
    else:
        print("  latent statistics: none in the model folder (cache-latents measures per-channel ones: stats.json)")
    if s.get("ignored_keys"):
        print(f"  keys unused by encode/decode, not loaded: {', '.join(s['ignored_keys'])}")


@command("info")
def cmd_info(args: argparse.Namespace) -> int:
    if args.model:
        _print_model_info(args.model)
        return 0
    import torch

    from maetok.config import (
        DIFFUSION_SIZES,
        PRESET_ALIASES,
        DiffusionTrainConfig,
        TokenizerTrainConfig,
        list_presets,
        load_config,
        read_preset,
    )
    from maetok.models.sit import build_diffusion_model
    from maetok.models.tokenizer import MAETok
    from maetok.train.loop import describe_ema

    if args.sizes or not args.config:  # the size table that model.preset names
        print("diffusion transformer sizes (maetok.config.DIFFUSION_SIZES, MLP ratio 4):")
        for preset, size in DIFFUSION_SIZES.items():
            print(f"  {preset:<16} width {size.width:>5}   depth {size.depth:>3}   heads {size.num_heads:>3}")
        if args.sizes:
            return 0
    if not args.config:
        print("presets (" + ", ".join(f"{old} = {new}" for old, new in PRESET_ALIASES.items())
              + " under their former names; a folder's images set a tokenizer's channels and size unless given):")
    for name in [args.config] if args.config else list_presets():
        if "arch" in read_preset(name).get("model", {}):  # a diffusion preset
            cfg = load_config(DiffusionTrainConfig, name, args.overrides)
            # the latent shape and classes are the latent cache's at train time: counted only for given ones
            needs_classes = cfg.model.conditional and args.classes is None
            given = args.latent_shape is not None and not needs_classes
            shape = tuple(args.latent_shape) if given else (1, 1)
            classes = (args.classes or 0) if given else 0
            with torch.device("meta"):
                model = build_diffusion_model(cfg.model.for_latents(shape, classes))
            arch = model.config
            size = f"{name}: {arch.arch} {arch.size_name} (width {arch.width}, depth {arch.depth}, {arch.num_heads} heads)"
            if given:
                params = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
                print(f"{size} on {shape[0]} x {shape[1]} latents, {classes if arch.conditional else 'no'} classes")
                print(f"  {'parameters (+ fixed position table)':<32} {params / 1e6:8.2f}M")
            else:
                unresolved = "latent shape and classes come" if cfg.model.conditional else "latent shape comes"
                flags = "--latent-shape L H" + (" --classes N" if cfg.model.conditional else "")
                body = sum(p.numel() for key, p in model.named_parameters() if key.startswith(("blocks.", "t_embedder.")))
                print(f"{size}; its {unresolved} from the latent cache at train time")
                print(f"  {'parameters of blocks + time MLP':<32} {body / 1e6:8.2f}M (the whole model for given latents: "
                      f"{flags})")
            print(f"  {describe_ema(cfg.train)}")
            continue
        cfg = load_config(TokenizerTrainConfig, name, args.overrides)
        # feature heads are sized 1 (their size barely matters) except the caption decoder's vocabulary head
        from maetok.targets.text import DEFAULT_CONTEXT_LENGTH, VOCAB_SIZE

        aux = cfg.model.aux_targets
        dims = {t.name: VOCAB_SIZE if t.name == "text" else 1 for t in aux}
        lengths = {t.name: int(t.options.get("context_length", DEFAULT_CONTEXT_LENGTH)) for t in aux if t.name == "text"}
        with torch.device("meta"):
            model = MAETok(cfg.model, dims, lengths)
        m = cfg.model
        print(
            f"{name}: {m.variant}, {m.image_size}px, {m.in_channels} channel{'s' if m.in_channels > 1 else ''}, patch "
            f"{m.patch_size} ({m.grid_size[0] * m.grid_size[1]} tokens) -> {m.num_latent_tokens} x {m.latent_dim} latents"
        )
        for part, n in model.parameter_counts().items():
            print(f"  {part:<32} {n / 1e6:8.2f}M")
        print(f"  {describe_ema(cfg.train)}")
    return 0


@command("demo")
def cmd_demo(args: argparse.Namespace) -> int:
    from maetok.demo import run_demo

    report = run_demo(Path(args.out), quick=args.quick, device=args.device, data=args.data,
                      image_size=args.image_size, channels=args.channels)
    print(f"[maetok] demo report: {report}")
    return 0


@command("study")
def cmd_study(args: argparse.Namespace) -> int:
    import dataclasses

    from maetok.study import CPU_BUDGET, QUICK_BUDGET, run_study

    budget = QUICK_BUDGET if args.quick else CPU_BUDGET
    changes = {k: getattr(args, k) for k in ("stage1_steps", "stage2_steps", "diffusion_steps", "eval_images",
                                             "fid_samples", "fid_sampling_steps") if getattr(args, k) is not None}
    if args.full_objective:
        changes.update(stage1_loss="full", stage2_loss="full")
    budget = dataclasses.replace(budget, **changes)
    report = run_study(Path(args.out), args.variants, args.data, args.tokenizer_config, args.diffusion_config, budget,
                       args.tokenizer_overrides or (), args.diffusion_overrides or (), device=args.device,
                       gmm_pca_dim=args.gmm_pca_dim, seeds=args.seeds, only_finished=args.report_only)
    print(f"[maetok] study report: {report}")
    return 0


# ---------------------------------------------------------------------------------------------------------
# Latent diffusion
# ---------------------------------------------------------------------------------------------------------


@command("cache-latents")
def cmd_cache_latents(args: argparse.Namespace) -> int:
    from maetok.assets import resolve_pretrained
    from maetok.data import build_dataset, note_channel_conversion, pixel_limit
    from maetok.data.latents import read_latent_stats
    from maetok.encode import cache_latents, load_tokenizer
    from maetok.runs import model_directory

    max_image_pixels = pixel_limit(args.max_image_pixels, "--max-image-pixels")
    tokenizer = load_tokenizer(args.model, args.device)
    cfg = tokenizer.config
    dataset = build_dataset(args.data, args.split, cfg.image_size, cfg.in_channels, max_image_pixels=max_image_pixels)
    note_channel_conversion(args.data, cfg.in_channels)
    stats = cache_latents(
        tokenizer,
        dataset,
        args.out,
        tokenizer_dir=model_directory(resolve_pretrained(args.model)),  # a hub id: its local snapshot
        flip=args.flip,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        sample_posterior=args.sample_posterior,
        seed=args.seed,
    )
    summary = read_latent_stats(stats.parent)
    print(f"[maetok] cached {summary['num_items']} latents of {len(dataset)} listed images to {args.out} "
          f"({summary['num_skipped_images']} unreadable skipped, listed in {summary['skipped_list']}; {stats.name} written)")
    print(f"[maetok] latent mean {summary['mean']:.6g}, std {summary['std']:.6g} (diffusers: shift_factor "
          f"{summary['mean']:.6g}, scaling_factor {1 / summary['std']:.6g})")
    return 0


@command("train-diffusion")
def cmd_train_diffusion(args: argparse.Namespace) -> int:
    from maetok.config import DiffusionTrainConfig, load_config
    from maetok.train.diffusion import DiffusionTrainer

    cfg = load_config(DiffusionTrainConfig, args.config, [f"latents={args.latents}"] + args.overrides)
    DiffusionTrainer(cfg, args.out, resume=args.resume, device=args.device, overwrite=args.overwrite,
                     allow_config_change=args.allow_config_change).fit()
    return 0


@command("sample")
def cmd_sample(args: argparse.Namespace) -> int:
    from maetok.runs import hold_folder

    with hold_folder(args.out, "sampling"):  # no other process writes there until the samples are written
        return _sample(args)


def _sample(args: argparse.Namespace) -> int:
    import dataclasses

    from maetok.config import AUTHORS_SAMPLING, MAETOK_SAMPLING
    from maetok.diffusion.generator import LatentGenerator, generate_images, write_samples
    from maetok.encode import load_tokenizer
    from maetok.runs import resolve_device

    pipe = LatentGenerator.load(args.model, resolve_device(args.device))  # --device: default the GPU when there is one
    tokenizer = load_tokenizer(pipe.tokenizer_source(args.tokenizer), args.device)
    changes: dict[str, Any] = {}
    if args.convention is not None:
        changes.update(AUTHORS_SAMPLING if args.convention == "authors" else MAETOK_SAMPLING)
    flags = (("sampler", args.sampler), ("steps", args.steps), ("cfg_scale", args.cfg_scale),
             ("cfg_on", args.cfg_on), ("precision", args.precision), ("latent_norm", args.latent_norm),
             ("last_step", args.last_step), ("diffusion_form", args.diffusion_form), ("t_end", args.t_end))
    changes.update({k: v for k, v in flags if v is not None})
    if args.guidance_interval is not None:
        changes.update(guidance_low=args.guidance_interval[0], guidance_high=args.guidance_interval[1])
    sampling = dataclasses.replace(pipe.sampling, **changes)
    sampling.validate()
    normalizer = pipe.normalizer_for(sampling, tokenizer, args.latent_scalars)
    labels = None
    if args.labels:  # class names or ids (generator.resolve_class_labels)
        ids = pipe.resolve_labels([item for item in args.labels.split(",") if item.strip()])
        labels = ids.repeat(-(-args.num // len(ids)))[: args.num]
    images, label_array = generate_images(pipe, tokenizer, args.num, labels, sampling, args.batch_size, args.seed,
                                          normalizer=normalizer)
    paths = write_samples(args.out, images, label_array, png_limit=args.max_png)
    print(f"[maetok] {args.num} samples ({sampling.sampler}, {sampling.steps} steps, cfg {sampling.cfg_scale} on the "
          f"{sampling.cfg_on} in [{sampling.guidance_low}, {sampling.guidance_high}], {sampling.precision} state, "
          f"latent norm: {normalizer.mode}): {paths['grid']}, {paths['npz']}")
    return 0


@command("bench")
def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from maetok import bench
    from maetok.runs import resolve_device

    device = resolve_device(args.device)
    shape = tuple(args.latent_shape or bench.tokenizer_latent_shape(args.tokenizer_preset, args.tokenizer_overrides or []))
    print(f"[maetok bench] device {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f", {torch.get_num_threads()} threads"))
    if args.what in ("tokenizer", "all"):
        print(bench.format_row(bench.bench_tokenizer(args.tokenizer_preset, args.batch_size, device, args.tokenizer_overrides or [])))
    if args.what in ("diffusion", "all"):
        print(bench.format_row(bench.bench_diffusion_train(args.diffusion_preset, shape, args.classes, args.batch_size, device, args.diffusion_overrides or [])))
    if args.what in ("sampling", "all"):
        print(bench.format_row(bench.bench_sampling(args.diffusion_preset, shape, args.classes, args.sample_batch, args.steps, device, args.diffusion_overrides or [])))
    return 0


@command("assets")
def cmd_assets(args: argparse.Namespace) -> int:
    from maetok.assets import prepare_assets

    prepare_assets(verbose=True)
    return 0


# ---------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------


def _print_and_save(result: dict, out: Optional[str]) -> None:
    import json

    from maetok.runs import write_json

    text = json.dumps(result, indent=2, default=str)
    print(text)
    if out:
        write_json(out, result)


@command("baselines")
def cmd_baselines(args: argparse.Namespace) -> int:
    from maetok.eval.baselines import run_baselines

    r = run_baselines(args.data, args.dim, args.out, args.image_size, args.channels, args.num_train, args.num_eval,
                      lpips=not args.no_lpips, device=args.device, seed=args.seed)
    fid = r["fid_label"]
    pca, gauss, floor = r["pca"], r["gaussian"], r["real_vs_real"]

    def show(value: Any, spec: str = ".2f") -> str:
        return "n/a" if value is None else format(value, spec)

    print(f"[maetok] baselines on {args.data} ({r['image_size']}px, {r['channels']} channel(s)), written to {args.out}")
    print(f"  PCA-{pca['dim']} ({pca['explained_variance']:.1%} of the variance): PSNR {pca['psnr']:.2f} dB, "
          f"SSIM {pca['ssim']:.4f}, LPIPS {show(pca.get('lpips'), '.4f')}, r{fid} {show(pca.get('rfid'))}")
    kind = "class-conditional" if gauss["conditional"] else "unconditional"
    print(f"  {kind} Gaussian in the PCA space: g{fid} {show(gauss['gfid'])}")
    print(f"  real vs real ({floor['num_images']} training images against the eval images): {fid} {show(floor['fid'])}")
    return 0


@command("eval-recon")
def cmd_eval_recon(args: argparse.Namespace) -> int:
    from maetok.data import pixel_limit
    from maetok.eval.reconstruction import eval_recon

    result = eval_recon(args.model, args.data, num=args.num, split=args.split, batch_size=args.batch_size,
                        device=args.device, inception_weights=args.inception, fid=not args.no_fid,
                        lpips=not args.no_lpips, max_image_pixels=pixel_limit(args.max_image_pixels, "--max-image-pixels"))
    _print_and_save(result, args.json)
    return 0


@command("eval-gen")
def cmd_eval_gen(args: argparse.Namespace) -> int:
    from maetok.eval.generation import eval_gen

    result = eval_gen(args.samples, args.ref, num_ref=args.num_ref, save_ref=args.save_ref, batch_size=args.batch_size,
                      device=args.device, inception_weights=args.inception, ref_split=args.ref_split,
                      tokenizer=args.tokenizer, recon=args.recon, save_recon=args.save_recon, floor_data=args.floor_data)
    # what was measured against, and the Inception Score's caveat, on stderr: stdout stays one JSON document
    print(f"[maetok] eval-gen: {result['gfid_num_samples']} samples against {result['reference']}", file=sys.stderr)
    if result["inception_score"] is None:
        print(f"[maetok] eval-gen: Inception Score {result['inception_score_note']}", file=sys.stderr)
    _print_and_save(result, args.json)
    if "size_note" in result:
        print(f"maetok eval-gen: note: {result['size_note']}", file=sys.stderr)
    return 0


@command("analyze-latents")
def cmd_analyze_latents(args: argparse.Namespace) -> int:
    from maetok.eval.latents import analyze_latents

    result = analyze_latents(args.model, args.data, args.out, num_train=args.num_train, num_test=args.num_test,
                             ks=args.ks, umap=not args.no_map, device=args.device, pca_dim=args.pca_dim)
    print(f"[maetok] latent analysis written to {args.out}/latent_analysis.json")
    for name, entry in result["models"].items():
        print(f"  {name}: linear probe top-1 {entry['linear_probe_top1'] * 100:.1f}%, GMM in PCA dim "
              f"{entry['gmm']['pca_dim']} (own 90% dim {entry['gmm']['own_pca_dim']}, "
              f"{entry['gmm']['explained_variance']:.1%} variance)")
    return 0


# ---------------------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------------------


def positive_int(text: str) -> int:
    """argparse type of counts and sizes (--batch-size, --num, --steps ...): an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """What a training command does with an existing run directory (refused without one of these)."""
    p.add_argument("--resume", action="store_true", help="continue the run in OUT from checkpoints/last.pt")
    p.add_argument("--overwrite", action="store_true", help="delete the run in OUT and start again from step 0")
    p.add_argument("--allow-config-change", action="store_true",
                   help="with --resume: continue under a changed config (the earlier one is kept as "
                        "config.step<N>.yaml); the model's shape can never change")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maetok",
        description="MAETok tokenizers, latent diffusion on their 1D tokens, and evaluation.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
        return p

    p = add("train-tokenizer", "Stage 1: train a MAETok / AE / VAE tokenizer.")
    p.add_argument("--config", required=True, help="preset name (see `maetok info`) or a YAML file")
    p.add_argument("--data", default=None, help="fashion-mnist (default of the CPU presets) or an image folder (its images set "
                                                  "model.in_channels / model.image_size unless given)")
    p.add_argument("--out", required=True, help="run directory")
    add_run_flags(p)
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.steps=1000")

    p = add("finetune-decoder", "Stage 2: freeze the encoder, fine-tune the pixel decoder with decaying masks.")
    p.add_argument("--from", dest="source", required=True, help="stage-1 run directory")
    p.add_argument("--out", required=True, help="run directory for stage 2")
    add_run_flags(p)
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. finetune.steps=500")

    pixels_help = ("skip image files whose header announces more pixels than this, before decoding "
                   "(default 64000000; 0: no limit)")
    p = add("reconstruct", "Encode and decode images; write one side-by-side PNG (original | reconstruction) per "
                           "input: OUT/<path relative to INPUT> with a .png extension, subfolders mirrored (a.jpg -> "
                           "a.png, sub/b.png -> sub/b.png; a.jpg beside a.png -> a.jpg.png and a.png.png). Inputs of "
                           "another size are resized and center-cropped to the model's (said in one line).")
    p.add_argument("--model", required=True, help="tokenizer directory (config.json + model.safetensors) or run dir")
    p.add_argument("--input", required=True, help="an image file or a folder of images (walked recursively)")
    p.add_argument("--out", required=True, help="output folder (an output that would replace an input is refused)")
    p.add_argument("--recon-only", action="store_true",
                   help="write the reconstruction alone (at the model's size), not original | reconstruction")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS, help=pixels_help)

    p = add("cache-latents", "Encode a dataset with a tokenizer into a sharded latent cache (+ statistics).")
    p.add_argument("--model", required=True, help="tokenizer directory or tokenizer run directory")
    p.add_argument("--data", required=True, help="fashion-mnist or an image folder")
    p.add_argument("--out", required=True, help="cache directory (a rerun completes an interrupted cache)")
    p.add_argument("--split", default="train", help="dataset split (default train)")
    p.add_argument("--flip", action="store_true", help="also cache the latents of horizontally flipped images")
    p.add_argument("--sample-posterior", action=argparse.BooleanOptionalAction, default=None,
                   help="VAE: store a posterior sample (the default, as DiT/SiT train) or, with "
                        "--no-sample-posterior, the posterior mean; recorded in the cache's metadata")
    p.add_argument("--seed", type=int, default=0, help="seed of the VAE posterior samples (default 0)")
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--num-workers", type=non_negative_int, default=0)
    p.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                   help=pixels_help + "; unreadable files leave no row and are listed in OUT/skipped.json")

    p = add("train-diffusion", "Train SiT / LightningDiT on a latent cache.")
    p.add_argument("--config", required=True, help="preset (sit-xl, sit-l, lightningdit-xl, tiny-sit) or YAML")
    p.add_argument("--latents", required=True, help="latent cache directory")
    p.add_argument("--out", required=True, help="run directory")
    add_run_flags(p)
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.steps=1000")

    p = add("sample", "Generate images: PNGs, a grid and an ADM-format samples.npz.")
    p.add_argument("--model", required=True, help="diffusion model directory or run directory, the authors' released "
                                                  "SiT folder, or a hub id (e.g. MAETok/sit-xl_maetok-b-128)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory or hub id (default: the one the latents "
                                                     "came from; required for the authors' SiT)")
    p.add_argument("--num", type=positive_int, required=True, help="number of images")
    p.add_argument("--out", required=True)
    p.add_argument("--labels", default=None, help="comma-separated class names or ids to cycle through, e.g. "
                   "Sneaker,Bag or 7,8 (default: all classes evenly)")
    p.add_argument("--sampler", choices=["euler", "euler-maruyama"], default=None)
    p.add_argument("--steps", type=positive_int, default=None, help="sampling steps (default from the model: 250)")
    p.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="apply guidance only for noise levels t in [LOW, HIGH] (t=1 is pure noise)")
    p.add_argument("--convention", choices=["maetok", "authors"], default=None,
                   help="sampling conventions (default: the model's; the authors' SiT comes with theirs): 'authors' "
                        "= Euler-Maruyama with guidance on the drift, float64 state, the tokenizer's scalar latent "
                        "mean/std; the flags below override single choices")
    p.add_argument("--cfg-on", choices=["velocity", "drift"], default=None,
                   help="guide the velocity (ours) or the SDE drift (the authors'; equal up to rounding)")
    p.add_argument("--precision", choices=["float32", "float64"], default=None, help="dtype of the integrated state")
    p.add_argument("--latent-norm", choices=["model", "tokenizer"], default=None,
                   help="undo the diffusion model's latent statistics or the tokenizer's scalar latent mean/std")
    p.add_argument("--latent-scalars", type=float, nargs=2, default=None, metavar=("MEAN", "STD"),
                   help="undo this scalar latent normalisation instead (decode(x * STD + MEAN))")
    p.add_argument("--last-step", choices=["drift", "velocity"], default=None,
                   help="Euler-Maruyama's final noise-free step from t_end to 0: along the drift (the authors') or "
                        "the velocity")
    p.add_argument("--diffusion-form", choices=["sigma", "constant", "linear"], default=None,
                   help="Euler-Maruyama diffusion w(t): t (the authors' 2t/2), 1 or 1 - t")
    p.add_argument("--t-end", type=float, default=None, help="Euler-Maruyama: last noisy time (default 0.04)")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-png", type=positive_int, default=None, help="write at most this many PNGs (the .npz holds all)")

    p = add("convert", "Write a tokenizer or a diffusion model (our folder, the authors' released folder, a diffusers "
                       "component folder or a hub id) in our format or as a diffusers component folder.")
    p.add_argument("--from", dest="source", required=True, help="model folder, run directory or hub id "
                   "(e.g. MAETok/maetok-b-128)")
    p.add_argument("--out", required=True, help="output model folder (config.json + model.safetensors)")
    p.add_argument("--to", choices=["maetok", "diffusers"], default="maetok",
                   help="maetok: our folder; diffusers: a MAETokAutoencoder / MAETokTransformer folder "
                   "(maetok.integrations.diffusers; a tokenizer's latent statistics as scaling_factor / shift_factor)")

    p = add("info", "Print presets and their parameter counts, or (--model) what a model folder holds.")
    p.add_argument("--model", default=None, help="a tokenizer or diffusion model folder, run directory or hub id: format, parameters, "
                        "latents")
    p.add_argument("--config", default=None, help="one preset or YAML (default: all presets)")
    p.add_argument("--sizes", action="store_true", help="only print the diffusion sizes (SiT-XL, ...)")
    p.add_argument("--latent-shape", type=int, nargs=2, default=None, metavar=("L", "H"),
                   help="count a diffusion preset's parameters on these latents (default: unresolved; training takes "
                        "them from the latent cache)")
    p.add_argument("--classes", type=int, default=None, help="with --latent-shape: the number of classes")
    p.add_argument("overrides", nargs="*")

    p = add("bench", "Throughput (img/s, FLOP-counted TFLOP/s, MFU on known GPUs, peak memory) of training and sampling.")
    p.add_argument("--what", choices=["tokenizer", "diffusion", "sampling", "all"], default="all",
                   help="what to time (default: %(default)s)")
    p.add_argument("--tokenizer-preset", default="tiny-maetok", help="default: %(default)s")
    p.add_argument("--diffusion-preset", default="tiny-sit", help="default: %(default)s")
    p.add_argument("--latent-shape", type=int, nargs=2, default=None, metavar=("L", "H"),
                   help="the diffusion model's latents (default: those of --tokenizer-preset)")
    p.add_argument("--classes", type=int, default=10, help="the diffusion model's classes (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="training batch (default: %(default)s)")
    p.add_argument("--sample-batch", type=positive_int, default=64, help="sampling batch (default: %(default)s)")
    p.add_argument("--steps", type=positive_int, default=250, help="sampling steps (default: %(default)s)")
    p.add_argument("--tokenizer-overrides", nargs="*", default=None, metavar="KEY=VALUE",
                   help="key=value overrides of --tokenizer-preset (default: none)")
    p.add_argument("--diffusion-overrides", nargs="*", default=None, metavar="KEY=VALUE",
                   help="key=value overrides of --diffusion-preset (default: none)")

    p = add("baselines", "PCA with N components as a tokenizer, a Gaussian in its space as a generator, and the "
                         "real-vs-real FID floor: the yardsticks of trained models.")
    p.add_argument("--data", required=True, help="fashion-mnist or an image folder")
    p.add_argument("--dim", type=positive_int, required=True, help="numbers per image (a tokenizer's L x H, e.g. 128)")
    p.add_argument("--out", required=True, help="output folder (baselines.json, baselines.png)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, choices=[1, 3], default=None,
                   help="default: from the images (1 when all are grayscale, else 3)")
    p.add_argument("--num-train", type=positive_int, default=20000, help="training images the PCA and Gaussians are fitted on")
    p.add_argument("--num-eval", type=positive_int, default=1000, help="held-out images measured (and generated)")
    p.add_argument("--no-lpips", action="store_true")
    p.add_argument("--seed", type=int, default=0)

    p = add("eval-recon", "rFID, PSNR, SSIM (both conventions) and LPIPS (VGG) of a tokenizer on a held-out split.")
    p.add_argument("--model", required=True, help="tokenizer directory or run directory")
    p.add_argument("--data", required=True, help="fashion-mnist or an image folder")
    p.add_argument("--num", type=positive_int, default=None, help="images (default: the whole split; else a seeded subset)")
    p.add_argument("--split", default="test")
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--inception", default=None, help="FID Inception weights (default: $MAETOK_INCEPTION or the packaged copy)")
    p.add_argument("--no-fid", action="store_true", help="PSNR / SSIM (/ LPIPS) only")
    p.add_argument("--no-lpips", action="store_true", help="skip LPIPS (VGG16) of the reconstructions")
    p.add_argument("--json", default=None, help="also write the result to this JSON file")
    p.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                   help=pixels_help + "; unreadable files are left out and counted in num_skipped_images")

    p = add("eval-gen", "gFID, sFID, IS, precision and recall of generated images (ADM conventions).")
    p.add_argument("--samples", required=True, help="an ADM .npz, a folder with samples.npz, or a folder of images")
    p.add_argument("--ref", required=True, help="an ADM reference .npz, or a dataset (fashion-mnist, image folder)")
    p.add_argument("--num-ref", type=positive_int, default=None, help="reference images from a dataset (default: as many as samples)")
    p.add_argument("--ref-split", default="test", choices=["test", "train", "all"],
                   help="the split of a dataset reference the images are drawn from (default: %(default)s, the "
                        "held-out images; all: every image)")
    p.add_argument("--save-ref", default=None, help="write the dataset reference as an ADM reference .npz")
    p.add_argument("--tokenizer", default=None,
                   help="also the decoder-free figures: the samples against this tokenizer's reconstructions of the "
                        "reference images, beside their floor (reconstructions of as many training images)")
    p.add_argument("--recon", default=None, help="the decoder-free figures from a reconstructions .npz (--save-recon)")
    p.add_argument("--save-recon", default=None, help="write the --tokenizer's reconstructions as an .npz for --recon")
    p.add_argument("--floor-data", default=None,
                   help="dataset whose train split gives the floor images (default: --ref when it is a dataset)")
    p.add_argument("--batch-size", type=positive_int, default=100)
    p.add_argument("--inception", default=None)
    p.add_argument("--json", default=None)

    p = add("analyze-latents", "Linear probe, GMM NLL vs K and a latent map (UMAP, else PCA) of one or more tokenizers.")
    p.add_argument("--model", required=True, action="append", help="[NAME=]DIR; repeat to compare tokenizers on one plot")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--num-train", type=positive_int, default=10000)
    p.add_argument("--num-test", type=positive_int, default=2000)
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 5, 10, 20, 50], help="GMM component counts")
    p.add_argument("--no-map", action="store_true", help="skip the UMAP / PCA map")
    p.add_argument("--pca-dim", type=int, default=None,
                   help="PCA dimension of the GMMs, one for all models (default: the largest of their 90%%-variance dims)")

    add("assets", "Convert the packaged weights (VGG16/LPIPS) and list the weights found (Inception, teachers).")

    p = add("demo", "The main job: train both tokenizer stages and a SiT, evaluate them beside the PCA / Gaussian "
                    "baselines, write DIR/report.md (a rerun reuses the finished phases).")
    p.add_argument("--out", required=True)
    p.add_argument("--data", default="fashion-mnist", help="fashion-mnist (default) or an image folder")
    p.add_argument("--image-size", type=int, default=None,
                   help="default: the images' size when all share one square size the patch size divides, else 32")
    p.add_argument("--channels", type=int, choices=[1, 3], default=None,
                   help="default: from the images (1 when all are grayscale, else 3)")
    p.add_argument("--quick", action="store_true", help="a much shorter run (for smoke tests)")

    p = add("study", "The paper's Table 1a / Table 6 comparison: AE, VAE, MAETok (+ ablations) at one budget, each "
                     "with a SiT on its latents; writes DIR/study.md.")
    p.add_argument("--out", required=True)
    p.add_argument("--variants", nargs="+", default=None,
                   help="subset of: ae vae maetok maetok-no-aux maetok-no-mask (default: all)")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--tokenizer-config", default="tiny-maetok", help="the MAETok preset the variants derive from")
    p.add_argument("--diffusion-config", default="tiny-sit")
    p.add_argument("--full-objective", action="store_true", help="LPIPS + GAN in both stages (the paper's Eq. 6)")
    for name in ("stage1-steps", "stage2-steps", "diffusion-steps", "eval-images", "fid-samples", "fid-sampling-steps"):
        p.add_argument(f"--{name}", type=int, default=None)
    p.add_argument("--tokenizer-overrides", nargs="*", default=None, metavar="KEY=VALUE")
    p.add_argument("--diffusion-overrides", nargs="*", default=None, metavar="KEY=VALUE")
    p.add_argument("--seeds", type=int, default=None, help="seeds per variant (default: AE, VAE, MAETok 3, ablations 1)")
    p.add_argument("--gmm-pca-dim", type=int, default=None, help="PCA dimension of every GMM (default: shared 90%% dim)")
    p.add_argument("--report-only", action="store_true", help="train nothing: rewrite the report from finished runs")
    p.add_argument("--quick", action="store_true", help="a tiny budget (smoke test)")
    return parser


def continue_command(args: argparse.Namespace, argv: Optional[list[str]]) -> str:
    """The command line that continues an interrupted command: a training command's with ``--resume`` (never
    ``--overwrite``); any other command's as it was (``cache-latents``, ``demo``, ``study`` complete what they
    finished)."""
    import shlex

    words = list(sys.argv[1:] if argv is None else argv)
    if hasattr(args, "resume"):
        words = [word for word in words if word != "--overwrite"] + ([] if "--resume" in words else ["--resume"])
    return shlex.join(["maetok", *words])


def main(argv: Optional[list[str]] = None) -> int:
    """Run one command. An error the user caused (:class:`maetok.errors.MaetokError`: config, data, model folder,
    assets, a diverged run) is one line on stderr and exit status 2 (``MAETOK_DEBUG=1`` shows its traceback too);
    anything else is a bug in maetok: its traceback, a line asking for a report, and exit status 1."""
    import traceback

    from maetok.errors import Interrupted, MaetokError, first_line
    from maetok.runs import check_apart, check_output_folder, disk_full_error, resolve_device

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.device:
            resolve_device(args.device)  # a device this machine lacks: one line, before any work
        if getattr(args, "out", None):
            check_output_folder(args.out)  # every command's --out is a folder
            if getattr(args, "data", None):
                check_apart(args.out, args.data)  # ... outside its --data folder
        return COMMANDS[args.command](args)
    except MaetokError as err:
        if os.environ.get("MAETOK_DEBUG"):
            raise
        print(f"maetok {args.command}: error: {first_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # SIGINT, or SIGTERM in training (Interrupted): what is kept, how to continue
        if os.environ.get("MAETOK_DEBUG"):
            raise
        status = getattr(stop, "exit_status", 130)
        said = first_line(stop) if isinstance(stop, Interrupted) else "stopped by SIGINT"
        print(f"maetok {args.command}: {said}; continue with: {continue_command(args, argv)}", file=sys.stderr)
        return status
    except Exception as err:  # a bug, never dressed up as a user error; but a full disk anywhere is one line
        full = disk_full_error(err)
        if full is not None:
            if os.environ.get("MAETOK_DEBUG"):
                raise
            print(f"maetok {args.command}: error: {first_line(full)}", file=sys.stderr)
            return 2
        traceback.print_exc()
        print(f"maetok {args.command}: internal error (a bug in maetok, not in your input): please report it with the "
              "traceback above and the command line", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
