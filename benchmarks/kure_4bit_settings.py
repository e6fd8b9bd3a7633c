"""Is there a 4-bit PTQ setting on MNIST-5k where KURE has room to help? (issue 3, one seed)

KURE (Shkolnik et al., NeurIPS 2020, https://arxiv.org/abs/2002.07686) raises post-training
4-bit accuracy of ImageNet ResNets, whose unregularized 4-bit PTQ loses many points. This
pilot trains an unregularized ``MNISTCNN`` twin and a ``KurtosisRegularization(lam)`` model
from the same seed (``regularizers.fit``) and scores both, float and after PTQ
(``quantize_model`` + ``calibrate`` on 10 training batches), at settings fixed in advance:
4-bit weight-only (input not quantized, 16-bit activations) per tensor and per channel,
3-bit weight-only per tensor, w4a8 without input quantization, and w4a4. It prints each
layer's weight kurtosis (conv1, conv2, fc1, fc2) so the tails can be compared.

``--net batchnorm`` scores :class:`~lightning_qsec.models.MNISTBatchNormCNN` instead
(convolution-BatchNorm blocks, the layout of KURE's ResNets); its seed-0 run is the pilot
that chose that network for ``benchmarks/regularizers.py --net batchnorm``.

Run: ``.venv/bin/python benchmarks/kure_4bit_settings.py [--net mnistcnn|batchnorm] [--width 16]
[--epochs 10] [--lr 1e-3] [--lam 1.0] [--seed 0]`` (about 30 s to 3 min per run on 1 thread).
"""

from __future__ import annotations

import argparse
import copy
import logging
import warnings

import pytorch_lightning as pl
import torch

import regularizers
from lightning_qsec import calibrate, quantize_model
from lightning_qsec.data import MNIST5kDataModule
from lightning_qsec.defenses import KurtosisRegularization
from lightning_qsec.defenses._regularizer import regularized_weights
from lightning_qsec.defenses.kurtosis import kurtosis
from lightning_qsec.models import MNISTCNN, ClassificationModule, MNISTBatchNormCNN

SETTINGS = {
    "w4 weight-only per-tensor": dict(weight_bit_width=4, act_bit_width=16, quantize_input=False),
    "w3 weight-only per-tensor": dict(weight_bit_width=3, act_bit_width=16, quantize_input=False),
    "w4 weight-only per-channel": dict(weight_bit_width=4, act_bit_width=16, quantize_input=False, per_channel=True),
    "w4a8 no input quantization": dict(weight_bit_width=4, act_bit_width=8, quantize_input=False),
    "w4a4": dict(weight_bit_width=4, act_bit_width=4),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--net", choices=["mnistcnn", "batchnorm"], default="mnistcnn")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lam", type=float, default=1.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    dm = MNIST5kDataModule(batch_size=64, seed=args.seed)
    dm.setup()
    x, y = dm.test_dataset.tensors
    network = MNISTBatchNormCNN if args.net == "batchnorm" else MNISTCNN
    print(f"{network.__name__}(width={args.width}), {args.epochs} epochs, lr {args.lr}, seed {args.seed}; accuracy in %")
    for name, callbacks in (("twin", []), (f"KURE lam {args.lam}", [KurtosisRegularization(lam=args.lam)])):
        pl.seed_everything(args.seed, verbose=False)
        module = ClassificationModule(network(width=args.width), lr=args.lr)
        cpu = regularizers.fit(module, dm, args.epochs, callbacks, None)
        row = {"float": regularizers.accuracy(module.net, x, y)}
        for label, settings in SETTINGS.items():
            quantized = quantize_model(copy.deepcopy(module.net), **settings)
            calibrate(quantized, dm.train_dataloader(), num_batches=10)
            row[label] = regularizers.accuracy(quantized, x, y)
        tails = [round(float(kurtosis(w.detach())), 1) for _, w in regularized_weights(module.net)]
        print(f"{name}: fit {cpu:.0f} s CPU, kurtosis {tails}")
        print("  " + " | ".join(f"{k} {v:.1f}" for k, v in row.items()), flush=True)


if __name__ == "__main__":
    main()
