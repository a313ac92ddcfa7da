"""Where does masking pay on 32x32 images? Tokenizer grid points (patch size, mask ratio, stage 2), each measured.

    python3 scripts/regime.py --out DIR --runs p8_ae_s2000_paper25 p8_m40-60_s2000_paper25 ... [--metrics psnr]

A run name says what it is: ``p{patch}_{tokenizer}_s{stage-1 steps}_{stage 2}[gan][_l{tokens}x{channels}][_d{sit steps}][_seed{k}]``

* tokenizer: ``ae`` (plain AE, no masking, no auxiliary decoders), ``vae``, or ``m{lo}-{hi}`` (MAETok: mask
  ratio drawn per image in [lo%, hi%], the HOG + pixel auxiliary decoders of the CPU preset);
* stage 2 (encoder frozen): ``paper{pct}`` fine-tunes stage 1's decoder for pct% of stage 1's steps while the
  mask ratio decays linearly from stage 1's highest (60% for 40-60%) to 0 over the whole stage, with stage 1's
  loss (the paper's recipe, §3.3); ``fresh{steps}`` trains a newly initialised decoder on unmasked latents for that
  many steps at stage 1's learning rate (how much of the image the latents hold); ``gan`` after either: stage 2
  with the paper's Eq. 6 loss (MSE + LPIPS + adversarial) instead of MSE;
* ``_l{tokens}x{channels}``: another latent size than the preset's 16 x 8 = 128 numbers per image;
* ``_d{steps}``: the SiT of ``--metrics all`` trained for that many steps instead of the study's 400.

Everything else is the ``tiny-maetok`` preset on Fashion-MNIST (or ``--data``), MSE (+ auxiliary losses)
in stage 1, batch 32. Stage-1 runs are shared by every stage 2 that starts from them (``DIR/stage1/``).
``--metrics psnr``: PSNR / SSIM of the first 1000 test images (minutes); ``recon``: with LPIPS and rFID-1k;
``all``: the whole pipeline of ``maetok study`` on top (a SiT and its gFID-1k, the decoder-free FID against the
tokenizer's own reconstructions with its floor, recall against them, the SiT's held-out loss beside a Gaussian's,
linear probe, GMM NLL). A run's stages are reused by every metrics level. Finished runs are kept
(``DIR/regime.json``); an interrupted one resumes. ``--report`` writes ``DIR/regime.md`` and the plots.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from maetok.config import Budget
from maetok.study import CPU_BUDGET as BASE_BUDGET  # every figure but the step counts as in `maetok study`
from maetok.study import NO_MASK_NO_AUX

PRESET = "tiny-maetok"
NAME = re.compile(r"^p(?P<patch>\d+)_(?P<tok>ae|vae|m(?P<lo>\d+)-(?P<hi>\d+))_s(?P<s1>\d+)_"
                  r"(?P<mode>paper|fresh)(?P<amount>\d+)(?P<gan>gan)?(?:_l(?P<tokens>\d+)x(?P<channels>\d+))?"
                  r"(?:_d(?P<sit>\d+))?(?:_seed(?P<seed>\d+))?$")
PRESET_OVERRIDES: list[str] = []  # added to every run's (tests shrink the model here)


@dataclass(frozen=True)
class GridPoint:
    """One parsed run name."""

    name: str
    patch: int
    tokenizer: str  # "ae", "vae" or "maetok"
    mask: tuple[float, float]
    stage1_steps: int
    stage2_mode: str  # "paper" or "fresh"
    stage2_steps: int
    seed: int
    stage2_gan: bool = False  # stage 2 with the paper's Eq. 6 loss (MSE + LPIPS + GAN) instead of stage 1's MSE
    latent: Optional[tuple[int, int]] = None  # (tokens, channels); None: the preset's 16 x 8
    sit_steps: Optional[int] = None  # SiT training steps with --metrics all; None: the study's

    @classmethod
    def parse(cls, name: str) -> "GridPoint":
        m = NAME.match(name)
        if m is None:
            raise SystemExit(f"run name {name!r} does not read as p{{patch}}_{{ae|vae|m<lo>-<hi>}}_s{{steps}}_"
                             "{paper<pct>|fresh<steps>}[gan][_l<tokens>x<channels>][_d<sit steps>][_seed<k>]")
        s1 = int(m["s1"])
        tok = m["tok"] if m["tok"] in ("ae", "vae") else "maetok"
        mask = (int(m["lo"]) / 100, int(m["hi"]) / 100) if tok == "maetok" else (0.0, 0.0)
        amount = int(m["amount"])
        steps = max(1, round(s1 * amount / 100)) if m["mode"] == "paper" else amount
        latent = (int(m["tokens"]), int(m["channels"])) if m["tokens"] else None
        return cls(name, int(m["patch"]), tok, mask, s1, m["mode"], steps, int(m["seed"] or 0), bool(m["gan"]), latent,
                   int(m["sit"]) if m["sit"] else None)

    @property
    def stage1_name(self) -> str:
        tok = self.name.split("_")[1]
        latent = f"_l{self.latent[0]}x{self.latent[1]}" if self.latent else ""
        return f"p{self.patch}_{tok}_s{self.stage1_steps}{latent}_seed{self.seed}"

    def tokenizer_overrides(self) -> list[str]:
        """Overrides of the preset for both stages (the step counts come from :meth:`budget`)."""
        o = [f"model.patch_size={self.patch}"]
        if self.latent:
            o += [f"model.num_latent_tokens={self.latent[0]}", f"model.latent_dim={self.latent[1]}"]
        if self.tokenizer in ("ae", "vae"):
            o += [f"model.variant={self.tokenizer}", *NO_MASK_NO_AUX]
        else:
            # stage 2 decays the mask ratio from stage 1's highest (the paper: 60%, its stage 1 drew 40-60%)
            o += [f"model.mask_ratio_min={self.mask[0]}", f"model.mask_ratio_max={self.mask[1]}",
                  f"finetune.mask_ratio_start={self.mask[1]}"]
        if self.stage2_mode == "fresh":
            # a decoder from scratch: stage 1's learning rate and warm-up
            o += ["finetune.fresh_decoder=true", "finetune.mask_ratio_start=0", "finetune.lr=2e-3",
                  "finetune.warmup_steps=100"]
        return o

    def budget(self, base: Budget) -> Budget:
        import dataclasses

        return dataclasses.replace(base, stage1_steps=self.stage1_steps, stage2_steps=self.stage2_steps,
                                   stage1_loss="mse", stage2_loss="full" if self.stage2_gan else "mse",
                                   stage2_mask_decay=1.0, diffusion_steps=self.sit_steps or base.diffusion_steps)


def psnr_metrics(tokenizer_dir: Path, images: torch.Tensor) -> dict[str, float]:
    from maetok.encode import load_tokenizer, reconstruct_images
    from maetok.eval.reconstruction import ReconstructionEvaluator

    evaluator = ReconstructionEvaluator(lpips=False)
    evaluator.update(images, reconstruct_images(load_tokenizer(tokenizer_dir, "cpu"), images))
    return evaluator.result()


@torch.no_grad()
def masked_input_psnr(tokenizer_dir: Path, images: torch.Tensor, ratio: float = 0.5, seed: int = 0) -> float:
    """PSNR of a tokenizer whose encoder sees ``ratio`` of each image's patches replaced by its mask token: how much
    the latents depend on the pixels the encoder was not shown (an AE falls far; an encoder that only ever saw masked
    images hardly moves)."""
    from maetok.data.images import to_uint8
    from maetok.encode import load_tokenizer
    from maetok.eval.metrics import psnr
    from maetok.global_batch import SampleRandom

    model = load_tokenizer(tokenizer_dir, "cpu")
    grid = model.grid_size(images)
    mask = model.random_mask(len(images), grid[0] * grid[1], ratio, SampleRandom.for_batch(seed, 0, len(images)))
    latents = torch.cat([model.encoder(images[i : i + 500], mask[i : i + 500]) for i in range(0, len(images), 500)])
    recon = torch.cat([model.decode(latents[i : i + 500]) for i in range(0, len(latents), 500)]).clamp(-1, 1)
    return psnr(to_uint8(images), to_uint8(recon))


def eval_curve(run_dir: Path) -> list[dict[str, float]]:
    """(step, eval PSNR on 256 test images) rows of a run's log."""
    import csv

    log = run_dir / "log.csv"
    if not log.exists():
        return []
    return [{"step": int(float(r["step"])), "psnr": float(r["eval_psnr"])}
            for r in csv.DictReader(log.open()) if r.get("eval_psnr")]


def run_point(point: GridPoint, out: Path, base: Budget, data: str, metrics: str, evald: Any) -> dict[str, Any]:
    from maetok.pipeline import run_pipeline, train_tokenizer

    budget = point.budget(base)
    stage1_dir = out / "stage1" / point.stage1_name
    run_dir = out / "runs" / point.name
    shape = [f"model.image_size={evald.image_size}", f"model.in_channels={evald.channels}"]
    overrides = shape + PRESET_OVERRIDES + point.tokenizer_overrides()
    start = time.perf_counter()
    if metrics == "recon":  # PSNR, SSIM, LPIPS and rFID of the stage-2 tokenizer
        from maetok.encode import load_tokenizer, reconstruct_images
        from maetok.eval.reconstruction import ReconstructionEvaluator

        train_tokenizer(run_dir, data, PRESET, budget, overrides, point.seed, stage1_dir=stage1_dir)
        evaluator = ReconstructionEvaluator(evald.inception, evald.reference)
        evaluator.update(evald.images, reconstruct_images(load_tokenizer(run_dir / "tokenizer", "cpu"), evald.images))
        figures = {k: v for k, v in evaluator.result().items() if k in ("psnr", "ssim", "lpips", "rfid")}
        figures["stage1_psnr"] = psnr_metrics(stage1_dir, evald.images)["psnr"]
    elif metrics == "all":
        result = run_pipeline(run_dir, evald, budget, PRESET, "tiny-sit", overrides, seed=point.seed,
                              stage1_dir=stage1_dir, label=point.name)
        figures = flat_figures(result)
    else:
        train_tokenizer(run_dir, data, PRESET, budget, overrides, point.seed, stage1_dir=stage1_dir)
        figures = {f"{k}": v for k, v in psnr_metrics(run_dir / "tokenizer", evald.images).items()
                   if k in ("psnr", "ssim")}
        figures["stage1_psnr"] = psnr_metrics(stage1_dir, evald.images)["psnr"]
    figures["stage1_psnr_masked50"] = masked_input_psnr(stage1_dir, evald.images)
    return {"point": point.__dict__, "image_size": evald.image_size, "metrics": metrics, "figures": figures,
            "stage1_curve": eval_curve(stage1_dir), "stage2_curve": eval_curve(run_dir / "tokenizer"),
            "seconds": time.perf_counter() - start}


def flat_figures(result: dict[str, Any]) -> dict[str, Optional[float]]:
    """The figures of a pipeline result the regime tables show."""
    rec, gen = result["reconstruction"], result["generation"]
    free = gen.get("decoder_free") or {}
    return {
        "psnr": rec["psnr"], "ssim": rec["ssim"], "lpips": rec.get("lpips"), "rfid": rec.get("rfid"),
        "gfid": gen.get("gfid"), "dfid": free.get("fid"), "dfid_floor": free.get("floor_fid"),
        "dfid_ratio": free.get("fid_ratio"), "precision": free.get("precision"), "recall": free.get("recall"),
        "recall_floor": free.get("floor_recall"), "heldout_loss_ratio": (result.get("sit_heldout") or {}).get("ratio"),
        "linear_probe": None if result["linear_probe"] is None else 100 * result["linear_probe"]["top1"],
        "gmm_nll": result["gmm"]["test_nll"].get("10"),
    }


COLUMNS = {  # figure -> (table heading, format)
    "stage1_psnr": ("stage-1 PSNR", ".2f"), "stage1_psnr_masked50": ("stage 1, 50% of input masked", ".2f"),
    "psnr": ("PSNR", ".2f"), "ssim": ("SSIM", ".3f"),
    "lpips": ("LPIPS", ".3f"), "rfid": ("rFID-1k", ".1f"),
    "gfid": ("gFID-1k", ".1f"), "dfid": ("decoder-free FID (floor)", ".1f"), "dfid_ratio": ("ratio", ".2f"),
    "recall": ("recall vs recon. (floor)", ".2f"), "heldout_loss_ratio": ("SiT / Gaussian loss", ".3f"),
    "linear_probe": ("LP top-1 (%)", ".1f"), "gmm_nll": ("GMM NLL K=10", ".2f"),
}


def cell(figures: dict[str, Any], key: str) -> str:
    value = figures.get(key)
    if value is None:
        return "-"
    text = format(value, COLUMNS[key][1])
    floor = {"dfid": "dfid_floor", "recall": "recall_floor"}.get(key)
    if floor and figures.get(floor) is not None:
        text += f" ({format(figures[floor], COLUMNS[key][1])})"
    return text


def write_report(out: Path, results: dict[str, Any]) -> Path:
    """``out/regime.md``: one table row per finished run, and ``out/regime_curves.png``: held-out PSNR against
    training images (stage 1, then stage 2 from its end)."""

    keys = [k for k in COLUMNS if any(r["figures"].get(k) is not None for r in results.values())]
    lines = ["| run | tokens | mask | stage 2 | images seen | " + " | ".join(COLUMNS[k][0] for k in keys) + " |",
             "|---|---|---|---|---|" + "---|" * len(keys)]
    for key, r in sorted(results.items(), key=lambda kv: (kv[1]["point"]["patch"], kv[0])):
        p = r["point"]
        tokens = (r.get("image_size", 32) // p["patch"]) ** 2
        mask = "-" if p["tokenizer"] != "maetok" else f"{p['mask'][0]:.0%}-{p['mask'][1]:.0%}"
        stage2 = f"{p['stage2_mode']} {p['stage2_steps']}"
        seen = (p["stage1_steps"] + p["stage2_steps"]) * 32
        lines.append(f"| {key} | {tokens} | {mask} | {stage2} | {seen / 1000:.0f}k | "
                     + " | ".join(cell(r["figures"], k) for k in keys) + " |")
    plot_curves(results, out / "regime_curves.png")
    gaps = patch_gaps(results)
    if gaps:
        plot_gaps(gaps, out / "regime_gap_vs_tokens.png")
        lines += ["", "| stage-1 steps | stage 2 | image tokens | AE PSNR | MAETok (40-60%) PSNR | gap after stage 1 | "
                  "gap after stage 2 |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {g['steps']} | {g['stage2']} | {g['tokens']} | {g['ae']:.2f} | {g['maetok']:.2f} | "
                  f"{g['gap_stage1']:.2f} | {g['gap']:.2f} |" for g in gaps]
    path = out / "regime.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def plain(p: dict[str, Any]) -> bool:
    """A grid point of the tokenizer questions: the preset's latent size, stage 2 with MSE, the study's SiT."""
    return not p.get("latent") and not p.get("stage2_gan") and not p.get("sit_steps")


PANELS = {  # title -> which runs it shows (from their grid point)
    "patch size (MAETok 40-60% vs AE, stage 2 25%)":
        lambda p: plain(p) and p["stage2_mode"] == "paper" and p["stage2_steps"] * 4 == p["stage1_steps"]
        and p["mask"] in ([0, 0], [0.4, 0.6]),
    "mask ratio (patch 8, stage 2 25%)":
        lambda p: plain(p) and p["patch"] == 8 and p["stage1_steps"] == 2000 and p["stage2_mode"] == "paper"
        and p["stage2_steps"] == 500,
    "stage 2 (patch 8): 10% / 25% / 100% paper, fresh decoder (dashed)":
        lambda p: plain(p) and p["patch"] == 8 and p["stage1_steps"] == 2000 and p["mask"] in ([0, 0], [0.4, 0.6]),
}


def plot_curves(results: dict[str, Any], path: Path) -> None:
    """Held-out PSNR against training images, stage 1 then stage 2, one panel per question of :data:`PANELS`."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16, 5))
    for ax, (title, wanted) in zip(fig.subplots(1, len(PANELS)), PANELS.items()):
        chosen = sorted((r for r in results.values() if wanted(r["point"])), key=lambda r: r["point"]["name"])
        colours = colormaps["tab20"].colors
        for i, r in enumerate(chosen):
            p, colour = r["point"], colours[i % len(colours)]
            s1, s2 = r["stage1_curve"], r["stage2_curve"]
            ax.plot([c["step"] * 32 / 1000 for c in s1], [c["psnr"] for c in s1], marker=".", color=colour, alpha=0.6)
            ax.plot([(p["stage1_steps"] + c["step"]) * 32 / 1000 for c in s2], [c["psnr"] for c in s2], marker="o",
                    markersize=3, color=colour, label=p["name"], linestyle="--" if p["stage2_mode"] == "fresh" else "-")
        ax.set_title(title, fontsize=9)
        label_axes(ax, "training images seen (thousands; stage 1, then stage 2)",
                   "held-out PSNR, 256 test images (dB)", legend_size=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def label_axes(ax: Any, xlabel: str, ylabel: str, legend_size: int) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # a panel no run falls in stays empty
        ax.legend(fontsize=legend_size)


def patch_gaps(results: dict[str, Any]) -> list[dict[str, Any]]:
    """For every (stage-1 steps, patch) with both an AE and a MAETok (40-60%) run of the same stage 2: the PSNR gap
    (AE minus MAETok) on the 1000 held-out images after stage 1 and after stage 2."""
    by_name = {r["point"]["name"]: r for r in results.values()}
    gaps = []
    for name, r in by_name.items():
        p = r["point"]
        if p["tokenizer"] != "ae" or not plain(p):
            continue
        masked = by_name.get(name.replace("_ae_", "_m40-60_"))
        if masked is None:
            continue
        a, m = r["figures"], masked["figures"]
        gaps.append({"steps": p["stage1_steps"], "tokens": (r.get("image_size", 32) // p["patch"]) ** 2, "stage2": name.split("_")[3],
                     "ae": a["psnr"], "maetok": m["psnr"], "gap": a["psnr"] - m["psnr"],
                     "gap_stage1": a["stage1_psnr"] - m["stage1_psnr"]})
    return sorted(gaps, key=lambda g: (g["steps"], g["stage2"], g["tokens"]))


def plot_gaps(gaps: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for key in sorted({(g["steps"], g["stage2"]) for g in gaps}):
        rows = [g for g in gaps if (g["steps"], g["stage2"]) == key]
        ax.plot([g["tokens"] for g in rows], [g["gap"] for g in rows], marker="o",
                label=f"{key[0]} stage-1 steps, stage 2 {key[1]}")
        ax.plot([g["tokens"] for g in rows], [g["gap_stage1"] for g in rows], marker="x", linestyle=":", alpha=0.6,
                color=ax.lines[-1].get_color())
    ax.axhline(0.5, color="k", linestyle="--", linewidth=0.8, label="target: within 0.5 dB")
    ax.set_xscale("log", base=2)
    label_axes(ax, "image tokens (image size / patch)^2", "PSNR gap AE - MAETok (dB); dotted: after stage 1",
               legend_size=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", nargs="*", default=[], help="run names (see the module docstring)")
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--channels", type=int, default=None)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--eval-images", type=int, default=None, help="held-out images measured (default 1000)")
    parser.add_argument("--metrics", choices=("psnr", "recon", "all"), default="psnr")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--report", action="store_true", help="write DIR/regime.md and the plots")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from maetok.demo import dataset_shape
    from maetok.pipeline import load_eval_data

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    size, channels = dataset_shape(args.data, args.image_size, args.channels)
    num_eval = args.eval_images or BASE_BUDGET.eval_images
    if args.metrics != "psnr":
        evald = load_eval_data(args.data, size, channels, num_eval)
    else:  # the same held-out images, no Inception
        from maetok.data import build_dataset, load_images

        test = build_dataset(args.data, "test", size, channels)
        images, _ = load_images(test, range(min(num_eval, len(test))))
        evald = argparse.Namespace(images=images, image_size=size, channels=channels)
    results_path = out / "regime.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for name in args.runs:
        point = GridPoint.parse(name)
        key = f"{name} [{args.metrics}]" if args.data == "fashion-mnist" else f"{name} [{args.metrics}, {args.data}]"
        if key in results:
            print(f"[regime] {key}: finished before, kept", flush=True)
            continue
        print(f"[regime] {key}", flush=True)
        results[key] = run_point(point, out, BASE_BUDGET, args.data, args.metrics, evald)
        print(f"[regime] {key}: {results[key]['figures']}", flush=True)
        results = {**(json.loads(results_path.read_text()) if results_path.exists() else {}), key: results[key]}
        results_path.write_text(json.dumps(results, indent=1))
    for key, r in results.items():  # runs measured before this figure existed
        stage1 = out / "stage1" / GridPoint.parse(r["point"]["name"]).stage1_name
        if "stage1_psnr_masked50" not in r["figures"] and r.get("image_size", 32) == evald.image_size and stage1.exists():
            r["figures"]["stage1_psnr_masked50"] = masked_input_psnr(stage1, evald.images)
            results_path.write_text(json.dumps({**json.loads(results_path.read_text()), key: r}, indent=1))
    if args.report and results:
        print(f"[regime] report: {write_report(out, results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
