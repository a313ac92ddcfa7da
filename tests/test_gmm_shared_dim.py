"""GMM NLL analysis of several latent spaces in one shared PCA dimension (MAETok App. B.3)."""

from __future__ import annotations

import numpy as np
import pytest

from maetok.eval.latents import gmm_nll_analysis, gmm_nll_compare, own_pca_dim, shared_pca_dim


def low_rank_latents(num: int, rank: int, seed: int, dim: int = 24) -> np.ndarray:
    """``(num, 4, dim // 4)`` latents of intrinsic dimension ``rank`` (isotropic within it) plus tiny noise."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(dim, dim)))[0][:, :rank]  # orthonormal columns
    x = rng.normal(size=(num, rank)) @ basis.T + 1e-3 * rng.normal(size=(num, dim))
    return x.reshape(num, 4, dim // 4)


@pytest.fixture(scope="module")
def two_sets() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    low, high = low_rank_latents(500, 3, 0), low_rank_latents(500, 12, 1)
    return {"low": (low[:400], low[400:]), "high": (high[:400], high[400:])}


def test_own_dims_differ_and_shared_is_the_largest(two_sets):
    own = {name: own_pca_dim(fit) for name, (fit, _) in two_sets.items()}
    assert own["low"] == 3 and 9 <= own["high"] <= 12
    assert shared_pca_dim([fit for fit, _ in two_sets.values()]) == own["high"]


def test_compare_fits_every_set_in_the_shared_dim(two_sets):
    result = gmm_nll_compare(two_sets, ks=(1, 2), progress=False)
    high = own_pca_dim(two_sets["high"][0])
    assert result["pca_dim"] == high and result["own_pca_dims"] == {"low": 3, "high": high}
    for name, gmm in result["models"].items():
        assert gmm["pca_dim"] == high and gmm["own_pca_dim"] == result["own_pca_dims"][name]
        assert gmm["explained_variance"] >= 0.9 and set(gmm["test_nll"]) == {1, 2}
    assert result["explained_variance_at_pca_dim"]["low"] > 0.999  # the low-rank set keeps all its variance
    # the old behaviour (each set in its own dimension) gives the low-rank set a different dimension
    assert gmm_nll_analysis(*two_sets["low"][:1], ks=(1,), test_latents=two_sets["low"][1],
                            progress=False)["pca_dim"] == 3 != high


def test_given_pca_dim_is_honoured_and_clipped(two_sets):
    result = gmm_nll_compare(two_sets, ks=(1,), pca_dim=5, progress=False)
    assert result["pca_dim"] == 5 and all(g["pca_dim"] == 5 for g in result["models"].values())
    assert result["models"]["low"]["own_pca_dim"] == 3 and "given" in result["pca_dim_source"]
    fit, test = two_sets["high"]
    clipped = gmm_nll_analysis(fit[:20], ks=(1,), test_latents=test, pca_dim=100, progress=False)
    assert clipped["pca_dim"] == 19 and clipped["pca_dim_requested"] == 100  # min(n_train - 1, L*H = 24)
    assert any("clipped" in note for note in clipped["notes"])
    with pytest.raises(ValueError, match="pca_dim must be >= 1"):
        gmm_nll_analysis(fit, ks=(1,), pca_dim=0, progress=False)
