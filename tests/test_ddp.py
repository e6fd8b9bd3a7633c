"""DDP on CPU (gloo, 2 processes) against one process: same sweep, ranks in sync, clean exit.

Lightning's ``ddp`` launcher re-executes ``sys.argv``, so DDP never runs inside pytest's
process: ``tests/ddp_fit.py`` is run in a subprocess.

Why the 1-device run evaluates the 2-device run's checkpoint rather than training again:
QAT training is chaotic in float32. Even with the same global batches and the same
calibrated scales, DDP's gradient all-reduce sums in another order (5e-9 differences at
the first step); Adam and the quantizers' rounding turn that into 1e-2 weight differences
within one epoch, and after a few epochs w2a2 accuracies differ by 10-20 points (two
one-process runs whose initial weights differ by 1e-7 already differ by 1.4 points at w2a2
after 3 epochs). What DDP must not change is the measurement: the sweep over the same
weights, its metrics synced over the ranks (up to the one test sample DistributedSampler
repeats to even out the ranks: 1/360).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import run_ddp_script

SCRIPT = Path(__file__).with_name("ddp_fit.py")
CRASH = "terminate called"


def run_script(cwd: Path, *args: str, timeout: float = 240) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run ``ddp_fit.py`` with ``args``; ``(completed process, seconds)``."""
    start = time.monotonic()
    proc = run_ddp_script(SCRIPT, *args, cwd=cwd, timeout=timeout)
    return proc, time.monotonic() - start


def _accuracies(result: dict[str, Any]) -> dict[str, float]:
    test = result["test"]
    accs = {"float": test["float"]["accuracy"]}
    accs.update({label: p["accuracy"] for label, p in test["precisions"].items()})
    return accs


def _check_ok(proc: subprocess.CompletedProcess[str], what: str) -> None:
    tail = (proc.stdout + proc.stderr)[-3000:]
    assert proc.returncode == 0, f"{what}: exit code {proc.returncode}\n{tail}"
    assert CRASH not in proc.stderr, f"{what}: a rank aborted at exit\n{tail}"


def test_ddp_two_processes_match_one(tmp_path: Path) -> None:
    ckpt = tmp_path / "ddp.ckpt"
    two, t2 = run_script(
        tmp_path, "--devices", "2", "--epochs", "2", "--seed", "0",
        "--out", str(tmp_path / "ddp2.json"), "--save-ckpt", str(ckpt),
    )
    _check_ok(two, "2 processes")
    one, t1 = run_script(
        tmp_path, "--devices", "1", "--seed", "0",
        "--out", str(tmp_path / "ddp1.json"), "--eval-ckpt", str(ckpt),
    )
    _check_ok(one, "1 process")

    ddp = json.loads((tmp_path / "ddp2.json").read_text())
    single = json.loads((tmp_path / "ddp1.json").read_text())
    assert ddp["world_size"] == 2 and single["world_size"] == 1

    # every rank holds the same parameters and activation scales, and so does the
    # one-process run that loaded rank 0's checkpoint
    sums = ddp["checksums"]
    assert len(sums) == 2
    assert sums[0] == sums[1], sums
    assert single["checksums"][0] == sums[0]

    a2, a1 = _accuracies(ddp), _accuracies(single)
    assert set(a2) == set(a1) == {"float", "w8a8", "w4a4", "w2a2"}
    for key in a1:
        assert a2[key] == pytest.approx(a1[key], abs=0.005), (key, a2, a1)
    assert a1["float"] > 0.3  # it did learn (chance is 0.1)
    print(f"2 processes: {t2:.1f}s, 1 process (eval): {t1:.1f}s; accuracies 2p={a2} 1p={a1}")


@pytest.mark.slow
def test_ddp_exit_is_clean_in_20_runs(tmp_path: Path) -> None:
    codes: list[int] = []
    crashed: list[str] = []
    for i in range(20):
        proc, _ = run_script(tmp_path, "--devices", "2", "--epochs", "1", "--seed", str(i), "--out", str(tmp_path / f"r{i}.json"))
        codes.append(proc.returncode)
        if proc.returncode != 0 or CRASH in proc.stderr:
            crashed.append(f"run {i}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    assert codes == [0] * 20 and not crashed, "\n\n".join(crashed)
