"""State DDP does not synchronise by itself stays identical across 2 ranks (gloo, CPU).

* ``scales``: QAT with ``calibrate_batches=0`` and gradient accumulation: Brevitas collects
  activation statistics per rank inside ``no_sync`` micro-batches; the scales must still end
  equal on every rank (one model, not two).
* ``twin``: ``PrecisionSweep`` on a float model inside ``fit``: every rank must calibrate the
  same post-training-quantized twin (on all ranks' batches).
* ``resume``: a conv-BatchNorm network with QAT, ``RandomPrecisionTraining(switchable_bn=True)``
  and PGD ``AdversarialTraining``, no validation: the per-precision BatchNorm statistics stay
  equal across ranks, and a run resumed after epoch 1 ends exactly where an uninterrupted one does.
* ``delay``: ``QuantizationAwareTraining(float_epochs=1)``: one float epoch, then calibration (on
  all ranks' batches) and QAT; equal on both ranks, and a resume after the float epoch is exact.
"""

from __future__ import annotations

import json
import re

from conftest import run_ddp_script

_SCRIPT = '''
import hashlib, json, os, sys
os.environ.setdefault("PL_DISABLE_FORK", "1")
mode, ckpt = sys.argv[1], sys.argv[2]
import pytorch_lightning as pl
import torch
torch.set_num_threads(1)
from lightning_qsec.callbacks import PrecisionSweep, QuantizationAwareTraining
from lightning_qsec.data import DigitsDataModule
from lightning_qsec.defenses import AdversarialTraining, RandomPrecisionTraining
from lightning_qsec.distributed import shutdown_distributed
from lightning_qsec.models import ClassificationModule, DigitsCNN, MNISTBatchNormCNN
from lightning_qsec.quant.inspect import stat_scalers


def digest(tensors):
    flat = [t.detach().flatten().double() for t in tensors]
    return hashlib.sha1(torch.cat(flat).numpy().tobytes()).hexdigest()[:16] if flat else None


class ShortCollection(pl.Callback):  # stands in for Brevitas' 300 collection steps
    def on_train_start(self, trainer, pl_module):
        for _, s in stat_scalers(pl_module):
            s.collect_stats_steps = 6


class TwinScales(PrecisionSweep):
    scales = None

    def _finish(self, trainer, pl_module, stage):
        self.scales = digest(s.value for _, s in stat_scalers(self._target))
        return super()._finish(trainer, pl_module, stage)


def trainer(max_epochs, callbacks, strategy="ddp", **kwargs):
    return pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=max_epochs, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      num_sanity_val_steps=0, deterministic=True, callbacks=callbacks, **kwargs)


record = {}
if mode == "scales":
    pl.seed_everything(0, verbose=False)
    module = ClassificationModule(DigitsCNN(), lr=3e-3)
    t = trainer(2, [QuantizationAwareTraining(4, 4, calibrate_batches=0), ShortCollection()],
                limit_train_batches=4, limit_val_batches=0, accumulate_grad_batches=4)
    t.fit(module, DigitsDataModule(batch_size=16))
    record = {"params": digest(module.parameters())}
elif mode == "twin":
    pl.seed_everything(0, verbose=False)
    sweep = TwinScales([4, 2], calibrate_batches=2)
    t = trainer(1, [sweep], limit_train_batches=4, limit_val_batches=4)
    t.fit(ClassificationModule(DigitsCNN(), lr=3e-3), DigitsDataModule(batch_size=32))
    record = {"twin": sweep.scales}
elif mode == "delay":
    def run(epochs, ckpt_path=None):
        pl.seed_everything(0, verbose=False)
        module = ClassificationModule(DigitsCNN(), lr=3e-3)
        sweep = PrecisionSweep([4], calibrate_batches=2)
        callbacks = [QuantizationAwareTraining(4, 4, calibrate_batches=2, float_epochs=1), sweep]
        # the float epoch leaves the scale parameters unused: DDP must look for them
        t = trainer(epochs, callbacks, strategy="ddp_find_unused_parameters_true", limit_train_batches=3,
                    limit_val_batches=2)
        t.fit(module, DigitsDataModule(batch_size=16), ckpt_path=ckpt_path)
        return t, module, [r["epoch"] for r in sweep.history]

    try:  # plain "ddp" is refused with a message that says what to use
        trainer(1, [QuantizationAwareTraining(4, 4, float_epochs=1)]).fit(
            ClassificationModule(DigitsCNN()), DigitsDataModule(batch_size=16))
        refused = ""
    except ValueError as error:
        refused = str(error)
    refused = "ddp_find_unused_parameters_true" in refused

    t, _, _ = run(1)  # the float epoch only
    t.save_checkpoint(ckpt)
    _, resumed, _ = run(2, ckpt)
    t, straight, measured = run(2)
    record = {"resumed": digest(resumed.parameters()), "straight": digest(straight.parameters()), "measured": measured,
              "refused": refused}
else:
    def run(epochs, ckpt_path=None):
        pl.seed_everything(0, verbose=False)
        module = ClassificationModule(MNISTBatchNormCNN(width=4), lr=3e-3)
        rpt = RandomPrecisionTraining(bit_widths=(4, 8), switchable_bn=True)
        callbacks = [QuantizationAwareTraining(4, 4, calibrate_batches=2), rpt, AdversarialTraining("pgd", eps=0.1, steps=2)]
        t = trainer(epochs, callbacks, limit_train_batches=3, limit_val_batches=0)
        t.fit(module, DigitsDataModule(batch_size=16), ckpt_path=ckpt_path)
        stats = rpt.bn_statistics["w8a8"]
        return t, module, digest(v for name in sorted(stats) for v in stats[name].values())

    t, _, _ = run(1)
    t.save_checkpoint(ckpt)
    _, resumed, _ = run(2, ckpt)
    t, straight, stats = run(2)
    record = {"resumed": digest(resumed.parameters()), "straight": digest(straight.parameters()), "stats": stats}
print("RESULT " + json.dumps({"rank": t.global_rank, **record}), flush=True)
sys.exit(shutdown_distributed(t))
'''


def _records(tmp_path, mode: str) -> list[dict]:
    script = tmp_path / "rank_consistency.py"
    script.write_text(_SCRIPT)
    proc = run_ddp_script(script, mode, str(tmp_path / "epoch1.ckpt"), cwd=tmp_path)
    tail = (proc.stdout + proc.stderr)[-3000:]
    assert proc.returncode == 0, tail
    # both ranks share stdout, so their lines may interleave: match the flat records, not lines
    records = [json.loads(r) for r in re.findall(r"RESULT (\{[^{}]*\})", proc.stdout)]
    assert sorted(r["rank"] for r in records) == [0, 1], tail
    return records


def test_scales_collected_in_no_sync_micro_batches_end_equal_on_every_rank(tmp_path) -> None:
    rank0, rank1 = _records(tmp_path, "scales")
    assert rank0["params"] == rank1["params"]


def test_every_rank_calibrates_the_same_ptq_twin(tmp_path) -> None:
    rank0, rank1 = _records(tmp_path, "twin")
    assert rank0["twin"] is not None and rank0["twin"] == rank1["twin"]


def test_float_epochs_then_qat_are_the_same_on_every_rank_and_resume_exactly(tmp_path) -> None:
    rank0, rank1 = _records(tmp_path, "delay")
    for record in (rank0, rank1):
        assert record["resumed"] == record["straight"] and record["measured"] == [1] and record["refused"]
    assert rank0["straight"] == rank1["straight"]  # calibrated at epoch 1 on all ranks' batches


def test_switchable_batchnorm_and_adversarial_training_resume_exactly(tmp_path) -> None:
    rank0, rank1 = _records(tmp_path, "resume")
    assert rank0["stats"] == rank1["stats"]  # per-precision statistics kept outside the model
    for record in (rank0, rank1):
        assert record["resumed"] == record["straight"]
    assert rank0["straight"] == rank1["straight"]
