"""Typed configuration: dataclasses, YAML presets with ``base:`` inheritance, and ``key.sub=value`` overrides.

A config is an OmegaConf structured config (the dataclass is its schema) built in three layers, merged in turn
(mappings key by key, lists replaced whole) and checked against the dataclass fields (an unknown key is an error
that names it and lists the known ones; a value of the wrong type names its dotted key and the value):

1. the dataclass defaults,
2. a preset name (a YAML file in ``maetok/configs/``) or a path to a YAML file, whose ``base:`` key names
   another preset to start from,
3. command-line overrides ``train.steps=1000 model.aux_targets='[{name: hog}]'`` (values parsed as YAML).

Each config class checks its values in its ``validate()``, which calls its sections' ``validate()``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Optional, Sequence, TypeVar, Union

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from maetok.errors import ConfigError, first_line  # ConfigError: also importable from here, as always
from maetok.runs import read_text_capped

PRESET_DIR = Path(__file__).parent / "configs"
#: images above this many pixels (width x height, read from the file's header) are skipped unread (0: no limit)
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000

T = TypeVar("T")

# Upper bounds of the architecture fields, checked before any module is built (a config.json asking for width 10**9
# would otherwise try to allocate terabytes): 64 x the largest value of the paper's models (MAETok-B at 512 px,
# SiT-XL), so no real model comes near them.
MAX_WIDTH = 65536  # encoder / decoder / diffusion transformer width (SiT-XL: 1152)
MAX_DEPTH = 2048  # blocks (SiT-XL: 28)
MAX_HEADS = 1024  # attention heads (16)
MAX_IMAGE_SIZE = 32768  # pixels per side (512)
MAX_CHANNELS = 256  # image channels (3)
MAX_LATENT_TOKENS = 8192  # 1D latent tokens (128)
MAX_LATENT_DIM = 2048  # channels per latent token (32)
MAX_CLASSES = 64000  # class labels (1000)
MAX_MLP_RATIO = 64.0  # MLP width / width (4)


def check_numbers(cfg: Any, where: str, ranges: Optional[Mapping[str, tuple[float, float]]] = None) -> None:
    """Every ``float`` field of the dataclass ``cfg`` must be finite (a JSON ``NaN`` or YAML ``.inf`` is refused
    where it is read), and each field named in ``ranges`` must lie in its ``[low, high]``; ``ConfigError`` naming
    ``where.field``, the range and the value."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where}.{f.name} must be a finite number, got {value}")
        if ranges and f.name in ranges:
            low, high = ranges[f.name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise ConfigError(f"{where}.{f.name} must lie in [{low:g}, {high:g}], got {value!r}")


# ---------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------


@dataclass
class TargetConfig:
    """One auxiliary-decoder target: ``name`` from the target registry, its loss weight and type."""

    name: str = "hog"
    weight: float = 1.0
    loss: str = "mse"  # "mse" or "cosine"
    options: dict = field(default_factory=dict)  # passed to the target factory (e.g. weights path)


@dataclass
class TokenizerConfig:
    """Architecture of the tokenizer. ``variant``: ``maetok`` (plain bottleneck, mask modeling and
    auxiliary decoders), ``ae`` (plain bottleneck, no masking, no auxiliary decoders) or ``vae``
    (diagonal-Gaussian bottleneck with a KL term; masking allowed for the paper's VAE+MM baseline)."""

    variant: str = "maetok"
    image_size: int = 256
    in_channels: int = 3
    patch_size: int = 16
    encoder_width: int = 768
    encoder_depth: int = 12
    encoder_heads: int = 12
    decoder_width: int = 768
    decoder_depth: int = 12
    decoder_heads: int = 12
    mlp_ratio: float = 4.0
    num_latent_tokens: int = 128
    latent_dim: int = 32
    rope_theta: float = 100.0
    layer_scale_init: float = 0.0  # 0 = no LayerScale
    mask_ratio_min: float = 0.4
    mask_ratio_max: float = 0.6
    aux_depth: int = 3
    aux_width: int = 0  # 0 = decoder_width
    aux_heads: int = 0  # 0 = decoder_heads
    aux_targets: list[TargetConfig] = field(default_factory=lambda: [TargetConfig("hog")])

    def validate(self) -> None:
        if self.variant not in ("maetok", "ae", "vae"):
            raise ConfigError(f"model.variant must be 'maetok', 'ae' or 'vae', got {self.variant!r}")
        check_numbers(self, "model", {
            "image_size": (1, MAX_IMAGE_SIZE), "in_channels": (1, MAX_CHANNELS), "patch_size": (1, MAX_IMAGE_SIZE),
            **{f"{part}_width": (1, MAX_WIDTH) for part in ("encoder", "decoder")},
            **{f"{part}_depth": (1, MAX_DEPTH) for part in ("encoder", "decoder")},
            **{f"{part}_heads": (1, MAX_HEADS) for part in ("encoder", "decoder")},
            "aux_width": (0, MAX_WIDTH), "aux_heads": (0, MAX_HEADS), "aux_depth": (0, MAX_DEPTH),
            "mlp_ratio": (1 / 64, MAX_MLP_RATIO), "num_latent_tokens": (1, MAX_LATENT_TOKENS),
            "latent_dim": (1, MAX_LATENT_DIM), "rope_theta": (1.0, 1e12), "layer_scale_init": (0.0, 1e3),
        })
        for i, target in enumerate(self.aux_targets):
            check_numbers(target, f"model.aux_targets[{i}]")
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"model.image_size={self.image_size} is not divisible by model.patch_size={self.patch_size}"
            )
        if not 0.0 <= self.mask_ratio_min <= self.mask_ratio_max < 1.0:
            raise ConfigError(
                "need 0 <= model.mask_ratio_min <= model.mask_ratio_max < 1, got "
                f"{self.mask_ratio_min}, {self.mask_ratio_max}"
            )
        if self.variant == "ae" and (self.mask_ratio_max > 0 or self.aux_targets):
            raise ConfigError(
                "model.variant='ae' is the plain autoencoder: set model.mask_ratio_min=0 model.mask_ratio_max=0 "
                "model.aux_targets=[] (or use variant 'maetok' for masked training)"
            )
        names = [t.name for t in self.aux_targets]
        if len(set(names)) != len(names):
            raise ConfigError(f"model.aux_targets names must be unique, got {names}")
        for t in self.aux_targets:
            if t.loss not in ("mse", "cosine"):
                raise ConfigError(f"aux target {t.name!r}: loss must be 'mse' or 'cosine', got {t.loss!r}")
        for part in ("encoder", "decoder") + (("aux",) if self.aux_targets else ()):
            width = getattr(self, f"{part}_width") or self.decoder_width  # aux: 0 = the decoder's
            heads = getattr(self, f"{part}_heads") or self.decoder_heads
            if width % heads or (width // heads) % 4:
                raise ConfigError(
                    f"model.{part}_width={width} / {part}_heads={heads} must give a head dim divisible by 4 (2D RoPE)"
                )

    @property
    def grid_size(self) -> tuple[int, int]:
        return (self.image_size // self.patch_size, self.image_size // self.patch_size)


# ---------------------------------------------------------------------------------------------------------
# Training (shared by the tokenizer and the diffusion models)
# ---------------------------------------------------------------------------------------------------------


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    schedule: str = "cosine"  # "cosine" or "constant" (both after linear warmup)
    warmup_steps: int = 10_000
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of lr
    grad_clip: float = 1.0  # 0 = off

    def validate(self, where: str = "optim") -> None:
        check_numbers(self, where)
        if not (self.lr > 0 and self.lr == self.lr):
            raise ConfigError(f"{where}.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"{where}.weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"{where}.betas must be two numbers in [0, 1), got {list(self.betas)}")
        if self.schedule not in ("cosine", "constant"):
            raise ConfigError(f"{where}.schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if self.warmup_steps < 0:
            raise ConfigError(f"{where}.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"{where}.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip < 0:
            raise ConfigError(f"{where}.grad_clip must be >= 0 (0 = off), got {self.grad_clip}")


def require_positive(where: str, value: int) -> None:
    """``value`` must be an integer >= 1 (step counts, batch sizes, intervals); ``where`` names the key."""
    if value < 1:
        raise ConfigError(f"{where} must be >= 1, got {value}")


@dataclass
class TrainConfig:
    steps: int = 500_000
    batch_size: int = 512  # global, split over processes
    seed: int = 0
    precision: str = "auto"  # "auto" (bf16 autocast where supported), "bf16", "fp32"
    ema_decay: float = 0.9999  # 0 = no EMA
    # EMA decay warm-up min(ema_decay, (1 + step) / (ema_warmup + step)); <= 1: the full decay from step 0.
    # With 10 and 0.9999 the full decay is reached at step ~90K (`maetok info` prints it for each preset).
    ema_warmup: float = 10.0
    flip: bool = True  # random horizontal flips
    num_workers: int = 4
    log_every: int = 50
    eval_every: int = 5_000
    ckpt_every: int = 5_000
    compile: bool = False
    # a step whose loss or gradient norm is NaN / inf is skipped (no update, no EMA); this many in a row stop the
    # run with an error (its last checkpoint is never overwritten by a non-finite model)
    max_nonfinite_steps: int = 5
    # under torchrun: a collective (gradient all-reduce ...) that waits this long for a process that does not answer
    # (stopped, stuck, unreachable) ends every process with a line naming the silent one(s); keep it above the
    # longest pause of rank 0 alone (its periodic evaluation, a checkpoint write), during which the others wait
    collective_timeout_s: float = 300.0

    def validate(self) -> None:
        check_numbers(self, "train")
        for name in ("steps", "batch_size", "log_every", "eval_every", "ckpt_every", "max_nonfinite_steps"):
            require_positive(f"train.{name}", getattr(self, name))
        if not self.collective_timeout_s > 0:
            raise ConfigError(f"train.collective_timeout_s must be > 0 (seconds), got {self.collective_timeout_s}")
        if self.num_workers < 0:
            raise ConfigError(f"train.num_workers must be >= 0, got {self.num_workers}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"train.precision must be 'auto', 'bf16' or 'fp32', got {self.precision!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.ema_warmup < 0:
            raise ConfigError(f"train.ema_warmup must be >= 0 (<= 1: no warm-up), got {self.ema_warmup}")


@dataclass
class LossConfig:
    """Eq. 6 of the paper plus the mask-modeling and KL terms."""

    recon_weight: float = 1.0  # pixel MSE
    perceptual_weight: float = 1.0  # LPIPS-VGG
    perceptual_warmup: int = 0  # steps of linear ramp-up of the LPIPS weight (0 = full weight from step 0)
    gan_weight: float = 0.4
    gan_start: int = 30_000
    gan_backbone: str = "dinov2-s"  # "dinov2-s" (paper), "vgg16" (packaged, offline) or "auto"
    gan_backbone_weights: Optional[str] = None  # local folder / hub-cache id of the backbone weights
    gan_lr: float = 1e-4
    lecam_weight: float = 0.001
    kl_weight: float = 1e-6  # vae only

    def validate(self) -> None:
        check_numbers(self, "loss")
        if self.gan_lr <= 0 and self.gan_weight > 0:
            raise ConfigError(f"loss.gan_lr must be > 0 when loss.gan_weight > 0, got {self.gan_lr}")
        for name in ("recon_weight", "perceptual_weight", "gan_weight", "lecam_weight", "kl_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"loss.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class FinetuneConfig:
    """Stage 2: frozen encoder, pixel decoder fine-tuned while the mask ratio decays linearly."""

    steps: int = 50_000
    mask_ratio_start: float = 0.6
    mask_ratio_end: float = 0.0
    mask_decay_steps: int = 50_000
    lr: float = 1e-4
    warmup_steps: int = 1_000
    # Stage 2 continues stage 1's discriminator (and its optimizer) when stage 1 trained one. Otherwise a new
    # discriminator trains alone for this many steps before its loss reaches the decoder.
    disc_warmup_steps: int = 2_000
    # Train a newly initialised pixel decoder on the frozen encoder instead of fine-tuning stage 1's: with
    # mask_ratio_start=0 and enough steps it measures how much of the image the latents hold.
    fresh_decoder: bool = False

    def validate(self) -> None:
        check_numbers(self, "finetune")
        require_positive("finetune.steps", self.steps)
        if not (self.lr > 0):
            raise ConfigError(f"finetune.lr must be > 0, got {self.lr}")
        for name in ("warmup_steps", "mask_decay_steps", "disc_warmup_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"finetune.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("mask_ratio_start", "mask_ratio_end"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"finetune.{name} must be in [0, 1), got {getattr(self, name)}")


@dataclass
class DataConfig:
    dataset: str = "fashion-mnist"  # "fashion-mnist" or an image folder path
    eval_images: int = 64  # images in the periodic reconstruction grid
    # image files whose header announces more pixels are skipped (counted, named) before decoding; 0: no limit.
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    def validate(self) -> None:
        require_positive("data.eval_images", self.eval_images)
        pixels = self.max_image_pixels
        if isinstance(pixels, bool) or not isinstance(pixels, int) or pixels < 0:
            raise ConfigError(f"data.max_image_pixels must be a number of pixels >= 0 (0: no limit), got {pixels!r}")


@dataclass
class TokenizerTrainConfig:
    model: TokenizerConfig = field(default_factory=TokenizerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def validate(self) -> None:
        self.model.validate()
        self.train.validate()
        self.optim.validate()
        self.finetune.validate()
        self.data.validate()
        self.loss.validate()


# ---------------------------------------------------------------------------------------------------------
# Building dataclasses from mappings (OmegaConf structured configs), presets and overrides
# ---------------------------------------------------------------------------------------------------------

# what OmegaConf raises for a value or key it refuses (2.4: a TypeError for a mapping merged onto a list)
_REFUSED = (OmegaConfBaseException, TypeError, ValueError)
# how an error names the expected type of a field (else by its annotation, e.g. "tuple[float, float]")
_KINDS = {"int": "an integer", "float": "a number", "bool": "true/false", "str": "a string"}


def from_dict(cls: type[T], data: Mapping, where: str = "") -> T:
    """Dataclass ``cls`` from its defaults and a (possibly partial) mapping, every key and type checked (not
    validated); ``where`` (a file, a section) prefixes the keys that errors name."""
    return _build(cls, _expanded(cls, data, where), where)


def _expanded(cls: type, data: Mapping, where: str = "") -> Mapping:
    """``data`` with the shorthands of every section that has them expanded (``DiffusionModelConfig.expand``: a
    ``preset`` into the sizes); applied to the merged mapping, before the defaults fill the rest."""
    if not isinstance(data, Mapping) or not dataclasses.is_dataclass(cls):
        return data
    if hasattr(cls, "expand"):
        data = cls.expand(data, where or "model")
    hints = typing.get_type_hints(cls)
    return {key: _expanded(hints[key], value, f"{where}.{key}" if where else str(key))
            if key in hints and dataclasses.is_dataclass(hints[key]) else value for key, value in data.items()}


def _build(cls: type[T], data: Mapping, where: str = "") -> T:
    """``cls``'s defaults with ``data`` merged on (a nested mapping starts from the field's default; lists and other
    values are replaced whole), as a ``cls``; a refusal is a one-line :class:`ConfigError`."""
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(cls), data)
    except _REFUSED as err:
        raise ConfigError(_refusal(cls, data, where) or f"{where or cls.__name__}: {first_line(err)}") from None
    try:
        return _tuples_restored(OmegaConf.to_object(cfg))
    except OmegaConfBaseException as err:  # a mandatory value left out, a ${...} interpolation that does not resolve
        key = ".".join(part for part in (where, str(err.full_key or "")) if part) or cls.__name__
        raise ConfigError(f"{key}: {first_line(err)}") from None


def _refusal(cls: type, data: Any, where: str) -> Optional[str]:
    """Why ``data`` does not merge onto dataclass ``cls``: one line naming the first refused entry by its dotted
    key (``model.aux_targets[0].weight``) and value; None when no single entry is to blame. OmegaConf's own errors
    name a key inside a list item relative to the item (and in some versions no key at all), hence this walk."""
    if not isinstance(data, Mapping):
        return f"{where or cls.__name__}: expected a mapping of {cls.__name__} keys, got {data!r}"
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            return f"unknown config key {path!r}; known keys here: {sorted(fields)}"
        hint = hints[key]
        item = typing.get_args(hint)[0] if typing.get_origin(hint) is list else None
        if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
            reason = _refusal(hint, value, path)
        elif dataclasses.is_dataclass(item) and isinstance(value, (list, tuple)):
            reason = next((r for i, v in enumerate(value) if (r := _refusal(item, v, f"{path}[{i}]"))), None)
        elif not _accepts(cls, key, value):
            annotation = fields[key].type
            kind = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
            reason = f"{path}: expected {_KINDS.get(kind, kind)}, got {value!r}"
        else:
            reason = None
        if reason:
            return reason
    return None


def _accepts(cls: type, key: str, value: Any) -> bool:
    """Whether OmegaConf takes ``value`` for field ``key`` of dataclass ``cls``."""
    try:
        OmegaConf.merge(OmegaConf.structured(cls), {key: value})
    except _REFUSED:
        return False
    return True


def _tuples_restored(cfg: T) -> T:
    """``cfg`` with its ``tuple`` fields tuples again, in nested dataclasses too: OmegaConf before 2.4 gives them
    back as lists."""
    if isinstance(cfg, list):
        for item in cfg:
            _tuples_restored(item)
    elif dataclasses.is_dataclass(cfg):
        hints = typing.get_type_hints(type(cfg))
        for f in dataclasses.fields(cfg):
            value = _tuples_restored(getattr(cfg, f.name))
            hint = hints[f.name]
            kinds = typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else (hint,)
            if isinstance(value, list) and any(k is tuple or typing.get_origin(k) is tuple for k in kinds):
                setattr(cfg, f.name, tuple(value))
    return cfg


def to_dict(cfg: Any) -> Any:
    """Dataclass -> plain dict (tuples become lists), JSON/YAML-serialisable."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def deep_merge(base: Mapping, update: Mapping) -> dict:
    """``update`` merged onto ``base`` by OmegaConf: nested mappings key by key, lists and other values replaced
    whole (so an aux target's ``options`` mapping, inside the ``aux_targets`` list, is never merged)."""
    try:
        return OmegaConf.to_container(OmegaConf.merge(base, update))
    except _REFUSED as err:
        raise ConfigError(f"cannot merge: {first_line(err)}") from None


# the names the small presets had before they were named for what they are (still accepted, same files)
PRESET_ALIASES = {"fashion-mnist-maetok": "tiny-maetok", "fashion-mnist-ae": "tiny-ae", "fashion-mnist-vae": "tiny-vae",
                  "fashion-mnist-sit": "tiny-sit"}


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


#: a YAML document may expand, its aliases (``*name``) followed, to this many values per character of its text
#: (beyond YAML_EXPANSION_FLOOR): more is an alias bomb, refused before it is built (it would take minutes, gigabytes
#: and an error message as large)
YAML_EXPANSION_PER_CHAR = 10
YAML_EXPANSION_FLOOR = 10_000


def _expanded_size(node: yaml.Node, limit: int, sizes: dict[int, int]) -> int:
    """How many values the YAML node graph under ``node`` expands to (each alias counted as a copy of what it names),
    counted up to just beyond ``limit``; a node that contains itself counts as beyond it. ``sizes``: by node id."""
    if id(node) in sizes:
        return sizes[id(node)]
    sizes[id(node)] = limit + 1  # while counting: a node met again inside itself is a recursive alias
    total = 1
    children = node.value if isinstance(node, yaml.SequenceNode) else \
        [part for pair in node.value for part in pair] if isinstance(node, yaml.MappingNode) else []
    for child in children:
        total += _expanded_size(child, limit, sizes)
        if total > limit:
            break
    sizes[id(node)] = total
    return total


def check_yaml_expansion(text: str, source: str) -> None:
    """``ConfigError`` naming ``source`` (never the expanded value) when the aliases of the YAML document ``text``
    expand it out of proportion to its length (:data:`YAML_EXPANSION_PER_CHAR`): checked on the node graph, before
    anything is built. A text that does not parse passes (its parser reports it)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except (yaml.YAMLError, RecursionError):
        return
    limit = YAML_EXPANSION_FLOOR + YAML_EXPANSION_PER_CHAR * len(text)
    if root is not None and _expanded_size(root, limit, {}) > limit:
        raise ConfigError(f"{source}: its aliases (*name) expand it to more than {limit} values, out of proportion "
                          f"to its {len(text)} characters: refused (a YAML alias bomb?)")


def load_yaml_text(text: str, source: str) -> Any:
    """The value of the YAML document ``text`` (safe types only), read from ``source``; a document that does not
    parse or is an alias bomb (:func:`check_yaml_expansion`) is a one-line ``ConfigError`` naming ``source``."""
    check_yaml_expansion(text, source)
    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError) as err:
        raise ConfigError(f"cannot parse {source}: {' '.join(str(err).split()) or 'nested too deeply'}") from None


def read_yaml_file(path: Union[str, Path], error_hint: str = "") -> Any:
    """The value of the YAML file ``path``: read with a size cap (:func:`maetok.runs.read_text_capped`: a device or a
    huge file is refused unread), then :func:`load_yaml_text`; ``error_hint`` (what to do) ends each error line."""
    text = read_text_capped(path, what_to_do=error_hint)
    try:
        return load_yaml_text(text, str(path))
    except ConfigError as err:
        raise ConfigError(f"{err}: {error_hint}" if error_hint else str(err)) from None


def preset_path(name_or_path: Union[str, Path]) -> Path:
    """The YAML file of a preset name (or an alias of one, :data:`PRESET_ALIASES`) or of a YAML path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    path = PRESET_DIR / f"{PRESET_ALIASES.get(str(name_or_path), name_or_path)}.yaml"
    if not path.exists():
        raise ConfigError(f"no preset or YAML file named {str(name_or_path)!r}; presets: {', '.join(list_presets())}")
    return path


def is_packaged_preset(name_or_path: Union[str, Path]) -> bool:
    """Whether ``name_or_path`` names one of maetok's presets (not a YAML file of the user's)."""
    return preset_path(name_or_path).parent == PRESET_DIR


def read_preset(name_or_path: Union[str, Path], _seen: Optional[set] = None) -> dict:
    """Read a preset name (or alias) or YAML path into a raw dict, resolving ``base:`` chains."""
    path = preset_path(name_or_path)
    seen = _seen or set()
    if path.resolve() in seen:
        raise ConfigError(f"preset {path} inherits from itself through 'base:'")
    seen.add(path.resolve())
    raw = read_yaml_file(path) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config file must be a mapping at the top level")
    base_name = raw.pop("base", None)
    if not base_name:
        return raw
    base = read_preset(base_name, seen)
    try:
        return deep_merge(base, raw)
    except ConfigError as err:  # a key that holds a mapping in one file and a list in the other
        raise ConfigError(f"{path} does not fit its base {base_name!r}: {err}") from None


def parse_overrides(overrides: Sequence[str]) -> dict:
    """``["train.steps=10", "model.variant=ae"]`` -> nested dict (OmegaConf's dotlist: values parsed as YAML)."""
    dotlist = OmegaConf.create()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        key, value = item.split("=", 1)
        check_yaml_expansion(value, f"override {key}")  # OmegaConf would build all an alias bomb expands to
        try:
            dotlist.merge_with_dotlist([item])
        except (yaml.YAMLError, *_REFUSED) as err:
            raise ConfigError(f"override {item!r}: cannot parse the value: {first_line(err)}") from None
    return OmegaConf.to_container(dotlist)


def load_config(
    cls: type[T], preset: Union[str, Path, Mapping, None] = None, overrides: Optional[Sequence[str]] = None
) -> T:
    """Defaults <- ``preset`` (a preset name, a YAML path or a mapping, e.g. a run's config) <- ``overrides``,
    validated."""
    raw = read_preset(preset) if isinstance(preset, (str, Path)) else preset or {}
    cfg = from_dict(cls, deep_merge(raw, parse_overrides(overrides or [])))
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


# ---------------------------------------------------------------------------------------------------------
# Latent diffusion
# ---------------------------------------------------------------------------------------------------------


class TransformerSize(NamedTuple):
    """Size of a diffusion transformer (the MLP ratio is 4 for all)."""

    width: int
    depth: int
    num_heads: int


# The sizes of the diffusion transformers, paper Tables 8-9 (SiT / DiT sizes); the one place they are written.
# A size's name is "<family>-<size>"; there is no LightningDiT-S. A config names one with ``preset:``.
DIFFUSION_SIZES: dict[str, TransformerSize] = {
    "SiT-S": TransformerSize(width=384, depth=12, num_heads=6),
    "SiT-B": TransformerSize(width=768, depth=12, num_heads=12),
    "SiT-L": TransformerSize(width=1024, depth=24, num_heads=16),
    "SiT-XL": TransformerSize(width=1152, depth=28, num_heads=16),
    "LightningDiT-B": TransformerSize(width=768, depth=12, num_heads=12),
    "LightningDiT-L": TransformerSize(width=1024, depth=24, num_heads=16),
    "LightningDiT-XL": TransformerSize(width=1152, depth=28, num_heads=16),
}
# arch -> (the family prefix of its sizes, the values its configs take when they do not say)
DIFFUSION_ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "sit": ("SiT", {}),
    "lightningdit": ("LightningDiT", {"qk_norm": True}),
}


@dataclass
class DiffusionModelConfig:
    """The velocity transformer on 1D latents, SiT or LightningDiT (:mod:`maetok.models.sit`): the ``model:`` section
    of a diffusion training config and the ``model`` entry of a diffusion model folder. Defaults: SiT-XL on the
    128 x 32 MAETok latents, 1000 classes.

    Reading a mapping (a YAML preset, overrides, a folder's ``config.json``) expands ``preset: SiT-B`` (a row of
    :data:`DIFFUSION_SIZES`) into ``width`` / ``depth`` / ``num_heads`` where those are absent or 0, and fills the
    arch's own defaults (LightningDiT: ``qk_norm: true``): :meth:`expand`.

    ``latent_dim``, ``num_latent_tokens`` and ``num_classes`` are the latent cache's when training
    (:meth:`for_latents`); ``conditional: false`` trains an unconditional model (``num_classes`` 0; no label
    embedding). ``pos_embed_layout`` (SiT): ``"interleaved"`` (the authors' checkpoint: sin / cos alternate along
    channels) or ``"halves"`` ([sin | cos]). ``rope_theta`` (LightningDiT): base of the 1D RoPE frequencies over the
    token index.
    """

    arch: str = "sit"  # "sit" or "lightningdit"
    width: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    latent_dim: int = 32
    num_latent_tokens: int = 128
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    conditional: bool = True
    qk_norm: bool = False
    frequency_dim: int = 256
    pos_embed_layout: str = "interleaved"
    rope_theta: float = 10000.0

    @staticmethod
    def expand(raw: Mapping[str, Any], where: str = "model") -> dict[str, Any]:
        """A raw ``model:`` mapping with its ``preset`` expanded into the size fields (explicit values above 0 win)
        and the arch's defaults filled in; an unknown preset or arch raises ``ConfigError`` naming ``where``."""
        values = dict(raw)
        arch = values.get("arch", DiffusionModelConfig.arch)
        if arch not in DIFFUSION_ARCHS:
            raise ConfigError(f"{where}.arch must be one of {list(DIFFUSION_ARCHS)}, got {arch!r}")
        family, arch_defaults = DIFFUSION_ARCHS[arch]
        preset = values.pop("preset", None)
        if preset is not None:
            sizes = {name: size for name, size in DIFFUSION_SIZES.items() if name.rpartition("-")[0] == family}
            if preset not in sizes:
                raise ConfigError(f"{where}.preset {preset!r} is not a {arch} size; known: {', '.join(sizes)}")
            for name, value in sizes[preset]._asdict().items():
                if not values.get(name):
                    values[name] = value
        return {**arch_defaults, **values}

    @classmethod
    def from_size(cls, preset: str, **fields: Any) -> "DiffusionModelConfig":
        """``DiffusionModelConfig.from_size("SiT-B", num_classes=0)``: a row of :data:`DIFFUSION_SIZES` (its family
        names the arch), then ``fields``."""
        arch = next((arch for arch, (family, _) in DIFFUSION_ARCHS.items() if preset.startswith(family + "-")), None)
        if arch is None or preset not in DIFFUSION_SIZES:
            raise ConfigError(f"unknown diffusion model size {preset!r}; known: {', '.join(DIFFUSION_SIZES)}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(known)}")
        return cls(**{**cls.expand({"arch": arch, "preset": preset}), **fields})

    @property
    def size_name(self) -> str:
        """The name of this size in :data:`DIFFUSION_SIZES` (``"SiT-B"``), else ``"custom size"``."""
        family = DIFFUSION_ARCHS[self.arch][0] if self.arch in DIFFUSION_ARCHS else self.arch
        size = TransformerSize(self.width, self.depth, self.num_heads)
        return next((name for name, row in DIFFUSION_SIZES.items() if row == size and name.startswith(family + "-")),
                    "custom size")

    def for_latents(self, latent_shape: Sequence[int], num_classes: int) -> "DiffusionModelConfig":
        """This config on latents ``(L, C) = latent_shape`` with ``num_classes`` classes (0 when not
        ``conditional``), validated."""
        cfg = dataclasses.replace(self, num_latent_tokens=int(latent_shape[0]), latent_dim=int(latent_shape[1]),
                                  num_classes=int(num_classes) if self.conditional else 0)
        cfg.validate()
        return cfg

    @property
    def latent_shape(self) -> tuple[int, int]:
        """``(L, C)``: tokens and channels of a latent."""
        return self.num_latent_tokens, self.latent_dim

    def validate(self) -> None:
        if self.arch not in DIFFUSION_ARCHS:
            raise ConfigError(f"model.arch must be one of {list(DIFFUSION_ARCHS)}, got {self.arch!r}")
        check_numbers(self, "model", {
            "width": (1, MAX_WIDTH), "depth": (1, MAX_DEPTH), "num_heads": (1, MAX_HEADS),
            "latent_dim": (1, MAX_LATENT_DIM), "num_latent_tokens": (1, MAX_LATENT_TOKENS),
            "frequency_dim": (1, MAX_WIDTH), "num_classes": (0, MAX_CLASSES), "mlp_ratio": (1 / 64, MAX_MLP_RATIO),
            "rope_theta": (1.0, 1e12),
        })
        if self.width % self.num_heads:
            raise ConfigError(f"model.width {self.width} is not divisible by model.num_heads {self.num_heads}")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ConfigError(f"model.class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}")
        if self.arch == "sit":
            if self.width % 2:
                raise ConfigError(f"model.width must be even for the sin-cos embedding, got {self.width}")
            if self.pos_embed_layout not in ("interleaved", "halves"):
                raise ConfigError(
                    f"model.pos_embed_layout must be 'interleaved' or 'halves', got {self.pos_embed_layout!r}")
        else:
            if (self.width // self.num_heads) % 2:
                raise ConfigError(f"model: the head dimension {self.width // self.num_heads} must be even for RoPE")
            if self.rope_theta <= 1.0:
                raise ConfigError(f"model.rope_theta must be > 1, got {self.rope_theta}")


@dataclass
class TransportConfig:
    time_sampling: str = "uniform"  # "uniform" or "lognormal"
    cosine_loss_weight: float = 0.0  # LightningDiT's velocity-direction loss
    latent_norm: str = "channel"  # "channel", "scalar" or "none": (x - mean) / std over the training latents

    def validate(self) -> None:
        check_numbers(self, "transport")
        if self.time_sampling not in ("uniform", "lognormal"):
            raise ConfigError(f"transport.time_sampling must be 'uniform' or 'lognormal', got {self.time_sampling!r}")
        if self.latent_norm not in ("channel", "scalar", "none"):
            raise ConfigError(f"transport.latent_norm must be 'channel', 'scalar' or 'none', got {self.latent_norm!r}")


SAMPLERS = ("euler", "euler-maruyama")
DIFFUSION_FORMS = ("sigma", "constant", "linear")  # w(t) of the Euler-Maruyama sampler: t, 1, 1 - t
LAST_STEPS = ("drift", "velocity")
CFG_TARGETS = ("velocity", "drift")
PRECISIONS = ("float32", "float64")
LATENT_NORMS = ("model", "tokenizer")


@dataclass
class SamplingConfig:
    """Defaults of ``maetok sample`` and of the periodic sample grids.

    The Euler-Maruyama schedule: ``linspace(1, t_end, steps)`` then one noise-free step to 0 (``last_step``:
    along the SDE drift or the velocity), diffusion ``w(t)`` = ``diffusion_form`` (see
    :mod:`maetok.diffusion.samplers`). ``cfg_on``: guidance combines the velocities (ours) or the SDE drifts (the
    authors'; the same in exact arithmetic, the drift is affine in the velocity). ``precision``: dtype of the
    integrated state (the authors integrate in float64). ``latent_norm``: undo the diffusion model's own latent
    statistics (``"model"``) or the tokenizer's scalar latent mean / std (``"tokenizer"``, the authors').
    :data:`AUTHORS_SAMPLING` lists the authors' choices.
    """

    sampler: str = "euler-maruyama"  # or "euler"
    steps: int = 250
    cfg_scale: float = 1.0
    guidance_low: float = 0.0  # guidance applies for noise levels t in [low, high] (t = 1 is pure noise)
    guidance_high: float = 1.0
    grid_steps: int = 50  # steps of the periodic training grids
    t_end: float = 0.04
    last_step: str = "drift"
    diffusion_form: str = "sigma"
    cfg_on: str = "velocity"
    precision: str = "float32"
    latent_norm: str = "model"

    def validate(self) -> None:
        for name, allowed in (("sampler", SAMPLERS), ("last_step", LAST_STEPS), ("diffusion_form", DIFFUSION_FORMS),
                              ("cfg_on", CFG_TARGETS), ("precision", PRECISIONS), ("latent_norm", LATENT_NORMS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"sampling.{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        check_numbers(self, "sampling")
        require_positive("sampling.steps", self.steps)
        require_positive("sampling.grid_steps", self.grid_steps)
        if self.cfg_scale < 0:
            raise ConfigError(f"sampling.cfg_scale must be >= 0 (1 = no guidance), got {self.cfg_scale}")
        if not 0.0 < self.t_end < 1.0:
            raise ConfigError(f"sampling.t_end must lie in (0, 1), got {self.t_end}")
        if not 0.0 <= self.guidance_low <= self.guidance_high <= 1.0:
            raise ConfigError(
                f"need 0 <= sampling.guidance_low <= sampling.guidance_high <= 1, got {self.guidance_low}, {self.guidance_high}"
            )


# The sampling conventions of the authors' released SiT (METHOD.md §5): their Euler-Maruyama sampler (linspace(1,
# 0.04, N) plus a final deterministic drift step, diffusion 2t = 2 w(t) with w = t), guidance on the drift, a float64
# state and the tokenizer's scalar latent mean / std. Our defaults differ in cfg_on, precision and latent_norm.
AUTHORS_SAMPLING: dict[str, Any] = {
    "sampler": "euler-maruyama", "t_end": 0.04, "last_step": "drift", "diffusion_form": "sigma",
    "cfg_on": "drift", "precision": "float64", "latent_norm": "tokenizer",
}
# Ours, for the same fields (SamplingConfig's defaults).
MAETOK_SAMPLING: dict[str, Any] = {name: getattr(SamplingConfig, name) for name in AUTHORS_SAMPLING}


@dataclass
class DiffusionTrainConfig:
    model: DiffusionModelConfig = field(default_factory=DiffusionModelConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-4, weight_decay=0.0, betas=(0.9, 0.999), schedule="constant", warmup_steps=0, grad_clip=0.0)
    )
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=4_000_000, batch_size=256, eval_every=50_000, ckpt_every=50_000))
    latents: str = ""  # the latent cache directory (--latents)

    def validate(self) -> None:
        self.model.validate()
        self.sampling.validate()
        self.train.validate()
        self.optim.validate()
        self.transport.validate()


# ---------------------------------------------------------------------------------------------------------
# The end-to-end pipeline (maetok.pipeline: the demo and the study)
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Budget:
    """Step counts and evaluation sizes of one pipeline run (fixed counts: the figures do not depend on the
    machine's speed, only the wall time does)."""

    stage1_steps: int
    stage2_steps: int
    diffusion_steps: int
    eval_images: int  # held-out images: PSNR / SSIM / LPIPS / rFID, and the gFID reference
    fid_samples: int  # generated images for gFID
    fid_sampling_steps: int  # sampler steps of the gFID samples (the sample grid is 100 of them)
    probe_train: int  # training latents of the linear probe
    gmm_ks: tuple[int, ...]  # GMM component counts of the NLL curve
    gmm_train: int  # training latents the GMMs are fitted on
    cache_limit: Optional[int]  # training images encoded for the SiT (None = all)
    stage1_loss: str = "mse"  # "mse" (+ auxiliary / KL terms) or "full" (+ LPIPS + GAN, the paper's Eq. 6)
    stage2_loss: str = "full"
    stage2_batch: Optional[int] = None  # None = the preset's batch size
    stage2_mask_decay: float = 1.0  # fraction of stage 2 over which the mask ratio decays to 0 (paper: the whole stage)
    cfg_scale: Optional[float] = None  # of the gFID samples; None = the diffusion preset's (the study: 1.0)
    baseline_train: int = 20000  # training images the PCA / Gaussian baselines are fitted on
    gmm_all_dims: bool = False  # also store the GMM curve at every PCA dim up to GMM_DIMS (for the study)

    def validate(self) -> None:
        for name in ("stage1_loss", "stage2_loss"):
            if getattr(self, name) not in ("mse", "full"):
                raise ConfigError(f"Budget.{name} must be 'mse' or 'full', got {getattr(self, name)!r}")
