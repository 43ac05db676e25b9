"""What a feature set looks like without a classifier: k-means agreement with the labels and pairwise correlations.

The cluster-agreement view of the RE/SE clustering and the paper's Fig. 2 (density of pairwise feature correlations,
where a collapsed or redundant representation piles up near |r| = 1).
"""

from __future__ import annotations

import logging

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

logger = logging.getLogger(__name__)


def standardise_columns(X: np.ndarray) -> tuple[np.ndarray, int]:
    """Columns with non-zero spread, standardised; and how many constant columns were dropped."""
    X = np.asarray(X, dtype=np.float64)
    sd = X.std(axis=0)
    keep = sd > 1e-12 * np.maximum(1.0, np.abs(X.mean(axis=0)))
    Xk = X[:, keep]
    return (Xk - Xk.mean(axis=0)) / Xk.std(axis=0), int((~keep).sum())


def kmeans_clusters(X: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """k-means labels of standardised features (constant columns dropped), as in the RE/SE clustering view."""
    Z, _ = standardise_columns(X)
    if Z.shape[1] == 0:
        raise ValueError("every feature column is constant; nothing to cluster")
    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(Z)


def cluster_agreement(X: np.ndarray, y: np.ndarray, k: int | None = None, seed: int = 0) -> dict:
    """How well unsupervised k-means clusters of the features recover the labels: ARI and NMI (1 = identical)."""
    y = np.asarray(y)
    k = int(np.unique(y).size) if k is None else int(k)
    clusters = kmeans_clusters(X, k, seed)
    return {
        "ari": float(adjusted_rand_score(y, clusters)),
        "nmi": float(normalized_mutual_info_score(y, clusters)),
        "k": k,
        "clusters": clusters.tolist(),
    }


def pairwise_correlations(X: np.ndarray) -> tuple[np.ndarray, int]:
    """(upper-triangle Pearson correlations between non-constant features, number of constant columns dropped)."""
    Z, n_dropped = standardise_columns(X)
    if Z.shape[1] < 2:
        return np.empty(0), n_dropped
    r = (Z.T @ Z) / Z.shape[0]
    return np.clip(r[np.triu_indices(Z.shape[1], k=1)], -1.0, 1.0), n_dropped


def correlation_density(X: np.ndarray) -> np.ndarray:
    """Upper-triangle Pearson correlations between features (paper Fig. 2); constant columns are dropped."""
    r, n_dropped = pairwise_correlations(X)
    if n_dropped:
        logger.warning("correlation density: dropped %d constant feature columns", n_dropped)
    return r


def correlation_summary(X: np.ndarray, bins: int = 50) -> dict:
    """JSON-ready Fig.-2 data: histogram of pairwise correlations on [-1, 1] plus simple statistics."""
    r, n_dropped = pairwise_correlations(X)
    counts, edges = np.histogram(r, bins=bins, range=(-1.0, 1.0))
    return {
        "n_features": int(np.asarray(X).shape[1]),
        "n_constant_dropped": n_dropped,
        "n_pairs": int(r.size),
        "mean": float(r.mean()) if r.size else None,
        "mean_abs": float(np.abs(r).mean()) if r.size else None,
        "median_abs": float(np.median(np.abs(r))) if r.size else None,
        "hist_edges": edges.tolist(),
        "hist_counts": counts.tolist(),
    }
