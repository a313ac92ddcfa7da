"""The end-to-end job that ``maetok demo``, ``maetok study`` and a user's own run share.

One run of :func:`run_pipeline` goes through eight phases, each timed, each reusing its output when a previous
invocation finished it (so a rerun into the same folder continues where it stopped)::

    stage1/      tokenizer stage 1 (mask modeling, auxiliary decoders)
    tokenizer/   stage 2: the decoder fine-tuned on the frozen encoder        -> reconstruction metrics
    latents/     the training split encoded once                              -> latent analysis
    sit/         SiT on the latents                                           -> gFID (its samples drawn as the grid),
                                                                                 the decoder-free figures, the SiT's
                                                                                 held-out loss
    result.json  every figure of the run (written last: its presence means the run is finished)

The decoder-free figures (:func:`~maetok.eval.generation.decoder_free_metrics`) measure the SiT's samples against
the tokenizer's own reconstructions of the held-out images, over their floor (the reconstructions of as many
training images, ``EvalData.floor_images``), so that the decoder's error drops out of the generator's.

Held-out images, their Inception statistics and the network are loaded once (:func:`load_eval_data`) and
shared by every run and by the baselines (:func:`maetok.eval.baselines.compute_baselines`). Datasets without
class labels run unconditionally: no linear probe, no class rows, a latent map without colours.
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from maetok.config import Budget, DiffusionTrainConfig, TokenizerTrainConfig, load_config
from maetok.data import DatasetSubset, build_dataset, dataset_labels, describe_draw, draw_order, load_images, \
    save_image_grid
from maetok.data.images import to_uint8
from maetok.errors import ModelFolderError
from maetok.runs import is_finished, read_json_file, resolve_device, save_torch, write_json

__all__ = ["EvalData", "load_eval_data", "measure_baselines", "run_pipeline", "tokenizer_overrides"]

MSE_ONLY = ["loss.perceptual_weight=0", "loss.gan_weight=0"]


def tokenizer_overrides(budget: Budget) -> tuple[list[str], list[str]]:
    """Config overrides of (stage 1, stage 2) for a budget: step counts, five evaluations (on 256 held-out images:
    the last 20% of stage 1 is the convergence check) and checkpoints per stage, the stage-2 mask ratio reaching 0%
    after ``budget.stage2_mask_decay`` of the fine-tuning steps (the paper: all of them), a new stage-2
    discriminator (when stage 1 trained none) warming up alone for the first 20% of them, and each stage's loss.
    Stage 1's config holds no ``finetune.*`` override (it does not use them), so one stage-1 run can be shared by
    stage 2s of different lengths."""
    budget.validate()
    s1, s2 = budget.stage1_steps, budget.stage2_steps
    common = ["data.eval_images=256", f"train.steps={s1}", f"train.log_every={max(1, min(20, s1 // 6))}"]
    stage1 = common + [f"train.eval_every={max(1, s1 // 5)}", f"train.ckpt_every={max(1, s1 // 5)}"]
    stage2 = common + [
        f"train.eval_every={max(1, s2 // 5)}",
        f"train.ckpt_every={max(1, s2 // 5)}",
        f"finetune.steps={s2}",
        f"finetune.mask_decay_steps={max(1, round(s2 * budget.stage2_mask_decay))}",
        f"finetune.disc_warmup_steps={s2 // 5}",
    ]
    stage1 += MSE_ONLY if budget.stage1_loss == "mse" else []
    stage2 += MSE_ONLY if budget.stage2_loss == "mse" else []
    if budget.stage2_batch:
        stage2.append(f"train.batch_size={budget.stage2_batch}")
    return stage1, stage2


# ---------------------------------------------------------------------------------------------------------
# Held-out data, loaded once
# ---------------------------------------------------------------------------------------------------------


@dataclass
class EvalData:
    """The held-out images every run is measured on: ``images (M, C, S, S)`` in [-1, 1] (a seeded, class-balanced
    draw from the test split, the same on every run; ``draw`` says how it was made), ``labels (M,)`` (None when the
    dataset has no classes), the Inception network and the
    images' Inception statistics (``None`` with ``fid_note`` when no Inception weights exist), and ``floor_images``
    ``(M, C, S, S)``: as many training images (a seeded draw), whose FID against the held-out images is the
    real-vs-real floor and whose reconstructions give the decoder-free figure its floor."""

    data: str
    image_size: int
    channels: int
    images: Tensor
    labels: Optional[Tensor]
    class_names: list[str]
    inception: Optional[torch.nn.Module]
    reference: Any
    fid_note: Optional[str] = None
    floor_images: Optional[Tensor] = None
    draw: str = ""

    @property
    def conditional(self) -> bool:
        return self.labels is not None


def load_eval_data(data: str, image_size: int, channels: int, num: int, device: Optional[str] = None,
                   inception: Optional[torch.nn.Module] = None, progress: bool = True) -> EvalData:
    """``num`` test images of ``data`` (a seeded draw, :data:`HELDOUT_SEED`, with every class equally when the data
    has classes: :func:`~maetok.data.draw_order`) with their Inception statistics (one Inception pass, memoised
    on disk by :func:`~maetok.eval.inception.memoized`: a later run on the same machine reads them)."""
    from maetok.eval.fid import compute_fid_stats
    from maetok.eval.inception import load_fid_network, memoized

    from maetok.eval.baselines import load_split

    test_set = build_dataset(data, "test", image_size, channels)
    order, limit = draw_order(len(test_set), num, HELDOUT_SEED, dataset_labels(test_set))
    images, labels = load_images(test_set, order, limit=limit)
    draw = describe_draw(len(images), len(test_set), None if labels is None else labels.numpy(), HELDOUT_SEED)
    floor_images, _ = load_split(data, "train", image_size, channels, len(images), seed=FLOOR_SEED)
    network, note = load_fid_network(inception, device)
    reference = None
    if network is not None:
        reference = compute_fid_stats(to_uint8(images, channels_last=True).numpy(), memoized(network),
                                      progress=progress)  # once per machine
    class_names = list(getattr(test_set, "class_names", []) or []) if labels is not None else []
    return EvalData(data, image_size, channels, images, labels, class_names, network, reference, note, floor_images,
                    draw)


def measure_baselines(evald: EvalData, dim: int, budget: Budget, sample_labels: Optional[Tensor] = None,
                      progress: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """The PCA-``dim`` / Gaussian / real-vs-real baselines of a run's data
    (:func:`~maetok.eval.baselines.compute_baselines`): fitted on ``budget.baseline_train`` training images
    (per class when ``evald`` has classes), measured on ``evald``'s held-out images and reference statistics
    (``progress``: bars over the Inception and LPIPS passes). Returns ``(figures {"pca", "gaussian",
    "real_vs_real"}, everything compute_baselines returns)``."""
    from maetok.eval.baselines import compute_baselines, load_split

    train_images, train_labels = load_split(evald.data, "train", evald.image_size, evald.channels,
                                            budget.baseline_train)
    full = compute_baselines(train_images, train_labels if evald.conditional else None, evald.images, dim,
                             evald.inception, evald.reference, sample_labels=sample_labels,
                             floor_images=evald.floor_images, progress=progress)
    return {key: full[key] for key in ("pca", "gaussian", "real_vs_real")}, full


# ---------------------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Timer:
    phases: dict[str, float] = field(default_factory=dict)
    verbose: bool = True

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.verbose:
            print(f"[maetok] {name} ...", flush=True)
        start = time.perf_counter()
        yield
        self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - start


def tokenizer_configs(data: str, config: str, budget: Budget, overrides: Sequence[str] = (),
                      seed: int = 0) -> tuple[TokenizerTrainConfig, TokenizerTrainConfig]:
    """The configs of stage 1 and stage 2 of one pipeline run (``finetune.*`` overrides reach stage 2 only)."""
    stage1, stage2 = tokenizer_overrides(budget)
    extra = [f"data.dataset={data}", f"train.seed={seed}", *overrides]
    stage1_extra = [o for o in extra if not o.startswith("finetune.")]
    return (load_config(TokenizerTrainConfig, config, stage1 + stage1_extra),
            load_config(TokenizerTrainConfig, config, stage2 + extra))


def train_tokenizer(out: Path, data: str, config: str, budget: Budget, overrides: Sequence[str] = (),
                    seed: int = 0, device: Optional[str] = None, stage1_dir: Optional[Path] = None) -> TokenizerTrainConfig:
    """Stage 1 into ``out/stage1`` (or use the finished ``stage1_dir``) and stage 2 into ``out/tokenizer``; a stage
    already exported is skipped, an interrupted one resumed (both only under the same config)."""
    from maetok.train.loop import holds_run
    from maetok.train.tokenizer import PRETRAIN_UNUSED_SECTIONS, TokenizerTrainer

    cfg1, cfg2 = tokenizer_configs(data, config, budget, overrides, seed)
    stage1_dir = stage1_dir or out / "stage1"
    if not reuse_finished(stage1_dir, "tokenizer stage 1", cfg1, PRETRAIN_UNUSED_SECTIONS):
        TokenizerTrainer(cfg1, stage1_dir, stage="pretrain", device=device, resume=holds_run(stage1_dir)).fit()
    if not reuse_finished(out / "tokenizer", "tokenizer stage 2", cfg2):
        TokenizerTrainer(cfg2, out / "tokenizer", stage="finetune", init_from=stage1_dir, device=device,
                         resume=holds_run(out / "tokenizer")).fit()
    return cfg2


def check_same_config(run_dir: Path, what: str, cfg: Any, unused: Sequence[str] = ()) -> None:
    """A phase's run directory is reused (finished) or resumed (interrupted) only under the config it ran under
    (``unused``: key prefixes the phase never reads): another config (another budget, data set, seed ...) raises
    ``ValueError`` naming the differences."""
    from maetok.train.loop import run_config_changes

    changes = run_config_changes(run_dir, cfg, unused)
    if changes:
        shown = ", ".join(f"{key} {old!r} -> {new!r}" for key, old, new in changes[:3])
        raise ModelFolderError(f"{run_dir} holds a {what} run made under another config ({shown}"
                               f"{' ...' if len(changes) > 3 else ''}): write this run to another --out, or delete {run_dir}")


def reuse_finished(run_dir: Path, what: str, cfg: Any, unused: Sequence[str] = ()) -> bool:
    """Whether the training run in ``run_dir`` finished before under ``cfg`` (then it is reused, and that is said);
    an unfinished one is resumed by the caller. Another config raises (:func:`check_same_config`)."""
    check_same_config(run_dir, what, cfg, unused)
    if not is_finished(run_dir):
        return False
    print(f"[maetok] {run_dir}: {what} finished before, reusing it", flush=True)
    return True


def run_pipeline(
    out: Path,
    evald: EvalData,
    budget: Budget,
    tokenizer_config: str,
    diffusion_config: str,
    tokenizer_extra: Sequence[str] = (),
    diffusion_extra: Sequence[str] = (),
    seed: int = 0,
    device: Optional[str] = None,
    progress: bool = True,
    label: str = "",
    stage1_dir: Optional[Path] = None,
) -> dict[str, Any]:
    """Train a tokenizer and a SiT on ``evald.data`` and measure both; returns (and writes to
    ``out/result.json``) the figures: ``reconstruction``, ``generation`` (gFID, sFID and ``decoder_free``),
    ``sit_heldout`` (:func:`~maetok.eval.generation.heldout_denoising_loss`), ``linear_probe`` (None without
    classes), ``gmm`` (the curve in this tokenizer's own 90%-variance dimension), ``gmm_by_dim``
    (``{d: {"test_nll": {K: NLL}, "explained_variance"}}`` for PCA dims 1..24 when ``budget.gmm_all_dims``, so a
    comparison in one shared dimension needs no latents later), ``latent_map_method``, ``convergence``,
    ``timings_s``, ``num_cached_latents``, ``latent_dim`` (L x H numbers per image). A finished run
    (``result.json`` present) is returned as it is. ``stage1_dir``: where stage 1 trains (or was trained before,
    to be shared by several stage 2s); default ``out/stage1``."""
    from maetok.data.latents import LatentDataset
    from maetok.diffusion.generator import LatentGenerator, generate_images
    from maetok.encode import cache_latents, encode_images, load_tokenizer, reconstruct_images
    from maetok.eval.generation import DecoderFreeReference, generation_metrics, heldout_denoising_loss, \
        reference_from_images
    from maetok.eval.latents import latent_analysis, latent_map
    from maetok.eval.metrics import lpips_unavailable_reason
    from maetok.eval.reconstruction import ReconstructionEvaluator
    from maetok.train.diffusion import DiffusionTrainer
    from maetok.train.loop import holds_run
    from maetok.train.tokenizer import PRETRAIN_UNUSED_SECTIONS

    out = Path(out)
    stage1_dir = Path(stage1_dir) if stage1_dir is not None else out / "stage1"
    dif_overrides = [
        f"latents={out / 'latents'}",
        f"train.steps={budget.diffusion_steps}",
        f"train.eval_every={max(1, budget.diffusion_steps // 3)}",
        f"train.ckpt_every={max(1, budget.diffusion_steps // 3)}",
        f"train.log_every={max(1, min(25, budget.diffusion_steps // 6))}",
        f"train.seed={seed}",
        *([] if evald.conditional else ["model.conditional=false"]),
        *diffusion_extra,
    ]
    dif_cfg = load_config(DiffusionTrainConfig, diffusion_config, dif_overrides)
    result_path = out / "result.json"
    if result_path.exists():
        cfg1, cfg2 = tokenizer_configs(evald.data, tokenizer_config, budget, tokenizer_extra, seed)
        for run_dir, what, cfg, unused in ((stage1_dir, "tokenizer stage 1", cfg1, PRETRAIN_UNUSED_SECTIONS),
                                           (out / "tokenizer", "tokenizer stage 2", cfg2, ()),
                                           (out / "sit", "SiT", dif_cfg, ())):
            check_same_config(run_dir, what, cfg, unused)
        print(f"[maetok] {out}: finished before, reusing {result_path.name}", flush=True)
        return read_json_file(result_path, what_to_do="delete it to measure the run again")
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    timer = Timer(verbose=progress)
    with timer.phase("tokenizer stage 1 + stage 2"):
        cfg = train_tokenizer(out, evald.data, tokenizer_config, budget, tokenizer_extra, seed, device, stage1_dir)
    m = cfg.model
    tokenizer = load_tokenizer(out / "tokenizer", dev)

    with timer.phase("reconstruction metrics"):
        recon = reconstruct_images(tokenizer, evald.images)
        evaluator = ReconstructionEvaluator(evald.inception, evald.reference, lpips=lpips_unavailable_reason() is None,
                                            keep_features=True, progress=progress)
        evaluator.update(evald.images, recon)
        reconstruction = evaluator.result()
    decoder_free = None
    if evald.inception is not None:
        with timer.phase("reconstructions of the floor images (decoder-free figures)"):
            floor_recon = reconstruct_images(tokenizer, evald.floor_images)
            decoder_free = DecoderFreeReference(
                evaluator.reconstruction_features("reconstructions of the held-out images"),
                reference_from_images(to_uint8(floor_recon, channels_last=True).numpy(), evald.inception,
                                      progress=progress, source="reconstructions of training images"))

    with timer.phase("latent cache of the training split"):
        train_set = cache_draw(build_dataset(evald.data, "train", m.image_size, m.in_channels), budget.cache_limit)
        cache_latents(tokenizer, train_set, out / "latents", out / "tokenizer" / "model", progress=progress,
                      restart_if_stale=True)

    with timer.phase("SiT training"):
        if not reuse_finished(out / "sit", "SiT", dif_cfg):
            DiffusionTrainer(dif_cfg, out / "sit", device=device, resume=holds_run(out / "sit")).fit()
    pipe = LatentGenerator.load(out / "sit", device=str(dev))

    sampling = dataclasses.replace(pipe.sampling, steps=budget.fid_sampling_steps)
    if budget.cfg_scale is not None:
        sampling = dataclasses.replace(sampling, cfg_scale=budget.cfg_scale)
    generation: dict[str, Any] = {"cfg_scale": sampling.cfg_scale, "sampler": sampling.sampler,
                                  "steps": sampling.steps, "num_samples": budget.fid_samples}
    with timer.phase("gFID"):
        samples, sample_labels = generate_images(pipe, tokenizer, budget.fid_samples, None, sampling, batch_size=250,
                                                 seed=seed + 1, progress=progress)
        # the grid shows the very samples the gFID measures: one row per class (up to 10), or the first 100
        grid, per_row = sample_grid(samples, sample_labels)
        save_image_grid(torch.from_numpy(grid).permute(0, 3, 1, 2), out / "samples.png", nrow=per_row)
        if evald.inception is not None:
            gen = generation_metrics(samples, evald.reference, evald.inception, precision_recall_k=None,
                                     progress=progress, decoder_free=decoder_free)
            generation.update(gfid=gen["gfid"], sfid=gen["sfid"], decoder_free=gen["decoder_free"])
        else:
            generation.update(gfid=None, sfid=None, note=evald.fid_note)

    cache = LatentDataset(out / "latents")
    test_latents = encode_images(tokenizer, evald.images)
    with timer.phase("SiT held-out loss"):
        norm = pipe.normalizer
        cache_labels = cache.labels if evald.conditional else None
        sit_heldout = heldout_denoising_loss(pipe.model, norm.normalize(test_latents), norm.normalize(cache.latents),
                                             evald.labels, cache_labels, seed=seed)

    with timer.phase("latent analysis"):
        n_train = min(budget.probe_train, len(cache))
        train_latents, train_labels = cache.latents[:n_train], cache.labels[:n_train]
        probe = None
        if evald.conditional:
            probe = latent_analysis(train_latents, train_labels, test_latents, evald.labels, probe_optimizer="lbfgs",
                                    probe_epochs=10, seed=seed, progress=progress, gmm=False)["linear_probe"]
        fit = train_latents[: budget.gmm_train]
        gmm = gmm_curve(fit, test_latents, budget.gmm_ks, progress=progress)
        # the curve at every PCA dimension up to GMM_DIMS, so that a later shared-dimension comparison (the study,
        # possibly in another session) needs no latents
        gmm_by_dim = {}
        for d in range(1, min(GMM_DIMS, fit[0].numel(), len(fit) - 1) + 1) if budget.gmm_all_dims else ():
            curve = gmm_curve(fit, test_latents, budget.gmm_ks, pca_dim=d)
            gmm_by_dim[str(d)] = {"test_nll": curve["test_nll"], "explained_variance": curve["explained_variance"]}
        colours = evald.labels if evald.conditional else torch.zeros(len(test_latents), dtype=torch.int64)
        map_method = latent_map(test_latents, colours, out / "latent_map.png",
                                f"{label or 'tokenizer'} latents ({evald.data} test)")

    save_image_grid(torch.cat([evald.images[:16], recon[:16]]), out / "reconstructions.png", nrow=16)
    save_torch({"reconstructions": recon[:16]}, out / "grids.pt")
    result = {
        "label": label,
        "seed": seed,
        "tokenizer_config": tokenizer_config,
        "tokenizer_overrides": list(tokenizer_extra),
        "diffusion_config": diffusion_config,
        "latent_shape": [m.num_latent_tokens, m.latent_dim],
        "latent_dim": m.num_latent_tokens * m.latent_dim,
        "reconstruction": reconstruction,
        "generation": generation,
        "sit_heldout": sit_heldout,
        "linear_probe": probe,
        "gmm": gmm,
        "gmm_by_dim": gmm_by_dim,
        "latent_map_method": map_method,
        "num_cached_latents": len(cache),
        "convergence": convergence(stage1_dir / "log.csv"),
        "timings_s": timer.phases,
    }
    write_json(result_path, result)
    return result


def sample_grid(samples: np.ndarray, labels: Optional[np.ndarray], rows: int = 10,
                per_row: int = 10) -> tuple[np.ndarray, int]:
    """Samples ``(N, H, W, C)`` uint8 for a grid: with labels, the first ``per_row`` of each of the first ``rows``
    classes (fewer per row when a class has fewer samples), in class order; without, the first
    ``rows * per_row``. Returns ``(images (M, H, W, C), images per row)``."""
    if labels is None:
        return samples[: rows * per_row], per_row
    classes = np.unique(labels)[:rows]
    per_row = min(per_row, *(int((labels == c).sum()) for c in classes))
    chosen = np.concatenate([np.flatnonzero(labels == c)[:per_row] for c in classes])
    return samples[chosen], per_row


HELDOUT_SEED = 0  # the draw of the held-out test images every run is measured on
FLOOR_SEED = 1  # the draw of training images behind the floors (real vs real, and of the decoder-free figures)
CACHE_SEED = 2  # the draw (and order) of the training images whose latents the SiT trains on
GMM_DIMS = 24  # GMM curves are stored for every PCA dimension up to this one (Budget.gmm_all_dims)
CONVERGED_DB = 0.2  # "converged": the last 20% of the stage-1 steps gained less than this (PSNR, dB)


def cache_draw(train_set: Any, limit: Optional[int]) -> Any:
    """The training images whose latents the pipeline caches: a seeded draw of ``limit`` of them (all when None or
    0) in shuffled order. Image folders list their classes one after another, and the SiT, the linear probe, the GMM
    and the held-out loss read the cache or a prefix of it: each must hold every class."""
    return DatasetSubset(train_set, np.random.default_rng(CACHE_SEED).permutation(len(train_set))[: limit or None])


def convergence(log_csv: Path) -> dict[str, Any]:
    """Stage 1's held-out PSNR at 80% and 100% of its steps (from its log), whether the last 20% gained less
    than :data:`CONVERGED_DB`, and ``num_images``: the held-out images it was measured on (None in a log written
    before maetok logged that count)."""
    import csv

    rows = [r for r in csv.DictReader(log_csv.open()) if r.get("eval_psnr")] if log_csv.exists() else []
    if len(rows) < 2:
        return {"psnr_at_80pct": None, "psnr_final": None, "gain_last_20pct_db": None, "converged": None,
                "num_images": None}
    before, final = float(rows[-2]["eval_psnr"]), float(rows[-1]["eval_psnr"])
    return {"psnr_at_80pct": before, "psnr_final": final, "gain_last_20pct_db": final - before,
            "converged": final - before < CONVERGED_DB,
            "num_images": int(float(rows[-1]["eval_images"])) if rows[-1].get("eval_images") else None}


def gmm_curve(fit: Tensor, test: Tensor, ks: Sequence[int], pca_dim: Optional[int] = None,
              progress: bool = False) -> dict[str, Any]:
    """GMM held-out NLL vs K (keys as strings, JSON-ready) in this tokenizer's own 90% PCA dimension or
    ``pca_dim`` (``progress``: a bar over K)."""
    from maetok.eval.latents import gmm_nll_analysis

    usable = [k for k in ks if k <= len(fit)]
    r = gmm_nll_analysis(fit, usable, test_latents=test, progress=progress, pca_dim=pca_dim)
    return {"test_nll": {str(k): v for k, v in r["test_nll"].items()}, "pca_dim": r["pca_dim"],
            "own_pca_dim": r["own_pca_dim"], "explained_variance": r["explained_variance"], "notes": r["notes"]}
