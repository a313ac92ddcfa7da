"""Reconstruction quality: one evaluator (:class:`ReconstructionEvaluator`, ``update()`` / ``result()``) for PSNR,
SSIM (both conventions), LPIPS (VGG) and rFID, and ``maetok eval-recon`` (:func:`eval_recon`) over a dataset split.

Every caller (the pipeline, the demo's stage-2 comparison, the PCA baseline, ``eval-recon``) feeds the same
evaluator, so the numbers are computed one way. Images are measured as uint8 (:func:`maetok.data.images.to_uint8`),
exactly as they would be saved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor
from torch.utils.data import Dataset

from maetok.data.images import DEFAULT_MAX_IMAGE_PIXELS, to_uint8
from maetok.errors import DataError
from maetok.eval.fid import FeatureStats, InceptionStats, fid_label, frechet_distance, load_stats_npz
from maetok.eval.metrics import LPIPS_LABEL, lpips_per_image, lpips_unavailable_reason, psnr_per_image, ssim_per_image

__all__ = ["ReconstructionEvaluator", "evaluate_tokenizer", "eval_recon"]

PathLike = Union[str, Path]


class ReconstructionEvaluator:
    """Running reconstruction metrics over batches of (original, reconstruction) pairs.

    ``update(originals, reconstructions)``: ``(B, C, H, W)`` float in [-1, 1] or uint8, any number of images (fed
    through in chunks of ``chunk`` pairs). ``result()`` returns ``psnr``, ``ssim`` (data_range 1, correct),
    ``ssim_dr2`` (data_range 2, the tokenizer-paper convention), ``num_images``, ``lpips`` (LPIPS-VGG of the uint8
    images mapped back to [-1, 1], mean over images; when ``lpips``; on ``device``, default the inputs') and, when an
    Inception network is given, ``rfid`` with ``rfid_reference``: against ``reference`` (the originals' statistics,
    computed once and shared, or an ADM ``.npz``), else against the originals seen by ``update``. Report the rFID
    with ``num_images`` beside it (rFID-1k): below 2048 images FIDs are only comparable at equal counts.
    With ``keep_features`` the reconstructions' pool3 features are kept for :meth:`reconstruction_features` (the
    reference of the decoder-free generation figures). ``progress``: each ``update`` shows a bar over its images
    (rate, ETA).
    """

    def __init__(self, inception: Optional[torch.nn.Module] = None,
                 reference: Optional[Union[InceptionStats, PathLike]] = None, lpips: bool = True,
                 device: Optional[Union[str, torch.device]] = None, lpips_batch_size: int = 32,
                 chunk: int = 250, keep_features: bool = False, progress: bool = False) -> None:
        self.inception = inception
        self.reference = load_stats_npz(reference) if isinstance(reference, (str, Path)) else reference
        self.use_lpips = lpips
        self.device = torch.device(device) if device is not None else None
        self.lpips_batch_size = lpips_batch_size
        self.chunk = chunk
        self._lpips: Optional[torch.nn.Module] = None
        self.values: dict[str, list[Tensor]] = {"psnr": [], "ssim": [], "ssim_dr2": [], "lpips": []}
        self.original_stats = FeatureStats()
        self.reconstruction_stats = FeatureStats()
        self.keep_features = keep_features
        self.reconstruction_pool3: list[Tensor] = []
        self.progress = progress

    def _lpips_model(self, fallback: torch.device) -> torch.nn.Module:
        if self._lpips is None:
            from maetok.losses.perceptual import LPIPS

            self._lpips = LPIPS().to(self.device or fallback)
        return self._lpips

    def update(self, originals: Union[Tensor, Any], reconstructions: Union[Tensor, Any]) -> None:
        """Add pairs ``(B, C, H, W)``; per-image values are kept on the CPU."""
        from tqdm.auto import tqdm

        bar = tqdm(total=len(originals), desc="reconstruction metrics", unit="img", disable=not self.progress)
        for start in range(0, len(originals), self.chunk):
            a = to_uint8(originals[start : start + self.chunk])
            b = to_uint8(reconstructions[start : start + self.chunk])
            self.values["psnr"].append(psnr_per_image(a, b).cpu())
            self.values["ssim"].append(ssim_per_image(a, b, 1.0).cpu())
            self.values["ssim_dr2"].append(ssim_per_image(a, b, 2.0).cpu())
            if self.use_lpips:
                self.values["lpips"].append(lpips_per_image(a, b, self._lpips_model(a.device), self.lpips_batch_size))
            if self.inception is not None:
                pool3 = self.inception(b).pool3
                self.reconstruction_stats.update(pool3)
                if self.keep_features:
                    self.reconstruction_pool3.append(pool3.float().cpu())
                if self.reference is None:
                    self.original_stats.update(self.inception(a).pool3)
            bar.update(len(a))
        bar.close()

    def result(self) -> dict[str, Any]:
        if not self.values["psnr"]:
            raise ValueError("ReconstructionEvaluator.result() called before any update()")
        result: dict[str, Any] = {name: torch.cat(self.values[name]).mean().item() for name in ("psnr", "ssim", "ssim_dr2")}
        result["num_images"] = int(sum(v.numel() for v in self.values["psnr"]))
        if self.use_lpips:
            result["lpips"] = torch.cat(self.values["lpips"]).mean().item()
        if self.inception is None:
            return result
        mu, sigma = self.reconstruction_stats.mean(), self.reconstruction_stats.cov()
        if self.reference is not None:
            ref_mu, ref_sigma = self.reference.mu, self.reference.sigma
            result["rfid_reference"] = "given reference statistics"
        else:
            ref_mu, ref_sigma = self.original_stats.mean(), self.original_stats.cov()
            result["rfid_reference"] = "the original images"
        result["rfid"] = frechet_distance(mu, sigma, ref_mu, ref_sigma)
        return result


    def reconstruction_features(self, source: str = "reconstructions"):
        """The reconstructions' Inception features seen so far, as a
        :class:`~maetok.eval.generation.ReferenceFeatures` (pool3 and its statistics; needs ``keep_features``)."""
        from maetok.eval.generation import ReferenceFeatures

        if not self.keep_features or not self.reconstruction_pool3:
            raise ValueError("reconstruction_features() needs keep_features=True, an Inception network and update()")
        pool3 = torch.cat(self.reconstruction_pool3).numpy()
        stats = InceptionStats(self.reconstruction_stats.mean(), self.reconstruction_stats.cov(), None, None,
                               len(pool3))
        return ReferenceFeatures(stats, pool3, None, source)


def evaluate_tokenizer(model: torch.nn.Module, dataset: Dataset, inception: Optional[torch.nn.Module] = None,
                       reference: Optional[InceptionStats] = None, lpips: bool = True, batch_size: int = 250,
                       progress: bool = True, skipped: Optional[list] = None,
                       limit: Optional[int] = None) -> dict[str, Any]:
    """:class:`ReconstructionEvaluator`'s ``result()`` for every readable image of ``dataset`` (wrap it in a
    :class:`~maetok.data.DatasetSubset` for part of it) reconstructed by the tokenizer ``model`` (on its device;
    LPIPS runs there too), or its first ``limit`` readable images. Unreadable files are left out (``num_images``
    counts the images measured) and appended to ``skipped`` (:class:`~maetok.data.SkippedItem`) when a list is
    given, else logged."""
    from maetok.encode import reconstructions

    evaluator = ReconstructionEvaluator(inception, reference, lpips, device=next(model.parameters()).device)
    for images, recon in reconstructions(model, dataset, batch_size, progress, skipped=skipped, limit=limit):
        evaluator.update(images, recon)
    if not evaluator.values["psnr"]:
        raise DataError(f"none of the {len(dataset)} images could be read: nothing to evaluate")
    return evaluator.result()


def eval_recon(
    model: PathLike,
    data: str,
    num: Optional[int] = None,
    split: str = "test",
    batch_size: int = 128,
    device: Optional[str] = None,
    inception: Optional[torch.nn.Module] = None,
    inception_weights: Optional[PathLike] = None,
    fid: bool = True,
    seed: int = 0,
    progress: bool = True,
    lpips: bool = True,
    max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
) -> dict[str, Any]:
    """``maetok eval-recon``: rFID, PSNR, SSIM and LPIPS (VGG) of a tokenizer on ``num`` images (all by default,
    a seeded draw holding every class equally otherwise, :func:`~maetok.data.draw_order`) of the held-out ``split`` of ``data``.

    rFID compares the reconstructions with the same original images (the paper's ImageNet-val
    convention). Returns ``rfid`` (None with ``rfid_note`` when no Inception weights exist or ``fid`` is
    False), ``rfid_num_images``, ``rfid_label``, ``psnr``, ``ssim`` (data_range 1), ``ssim_dr2``
    (data_range 2, the tokenizer-paper convention), ``lpips`` (LPIPS-VGG16 on images in [-1, 1], mean over
    images; None with ``lpips_note`` when ``lpips`` is False or the VGG16/LPIPS weights are missing),
    ``lpips_label``, ``num_images`` (the images read and measured) and provenance. Unreadable files (and,
    for image folders, files above ``max_image_pixels`` pixels; 0 or None: no limit) are left out, never replaced: ``num_skipped_images``
    counts them and ``skipped_images`` names them (``{"file", "reason"}``, the file relative to the folder).
    """
    from maetok.data import DatasetSubset, build_dataset, dataset_labels, draw_order, log_skipped_items, \
        note_channel_conversion
    from maetok.encode import load_tokenizer
    from maetok.eval.inception import describe_network, load_fid_network
    from maetok.runs import model_directory

    tokenizer = load_tokenizer(model, device)
    cfg = tokenizer.config
    dataset = build_dataset(data, split, cfg.image_size, cfg.in_channels, max_image_pixels=max_image_pixels)
    note_channel_conversion(data, cfg.in_channels)
    # every class equally; a bad file drawn is replaced by the next of the draw
    order, limit = draw_order(len(dataset), num, seed, dataset_labels(dataset))
    subset = DatasetSubset(dataset, order)
    network, reason = (load_fid_network(inception, device, inception_weights) if fid else (None, "disabled (--no-fid)"))
    lpips_reason = lpips_unavailable_reason() if lpips else "disabled (--no-lpips)"
    skipped: list = []
    metrics = evaluate_tokenizer(tokenizer, subset, network, None, lpips_reason is None, batch_size, progress,
                                 skipped=skipped, limit=limit)
    log_skipped_items(skipped, f"eval-recon on {data} ({split})")
    n = int(metrics["num_images"])
    result: dict[str, Any] = {
        "model": str(model_directory(model)),
        "data": data,
        "split": split,
        "num_images": n,
        "rfid": metrics.get("rfid"),
        "rfid_num_images": n,
        "rfid_label": f"rFID-{fid_label(n)}",
        "psnr": metrics["psnr"],
        "ssim": metrics["ssim"],
        "ssim_dr2": metrics["ssim_dr2"],
        "lpips": metrics.get("lpips"),
        "lpips_label": LPIPS_LABEL,
        "num_skipped_images": len(skipped),
        "skipped_images": [{"file": item.file, "reason": item.reason} for item in skipped],
        "notes": [],
    }
    if skipped:
        result["notes"].append(f"{len(skipped)} unreadable image file(s) met were left out (skipped_images)"
                               + (", replaced by the next images of the seeded draw" if limit else "")
                               + f"; the metrics are over the {n} images read")
    if network is not None:
        result["rfid_reference"] = f"the same {n} original images ({data} {split} split)"
        result["inception"] = describe_network(network)
        if n < 2048:
            result["notes"].append(f"rFID over {n} images (< 2048): compare only with rFID-{fid_label(n)}")
    else:
        result["rfid_note"] = f"not computed: {reason}"
    result["notes"].append("ssim uses data_range=1 (correct); ssim_dr2 uses data_range=2 (common in tokenizer papers)")
    if lpips_reason is None:
        result["notes"].append("lpips: LPIPS-VGG16 (v0.1 heads) on images in [-1, 1], mean over images")
    else:
        result["lpips_note"] = f"not computed: {lpips_reason}"
    return result
