"""CUBE (Cui et al. 2022, "A Unified Evaluation of Textual Backdoor Learning: Frameworks and
Benchmarks"), as OpenBackdoor's CUBEDefender with the MuScleLoRA configs: fine-tune a copy of the
backbone on the (possibly poisoned) training set for `encoder_epochs`, embed every training sample
(first-token final hidden state), reduce with PCA (`pca_dims`) then UMAP (`umap_dims`, n_neighbors 100,
min_dist 0), and cluster with HDBSCAN (min_samples 100). Within each label, the largest cluster is kept
and every other cluster (HDBSCAN's noise included, as OpenBackdoor treats it) smaller than half the
label's samples is dropped; the victim is trained on the rest.

Fixed here (spec §13.10): OpenBackdoor's CUBE sets its encoder to the `model` argument, which the
attacker passes as None, so it crashes; here a fresh copy of the backbone is the encoder.
Needs the optional extra: pip install 'cleantune[cube]' (umap-learn, scikit-learn's HDBSCAN).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from ..data import TextDataset
from ..errors import UserError
from ..models import Classifier
from .base import Defense
from .common import sentence_states, side_dir, train_side_model, with_stages


_MISSING = "CUBE needs the optional extra: pip install 'cleantune[cube]' (missing {})"
_OLD_SKLEARN = "CUBE needs scikit-learn >= 1.3 (HDBSCAN): pip install 'cleantune[cube]'"


def _find_extras():
    """The cheap part of `_require_extras`, for a run's cell check: the packages are found, without the
    seconds their imports take."""
    import importlib.metadata
    import importlib.util

    for module in ("sklearn", "umap"):
        if importlib.util.find_spec(module) is None:
            raise UserError(_MISSING.format(module))
    try:
        major, minor = (int(x) for x in importlib.metadata.version("scikit-learn").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):  # no metadata to read: the import decides
        return
    if (major, minor) < (1, 3):
        raise UserError(_OLD_SKLEARN)


def _require_extras():
    """`_find_extras`, then the imports themselves: an install that is found but broken stops here too."""
    _find_extras()
    try:
        import sklearn.cluster  # noqa: F401
        import umap  # noqa: F401
    except ImportError as e:
        raise UserError(_MISSING.format(e.name)) from None
    if not hasattr(sklearn.cluster, "HDBSCAN"):
        raise UserError(_OLD_SKLEARN)


def cluster(reps: np.ndarray, seed: int, pca_dims: int = 20, umap_dims: int = 2, n_neighbors: int = 100,
            min_samples: int = 100) -> np.ndarray:
    """HDBSCAN cluster ids (-1 = noise) of UMAP(PCA(reps)); neighbourhood sizes are capped at n - 1, and a set
    of at most umap_dims + 1 points starts UMAP from a random layout."""
    _require_extras()
    from sklearn.cluster import HDBSCAN
    from sklearn.decomposition import PCA
    from umap import UMAP

    n = len(reps)
    seed %= 2**32  # what sklearn and UMAP take; a run's seed may be any 64-bit integer (as numpy's, in seed_everything)
    x = PCA(n_components=min(pca_dims, n, reps.shape[1]), random_state=seed).fit_transform(reps)
    # UMAP's spectral start takes umap_dims + 1 eigenvectors of the n x n graph, which scipy cannot give for
    # n <= umap_dims + 1: so small a set starts from a random layout instead
    init = "random" if n <= umap_dims + 1 else "spectral"
    x = UMAP(n_neighbors=min(n_neighbors, n - 1), min_dist=0.0, n_components=umap_dims, init=init, random_state=seed,
             transform_seed=seed).fit_transform(x)
    return HDBSCAN(min_samples=min(min_samples, n - 1), cluster_selection_epsilon=0.0).fit_predict(x)


def minority_clusters(labels: list[int], clusters: np.ndarray) -> list[bool]:
    """OpenBackdoor's filtering: per label, flag the samples of every cluster but the largest whose size
    is below half the label's samples."""
    labels = np.asarray(labels)
    flagged = np.zeros(len(labels), dtype=bool)
    for y in np.unique(labels):
        members = labels == y
        counts = Counter(clusters[members].tolist())
        if len(counts) < 2:
            continue
        largest = max(counts, key=lambda c: (counts[c], -c))  # a tie keeps the lowest number, noise (-1) first
        for c, size in counts.items():
            if c != largest and size < 0.5 * members.sum():
                flagged |= members & (clusters == c)
    return flagged.tolist()


@dataclass
class CUBE(Defense):
    encoder_epochs: int = 1
    pca_dims: int = 20
    umap_dims: int = 2
    n_neighbors: int = 100
    min_samples: int = 100

    name = "cube"
    bounds = {name: "(0, inf)" for name in ("encoder_epochs", "pca_dims", "umap_dims", "n_neighbors", "min_samples")}
    clean_data = "clean dev: model selection only"

    def check_requirements(self) -> None:
        _find_extras()

    def fit(self, train_data: TextDataset, clean_dev: TextDataset | None = None, *, out_dir=None, resume=False,
            progress=True, extra_hooks=()) -> Classifier:
        """`extra_hooks` follow the final training only, on the data CUBE kept: the clustering encoder is
        not the defended model."""
        _require_extras()  # the Python API's fit is not preceded by a cell check
        if len(train_data) < 3:
            raise UserError("CUBE needs at least 3 training samples to cluster")
        train_data = train_data.without_flags()
        encoder, tokenizer, side = train_side_model(self, train_data, self.encoder_epochs, None,
                                                    side_dir(out_dir, "cube-encoder"), resume, progress,
                                                    desc="cube encoder")
        reps = sentence_states(encoder, tokenizer, train_data.texts, self.max_length).numpy()
        del encoder
        self.clusters_ = cluster(reps, self.seed, self.pca_dims, self.umap_dims, self.n_neighbors, self.min_samples)
        self.flagged_ = minority_clusters(train_data.labels, self.clusters_)
        keep = [i for i, f in enumerate(self.flagged_) if not f]
        victim = super().fit(train_data.subset(keep), clean_dev, out_dir=out_dir, resume=resume, progress=progress,
                             extra_hooks=extra_hooks)
        self.report_ = with_stages(self.report_, side)
        self.extra_metrics_ = {"n_removed": sum(self.flagged_), "n_clusters": int(len(set(self.clusters_.tolist())))}
        return victim

    def findings(self) -> str:
        return (f"removed {sum(self.flagged_)} sample(s) in minority clusters "
                f"({self.extra_metrics_['n_clusters']} clusters found)")
