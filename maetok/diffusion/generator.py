"""Sampling the diffusion models that generate MAETok latents: :class:`LatentGenerator` (a trained velocity model
with its latent normalisation, class names, sampling defaults and tokenizer) and ``maetok sample``'s image writer
(:func:`generate_images`, :func:`write_samples`: PNGs, a grid and an ADM-format ``.npz``, ``arr_0`` uint8 NHWC,
``arr_1`` labels, with the manifest ``samples.json`` that says whether the folder is complete:
:func:`check_samples_complete`).

A diffusion model folder is read and written by :mod:`maetok.model_folders` (ours and the authors' released SiT).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from maetok.assets import is_hub_id
from maetok.config import SamplingConfig, from_dict, to_dict
from maetok.data.images import save_image_grid, save_png, to_rgb, to_uint8
from maetok.data.latents import LatentNormalizer
from maetok.data.npz import save_sample_batch
from maetok.diffusion.samplers import Generators, Progress, euler_maruyama_sample, euler_sample, make_model_fn, \
    normal_noise
from maetok.errors import ConfigError, DataError, MissingFileError
from maetok.model_folders import load_diffusion_model, save_diffusion_model
from maetok.models.tokenizer import MAETok
from maetok.runs import FORMAT_KEY, FORMAT_VERSION, read_json_file, write_json

STATE_DTYPES = {"float32": torch.float32, "float64": torch.float64}  # SamplingConfig.precision
SAMPLES_MANIFEST = "samples.json"  # written first (complete: false) and last (complete: true) by write_samples
SAMPLES_NPZ = "samples.npz"
SAMPLE_PNG = re.compile(r"\d{6}\.png")  # images/NNNNNN.png: the only names write_samples writes (or removes)


#: how many class names (or ids) an error about a label lists
LABELS_SHOWN = 20


def resolve_class_labels(labels: Union[None, int, str, Tensor, Sequence[Union[int, str]]],
                         class_names: Sequence[str], num_classes: int) -> Optional[Tensor]:
    """Class labels as the model takes them: a LongTensor ``(B,)`` of ids in ``[0, num_classes)``, or None.

    ``labels``: None, an id, a class name, a tensor of ids, or a sequence of ids and names (a string that is no class
    name but an integer, e.g. ``"3"`` from a command line, is an id). An unknown name, an id out of range, or labels
    for an unconditional model (``num_classes == 0``) raise a one-line ``ConfigError`` listing the valid names (ids).
    """
    if labels is None:
        return None
    if not num_classes:
        raise ConfigError("the model is unconditional: it takes no class labels")
    names = list(class_names)
    valid = ", ".join(f"{i} {name}" for i, name in enumerate(names[:LABELS_SHOWN])) if names else \
        f"ids 0..{num_classes - 1}"
    valid += f", ... ({len(names)} in all)" if len(names) > LABELS_SHOWN else ""
    if isinstance(labels, Tensor):
        if labels.is_floating_point() or labels.is_complex():
            raise ConfigError(f"class labels must be integers, got a {labels.dtype} tensor")
        items: list = labels.reshape(-1).tolist()
    else:
        items = [labels] if isinstance(labels, (int, str)) else list(labels)
    if not items:
        raise ConfigError(f"no class labels given; the model's classes: {valid}")
    ids = []
    for item in items:
        if isinstance(item, str):
            text = item.strip()
            if text in names:
                ids.append(names.index(text))
                continue
            try:
                item = int(text)
            except ValueError:
                raise ConfigError(f"unknown class name {text!r}; the model's classes: {valid}") from None
        if isinstance(item, bool) or not isinstance(item, int):
            raise ConfigError(f"a class label is an id or a name, got {item!r}")
        if not 0 <= item < num_classes:
            raise ConfigError(f"class label {item} is out of range: the model has {num_classes} classes: {valid}")
        ids.append(item)
    return torch.tensor(ids, dtype=torch.long)


class LatentGenerator:
    """A trained velocity model with what sampling needs: latent normalisation, the tokenizer directory,
    class names and the sampling defaults. (Not a diffusers ``DiffusionPipeline``: that wrapper lives in
    :mod:`maetok.integrations.diffusers`.)"""

    def __init__(
        self,
        model: nn.Module,
        normalizer: LatentNormalizer,
        class_names: Sequence[str],
        sampling: SamplingConfig,
        tokenizer_dir: Optional[str],
        tokenizer_named_in: Optional[Path] = None,
    ):
        self.model = model  # a SiT / LightningDiT: its config gives the latent shape and the classes
        self.normalizer = normalizer
        self.latent_shape: tuple[int, int] = model.config.latent_shape
        self.num_classes: int = model.num_classes
        self.class_names = list(class_names)
        self.sampling = sampling
        self.tokenizer_dir = tokenizer_dir  # a folder (absolute, or relative to the working directory) or a hub id
        self.tokenizer_named_in = tokenizer_named_in  # the config.json that named it (for errors)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def save(self, directory: Union[str, Path], state_dict: Optional[dict[str, Tensor]] = None) -> Path:
        """Write the model folder (``state_dict``, default the model's, e.g. the EMA weights), atomically
        (:func:`maetok.model_folders.save_diffusion_model`)."""
        return save_diffusion_model(self.model, directory, state_dict, class_names=self.class_names,
                                    latent_norm=self.normalizer.to_dict(), sampling=to_dict(self.sampling),
                                    tokenizer=self.tokenizer_dir)

    @classmethod
    def load(cls, directory: Union[str, Path], device: Optional[Union[str, torch.device]] = None,
             torch_dtype: Optional[Union[str, torch.dtype]] = None) -> "LatentGenerator":
        """A diffusion model folder written by :meth:`save`, the run directory holding it as ``model/``, the
        authors' released SiT folder, a diffusers ``MAETokTransformer`` folder, or a hub id
        (:func:`maetok.model_folders.load_diffusion_model`), on ``device`` (default the CPU) in ``torch_dtype``
        (default float32; sampling integrates in :attr:`SamplingConfig.precision` whatever the model's dtype). The
        authors' SiT comes with their sampling conventions (:data:`maetok.config.AUTHORS_SAMPLING`) and no tokenizer:
        its latent normalisation is the tokenizer's (:meth:`normalizer_for`)."""
        model, folder = load_diffusion_model(directory, device, torch_dtype)
        extras = folder.extras
        where = f"{folder.folder.config_path}:sampling"
        return cls(model, LatentNormalizer.from_dict(extras["latent_norm"]), list(extras.get("class_names") or []),
                   from_dict(SamplingConfig, extras["sampling"], where=where), extras.get("tokenizer"),
                   folder.folder.config_path)

    def tokenizer_source(self, override: Optional[Union[str, Path]] = None) -> str:
        """The tokenizer that decodes this model's latents: ``override`` (``--tokenizer`` / ``tokenizer=``) when given,
        else the folder or hub id the model folder names. One line when there is none (``ConfigError``) or when the
        named folder is gone (``MissingFileError``: the path, the ``config.json`` it came from, the flag to pass)."""
        if override:
            return str(override)
        named_in = f"{self.tokenizer_named_in}" if self.tokenizer_named_in else "the diffusion model"
        hint = "pass --tokenizer DIR_OR_HUB_ID (tokenizer= in Python)"
        if not self.tokenizer_dir:
            raise ConfigError(f"{named_in} names no tokenizer: {hint} (the authors' SiT: their tokenizer, e.g. "
                              "MAETok/maetok-b-128)")
        if not Path(self.tokenizer_dir).expanduser().exists() and not is_hub_id(self.tokenizer_dir):
            raise MissingFileError(f"tokenizer {self.tokenizer_dir} not found (the path came from {named_in}; "
                                   f"moved or not copied?): {hint}")
        return str(self.tokenizer_dir)

    def normalizer_for(
        self,
        sampling: Optional[SamplingConfig] = None,
        tokenizer: Any = None,
        scalars: Optional[Sequence[float]] = None,
    ) -> LatentNormalizer:
        """The latent normalisation to undo after sampling: ``scalars`` ``(mean, std)`` when given; else, with
        ``sampling.latent_norm == "tokenizer"``, the scalar latent mean / std the tokenizer carries
        (:func:`tokenizer_latent_scalars`); else the model's own statistics."""
        s = sampling or self.sampling
        if scalars is not None:
            mean, std = (float(v) for v in scalars)
        elif s.latent_norm == "tokenizer":
            if tokenizer is None:
                raise ConfigError("sampling.latent_norm='tokenizer' needs the tokenizer")
            mean, std = tokenizer_latent_scalars(tokenizer)
        else:
            return self.normalizer
        if not std > 0:
            raise ConfigError(f"the latent std must be positive, got {std}")
        return LatentNormalizer.from_dict({"mode": "scalar", "mean": mean, "std": std})

    def balanced_labels(self, num: int) -> Optional[Tensor]:
        """``num`` labels cycling over all classes (None for an unconditional model)."""
        if not self.num_classes:
            return None
        return torch.arange(num) % self.num_classes

    def resolve_labels(self, labels: Any) -> Optional[Tensor]:
        """``labels`` (ids, names, a tensor or None) as ids ``(B,)`` of this model's classes
        (:func:`resolve_class_labels`)."""
        return resolve_class_labels(labels, self.class_names, self.num_classes)

    @torch.no_grad()
    def sample_latents(
        self,
        labels: Any,
        num: int,
        sampling: Optional[SamplingConfig] = None,
        generator: Generators = None,
        steps: Optional[int] = None,
        progress: Progress = False,
        normalizer: Optional[LatentNormalizer] = None,
    ) -> Tensor:
        """Generate ``num`` latents ``(num, L, H)`` (denormalised by ``normalizer``, default the model's own:
        ready for ``tokenizer.decode``). ``labels``: ``num`` class ids or names (:meth:`resolve_labels`), or None
        (unconditional; a conditional model then uses its null class). The noise comes from ``generator`` (on its
        device; or a list of ``num`` generators, one per sample: :func:`~maetok.diffusion.samplers.normal_noise`),
        the sampler and its conventions from ``sampling`` (default the model's). ``progress``: a bar over the
        sampling steps (:data:`~maetok.diffusion.samplers.Progress`)."""
        s = sampling or self.sampling
        s.validate()
        labels = self.resolve_labels(labels)
        if labels is not None and len(labels) != num:
            raise ConfigError(f"got {len(labels)} class labels for {num} samples")
        cfg_scale = s.cfg_scale if labels is not None else 1.0
        try:
            noise = normal_noise((num, *self.latent_shape), generator).to(self.device)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        model_fn = make_model_fn(self.model, labels, cfg_scale, (s.guidance_low, s.guidance_high))
        n_steps = steps or s.steps
        state_dtype = STATE_DTYPES[s.precision]
        if s.sampler == "euler":
            x0 = euler_sample(model_fn, noise, num_steps=n_steps, progress=progress, state_dtype=state_dtype)
        else:
            x0 = euler_maruyama_sample(model_fn, noise, num_steps=n_steps, t_end=s.t_end,
                                       diffusion_coef=s.diffusion_form, generator=generator, last_step=s.last_step,
                                       cfg_on=s.cfg_on, state_dtype=state_dtype, progress=progress)
        return (normalizer or self.normalizer).denormalize(x0.float())


# the names under which a tokenizer (the model, its config, or a config.json dict) carries scalar latent statistics,
# in the order they are tried: ours (a released tokenizer's latent_mean / latent_std), then the authors' config keys
# (their ModelArgs: vq_mean / vq_std, used as decode(x * vq_std + vq_mean))
LATENT_SCALAR_NAMES = (("latent_mean", "latent_std"), ("vq_mean", "vq_std"))


def tokenizer_latent_scalars(tokenizer: Any) -> tuple[float, float]:
    """``(mean, std)``: the scalar latent statistics that ``tokenizer`` (a tokenizer model, its ``config``, or a
    mapping) carries under one of :data:`LATENT_SCALAR_NAMES`. ``ValueError`` when it carries none (a tokenizer
    folder written before maetok measured them; ``cache-latents`` measures them too)."""
    for holder in (tokenizer, getattr(tokenizer, "config", None)):
        if holder is None:
            continue
        for mean_name, std_name in LATENT_SCALAR_NAMES:
            if isinstance(holder, Mapping):
                mean, std = holder.get(mean_name), holder.get(std_name)
            else:
                mean, std = getattr(holder, mean_name, None), getattr(holder, std_name, None)
            if mean is not None and std is not None:
                return float(mean), float(std)
    names = " / ".join(f"{a}, {b}" for a, b in LATENT_SCALAR_NAMES)
    raise ConfigError(f"the tokenizer ({type(tokenizer).__name__}) carries no scalar latent mean / std ({names}): "
                      "use the model's latent statistics (--latent-norm model) or give them (--latent-scalars MEAN STD)")


@torch.no_grad()
def generate_images(
    pipe: LatentGenerator,
    tokenizer: MAETok,
    num: int,
    labels: Any = None,
    sampling: Optional[SamplingConfig] = None,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
    normalizer: Optional[LatentNormalizer] = None,
) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """``num`` images as uint8 ``(num, H, W, C)`` and their labels ``(num,)`` (None if unconditional).
    ``labels``: ``num`` class ids or names (:func:`resolve_class_labels`); default all classes evenly
    (``i % num_classes``). ``normalizer``: the latent normalisation to undo (default the model's; see
    :meth:`LatentGenerator.normalizer_for`). ``progress``: one bar over every sampling step of every batch (rate
    and time left), with the count of images done."""
    from tqdm.auto import tqdm

    labels = pipe.balanced_labels(num) if labels is None else pipe.resolve_labels(labels)
    if labels is not None and len(labels) != num:
        raise ConfigError(f"got {len(labels)} labels for {num} samples")
    steps = (sampling or pipe.sampling).steps
    generator = torch.Generator().manual_seed(seed)
    images = []
    with tqdm(total=-(-num // batch_size) * steps, desc=f"sample {num} images", unit="step",
              disable=not progress) as bar:
        for start in range(0, num, batch_size):
            count = min(batch_size, num - start)
            batch_labels = labels[start : start + count] if labels is not None else None
            latents = pipe.sample_latents(batch_labels, count, sampling, generator=generator, normalizer=normalizer,
                                          progress=bar)
            decoded = tokenizer.decode(latents.to(next(tokenizer.parameters()).device)).clamp(-1, 1)
            images.append(to_uint8(decoded.cpu(), channels_last=True).numpy())  # NaN / inf raise: never gray images
            bar.set_postfix(images=f"{start + count}/{num}")
    return np.concatenate(images), (labels.numpy() if labels is not None else None)


def write_samples(
    out_dir: Union[str, Path], images: np.ndarray, labels: Optional[np.ndarray], png_limit: Optional[int] = None
) -> dict[str, Path]:
    """``out_dir/images/NNNNNN.png`` (the first ``png_limit``), ``out_dir/grid.png`` (up to 100),
    ``out_dir/samples.npz`` (ADM format) and the manifest ``out_dir/samples.json``; returns the paths.

    Every file is written atomically, and the manifest says ``"complete": false`` (with the counts) before anything
    else is written and ``"complete": true`` last, so an interrupted run (a full disk, a kill) leaves a folder that
    :func:`check_samples_complete` refuses rather than one that looks finished. In a folder an earlier
    ``maetok sample`` wrote (it holds the manifest or ``samples.npz``), the PNGs beyond this run's count are removed:
    only ``images/NNNNNN.png``, the names written here, never other files."""
    out_dir = Path(out_dir)
    num_png = len(images) if png_limit is None else min(png_limit, len(images))
    manifest = {FORMAT_KEY: FORMAT_VERSION, "num_samples": len(images), "num_png": num_png, "complete": False}
    earlier_run = (out_dir / SAMPLES_MANIFEST).exists() or (out_dir / SAMPLES_NPZ).exists()
    write_json(out_dir / SAMPLES_MANIFEST, manifest)
    image_dir = out_dir / "images"
    if earlier_run and image_dir.is_dir():
        for stale in image_dir.iterdir():
            if SAMPLE_PNG.fullmatch(stale.name) and int(stale.stem) >= num_png and stale.is_file():
                stale.unlink()
    for i, image in enumerate(images[:num_png]):
        save_png(image, image_dir / f"{i:06d}.png")
    save_image_grid(torch.from_numpy(images[:100]).permute(0, 3, 1, 2), out_dir / "grid.png", nrow=10)
    npz = out_dir / SAMPLES_NPZ
    save_sample_batch(npz, to_rgb(images), labels)  # the ADM suite reads RGB
    write_json(out_dir / SAMPLES_MANIFEST, {**manifest, "complete": True})
    return {"images": image_dir, "grid": out_dir / "grid.png", "npz": npz, "manifest": out_dir / SAMPLES_MANIFEST}


def check_samples_complete(folder: Union[str, Path], flag: str = "--samples") -> None:
    """Refuse (one-line :class:`DataError`) a folder :func:`write_samples` left unfinished: its manifest says
    incomplete, with how many of the PNGs and whether ``samples.npz`` are there. A folder without the manifest
    (images of the user's own, or written by a maetok before it) is not ours to judge and passes."""
    folder = Path(folder)
    path = folder / SAMPLES_MANIFEST
    if not path.is_file():
        return
    rerun = "rerun the `maetok sample` command that wrote the folder"
    manifest = read_json_file(path, DataError, rerun)  # size-capped; a truncated file: one line naming it
    try:
        complete = bool(manifest["complete"])
        num_samples, num_png = int(manifest["num_samples"]), int(manifest["num_png"])
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{flag} {folder}: {path} is unreadable ({err}): {rerun}") from None
    if complete:
        return
    image_dir = folder / "images"
    written = sum(1 for f in image_dir.iterdir() if SAMPLE_PNG.fullmatch(f.name) and int(f.stem) < num_png) \
        if image_dir.is_dir() else 0
    npz = "present but unconfirmed" if (folder / SAMPLES_NPZ).exists() else "missing"
    raise DataError(f"{flag} {folder} holds an interrupted `maetok sample` run of {num_samples} samples: {written} of "
                    f"{num_png} PNGs written, samples.npz {npz}; rerun the same `maetok sample` command with "
                    f"--out {folder} to complete it")
