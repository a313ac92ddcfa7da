"""What the latent space looks like: linear probing, GMM mode analysis and 2-D maps, and ``maetok analyze-latents``.

* **Linear probe** (MAE protocol): latents ``(N, L, H)`` (or any ``(N, ...)``) flattened to ``(N, L*H)``, then
  ``BatchNorm1d(D, affine=False, eps=1e-6) -> Linear(D, C)`` trained with AdamW (cosine schedule, mini-batches) or
  full-batch L-BFGS on the train split; top-1 accuracy on the held-out split. Deterministic given ``seed``.
* **GMM NLL vs K** (MAETok paper App. B.3, ``docs/EVALUATION.md``): flatten, project with PCA (fitted on the train
  part) onto one dimension shared by every latent space compared: the largest of their >= 90% explained-variance
  dimensions (:func:`shared_pca_dim`, :func:`gmm_nll_compare`) or a given one, standardise each component (train
  statistics), fit ``sklearn.mixture.GaussianMixture`` with full covariances for each K, and report the mean
  per-sample NLL on the held-out part (and the train part). A latent space with fewer, more separable modes reaches
  a low NLL with small K.
* **Maps**: UMAP (PCA-2D without umap-learn or with few points) coloured by class.
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from maetok.errors import ConfigError, DataError

__all__ = [
    "DEFAULT_GMM_KS",
    "LinearProbe",
    "analyze_latents",
    "flatten_latents",
    "gmm_nll_analysis",
    "gmm_nll_compare",
    "latent_analysis",
    "latent_map",
    "linear_probe",
    "own_pca_dim",
    "parse_named_models",
    "pca_project",
    "plot_gmm_curves",
    "plot_umap",
    "shared_pca_dim",
    "train_test_split",
]

PathLike = Union[str, Path]
ArrayLike = Union[Tensor, np.ndarray]
DEFAULT_GMM_KS = (1, 2, 5, 10, 20, 50)


def flatten_latents(latents: ArrayLike, name: str) -> np.ndarray:
    """Latents ``(N, ...)`` as float64 ``(N, D)``; ``name`` is used in the error for fewer than 2 dims or NaN / inf."""
    x = latents.detach().cpu().numpy() if isinstance(latents, torch.Tensor) else np.asarray(latents)
    if x.ndim < 2:
        raise ValueError(f"{name} must be (N, ...) with at least 2 dims, got shape {x.shape}")
    x = x.reshape(x.shape[0], -1).astype(np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or inf")
    return x


def _flatten_tensor(latents: ArrayLike, name: str) -> Tensor:
    """:func:`flatten_latents` as a float32 CPU tensor (exact: float32 -> float64 -> float32)."""
    return torch.from_numpy(flatten_latents(latents, name)).float()


# ---------------------------------------------------------------------------------------------------------
# Linear probe
# ---------------------------------------------------------------------------------------------------------


class LinearProbe(nn.Module):
    """``BatchNorm1d(dim, affine=False) -> Linear(dim, num_classes)``; input ``(B, dim)``, output logits ``(B, C)``."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(x))


def train_test_split(num: int, test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random disjoint index split ``(train_idx, test_idx)`` of ``range(num)``, deterministic given ``seed``."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    order = np.random.default_rng(seed).permutation(num)
    num_test = max(1, int(round(num * test_fraction)))
    if num_test >= num:
        raise ValueError(f"cannot split {num} samples with test_fraction={test_fraction}")
    return np.sort(order[num_test:]), np.sort(order[:num_test])


def _labels(labels: ArrayLike, num: int, name: str) -> Tensor:
    y = torch.as_tensor(labels).detach().cpu()
    if y.shape != (num,):
        raise ValueError(f"{name} must have shape ({num},), got {tuple(y.shape)}")
    if y.is_floating_point() and not bool((y == y.round()).all()):
        raise ValueError(f"{name} must hold integer class ids")
    y = y.long()
    if num and int(y.min()) < 0:
        raise ValueError(f"{name} has negative class ids")
    return y


@torch.no_grad()
def _accuracy(model: LinearProbe, x: Tensor, y: Tensor, batch_size: int = 4096) -> float:
    model.eval()
    correct = 0
    for i in range(0, x.shape[0], batch_size):
        correct += int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
    return correct / max(1, x.shape[0])


def linear_probe(
    train_latents: ArrayLike,
    train_labels: ArrayLike,
    test_latents: ArrayLike,
    test_labels: ArrayLike,
    num_classes: Optional[int] = None,
    optimizer: str = "adamw",
    epochs: int = 30,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Train a linear probe on flattened latents and return held-out top-1.

    train_latents ``(N_train, ...)``, test_latents ``(N_test, ...)`` (flattened to ``(N, D)``), labels integer
    ``(N,)``. ``optimizer``: ``"adamw"`` (mini-batches of ``batch_size``, cosine lr decay over ``epochs``) or
    ``"lbfgs"`` (full batch, ``epochs`` outer steps of up to 20 iterations). Returns ``top1`` and ``train_top1``
    as fractions in [0, 1] (x100 for the paper's percent), ``num_train``, ``num_test``, ``dim``, ``num_classes``.
    """
    x_train, x_test = _flatten_tensor(train_latents, "train_latents"), _flatten_tensor(test_latents, "test_latents")
    if x_train.shape[1] != x_test.shape[1]:
        raise ValueError(f"train and test latents flatten to different dims: {x_train.shape[1]} vs {x_test.shape[1]}")
    y_train = _labels(train_labels, x_train.shape[0], "train_labels")
    y_test = _labels(test_labels, x_test.shape[0], "test_labels")
    if x_train.shape[0] < 2:
        raise ValueError("linear_probe needs at least 2 training samples")
    if num_classes is None:
        num_classes = int(max(int(y_train.max()), int(y_test.max()) if len(y_test) else 0)) + 1
    if int(y_train.max()) >= num_classes or (len(y_test) and int(y_test.max()) >= num_classes):
        raise ValueError(f"labels exceed num_classes={num_classes}")

    generator = torch.Generator().manual_seed(seed)
    dim = x_train.shape[1]
    model = LinearProbe(dim, num_classes)
    with torch.no_grad():  # MAE: trunc_normal(std=0.01) weights, zero bias
        model.head.weight.copy_((torch.randn(num_classes, dim, generator=generator) * 0.01).clamp_(-0.02, 0.02))
        model.head.bias.zero_()

    if optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        steps_per_epoch = math.ceil(x_train.shape[0] / batch_size)
        total = epochs * steps_per_epoch
        step = 0
        for _ in tqdm(range(epochs), desc="linear probe", disable=not progress):
            model.train()
            order = torch.randperm(x_train.shape[0], generator=generator)
            for i in range(0, x_train.shape[0], batch_size):
                idx = order[i : i + batch_size]
                if idx.numel() < 2:  # BatchNorm needs 2+ samples
                    continue
                for group in opt.param_groups:
                    group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / total))
                loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
    elif optimizer == "lbfgs":
        # Full batch: the non-affine BatchNorm is the standardisation with the whole train split's statistics.
        with torch.no_grad():
            model.norm.running_mean.copy_(x_train.mean(0))
            model.norm.running_var.copy_(x_train.var(0, unbiased=True))
        opt = torch.optim.LBFGS(model.head.parameters(), lr=1.0, max_iter=20, line_search_fn="strong_wolfe")
        x_norm = model.norm.eval()(x_train).detach()

        def closure() -> Tensor:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model.head(x_norm), y_train)
            if weight_decay:
                loss = loss + 0.5 * weight_decay * model.head.weight.pow(2).sum()
            loss.backward()
            return loss

        for _ in tqdm(range(epochs), desc="linear probe (lbfgs)", disable=not progress):
            opt.step(closure)
    else:
        raise ValueError(f"optimizer must be 'adamw' or 'lbfgs', got {optimizer!r}")

    return {
        "top1": _accuracy(model, x_test, y_test),
        "train_top1": _accuracy(model, x_train, y_train),
        "num_train": int(x_train.shape[0]),
        "num_test": int(x_test.shape[0]),
        "dim": int(dim),
        "num_classes": int(num_classes),
    }


# ---------------------------------------------------------------------------------------------------------
# GMM mode analysis and maps
# ---------------------------------------------------------------------------------------------------------


class _PCAStandardizer:
    """PCA fitted on ``train (N, D)``, then per-component standardisation.

    ``own_dim``: the fewest components explaining >= ``explained_variance``; the projection keeps ``dim``
    components: ``own_dim``, or ``dim`` when given, clipped to ``max_dim = min(N - 1, D)`` (the rank of the
    centred train latents: more components have zero variance). ``explained``: variance fraction at ``dim``.
    """

    def __init__(self, train: np.ndarray, explained_variance: float, dim: Optional[int] = None) -> None:
        if not 0.0 < explained_variance <= 1.0:
            raise ValueError(f"explained_variance must be in (0, 1], got {explained_variance}")
        if dim is not None and dim < 1:
            raise ValueError(f"pca_dim must be >= 1, got {dim}")
        self.mean = train.mean(0)
        centred = train - self.mean
        cov = centred.T @ centred / max(1, train.shape[0] - 1)
        eigenvalues, eigenvectors = np.linalg.eigh(cov)
        order = np.argsort(eigenvalues)[::-1]
        eigenvalues = np.clip(eigenvalues[order], 0.0, None)
        eigenvectors = eigenvectors[:, order]
        # Deterministic sign: largest-magnitude loading of each component is positive.
        signs = np.sign(eigenvectors[np.abs(eigenvectors).argmax(0), np.arange(eigenvectors.shape[1])])
        eigenvectors = eigenvectors * np.where(signs == 0, 1.0, signs)
        total = eigenvalues.sum()
        if total <= 0:
            raise ValueError("latents have zero variance; nothing to analyse")
        ratio = np.cumsum(eigenvalues) / total
        self.own_dim = int(min(np.searchsorted(ratio, explained_variance - 1e-12) + 1, len(ratio)))
        self.max_dim = int(max(1, min(train.shape[0] - 1, train.shape[1])))
        self.requested_dim = dim
        self.dim = min(self.own_dim if dim is None else int(dim), self.max_dim)
        self.explained = float(ratio[self.dim - 1])
        self.components = eigenvectors[:, : self.dim]
        projected = centred @ self.components
        self.scale = projected.std(0)
        self.scale[self.scale == 0] = 1.0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) @ self.components / self.scale


def pca_project(latents: ArrayLike, explained_variance: float = 0.9,
                pca_dim: Optional[int] = None) -> tuple[np.ndarray, int, float]:
    """Flatten, PCA to >= ``explained_variance`` (or to ``pca_dim`` components), standardise.
    Returns ``(projected (N, d), d, explained variance fraction at d)``."""
    x = flatten_latents(latents, "latents")
    pca = _PCAStandardizer(x, explained_variance, pca_dim)
    return pca(x), pca.dim, pca.explained


def own_pca_dim(latents: ArrayLike, explained_variance: float = 0.9) -> int:
    """The fewest PCA components of ``latents (N, ...)`` (flattened) explaining >= ``explained_variance``."""
    return _PCAStandardizer(flatten_latents(latents, "latents"), explained_variance).own_dim


def shared_pca_dim(latent_sets: Iterable[ArrayLike], explained_variance: float = 0.9) -> int:
    """One PCA dimension for comparing several latent spaces (MAETok App. B.3): the largest of their
    ``explained_variance`` dimensions, so each keeps at least that fraction. latent_sets: ``(N_i, ...)`` arrays
    (the latents each GMM's PCA is fitted on)."""
    dims = [own_pca_dim(latents, explained_variance) for latents in latent_sets]
    if not dims:
        raise ValueError("shared_pca_dim: no latent sets given")
    return max(dims)


def gmm_nll_analysis(
    latents: ArrayLike,
    ks: Iterable[int] = (1, 2, 4, 8, 16, 32),
    test_latents: Optional[ArrayLike] = None,
    test_fraction: float = 0.2,
    explained_variance: float = 0.9,
    seed: int = 0,
    max_iter: int = 200,
    n_init: int = 1,
    reg_covar: float = 1e-6,
    progress: bool = True,
    pca_dim: Optional[int] = None,
) -> dict[str, Any]:
    """GMM NLL vs number of components K.

    The paper sweeps K over about 5..200; full-covariance EM costs ``O(N K d^2)`` per iteration (n=20k,
    d=56: K=32 takes ~25 s on 2 cores), so pass the ``ks`` you can afford.
    latents ``(N, L, H)`` or ``(N, D)``; held-out data is ``test_latents`` or a random ``test_fraction`` of
    ``latents`` (split with ``seed``). PCA keeps the components explaining >= ``explained_variance`` or,
    when given, exactly ``pca_dim`` components (use one ``pca_dim`` for every latent space compared, e.g.
    :func:`shared_pca_dim`: NLLs in different dimensions are not comparable); ``pca_dim`` is clipped to
    ``min(num_train - 1, D)`` with a note. Returns a dict: ``ks``, ``test_nll {K: mean NLL per sample}``,
    ``train_nll {K: ...}``, ``test_nll_per_dim``, ``converged {K: bool}``, ``fit_seconds``, ``pca_dim`` (used),
    ``own_pca_dim`` (this set's ``explained_variance`` dimension), ``explained_variance`` (fraction at
    ``pca_dim``), ``explained_variance_threshold``, ``pca_dim_requested``, ``num_train``, ``num_test`` and
    ``notes``. NLLs are in nats in the standardised PCA space.
    """
    from sklearn.mixture import GaussianMixture

    x = flatten_latents(latents, "latents")
    if test_latents is None:
        train_idx, test_idx = train_test_split(x.shape[0], test_fraction, seed)
        train, test = x[train_idx], x[test_idx]
    else:
        train, test = x, flatten_latents(test_latents, "test_latents")
        if test.shape[1] != train.shape[1]:
            raise ValueError(f"latents and test_latents flatten to different dims: {train.shape[1]} vs {test.shape[1]}")
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    if max(ks) > train.shape[0]:
        raise ValueError(f"K={max(ks)} exceeds the {train.shape[0]} training samples")
    pca = _PCAStandardizer(train, explained_variance, pca_dim)
    train_z, test_z = pca(train), pca(test)
    notes = []
    if pca_dim is not None and pca.dim < pca_dim:
        notes.append(f"pca_dim {pca_dim} clipped to {pca.dim} = min(num_train - 1, L*H) = min({train.shape[0] - 1}, "
                     f"{train.shape[1]}): more components have zero variance in the train latents")
    result: dict[str, Any] = {
        "ks": ks,
        "train_nll": {},
        "test_nll": {},
        "test_nll_per_dim": {},
        "converged": {},
        "fit_seconds": {},
        "pca_dim": pca.dim,
        "own_pca_dim": pca.own_dim,
        "explained_variance": pca.explained,
        "explained_variance_threshold": explained_variance,
        "pca_dim_requested": pca_dim,
        "num_train": int(train.shape[0]),
        "num_test": int(test.shape[0]),
        "notes": notes,
    }
    for k in tqdm(ks, desc="GMM", disable=not progress):
        start = time.perf_counter()
        gmm = GaussianMixture(n_components=k, covariance_type="full", max_iter=max_iter, n_init=n_init,
                              reg_covar=reg_covar, random_state=seed)
        gmm.fit(train_z)
        result["fit_seconds"][k] = time.perf_counter() - start
        result["converged"][k] = bool(gmm.converged_)
        result["train_nll"][k] = float(-gmm.score(train_z))
        result["test_nll"][k] = float(-gmm.score(test_z))
        result["test_nll_per_dim"][k] = result["test_nll"][k] / pca.dim
    return result


def gmm_nll_compare(
    latent_sets: Mapping[str, tuple[ArrayLike, ArrayLike]],
    ks: Iterable[int],
    pca_dim: Optional[int] = None,
    explained_variance: float = 0.9,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """:func:`gmm_nll_analysis` of several latent spaces in ONE PCA dimension, so their NLLs compare.

    latent_sets: ``{name: (fit latents (N_i, ...), held-out latents (M_i, ...))}``. The dimension is
    ``pca_dim`` when given, else :func:`shared_pca_dim` of the fit latents (the largest of their
    ``explained_variance`` dimensions). K values above a set's fit size are dropped for that set.
    Returns ``{"pca_dim", "pca_dim_source", "own_pca_dims" {name: d_i}, "explained_variance_at_pca_dim"
    {name: fraction}, "models" {name: gmm_nll_analysis dict}}``.
    """
    ks = [int(k) for k in ks]
    own = {name: own_pca_dim(fit, explained_variance) for name, (fit, _) in latent_sets.items()}
    if not own:
        raise ValueError("gmm_nll_compare: no latent sets given")
    dim = int(pca_dim) if pca_dim is not None else max(own.values())
    source = (f"given (pca_dim={pca_dim})" if pca_dim is not None else
              f"the largest of the models' >= {explained_variance:.0%} explained-variance dimensions")
    models = {}
    for name, (fit, test) in latent_sets.items():
        usable = [k for k in ks if k <= len(fit)]
        models[name] = gmm_nll_analysis(fit, usable, test_latents=test, explained_variance=explained_variance,
                                        seed=seed, progress=progress, pca_dim=dim)
    return {
        "pca_dim": dim,
        "pca_dim_source": source,
        "own_pca_dims": own,
        "explained_variance_at_pca_dim": {name: r["explained_variance"] for name, r in models.items()},
        "models": models,
    }


def plot_gmm_curves(results: Mapping[str, Mapping], path: Union[str, Path], title: str = "GMM held-out NLL",
                    ylabel: str = "held-out NLL per sample (nats)") -> Path:
    """Plot NLL vs K for several tokenizers on one axes and save a PNG.

    results: ``{name: {K: nll}}`` or ``{name: gmm_nll_analysis(...)}`` (its ``test_nll`` is used; then the
    legend gives each model's own 90% dimension and the variance it keeps at the PCA dimension, and the
    title the PCA dimension when all share one).
    """
    from matplotlib.figure import Figure  # Agg canvas, no pyplot state or backend switch

    if not results:
        raise ValueError("plot_gmm_curves: results is empty")
    fig = Figure(figsize=(5.5, 4.0))
    ax = fig.subplots()
    dims = {r.get("pca_dim") for r in results.values()}
    for name, curve in results.items():
        label = str(name)
        if "test_nll" in curve:
            if "own_pca_dim" in curve:
                kept = curve.get("explained_variance")
                label += (f" (own {curve.get('explained_variance_threshold', 0.9):.0%} dim {curve['own_pca_dim']}"
                          + (f", {kept:.0%} var. at d={curve['pca_dim']})" if kept is not None else ")"))
            curve = curve["test_nll"]
        points = sorted((int(k), float(v)) for k, v in curve.items())
        ax.plot([k for k, _ in points], [v for _, v in points], marker="o", label=label)
    if len(dims) == 1 and None not in dims:
        title = f"{title}, PCA dim {dims.pop()}"
    ax.set_xscale("log", base=2)
    ax.set_xlabel("number of GMM components K")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    return path


MIN_UMAP_POINTS = 16  # below this UMAP's spectral initialisation fails; such plots use PCA


def plot_umap(latents: ArrayLike, labels: Optional[ArrayLike], path: Union[str, Path], title: str = "latents",
              fallback_to_pca: bool = False, seed: int = 0, max_points: Optional[int] = 20000,
              n_neighbors: int = 15, min_dist: float = 0.1) -> str:
    """2-D UMAP of flattened latents coloured by class, saved as PNG; returns the method drawn ("UMAP" or
    "PCA-2D (why)", also in the plot title).

    Needs ``umap-learn`` (``pip install umap-learn``); without it raises ImportError, or with
    ``fallback_to_pca=True`` draws the first two PCA components and says so in the title (as it does for fewer
    than ``MIN_UMAP_POINTS`` points, where UMAP cannot run).
    latents ``(N, ...)``, labels ``(N,)`` integer or ``None``; at most ``max_points`` random points are drawn.
    """
    from matplotlib.figure import Figure

    x = flatten_latents(latents, "latents")
    y = None
    if labels is not None:
        y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        if y.shape != (x.shape[0],):
            raise ValueError(f"labels must have shape ({x.shape[0]},), got {y.shape}")
    if max_points is not None and x.shape[0] > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(x.shape[0], max_points, replace=False))
        x = x[keep]
        y = y[keep] if y is not None else None
    try:
        import umap  # noqa: F401  (optional dependency)
    except ImportError as error:
        if not fallback_to_pca:
            raise ImportError(
                "plot_umap needs umap-learn: `pip install umap-learn` (extra `maetok[umap]`), "
                "or call plot_umap(..., fallback_to_pca=True) for a PCA-2D plot"
            ) from error
        umap = None
    if umap is not None and x.shape[0] >= MIN_UMAP_POINTS:
        neighbours = min(n_neighbors, x.shape[0] - 1)  # UMAP needs fewer neighbours than points
        reducer = umap.UMAP(n_neighbors=neighbours, min_dist=min_dist, random_state=seed)
        with warnings.catch_warnings():  # seeded UMAP says it runs single-threaded; fine
            warnings.filterwarnings("ignore", message=".*n_jobs.*")
            embedding = reducer.fit_transform(x)
        method = "UMAP"
    else:
        centred = x - x.mean(0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        embedding = centred @ vt[:2].T
        if embedding.shape[1] < 2:  # a single point or a single latent dimension
            embedding = np.pad(embedding, ((0, 0), (0, 2 - embedding.shape[1])))
        reason = "umap-learn not installed" if umap is None else f"{x.shape[0]} points, UMAP needs {MIN_UMAP_POINTS}"
        method = f"PCA-2D ({reason})"
    fig = Figure(figsize=(5.5, 5.0))
    ax = fig.subplots()
    scatter = ax.scatter(embedding[:, 0], embedding[:, 1], c=y if y is not None else "tab:blue", s=2,
                         cmap="tab10" if y is not None else None, alpha=0.7, linewidths=0)
    if y is not None and len(np.unique(y)) <= 20:
        ax.legend(*scatter.legend_elements(), title="class", fontsize=7, markerscale=0.8, loc="best")
    ax.set_title(f"{title}: {method}")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    return method


# ---------------------------------------------------------------------------------------------------------
# The analysis of one or several tokenizers (analyze-latents)
# ---------------------------------------------------------------------------------------------------------


def parse_named_models(specs: Sequence[str]) -> dict[str, str]:
    """``["maetok=runs/m/tokenizer", "runs/ae"]`` -> ``{"maetok": ..., "ae": ...}``. Without ``NAME=``, the
    name is the last path component that is not ``model`` / ``tokenizer`` / ``stage1``."""
    named: dict[str, str] = {}
    for spec in specs:
        if "=" in spec and not Path(spec).exists():
            name, path = spec.split("=", 1)
        else:
            path = spec
            parts = [p for p in Path(spec).resolve().parts if p not in ("model", "tokenizer", "stage1", "/")]
            name = parts[-1] if parts else spec
        if not name:
            raise ConfigError(f"--model {spec!r}: empty name before '='")
        if name in named:
            raise ConfigError(f"two --model entries are named {name!r}: give them names with NAME=DIR")
        named[name] = path
    if not named:
        raise ConfigError("give at least one --model")
    return named


def latent_analysis(
    train_latents: Tensor,
    train_labels: Tensor,
    test_latents: Tensor,
    test_labels: Tensor,
    ks: Sequence[int] = DEFAULT_GMM_KS,
    gmm_train: Optional[int] = None,
    probe_optimizer: str = "adamw",
    probe_epochs: int = 30,
    seed: int = 0,
    progress: bool = True,
    pca_dim: Optional[int] = None,
    gmm: bool = True,
) -> dict[str, Any]:
    """Linear probe (train on ``train_*``, top-1 on the held-out ``test_*``) and GMM held-out NLL vs K
    (PCA and standardisation fitted on the first ``gmm_train`` train latents; ``pca_dim`` components, default
    this tokenizer's own >= 90% variance dimension: pass the shared one when comparing tokenizers, see
    :func:`gmm_nll_compare`).

    latents ``(N, D)`` (or ``(N, L, H)``), labels ``(N,)``. Returns ``{"linear_probe": {...}, "gmm": {...}}``
    with the dicts of :func:`linear_probe` and :func:`gmm_nll_analysis`
    (no ``"gmm"`` when ``gmm`` is False).
    """
    num_classes = int(max(int(train_labels.max()), int(test_labels.max()))) + 1
    probe = linear_probe(train_latents, train_labels, test_latents, test_labels, num_classes=num_classes,
                         optimizer=probe_optimizer, epochs=probe_epochs, seed=seed, progress=progress)
    if not gmm:
        return {"linear_probe": probe}
    gmm_fit = train_latents if gmm_train is None else train_latents[:gmm_train]
    ks = [k for k in ks if k <= len(gmm_fit)]
    result = gmm_nll_analysis(gmm_fit, ks, test_latents=test_latents, seed=seed, progress=progress, pca_dim=pca_dim)
    return {"linear_probe": probe, "gmm": result}


def latent_map(latents: Tensor, labels: Tensor, path: PathLike, title: str, seed: int = 0,
               max_points: int = 5000) -> str:
    """A 2-D map of ``latents`` coloured by ``labels`` saved to ``path``: UMAP when umap-learn is installed and
    there are enough points, else PCA-2D (the plot title and the returned method name say which)."""
    return plot_umap(latents, labels, path, title=title, fallback_to_pca=True, seed=seed, max_points=max_points)


def analyze_latents(
    models: Union[Mapping[str, PathLike], Sequence[str]],
    data: str,
    out: PathLike,
    num_train: Optional[int] = 10000,
    num_test: Optional[int] = 2000,
    ks: Sequence[int] = DEFAULT_GMM_KS,
    gmm_train: Optional[int] = 5000,
    probe_optimizer: str = "adamw",
    probe_epochs: int = 30,
    umap: bool = True,
    batch_size: int = 256,
    device: Optional[str] = None,
    seed: int = 0,
    progress: bool = True,
    pca_dim: Optional[int] = None,
) -> dict[str, Any]:
    """``maetok analyze-latents``: per tokenizer, encode ``num_train`` train and ``num_test`` held-out test
    images (seeded random subsets) of ``data``, then linear-probe accuracy, GMM held-out NLL vs K and a
    UMAP (or PCA-2D) map coloured by class. The GMMs of all tokenizers are fitted in ONE PCA dimension:
    ``pca_dim``, or by default the largest of the tokenizers' >= 90% explained-variance dimensions (recorded
    in ``gmm_pca`` with each one's own dimension and the variance it keeps). Writes
    ``out/latent_analysis.json``, ``out/gmm_nll.png`` (the NLL-vs-K curves of all tokenizers on one axes) and
    ``out/latent_map_<name>.png``; returns the JSON dict.

    models: ``{name: tokenizer dir}`` or a list of ``NAME=DIR`` / ``DIR`` strings.
    """
    from maetok.data import DatasetSubset, build_dataset, note_channel_conversion, subset_indices
    from maetok.encode import encode_dataset, load_tokenizer
    from maetok.runs import model_directory, write_json

    named = dict(models) if isinstance(models, Mapping) else parse_named_models(list(models))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    gmm_sets: dict[str, tuple[Tensor, Tensor]] = {}  # name -> (GMM fit latents, held-out latents)
    for name, path in named.items():
        tokenizer = load_tokenizer(path, device)
        cfg = tokenizer.config
        train = build_dataset(data, "train", cfg.image_size, cfg.in_channels)
        test = build_dataset(data, "test", cfg.image_size, cfg.in_channels)
        note_channel_conversion(data, cfg.in_channels)
        if not getattr(train, "num_classes", 0):
            raise DataError(f"{data} has no class labels: linear probing and class-coloured maps need classes")
        train_sub = DatasetSubset(train, subset_indices(len(train), num_train, seed))
        test_sub = DatasetSubset(test, subset_indices(len(test), num_test, seed))
        train_z, train_y = encode_dataset(tokenizer, train_sub, batch_size, progress, f"encode {name} train")
        test_z, test_y = encode_dataset(tokenizer, test_sub, batch_size, progress, f"encode {name} test")
        analysis = latent_analysis(train_z, train_y, test_z, test_y, probe_optimizer=probe_optimizer,
                                   probe_epochs=probe_epochs, seed=seed, progress=progress, gmm=False)
        gmm_sets[name] = (train_z if gmm_train is None else train_z[:gmm_train], test_z)
        entry: dict[str, Any] = {
            "model": str(model_directory(path)),
            "latent_shape": [cfg.num_latent_tokens, cfg.latent_dim],
            "num_train": len(train_z),
            "num_test": len(test_z),
            **analysis,
            "linear_probe_top1": analysis["linear_probe"]["top1"],
        }
        if umap:
            map_path = out / f"latent_map_{_slug(name)}.png"
            entry["latent_map_method"] = latent_map(test_z, test_y, map_path, f"{name} latents ({data} test)", seed)
            entry["latent_map"] = map_path.name
        results[name] = entry
    compared = gmm_nll_compare(gmm_sets, ks, pca_dim=pca_dim, seed=seed, progress=progress)
    for name, gmm in compared.pop("models").items():
        results[name]["gmm"] = gmm
    gmm_plot = plot_gmm_curves({name: r["gmm"] for name, r in results.items()}, out / "gmm_nll.png",
                               title=f"GMM held-out NLL vs K ({data})")
    report = {
        "data": data,
        "protocol": {
            "linear_probe": f"BatchNorm(affine=False) + linear on flattened latents, {probe_optimizer}, "
                            f"{probe_epochs} epochs; top-1 on the held-out test split",
            "gmm": f"flatten, PCA to {compared['pca_dim']} dims for every model ({compared['pca_dim_source']}), "
                   "standardise (fitted on train latents), full-covariance GaussianMixture per K; mean held-out "
                   "NLL per sample (nats), comparable across models (same dimension)",
            "seed": seed,
        },
        "gmm_pca": compared,
        "models": results,
        "plots": {"gmm_nll": gmm_plot.name, **{f"latent_map_{n}": r["latent_map"] for n, r in results.items()
                                                if "latent_map" in r}},
    }
    notes = [note for name, r in results.items() for note in (f"{name}: {n}" for n in r["gmm"]["notes"])]
    if any("umap-learn not installed" in r.get("latent_map_method", "") for r in results.values()):
        notes.append("umap-learn is not installed: the latent maps are PCA-2D (pip install umap-learn)")
    if notes:
        report["notes"] = notes
    write_json(out / "latent_analysis.json", report)
    return report


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
