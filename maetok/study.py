"""``maetok study``: the paper's Table 1a / Table 6 comparison, with seeds, runnable at any scale.

Tokenizers that differ in one design choice (AE, VAE, MAETok, MAETok without auxiliary decoders, MAETok without
masking) go through the same pipeline (:mod:`maetok.pipeline`: both tokenizer stages, the same small SiT on
their latents, the same evaluation) with several seeds each (AE, VAE and MAETok 3, the ablations 1), beside an AE
stopped after a fifth of stage 1 (3 seeds), whose reconstructions are about as poor as MAETok's: the control that
tells a latent space easier to learn from one that holds less of the image. The table
gives mean +- std over seeds of PSNR, LPIPS, rFID, gFID (without CFG, as the paper's Table 1), linear-probe
accuracy and GMM held-out NLL (every run in one shared PCA dimension), beside the PCA / Gaussian baselines and
the real-vs-real FID floor, and states which of the paper's orderings hold beyond seed noise.

Every (variant, seed) runs in ``DIR/<variant>/seed<k>/`` and is reused once finished, so a study longer than
one session completes over several invocations; ``DIR/study.md`` is rewritten from what is finished each time.
On GPUs the same command scales to the paper's presets by config (``--tokenizer-config maetok-b-128
--diffusion-config sit-l --data /imagenet --full-objective --stage1-steps ...``).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from maetok.config import Budget
from maetok.data import save_image_grid
from maetok.demo import dataset_shape, format_optional, format_seconds, held_out_count, machine_description
from maetok.errors import ConfigError, ModelFolderError
from maetok.eval.metrics import LPIPS_LABEL
from maetok.pipeline import load_eval_data, measure_baselines, run_pipeline
from maetok.runs import is_finished, read_json_file, write_json, write_text

# the demo's budget (BENCHMARKS.md, "Convergence per CPU-second"), MSE in both stages; stage 2 as the paper specifies
# it (the mask ratio decaying 60% -> 0 over the whole stage) and as long relative to stage 1 (50K of 500K steps: 10%)
CPU_BUDGET = Budget(
    stage1_steps=2000, stage2_steps=200, diffusion_steps=400, eval_images=1000, fid_samples=1000,
    fid_sampling_steps=50, probe_train=10000, gmm_ks=(1, 2, 5, 10, 20, 50), gmm_train=2000, cache_limit=20000,
    stage2_loss="mse", cfg_scale=1.0, gmm_all_dims=True,
)
QUICK_BUDGET = Budget(
    stage1_steps=3, stage2_steps=2, diffusion_steps=3, eval_images=24, fid_samples=24, fid_sampling_steps=2,
    probe_train=64, gmm_ks=(1, 2), gmm_train=64, cache_limit=64, stage2_loss="mse", cfg_scale=1.0,
    baseline_train=256, gmm_all_dims=True,
)
GMM_TABLE_K = 10  # the K whose held-out NLL goes into the table (the largest K of the curve when fewer)

NO_MASK = ["model.mask_ratio_min=0", "model.mask_ratio_max=0"]
NO_MASK_NO_AUX = [*NO_MASK, "model.aux_targets=[]"]  # the baselines' training: no masking, no auxiliary decoders
VARIANT_AE = ["model.variant=ae", *NO_MASK_NO_AUX]
# slug -> (label, tokenizer-config overrides that make the variant from the MAETok preset, seeds)
VARIANTS: dict[str, tuple[str, list[str], int]] = {
    "ae": ("AE", VARIANT_AE, 3),
    "vae": ("VAE", ["model.variant=vae", *NO_MASK_NO_AUX], 3),
    "maetok": ("MAETok", [], 3),
    "maetok-no-aux": ("MAETok w/o aux decoders", ["model.aux_targets=[]"], 1),
    "maetok-no-mask": ("MAETok w/o masking", NO_MASK, 1),
    # the information control: an AE stopped early, whose reconstructions are about as poor as MAETok's (at the CPU
    # budget: 18.0 vs 18.4 dB, docs/study), so that what its latents hold no longer differs from MAETok's by 4 dB
    "ae-short": ("AE, 1/5 of stage 1 (MAETok's PSNR)", VARIANT_AE, 3),
}
STAGE1_FRACTION = {"ae-short": 0.2}  # variants that train stage 1 for a fraction of the budget's steps
# the paper's claims this study can test: (metric, better direction, variant that should win, variant it beats)
DECODER_FREE = ("dfid_ratio", "dfid_recall", "heldout_ratio")  # lower, higher, lower is better
CLAIMS = [
    ("linear_probe_top1", "higher", "maetok", "ae"),
    ("linear_probe_top1", "higher", "maetok", "vae"),
    ("gfid", "lower", "maetok", "ae"),
    ("gfid", "lower", "maetok", "vae"),
    # the generator without the decoder: the samples against the tokenizer's own reconstructions, over its floor;
    # against AE and VAE, and against the AE that holds as little of the image as MAETok (the information control)
    *((key, "higher" if key == "dfid_recall" else "lower", "maetok", other)
      for other in ("ae", "vae", "ae-short") for key in DECODER_FREE),
    ("gmm_nll", "lower", "maetok", "ae"),
    ("gmm_nll", "lower", "maetok", "vae"),
]
# the paper's claims in words, each judged on the (metric, opponent) orderings of CLAIMS that test it
CLAIM_TEXTS = {
    "MAETok's latents are easier for diffusion to learn than AE's and VAE's (judged without the decoder: decoder-free "
    "FID / floor, recall vs reconstructions, SiT / Gaussian loss)": [(k, o) for o in ("ae", "vae") for k in DECODER_FREE],
    "... and still with the information confound out, against an AE stopped where its reconstructions are as poor as "
    "MAETok's (a blurrier tokenizer's distribution is simpler to learn whatever its training)":
        [(k, "ae-short") for k in DECODER_FREE],
    "MAETok generates better (gFID, decoder included)": [("gfid", "ae"), ("gfid", "vae")],
    "MAETok's latents are more discriminative (linear probe)": [("linear_probe_top1", "ae"), ("linear_probe_top1", "vae")],
    "MAETok's latents have fewer GMM modes (held-out NLL)": [("gmm_nll", "ae"), ("gmm_nll", "vae")],
}
METRICS = {  # table column -> (how to read it from a run's result, format)
    "PSNR (dB)": ("psnr", ".2f"),
    "last-20% gain (dB)": ("convergence_gain", ".2f"),
    LPIPS_LABEL: ("lpips", ".4f"),
    "rFID": ("rfid", ".1f"),
    "gFID": ("gfid", ".1f"),
    "decoder-free FID / floor": ("dfid_ratio", ".2f"),
    "recall vs recon.": ("dfid_recall", ".2f"),
    "SiT / Gaussian loss": ("heldout_ratio", ".3f"),
    "LP top-1 (%)": ("linear_probe_top1", ".1f"),
    "GMM NLL": ("gmm_nll", ".2f"),
}


def run_study(
    out: Path,
    variants: Optional[Sequence[str]] = None,
    data: str = "fashion-mnist",
    tokenizer_config: str = "tiny-maetok",
    diffusion_config: str = "tiny-sit",
    budget: Budget = CPU_BUDGET,
    tokenizer_overrides: Sequence[str] = (),
    diffusion_overrides: Sequence[str] = (),
    device: Optional[str] = None,
    inception: Optional[torch.nn.Module] = None,
    progress: bool = True,
    gmm_pca_dim: Optional[int] = None,
    seeds: Optional[int] = None,
    only_finished: bool = False,
) -> Path:
    """Run every (variant, seed) not finished yet and write ``out/study.md``; returns its path.

    ``seeds`` overrides every variant's seed count. ``only_finished``: train nothing, only rewrite the report
    from the finished runs. The GMM curves of all runs are fitted in one PCA dimension: ``gmm_pca_dim``, or the
    largest of the runs' >= 90% explained-variance dimensions."""
    variants = list(variants or VARIANTS)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ConfigError(f"unknown study variants {unknown}; known: {list(VARIANTS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    size, channels = dataset_shape(data, None, None, tokenizer_config, tokenizer_overrides)
    shape = [f"model.image_size={size}", f"model.in_channels={channels}"]
    evald = load_eval_data(data, size, channels, budget.eval_images, device, inception, progress=progress)
    runs: dict[str, list[dict[str, Any]]] = {slug: [] for slug in variants}
    # seed-major order: every variant's first seed, then the second seeds, ... (an interrupted study is balanced)
    for seed in range(max(seeds or VARIANTS[slug][2] for slug in variants)):
        for slug in variants:
            label, _, default_seeds = VARIANTS[slug]
            run_dir = out / slug / f"seed{seed}"
            if seed >= (seeds or default_seeds) or (only_finished and not (run_dir / "result.json").exists()):
                continue
            print(f"[maetok study] {label}, seed {seed}", flush=True)
            runs[slug].append(run_variant(out, slug, seed, evald, budget, tokenizer_config, diffusion_config,
                                          shape + list(tokenizer_overrides), diffusion_overrides, device, progress))
    runs = {slug: r for slug, r in runs.items() if r}
    if not runs:
        raise ModelFolderError(f"{out}: no finished run to report")
    baselines_path = out / "baselines.json"
    if baselines_path.exists():
        baselines = read_json_file(baselines_path, what_to_do="delete it to measure the baselines again")
    else:
        dim = next(iter(runs.values()))[0]["latent_dim"]
        baselines, _ = measure_baselines(evald, dim, budget)
        write_json(baselines_path, baselines)
    gmm_pca = shared_gmm(out, runs, budget, gmm_pca_dim, evald)
    return write_study(out, runs, baselines, gmm_pca, data, tokenizer_config, diffusion_config, budget,
                       evald, time.perf_counter() - start)


def run_variant(out: Path, slug: str, seed: int, evald: Any, budget: Budget, tokenizer_config: str,
                diffusion_config: str, tokenizer_overrides: Sequence[str] = (), diffusion_overrides: Sequence[str] = (),
                device: Optional[str] = None, progress: bool = True) -> dict[str, Any]:
    """One (variant, seed) of the study through the pipeline into ``out/<variant>/seed<k>`` (reused when finished);
    returns its result."""
    label, variant_overrides, _ = VARIANTS[slug]
    if slug in STAGE1_FRACTION:
        budget = replace(budget, stage1_steps=max(1, round(budget.stage1_steps * STAGE1_FRACTION[slug])))
    return run_pipeline(out / slug / f"seed{seed}", evald, budget, tokenizer_config, diffusion_config,
                        [*variant_overrides, *tokenizer_overrides], diffusion_overrides, seed=seed, device=device,
                        progress=progress, label=label)


def shared_gmm(out: Path, runs: dict[str, list[dict[str, Any]]], budget: Budget, pca_dim: Optional[int],
               evald: Any = None) -> dict[str, Any]:
    """Every run's GMM curve in ONE PCA dimension (``pca_dim`` or the largest of the runs' own 90% dims), set as
    ``gmm_shared`` in each run's dict. Curves come from those each run stored per dimension (``gmm_by_dim``); a
    missing one is fitted from the run's latent cache and tokenizer (and stored in its ``result.json``)."""
    from maetok.pipeline import gmm_curve

    own = {(slug, r["seed"]): r["gmm"]["own_pca_dim"] for slug, rs in runs.items() for r in rs}
    dim = int(pca_dim) if pca_dim is not None else max(own.values())
    for slug, rs in runs.items():
        for r in rs:
            run_dir = out / slug / f"seed{r['seed']}"
            curves = r.setdefault("gmm_by_dim", {})
            if str(dim) not in curves:
                fit, test = _gmm_latents(run_dir, budget, evald)
                curve = gmm_curve(fit, test, budget.gmm_ks, pca_dim=dim)
                curves[str(dim)] = {"test_nll": curve["test_nll"], "explained_variance": curve["explained_variance"]}
                write_json(run_dir / "result.json", {k: v for k, v in r.items() if k != "gmm_shared"})
            r["gmm_shared"] = {**curves[str(dim)], "pca_dim": dim, "own_pca_dim": r["gmm"]["own_pca_dim"]}
    source = f"given (--gmm-pca-dim {pca_dim})" if pca_dim is not None else "the largest of the runs' >= 90% variance dims"
    return {"pca_dim": dim, "pca_dim_source": source,
            "own_pca_dims": {f"{slug}/seed{seed}": d for (slug, seed), d in own.items()}}


def _gmm_latents(run_dir: Path, budget: Budget, evald: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A run's GMM fit latents (the first ``gmm_train`` of its cache) and held-out latents, rebuilt from its latent
    cache and tokenizer."""
    from maetok.data.latents import LatentDataset
    from maetok.encode import encode_images, load_tokenizer

    if evald is None or not (run_dir / "latents").exists() or not is_finished(run_dir / "tokenizer"):
        raise ModelFolderError(f"{run_dir}: its GMM curve at this PCA dimension was not stored and its latent cache / "
                               "tokenizer are not here to fit it; pass --gmm-pca-dim with a dimension its result.json stores (gmm_by_dim)")
    cache = LatentDataset(run_dir / "latents")
    tokenizer = load_tokenizer(run_dir / "tokenizer", "cpu")
    return cache.latents[: budget.gmm_train], encode_images(tokenizer, evald.images)


def run_value(r: dict[str, Any], key: str, table_k: str) -> Optional[float]:
    """One figure of a run, in the study's units (accuracy in %)."""
    if key == "gmm_nll":
        return r["gmm_shared"]["test_nll"].get(table_k)
    if key == "linear_probe_top1":
        return None if r["linear_probe"] is None else 100 * r["linear_probe"]["top1"]
    if key == "gfid":
        return r["generation"].get("gfid")
    if key in ("dfid_ratio", "dfid_recall"):
        free = r["generation"].get("decoder_free") or {}
        return free.get("fid_ratio" if key == "dfid_ratio" else "recall")
    if key == "heldout_ratio":
        return (r.get("sit_heldout") or {}).get("ratio")
    if key == "convergence_gain":
        return (r.get("convergence") or {}).get("gain_last_20pct_db")
    return r["reconstruction"].get(key)


def claim_verdicts(verdicts: dict[tuple[str, str, str, str], Optional[str]], labels: dict[str, str]) -> list[str]:
    """One plain line per claim of :data:`CLAIM_TEXTS`: it *holds* when every ordering that tests it holds beyond
    seed noise, *fails* when any is reversed beyond it, and *cannot be decided at this scale* otherwise.
    ``verdicts``: :func:`judge`'s answer per ordering of :data:`CLAIMS`."""
    lines = []
    for text, tested in CLAIM_TEXTS.items():
        found = {ordering_name(c, labels): v for c, v in verdicts.items() if (c[0], c[3]) in tested}
        states = [(v or "").split(" ")[0] for v in found.values()]
        if not any(found.values()):
            word = "**cannot be decided**: no comparison with 2 or more seeds on each side"
        elif all(state == "holds" for state in states):
            word = "**holds** beyond seed noise"
        elif "reversed" in states:
            word = "**fails**: reversed beyond seed noise in " + ", ".join(n for n, v in found.items() if (v or "").startswith("reversed"))
        else:
            word = "**cannot be decided at this scale**: within seed noise (or too few seeds) in " + ", ".join(
                n for n, v in found.items() if not (v or "").startswith("holds"))
        lines.append(f"- {text}: {word}.")
    return lines


def ordering_name(claim: tuple[str, str, str, str], labels: dict[str, str]) -> str:
    """``"MAETok vs AE: gfid"`` for an ordering of :data:`CLAIMS`."""
    key, _, winner, loser = claim
    return f"{labels.get(winner, winner)} vs {labels.get(loser, loser)}: {key}"


def held_out_images(runs: dict[str, list[dict[str, Any]]]) -> str:
    """`` (N test images)``: the held-out images behind the runs' convergence figures when they logged one count."""
    counts = {(r.get("convergence") or {}).get("num_images") for rs in runs.values() for r in rs} - {None}
    return held_out_count({"num_images": counts.pop()}) if len(counts) == 1 else ""


def floor_recall(runs: dict[str, list[dict[str, Any]]]) -> str:
    """The range of the decoder-free floors' recall over the runs, as text."""
    values = [(r["generation"].get("decoder_free") or {}).get("floor_recall") for rs in runs.values() for r in rs]
    values = [v for v in values if v is not None]
    return f"{min(values):.2f}-{max(values):.2f}" if values else "-"


def mean_std(values: list[Optional[float]]) -> tuple[Optional[float], Optional[float], int]:
    present = [v for v in values if v is not None]
    if not present:
        return None, None, 0
    mean = sum(present) / len(present)
    std = math.sqrt(sum((v - mean) ** 2 for v in present) / (len(present) - 1)) if len(present) > 1 else None
    return mean, std, len(present)


def judge(claim: tuple[str, str, str, str], stats: dict[str, dict[str, tuple]]) -> Optional[str]:
    """Whether a claimed ordering holds: the difference of the means against twice its standard error
    (``sqrt(s_a^2 / n_a + s_b^2 / n_b)``); None when either side has fewer than 2 seeds."""
    key, direction, winner, loser = claim
    if winner not in stats or loser not in stats:
        return None
    (ma, sa, na), (mb, sb, nb) = stats[winner][key], stats[loser][key]
    if ma is None or mb is None or na < 2 or nb < 2:
        return None
    gain = (ma - mb) if direction == "higher" else (mb - ma)
    noise = 2 * math.sqrt(sa**2 / na + sb**2 / nb)
    if gain > noise:
        return f"holds ({gain:+.2f} in its favour, noise +-{noise:.2f})"
    if gain < -noise:
        return f"reversed ({gain:+.2f}, noise +-{noise:.2f})"
    return f"not decided: within seed noise ({gain:+.2f}, noise +-{noise:.2f})"


def write_study(out: Path, runs: dict[str, list[dict[str, Any]]], baselines: dict[str, Any], gmm_pca: dict[str, Any],
                data: str, tokenizer_config: str, diffusion_config: str, budget: Budget, evald: Any,
                wall_s: float) -> Path:
    """``out/study.md`` (and its JSON and plots) from the finished runs; ``evald``: the held-out
    :class:`~maetok.pipeline.EvalData` they were measured on."""
    from maetok.eval.fid import fid_label
    from maetok.eval.latents import plot_gmm_curves
    from maetok.eval.plots import plot_labelled_scatter

    ks = [str(k) for k in budget.gmm_ks]
    table_k = str(GMM_TABLE_K) if str(GMM_TABLE_K) in ks else ks[-1]
    labels = {slug: VARIANTS[slug][0] for slug in runs}
    stats = {slug: {key: mean_std([run_value(r, key, table_k) for r in rs]) for key, _ in METRICS.values()}
             for slug, rs in runs.items()}
    lp, gfid = METRICS["LP top-1 (%)"][0], METRICS["gFID"][0]
    plot_labelled_scatter({labels[s]: (stats[s][lp][0], stats[s][gfid][0]) for s in runs
                           if stats[s][lp][0] is not None and stats[s][gfid][0] is not None},
                          out / "gfid_vs_lp.png", "linear probe top-1 (%)", f"g{fid_label(budget.fid_samples)} (no CFG)",
                          title=f"gFID vs linear probing ({data}; mean over seeds)")
    plot_gmm_curves({f"{labels[s]} (seed {r['seed']})": r["gmm_shared"] for s, rs in runs.items() for r in rs},
                    out / "gmm_nll.png", title=f"GMM held-out NLL vs K ({data})")
    first = {slug: out / slug / f"seed{rs[0]['seed']}" for slug, rs in runs.items()}
    recon_rows = [evald.images[:16]] + [torch.load(d / "grids.pt", weights_only=True)["reconstructions"]
                                       for d in first.values() if (d / "grids.pt").exists()]  # absent: runs copied from docs/
    save_image_grid(torch.cat(recon_rows), out / "reconstructions.png", nrow=16)
    command = "maetok " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith(("maetok", "cli.py")) else "run_study(...)"
    n_eval = len(evald.images)
    fid_n, ref_n = fid_label(budget.fid_samples), fid_label(n_eval)
    pca, gauss, floor = baselines["pca"], baselines["gaussian"], baselines["real_vs_real"]
    judged = {claim: judge(claim, stats) for claim in CLAIMS}
    verdicts = {ordering_name(claim, labels): v for claim, v in judged.items()}
    claim_lines = claim_verdicts(judged, labels)
    report = {"data": data, "tokenizer_config": tokenizer_config, "diffusion_config": diffusion_config,
              "budget": asdict(budget), "machine": machine_description(), "command": command,
              "wall_time_s_this_run": wall_s, "gmm_pca": gmm_pca, "baselines": baselines,
              "summary": {slug: {key: {"mean": m, "std": s, "seeds": n} for key, (m, s, n) in st.items()}
                          for slug, st in stats.items()},
              "claims": verdicts, "claim_verdicts": claim_lines, "runs": runs}
    write_json(out / "study.json", report)

    def cell(slug: str, key: str, spec: str) -> str:
        m, s, n = stats[slug][key]
        if m is None:
            return "-"
        return f"{m:{spec}}" + (f" +- {s:{spec}}" if s is not None else "") + f" ({n})"

    lines = [
        f"# maetok study: AE vs VAE vs MAETok on {data}",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine_description()}  ",
        f"Wall time of the finished runs: {format_seconds(sum(sum(r['timings_s'].values()) for rs in runs.values() for r in rs))} "
        f"(this invocation: {format_seconds(wall_s)}).",
        "",
        f"Every run: `{tokenizer_config}` architecture, {budget.stage1_steps} stage-1 steps ({budget.stage1_loss}) + "
        f"{budget.stage2_steps} decoder fine-tuning steps ({budget.stage2_loss}; frozen encoder, mask ratio decaying "
        f"to 0 for the masked variants); `{diffusion_config}` SiT, {budget.diffusion_steps} steps on the tokenizer's "
        f"cached training latents. gFID: {budget.fid_samples} class-balanced samples, {budget.fid_sampling_steps} "
        f"steps, CFG {budget.cfg_scale if budget.cfg_scale is not None else 'of the preset'}, against "
        f"{n_eval} held-out images ({evald.draw}); rFID: reconstructions of the same images. Linear probe: BatchNorm + linear "
        f"(L-BFGS) on flattened latents. GMM: held-out NLL per sample (nats) at K = {table_k}, in one standardised PCA "
        f"space of {gmm_pca['pca_dim']} dims for every run ({gmm_pca['pca_dim_source']}). Cells: mean +- std over "
        "seeds (number of seeds).",
        "",
        "| tokenizer | " + " | ".join(METRICS) + " |",
        "|---|" + "---|" * len(METRICS),
    ]
    for slug in runs:
        lines.append(f"| {labels[slug]} | " + " | ".join(cell(slug, key, spec) for key, spec in METRICS.values()) + " |")
    free = gauss.get("decoder_free") or {}
    lines += [
        f"| baseline: PCA-{pca['dim']} | {pca['psnr']:.2f} | - | {format_optional(pca.get('lpips'), '.4f')} | "
        f"{format_optional(pca.get('rfid'), '.1f')} | {format_optional(gauss.get('gfid'), '.1f')} (Gaussian per class in its "
        f"space) | {format_optional(free.get('fid_ratio'))} | {format_optional(free.get('recall'))} | - | - | - |",
        f"| floor: real vs real | - | - | - | - | {format_optional(floor.get('fid'), '.1f')} | - | - | - | - | - |",
        "",
        f"Last-20% gain: held-out PSNR{held_out_images(runs)} gained by stage 1 over its last 20% of steps; below 0.2 dB "
        "counts as converged (at the end of a cosine schedule this is partly the schedule's doing). "
        f"FIDs: rFID-{ref_n}, gFID-{fid_n} (no CFG). Decoder-free FID / floor: FID of the samples against the "
        "tokenizer's own reconstructions of the reference images, divided by the FID of the reconstructions of as many "
        "training images against them (1 = a generator that reproduces the encoded distribution; the decoder's error "
        "and its blur drop out). Recall vs recon.: the fraction of those reconstructions inside the samples' k-NN "
        "manifold (k = 3; the floor's recall is about "
        f"{floor_recall(runs)}). SiT / Gaussian loss: the SiT's velocity loss on held-out normalised latents over the "
        "best a Gaussian fitted to the training latents allows (no decoder, no Inception). The PCA row reconstructs "
        "with as many numbers per image as the tokenizers' latents; its generation cells are a full-covariance "
        "Gaussian per class in that PCA space, measured against the PCA reconstructions.",
        "",
        "## The paper's claims at this scale",
        "",
        *claim_lines,
        "",
        "Each ordering, judged against twice the standard error of the difference of the means:",
        "",
    ]
    lines += [f"- {name}: {verdict or 'not decided (fewer than 2 seeds on a side)'}" for name, verdict in verdicts.items()]
    lines += [
        "",
        "![gFID vs LP](gfid_vs_lp.png) ![GMM NLL](gmm_nll.png)",
        "",
        "Reconstructions (first row: originals; then the first seed of each tokenizer, in the table's order):",
        "",
        "![reconstructions](reconstructions.png)",
        "",
        "Samples, latent maps and logs of every run: `<variant>/seed<k>/` ("
        + ", ".join(f"[{labels[s]}]({s}/seed{rs[0]['seed']}/samples.png)" for s, rs in runs.items()) + ").",
        "",
    ]
    return write_text(out / "study.md", "\n".join(lines) + "\n")
