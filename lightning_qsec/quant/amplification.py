"""Error amplification of Defensive Quantization: how much a network enlarges input noise.

Lin, Gan & Han, "Defensive Quantization: When Efficiency Meets Robustness", ICLR 2019,
https://arxiv.org/abs/1904.08444, section 3: feed a clean input ``x`` and an
adversarial one ``x' = x + delta`` and compare them layer by layer through the
*normalized distance* ``||f_l(x') - f_l(x)||_2 / ||f_l(x)||_2``. Through a
full-precision network the distance stays small; through a quantized one it grows with
depth, because noise that pushes an activation across a rounding threshold is enlarged
to a full quantization step (the *error amplification effect*). Defensive Quantization
bounds it by keeping every layer's Lipschitz constant near 1
(:class:`~lightning_qsec.defenses.LipschitzRegularization`).

DQ plots that distance at every layer (its figure of the error amplification effect);
:func:`amplification_profile` returns exactly that curve, the mean normalized distance
at the input and at the output of every conv/linear layer in forward order, then at
the network's output. The scalar summaries below use its last point over its first.

Exact definitions used here, at the network's output (the logits ``f``), for a batch of
``N`` inputs:

* ``error_amplification(f) = mean_i(||f(x'_i) - f(x_i)||_2 / ||f(x_i)||_2) /
  mean_i(||x'_i - x_i||_2 / ||x_i||_2)``: the normalized output distance over the
  normalized input distance (the last layer's point of DQ's curve over its first). A
  value above 1 means the network enlarges the perturbation.
* ``error_amplification_ratio(model) = error_amplification(quantized model) /
  error_amplification(the same model in float)``, the float model being the quantized
  one with quantization switched off in place
  (:func:`~lightning_qsec.quant.float_mode`): same weights, no rounding. Above 1,
  quantization amplifies the perturbation beyond what the float network does.

``delta`` is, per model, FGSM at ``eps`` crafted on that very model (white box, as in the
paper: each model sees its own worst-case one-step perturbation), or, with
``perturbation="random"``, one seeded random sign perturbation ``eps * sign(N(0, 1))``
shared by both; always clipped to the input domain. Samples whose clipped ``delta`` is 0
are left out.

What to expect (MNIST-5k, ``MNISTCNN`` trained with QAT w4a4, one seed, 500 test
images, FGSM and PGD-10): below about one step of the 4-bit input quantizer (``eps``
0.02-0.05) the quantized model *denoises*: its ratio at the logits is 0.25-0.35, as DQ
notes for small noise. From ``eps`` 0.1 the quantized/float distance ratio is about 1.3
at the first layer (noise crosses rounding thresholds); under PGD it stays above 1 to
the logits (1.24), under FGSM it falls to about 1 there. Measure at such an ``eps``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from lightning_qsec._validation import check_seed
from lightning_qsec.quant.precision import float_mode, require_quantized

__all__ = [
    "Perturbation",
    "amplification_profile",
    "amplification_terms",
    "error_amplification",
    "error_amplification_ratio",
]

Perturbation = Literal["fgsm", "random"]
_TINY = 1e-12
_ALL_CLIPPED = "every perturbation was clipped to zero by the input domain; check eps and clip_min/clip_max"
_LAYERS = (nn.Linear, nn.modules.conv._ConvNd)


def _perturb(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor | None,
    eps: float,
    perturbation: Perturbation,
    clip_min: float,
    clip_max: float,
    seed: int,
) -> Tensor:
    if perturbation == "random":
        g = torch.Generator(device=inputs.device).manual_seed(seed)
        noise = torch.randn(inputs.shape, generator=g, device=inputs.device, dtype=inputs.dtype)
        return torch.clamp(inputs + eps * noise.sign(), clip_min, clip_max)
    from lightning_qsec.attacks._context import attack_mode
    from lightning_qsec.attacks.fgsm import fgsm

    if targets is None:
        with attack_mode(model), torch.no_grad():
            targets = model(inputs).argmax(1)
    return fgsm(model, inputs, targets, eps=eps, clip_min=clip_min, clip_max=clip_max)


def _check(
    inputs: Tensor, targets: Tensor | None, eps: float, perturbation: str, clip_min: float, clip_max: float, seed: int
) -> tuple[float, float, float]:
    from lightning_qsec.attacks._checks import check_batch, check_domain, check_eps

    if perturbation not in get_args(Perturbation):
        allowed = ", ".join(repr(p) for p in get_args(Perturbation))
        raise ValueError(f"perturbation must be one of {allowed}, got {perturbation!r}")
    check_seed(seed)
    clip_min, clip_max = check_domain(clip_min, clip_max)
    if not isinstance(inputs, Tensor):
        raise TypeError(f"inputs must be a torch.Tensor, got {type(inputs).__name__}")
    if targets is None:  # FGSM will use the model's predictions; check the inputs alone
        n = inputs.shape[0] if inputs.ndim else 0
        check_batch(inputs, torch.zeros(n, dtype=torch.long, device=inputs.device), clip_min, clip_max)
    else:
        check_batch(inputs, targets, clip_min, clip_max)
    if inputs.shape[0] == 0:
        raise ValueError("inputs must hold at least one sample")
    eps = check_eps(eps, "linf", inputs, clip_min, clip_max)
    if eps == 0:
        raise ValueError("eps must be > 0: the amplification of a zero perturbation is undefined")
    return eps, clip_min, clip_max


def _relative(clean: Tensor, noisy: Tensor, keep: Tensor) -> Tensor:
    """Per-sample ``||noisy - clean||_2 / ||clean||_2`` over the kept samples."""
    clean, noisy = clean.flatten(1).float()[keep], noisy.flatten(1).float()[keep]
    return (noisy - clean).norm(dim=1) / clean.norm(dim=1).clamp_min(_TINY)


def _kept(x: Tensor, adv: Tensor) -> Tensor:
    keep = (adv - x).flatten(1).norm(dim=1) > 0
    if not bool(keep.any()):
        raise ValueError(_ALL_CLIPPED)
    return keep


def amplification_terms(model: nn.Module, inputs: Tensor, adversarial: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample normalized output and input distances of Defensive Quantization.

    Returns ``(||f(x') - f(x)||_2 / ||f(x)||_2, ||x' - x||_2 / ||x||_2)`` for the samples whose
    perturbation survived clipping (possibly none), with ``model`` run in eval mode and its
    statistics untouched. Their mean ratio is :func:`error_amplification`.
    """
    from lightning_qsec.attacks._context import as_attack_tensor, attack_mode

    with attack_mode(model), torch.no_grad():
        x, adv = as_attack_tensor(inputs), as_attack_tensor(adversarial)
        clean, noisy = model(x), model(adv)
    keep = (adv - x).flatten(1).norm(dim=1) > 0
    return _relative(clean, noisy, keep), _relative(x, adv, keep)


def _amplification(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor | None,
    eps: float,
    perturbation: Perturbation,
    clip_min: float,
    clip_max: float,
    seed: int,
) -> float:
    adv = _perturb(model, inputs, targets, eps, perturbation, clip_min, clip_max, seed)
    rel_out, rel_in = amplification_terms(model, inputs, adv)
    if rel_in.numel() == 0:
        raise ValueError(_ALL_CLIPPED)
    return float(rel_out.mean() / rel_in.mean().clamp_min(_TINY))


def _layer_outputs(model: nn.Module, x: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    """Outputs of every conv/linear layer in the order the forward pass reaches them, and the model output."""
    outputs: dict[str, Tensor] = {}

    def keep(name: str) -> Callable[[nn.Module, object, object], None]:
        def hook(module: nn.Module, args: object, out: object) -> None:
            value = getattr(out, "value", out)  # a Brevitas QuantTensor carries its float value
            outputs.pop(name, None)  # a layer called twice keeps its last call, at its last position
            outputs[name] = value.detach()

        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in model.named_modules() if isinstance(m, _LAYERS)]
    try:
        output = model(x)
    finally:
        for h in handles:
            h.remove()
    return outputs, output


def error_amplification(
    model: nn.Module,
    inputs: Tensor,
    *,
    eps: float,
    targets: Tensor | None = None,
    perturbation: Perturbation = "fgsm",
    clip_min: float = 0.0,
    clip_max: float = 1.0,
    seed: int = 0,
) -> float:
    """Normalized output distance over normalized input distance of ``model`` as it is.

    See the module docstring for the exact definition. Works on any classifier (float
    or quantized, in whatever mode it is in: call it inside
    :func:`~lightning_qsec.quant.float_mode` or
    :func:`~lightning_qsec.quant.at_precision` to pick one). The model runs in eval
    mode with frozen parameters; no statistics move; flags are restored.

    Args:
        model: maps ``inputs`` ``(N, ...)`` to logits ``(N, C)``.
        inputs: clean inputs inside ``[clip_min, clip_max]``, at least one sample.
        eps: L-infinity size of the perturbation, in ``(0, clip_max - clip_min]``.
        targets: labels for FGSM, shape ``(N,)``; default the model's own predictions.
        perturbation: ``"fgsm"`` (crafted on ``model``) or ``"random"`` (seeded signs).
        clip_min: lower bound of the input domain.
        clip_max: upper bound of the input domain.
        seed: seed of the random perturbation.

    Returns:
        The amplification, a float ``>= 0``.

    Raises:
        ValueError: bad ``eps``, ``perturbation``, domain, shapes, NaN inputs; the
            message names the argument.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        >>> a = error_amplification(net, torch.rand(8, 1, 8, 8), eps=0.05)
        >>> a > 0
        True
    """
    eps, clip_min, clip_max = _check(inputs, targets, eps, perturbation, clip_min, clip_max, seed)
    return _amplification(model, inputs, targets, eps, perturbation, clip_min, clip_max, seed)


def error_amplification_ratio(
    model: nn.Module,
    inputs: Tensor,
    *,
    eps: float,
    targets: Tensor | None = None,
    perturbation: Perturbation = "fgsm",
    clip_min: float = 0.0,
    clip_max: float = 1.0,
    seed: int = 0,
) -> float:
    """Error amplification of the quantized ``model`` over that of its float twin.

    ``error_amplification(model) / error_amplification(model in float_mode)``, both as
    defined in the module docstring, each with its own FGSM perturbation (or the same
    random one). The float twin is the same module with quantization switched off in
    place; nothing is copied, and quantization is back on when the function returns.

    Args:
        model: a model quantized by :func:`~lightning_qsec.quant.quantize_model`
            (calibrated or trained), mapping ``inputs`` to logits ``(N, C)``.
        inputs: clean inputs inside ``[clip_min, clip_max]``, at least one sample.
        eps: L-infinity size of the perturbation, in ``(0, clip_max - clip_min]``.
        targets: labels for FGSM, shape ``(N,)``; default each model's own predictions.
        perturbation: ``"fgsm"`` or ``"random"``.
        clip_min: lower bound of the input domain.
        clip_max: upper bound of the input domain.
        seed: seed of the random perturbation.

    Returns:
        The ratio; ``> 1`` means quantization amplifies the perturbation.

    Raises:
        ValueError: a model that is not quantized, or any error of
            :func:`error_amplification`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_qsec import quantize_model, calibrate
        >>> net = quantize_model(nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)),
        ...                      weight_bit_width=4, act_bit_width=4)
        >>> x = torch.rand(16, 1, 8, 8)
        >>> _ = calibrate(net, [(x, torch.zeros(16, dtype=torch.long))], num_batches=1)
        >>> r = error_amplification_ratio(net, x, eps=0.05)
        >>> r > 0
        True
    """
    require_quantized(model)
    eps, clip_min, clip_max = _check(inputs, targets, eps, perturbation, clip_min, clip_max, seed)
    quantized = _amplification(model, inputs, targets, eps, perturbation, clip_min, clip_max, seed)
    with float_mode(model):
        floating = _amplification(model, inputs, targets, eps, perturbation, clip_min, clip_max, seed)
    return quantized / max(floating, _TINY)


def amplification_profile(
    model: nn.Module,
    inputs: Tensor,
    *,
    eps: float,
    targets: Tensor | None = None,
    perturbation: Perturbation = "fgsm",
    clip_min: float = 0.0,
    clip_max: float = 1.0,
    seed: int = 0,
) -> dict[str, float]:
    """Defensive Quantization's layer-by-layer curve: normalized distance at every layer.

    For the clean ``x`` and the perturbed ``x'`` (as in :func:`error_amplification`),
    the mean over samples of ``||f_l(x') - f_l(x)||_2 / ||f_l(x)||_2`` at the input
    (key ``"input"``), at the output of every conv/linear layer (float or Brevitas, keyed
    by module name, in the order the forward pass reaches them), and at the model's
    output (key ``"output"``). ``profile["output"] / profile["input"]`` equals
    :func:`error_amplification`. Compare a quantized model with itself in
    :func:`~lightning_qsec.quant.float_mode` layer by layer to see where quantization
    enlarges the noise (DQ, section 3).

    Args:
        model: maps ``inputs`` ``(N, ...)`` to logits ``(N, C)``, run as it is (pick
            the precision with ``float_mode`` or ``at_precision``).
        inputs: clean inputs inside ``[clip_min, clip_max]``, at least one sample.
        eps: L-infinity size of the perturbation, in ``(0, clip_max - clip_min]``.
        targets: labels for FGSM, shape ``(N,)``; default the model's own predictions.
        perturbation: ``"fgsm"`` (crafted on ``model``) or ``"random"`` (seeded signs).
        clip_min: lower bound of the input domain.
        clip_max: upper bound of the input domain.
        seed: seed of the random perturbation.

    Returns:
        ``{"input": d_0, <layer name>: d_l, ..., "output": d_L}``, insertion-ordered.

    Raises:
        ValueError: as :func:`error_amplification`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        >>> list(amplification_profile(net, torch.rand(8, 1, 8, 8), eps=0.05))
        ['input', '1', '3', 'output']
    """
    from lightning_qsec.attacks._context import as_attack_tensor, attack_mode

    eps, clip_min, clip_max = _check(inputs, targets, eps, perturbation, clip_min, clip_max, seed)
    adv = _perturb(model, inputs, targets, eps, perturbation, clip_min, clip_max, seed)
    with attack_mode(model), torch.no_grad():
        x, adv = as_attack_tensor(inputs), as_attack_tensor(adv)
        clean_layers, clean = _layer_outputs(model, x)
        noisy_layers, noisy = _layer_outputs(model, adv)
    keep = _kept(x, adv)
    profile = {"input": float(_relative(x, adv, keep).mean())}
    for name, value in clean_layers.items():
        profile[name] = float(_relative(value, noisy_layers[name], keep).mean())
    profile["output"] = float(_relative(clean, noisy, keep).mean())
    return profile
