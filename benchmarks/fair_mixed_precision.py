"""FairQuanti-style neuron-level mixed precision on Adult: does protecting biased neurons help?

Claim (issue 5, "fair_mixed_precision"): giving the neurons that carry the sensitive
attribute's effect the high bit width lowers the worst-group accuracy drop (float ->
quantized) and the fairness gaps, compared with uniform low-bit PTQ at the same low bit
width and with a random choice of neurons at the same budget.

Method. Data: :class:`~lightning_qsec.data.AdultDataModule` with
``include_sensitive_feature=True`` (the flip needs the attribute among the features),
``--sensitive`` sex and race, seed = split seed = init seed. Model: ``TabularMLP``
(64, 32 hidden; 98 neurons), trained in float ``--epochs`` epochs (Adam, lr 3e-3, batch
256). Flip: sex swaps the ``sex=Female``/``sex=Male`` one-hot columns
(``sensitive_attribute_index``); race maps ``White`` -> ``Black`` and every non-White
race -> ``White`` (``flip_fn``). Scoring and calibration use the first batches of the
unshuffled training split. Variants, all weights per-channel, activations and input at
``--act-bits``, calibrated on the same 10 batches:

* ``uniform``: every weight at the low bit width (``quantize_model``);
* ``fair``: ``fair_mixed_precision`` (``--fraction`` of the neurons, the most biased, at
  ``--high-bits``);
* ``random``: the same number of high-precision neurons in every layer as ``fair``,
  chosen at random (``quantize_neurons``): the same bit budget exactly;
* ``importance`` (control): the same per-layer counts, chosen by the same attribution
  but against an all-zero input instead of the flipped one (``neuron_bias_scores`` with
  ``flip_fn=torch.zeros_like``): neurons important for the output in general, not for
  the sensitive attribute. If ``fair`` does no better than this, its gain comes from
  protecting important neurons, not biased ones.

Measured on Adult's official test split, per seed, then mean ± std over seeds: overall
accuracy; worst-group drop = max over the two groups of (float group accuracy - quantized
group accuracy); demographic parity difference and equalized odds difference
(``lightning_qsec.metrics.functional``). PASS per sensitive attribute and low bit width
if the mean worst-group drop of ``fair`` is below both ``uniform``'s and ``random``'s; the
number of seeds where ``fair`` is lower is printed too, since a mean gap smaller than the
std is not evidence.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Any

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_qsec import calibrate, quantize_model
from lightning_qsec.data import AdultDataModule
from lightning_qsec.defenses import fair_mixed_precision, neuron_bias_scores, quantize_neurons
from lightning_qsec.metrics.functional import demographic_parity_difference, equalized_odds_difference
from lightning_qsec.models import TabularMLP


def train_float(dm: AdultDataModule, seed: int, epochs: int) -> TabularMLP:
    torch.manual_seed(seed)
    model = TabularMLP(dm.num_features)
    x, y, _ = dm.train_dataset.tensors
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(256):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def race_flip(names: list[str]):
    white, black = names.index("race=White"), names.index("race=Black")
    race = [i for i, n in enumerate(names) if n.startswith("race=")]

    def flip(x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        is_white = x[:, white] == 1
        out[:, race] = 0
        out[:, black] = is_white.to(x.dtype)
        out[:, white] = (~is_white).to(x.dtype)
        return out

    return flip


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, g: torch.Tensor) -> dict[str, Any]:
    with torch.no_grad():
        pred = model.eval()(x).argmax(1)
    return {
        "acc": (pred == y).double().mean().item(),
        "group_acc": [(pred[g == k] == y[g == k]).double().mean().item() for k in (0, 1)],
        "dpd": float(demographic_parity_difference(pred, y, g)),
        "eod": float(equalized_odds_difference(pred, y, g)),
    }


def run(sensitive: str, seed: int, args: argparse.Namespace) -> dict[str, dict[str, dict[str, Any]]]:
    dm = AdultDataModule(sensitive=sensitive, include_sensitive_feature=True, seed=seed)
    dm.setup("fit")
    dm.setup("test")
    names = dm.feature_names
    model = train_float(dm, seed, args.epochs)
    xt, yt, gt = dm.test_dataset.tensors
    calib = DataLoader(TensorDataset(*dm.train_dataset.tensors), batch_size=256, shuffle=False)
    if sensitive == "sex":
        flip = {"sensitive_attribute_index": [names.index("sex=Female"), names.index("sex=Male")]}
    else:
        flip = {"flip_fn": race_flip(names)}
    out: dict[str, dict[str, dict[str, Any]]] = {}
    ref = evaluate(model, xt, yt, gt)
    # control: the same attribution against an all-zero input instead of the flipped one
    importance, _, _ = neuron_bias_scores(model, calib, flip_fn=torch.zeros_like, num_batches=args.score_batches)
    for low in args.low_bits:
        res: dict[str, dict[str, Any]] = {"float": ref}
        uniform = quantize_model(copy.deepcopy(model), weight_bit_width=low, act_bit_width=args.act_bits, per_channel=True)
        res["uniform"] = evaluate(calibrate(uniform, calib, num_batches=10), xt, yt, gt)
        fair, info = fair_mixed_precision(
            copy.deepcopy(model), calib, **flip, high_precision_fraction=args.fraction, low_bit_width=low,
            high_bit_width=args.high_bits, act_bit_width=args.act_bits, score_batches=args.score_batches,
        )  # fmt: skip
        res["fair"] = evaluate(fair, xt, yt, gt)
        gen = torch.Generator().manual_seed(1000 + seed)
        chosen = {
            n: torch.randperm(len(info.scores[n]), generator=gen)[: len(r)].tolist()
            for n, r in info.high_precision_neurons.items()
        }
        rand = quantize_neurons(copy.deepcopy(model), chosen, low_bit_width=low, high_bit_width=args.high_bits,
                                act_bit_width=args.act_bits)  # fmt: skip
        res["random"] = evaluate(calibrate(rand, calib, num_batches=10), xt, yt, gt)
        top = {n: importance[n].argsort(descending=True)[: len(r)].tolist() for n, r in info.high_precision_neurons.items()}
        imp = quantize_neurons(copy.deepcopy(model), top, low_bit_width=low, high_bit_width=args.high_bits,
                               act_bit_width=args.act_bits)  # fmt: skip
        res["importance"] = evaluate(calibrate(imp, calib, num_batches=10), xt, yt, gt)
        for r in res.values():
            r["drop"] = max(f - q for f, q in zip(ref["group_acc"], r["group_acc"]))
        res["fair"]["info"] = info
        out[f"w{low}"] = res
        print(f"{sensitive} seed {seed} w{low}: "
              + "  ".join(f"{k} acc {r['acc']:.4f} drop {r['drop']:+.4f} dpd {r['dpd']:.4f} eod {r['eod']:.4f}"
                          for k, r in res.items())
              + f"  | avg bits {info.average_bit_width:.3f}, flip changes {info.prediction_flip_rate:.2%} of preds, "
              f"high per layer {[len(r) for r in info.high_precision_neurons.values()]}", flush=True)  # fmt: skip
    return out


def ms(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--sensitive", nargs="+", default=["sex", "race"], choices=["sex", "race"])
    p.add_argument("--low-bits", type=int, nargs="+", default=[3, 2])
    p.add_argument("--high-bits", type=int, default=8)
    p.add_argument("--act-bits", type=int, default=8)
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--score-batches", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()
    for sensitive in args.sensitive:
        runs = [run(sensitive, seed, args) for seed in args.seeds]
        for low in args.low_bits:
            rows = [r[f"w{low}"] for r in runs]
            bits = [r["fair"]["info"].average_bit_width for r in rows]
            print(f"\nAdult ({sensitive}), weights w{low} / high w{args.high_bits} for {args.fraction:.0%} of neurons "
                  f"(average {ms(bits)} bits), activations a{args.act_bits}, {args.epochs} epochs, seeds {args.seeds}")
            print("| variant | accuracy | worst-group drop | demographic parity diff | equalized odds diff |")
            print("|---|---|---|---|---|")
            for name in ("float", "uniform", "random", "importance", "fair"):
                print(f"| {name} | {ms([r[name]['acc'] for r in rows])} | {ms([r[name]['drop'] for r in rows])} | "
                      f"{ms([r[name]['dpd'] for r in rows])} | {ms([r[name]['eod'] for r in rows])} |")
            others = ("uniform", "random", "importance")
            drop = {k: statistics.mean(r[k]["drop"] for r in rows) for k in (*others, "fair")}
            ok = drop["fair"] < drop["uniform"] and drop["fair"] < drop["random"]
            wins = {k: sum(r["fair"]["drop"] < r[k]["drop"] for r in rows) for k in others}
            print(f"fair worst-group drop {drop['fair']:+.4f} vs uniform {drop['uniform']:+.4f} and random "
                  f"{drop['random']:+.4f} -> {'PASS' if ok else 'MISS'} (fair lower in "
                  + ", ".join(f"{wins[k]}/{len(rows)} seeds vs {k}" for k in others)
                  + f"; control importance {drop['importance']:+.4f})")
    print(f"\n[{time.time() - start:.0f} s]")


if __name__ == "__main__":
    main()
