"""Adversarial training with random precision and QAT under 2-process DDP (gloo, CPU)."""

from __future__ import annotations

import re

from conftest import run_ddp_script

_DDP_SCRIPT = '''
import hashlib, os, sys
os.environ.setdefault("PL_DISABLE_FORK", "1")
sys.path.insert(0, sys.argv[1])
method = sys.argv[2]
import pytorch_lightning as pl
import torch
torch.set_num_threads(1)
from conftest import UserCNN
from lightning_qsec.callbacks import QuantizationAwareTraining
from lightning_qsec.data import DigitsDataModule
from lightning_qsec.defenses import AdversarialTraining, RandomPrecisionTraining
from lightning_qsec.distributed import shutdown_distributed

pl.seed_everything(0, verbose=False)
module = UserCNN()
adversarial = AdversarialTraining(method, eps=0.1, steps=2)
trainer = pl.Trainer(
    accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, limit_train_batches=4, limit_val_batches=0,
    accumulate_grad_batches=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
    enable_checkpointing=False,
    # RandomPrecisionTraining first, so the adversary attacks the precision drawn for the step.
    callbacks=[QuantizationAwareTraining(4, 4), RandomPrecisionTraining(), adversarial],
)
trainer.fit(module, DigitsDataModule())
digest = hashlib.sha1(torch.cat([p.detach().flatten() for p in module.parameters()]).numpy().tobytes()).hexdigest()
print(f"RESULT rank={trainer.global_rank} step={trainer.global_step} params={digest} "
      f"attacked={adversarial.batches_attacked} loss={float(trainer.callback_metrics['train_loss']):.6f}", flush=True)
shutdown_distributed()
'''


def test_ddp_adversarial_training_keeps_parameters_in_sync(tmp_path) -> None:
    """PGD's per-rank batches and TRADES' all-reduced extra gradient leave the ranks in sync."""
    from pathlib import Path

    script = tmp_path / "ddp_adversarial.py"
    script.write_text(_DDP_SCRIPT)
    tests_dir = Path(__file__).parent
    digests = {}
    for method in ("pgd", "trades"):
        proc = run_ddp_script(script, str(tests_dir), method, cwd=tmp_path)
        tail = (proc.stdout + proc.stderr)[-3000:]
        assert proc.returncode == 0, f"{method}: {tail}"
        # Both ranks share stdout, so their lines may interleave: match the records, not lines.
        records = re.findall(
            r"RESULT rank=(\d+) step=(\d+) params=([0-9a-f]+) attacked=(\d+) loss=([-0-9.e]+)", proc.stdout
        )
        results = [dict(zip(("rank", "step", "params", "attacked", "loss"), r)) for r in records]
        assert sorted(r["rank"] for r in results) == ["0", "1"], f"{method}: {tail}"
        assert {r["step"] for r in results} == {"2"}, method  # 4 micro-batches, accumulate 2
        assert {r["attacked"] for r in results} == {"4"}, method  # every micro-batch attacked on each rank
        assert results[0]["params"] == results[1]["params"], method  # ranks in sync
        assert results[0]["loss"] != results[1]["loss"], method  # ... although each rank's batch differed
        digests[method] = results[0]["params"]
    assert digests["pgd"] != digests["trades"]  # the two methods really trained differently
