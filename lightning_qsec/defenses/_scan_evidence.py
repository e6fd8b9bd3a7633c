"""The evidence :func:`~lightning_qsec.defenses.scan_model` gathers, one function per kind.

Each function compares a float model with its quantized twin (built with the
deployer's quantizer by the caller) and returns plain floats; none changes either
model. Both models are run in eval mode with frozen parameters
(:func:`~lightning_qsec.attacks._context.attack_mode`), so BatchNorm and Brevitas
activation statistics are never consumed.

* :func:`prediction_evidence`: float-vs-quantized disagreement and the total-variation
  distance between their predicted-class distributions on clean data.
* :func:`truncation_evidence`: neuron-wise truncation-error outliers (EFRAP, Li et al.,
  CVPR 2024, https://arxiv.org/abs/2403.02717).
* :func:`reverse_engineer_triggers`: Neural Cleanse (Wang et al., IEEE S&P 2019,
  https://people.cs.uchicago.edu/~ravenben/publications/pdf/backdoor-sp19.pdf), one
  mask and pattern per class, all classes optimised in one batched loop;
  :func:`anomaly_index`: Neural Cleanse's outlier test on the mask sizes.
* :func:`strip_entropy`: STRIP (Gao et al., ACSAC 2019, https://arxiv.org/abs/1902.06531),
  the entropy of superimposed inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_qsec.attacks._context import attack_mode

__all__ = [
    "Triggers",
    "anomaly_index",
    "logits_of",
    "prediction_evidence",
    "reverse_engineer_triggers",
    "strip_entropy",
    "truncation_evidence",
]

_CHUNK = 512
#: Standard deviation of |U(-0.5, 0.5)|, the truncation error of a weight off any grid.
_UNIFORM_ABS_STD = math.sqrt(1.0 / 48.0)


def logits_of(model: nn.Module, x: Tensor) -> Tensor:
    """Logits of ``model`` on ``x`` in chunks, eval mode, no gradients."""
    with attack_mode(model), torch.no_grad():
        return torch.cat([model(x[i : i + _CHUNK]).float() for i in range(0, len(x), _CHUNK)])


def prediction_evidence(float_logits: Tensor, quant_logits: Tensor, num_classes: int) -> dict[str, float]:
    """Disagreement and class-distribution shift of the quantized predictions.

    Returns:
        ``disagreement``: share of inputs whose predicted class changes; ``class_shift``:
        total-variation distance (half the L1 distance) between the histograms of
        predicted classes of the float and the quantized model.
    """
    f, q = float_logits.argmax(1), quant_logits.argmax(1)
    hist_f = torch.bincount(f, minlength=num_classes).double() / len(f)
    hist_q = torch.bincount(q, minlength=num_classes).double() / len(q)
    return {
        "disagreement": float((f != q).double().mean()),
        "class_shift": float(0.5 * (hist_f - hist_q).abs().sum()),
    }


def _ks_uniform(errors: Tensor) -> float:
    """Kolmogorov-Smirnov distance between ``errors`` (in ``[0, 0.5]``) and the uniform law on ``[0, 0.5]``."""
    u = torch.sort(2 * errors).values
    n = len(u)
    steps = torch.arange(1, n + 1, dtype=u.dtype) / n
    return float(torch.maximum(steps - u, u - (steps - 1 / n)).max())


def truncation_evidence(
    twin: nn.Module, *, alpha: float = 0.05, min_outliers: int = 3, min_weights: int = 4096
) -> dict[str, float]:
    """Truncation errors of the float weights on the deployer's weight grid.

    For every quantized conv/linear layer of ``twin``, the truncation error of each
    float weight is ``|w / s - round(w / s)|`` on the grid Brevitas actually uses (the
    twin's own scales, per tensor or per channel). A weight that is not tuned to the
    grid has an error close to uniform on ``[0, 0.5]`` (mean 0.25, standard deviation
    ``sqrt(1/48)``). Weights tuned to the grid are not: attacks that keep every weight
    inside its rounding interval (Egashira et al. 2024) leave a band next to the
    boundary empty and pile weights up just inside it, and EFRAP (Li et al., CVPR
    2024) finds that the neurons carrying a quantization-conditioned backdoor have
    abnormal truncation errors. Weights that set a max-abs scale sit on the grid by
    construction and are left out.

    **Outlier neurons.** A neuron (output channel) is an outlier when the mean error of
    its weights lies more than ``z`` standard errors above 0.25, with ``z`` set by a
    Bonferroni correction over all ``n`` neurons of the model (one-sided normal
    quantile of ``1 - alpha / n``; about 4.1 for 250 neurons and ``alpha = 0.05``), so
    that a model whose weights are off the grid has at most an ``alpha`` chance of any
    outlier. Real clean networks are not exactly uniform, so a single or second
    outlier still happens (a clean MNIST-5k model had one at 8 bits with a per-neuron
    ``z = 3``); fewer than ``min_outliers`` outliers therefore count as none.

    Args:
        twin: the quantized twin.
        alpha: family-wise false-alarm rate of the outlier test over all neurons.
        min_outliers: fewer outlier neurons than this report 0.
        min_weights: layers with fewer weights are left out of the distribution test
            (too few for it); if every layer is smaller, the largest one is used.

    Returns:
        ``truncation_outliers``: the share of outlier neurons over all layers (0 below
        ``min_outliers`` of them); ``truncation_ks``: the largest Kolmogorov-Smirnov
        distance between a layer's errors and the uniform law.
    """
    standardised: list[Tensor] = []
    layers: list[Tensor] = []
    with torch.no_grad():
        for module in twin.modules():
            quant_weight = getattr(module, "quant_weight", None)
            if not callable(quant_weight) or not isinstance(getattr(module, "weight", None), Tensor):
                continue
            qw = quant_weight()
            if qw.scale is None:  # pragma: no cover - a weight quantizer that is switched off
                continue
            error = ((module.weight - qw.value) / qw.scale).abs().flatten(1).double().cpu()
            keep = error > 1e-6
            count = keep.sum(1).clamp_min(1)
            per_neuron = (error * keep).sum(1) / count
            standardised.append((per_neuron - 0.25) / (_UNIFORM_ABS_STD / count.sqrt()))
            layers.append(error[keep].clamp_max(0.5))
    if not layers:
        return {"truncation_outliers": 0.0, "truncation_ks": 0.0}
    scores = torch.cat(standardised)
    z = float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1.0 - alpha / len(scores))))
    outliers = int((scores > z).sum())
    tested = [e for e in layers if len(e) >= min_weights] or [max(layers, key=len)]
    return {
        "truncation_outliers": outliers / len(scores) if outliers >= min_outliers else 0.0,
        "truncation_ks": max(_ks_uniform(e) for e in tested),
    }


@dataclass(frozen=True)
class Triggers:
    """Reverse-engineered triggers, one per class.

    Attributes:
        masks: ``(K, 1, *spatial)`` masks in ``[0, 1]``.
        patterns: ``(K, C, *spatial)`` patterns in the input range.
        norms: ``(K,)`` L1 norm of each mask, as a share of the input's pixels.
        success: ``(K,)`` share of non-class-``k`` inputs the stamped trigger sends to ``k``.
    """

    masks: Tensor
    patterns: Tensor
    norms: Tensor
    success: Tensor

    def stamp(self, x: Tensor, k: int) -> Tensor:
        """``x`` with the trigger of class ``k`` pasted in."""
        return (1 - self.masks[k]) * x + self.masks[k] * self.patterns[k]


def reverse_engineer_triggers(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    num_classes: int,
    steps: int,
    lr: float,
    cost: float,
    low: float,
    high: float,
    generator: torch.Generator,
    on_step: Callable[[], object] | None = None,
) -> Triggers:
    """Neural Cleanse: the smallest mask-and-pattern trigger sending inputs to each class.

    For every class ``k`` a mask ``m_k`` (shared over input channels) and a pattern
    ``p_k`` minimise ``CE(model((1 - m_k) x + m_k p_k), k) + cost * mean(m_k)`` over the
    inputs whose label is not ``k``, by Adam on logit-parametrised ``m`` and ``p`` (so
    both stay in range). All classes are optimised together in one batched forward
    pass per step. Gradients reach the inputs through Brevitas' straight-through
    estimators when ``model`` is quantized; the model runs in eval mode with frozen
    parameters. ``generator`` sets the initial masks and patterns, so a float model and
    its twin start from the same point.

    Args:
        model: float or quantized classifier returning logits ``(N, K)``.
        x: clean inputs ``(N, C, *spatial)``.
        y: their labels ``(N,)``.
        num_classes: ``K``.
        steps: optimisation steps.
        lr: Adam learning rate.
        cost: weight of the mask's mean (its L1 norm over the pixel count).
        low, high: the input range the pattern is mapped to.
        generator: seeds the initialisation.
        on_step: called after every step (a progress bar).

    Returns:
        The :class:`Triggers`.
    """
    spatial = x.shape[2:]
    mask_raw = (torch.randn((num_classes, 1, *spatial), generator=generator) * 0.1 - 2.0).to(x)
    pattern_raw = (torch.randn((num_classes, *x.shape[1:]), generator=generator) * 0.1).to(x)
    keep = torch.stack([y != k for k in range(num_classes)])  # (K, N)
    weight = keep.float() / keep.sum(1, keepdim=True).clamp_min(1)
    targets = torch.arange(num_classes, device=x.device).repeat_interleave(len(x))
    with attack_mode(model):
        mask_raw.requires_grad_(True)
        pattern_raw.requires_grad_(True)
        optimizer = torch.optim.Adam([mask_raw, pattern_raw], lr=lr)
        for _ in range(steps):
            mask = torch.sigmoid(mask_raw)
            pattern = low + (high - low) * torch.sigmoid(pattern_raw)
            stamped = (1 - mask[:, None]) * x[None] + (mask * pattern)[:, None]  # (K, N, C, *spatial)
            logits = model(stamped.flatten(0, 1))
            ce = F.cross_entropy(logits, targets, reduction="none").view(num_classes, len(x))
            loss = (ce * weight).sum() + cost * mask.flatten(1).mean(1).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if on_step is not None:
                on_step()
        mask = torch.sigmoid(mask_raw).detach()
        pattern = (low + (high - low) * torch.sigmoid(pattern_raw)).detach()
    return Triggers(masks=mask, patterns=pattern, norms=mask.flatten(1).mean(1),
                    success=_success(model, mask, pattern, x, y))


def anomaly_index(norms: Tensor, *, min_spread: float = 0.1) -> tuple[float, int]:
    """Neural Cleanse's anomaly index of the smallest trigger.

    Neural Cleanse (Wang et al., IEEE S&P 2019) flags a class whose reverse-engineered
    trigger is far smaller than the others': with the per-class mask norms ``n``, the
    anomaly index of the smallest is ``(median(n) - min(n)) / (1.4826 * MAD(n))``, where
    ``MAD`` is the median absolute deviation (1.4826 makes it a consistent estimate of
    the standard deviation of a normal law). The paper calls an index above 2 an
    outlier; :func:`~lightning_qsec.defenses.scan_model` calibrates its own threshold on
    clean models. Only the small side counts: a backdoor target is easy to reach.

    One change from the paper: the MAD is floored at ``min_spread`` times the median.
    The scan's short trigger search (50 steps) leaves the masks of all classes close
    together, so the MAD can be tiny and a class only 20 % smaller than the rest got an
    index above 5 on a clean digits model; with the floor, a trigger must be clearly
    smaller than the others, not just smaller than a very tight crowd.

    Args:
        norms: ``(K,)`` mask norms, e.g. :attr:`Triggers.norms`.
        min_spread: floor of the MAD, as a share of the median.

    Returns:
        ``(index, class)``: the anomaly index and the class of the smallest trigger.

    Example:
        >>> index, k = anomaly_index(torch.tensor([0.20, 0.22, 0.18, 0.21, 0.02]))
        >>> round(index, 1), k
        (6.1, 4)
        >>> round(anomaly_index(torch.tensor([0.20, 0.22, 0.18, 0.21, 0.17]))[0], 1)
        1.0
    """
    n = norms.double()
    median = n.quantile(0.5)
    mad = (n - median).abs().quantile(0.5)
    smallest = int(n.argmin())
    scale = 1.4826 * torch.maximum(mad, min_spread * median.abs()).clamp_min(1e-12)
    return float((median - n[smallest]) / scale), smallest


def _success(model: nn.Module, masks: Tensor, patterns: Tensor, x: Tensor, y: Tensor) -> Tensor:
    num_classes = len(masks)
    keep = torch.stack([y != k for k in range(num_classes)]).float()  # (K, N)
    stamped = (1 - masks[:, None]) * x[None] + (masks * patterns)[:, None]
    predicted = logits_of(model, stamped.flatten(0, 1)).argmax(1).view(num_classes, len(x))
    hits = predicted == torch.arange(num_classes, device=x.device)[:, None]
    return (hits.float() * keep).sum(1) / keep.sum(1).clamp_min(1)


def strip_entropy(model: nn.Module, x: Tensor, pool: Tensor, *, overlays: int, generator: torch.Generator) -> float:
    """STRIP: mean normalised prediction entropy of ``x`` superimposed with random ``pool`` inputs.

    Every input is blended half-and-half with ``overlays`` inputs drawn from ``pool``.
    A trigger that dominates the prediction keeps the entropy low under this blending;
    a fragile (adversarial) perturbation does not.

    Returns:
        The mean entropy divided by ``log(num_classes)``, in ``[0, 1]``.
    """
    picks = torch.randint(len(pool), (len(x), overlays), generator=generator).to(x.device)
    blended = (0.5 * x[:, None] + 0.5 * pool[picks]).flatten(0, 1)
    probs = F.softmax(logits_of(model, blended), dim=1)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(1)
    return float(entropy.mean() / math.log(probs.shape[1]))
