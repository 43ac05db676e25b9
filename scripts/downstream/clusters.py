"""Cluster explorer: what the unsupervised clusters of an SSL embedding are, not only how well they match labels.

For one feature set (the SSL embeddings of the labelled cases):

* k-means on the standardised features (as ``scripts.downstream.representation.kmeans_clusters``), k chosen by the silhouette in
  a range and, separately, the paper's k = 3 (the k of its RE/SE clustering);
* contingency tables clusters x labels and clusters x centres, each with ARI and NMI (a cluster that is one centre
  is a scanner signature, not a phenotype);
* a radiomic profile per cluster: the pyradiomics features whose cluster mean differs most from the other cases',
  ranked by the absolute effect size (Hedges' g, pooled sd, small-sample corrected);
* the most central cases of each cluster (closest to the centroid), whose mid-slices the report shows as a montage.

Plain numpy/sklearn functions returning JSON-ready dicts; ``scripts.downstream.report`` renders them.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score
from threadpoolctl import threadpool_limits

from scripts.downstream.representation import standardise_columns

logger = logging.getLogger(__name__)

PAPER_K = 3
DEFAULT_K_RANGE = (2, 8)


def _standardised(X: np.ndarray) -> np.ndarray:
    Z, _ = standardise_columns(X)
    if Z.shape[1] == 0:
        raise ValueError("every feature column is constant; nothing to cluster")
    return Z


def silhouette_by_k(X: np.ndarray, k_range: Sequence[int] = DEFAULT_K_RANGE, seed: int = 0) -> dict[int, float]:
    """``{k: mean silhouette}`` of k-means on the standardised features, for k in ``[k_range[0], k_range[1]]``
    (capped at n - 1 cases, where the silhouette is defined)."""
    Z = _standardised(X)
    lo, hi = int(k_range[0]), min(int(k_range[1]), Z.shape[0] - 1)
    if lo < 2 or hi < lo:
        raise ValueError(f"k range {list(k_range)} is empty for {Z.shape[0]} cases (need 2 <= k <= n - 1)")
    out = {}
    for k in range(lo, hi + 1):
        labels = _kmeans(Z, k, seed).labels_
        out[k] = float(silhouette_score(Z, labels)) if len(set(labels)) > 1 else -1.0
    return out


_FITS: dict = {}


def _kmeans(Z: np.ndarray, k: int, seed: int) -> KMeans:
    """k-means (10 restarts) of ``Z``; the last few fits are memoised so the explorer reuses the silhouette scan's.

    One BLAS/OpenMP thread: on cohorts of hundreds of cases the thread start-up dominates, and on a busy machine
    the OpenMP spin-waits made a 48-case explorer take 5 s instead of 0.8 s (measured, 2 loaded cores).
    """
    key = (Z.shape, hash(Z.tobytes()), int(k), int(seed))
    if key not in _FITS:
        if len(_FITS) > 16:
            _FITS.clear()
        with threadpool_limits(1):
            _FITS[key] = KMeans(n_clusters=int(k), n_init=10, random_state=seed).fit(Z)
    return _FITS[key]


def contingency(clusters: Sequence[int], values: Sequence) -> dict:
    """Counts of cases per (cluster, value), with ARI and NMI between the two partitions."""
    clusters = [int(c) for c in clusters]
    values = [str(v) for v in values]
    cols = sorted(set(values))
    table = {str(c): {v: 0 for v in cols} for c in sorted(set(clusters))}
    for c, v in zip(clusters, values):
        table[str(c)][v] += 1
    return {
        "columns": cols,
        "counts": table,
        "ari": float(adjusted_rand_score(values, clusters)),
        "nmi": float(normalized_mutual_info_score(values, clusters)),
    }


def hedges_g(a: np.ndarray, b: np.ndarray) -> float:
    """Standardised mean difference (a - b) with pooled sd and the small-sample correction; NaN when undefined."""
    na, nb = a.size, b.size
    if na < 2 or nb < 2:
        return math.nan
    pooled = math.sqrt(((na - 1) * a.var(ddof=1) + (nb - 1) * b.var(ddof=1)) / (na + nb - 2))
    if pooled <= 1e-12 * max(1.0, abs(float(a.mean())), abs(float(b.mean()))):
        return math.nan
    return float((a.mean() - b.mean()) / pooled * (1 - 3 / (4 * (na + nb) - 9)))


def radiomic_profile(
    clusters: Sequence[int], features: np.ndarray, columns: Sequence[str], top: int = 5
) -> dict[str, list[dict]]:
    """Per cluster, the ``top`` features that differ most from the other cases (largest |Hedges' g|)."""
    clusters = np.asarray(clusters)
    features = np.asarray(features, dtype=np.float64)
    out = {}
    for c in sorted(set(clusters.tolist())):
        inside = clusters == c
        rows = []
        for j, name in enumerate(columns):
            g = hedges_g(features[inside, j], features[~inside, j])
            if not math.isnan(g):
                rows.append(
                    {
                        "feature": str(name),
                        "g": g,
                        "mean_in": float(features[inside, j].mean()),
                        "mean_out": float(features[~inside, j].mean()),
                    }
                )
        rows.sort(key=lambda r: -abs(r["g"]))
        out[str(c)] = rows[:top]
    return out


def central_cases(Z: np.ndarray, clusters: np.ndarray, centroids: np.ndarray, ids: Sequence[str], n: int) -> dict:
    """Per cluster, the ids of the ``n`` cases closest to its centroid (in the standardised space), nearest first."""
    out = {}
    for c in sorted(set(clusters.tolist())):
        idx = np.flatnonzero(clusters == c)
        d = np.linalg.norm(Z[idx] - centroids[c], axis=1)
        out[str(c)] = [str(ids[i]) for i in idx[np.argsort(d, kind="stable")][:n]]
    return out


def explore(
    X: np.ndarray,
    ids: Sequence[str],
    labels: Sequence,
    k: int,
    *,
    centres: Sequence | None = None,
    radiomics: np.ndarray | None = None,
    radiomics_columns: Sequence[str] = (),
    seed: int = 0,
    n_central: int = 4,
    top_features: int = 5,
) -> dict:
    """One clustering of ``X`` (rows in ``ids`` order) into ``k`` clusters and everything the report shows of it."""
    Z = _standardised(X)
    if not 2 <= k < Z.shape[0]:
        raise ValueError(f"k = {k} clusters need 2 <= k < {Z.shape[0]} cases")
    km = _kmeans(Z, k, seed)
    clusters = km.labels_
    out = {
        "k": int(k),
        "clusters": clusters.tolist(),
        "sizes": {str(c): int((clusters == c).sum()) for c in range(int(k))},
        "silhouette": float(silhouette_score(Z, clusters)) if len(set(clusters.tolist())) > 1 else None,
        "labels": contingency(clusters, labels),
        "centres": contingency(clusters, centres) if centres is not None else None,
        "central_ids": central_cases(Z, clusters, km.cluster_centers_, ids, n_central),
        "profile": None,
    }
    if radiomics is not None and len(radiomics_columns):
        out["profile"] = radiomic_profile(clusters, radiomics, radiomics_columns, top_features)
    return out


def cluster_explorer(
    X: np.ndarray,
    ids: Sequence[str],
    labels: Sequence,
    *,
    centres: Sequence | None = None,
    radiomics: np.ndarray | None = None,
    radiomics_columns: Sequence[str] = (),
    k_range: Sequence[int] = DEFAULT_K_RANGE,
    extra_k: Sequence[int] = (PAPER_K,),
    seed: int = 0,
    n_central: int = 4,
    top_features: int = 5,
) -> dict:
    """``{"silhouette": {k: s}, "best_k", "runs": [explore(best k), explore(each extra k not already shown)]}``."""
    sil = silhouette_by_k(X, k_range, seed)
    best = max(sil, key=lambda k: (sil[k], -k))
    ks = [best] + [int(k) for k in extra_k if int(k) != best and 2 <= int(k) < len(ids)]
    kw = dict(
        centres=centres,
        radiomics=radiomics,
        radiomics_columns=radiomics_columns,
        seed=seed,
        n_central=n_central,
        top_features=top_features,
    )
    return {
        "silhouette": {str(k): v for k, v in sil.items()},
        "best_k": int(best),
        "runs": [explore(X, ids, labels, k, **kw) for k in ks],
    }


# ---------------------------------------------------------------------------------------------------------- montage
def mid_slice(item: Mapping, margin: int = 4) -> np.ndarray:
    """An axial slice through the lesion of one datalist case: the mask's centre slice of the first image channel,
    cropped to the mask's in-plane bounding box plus ``margin`` voxels (the whole slice when there is no mask).

    Reads with the bundle's own loader (``scripts.data.transforms.LoadCased``, RAS orientation), so what loads for
    training loads here; a read failure names the case.
    """
    from monai.transforms import Orientationd

    from scripts.data.transforms import LoadCased

    keys = ["image"] + (["mask"] if item.get("mask") else [])
    d = LoadCased(keys, image_only=True, ensure_channel_first=True)(dict(item))
    d = Orientationd(keys, axcodes="RAS")(d)
    img = np.asarray(d["image"][0], dtype=np.float32)
    if "mask" in d and np.asarray(d["mask"]).any():
        m = np.asarray(d["mask"][0]) > 0
        zs = np.flatnonzero(m.any(axis=(0, 1)))
        z = int((zs[0] + zs[-1]) // 2)
        xs, ys = np.flatnonzero(m[:, :, z].any(1)), np.flatnonzero(m[:, :, z].any(0))
        x0, x1 = max(0, xs[0] - margin), min(img.shape[0], xs[-1] + margin + 1)
        y0, y1 = max(0, ys[0] - margin), min(img.shape[1], ys[-1] + margin + 1)
        return img[x0:x1, y0:y1, z]
    return img[:, :, img.shape[2] // 2]


def datalist_items(path: str | os.PathLike, sections: Sequence[str] = ("training",)) -> dict[str, dict]:
    """``{id: item}`` of a datalist's sections with absolute paths (``scripts.data.datalist.load_datalist``).

    An empty or absent section (``"testing": []``, as the demo cohort writes) adds nothing; it is not an error, or
    the report would lose the centres and the montage of every cohort without test cases."""
    from scripts.data.datalist import load_datalist

    out = {}
    for section in sections:
        for item in load_datalist(str(path), section, allow_empty=True):
            out[str(item["id"])] = item
    return out


def montage_slices(items: Mapping[str, Mapping], ids: Sequence[str]) -> dict[str, np.ndarray]:
    """``{id: mid-slice}`` for the given cases; a case that cannot be read is logged and left blank, not fatal
    (the montage is an illustration; every number of the report comes from the feature tables)."""
    out = {}
    images = [items[i].get("image") for i in ids if i in items]
    paths = [q for im in images for q in (im if isinstance(im, (list, tuple)) else [im]) if q]
    if not any(os.path.exists(str(q)) for q in paths):
        logger.warning("cluster montage: none of the %d central cases has a readable image; no montage", len(ids))
        return out
    for case_id in ids:
        if case_id not in items:
            logger.warning("cluster montage: case %s is not in the datalist; its tile stays blank", case_id)
            continue
        try:
            out[case_id] = mid_slice(items[case_id])
        except Exception as e:  # noqa: BLE001 - reported, the tile stays blank
            logger.warning("cluster montage: case %s: %s: %s; its tile stays blank", case_id, type(e).__name__, e)
    return out
