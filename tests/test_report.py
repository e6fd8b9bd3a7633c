"""Tests for the security report package and the ``SecurityReport`` callback."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_qsec.callbacks.security_report import SecurityReport
from lightning_qsec.report import (
    SCHEMA_VERSION,
    EvaluationHook,
    Plot,
    ReportSection,
    Table,
    write_report,
    write_text_atomic,
)
from lightning_qsec.report.atomic import write_bytes_atomic
from lightning_qsec.report.markdown import format_cell, render_markdown
from lightning_qsec.report.plots import draw_plot
from lightning_qsec.report.schema import build_report, merge_section

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _section(name: str = "sweep", **kwargs: Any) -> ReportSection:
    defaults: dict[str, Any] = {
        "title": "Precision sweep",
        "data": {"accuracy": {"8": 0.9876543, "4": 0.51234}, "nan": float("nan")},
        "tables": [
            Table(
                title="Accuracy by bit width",
                columns=["bits", "accuracy", "note"],
                rows=[[8, 0.9876543, "ok"], [4, 0.51234, "a|b"], [2, float("nan"), None]],
            )
        ],
        "plots": [
            Plot(
                filename=f"{name}_line.png",
                title="Accuracy vs bits",
                xlabel="bits",
                ylabel="accuracy",
                series={"model": [(8, 0.98), (4, 0.51), (2, float("nan"))]},
                hlines={"float": 0.99},
            ),
            Plot(
                filename=f"{name}_bar.png",
                title="Per-group accuracy",
                xlabel="group",
                ylabel="accuracy",
                series={"fp32": [("a", 0.9), ("b", 0.8)], "int4": [("a", 0.7), ("b", 0.6)]},
                kind="bar",
                hlines={"chance": 0.1},
            ),
        ],
        "notes": ["calibration: 16 batches"],
    }
    defaults.update(kwargs)
    return ReportSection(name=name, **defaults)


def _temp_files(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------- atomic


def test_atomic_write_replaces_and_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")
    assert write_text_atomic(target, "new") == target
    assert target.read_text() == "new"
    write_bytes_atomic(tmp_path / "b.bin", [b"ab", b"cd"])
    assert (tmp_path / "b.bin").read_bytes() == b"abcd"
    assert _temp_files(tmp_path) == []


def test_atomic_write_gives_the_mode_of_a_plain_write(tmp_path: Path) -> None:
    import stat

    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    new = write_text_atomic(tmp_path / "new.txt", "x")
    assert stat.S_IMODE(new.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)  # not mkstemp's 0o600
    os.chmod(new, 0o640)
    write_text_atomic(new, "y")  # a replaced file keeps its mode
    assert stat.S_IMODE(new.stat().st_mode) == 0o640


def test_atomic_write_failing_midway_keeps_old_file(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    target.write_text('{"old": true}')

    def chunks() -> Iterator[str]:
        yield '{"new": '
        raise RuntimeError("serialisation failed")

    with pytest.raises(RuntimeError, match="serialisation failed"):
        write_text_atomic(target, chunks())
    # json's own streaming encoder failing on a non-serialisable object midway:
    with pytest.raises(TypeError):
        write_text_atomic(target, json.JSONEncoder().iterencode({"a": 1, "b": object()}))
    assert target.read_text() == '{"old": true}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_atomic_write_failing_replace_removes_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "x.txt"
    target.write_text("old")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk gone"):
        write_text_atomic(target, "new")
    assert target.read_text() == "old"
    assert _temp_files(tmp_path) == []


# --------------------------------------------------------------------------- schema / writer


def test_write_report_json_schema(tmp_path: Path) -> None:
    meta = {"stage": "fit", "epoch": 3, "global_step": 42, "model": "Net"}
    path = write_report(tmp_path / "rep", [_section(), _section("other", plots=[])], metadata=meta)
    assert path == tmp_path / "rep" / "report.json"
    text = path.read_text()
    assert "NaN" not in text
    report = json.loads(text)
    assert set(report) == {
        "schema_version",
        "lightning_qsec_version",
        "created",
        "metadata",
        "sections",
    }
    assert report["schema_version"] == SCHEMA_VERSION == 1
    assert isinstance(report["lightning_qsec_version"], str) and report["lightning_qsec_version"]
    assert report["created"].endswith("+00:00")
    assert report["metadata"] == meta
    assert list(report["sections"]) == ["sweep", "other"]
    assert report["sections"]["sweep"]["accuracy"] == {"8": 0.9876543, "4": 0.51234}
    assert report["sections"]["sweep"]["nan"] is None
    assert text.startswith('{\n  "schema_version": 1')  # indent=2
    assert _temp_files(tmp_path / "rep") == []


def test_non_finite_and_array_values_become_json(tmp_path: Path) -> None:
    data = {
        "inf": float("inf"),
        "neg": -math.inf,
        "np": np.float32(np.nan),
        "arr": np.array([1.0, np.nan]),
        "tensor": torch.tensor([0.5, float("inf")]),
        "tuple": (1, 2),
        "int_key": {4: 1},
    }
    report = json.loads(write_report(tmp_path, [_section(data=data, plots=[])]).read_text())
    assert report["sections"]["sweep"] == {
        "inf": None,
        "neg": None,
        "np": None,
        "arr": [1.0, None],
        "tensor": [0.5, None],
        "tuple": [1, 2],
        "int_key": {"4": 1},
    }


def test_non_serialisable_data_raises_and_keeps_old_report(tmp_path: Path) -> None:
    write_report(tmp_path, [_section(plots=[])])
    old = (tmp_path / "report.json").read_text()
    bad = _section(data={"results": [1, object()]}, plots=[])
    with pytest.raises(TypeError, match=r"sections\['sweep'\]\['results'\]\[1\]"):
        write_report(tmp_path, [bad])
    assert (tmp_path / "report.json").read_text() == old
    assert _temp_files(tmp_path) == []


def test_duplicate_sections_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="duplicate section name 'sweep'"):
        write_report(tmp_path, [_section(plots=[]), _section(plots=[])])
    assert list(tmp_path.iterdir()) == []
    merged: dict[str, Any] = {}
    merge_section(merged, _section("a"))
    merge_section(merged, _section("b"))
    assert list(merged) == ["a", "b"]
    with pytest.raises(ValueError, match="'a'"):
        merge_section(merged, _section("a"))


@pytest.mark.parametrize(
    ("filename", "message"),
    [
        ("plot.jpg", "must end with '.png'"),
        ("../evil.png", "path separator"),
        ("sub/plot.png", "path separator"),
        ("sub\\plot.png", "path separator"),
        (".png", "must end with '.png'"),
    ],
)
def test_bad_plot_filenames_raise(tmp_path: Path, filename: str, message: str) -> None:
    plot = Plot(filename=filename, title="t", xlabel="x", ylabel="y", series={"s": [(1, 1.0)]})
    with pytest.raises(ValueError, match=message) as info:
        write_report(tmp_path, [_section(plots=[plot])])
    assert repr(filename) in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_other_invalid_sections_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        build_report([_section("")], metadata=None)
    with pytest.raises(ValueError, match="'same.png' already used by section 'a'"):
        plot = Plot(filename="same.png", title="t", xlabel="x", ylabel="y", series={})
        build_report([_section("a", plots=[plot]), _section("b", plots=[plot])], metadata=None)
    with pytest.raises(ValueError, match="row 0 has 1 cells"):
        build_report([_section(tables=[Table("T", ["a", "b"], [[1]])])], metadata=None)
    with pytest.raises(TypeError, match="ReportSection"):
        build_report([{"name": "x"}], metadata=None)  # type: ignore[list-item]


# --------------------------------------------------------------------------- markdown / plots


def test_markdown_contains_tables_and_metadata(tmp_path: Path) -> None:
    write_report(tmp_path, [_section()], metadata={"stage": "test", "model": "Net"})
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# ")
    assert "## Precision sweep" in md
    assert "### Accuracy by bit width" in md
    assert "- calibration: 16 batches" in md
    assert "| bits | accuracy | note |" in md
    assert "| 8 | 0.9877 | ok |" in md  # 4 significant digits, no percentage
    assert "| 4 | 0.5123 | a\\|b |" in md
    assert "| 2 | nan |  |" in md
    assert "**stage**: test" in md and "**model**: Net" in md
    assert "![Accuracy vs bits](sweep_line.png)" in md


def test_markdown_lists_settings_one_item_each(tmp_path: Path) -> None:
    meta = {
        "quantization": {"weight_bit_width": 4, "layer_bit_widths": {"net.*": 8}, "input_bit_width": None},
        "training": {"AdversarialTraining": {"method": "pgd", "eps": [[0, 0.1]]}, "Odd`name": {}},
    }
    write_report(tmp_path, [_section()], metadata=meta)
    md = (tmp_path / "report.md").read_text()
    assert "- **quantization**:\n  - weight_bit_width: `4`\n  - layer_bit_widths: `net.*=8`\n" in md
    assert "  - input_bit_width: `None`" in md  # a glob stays literal inside code, None is shown
    assert "  - AdversarialTraining: `method=pgd, eps=[[0, 0.1]]`" in md
    assert "  - Odd`name: `{}`" in md
    assert json.loads((tmp_path / "report.json").read_text())["metadata"] == meta


def test_format_cell() -> None:
    assert format_cell(0.123456) == "0.1235"
    assert format_cell(123456.7) == "1.235e+05"
    assert format_cell(np.float32(0.5)) == "0.5"
    assert format_cell(12345678) == "12345678"
    assert format_cell(True) == "True"
    assert format_cell(None) == ""
    assert format_cell(float("-inf")) == "-inf"
    assert render_markdown({"metadata": {}}, []).count("No evaluation hook") == 1


def test_plots_are_valid_pngs(tmp_path: Path) -> None:
    write_report(tmp_path, [_section()])
    for name in ("sweep_line.png", "sweep_bar.png"):
        path = tmp_path / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    empty = Plot(filename="e.png", title="empty", xlabel="x", ylabel="y", series={"s": []})
    assert draw_plot(empty)[:8] == PNG_SIGNATURE
    with pytest.raises(ValueError, match="'pie'"):
        draw_plot(Plot("p.png", "t", "x", "y", {}, kind="pie"))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- callback


class _DigitsNet(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> dict[str, torch.Tensor]:
        x, y = batch
        return {"correct": (self(x).argmax(dim=1) == y).sum(), "total": torch.tensor(len(y))}

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        return None

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _AccuracyHook(pl.Callback):
    """Test-only evaluation hook: validation accuracy accumulated from real batches."""

    def __init__(self) -> None:
        self.correct = 0
        self.total = 0

    def on_validation_epoch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> None:
        self.correct = self.total = 0

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self.correct += int(outputs["correct"])
        self.total += int(outputs["total"])

    def report_section(self) -> ReportSection | None:
        if self.total == 0:
            return None
        accuracy = self.correct / self.total
        return ReportSection(
            name="val_accuracy",
            title="Validation accuracy",
            data={"accuracy": accuracy, "samples": self.total},
            tables=[Table("Accuracy", ["samples", "accuracy"], [[self.total, accuracy]])],
            plots=[
                Plot(
                    filename="val_accuracy.png",
                    title="Validation accuracy",
                    xlabel="model",
                    ylabel="accuracy",
                    series={"fp32": [("fp32", accuracy)]},
                    kind="bar",
                )
            ],
        )


class _SilentHook(pl.Callback):
    def report_section(self) -> ReportSection | None:
        return None


def _digits_loaders() -> tuple[DataLoader, DataLoader, torch.Tensor, torch.Tensor]:
    digits = load_digits()
    x = torch.tensor(digits.data.reshape(len(digits.data), -1) / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.long)
    generator = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=generator)
    train, val = perm[:1400], perm[1400:]
    train_loader = DataLoader(TensorDataset(x[train], y[train]), batch_size=64, shuffle=True)
    val_loader = DataLoader(TensorDataset(x[val], y[val]), batch_size=128)
    return train_loader, val_loader, x[val], y[val]


def _trainer(callbacks: list[pl.Callback]) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )


def test_security_report_end_to_end(tmp_path: Path) -> None:
    pl.seed_everything(0)
    train_loader, val_loader, x_val, y_val = _digits_loaders()
    model = _DigitsNet()
    hook = _AccuracyHook()
    assert isinstance(hook, EvaluationHook)
    report_cb = SecurityReport(dirpath=tmp_path)
    trainer = _trainer([hook, _SilentHook(), report_cb])
    trainer.fit(model, train_loader, val_loader)

    with torch.no_grad():
        expected = (model(x_val).argmax(dim=1) == y_val).sum().item() / len(y_val)
    assert expected > 0.5  # the model really learned something in one epoch

    assert report_cb.last_report_path == tmp_path / "report.json"
    for name in ("report.json", "report.md", "val_accuracy.png"):
        assert (tmp_path / name).is_file()
    assert (tmp_path / "val_accuracy.png").read_bytes()[:8] == PNG_SIGNATURE
    report = json.loads((tmp_path / "report.json").read_text())
    assert list(report["sections"]) == ["val_accuracy"]  # None from _SilentHook skipped
    section = report["sections"]["val_accuracy"]
    assert section["samples"] == len(y_val)
    assert section["accuracy"] == pytest.approx(expected, abs=1e-9)
    assert report["metadata"] == {
        "stage": "fit",
        "epochs_completed": trainer.current_epoch,
        "global_step": trainer.global_step,
        "model": "_DigitsNet",
    }
    assert f"{expected:.4g}" in (tmp_path / "report.md").read_text()


def test_security_report_stages_and_state(tmp_path: Path) -> None:
    train_loader, val_loader, _, _ = _digits_loaders()
    model = _DigitsNet()
    report_cb = SecurityReport(dirpath=tmp_path / "r", on=("validate", "test"))
    trainer = _trainer([_AccuracyHook(), report_cb])
    trainer.fit(model, train_loader, val_loader)  # validation inside fit: no report
    assert report_cb.last_report_path is None and not (tmp_path / "r").exists()
    trainer.validate(model, val_loader, verbose=False)
    assert report_cb.last_report_path == tmp_path / "r" / "report.json"
    assert json.loads(report_cb.last_report_path.read_text())["metadata"]["stage"] == "validate"
    trainer.test(model, val_loader, verbose=False)
    assert json.loads(report_cb.last_report_path.read_text())["metadata"]["stage"] == "test"

    assert str(tmp_path / "r") in report_cb.state_key
    assert report_cb.state_key != SecurityReport(dirpath=tmp_path / "other").state_key
    assert report_cb.state_dict() == {"dirpath": str(tmp_path / "r")}
    with pytest.raises(ValueError, match="'predict'"):
        SecurityReport(on=("fit", "predict"))  # type: ignore[arg-type]


def test_markdown_links_and_titles_survive_odd_names(tmp_path: Path) -> None:
    from lightning_qsec.report.markdown import format_interval

    section = ReportSection(
        name="odd", title="Odd\ntitle", data={}, notes=["two\nlines"],
        plots=[Plot(filename="acc vs #bits (w4).png", title="A [plot]", xlabel="x", ylabel="y", series={"s": [(0, 1.0), (1, 2.0)]})],
    )
    write_report(tmp_path, [section], metadata={})
    md = (tmp_path / "report.md").read_text()
    assert "## Odd title" in md and "- two lines" in md
    assert "![A (plot)](acc%20vs%20%23bits%20%28w4%29.png)" in md
    assert (tmp_path / "acc vs #bits (w4).png").is_file()
    assert format_interval({"value": None, "ci_low": None, "ci_high": None}) == "nan"
    assert format_interval({"value": 0.5, "ci_low": 0.4, "ci_high": None}) == "0.5000"
    assert format_interval({"value": 0.5, "ci_low": 0.4, "ci_high": 0.6, "undefined_resamples": 3}) == (
        "0.5000 [0.4000, 0.6000] (3 undefined)"
    )


def test_nothing_is_written_when_encoding_fails(tmp_path: Path) -> None:
    bad = ReportSection(name="bad", data={}, title="surrogate \\udc80".encode().decode("unicode_escape"),
                        plots=[Plot(filename="new.png", title="t", xlabel="x", ylabel="y", series={"s": [(0, 1.0)]})])
    with pytest.raises(UnicodeEncodeError):
        write_report(tmp_path, [bad], metadata={})
    assert list(tmp_path.iterdir()) == []


def test_two_hooks_of_one_kind_get_their_own_sections(tmp_path: Path) -> None:
    from conftest import UserCNN, quiet_trainer

    from lightning_qsec.callbacks import PrecisionSweep, QuantizationAwareTraining
    from lightning_qsec.data import DigitsDataModule

    trainer = quiet_trainer(
        max_epochs=1, limit_train_batches=2, limit_val_batches=1,
        callbacks=[QuantizationAwareTraining(8, 8, calibrate_batches=1), PrecisionSweep([8]), PrecisionSweep([2]),
                   SecurityReport(tmp_path)],
    )
    trainer.fit(UserCNN(), datamodule=DigitsDataModule())
    report = json.loads((tmp_path / "report.json").read_text())
    assert list(report["sections"]) == ["precision_sweep", "precision_sweep_2"]
    assert report["metadata"]["epochs_completed"] == 1
    assert any(p.name.startswith("precision_sweep_2_") for p in tmp_path.glob("*.png"))


def test_report_records_the_recipe_including_a_users_subclass(tmp_path: Path) -> None:
    from conftest import UserCNN, quiet_trainer

    from lightning_qsec.callbacks import PrecisionSweep, QuantizationAwareTraining
    from lightning_qsec.data import DigitsDataModule
    from lightning_qsec.defenses import KurtosisRegularization

    class MyKurtosis(KurtosisRegularization):  # defined outside the package
        pass

    trainer = quiet_trainer(
        max_epochs=1, limit_train_batches=2, limit_val_batches=1,
        callbacks=[QuantizationAwareTraining(4, 4, input_bit_width=8, calibrate_batches=1), MyKurtosis(lam=0.1),
                   PrecisionSweep([4]), SecurityReport(tmp_path)],
    )
    trainer.fit(UserCNN(), datamodule=DigitsDataModule())
    metadata = json.loads((tmp_path / "report.json").read_text())["metadata"]
    assert metadata["quantization"]["weight_bit_width"] == 4 and metadata["quantization"]["input_bit_width"] == 8
    assert metadata["training"]["MyKurtosis"]["lam"] == 0.1
    assert "  - MyKurtosis: `lam=0.1" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("kind", ["line", "bar"])
def test_many_series_stay_distinguishable(kind: str) -> None:
    from matplotlib.figure import Figure

    from lightning_qsec.report.plots import _draw_bar, _draw_line

    series = {f"s{i}": [(0, float(i)), (1, float(i) + 1)] for i in range(25)}
    plot = Plot("many.png", "t", "x", "y", series, kind=kind)  # type: ignore[arg-type]
    ax = Figure().add_subplot()
    if kind == "line":
        _draw_line(ax, plot)
        styles = {(line.get_color(), line.get_linestyle()) for line in ax.lines}
    else:
        _draw_bar(ax, plot)
        styles = {(container.patches[0].get_facecolor(), container.patches[0].get_hatch()) for container in ax.containers}
    assert len(styles) == 25  # matplotlib's default cycle alone repeats after 10
    assert draw_plot(plot)[:8] == PNG_SIGNATURE
