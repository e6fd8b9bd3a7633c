"""Adversarial training (PGD, fast AT, TRADES) of an unchanged LightningModule, from a callback."""

from __future__ import annotations

import math
from typing import Any, Literal, get_args

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_qsec._validation import check_seed
from lightning_qsec.attacks._checks import check_domain
from lightning_qsec.attacks._context import as_attack_tensor, attack_mode, input_gradient
from lightning_qsec.attacks.float_view import FloatView
from lightning_qsec.attacks.pgd import pgd
from lightning_qsec.batch import BatchAdapter, adapter_or_default
from lightning_qsec.defenses._regularizer import (
    Coefficient,
    CoefficientLike,
    add_to_grad,
    check_resumed_config,
    preserved_running_state,
)
from lightning_qsec.distributed import broadcast_from_rank_zero
from lightning_qsec.quant.inspect import is_quantized

__all__ = ["AdversarialTraining", "trades_adversary"]

Method = Literal["pgd", "fgsm_rs", "trades"]
Target = Literal["quantized", "float"]
METHODS: tuple[str, ...] = get_args(Method)
TARGETS: tuple[str, ...] = get_args(Target)
DEFAULT_STEPS = 10
_FGSM_RS_ALPHA = 1.25  # Wong, Rice & Kolter 2020: alpha = 1.25 * eps
_PGD_ALPHA = 2.5  # Madry et al. style: alpha = 2.5 * eps / steps
_TRADES_START = 0.001  # Zhang et al.'s reference code: x + 0.001 * N(0, 1)


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def trades_adversary(
    model: nn.Module,
    inputs: Tensor,
    *,
    eps: float,
    alpha: float,
    steps: int,
    clip_min: float = 0.0,
    clip_max: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """TRADES' inner maximisation: L-infinity PGD on ``KL(p(x) || p(x_adv))``, no labels needed.

    Zhang et al., ICML 2019, https://arxiv.org/abs/1901.08573 (Algorithm 1 and the
    reference code): start at ``x + 0.001 * N(0, I)``, then ``steps`` times
    ``x_adv <- clip(x_adv + alpha * sign(grad KL(softmax(f(x)) || softmax(f(x_adv)))))``
    projected onto the ``eps`` ball and the domain ``[clip_min, clip_max]``. The model
    runs in :func:`~lightning_qsec.attacks.attack_mode` (eval mode, frozen parameters,
    statistics untouched, all restored). Arguments are not checked here:
    :class:`AdversarialTraining` checks them.

    Args:
        model: maps ``inputs`` to logits ``(N, C)``.
        inputs: clean inputs ``(N, ...)`` inside ``[clip_min, clip_max]``.
        eps: L-infinity radius ``>= 0``.
        alpha: step size ``> 0``.
        steps: iterations ``>= 1``.
        clip_min: lower bound of the input domain.
        clip_max: upper bound of the input domain.
        generator: random generator for the start point (device of ``inputs``).

    Returns:
        Detached adversarial inputs, shape of ``inputs``.
    """
    with attack_mode(model):
        x = as_attack_tensor(inputs)
        if x.shape[0] == 0:
            return x.clone()
        low = torch.clamp(x - eps, min=clip_min)
        high = torch.clamp(x + eps, max=clip_max)
        with torch.no_grad():
            p_clean = F.softmax(model(x).float(), dim=1)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x_adv = torch.clamp(x + _TRADES_START * noise, low, high)
        for _ in range(steps):
            x_adv.requires_grad_(True)
            log_p_adv = F.log_softmax(model(x_adv).float(), dim=1)
            grad = input_gradient(F.kl_div(log_p_adv, p_clean, reduction="sum"), x_adv)
            del log_p_adv
            x_adv = torch.clamp(x_adv.detach().add_(grad.sign_(), alpha=alpha), low, high)
        return x_adv.detach()


class AdversarialTraining(pl.Callback):
    """Adversarial training of the quantized (or float) model, by adding one callback.

    Three methods:

    * ``"pgd"``: Madry et al., "Towards Deep Learning Models Resistant to Adversarial
      Attacks", ICLR 2018, https://arxiv.org/abs/1706.06083. ``steps`` steps of
      L-infinity PGD with a random start; default ``alpha = 2.5 * eps / steps``.
    * ``"fgsm_rs"``: "fast AT" of Wong, Rice & Kolter, "Fast is better than free:
      Revisiting adversarial training", ICLR 2020, https://arxiv.org/abs/2001.03994.
      A uniform random start in the ``eps`` ball, then one FGSM step of size ``alpha``
      (default ``1.25 * eps``), projected back onto the ball and the domain. One attack
      step per batch, so an epoch costs about twice a plain one.
    * ``"trades"``: Zhang, Yu, Jiao, Xing, El Ghaoui & Jordan, "Theoretically
      Principled Trade-off between Robustness and Accuracy", ICML 2019,
      https://arxiv.org/abs/1901.08573. The objective is the user's loss on the
      *clean* batch plus ``trades_beta * KL(p(x) || p(x_adv))`` (batch mean), with
      ``x_adv`` from PGD on that KL (:func:`trades_adversary`, default
      ``alpha = 2.5 * eps / steps``).

    Mechanism (the LightningModule, its ``training_step`` and ``forward`` are not
    changed; nothing is wrapped):

    * At ``on_train_batch_start`` the batch is read by ``batch_adapter`` (default
      :func:`~lightning_qsec.read_batch`) and adversarial inputs are crafted for its
      first ``round(ratio * N)`` rows with the package's attacks, against
      ``pl_module(x)`` (``forward`` must return logits): the model as it trains
      (``on="quantized"``, fake-quantized through Brevitas' straight-through estimator,
      at the precision :class:`~lightning_qsec.defenses.RandomPrecisionTraining` drew if
      it comes *before* this callback in ``callbacks``), or its float twin
      (``on="float"``, inside :func:`~lightning_qsec.float_mode`). The attacks run in
      eval mode with frozen parameters (no BatchNorm or Brevitas statistics consumed,
      no ``.grad`` written, modes restored).
    * ``pgd`` / ``fgsm_rs``: the adversarial rows are written **into the batch's input
      tensor in place** (``inputs[:k].copy_(x_adv)``), so the user's ``training_step``
      trains on them with its own loss. The clean values are copied back at
      ``on_train_batch_end`` (and on an exception), so a loader that hands out stored
      tensors or views of your dataset never sees them changed.
    * ``trades``: the batch is left clean. In ``on_after_backward`` (once per
      micro-batch) the callback runs the model on the clean and adversarial rows, in
      the train/eval mode of training, and adds the gradient of
      ``trades_beta * KL / accumulate_grad_batches`` (times the AMP loss scale when a
      ``GradScaler`` runs) to the parameters' ``.grad``, all-reduced (mean) over DDP
      ranks, the mechanism of :mod:`lightning_qsec.defenses._regularizer`. Those extra
      forward passes restore BatchNorm running statistics and Brevitas activation
      statistics still being collected, and run with a forked RNG. Cost per batch:
      ``steps + 1`` attack passes plus two forwards and one backward.

    ``eps`` takes the coefficient form of the regularizers (a number, or
    ``(epoch, value)`` milestones, piecewise constant), and with ``warmup_epochs > 0``
    it is further multiplied by a linear ramp from 0 (first step) to 1 (end of the
    warm-up), updated every step: ``eps_at(e) = eps(floor(e)) * min(1, e / warmup_epochs)``
    with ``e = current_epoch + batch_idx / num_training_batches`` (``e = current_epoch``
    when the loader has no length). While ``eps`` is 0 no
    attack runs. A default ``alpha`` follows the current ``eps``; an explicit one is
    absolute.

    Randomness (random starts) comes from a generator seeded, for each micro-batch,
    from ``(seed, global rank, epoch, batch_idx)``: deterministic, different on every
    DDP rank, independent of the global RNG and exactly reproduced by a resumed run.
    ``state_dict`` holds the configuration (a resume with other settings is refused),
    that seeding scheme and the count of attacked batches.

    Logged every step: ``qsec/adv/eps`` (the current radius) and ``qsec/adv/alpha``;
    for ``trades`` also ``qsec/adv/trades_kl`` (the KL term before ``trades_beta``) and
    ``qsec/adv/trades_beta``. For ``pgd``/``fgsm_rs`` the adversarial loss is the
    user's own training loss (e.g. ``train_loss``).

    DDP: each rank crafts the adversarial rows of its own batch; ``pgd``/``fgsm_rs``
    gradients are averaged by DDP as usual, TRADES' extra gradients by an all-reduce.

    Args:
        method: ``"pgd"``, ``"fgsm_rs"`` or ``"trades"``.
        eps: L-infinity radius in input units, in ``[0, clip_max - clip_min]``, or
            ``(epoch, eps)`` milestones from epoch 0. Default 0.1 (for ``[0, 1]`` images).
        alpha: step size ``> 0``; ``None`` for the method's default.
        steps: attack iterations ``>= 1`` for ``pgd`` and ``trades`` (``None``: 10).
            ``fgsm_rs`` is one step by definition: only ``None`` or 1.
        ratio: fraction of each batch made adversarial, in ``(0, 1]``.
        warmup_epochs: epochs of the linear eps ramp from 0, an integer ``>= 0``.
        on: ``"quantized"`` (the model as it trains) or ``"float"`` (its float twin;
            the model must be quantized).
        trades_beta: TRADES' ``beta >= 0`` (the paper uses 6 on CIFAR-10); ignored by
            the other methods.
        clip_min: lower bound of the input domain.
        clip_max: upper bound of the input domain.
        batch_adapter: reads a batch into a :class:`~lightning_qsec.Batch` whose
            ``inputs`` is the very tensor the batch holds (not a copy), so that the
            in-place write reaches ``training_step``.
        seed: seed of the random starts, an integer ``>= 0``.

    Raises:
        ValueError: a bad argument, naming it (at construction); a second instance,
            manual optimization, or ``on="float"`` with a model that is not quantized
            (at the start of training); a batch whose inputs lie outside
            ``[clip_min, clip_max]`` (at that batch).

    Example:
        >>> import pytorch_lightning as pl
        >>> from lightning_qsec.callbacks import QuantizationAwareTraining
        >>> from lightning_qsec.data import DigitsDataModule
        >>> from lightning_qsec.defenses import AdversarialTraining
        >>> from lightning_qsec.models import ClassificationModule, DigitsCNN
        >>> at = AdversarialTraining("fgsm_rs", eps=0.1, warmup_epochs=1)
        >>> at.alpha_for(0.1)  # Wong et al.'s 1.25 * eps
        0.125
        >>> trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0,
        ...                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...                      enable_model_summary=False,
        ...                      callbacks=[QuantizationAwareTraining(4, 4), at])
        >>> trainer.fit(ClassificationModule(DigitsCNN()), DigitsDataModule())
        >>> at.batches_attacked
        1
    """

    def __init__(
        self,
        method: Method = "pgd",
        *,
        eps: CoefficientLike = 0.1,
        alpha: float | None = None,
        steps: int | None = None,
        ratio: float = 1.0,
        warmup_epochs: int = 0,
        on: Target = "quantized",
        trades_beta: float = 6.0,
        clip_min: float = 0.0,
        clip_max: float = 1.0,
        batch_adapter: BatchAdapter | None = None,
        seed: int = 0,
    ) -> None:
        if not isinstance(method, str) or method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(repr(m) for m in METHODS)}, got {method!r}")
        if not isinstance(on, str) or on not in TARGETS:
            raise ValueError(f"on must be one of {', '.join(repr(t) for t in TARGETS)}, got {on!r}")
        self.clip_min, self.clip_max = check_domain(clip_min, clip_max)
        self.eps = Coefficient(eps, "eps")
        width = self.clip_max - self.clip_min
        for epoch, value in self.eps.milestones:
            if value > width:
                where = "" if self.eps.constant else f" (milestone at epoch {epoch})"
                raise ValueError(
                    f"eps must be at most clip_max - clip_min = {width:g}, the largest L-infinity distance inside "
                    f"the input domain, got {value!r}{where}"
                )
        if alpha is not None and (not _is_number(alpha) or not math.isfinite(alpha) or alpha <= 0):
            raise ValueError(f"alpha must be a finite number > 0, or None for the method's default, got {alpha!r}")
        if method == "fgsm_rs":
            if steps not in (None, 1) or isinstance(steps, bool):
                raise ValueError(f"steps must be None or 1 for method='fgsm_rs' (one FGSM step by definition), got {steps!r}")
            steps = 1
        elif steps is None:
            steps = DEFAULT_STEPS
        elif isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        if not _is_number(ratio) or not math.isfinite(ratio) or not 0.0 < ratio <= 1.0:
            raise ValueError(f"ratio must be a number in (0, 1], the fraction of each batch made adversarial, got {ratio!r}")
        if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be an integer >= 0, got {warmup_epochs!r}")
        if not _is_number(trades_beta) or not math.isfinite(trades_beta) or trades_beta < 0:
            raise ValueError(f"trades_beta must be a finite number >= 0, got {trades_beta!r}")
        if batch_adapter is not None and not callable(batch_adapter):
            raise ValueError(f"batch_adapter must be a callable batch -> lightning_qsec.Batch or None, got {batch_adapter!r}")
        check_seed(seed, non_negative=True)
        self.method: Method = method
        self.on: Target = on
        self.alpha = None if alpha is None else float(alpha)
        self.steps: int = steps
        self.ratio = float(ratio)
        self.warmup_epochs = warmup_epochs
        self.trades_beta = float(trades_beta)
        self.seed = seed
        self._read = adapter_or_default(batch_adapter, owner=type(self).__name__)
        self.batches_attacked = 0
        self._trades: tuple[Tensor, Tensor] | None = None
        self._clean: tuple[Tensor, Tensor] | None = None  # (the batch rows written, their clean values)

    # -- configuration -------------------------------------------------------------------

    @property
    def state_key(self) -> str:
        # One per Trainer (checked in setup); a fixed key lets a resume with other settings be refused.
        return "AdversarialTraining"

    def config(self) -> dict[str, Any]:
        """The settings saved in ``state_dict`` and compared on resume."""
        return {
            "method": self.method,
            "eps": self.eps.to_state(),
            "alpha": self.alpha,
            "steps": self.steps,
            "ratio": self.ratio,
            "warmup_epochs": self.warmup_epochs,
            "on": self.on,
            "trades_beta": self.trades_beta,
            "clip_min": self.clip_min,
            "clip_max": self.clip_max,
            "seed": self.seed,
        }

    def eps_at(self, epoch: float) -> float:
        """The radius at fractional epoch ``epoch`` (``current_epoch + batch_idx / batches``)."""
        value = self.eps.at(int(math.floor(epoch)))
        if self.warmup_epochs > 0:
            value *= min(1.0, max(0.0, epoch) / self.warmup_epochs)
        return value

    def alpha_for(self, eps: float) -> float:
        """The step size used at radius ``eps``: ``alpha`` if given, else the method's default."""
        if self.alpha is not None:
            return self.alpha
        if self.method == "fgsm_rs":
            return _FGSM_RS_ALPHA * eps
        return _PGD_ALPHA * eps / self.steps

    def _progress(self, trainer: pl.Trainer, batch_idx: int) -> float:
        batches = trainer.num_training_batches
        if isinstance(batches, (int, float)) and math.isfinite(batches) and batches > 0:
            return trainer.current_epoch + min(batch_idx / batches, 1.0)
        return float(trainer.current_epoch)

    # -- lifecycle -----------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        callbacks = list(trainer.callbacks)
        same = [c for c in callbacks if isinstance(c, AdversarialTraining)]
        if len(same) > 1:
            raise ValueError(f"callbacks: use one AdversarialTraining per Trainer, got {len(same)}")
        if not pl_module.automatic_optimization:
            raise ValueError(
                "AdversarialTraining needs automatic optimization; with manual optimization craft the "
                "adversarial inputs in training_step with lightning_qsec.attacks"
            )
        from lightning_qsec.defenses.random_precision import RandomPrecisionTraining

        mine = callbacks.index(self)
        if any(isinstance(c, RandomPrecisionTraining) for c in callbacks[mine + 1 :]):
            rank_zero_warn(
                "AdversarialTraining comes before RandomPrecisionTraining in callbacks, so adversarial inputs "
                "are crafted at the configured precision, not the precision drawn for the step; list "
                "RandomPrecisionTraining first to attack the drawn precision (as in Double-Win Quant)"
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.on == "float" and not is_quantized(pl_module):
            raise ValueError(
                "on='float' crafts adversarial inputs on the float twin of a quantized model, but the "
                "LightningModule has no quantized layers; add QuantizationAwareTraining or use on='quantized'"
            )

    def _generator(self, trainer: pl.Trainer, device: torch.device, batch_idx: int) -> torch.Generator:
        # One seed per micro-batch position: resume-exact and distinct across DDP ranks.
        key = (self.seed, trainer.global_rank, trainer.current_epoch, batch_idx)
        seed = 0
        for part in key:
            seed = (seed * 1_000_003 + int(part)) % (2**63 - 1)
        return torch.Generator(device=device).manual_seed(seed)

    def _target(self, pl_module: nn.Module) -> nn.Module:
        return FloatView(pl_module) if self.on == "float" else pl_module

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._trades = None
        eps = self.eps_at(self._progress(trainer, batch_idx))
        alpha = self.alpha_for(eps)
        pl_module.log("qsec/adv/eps", float(eps))
        pl_module.log("qsec/adv/alpha", float(alpha))
        if eps <= 0:
            return
        read = self._read(batch)
        inputs, targets = read.inputs, read.targets
        if not isinstance(inputs, Tensor) or not inputs.is_floating_point():
            raise ValueError(
                f"AdversarialTraining needs floating-point batch inputs, got "
                f"{type(inputs).__name__ if not isinstance(inputs, Tensor) else inputs.dtype}"
            )
        count = int(round(self.ratio * inputs.shape[0]))
        if count == 0:
            return
        x, y = inputs[:count], targets[:count]
        if trainer.world_size > 1:
            # The attack runs the module itself, not the DDP wrapper: start from rank 0's buffers
            # (BatchNorm running statistics), as the next synchronised forward would, so every rank
            # crafts against the model a checkpoint holds and a resumed run crafts the same inputs.
            broadcast_from_rank_zero(pl_module.buffers())
        generator = self._generator(trainer, inputs.device, batch_idx)
        target = self._target(pl_module)
        with trainer.precision_plugin.forward_context():
            if self.method == "trades":
                _check_domain(x, self.clip_min, self.clip_max)
                x_adv = trades_adversary(
                    target, x, eps=eps, alpha=alpha, steps=self.steps,
                    clip_min=self.clip_min, clip_max=self.clip_max, generator=generator,
                )
            else:
                x_adv = pgd(
                    target, x, y, eps=eps, alpha=alpha, steps=self.steps, random_start=True,
                    clip_min=self.clip_min, clip_max=self.clip_max, generator=generator,
                )
        if self.method == "trades":
            self._trades = (x, x_adv.to(x.dtype))
        else:
            with torch.no_grad():
                self._clean = (x, x.clone())
                x.copy_(x_adv)
        self.batches_attacked += 1

    def _restore_clean(self) -> None:
        if self._clean is not None:
            x, clean = self._clean
            self._clean = None
            with torch.no_grad():
                x.copy_(clean)

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._trades is None:
            return
        x, x_adv = self._trades
        self._trades = None
        params = [p for p in pl_module.parameters() if p.requires_grad]
        if all(p.grad is None for p in params):
            return  # the user's step skipped backward
        scale = self.trades_beta / trainer.accumulate_grad_batches
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            scale *= float(scaler.get_scale())
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        with torch.inference_mode(False), torch.enable_grad(), preserved_running_state(pl_module):
            with torch.random.fork_rng(devices=devices):
                with trainer.precision_plugin.forward_context():
                    logits_clean = pl_module(x)
                    logits_adv = pl_module(x_adv)
                kl = F.kl_div(
                    F.log_softmax(logits_adv.float(), dim=1), F.softmax(logits_clean.float(), dim=1),
                    reduction="batchmean",
                )
                extra = torch.autograd.grad(scale * kl, params, allow_unused=True) if scale > 0 else [None] * len(params)
        used = [(p, g.detach()) for p, g in zip(params, extra) if g is not None]
        if trainer.world_size > 1 and used:
            # Data-dependent: average over ranks, as DDP averages the loss gradient. Every rank runs the
            # same graph, so the same parameters are used on all of them.
            flat = trainer.strategy.reduce(torch.cat([g.reshape(-1) for _, g in used]), reduce_op="mean")
            used = [(p, g.view_as(p)) for (p, _), g in zip(used, torch.split(flat, [p.numel() for p, _ in used]))]
        add_to_grad([p for p, _ in used], [g for _, g in used])
        pl_module.log("qsec/adv/trades_kl", kl.detach().float())
        pl_module.log("qsec/adv/trades_beta", self.trades_beta)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._trades = None
        self._restore_clean()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._trades = None
        self._restore_clean()

    # -- state ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": self.config(),
            # The random state is a function of these and of the loop position Lightning restores.
            "rng": {"scheme": "per-batch(seed, global_rank, epoch, batch_idx)", "seed": self.seed},
            "batches_attacked": self.batches_attacked,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_resumed_config("AdversarialTraining", state_dict.get("config"), self.config())
        self.batches_attacked = int(state_dict.get("batches_attacked", 0))


def _check_domain(x: Tensor, clip_min: float, clip_max: float) -> None:
    if x.numel() == 0:
        return
    if torch.isnan(x).any():
        raise ValueError("inputs contain NaN")
    low, high = float(x.min()), float(x.max())
    if low < clip_min or high > clip_max:
        raise ValueError(
            f"inputs must lie in the input domain [clip_min, clip_max] = [{clip_min:g}, {clip_max:g}], got "
            f"values in [{low:g}, {high:g}]; pass the domain of your (e.g. normalised) inputs as clip_min/clip_max"
        )
