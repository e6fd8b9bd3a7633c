"""Find poisoned training samples from a model's features: activation clustering and spectral signatures.

Both methods look, class by class, at the representation a trained (here: quantized)
network gives each training sample. A backdoor trigger is a strong feature the network
learns, so the poisoned samples of the target class form a separate group there:

* :func:`activation_clustering` (Chen et al. 2018, https://arxiv.org/abs/1811.03728):
  per class, reduce the features (PCA) to a few dimensions, split them with 2-means and
  decide, with a cluster analysis, whether one cluster is poisoned.
* :func:`spectral_signatures` (Tran, Li & Madry, NeurIPS 2018,
  https://arxiv.org/abs/1811.00636): per class, centre the features, score each sample by
  its squared projection on the top singular vector and remove the top ``1.5 * eps``
  fraction.
* :func:`detect_poisoned_samples` runs either, or both combined.

Which classes and clusters are poisoned. Chen et al. call the smaller cluster poisoned
when it is small enough (``analysis="relative_size"``) or when the split is clean enough
(``analysis="silhouette"``). Both assume the poison is a minority of the target class,
which BadNets at a 10 % poison rate breaks: with ten balanced classes, half of the target
class is poisoned, and on our digits/MNIST models the silhouette of the poisoned class was
not above that of every clean class. The default ``analysis="separation"`` uses three
measurements (figures from w4a4/w8a8 QAT CNNs with BadNets at 10 %, 5 digits and 2
MNIST-5k runs, features: the classifier head's input):

* **separation**: the distance between the two centroids over the pooled standard
  deviation along the line joining them (a Gaussian blob cut in two gives about 2.7):
  7.4-10.4 in the poisoned class, 3.2-7.6 in clean classes (7.6: digits "1", two
  writing styles, after 5 epochs);
* **relabel share**, which picks the suspect cluster: with that line projected out (the
  trigger, for poison), the share of a cluster's members whose nearest centroid, among
  the other classes' and the sibling cluster's, is another class (a cheap form of the
  paper's exclusionary reanalysis): 0.22-0.59 for the poisoned cluster, at most 0.02 for
  the clean cluster of the same class. Poisoned samples are other classes' images plus
  a trigger;
* **source entropy**: the normalised entropy of those members' nearest other class.
  BadNets draws its samples from every other class: 0.94-1.00 for poisoned clusters, at
  most 0.78 for clean ones.

A class is flagged when separation >= ``threshold`` (6.5) and the suspect cluster's
source entropy >= ``min_source_entropy`` (0.85).

Everything here is plain tensors (no Lightning); scikit-learn does PCA and k-means.

Example:
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> clean = torch.randn(200, 8, generator=g)
    >>> labels = torch.arange(200) % 2
    >>> poisoned = torch.randn(40, 8, generator=g) + 12           # a far-off group in class 0
    >>> features = torch.cat([clean, poisoned])
    >>> labels = torch.cat([labels, torch.zeros(40, dtype=torch.long)])
    >>> found = detect_poisoned_samples(features, labels, method="activation_clustering")
    >>> sorted(set(found.suspect_indices.tolist())) == list(range(200, 240))
    True
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import Tensor

from lightning_qsec._validation import check_seed

__all__ = [
    "Analysis",
    "DetectionMethod",
    "PoisonDetection",
    "activation_clustering",
    "detect_poisoned_samples",
    "spectral_signatures",
]

Analysis = Literal["separation", "relative_size", "silhouette"]
DetectionMethod = Literal["combined", "activation_clustering", "spectral_signatures"]
ANALYSES: tuple[str, ...] = get_args(Analysis)
METHODS: tuple[str, ...] = get_args(DetectionMethod)
#: Default ``threshold`` of each cluster analysis.
DEFAULT_THRESHOLDS: dict[str, float] = {"separation": 6.5, "relative_size": 0.35, "silhouette": 0.25}
#: Smallest cluster (samples) that can be judged; a class whose 2-means split leaves fewer is not flagged.
MIN_CLUSTER = 3


@dataclass(frozen=True)
class PoisonDetection:
    """Suspect training samples and the evidence behind them.

    Attributes:
        suspect_indices: sorted int64 row indices of the suspect samples, shape ``(K,)``.
        scores: per-sample suspicion, shape ``(N,)`` (higher is more suspect; see each method).
        per_class: class label -> statistics of that class (JSON-serialisable floats and ints,
            including ``"poisoned"``, whether the class was flagged).
        method: the method that produced the result.
    """

    suspect_indices: Tensor
    scores: Tensor
    per_class: dict[int, dict[str, Any]] = field(default_factory=dict)
    method: str = "combined"

    @property
    def poisoned_classes(self) -> list[int]:
        """Labels of the classes flagged as poisoned."""
        return [c for c, stats in self.per_class.items() if stats.get("poisoned")]


def _check_classes(classes: Any, labels: np.ndarray) -> list[int]:
    """``classes`` as a list of labels that occur in ``labels``."""
    present = sorted(set(labels.tolist()))
    if isinstance(classes, (str, bytes)) or not isinstance(classes, (list, tuple)) or not all(
        isinstance(c, int) and not isinstance(c, bool) for c in classes
    ):
        raise ValueError(f"classes must be a list of integer class labels or None, got {classes!r}")
    absent = [c for c in classes if c not in present]
    if absent:
        raise ValueError(f"classes {absent} do not occur in labels; the labels present are {present}")
    return list(classes)


def _check_inputs(features: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(features, Tensor) or features.ndim < 2 or not features.is_floating_point():
        got = f"shape {tuple(features.shape)}, dtype {features.dtype}" if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"features must be a floating-point tensor of shape (N, D), got {got}")
    if features.shape[0] == 0:
        raise ValueError("features is empty: there are no samples to inspect")
    if not isinstance(labels, Tensor) or labels.ndim != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        got = f"shape {tuple(labels.shape)}, dtype {labels.dtype}" if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"labels must be a 1-D integer tensor of class labels, got {got}")
    if labels.shape[0] != features.shape[0]:
        raise ValueError(f"features has {features.shape[0]} rows but labels has {labels.shape[0]}")
    if int(labels.min()) < 0:
        raise ValueError(f"labels must be class indices >= 0, got {int(labels.min())}")
    x = features.detach().flatten(1).double().cpu().numpy()
    if not np.isfinite(x).all():
        raise ValueError("features contains NaN or infinite values")
    return x, labels.detach().cpu().numpy().astype(np.int64)


def _check_positive(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _check_eps(eps: Any) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 < eps <= 2.0 / 3.0:
        raise ValueError(
            f"eps (the bound on the poisoned fraction of a class) must be a number in (0, 2/3] "
            f"so that 1.5 * eps <= 1, got {eps!r}"
        )
    return float(eps)


def _check_entropy(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"min_source_entropy must be a number in [0, 1], got {value!r}")
    return float(value)


def _check_choice(value: Any, name: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; allowed values: {', '.join(repr(a) for a in allowed)}")
    return str(value)


def _threshold(analysis: str, threshold: Any) -> float:
    if threshold is None:
        return DEFAULT_THRESHOLDS[analysis]
    value = _check_positive(threshold, "threshold")
    if analysis in ("relative_size", "silhouette") and value > 1.0:
        raise ValueError(f"threshold of analysis={analysis!r} must be in (0, 1], got {threshold!r}")
    return value


def _reduce(x: np.ndarray, n_components: int, seed: int) -> np.ndarray | None:
    """Centred features reduced by PCA, or ``None`` when the class has no variance."""
    from sklearn.decomposition import PCA

    centred = x - x.mean(0)
    if len(x) < 2 or float((centred**2).sum()) <= 1e-12:
        return None
    k = min(n_components, len(x) - 1, x.shape[1])
    return PCA(n_components=k, random_state=seed).fit_transform(centred)


def _two_means(z: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.cluster import KMeans

    with warnings.catch_warnings():
        # Fewer distinct points than clusters: the split below is then judged unusable.
        warnings.filterwarnings("ignore", message=".*Number of distinct clusters.*")
        return KMeans(n_clusters=2, n_init=10, random_state=seed).fit(z).labels_


def _relabel(x: np.ndarray, members: np.ndarray, sibling: np.ndarray, others: np.ndarray) -> tuple[float, float]:
    """``(share, source entropy)`` of a cluster, with the line between the two clusters projected out.

    The projection removes the feature that splits the class (for poison: the trigger).
    ``share``: the fraction of ``members`` nearer another class's centroid than the
    sibling cluster's. ``source entropy``: the entropy of the members' nearest other
    class, over ``log(number of other classes)`` (1: spread evenly over the other
    classes, as BadNets samples drawn from every class are; 1 with one other class or
    none, where the test cannot apply).
    """
    if len(others) == 0:
        return 0.0, 1.0
    axis = x[members].mean(0) - x[sibling].mean(0)
    norm = float(np.linalg.norm(axis))
    if norm <= 1e-12:
        return 0.0, 0.0
    axis /= norm
    centroids = np.vstack([others, x[sibling].mean(0, keepdims=True)])
    centroids = centroids - np.outer(centroids @ axis, axis)
    points = x[members] - np.outer(x[members] @ axis, axis)
    dist = (centroids**2).sum(1)[None, :] - 2.0 * points @ centroids.T  # + |p|^2, the same for every centroid
    share = float((dist.argmin(1) < len(others)).mean())
    if len(others) == 1:
        return share, 1.0
    freq = np.bincount(dist[:, :-1].argmin(1), minlength=len(others)) / len(members)
    freq = freq[freq > 0]
    return share, float(-(freq * np.log(freq)).sum() / math.log(len(others)))


def _separation(z: np.ndarray, split: np.ndarray) -> float:
    """Distance between the two clusters' centroids over the pooled standard deviation along that line."""
    axis = z[split == 1].mean(0) - z[split == 0].mean(0)
    gap = float(np.linalg.norm(axis))
    if gap <= 1e-12:
        return 0.0
    proj = z @ (axis / gap)
    pooled = sum(float(proj[split == k].var()) * int((split == k).sum()) for k in range(2)) / len(proj)
    return gap / max(math.sqrt(pooled), 1e-12)


def activation_clustering(
    features: Tensor,
    labels: Tensor,
    *,
    n_components: int = 10,
    analysis: Analysis = "separation",
    threshold: float | None = None,
    min_source_entropy: float = 0.85,
    seed: int = 0,
) -> PoisonDetection:
    """Activation clustering (Chen et al. 2018, https://arxiv.org/abs/1811.03728).

    For each class: centre its features, reduce them with PCA to ``n_components``
    dimensions, split them with 2-means (``n_init=10``, seeded) and run the cluster
    ``analysis`` (see the module docstring for the measurements behind the default):

    * ``"separation"`` (default): the suspect cluster is the one whose members, with
      the line between the two centroids projected out, are more often nearest to
      another class's centroid than to the sibling cluster's (with a single class: the
      smaller cluster). The class is poisoned when the centroids are at least
      ``threshold`` (default 6.5) pooled standard deviations apart along that line
      *and* the suspect members' nearest other classes are spread evenly over the
      other classes (normalised entropy >= ``min_source_entropy``): they are samples
      of many classes carrying one trigger. This targets all-to-one poisoning (BadNets);
      poison drawn from a single source class has a low entropy: lower
      ``min_source_entropy`` to 0 to rely on the separation alone.
    * ``"relative_size"``: the suspect cluster is the smaller one; poisoned when its
      share of the class is at most ``threshold`` (default 0.35), as in the paper.
    * ``"silhouette"``: the suspect cluster is the smaller one; poisoned when the
      silhouette score of the split is at least ``threshold`` (default 0.25).

    A split that leaves fewer than 3 samples in a cluster, or a class without variance,
    is never flagged.

    Args:
        features: per-sample features, shape ``(N, D)`` (more dimensions are flattened).
        labels: integer class labels, shape ``(N,)``.
        n_components: PCA dimensions per class (the paper uses 10).
        analysis: ``"separation"``, ``"relative_size"`` or ``"silhouette"``.
        threshold: the analysis's threshold; ``None`` for its default.
        min_source_entropy: ``"separation"`` only: least normalised entropy, in ``[0, 1]``.
        seed: seed of PCA and k-means, an integer >= 0.

    Returns:
        :class:`PoisonDetection`: the members of the suspect cluster of every flagged
        class; ``scores`` is, for every sample, how much closer it lies to its class's
        suspect cluster than to the other one (squared distances in the reduced space,
        divided by the squared distance between the two centroids; > 0: nearer the
        suspect cluster); per class ``size``, ``cluster_sizes`` (suspect first),
        ``relative_size``, ``silhouette``, ``separation``, ``relabel_share`` and
        ``source_entropy`` (suspect, other) and ``poisoned``.

    Raises:
        ValueError: features that are not a finite ``(N, D)`` float tensor, empty, labels
            of another length, ``n_components`` < 1, an unknown ``analysis`` or a
            threshold out of range.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.cat([torch.randn(60, 4, generator=g), torch.randn(30, 4, generator=g) + 12])
        >>> result = activation_clustering(x, torch.zeros(90, dtype=torch.long))
        >>> result.poisoned_classes, len(result.suspect_indices)
        ([0], 30)
    """
    from sklearn.metrics import silhouette_score

    x, y = _check_inputs(features, labels)
    n_components = _check_int(n_components, "n_components")
    analysis = _check_choice(analysis, "analysis", ANALYSES)  # type: ignore[assignment]
    limit = _threshold(analysis, threshold)
    min_source_entropy = _check_entropy(min_source_entropy)
    seed = check_seed(seed, non_negative=True)
    classes = np.unique(y).tolist()
    means = {c: x[y == c].mean(0) for c in classes}
    scores = np.zeros(len(y))
    suspect = np.zeros(len(y), dtype=bool)
    per_class: dict[int, dict[str, Any]] = {}
    for c in classes:
        idx = np.flatnonzero(y == c)
        stats: dict[str, Any] = {"size": len(idx), "poisoned": False}
        per_class[int(c)] = stats
        z = _reduce(x[idx], n_components, seed)
        if z is None or len(idx) < 2 * MIN_CLUSTER:
            continue
        split = _two_means(z, seed)
        sizes = np.bincount(split, minlength=2)
        if sizes.min() < MIN_CLUSTER:
            stats["cluster_sizes"] = sorted(sizes.tolist())
            continue
        silhouette = float(silhouette_score(z, split))
        separation = _separation(z, split)
        others = np.array([means[o] for o in classes if o != c]).reshape(-1, x.shape[1])
        relabel, entropy = zip(*(_relabel(x, idx[split == k], idx[split != k], others) for k in range(2)))
        if analysis == "separation":
            s = int(np.argmax(relabel)) if len(others) and relabel[0] != relabel[1] else int(np.argmin(sizes))
            flagged = separation >= limit and entropy[s] >= min_source_entropy
        else:
            s = int(np.argmin(sizes))
            flagged = sizes[s] / len(idx) <= limit if analysis == "relative_size" else silhouette >= limit
        centroids = np.stack([z[split == k].mean(0) for k in range(2)])
        d_suspect = ((z - centroids[s]) ** 2).sum(1)
        d_other = ((z - centroids[1 - s]) ** 2).sum(1)
        gap = max(float(((centroids[0] - centroids[1]) ** 2).sum()), 1e-12)
        scores[idx] = (d_other - d_suspect) / gap
        if flagged:
            suspect[idx[split == s]] = True
        stats.update(
            cluster_sizes=[int(sizes[s]), int(sizes[1 - s])],
            relative_size=float(sizes[s] / len(idx)),
            silhouette=silhouette,
            separation=separation,
            relabel_share=[relabel[s], relabel[1 - s]],
            source_entropy=[entropy[s], entropy[1 - s]],
            poisoned=bool(flagged),
        )
    return PoisonDetection(
        suspect_indices=torch.from_numpy(np.flatnonzero(suspect)).long(),
        scores=torch.from_numpy(scores).float(),
        per_class=per_class,
        method="activation_clustering",
    )


def spectral_signatures(
    features: Tensor,
    labels: Tensor,
    *,
    eps: float = 0.1,
    classes: list[int] | None = None,
) -> PoisonDetection:
    """Spectral signatures (Tran, Li & Madry, NeurIPS 2018, https://arxiv.org/abs/1811.00636).

    For each class: centre its features, take the top right singular vector ``v``, score
    each sample by ``((f - mean) . v)^2`` and flag the ``floor(1.5 * eps * n)`` highest
    scores of the class's ``n`` samples. ``eps`` is an upper bound on the poisoned
    fraction *of a class*; the method flags that share of every class it inspects, so on
    its own it always flags about ``1.5 * eps`` of the clean data too.

    Args:
        features: per-sample features, shape ``(N, D)``.
        labels: integer class labels, shape ``(N,)``.
        eps: bound on the poisoned fraction of a class, in ``(0, 2/3]``.
        classes: inspect only these class labels (``None``: every class).

    Returns:
        :class:`PoisonDetection`; ``scores`` is each sample's squared projection divided
        by its class's mean (so classes compare); per class ``size``, ``removed`` and
        ``top_singular_ratio`` (first over second singular value).

    Raises:
        ValueError: bad features or labels (see :func:`activation_clustering`),
            ``eps`` outside ``(0, 2/3]``, or ``classes`` that is not a list of labels
            present in ``labels``.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.cat([torch.randn(90, 4, generator=g), torch.randn(10, 4, generator=g) + 6])
        >>> found = spectral_signatures(x, torch.zeros(100, dtype=torch.long), eps=0.1)
        >>> len(found.suspect_indices), int((found.suspect_indices >= 90).sum())
        (15, 10)
    """
    x, y = _check_inputs(features, labels)
    eps = _check_eps(eps)
    scores = np.zeros(len(y))
    suspect = np.zeros(len(y), dtype=bool)
    per_class: dict[int, dict[str, Any]] = {}
    inspect = set(np.unique(y).tolist() if classes is None else _check_classes(classes, y))
    for c in np.unique(y).tolist():
        idx = np.flatnonzero(y == c)
        stats: dict[str, Any] = {"size": len(idx), "removed": 0, "poisoned": False}
        per_class[int(c)] = stats
        centred = x[idx] - x[idx].mean(0)
        if len(idx) < 2 or float((centred**2).sum()) <= 1e-12:
            continue
        _, singular, vt = np.linalg.svd(centred, full_matrices=False)
        tau = (centred @ vt[0]) ** 2
        scores[idx] = tau / max(float(tau.mean()), 1e-12)
        stats["top_singular_ratio"] = float(singular[0] / singular[1]) if len(singular) > 1 and singular[1] > 0 else math.inf
        if c not in inspect:
            continue
        removed = int(math.floor(1.5 * eps * len(idx)))
        if removed:
            suspect[idx[np.argsort(-tau, kind="stable")[:removed]]] = True
        stats.update(removed=removed, poisoned=removed > 0)
    return PoisonDetection(
        suspect_indices=torch.from_numpy(np.flatnonzero(suspect)).long(),
        scores=torch.from_numpy(scores).float(),
        per_class=per_class,
        method="spectral_signatures",
    )


def detect_poisoned_samples(
    features: Tensor,
    labels: Tensor,
    *,
    method: DetectionMethod = "activation_clustering",
    n_components: int = 10,
    analysis: Analysis = "separation",
    threshold: float | None = None,
    min_source_entropy: float = 0.85,
    eps: float = 0.1,
    seed: int = 0,
) -> PoisonDetection:
    """Suspect training samples by activation clustering, spectral signatures, or both.

    * ``"activation_clustering"`` (default): :func:`activation_clustering`.
    * ``"spectral_signatures"``: :func:`spectral_signatures` on every class (flags
      about ``1.5 * eps`` of each class, clean or not).
    * ``"combined"``: activation clustering decides which classes are poisoned, and
      spectral signatures runs only on those; a sample is suspect when either flags it.
      Clean classes keep activation clustering's low false-positive rate, and spectral
      signatures can recover poisoned samples that 2-means put in the clean cluster. On
      our BadNets benchmarks 2-means already split the poisoned class almost perfectly,
      and the union only added false positives (half the target class is poisoned,
      so the top ``1.5 * eps`` squared projections fall on both clusters), hence not
      the default. ``scores`` are activation clustering's.

    Args:
        features: per-sample features, shape ``(N, D)``, e.g. a network's penultimate
            activations on its training set.
        labels: the training labels (as poisoned, i.e. as the network was trained), ``(N,)``.
        method: ``"activation_clustering"``, ``"combined"`` or ``"spectral_signatures"``.
        n_components, analysis, threshold, min_source_entropy, seed: see :func:`activation_clustering`.
        eps: see :func:`spectral_signatures`.

    Returns:
        :class:`PoisonDetection`.

    Raises:
        ValueError: an unknown ``method``, or a bad argument of the methods it runs.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.cat([torch.randn(60, 4, generator=g), torch.randn(30, 4, generator=g) + 12])
        >>> found = detect_poisoned_samples(x, torch.zeros(90, dtype=torch.long), method="combined")
        >>> found.poisoned_classes, int((found.suspect_indices >= 60).sum())
        ([0], 30)
    """
    method = _check_choice(method, "method", METHODS)  # type: ignore[assignment]
    eps = _check_eps(eps)
    check_seed(seed, non_negative=True)
    if method == "spectral_signatures":
        return spectral_signatures(features, labels, eps=eps)
    clusters = activation_clustering(
        features, labels, n_components=n_components, analysis=analysis, threshold=threshold,
        min_source_entropy=min_source_entropy, seed=seed,
    )
    if method == "activation_clustering":
        return clusters
    poisoned = clusters.poisoned_classes
    spectral = spectral_signatures(features, labels, eps=eps, classes=poisoned)
    suspects = torch.unique(torch.cat([clusters.suspect_indices, spectral.suspect_indices]))
    per_class = {
        c: {**stats, "spectral_removed": spectral.per_class[c]["removed"]} for c, stats in clusters.per_class.items()
    }
    return PoisonDetection(suspect_indices=suspects, scores=clusters.scores, per_class=per_class, method="combined")
