"""Model folders: the one module that reads, writes, converts and uploads them, for every format.

A model folder is ``config.json`` + ``model.safetensors`` (safetensors only: loading never executes code). Its
format is detected once, from ``config.json`` (:func:`detect_format`):

=====================  ==================================================================================
``maetok-tokenizer``   ours: ``model_type: maetok`` (or, before ``model_type`` existed, our fields)
``authors-tokenizer``  the authors' MAETok saver: flat ``ModelArgs`` (``enc_type``, ``encoder_model`` ...)
``maetok-diffusion``   ours: ``model_type: maetok-diffusion``, the :class:`~maetok.config.DiffusionModelConfig`
                       under ``model`` and the sampling entries (:data:`FOLDER_EXTRAS`)
``authors-sit``        the authors' SiT saver: flat model arguments (``hidden_size``, ``depth``, ``input_size`` ...)
``diffusers-*``        a component folder of :mod:`maetok.integrations.diffusers` (``_class_name``
                       ``MAETokAutoencoder``: ``diffusers-tokenizer``; ``MAETokTransformer``:
                       ``diffusers-diffusion``), weights in ``diffusion_pytorch_model.safetensors``; written by
                       diffusers, read here too (a diffusers transformer comes with the default sampling settings)
=====================  ==================================================================================

Every loader takes a folder, the run directory holding it as ``model/`` (:func:`maetok.runs.model_directory`) or a
Hugging Face hub id (:func:`maetok.assets.resolve_pretrained`), and loads strictly: every key and shape must match,
every weight must be finite, and each problem is one line naming the file. Folders are written atomically (weights
first, ``config.json`` last). The model classes' ``from_pretrained`` / ``save_pretrained`` / ``push_to_hub`` call
:func:`load_tokenizer` / :func:`load_diffusion_model`, :func:`save_tokenizer` / :func:`save_diffusion_model` and
:func:`push_to_hub`; the key mapping of the authors' tokenizer lives with its modules (:mod:`maetok.models.released`).
"""

from __future__ import annotations

import csv
import logging
import math
import os
import shlex
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, TypeVar, Union

import torch
from safetensors.torch import load_file

from maetok.assets import is_hub_id, resolve_pretrained
from maetok.config import AUTHORS_SAMPLING, ConfigError, DiffusionModelConfig, SamplingConfig, TokenizerConfig, \
    from_dict, read_yaml_file, to_dict
from maetok.errors import MaetokError, MissingFileError, ModelFolderError, first_line
from maetok.models.released import (
    ARCHITECTURE_KEY,
    ReleasedArchitecture,
    ReleasedMAETok,
    authors_architecture,
    authors_expected_shapes,
    is_ignored_key,
    map_authors_state,
)
from maetok.models.sit import AdaLNVelocityTransformer, build_diffusion_model
from maetok.models.tokenizer import LATENT_STATISTICS, MAETok
from maetok.runs import (
    FORMAT_KEY,
    FORMAT_VERSION,
    MODEL_CONFIG,
    MODEL_DIR,
    MODEL_WEIGHTS,
    PathLike,
    check_finite_tensors,
    check_format_version,
    model_directory,
    read_json_file,
    resolve_device,
    run_directory,
    save_safetensors,
    weights_fingerprint,
    write_json,
    write_text,
)

logger = logging.getLogger(__name__)
ModelT = TypeVar("ModelT", bound=torch.nn.Module)

TOKENIZER_MODEL_TYPE = "maetok"  # config.json's model_type in our tokenizer folders
DIFFUSION_MODEL_TYPE = "maetok-diffusion"  # ... in our diffusion folders
#: the fields of our tokenizer config.json that decide a weight's shape (a folder lacking one is refused)
CONFIG_REQUIRED_FIELDS = ("variant", "image_size", "in_channels", "patch_size", "encoder_width", "encoder_depth",
                          "encoder_heads", "decoder_width", "decoder_depth", "decoder_heads", "mlp_ratio",
                          "num_latent_tokens", "latent_dim")
#: fields of the authors' tokenizer config.json that tell it apart from ours (ours has model_type / format_version)
AUTHORS_TOKENIZER_KEYS = ("enc_type", "encoder_model", "codebook_embed_dim", "num_latent_tokens")
#: what the authors' SiT config.json holds (written by their PyTorchModelHubMixin save_pretrained)
AUTHORS_SIT_KEYS = ("hidden_size", "depth", "num_heads", "in_channels", "input_size")
#: config.json entries of our diffusion folder besides ``model``, in file order
FOLDER_EXTRAS = ("class_names", "latent_norm", "sampling", "tokenizer")
#: the classes of maetok.integrations.diffusers whose folders these loaders read: _class_name -> (format, key prefix)
DIFFUSERS_CLASSES = {"MAETokAutoencoder": ("diffusers-tokenizer", "tokenizer."),
                     "MAETokTransformer": ("diffusers-diffusion", "model.")}
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
#: the folder formats ``maetok convert --to`` writes: ours (:func:`save_model`) or a diffusers component
#: (:func:`save_diffusers_folder`)
CONVERT_FORMATS = ("maetok", "diffusers")
#: weight files of pickle formats, which no loader here ever reads (unpickling can execute code)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FORMATS = ("maetok-tokenizer", "authors-tokenizer", "diffusers-tokenizer")
DIFFUSION_FORMATS = ("maetok-diffusion", "authors-sit", "diffusers-diffusion")
#: how many names a key-mismatch error line shows per kind (the full list goes to the log)
MISMATCH_NAMES_SHOWN = 3


# ---------------------------------------------------------------------------------------------------------
# Files: config.json and model.safetensors
# ---------------------------------------------------------------------------------------------------------


def save_model_folder(directory: PathLike, model_type: Optional[str], config: Mapping[str, Any],
                      state_dict: Mapping[str, torch.Tensor], weights_name: str = MODEL_WEIGHTS) -> Path:
    """Write a model folder: ``weights_name`` (``state_dict`` on the CPU; no pickles), then ``config.json``
    (``model_type``, the format version and ``config``; ``model_type`` None: ``config`` alone, a diffusers component),
    both through a temporary file and a rename. The config is written last, so its presence means the folder is
    complete. Returns the directory."""
    directory = Path(directory)
    check_finite_tensors(state_dict, f"the {model_type or 'model'} to be saved to {directory}")
    directory.mkdir(parents=True, exist_ok=True)
    save_safetensors(state_dict, directory / weights_name, metadata={"format": "pt"})
    header = {"model_type": model_type, FORMAT_KEY: FORMAT_VERSION} if model_type is not None else {}
    write_json(directory / MODEL_CONFIG, {**header, **config})
    return directory


def check_weights_file(path: PathLike) -> Path:
    """``path`` when the safetensors file exists; else one line naming it: ``FileNotFoundError``, or, when its folder
    holds pickle weights only (``diffusion_pytorch_model.bin`` ...), a ``ValueError`` saying they are never loaded."""
    path = Path(path)
    if path.exists():
        return path
    pickles = sorted(p.name for p in path.parent.glob("*") if p.suffix in PICKLE_SUFFIXES) if path.parent.is_dir() else []
    if pickles:
        raise ModelFolderError(f"{path} not found: {path.parent} holds pickle weights only ({', '.join(pickles)}), which "
                               "maetok never loads (unpickling can execute code); save them as safetensors")
    raise MissingFileError(f"{path} not found")


def read_safetensors(path: PathLike, map_location: str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; a missing file raises ``FileNotFoundError`` (:func:`check_weights_file`),
    a truncated or corrupt one a one-line ``ValueError`` naming it."""
    path = check_weights_file(path)
    try:
        return load_file(str(path), device=map_location)
    except Exception as err:  # safetensors raises its own SafetensorError (and OSError / ValueError) on bad files
        raise ModelFolderError(f"{path} is not a readable safetensors file (truncated or corrupt?): {first_line(err)}") \
            from None


def safetensors_shapes(path: PathLike) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of a safetensors file, read from its header only (no tensor is loaded)."""
    from safetensors import safe_open

    path = check_weights_file(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except Exception as err:
        raise ModelFolderError(f"{path} is not a readable safetensors file (truncated or corrupt?): {first_line(err)}") \
            from None


def check_state_keys(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]],
                     source: PathLike, model_name: str = "the model") -> None:
    """Strict key check of a checkpoint: ``found`` (name -> shape, from ``source``) must hold exactly the names
    of ``expected`` (the model's), with the same shapes. Otherwise the full list of differences goes to the log
    (on stderr by default) and a ``ValueError`` of one line gives the counts of missing, unexpected and mis-shaped
    keys with the first few names of each."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = [k for k in sorted(set(expected) & set(found)) if tuple(expected[k]) != tuple(found[k])]
    if not (missing or unexpected or misshaped):
        return
    described = {
        "missing": missing,
        "unexpected": unexpected,
        "mis-shaped": [f"{k} (file {list(found[k])}, model {list(expected[k])})" for k in misshaped],
    }
    logger.error("%s does not match %s:\n%s", source, model_name,
                 "\n".join(f"  {kind}: {name}" for kind, names in described.items() for name in names))
    parts = []
    for kind, names in described.items():
        if names:
            more = ", ..." if len(names) > MISMATCH_NAMES_SHOWN else ""
            parts.append(f"{len(names)} {kind} ({', '.join(names[:MISMATCH_NAMES_SHOWN])}{more})")
    raise ModelFolderError(f"{source} does not match {model_name}: {'; '.join(parts)} (the full list is in the log)")


def load_state_strict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: PathLike) -> torch.nn.Module:
    """Load ``state`` into ``model`` only if every key and shape matches (:func:`check_state_keys`): nothing
    loads partially; and only finite weights (a diverged model is never sampled from or evaluated). Values are
    cast to the model's dtypes."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_state_keys(expected, {k: tuple(v.shape) for k, v in state.items()}, source, type(model).__name__)
    check_finite_tensors(state, str(source))
    model.load_state_dict(state, strict=True)
    return model


def require_config_fields(config: Mapping[str, Any], fields: Sequence[str], source: PathLike) -> None:
    """``ConfigError`` naming ``source`` and the first field of ``fields`` that ``config`` lacks (and how many more)."""
    missing = [name for name in fields if name not in config]
    if missing:
        more = f" (and {len(missing) - 1} more: {', '.join(missing[1:])})" if len(missing) > 1 else ""
        raise ConfigError(f"{source} lacks the field {missing[0]!r}{more}")


# ---------------------------------------------------------------------------------------------------------
# The format, detected once
# ---------------------------------------------------------------------------------------------------------


@dataclass
class ModelFolder:
    """A model folder and what its ``config.json`` says: ``format`` (:func:`detect_format`) and ``config`` (as
    written; for our formats without ``model_type`` and ``format_version``)."""

    directory: Path
    format: str
    config: dict[str, Any]

    @property
    def config_path(self) -> Path:
        return self.directory / MODEL_CONFIG

    @property
    def weights_path(self) -> Path:
        return self.directory / (DIFFUSERS_WEIGHTS if self.format.startswith("diffusers") else MODEL_WEIGHTS)

    def load_weights(self, model: torch.nn.Module, map_location: str = "cpu") -> torch.nn.Module:
        """``model`` with this folder's weights, strictly (:func:`load_state_strict`); a diffusers folder's keys lose
        their wrapper's prefix (``tokenizer.`` / ``model.``)."""
        state = read_safetensors(self.weights_path, map_location)
        prefix = DIFFUSERS_CLASSES[self.config["_class_name"]][1] if self.format.startswith("diffusers-") else ""
        state = {key[len(prefix):] if key.startswith(prefix) else key: value for key, value in state.items()}
        model.source_folder = self.directory  # what its model card can tell of the run behind it (run_facts)
        return load_state_strict(model, state, self.weights_path)


def detect_format(config: Mapping[str, Any], source: PathLike = MODEL_CONFIG) -> str:
    """The format of a parsed ``config.json`` (see the module docstring); anything else raises ``ConfigError``
    naming ``source``."""
    if "_class_name" in config:
        return DIFFUSERS_CLASSES.get(config["_class_name"], ("diffusers",))[0]
    if "model_type" not in config and FORMAT_KEY not in config:
        if all(key in config for key in AUTHORS_TOKENIZER_KEYS):
            return "authors-tokenizer"
        if all(key in config for key in AUTHORS_SIT_KEYS):
            return "authors-sit"
    model_type = config.get("model_type", TOKENIZER_MODEL_TYPE if "variant" in config else None)
    if model_type == TOKENIZER_MODEL_TYPE:
        return "maetok-tokenizer"
    if model_type == DIFFUSION_MODEL_TYPE:
        return "maetok-diffusion"
    kind = f"model_type {config['model_type']!r}" if "model_type" in config else "no model_type"
    raise ConfigError(f"{source} is not a maetok model folder ({kind}; neither maetok's tokenizer or diffusion format "
                      "nor the authors' MAETok or SiT format)")


def read_folder(source: Union[PathLike, ModelFolder], what: str = "model") -> ModelFolder:
    """The :class:`ModelFolder` of ``source``: a folder, the run directory holding it as ``model/``, or a hub id (a
    :class:`ModelFolder` already read is returned as it is, so every loader here takes one). A missing file, invalid
    JSON, a non-object, a newer format version or an unknown format raise one line naming the file; ``what`` names
    the kind of model wanted."""
    if isinstance(source, ModelFolder):
        return source
    directory = model_directory(resolve_pretrained(source))
    path = directory / MODEL_CONFIG
    if not path.exists():
        if (directory / "model_index.json").exists():
            raise ModelFolderError(f"{directory} is a diffusers pipeline: name its vae/ or transformer/ folder")
        raise MissingFileError(f"{path} not found: a {what} directory holds {MODEL_CONFIG} and {MODEL_WEIGHTS}")
    raw = read_json_file(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    check_format_version(raw, path)
    fmt = detect_format(raw, path)
    if fmt.startswith("maetok-"):
        raw.pop(FORMAT_KEY, None)
        raw.pop("model_type", None)
    return ModelFolder(directory, fmt, raw)


def _require_format(folder: ModelFolder, formats: Sequence[str], what: str) -> None:
    if folder.format not in formats:
        hint = " (load it with maetok.integrations.diffusers)" if folder.format == "diffusers" else ""
        raise ConfigError(f"{folder.config_path} holds a {folder.format} model, not a {what}{hint}")


# ---------------------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------------------


def build_tokenizer(config: Mapping[str, Any], source: PathLike) -> MAETok:
    """A freshly initialised tokenizer of the architecture our ``config.json`` describes (its
    ``released_architecture`` entry switches the released architecture on); ``source`` names the file in errors."""
    config = dict(config)
    released = config.pop(ARCHITECTURE_KEY, None)
    statistics = _latent_statistics(config, source)
    tokenizer_config = from_dict(TokenizerConfig, config, where=str(source))
    _validated(tokenizer_config, source)
    if released is None:
        model = MAETok(tokenizer_config)
    elif not isinstance(released, dict):
        raise ConfigError(f"{source}: {ARCHITECTURE_KEY} must be a mapping, got {released!r}")
    else:
        model = ReleasedMAETok(tokenizer_config, from_dict(ReleasedArchitecture, released,
                                                           where=f"{source}.{ARCHITECTURE_KEY}"))
    for name, value in statistics.items():
        setattr(model, name, value)
    return model


def _latent_statistics(config: dict[str, Any], source: PathLike) -> dict[str, float]:
    """The scalar latent statistics (:data:`~maetok.models.tokenizer.LATENT_STATISTICS`) popped from ``config``: both
    or none, finite, the std positive; else ``ConfigError`` naming ``source``."""
    found = {name: config.pop(name) for name in LATENT_STATISTICS if name in config}
    if not found:
        return {}
    try:
        values = {name: float(found[name]) for name in LATENT_STATISTICS}
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"{source}: {' and '.join(LATENT_STATISTICS)} must both be numbers, got {found}") from None
    if not all(math.isfinite(v) for v in values.values()) or not values["latent_std"] > 0:
        raise ConfigError(f"{source}: the latent statistics must be finite with a positive std, got {values}")
    return values


def _validated(cfg: Any, source: PathLike) -> None:
    """``cfg.validate()`` (sizes bounded, every number finite: before any module is built), its error naming
    ``source``."""
    try:
        cfg.validate()
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def _authors_tokenizer_architecture(folder: ModelFolder) -> tuple[TokenizerConfig, ReleasedArchitecture]:
    try:
        tokenizer_cfg, architecture = authors_architecture(folder.config, safetensors_shapes(folder.weights_path),
                                                           folder.config_path, folder.weights_path)
        _validated(tokenizer_cfg, folder.config_path)
        _validated(architecture, folder.config_path)
        return tokenizer_cfg, architecture
    except MaetokError:
        raise
    # a malformed value (null, a list for a mapping, a zero patch size, NaN for an integer ...)
    except (TypeError, KeyError, AttributeError, ValueError, ZeroDivisionError, OverflowError) as err:
        raise ConfigError(f"{folder.config_path}: cannot read the architecture ({type(err).__name__}: {err})") from None


def tokenizer_config(source: Union[PathLike, ModelFolder]) -> TokenizerConfig:
    """The :class:`~maetok.config.TokenizerConfig` of a tokenizer folder (either format), run directory or hub id,
    without reading its tensors (the authors' format: from ``config.json`` and the safetensors header)."""
    folder = read_folder(source, "tokenizer")
    _require_format(folder, TOKENIZER_FORMATS, "tokenizer")
    if folder.format == "authors-tokenizer":
        return _authors_tokenizer_architecture(folder)[0]
    raw, where = _our_tokenizer_config(folder)
    skipped = (ARCHITECTURE_KEY, *LATENT_STATISTICS)
    cfg = from_dict(TokenizerConfig, {k: v for k, v in raw.items() if k not in skipped}, where=where)
    _validated(cfg, where)
    return cfg


def _our_tokenizer_config(folder: ModelFolder) -> tuple[dict[str, Any], str]:
    """Our tokenizer config of a folder in our format or diffusers' (its ``tokenizer_config``), with every field
    that decides a weight's shape; and where it was read, for errors."""
    raw, where = folder.config, str(folder.config_path)
    if folder.format == "diffusers-tokenizer":
        raw, where = folder.config.get("tokenizer_config"), f"{folder.config_path}:tokenizer_config"
        if not isinstance(raw, dict):
            raise ConfigError(f"{where} must be a mapping, got {raw!r}")
    require_config_fields(raw, CONFIG_REQUIRED_FIELDS, where)
    return raw, where


def resolve_dtype(torch_dtype: Optional[Union[str, torch.dtype]]) -> Optional[torch.dtype]:
    """``torch_dtype`` (a floating ``torch.dtype`` or its name: ``"bfloat16"``, ``"torch.float16"`` ...) as a
    ``torch.dtype``; None stays None. Anything else raises one line."""
    if torch_dtype is None:
        return None
    resolved = getattr(torch, torch_dtype.removeprefix("torch."), None) if isinstance(torch_dtype, str) else torch_dtype
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ConfigError(f"torch_dtype must be a floating dtype (torch.float32, torch.bfloat16, torch.float16 or its "
                          f"name), got {torch_dtype!r}")
    return resolved


def place_model(model: ModelT, device: Optional[Union[str, torch.device]] = None,
                torch_dtype: Optional[Union[str, torch.dtype]] = None) -> ModelT:
    """``model`` in eval mode on ``device`` (default: where it was loaded, the CPU, as torch and diffusers) in
    ``torch_dtype`` (default: unchanged, float32): what every loader returns. The models cast their inputs to their
    dtype."""
    changes = {"device": resolve_device(device) if device is not None else None, "dtype": resolve_dtype(torch_dtype)}
    changes = {name: value for name, value in changes.items() if value is not None}
    # torch's Module.to: diffusers' ModelMixin.to warns about float32 modules on every dtype cast, even with none
    return (torch.nn.Module.to(model, **changes) if changes else model).eval()


def load_tokenizer(source: Union[PathLike, ModelFolder], device: Optional[Union[str, torch.device]] = None,
                   torch_dtype: Optional[Union[str, torch.dtype]] = None) -> MAETok:
    """The tokenizer of a folder (ours, the authors' or diffusers' format), a run directory or a hub id, strictly
    loaded, in eval mode on ``device`` in ``torch_dtype`` (:func:`place_model`; what ``MAETok.from_pretrained``
    returns)."""
    return place_model(_read_tokenizer(source), device, torch_dtype)


def _read_tokenizer(source: Union[PathLike, ModelFolder]) -> MAETok:
    folder = read_folder(source, "tokenizer")
    _require_format(folder, TOKENIZER_FORMATS, "tokenizer")
    if folder.format != "authors-tokenizer":
        raw, where = _our_tokenizer_config(folder)
        return folder.load_weights(build_tokenizer(raw, where))
    # the authors' format: their key names, checked against the skeleton before any tensor is read
    tokenizer_cfg, architecture = _authors_tokenizer_architecture(folder)
    with torch.device("meta"):
        skeleton = ReleasedMAETok(tokenizer_cfg, architecture)
    kept = {k: v for k, v in safetensors_shapes(folder.weights_path).items() if not is_ignored_key(k)}
    check_state_keys(authors_expected_shapes(skeleton), kept, folder.weights_path)
    model = ReleasedMAETok(tokenizer_cfg, architecture)
    state, _ = map_authors_state(read_safetensors(folder.weights_path))
    return load_state_strict(model, state, folder.weights_path)


def save_tokenizer(model: MAETok, directory: PathLike, state_dict: Optional[Mapping[str, torch.Tensor]] = None) -> Path:
    """Our tokenizer folder: ``config.json`` + ``model.safetensors`` (encoder + pixel decoder; auxiliary decoders are
    training-only and never written), atomically. ``state_dict``: default the model's."""
    state = state_dict if state_dict is not None else model.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("aux_decoders.")}
    return save_model_folder(directory, TOKENIZER_MODEL_TYPE, model.config_dict(), state)


# ---------------------------------------------------------------------------------------------------------
# Diffusion models
# ---------------------------------------------------------------------------------------------------------


def default_folder_extras() -> dict[str, Any]:
    """The folder entries of a model that has none: no class names, identity latent normalisation, the default
    sampling settings, no tokenizer."""
    return {"class_names": [], "latent_norm": {"mode": "none", "mean": 0.0, "std": 1.0},
            "sampling": to_dict(SamplingConfig()), "tokenizer": None}


def authors_sit_config(reference: Mapping[str, Any]) -> DiffusionModelConfig:
    """The config that loads the authors' SiT ``model.safetensors``, from their ``config.json`` (``hidden_size``,
    ``depth``, ``num_heads``, ``in_channels``, ``input_size``, ``num_classes``, ``class_dropout_prob``,
    ``mlp_ratio``, ``qk_norm``, ``vae_1d``, ``patch_size``, ``use_cfg``). ``ValueError`` for what it cannot load."""
    if not reference.get("vae_1d", False) or int(reference.get("patch_size", 1)) != 1:
        raise ModelFolderError("only the 1D-latent SiT (vae_1d=true, patch_size=1) is supported")
    if int(reference.get("decoder_hidden_size", reference["hidden_size"])) != int(reference["hidden_size"]):
        raise ModelFolderError("decoder_hidden_size different from hidden_size is not supported")
    use_cfg = bool(reference.get("use_cfg", True))
    return DiffusionModelConfig(
        arch="sit",
        width=int(reference["hidden_size"]),
        depth=int(reference["depth"]),
        num_heads=int(reference["num_heads"]),
        mlp_ratio=float(reference.get("mlp_ratio", 4.0)),
        latent_dim=int(reference["in_channels"]),
        num_latent_tokens=int(reference["input_size"]),
        num_classes=int(reference.get("num_classes", 1000)),
        class_dropout_prob=float(reference.get("class_dropout_prob", 0.1)) if use_cfg else 0.0,
        qk_norm=bool(reference.get("qk_norm", False)),
    )


def diffusion_model_config(raw: Mapping[str, Any], where: str, latent_shape: Optional[Sequence[int]] = None,
                           num_classes: Optional[int] = None) -> DiffusionModelConfig:
    """A :class:`~maetok.config.DiffusionModelConfig` from a folder's ``model`` entry, validated. Folders of format
    version 0 / 1 kept the latent shape and the classes beside it (``latent_shape``, ``num_classes``, and
    ``conditional``); they are folded in."""
    raw = dict(raw)
    if latent_shape is not None:
        if len(latent_shape) != 2:
            raise ConfigError(f"{where}: latent_shape must be [L, C], got {list(latent_shape)}")
        raw.setdefault("num_latent_tokens", int(latent_shape[0]))
        raw.setdefault("latent_dim", int(latent_shape[1]))
    if num_classes is not None:
        raw.setdefault("num_classes", int(num_classes))
    cfg = from_dict(DiffusionModelConfig, raw, where=where)
    _validated(cfg, where)
    return cfg


@dataclass
class DiffusionFolder:
    """What a diffusion model folder's ``config.json`` says: the :class:`ModelFolder`, the model config and the
    :data:`FOLDER_EXTRAS` (for the authors' SiT: no class names, their sampling conventions, the latent
    normalisation of the tokenizer)."""

    folder: ModelFolder
    model_cfg: DiffusionModelConfig
    extras: dict[str, Any]

    @property
    def directory(self) -> Path:
        return self.folder.directory

    @property
    def source_format(self) -> str:
        return self.folder.format


def read_diffusion_folder(source: Union[PathLike, ModelFolder]) -> DiffusionFolder:
    """The :class:`DiffusionFolder` of ``source``: a folder of ours, the authors' or diffusers' (a
    ``MAETokTransformer``), the run directory holding ours as ``model/``, or a hub id."""
    folder = read_folder(source, "diffusion model")
    _require_format(folder, DIFFUSION_FORMATS, "diffusion model")
    raw, path = folder.config, folder.config_path
    if folder.format == "authors-sit":
        try:
            model_cfg = authors_sit_config(raw)
            model_cfg.validate()
        except (KeyError, TypeError, ValueError, OverflowError) as err:  # OverflowError: int(inf)
            raise ConfigError(f"{path}: the authors' SiT config cannot be mapped: {err}") from None
        extras = {**default_folder_extras(), "sampling": to_dict(SamplingConfig(**AUTHORS_SAMPLING))}
        return DiffusionFolder(folder, model_cfg, extras)
    if folder.format == "diffusers-diffusion":  # MAETokTransformer's config; its sampling lives in the scheduler
        if not isinstance(raw.get("diffusion_model"), dict):
            raise ConfigError(f"{path}: diffusion_model must be a mapping, got {raw.get('diffusion_model')!r}")
        model_cfg = diffusion_model_config(raw["diffusion_model"], f"{path}:diffusion_model", raw.get("latent_shape"),
                                           raw.get("num_classes"))
        extras = {**default_folder_extras(), "class_names": list(raw.get("class_names") or []),
                  "latent_norm": raw.get("latent_norm") or default_folder_extras()["latent_norm"]}
        return DiffusionFolder(folder, model_cfg, extras)
    missing = [key for key in ("model", "latent_norm", "sampling") if key not in raw]
    if missing:
        raise ConfigError(f"{path} is not a complete maetok diffusion model: it lacks {missing}")
    model_cfg = diffusion_model_config(raw["model"], f"{path}:model", raw.get("latent_shape"), raw.get("num_classes"))
    from_dict(SamplingConfig, raw["sampling"], where=f"{path}:sampling")  # checked here, read by the bundle
    extras = {key: raw.get(key, default) for key, default in default_folder_extras().items()}
    extras["tokenizer"] = resolve_tokenizer_reference(extras["tokenizer"], folder.directory)
    return DiffusionFolder(folder, model_cfg, extras)


# ---------------------------------------------------------------------------------------------------------
# The tokenizer a diffusion folder names
# ---------------------------------------------------------------------------------------------------------


def hub_id_of_snapshot(path: PathLike) -> Optional[str]:
    """The hub id ``owner/name`` of a Hugging Face hub cache snapshot folder (``.../models--owner--name/snapshots/
    <revision>``, what a hub id resolves to), else None."""
    parts = Path(path).parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        owner, _, name = parts[-3][len("models--"):].partition("--")
        if owner and name:
            return f"{owner}/{name}"
    return None


def tokenizer_reference(tokenizer: Optional[PathLike], directory: PathLike, relative: bool = True) -> Optional[str]:
    """What a diffusion folder written to ``directory`` stores as its tokenizer (``config.json``'s ``tokenizer``): a hub
    id as it is (a hub cache snapshot: its hub id); a local folder as a path relative to ``directory``
    (``../tokenizer``, recomputed on every save, so the two can move together) or, with ``relative=False`` (a folder
    bound for the hub), absolute; a path that exists nowhere as given."""
    if tokenizer is None:
        return None
    path = Path(str(tokenizer)).expanduser()
    if not path.exists():
        return str(tokenizer)
    path = path.resolve()
    hub_id = hub_id_of_snapshot(path)
    if hub_id is not None:
        return hub_id
    if not relative:
        return str(path)
    try:
        reference = Path(os.path.relpath(path, Path(directory).resolve())).as_posix()
    except ValueError:  # another drive (Windows): no relative path
        return str(path)
    return reference if reference.startswith("..") else f"./{reference}"  # never read as a hub id owner/name


def resolve_tokenizer_reference(reference: Optional[str], directory: PathLike) -> Optional[str]:
    """The tokenizer that a diffusion folder in ``directory`` names (``reference``, as :func:`tokenizer_reference`
    wrote it), as the loaders take it: a relative path joined to the folder, an absolute path (older folders) or a hub
    id as stored. A relative path found only from the working directory (written by an older maetok) is kept."""
    if not reference:
        return None
    path = Path(reference).expanduser()
    if path.is_absolute():
        return str(path)
    joined = Path(os.path.normpath(Path(directory).resolve() / path))
    if joined.exists():
        return str(joined)
    if is_hub_id(reference) or path.exists():
        return reference
    return str(joined)  # missing: LatentGenerator.tokenizer_source names it and the config.json it came from


def load_diffusion_model(source: Union[PathLike, ModelFolder], device: Optional[Union[str, torch.device]] = None,
                         torch_dtype: Optional[Union[str, torch.dtype]] = None
                         ) -> tuple[AdaLNVelocityTransformer, DiffusionFolder]:
    """The model of a diffusion folder (ours, the authors' or diffusers'), strictly loaded, in eval mode on ``device``
    in ``torch_dtype`` (:func:`place_model`: default the CPU, float32), with the folder's extras in its
    ``folder_extras``; and the folder."""
    found = read_diffusion_folder(source)
    model = build_diffusion_model(found.model_cfg)
    found.folder.load_weights(model)
    model.folder_extras = dict(found.extras)
    return place_model(model, device, torch_dtype), found


def save_diffusion_model(model: AdaLNVelocityTransformer, directory: PathLike,
                         state_dict: Optional[Mapping[str, torch.Tensor]] = None, *, relative_tokenizer: bool = True,
                         **extras: Any) -> Path:
    """Our diffusion model folder: ``config.json`` with the model config and the :data:`FOLDER_EXTRAS`
    (``class_names``; ``latent_norm``, a :class:`~maetok.data.latents.LatentNormalizer` dict; ``sampling``, a
    :class:`~maetok.config.SamplingConfig` dict; ``tokenizer``, its folder or hub id, stored by
    :func:`tokenizer_reference`: a local folder relative to ``directory`` unless ``relative_tokenizer`` is false) over
    :func:`default_folder_extras`, and ``model.safetensors`` (``state_dict``, default the model's), atomically."""
    unknown = sorted(set(extras) - set(FOLDER_EXTRAS))
    if unknown:
        raise ModelFolderError(f"unknown diffusion folder entries {unknown}; known: {list(FOLDER_EXTRAS)}")
    merged = {**default_folder_extras(), **{k: v for k, v in extras.items() if v is not None}}
    config = {
        "model": to_dict(model.config),
        "class_names": list(merged["class_names"]),
        "latent_norm": dict(merged["latent_norm"]),
        "sampling": dict(merged["sampling"]),
        "tokenizer": tokenizer_reference(merged["tokenizer"], directory, relative_tokenizer),
    }
    state = state_dict if state_dict is not None else model.state_dict()
    return save_model_folder(directory, DIFFUSION_MODEL_TYPE, config, state)


# ---------------------------------------------------------------------------------------------------------
# Any model: convert, summarize, upload
# ---------------------------------------------------------------------------------------------------------


def is_diffusion_folder(source: Union[PathLike, ModelFolder]) -> bool:
    """Whether ``source`` holds a diffusion model (ours, the authors' SiT or a diffusers transformer) rather than a
    tokenizer."""
    return read_folder(source).format in DIFFUSION_FORMATS


def load_model(source: Union[PathLike, ModelFolder]) -> Union[MAETok, AdaLNVelocityTransformer]:
    """The tokenizer or diffusion model of ``source`` (any format), on the CPU, in eval mode."""
    folder = read_folder(source)
    if folder.format in DIFFUSION_FORMATS:
        return load_diffusion_model(folder, "cpu")[0]
    return load_tokenizer(folder)


def save_model(model: Union[MAETok, AdaLNVelocityTransformer], directory: PathLike,
               relative_tokenizer: bool = True) -> Path:
    """A tokenizer or diffusion model (with its ``folder_extras``; ``relative_tokenizer``: see
    :func:`save_diffusion_model`) written to our folder format."""
    if isinstance(model, AdaLNVelocityTransformer):
        return save_diffusion_model(model, directory, relative_tokenizer=relative_tokenizer, **model.folder_extras)
    return save_tokenizer(model, directory)


def latent_scaling(tokenizer: MAETok) -> dict[str, float]:
    """The tokenizer's latent statistics in diffusers' convention, ``z = (latent - shift_factor) * scaling_factor``:
    ``shift_factor = latent_mean``, ``scaling_factor = 1 / latent_std``; ``1.0`` and ``0.0`` (the identity) when they
    were never measured."""
    if tokenizer.latent_mean is None or tokenizer.latent_std is None:
        return {"scaling_factor": 1.0, "shift_factor": 0.0}
    return {"scaling_factor": 1.0 / float(tokenizer.latent_std), "shift_factor": float(tokenizer.latent_mean)}


def diffusers_config(model: Union[MAETok, AdaLNVelocityTransformer]) -> tuple[str, dict[str, Any]]:
    """The diffusers component class of a model (``MAETokAutoencoder`` / ``MAETokTransformer`` of
    :mod:`maetok.integrations.diffusers`) and its config (the class's ``__init__`` arguments): a tokenizer's config
    with its :func:`latent_scaling`; a diffusion model's config with its ``folder_extras``' class names and latent
    normalisation (a diffusers transformer holds neither sampling settings nor a tokenizer: a pipeline does)."""
    if isinstance(model, AdaLNVelocityTransformer):
        extras = {**default_folder_extras(), **model.folder_extras}
        return "MAETokTransformer", {"diffusion_model": to_dict(model.config),
                                     "latent_shape": list(model.config.latent_shape), "num_classes": model.num_classes,
                                     "class_names": list(extras["class_names"]), "latent_norm": dict(extras["latent_norm"])}
    return "MAETokAutoencoder", {"tokenizer_config": model.config_dict(), **latent_scaling(model)}


def save_diffusers_folder(model: Union[MAETok, AdaLNVelocityTransformer], directory: PathLike) -> Path:
    """A model as the diffusers component folder its wrapper's ``save_pretrained`` writes (``config.json`` with
    ``_class_name`` and :func:`diffusers_config`, ``diffusion_pytorch_model.safetensors`` with the wrapper's key
    prefix), atomically; diffusers itself is not needed."""
    from importlib import metadata

    class_name, config = diffusers_config(model)
    prefix = DIFFUSERS_CLASSES[class_name][1]
    state = model.inference_state_dict() if isinstance(model, MAETok) else model.state_dict()
    try:
        version = {"_diffusers_version": metadata.version("diffusers")}
    except metadata.PackageNotFoundError:
        version = {}
    return save_model_folder(directory, None, {"_class_name": class_name, **version, **config},
                             {prefix + key: value for key, value in state.items()}, weights_name=DIFFUSERS_WEIGHTS)


def convert(source: PathLike, out: PathLike, to: str = "maetok") -> Path:
    """``maetok convert``: the model of ``source`` (a tokenizer or diffusion folder of any format, a run directory or
    a hub id) written to ``out`` in our format (``to="maetok"``) or as a diffusers component folder (``"diffusers"``,
    :func:`save_diffusers_folder`); the written folder is read back and must hold the same tensors."""
    if to not in CONVERT_FORMATS:
        raise ConfigError(f"convert writes {' or '.join(CONVERT_FORMATS)} folders, not {to!r}")
    folder = read_folder(source)
    out = Path(out)
    if out.exists() and out.resolve() == folder.directory.resolve():
        raise ModelFolderError(f"--out {out} is the source folder: write the converted model elsewhere")
    model = load_model(folder)
    (save_model if to == "maetok" else save_diffusers_folder)(model, out)
    if weights_fingerprint(load_model(out)) != weights_fingerprint(model):
        raise ModelFolderError(f"{out}: the converted model does not read back with the same weights")
    return out


def summarize(source: Union[PathLike, ModelFolder]) -> dict[str, Any]:
    """What ``maetok info --model`` prints of a tokenizer: format, parameter counts, latent shape and statistics."""
    folder = read_folder(source, "tokenizer")
    model = load_tokenizer(folder)
    cfg = model.config
    authors = folder.format == "authors-tokenizer"
    summary: dict[str, Any] = {
        "folder": str(folder.directory),
        "format": {"authors-tokenizer": "authors (their config.json + key names)",
                   "diffusers-tokenizer": "diffusers (a MAETokAutoencoder folder)"}.get(folder.format, "maetok"),
        "architecture": "released MAETok" if isinstance(model, ReleasedMAETok) else f"maetok ({cfg.variant})",
        "image_size": cfg.image_size,
        "channels": cfg.in_channels,
        "patch_size": cfg.patch_size,
        "latent_shape": [cfg.num_latent_tokens, cfg.latent_dim],
        "parameters": model.parameter_counts(),
    }
    if authors:
        summary["ignored_keys"] = [k for k in safetensors_shapes(folder.weights_path) if is_ignored_key(k)]
    summary["latent_statistics"] = None if model.latent_mean is None else {
        "mean": model.latent_mean, "std": model.latent_std, "kind": "scalar"}
    return summary


#: names under which a tokenizer's config may carry scalar latent statistics: ours (a released tokenizer's), the
#: authors' (their ModelArgs) and diffusers-style ones; the model card shows those present
LATENT_STATISTIC_NAMES = ("latent_mean", "latent_std", "vq_mean", "vq_std", "shift_factor", "scaling_factor")
#: how many class names a model card lists
CARD_NAMES_SHOWN = 20


def run_facts(directory: Optional[PathLike]) -> list[str]:
    """What the training run behind a model folder says of it, when ``directory`` is a run's ``model/``: the data it
    was trained on (the run's ``config.yaml``) and its steps (the last row of its ``log.csv``: a run always logs its
    last step). Empty when unknown."""
    if directory is None or Path(directory).name != MODEL_DIR:
        return []
    run_dir = run_directory(directory)
    facts = []
    try:
        raw = read_yaml_file(run_dir / "config.yaml") or {}
        data = raw.get("data") if isinstance(raw, dict) and isinstance(raw.get("data"), dict) else {}
        if isinstance(raw, dict) and raw.get("latents"):
            facts.append(f"trained on the latent cache `{raw['latents']}`")
        elif data.get("dataset"):
            facts.append(f"trained on `{data['dataset']}`")
    except (OSError, ConfigError):
        pass
    try:
        with open(run_dir / "log.csv", newline="") as log:
            rows = list(csv.DictReader(log))
        facts.append(f"{int(float(rows[-1]['step']))} training steps")
    except (OSError, LookupError, ValueError, TypeError):
        pass
    return facts


def _card_names(names: Sequence[str]) -> str:
    shown = ", ".join(str(name) for name in names[:CARD_NAMES_SHOWN])
    return shown + (f", ... ({len(names)} in all)" if len(names) > CARD_NAMES_SHOWN else "")


def _card_statistics(values: Mapping[str, Any]) -> str:
    """``mean 0.1, std 2`` for scalars; ``per channel (4 values)`` for lists."""
    return ", ".join(f"{name} {value:.6g}" if isinstance(value, (int, float)) else
                     f"{name} per channel ({len(value)} values)" for name, value in values.items())


def model_card(model: Union[MAETok, AdaLNVelocityTransformer], repo_id: str) -> str:
    """The ``README.md`` uploaded beside a model, written from the model's own config: for a tokenizer its images
    ``(B, C, H, W)``, latents and latent statistics; for a diffusion model its latents, classes and their names,
    latent normalisation, tokenizer and sampling defaults; and what the run behind it says (:func:`run_facts`)."""
    tags = "---\nlibrary_name: maetok\ntags:\n- maetok\n- pytorch_model_hub_mixin\n"
    facts = run_facts(getattr(model, "source_folder", None))
    if isinstance(model, AdaLNVelocityTransformer):
        cfg = model.config
        extras = {**default_folder_extras(), **getattr(model, "folder_extras", {})}
        names = list(extras["class_names"] or [])
        norm = extras["latent_norm"] or {}
        sampling = extras["sampling"] or {}
        tokenizer = tokenizer_reference(extras["tokenizer"], ".", relative=False)
        lines = [f"- latents: {cfg.num_latent_tokens} x {cfg.latent_dim} (tokens x channels), `(B, "
                 f"{cfg.num_latent_tokens}, {cfg.latent_dim})`",
                 f"- classes: {model.num_classes}" + (f" ({_card_names(names)})" if names else "")
                 if model.num_classes else "- unconditional (no classes)",
                 f"- latent normalisation undone after sampling: {norm.get('mode', 'none')}" +
                 (f" ({_card_statistics({'mean': norm['mean'], 'std': norm['std']})})"
                  if norm.get("mode", "none") != "none" and "mean" in norm and "std" in norm else ""),
                 f"- sampling defaults: {sampling.get('sampler')}, {sampling.get('steps')} steps, guidance "
                 f"{sampling.get('cfg_scale')} on t in [{sampling.get('guidance_low')}, {sampling.get('guidance_high')}]",
                 f"- tokenizer: `{tokenizer}`" if tokenizer else "- tokenizer: none named (pass one)"]
        flag = f" --tokenizer {tokenizer}" if tokenizer and is_hub_id(tokenizer) else " --tokenizer TOKENIZER"
        labels = f" --labels {shlex.quote(str(names[0]))}" if names else ""
        return (f"{tags}- diffusion\n---\n\n# {repo_id}\n\nA {cfg.arch} velocity model ({cfg.size_name}: width "
                f"{cfg.width}, depth {cfg.depth}, {cfg.num_heads} heads) generating MAETok latents, saved by maetok.\n\n"
                + "\n".join(lines + [f"- {fact}" for fact in facts]) + "\n\n"
                f"```bash\nmaetok sample --model {repo_id}{flag} --num 16{labels} --out samples\n```\n\n"
                f"```python\nfrom maetok.diffusion.generator import LatentGenerator\n\n"
                f"generator = LatentGenerator.load(\"{repo_id}\")\n```\n")
    cfg = model.config
    size = f"{cfg.in_channels}, {cfg.image_size}, {cfg.image_size}"
    statistics = {name: value for name in LATENT_STATISTIC_NAMES
                  for value in [getattr(model, name, None), model.config_dict().get(name)]
                  if isinstance(value, (int, float)) and not isinstance(value, bool)}
    lines = [f"- images: {cfg.in_channels} channel(s), {cfg.image_size} x {cfg.image_size} px in [-1, 1], "
             f"`(B, {size})`; patch {cfg.patch_size}",
             f"- latents: {cfg.num_latent_tokens} x {cfg.latent_dim} (tokens x channels), `(B, {cfg.num_latent_tokens}, "
             f"{cfg.latent_dim})`",
             f"- scalar latent statistics: {_card_statistics(statistics)}" if statistics else
             "- latent statistics: none in the folder (a latent cache measures them: `maetok cache-latents`)"]
    return (f"{tags}- image-tokenizer\n---\n\n# {repo_id}\n\nA MAETok tokenizer ({cfg.variant}"
            f"{', the released architecture' if isinstance(model, ReleasedMAETok) else ''}) saved by maetok.\n\n"
            + "\n".join(lines + [f"- {fact}" for fact in facts]) + "\n\n"
            f"```python\nfrom maetok import MAETok\n\ntokenizer = MAETok.from_pretrained(\"{repo_id}\")\n"
            f"latents = tokenizer.encode(images)  # images (B, {size}) in [-1, 1] -> (B, {cfg.num_latent_tokens}, "
            f"{cfg.latent_dim})\nimages = tokenizer.decode(latents)\n```\n")


def save_for_hub(model: Union[MAETok, AdaLNVelocityTransformer], directory: PathLike, repo_id: str) -> Path:
    """The folder :func:`push_to_hub` uploads: :func:`save_model`'s files plus a model card. A diffusion model's
    local tokenizer is stored as an absolute path (relative to a temporary upload folder it would mean nothing)."""
    directory = save_model(model, directory, relative_tokenizer=False)
    write_text(directory / "README.md", model_card(model, repo_id))
    return directory


def push_to_hub(model: Union[MAETok, AdaLNVelocityTransformer], repo_id: str, *, private: Optional[bool] = None,
                token: Optional[str] = None, commit_message: Optional[str] = None) -> str:
    """Upload the model's folder and a model card to the Hugging Face hub repository ``repo_id`` (created if
    needed); returns the commit URL. Needs the network and a token."""
    from huggingface_hub import HfApi

    kind = "diffusion model" if isinstance(model, AdaLNVelocityTransformer) else "tokenizer"
    with tempfile.TemporaryDirectory() as tmp:
        save_for_hub(model, tmp, repo_id)
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        return str(api.upload_folder(repo_id=repo_id, folder_path=tmp, repo_type="model",
                                     commit_message=commit_message or f"Upload maetok {kind}"))
