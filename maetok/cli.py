"""The ``maetok`` command. Each subcommand is one arrow of the data flow in the README."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Optional

from maetok.config import ConfigError

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
    from maetok.config import TokenizerTrainConfig, load_config

    extra = [f"data.dataset={data}"] if data else []
    return load_config(TokenizerTrainConfig, preset, extra + overrides)


@command("train-tokenizer")
def cmd_train_tokenizer(args: argparse.Namespace) -> int:
    from maetok.train.tokenizer import TokenizerTrainer

    cfg = _tokenizer_config(args.config, args.data, args.overrides)
    TokenizerTrainer(cfg, args.out, stage="pretrain", resume=args.resume, device=args.device).fit()
    return 0


@command("finetune-decoder")
def cmd_finetune_decoder(args: argparse.Namespace) -> int:
    from maetok.config import TokenizerTrainConfig, from_dict, parse_overrides, to_dict
    from maetok.config import _deep_merge  # noqa: PLC2701 - the same merge the loader uses
    from maetok.train.tokenizer import TokenizerTrainer, read_run_config

    base = to_dict(read_run_config(args.source))
    cfg = from_dict(TokenizerTrainConfig, _deep_merge(base, parse_overrides(args.overrides)))
    TokenizerTrainer(cfg, args.out, stage="finetune", init_from=args.source, resume=args.resume, device=args.device).fit()
    return 0


@command("reconstruct")
def cmd_reconstruct(args: argparse.Namespace) -> int:
    from maetok.reconstruct import reconstruct_paths

    written = reconstruct_paths(args.model, args.input, args.out, device=args.device, batch_size=args.batch_size)
    print(f"[maetok] wrote {len(written)} side-by-side PNGs to {args.out}")
    return 0


@command("info")
def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from maetok.config import TokenizerTrainConfig, list_presets, load_config
    from maetok.models.tokenizer import MAETok

    names = [args.config] if args.config else list_presets()
    for name in names:
        cfg = load_config(TokenizerTrainConfig, name, args.overrides)
        with torch.device("meta"):
            aux_dims = {t.name: 1 for t in cfg.model.aux_targets}  # output size barely matters for the count
            model = MAETok(cfg.model, aux_dims)
        counts = model.parameter_counts()
        m = cfg.model
        print(
            f"{name}: {m.variant}, {m.image_size}px, patch {m.patch_size} ({m.grid_size[0] * m.grid_size[1]} tokens) "
            f"-> {m.num_latent_tokens} x {m.latent_dim} latents"
        )
        for part, n in counts.items():
            print(f"  {part:<32} {n / 1e6:8.2f}M")
    return 0


@command("demo")
def cmd_demo(args: argparse.Namespace) -> int:
    from maetok.demo import run_demo

    report = run_demo(Path(args.out), quick=args.quick, device=args.device)
    print(f"[maetok] demo report: {report}")
    return 0


# ---------------------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------------------


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
    p.add_argument("--data", default=None, help="fashion-mnist (default of the CPU presets) or an image folder")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.pt")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.steps=1000")

    p = add("finetune-decoder", "Stage 2: freeze the encoder, fine-tune the pixel decoder with decaying masks.")
    p.add_argument("--from", dest="source", required=True, help="stage-1 run directory")
    p.add_argument("--out", required=True, help="run directory for stage 2")
    p.add_argument("--resume", action="store_true")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. finetune.steps=500")

    p = add("reconstruct", "Encode and decode images; write side-by-side PNGs.")
    p.add_argument("--model", required=True, help="tokenizer directory (config.json + model.safetensors) or run dir")
    p.add_argument("--input", required=True, help="an image file or a folder of images")
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=32)

    p = add("info", "Print presets and their parameter counts.")
    p.add_argument("--config", default=None, help="one preset or YAML (default: all presets)")
    p.add_argument("overrides", nargs="*")

    p = add("demo", "The main job on Fashion-MNIST: train both stages, evaluate, write DIR/report.md.")
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true", help="a much shorter run (for smoke tests)")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, FileNotFoundError, ValueError, KeyError) as err:
        print(f"maetok {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
