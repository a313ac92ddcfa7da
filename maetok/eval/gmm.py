"""Latent-space mode analysis: GMM negative log-likelihood vs number of modes, and UMAP plots.

Protocol (MAETok paper App. B.3, ``docs/EVALUATION.md``): flatten the latents ``(N, L, H) -> (N, L*H)``, project
with PCA (fitted on the train part) onto one dimension shared by every latent space compared: the largest of their
>= 90% explained-variance dimensions (:func:`shared_pca_dim`, :func:`gmm_nll_compare`) or a given one, standardise
each component (train statistics), fit ``sklearn.mixture.GaussianMixture`` with full covariances for each
K, and report the mean per-sample NLL on the held-out part (and the train part). A latent space with fewer,
more separable modes reaches a low NLL with small K.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from maetok.eval.probe import train_test_split

__all__ = ["gmm_nll_analysis", "gmm_nll_compare", "own_pca_dim", "pca_project", "plot_gmm_curves", "plot_umap",
           "shared_pca_dim"]

ArrayLike = Union[torch.Tensor, np.ndarray]


def _flatten(latents: ArrayLike, name: str) -> np.ndarray:
    x = latents.detach().cpu().numpy() if isinstance(latents, torch.Tensor) else np.asarray(latents)
    if x.ndim < 2:
        raise ValueError(f"{name} must be (N, ...) with at least 2 dims, got shape {x.shape}")
    x = x.reshape(x.shape[0], -1).astype(np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or inf")
    return x


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
    x = _flatten(latents, "latents")
    pca = _PCAStandardizer(x, explained_variance, pca_dim)
    return pca(x), pca.dim, pca.explained


def own_pca_dim(latents: ArrayLike, explained_variance: float = 0.9) -> int:
    """The fewest PCA components of ``latents (N, ...)`` (flattened) explaining >= ``explained_variance``."""
    return _PCAStandardizer(_flatten(latents, "latents"), explained_variance).own_dim


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

    x = _flatten(latents, "latents")
    if test_latents is None:
        train_idx, test_idx = train_test_split(x.shape[0], test_fraction, seed)
        train, test = x[train_idx], x[test_idx]
    else:
        train, test = x, _flatten(test_latents, "test_latents")
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

    x = _flatten(latents, "latents")
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
