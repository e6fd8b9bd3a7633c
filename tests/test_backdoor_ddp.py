"""BackdoorScan and PoisonedDataDetection under 2-process DDP (gloo, CPU): every rank holds the same result."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from conftest import run_ddp_script

# ``scan``: a float DigitsCNN trained briefly, then ``trainer.test`` with BackdoorScan.
# ``poison``: QAT w4a4 on BadNets-poisoned digits with PoisonedDataDetection.
# Every rank prints one RESULT record.
_SCRIPT = '''
import json, os, sys
os.environ.setdefault("PL_DISABLE_FORK", "1")
devices, mode = int(sys.argv[1]), sys.argv[2]
import pytorch_lightning as pl
import torch
torch.set_num_threads(1)
from lightning_qsec.attacks import PoisonedDataModule
from lightning_qsec.callbacks import BackdoorScan, PoisonedDataDetection, QuantizationAwareTraining
from lightning_qsec.data import DigitsDataModule
from lightning_qsec.distributed import shutdown_distributed
from lightning_qsec.models import ClassificationModule, DigitsCNN

pl.seed_everything(0, verbose=False)
common = dict(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", logger=False,
              enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
              num_sanity_val_steps=0, limit_val_batches=0)
module = ClassificationModule(DigitsCNN(), lr=3e-3)
if mode == "scan":
    dm = DigitsDataModule(batch_size=64)
    pl.Trainer(max_epochs=3, **common).fit(module, datamodule=dm)
    scan = BackdoorScan(bit_widths=[4], trigger_steps=10, trigger_samples=4, calibrate_batches=2,
                        max_samples=96, progress=False, target_class=0)
    pl.Trainer(callbacks=[scan], limit_test_batches=2, **common).test(module, datamodule=dm, verbose=False)
    record = {"rank": pl.utilities.rank_zero.rank_zero_only.rank, "result": scan.results["test"]}
else:
    dm = PoisonedDataModule(DigitsDataModule(batch_size=64), poison_rate=0.1, target_class=0)
    detection = PoisonedDataDetection()
    trainer = pl.Trainer(max_epochs=6, callbacks=[QuantizationAwareTraining(4, 4, calibrate_batches=2), detection],
                         **common)
    trainer.fit(module, datamodule=dm)
    record = {"rank": trainer.global_rank, "suspects": detection.suspect_indices.tolist(),
              "poisoned": dm.poison_indices.tolist(), "rows": len(dm.train_dataset)}
print("RESULT " + json.dumps(record, sort_keys=True) + " END", flush=True)
shutdown_distributed()
'''


def _run(tmp_path: Path, mode: str) -> list[dict[str, Any]]:
    script = tmp_path / "backdoor_ddp.py"
    script.write_text(_SCRIPT)
    proc = run_ddp_script(script, "2", mode, cwd=tmp_path)
    tail = (proc.stdout + proc.stderr)[-3000:]
    assert proc.returncode == 0, tail
    records = [json.loads(r) for r in re.findall(r"RESULT (\{.*?\}) END", proc.stdout)]
    assert sorted(r["rank"] for r in records) == [0, 1], tail
    return sorted(records, key=lambda r: r["rank"])


def _points(result: Any) -> Any:
    if isinstance(result, dict):
        return {k: _points(v) for k, v in result.items() if k != "seconds"}
    return result


def test_backdoor_scan_gathers_the_ranks_samples(tmp_path: Path) -> None:
    r0, r1 = _run(tmp_path, "scan")
    # 2 test batches of 64 per rank, capped at max_samples=96 per rank, gathered: 192 > 96 scanned.
    assert r0["result"]["samples"] == r1["result"]["samples"] == 96
    assert _points(r0["result"]) == _points(r1["result"])
    assert set(r0["result"]["backdoor"]["precisions"]) == {"float", "4"}


def test_poison_detection_ranks_agree_and_find_the_poison(tmp_path: Path) -> None:
    r0, r1 = _run(tmp_path, "poison")
    assert r0["suspects"] == r1["suspects"]
    found = set(r0["suspects"]) & set(r0["poisoned"])
    assert len(found) >= 0.8 * len(r0["poisoned"])
    assert len(set(r0["suspects"]) - set(r0["poisoned"])) <= 0.05 * (r0["rows"] - len(r0["poisoned"]))
