"""Label-free terms added to the 3DSiam loss to keep what radiomics misses (beyond the paper; off by default).

A pretrained 3DSiam encoder collapses to a few directions and those directions are what pyradiomics already
measures (lesion size, intensity): on two cohorts its features added nothing to radiomics (docs/learning.md,
"Complementarity"). These terms act on the encoder outputs ``z1``, ``z2`` of a step (the 256-d features the
downstream protocol reads) and leave the SimSiam term as it is:

* ``covariance`` — VICReg's covariance term (Bardes et al., ICLR 2022): the squared off-diagonal covariances of the
  batch's features, divided by the dimension, so that features stop repeating one another (dimensional collapse);
* ``variance`` — VICReg's variance hinge: ``mean(relu(1 - std))`` per feature over the batch (inactive under the
  default output BN, which makes every feature's batch std 1; it matters with ``out_bn: false``);
* ``radiomics`` — radiomics orthogonality: the mean squared correlation, over the batch, between each feature and
  each whitened principal component of the cases' own pyradiomics vectors. A case's radiomics is not a label (it is
  computed from the image and mask the encoder sees), so the term stays self-supervised; it pushes the encoder to
  encode what a linear model of the 107 features does not.

Batch statistics at the paper's batch of 6 are noisy (a correlation of unrelated variables over 6 samples has
E[r²] = 0.2), so these terms have a floor; their gradients still point, on average, towards decorrelation.

Plain PyTorch: ``make_regularizer`` builds a callable ``(z1, z2, ids) -> (term, parts)`` from weights and, for the
radiomics term, a table read once (``radiomics_components``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

logger = logging.getLogger(__name__)

EPS = 1e-4


def covariance_penalty(z: torch.Tensor) -> torch.Tensor:
    """VICReg's covariance term of a [B, D] batch: sum of squared off-diagonal covariances / D."""
    b, d = z.shape
    zc = z - z.mean(0, keepdim=True)
    cov = zc.T @ zc / max(b - 1, 1)
    off = cov - torch.diag(torch.diagonal(cov))
    return (off**2).sum() / d


def variance_penalty(z: torch.Tensor, target: float = 1.0) -> torch.Tensor:
    """VICReg's variance hinge of a [B, D] batch: mean over features of relu(target - std)."""
    std = torch.sqrt(z.var(0) + EPS)
    return torch.relu(target - std).mean()


def _standardise_rows(x: torch.Tensor) -> torch.Tensor:
    """Each column centred and scaled over the batch (a constant column stays 0)."""
    xc = x - x.mean(0, keepdim=True)
    return xc / torch.sqrt((xc**2).mean(0, keepdim=True) + EPS)


def cross_correlation_penalty(z: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Mean squared batch correlation between every column of ``z`` [B, D] and every column of ``r`` [B, K]."""
    if z.shape[0] != r.shape[0]:
        raise ValueError(f"{z.shape[0]} embeddings but {r.shape[0]} radiomics rows")
    c = _standardise_rows(z).T @ _standardise_rows(r.to(z.dtype)) / z.shape[0]
    return (c**2).mean()


def radiomics_components(
    table: Mapping[str, Sequence[float]], variance: float = 0.99, max_components: int = 32
) -> dict[str, np.ndarray]:
    """``{case id: whitened principal components}`` of the standardised radiomics vectors of a cohort.

    Radiomics features repeat one another (a dozen shape features all measure size); whitened components count
    each independent direction once (whitened, a direction repeated by ten features weighs what a single feature
    does). Keeps the fewest components that explain ``variance`` of the standardised features (99 %: a direction
    that one feature alone carries is kept), at most ``max_components``; constant features are dropped first."""
    ids = [str(i) for i in table]
    x = np.asarray([table[i] for i in table], dtype=np.float64)
    if x.ndim != 2 or len(ids) < 3:
        raise ValueError(f"radiomics orthogonality needs a table of at least 3 cases, got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("the radiomics table for the orthogonality term holds NaN/inf values")
    x = x[:, np.ptp(x, axis=0) > 0]
    x = (x - x.mean(0)) / x.std(0)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    share = np.cumsum(s**2) / (s**2).sum()
    k = int(min(max_components, np.searchsorted(share, variance) + 1, len(s)))
    pcs = u[:, :k] * np.sqrt(len(ids))  # unit variance per component over the cohort
    return {i: pcs[n].astype(np.float32) for n, i in enumerate(ids)}


@dataclass
class Regularizer:
    """The weighted sum of the terms over both views; ``parts`` are the unweighted terms, for the training log."""

    covariance: float = 0.0
    variance: float = 0.0
    radiomics: float = 0.0
    components: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("covariance", "variance", "radiomics"):
            value = float(getattr(self, name))
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"regularizer#{name} must be a finite weight >= 0, got {getattr(self, name)!r}")
            setattr(self, name, value)
        if self.radiomics > 0 and not self.components:
            raise ValueError(
                "regularizer#radiomics > 0 needs the cohort's radiomics table (regularizer#radiomics_table)"
            )

    @property
    def active(self) -> bool:
        return self.covariance > 0 or self.variance > 0 or self.radiomics > 0

    def radiomics_rows(self, ids: Sequence[str], device) -> torch.Tensor:
        missing = [str(i) for i in ids if str(i) not in self.components]
        if missing:
            raise KeyError(
                f"the radiomics table has no row for case(s) {missing[:5]}: extract radiomics for every case"
            )
        return torch.as_tensor(np.stack([self.components[str(i)] for i in ids]), device=device)

    def __call__(
        self, z1: torch.Tensor, z2: torch.Tensor, ids: Sequence[str] = ()
    ) -> tuple[torch.Tensor, dict[str, float]]:
        z1, z2 = z1.float(), z2.float()
        total = z1.new_zeros(())
        parts: dict[str, float] = {}
        if self.covariance > 0:
            term = (covariance_penalty(z1) + covariance_penalty(z2)) / 2
            total, parts["covariance"] = total + self.covariance * term, float(term.detach())
        if self.variance > 0:
            term = (variance_penalty(z1) + variance_penalty(z2)) / 2
            total, parts["variance"] = total + self.variance * term, float(term.detach())
        if self.radiomics > 0:
            r = self.radiomics_rows(ids, z1.device)
            term = (cross_correlation_penalty(z1, r) + cross_correlation_penalty(z2, r)) / 2
            total, parts["radiomics"] = total + self.radiomics * term, float(term.detach())
        return total, parts


def read_radiomics_table(path: str) -> dict[str, list[float]]:
    """``{case id: feature values}`` of a radiomics CSV written by the bundle (checked on read)."""
    from scripts.feature_table import read_checked

    ids, _, values = read_checked(path)
    return {str(i): list(v) for i, v in zip(ids, values)}


def make_regularizer(
    covariance: float = 0.0,
    variance: float = 0.0,
    radiomics: float = 0.0,
    radiomics_table: str | None = None,
    case_ids: Sequence[str] | None = None,
) -> Regularizer | None:
    """The config's ``regularizer`` block as a callable, or ``None`` when every weight is 0 (the paper's loss).

    ``radiomics_table``: the cohort's pyradiomics CSV (``extracting``), needed by the radiomics term only; it must
    hold every training case in ``case_ids``."""
    components: dict[str, np.ndarray] = {}
    if float(radiomics) > 0:
        if not radiomics_table:
            raise ValueError("regularizer#radiomics > 0 needs regularizer#radiomics_table (run `extracting` first)")
        table = read_radiomics_table(radiomics_table)
        missing = sorted(set(map(str, case_ids or ())) - set(table))
        if missing:
            raise ValueError(f"{radiomics_table} lacks {len(missing)} training case(s), e.g. {missing[:5]}")
        components = radiomics_components(table)
        logger.info(
            "radiomics orthogonality: %d cases, %d whitened components",
            len(table),
            len(next(iter(components.values()))),
        )
    reg = Regularizer(covariance, variance, radiomics, components)
    return reg if reg.active else None
