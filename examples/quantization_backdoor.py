"""A model that is clean in float and backdoored once quantized: build it, scan it, repair it.

The threat: someone publishes float weights that behave well, but once *you* quantize them
to 4 bits a 2x2 white patch sends every input to class 0 (PQBackdoor-style; Ma et al.,
2021). Float-only defenses see nothing. This script plays both sides on scikit-learn digits:

1. **Red team.** Train a clean :class:`~lightning_qsec.models.DigitsCNN`, then turn it
   into such a model with :func:`lightning_qsec.attacks.quantization_conditioned_attack`
   (``mode="backdoor"``) and show float vs 4-bit attack success through the victim's own
   pipeline (:func:`lightning_qsec.attacks.victim_quantize`).
2. **Scan before deploying.** :func:`lightning_qsec.defenses.scan_model` compares the float
   model with the quantized twins your quantizer would produce (8 and 4 bits, per tensor)
   and says whether the model is suspicious, with the evidence.
3. **Repair.** :func:`lightning_qsec.defenses.repair_quantization_backdoor` re-chooses the
   4-bit rounding of every weight from clean data (EFRAP's flipped rounding) and reports
   clean accuracy and attack success before and after.

Run (offline, about a minute on CPU)::

    python examples/quantization_backdoor.py --epochs 15
"""

from __future__ import annotations

import argparse

import torch
from torch.nn import functional as F

from lightning_qsec.attacks import add_trigger, quantization_conditioned_attack, victim_quantize
from lightning_qsec.data import DigitsDataModule
from lightning_qsec.defenses import repair_quantization_backdoor, scan_model
from lightning_qsec.metrics import AttackSuccessRate
from lightning_qsec.models import DigitsCNN

TARGET_CLASS = 0


@torch.no_grad()
def accuracy_and_asr(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Clean accuracy and BackdoorBench's attack success rate of ``model`` on ``(x, y)``.

    Args:
        model: a classifier returning logits.
        x: clean test inputs.
        y: their labels.

    Returns:
        ``(accuracy, asr)``, both in ``[0, 1]``.
    """
    model.eval()
    clean = model(x)
    asr = AttackSuccessRate(targeted=True)
    asr.update(clean, model(add_trigger(x)), y, attack_target=TARGET_CLASS)
    return float((clean.argmax(1) == y).float().mean()), float(asr.compute())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15, help="clean training epochs (at least 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.epochs < 1:
        parser.error(f"--epochs must be at least 1, got {args.epochs}")
    torch.manual_seed(args.seed)
    dm = DigitsDataModule(batch_size=64, seed=args.seed)
    dm.setup()
    x, y = dm.test_dataset.tensors

    clean = DigitsCNN()
    optimizer = torch.optim.Adam(clean.parameters(), lr=3e-3)
    for _ in range(args.epochs):
        for xb, yb in dm.train_dataloader():
            optimizer.zero_grad()
            F.cross_entropy(clean(xb), yb).backward()
            optimizer.step()
    clean.eval()

    # 1. red team: a float model whose 4-bit deployment carries the backdoor
    attacked = quantization_conditioned_attack(
        clean, dm.train_dataloader(), mode="backdoor", target_class=TARGET_CLASS, seed=args.seed
    )
    for name, model in (("clean", clean), ("attacked", attacked)):
        deployed = victim_quantize(model, dm.train_dataloader(), bit_width=4)
        (acc_f, asr_f), (acc_q, asr_q) = accuracy_and_asr(model, x, y), accuracy_and_asr(deployed, x, y)
        print(f"{name}: float accuracy {acc_f:.3f}, ASR {asr_f:.3f} | 4-bit accuracy {acc_q:.3f}, ASR {asr_q:.3f}")

    # 2. scan both before deploying (the deployer's quantizer: per-tensor weights, 8-bit activations)
    for name, model in (("clean", clean), ("attacked", attacked)):
        result = scan_model(model, dm.val_dataloader(), bit_widths=(8, 4), progress=False, seed=args.seed)
        print(f"scan {name}: suspicious={result.suspicious} score={result.score:.2f} "
              f"(threshold {result.threshold:g}) flagged={result.flagged} suspect class={result.target_class}")

    # 3. repair the attacked model for a 4-bit deployment
    repaired = repair_quantization_backdoor(
        attacked, dm.train_dataloader(), bit_width=4, eval_loader=dm.test_dataloader(),
        trigger=add_trigger, target_class=TARGET_CLASS, seed=args.seed,
    )
    r = repaired.report
    print(f"repair ({r.method}): 4-bit ASR {r.asr_before:.3f} -> {r.asr_after:.3f}, "
          f"clean accuracy {r.clean_acc_before:.3f} -> {r.clean_acc_after:.3f} (float {r.clean_acc_float:.3f}), "
          f"DER {r.der:.3f}")


if __name__ == "__main__":
    main()
