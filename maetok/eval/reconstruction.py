"""Reconstruction quality of a tokenizer over a dataset split: PSNR, SSIM (both conventions), LPIPS (VGG) and,
when an Inception network is given, rFID."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from maetok.eval.metrics import ReconstructionMeter
from maetok.models.tokenizer import MAETok


def reconstruction_meter(inception: Optional[torch.nn.Module], reference: Any, lpips: bool,
                         device: Optional[torch.device] = None) -> Any:
    """The accumulator of reconstruction metrics: :class:`~maetok.eval.fid.ReconstructionEvaluator` (with rFID
    against ``reference``, or against the originals when None) when an ``inception`` network is given, else
    :class:`ReconstructionMeter`; both take ``update(originals, reconstructions)`` and ``compute()``. LPIPS runs
    on ``device`` (default: the inputs')."""
    if inception is None:
        return ReconstructionMeter(lpips=lpips, device=device)
    from maetok.eval.fid import ReconstructionEvaluator

    return ReconstructionEvaluator(inception, reference, lpips=lpips, lpips_device=device)


@torch.no_grad()
def evaluate_reconstruction(
    model: MAETok,
    dataset: Dataset,
    num_images: Optional[int] = None,
    batch_size: int = 256,
    inception: Optional[torch.nn.Module] = None,
    reference_stats: Optional[Any] = None,
    num_workers: int = 0,
    progress: bool = True,
    lpips: bool = True,
) -> dict[str, Any]:
    """Encode + decode the first ``num_images`` images of ``dataset`` (all by default).

    Returns ``{"psnr", "ssim", "ssim_dr2", "lpips", "num_images"}`` (``"lpips"``: LPIPS-VGG on [-1, 1] images,
    mean over images, computed on the model's device; omitted when ``lpips`` is False) (+ ``"rfid"`` when
    ``inception`` is given: against
    ``reference_stats`` (:class:`~maetok.eval.fid.InceptionStats` of the same originals, computed once and
    shared) or else against the originals passed through Inception here). SSIM uses data_range 1 (correct);
    ``ssim_dr2`` data_range 2 (the common tokenizer-paper convention).
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    model.eval()
    if num_images is not None and num_images < len(dataset):
        dataset = Subset(dataset, range(num_images))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    meter = reconstruction_meter(inception, reference_stats, lpips, device)
    for batch in tqdm(loader, desc="eval reconstruction", unit="batch", disable=not progress):
        images = batch[0].to(device)
        recon = model.decode(model.encode(images)).clamp(-1, 1)
        if inception is not None and images.shape[1] == 1:
            images, recon = images.expand(-1, 3, -1, -1), recon.expand(-1, 3, -1, -1)
        meter.update(images.cpu(), recon.cpu())
    return meter.compute()


def measure_reconstructions(originals: Any, reconstructions: Any, inception: Optional[torch.nn.Module] = None,
                            reference: Any = None, lpips: bool = True, chunk: int = 250) -> dict[str, Any]:
    """PSNR, SSIM (both conventions), LPIPS (VGG, when ``lpips``) and, with ``inception``, rFID against
    ``reference`` (Inception statistics of the originals; computed from them when None) of images already
    reconstructed: ``(M, C, H, W)`` in [-1, 1] or uint8, fed in chunks of ``chunk`` pairs."""
    import warnings

    meter = reconstruction_meter(inception, reference, lpips)
    for i in range(0, len(originals), chunk):
        meter.update(originals[i : i + chunk], reconstructions[i : i + chunk])
    with warnings.catch_warnings():  # every FID is reported with its sample count
        warnings.filterwarnings("ignore", message=".*rank deficient.*")
        return meter.compute()
