"""Export a quantized model to ONNX, run it in a deployment runtime, and compare with the simulation.

Security figures for a deployed model must come from the runtime that serves it: the
Brevitas simulation and the exported graph agree only when the runtime executes the
graph as written. onnxruntime's graph optimizations (its default is ``"all"``, and
already ``"basic"`` does it) rewrite the QuantizeLinear/DequantizeLinear (QCDQ)
pattern, which moves logits and flips some predictions: on a w4a4 digits CNN, logits
moved by up to 0.56 and 0.8% of predictions flipped, against 8e-6 and none with
optimizations disabled. :func:`compare_deployed` measures that difference and records
the runtime settings next to it.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_qsec._eval import eval_mode
from lightning_qsec._validation import check_positive_int
from lightning_qsec.quant.precision import bit_widths, require_quantized
from lightning_qsec.report.atomic import replace_atomic

__all__ = [
    "EXPORT_FORMATS",
    "GRAPH_OPTIMIZATIONS",
    "OnnxRuntimeModel",
    "compare_deployed",
    "export_onnx",
    "onnxruntime_session",
]

ExportFormat = Literal["qcdq", "qonnx"]
GraphOptimization = Literal["disabled", "basic", "extended", "all"]

EXPORT_FORMATS: tuple[str, ...] = ("qcdq", "qonnx")
GRAPH_OPTIMIZATIONS: dict[str, str] = {
    "disabled": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
_QONNX_DOMAINS = ("qonnx.custom_op.general", "finn.custom_op.general")
_INSTALL_HINT = "pip install lightning-qsec[export]"


def _require_modules(*names: str) -> None:
    missing = []
    for name in names:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(
            f"ONNX export and deployment need {', '.join(missing)}, which could not be imported; "
            f"install them with `{_INSTALL_HINT}`"
        )


def _check_format(format: str) -> str:
    if format not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {list(EXPORT_FORMATS)}, got {format!r}")
    return format


def _check_graph_optimization(value: str) -> str:
    if value not in GRAPH_OPTIMIZATIONS:
        raise ValueError(f"graph_optimization must be one of {list(GRAPH_OPTIMIZATIONS)}, got {value!r}")
    return value


def _has_per_channel_weights(model: nn.Module) -> bool:
    """Does any quantized conv/linear layer hold one weight scale per output channel?"""
    with torch.no_grad():
        return any(
            module.quant_weight().scale.numel() > 1
            for module in model.modules()
            if hasattr(module, "quant_weight") and getattr(module, "weight", None) is not None
        )


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    example_input: Tensor,
    format: ExportFormat = "qcdq",
    opset_version: int = 13,
    dynamic_batch: bool = True,
) -> Path:
    """Export a quantized model to ONNX at its current precision.

    The graph records the bit widths the model holds now, so wrap the call in
    :func:`~lightning_qsec.quant.at_precision` to export another precision. The model
    is exported in eval mode (every submodule's train/eval flag is restored after),
    outside ``torch.inference_mode`` (so it may be called from Lightning's
    validation/test hooks), with the TorchScript exporter (``dynamo=False``).

    Formats:
        * ``"qcdq"``: standard ONNX, QuantizeLinear/Clip/DequantizeLinear around float
          ops. Runs in onnxruntime (:class:`OnnxRuntimeModel`). With graph
          optimizations ``"disabled"`` it reproduces the Brevitas simulation to float
          rounding; onnxruntime's default (``"all"``, and also ``"basic"``/``"extended"``)
          rewrites the QDQ graph and **changes predictions** (measure it with
          :func:`compare_deployed`; report security figures from the deployed settings).
        * ``"qonnx"``: the QONNX dialect (``Quant`` nodes, arbitrary bit widths, the
          input format of FINN). Runs with qonnx's node-by-node executor.

    The file is written atomically: the export goes to a temporary file in the target
    directory, which is checked with ``onnx.checker`` (and, when ``dynamic_batch``,
    run at another batch size) before it replaces ``path``. On any failure no
    temporary file remains and an existing file at ``path`` is untouched.

    Args:
        model: a model quantized by :func:`~lightning_qsec.quant.quantize_model`.
        path: the ``.onnx`` file to write; missing parent directories are created.
        example_input: an input batch ``(N, ...)`` used for tracing (moved to the
            model's device). Its shape after the batch dimension is fixed in the graph.
        format: ``"qcdq"`` or ``"qonnx"``.
        opset_version: ONNX opset of the graph; QCDQ needs 12 or higher (13 or higher with
            per-channel weights).
        dynamic_batch: make the batch dimension of input ``"input"`` and output
            ``"logits"`` symbolic (``"batch"``), and verify that the graph runs with a
            batch size other than ``example_input``'s.

    Returns:
        The path written, as a :class:`~pathlib.Path`.

    Raises:
        ImportError: onnx, onnxoptimizer, onnxruntime (or qonnx, for ``"qonnx"``) is
            missing; install them with ``pip install lightning-qsec[export]``.
        ValueError: ``format`` is not ``"qcdq"``/``"qonnx"``, the model is not
            quantized, ``example_input`` is not a batched tensor, or ``opset_version`` is
            too low for QCDQ.
        RuntimeError: the exported graph does not run at another batch size although
            ``dynamic_batch`` was asked for (e.g. a hard-coded batch in ``forward``).

    Example:
        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> from torch import nn
        >>> from lightning_qsec import quantize_model, at_precision
        >>> from lightning_qsec.quant.export import export_onnx, OnnxRuntimeModel
        >>> net = quantize_model(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)),
        ...                      weight_bit_width=4, act_bit_width=4)
        >>> out = Path(tempfile.mkdtemp()) / "net_w8a8.onnx"
        >>> with at_precision(net, weight_bit_width=8, act_bit_width=8):
        ...     path = export_onnx(net, out, example_input=torch.randn(2, 4))
        ...     runtime = OnnxRuntimeModel(path)  # graph optimizations disabled
        ...     logits = runtime(torch.randn(5, 4))
        >>> logits.shape
        torch.Size([5, 3])
    """
    _check_format(format)
    require_quantized(model)
    if not isinstance(example_input, Tensor) or example_input.dim() < 1 or example_input.shape[0] < 1:
        raise ValueError(
            "example_input must be a tensor with a batch dimension of size >= 1, "
            f"got {type(example_input).__name__}{tuple(getattr(example_input, 'shape', ()))}"
        )
    check_positive_int(opset_version, "opset_version")
    if format == "qcdq":
        minimum = 13 if _has_per_channel_weights(model) else 12  # QuantizeLinear with int8 and an axis
        if opset_version < minimum:
            raise ValueError(
                f"opset_version must be >= 12 for QCDQ (>= 13 with per-channel weights, as here: "
                f"{minimum == 13}), got {opset_version}"
            )
        wide = {name: bits for kind in bit_widths(model).values() for name, bits in kind.items() if bits > 8}
        if wide:  # QuantizeLinear holds int8/uint8 only
            raise ValueError(
                f"format='qcdq' exports bit widths up to 8 (Brevitas' QCDQ export refuses more); these quantizers have "
                f"more: {wide}; lower them (e.g. input_bit_width=8) or use format='qonnx'"
            )
    _require_modules("onnx", "onnxoptimizer", "onnxruntime", *(("qonnx",) if format == "qonnx" else ()))
    import onnx
    from brevitas.export import export_onnx_qcdq, export_qonnx

    exporter = export_onnx_qcdq if format == "qcdq" else export_qonnx
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    param = next(model.parameters(), None)
    example = example_input.detach()
    if param is not None:
        example = example.to(param.device)
    kwargs: dict[str, Any] = {
        "input_names": [INPUT_NAME],
        "output_names": [OUTPUT_NAME],
        "opset_version": opset_version,
        "keep_initializers_as_inputs": False,  # weights are constants, so runtimes may fold them
        "dynamo": False,
    }
    if dynamic_batch:
        kwargs["dynamic_axes"] = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}

    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with torch.inference_mode(False), eval_mode(model):
            exporter(model, args=example, export_path=str(tmp), **kwargs)
        # a path (not a proto) lets the checker handle models over 2 GB; full_check adds
        # strict shape inference, which knows standard ops only (not qonnx's Quant)
        onnx.checker.check_model(str(tmp), full_check=format == "qcdq")
        if dynamic_batch:
            _verify_dynamic_batch(tmp, example)
        replace_atomic(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def _verify_dynamic_batch(path: Path, example: Tensor) -> None:
    other = torch.cat([example, example[:1]]).cpu()
    try:
        out = OnnxRuntimeModel(path)(other)
    except Exception as error:
        raise RuntimeError(
            f"the exported graph does not run at batch size {other.shape[0]} "
            f"(traced with {example.shape[0]}) although dynamic_batch=True; does forward() "
            f"hard-code the batch size? ({type(error).__name__}: {error})"
        ) from error
    if out.shape[0] != other.shape[0]:
        raise RuntimeError(
            f"the exported graph returned {out.shape[0]} rows for a batch of {other.shape[0]} "
            "although dynamic_batch=True; does forward() hard-code the batch size?"
        )


def _is_qonnx(model_proto: Any) -> bool:
    if any(op.domain in _QONNX_DOMAINS for op in model_proto.opset_import):
        return True
    return any(node.domain in _QONNX_DOMAINS for node in model_proto.graph.node)


def _dims(value_info: Any) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value_info.type.tensor_type.shape.dim]


class OnnxRuntimeModel:
    """An exported model in its deployment runtime: a callable from a torch batch to logits.

    QCDQ files run in an onnxruntime ``InferenceSession``; QONNX files (detected from
    their ``Quant`` nodes) run in qonnx's executor (``ModelWrapper`` +
    ``execute_onnx``), which executes node by node, each standard node in its own
    one-node onnxruntime session, so it has no graph-level optimization. For QONNX the
    graph's shapes are specialised to each new batch size once and cached.

    Args:
        path: an ``.onnx`` file written by :func:`export_onnx`.
        graph_optimization: onnxruntime graph optimization level, one of
            ``"disabled"`` (default: reproduces the Brevitas simulation), ``"basic"``,
            ``"extended"``, ``"all"`` (onnxruntime's own default, what a deployment
            gets unless it says otherwise). QONNX files accept ``"disabled"`` only.
        intra_op_num_threads: onnxruntime intra-op threads; ``None`` is onnxruntime's
            default. Not supported for QONNX files.
        providers: onnxruntime execution providers; default ``["CPUExecutionProvider"]``.

    Attributes:
        path: the model file.
        format: ``"qcdq"`` or ``"qonnx"``.
        settings: a JSON-serialisable description of the runtime for reports:
            runtime name and versions, graph optimization, providers, threads.

    Raises:
        ImportError: onnx/onnxruntime (or qonnx) missing.
        FileNotFoundError: ``path`` does not exist.
        ValueError: an unknown ``graph_optimization``, or options QONNX does not support.

    Example:
        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> from torch import nn
        >>> from lightning_qsec import quantize_model
        >>> from lightning_qsec.quant.export import export_onnx, OnnxRuntimeModel
        >>> net = quantize_model(nn.Sequential(nn.Linear(4, 3)))
        >>> path = export_onnx(net, Path(tempfile.mkdtemp()) / "m.onnx", example_input=torch.randn(1, 4))
        >>> runtime = OnnxRuntimeModel(path, graph_optimization="all")
        >>> runtime.settings["graph_optimization"], runtime(torch.randn(2, 4)).shape
        ('all', torch.Size([2, 3]))
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        graph_optimization: GraphOptimization = "disabled",
        intra_op_num_threads: int | None = None,
        providers: Sequence[str] | None = None,
    ) -> None:
        _check_graph_optimization(graph_optimization)
        if intra_op_num_threads is not None:
            check_positive_int(intra_op_num_threads, "intra_op_num_threads")
        _require_modules("onnx", "onnxruntime")
        import onnx
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no ONNX file at {str(self.path)!r}")
        proto = onnx.load(str(self.path))
        self.format: str = "qonnx" if _is_qonnx(proto) else "qcdq"
        inputs = [i for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
        if len(inputs) != 1 or len(proto.graph.output) < 1:
            raise ValueError(
                f"{self.path.name} must have one data input and at least one output, "
                f"has inputs {[i.name for i in inputs]} and outputs {[o.name for o in proto.graph.output]}"
            )
        self.input_name: str = inputs[0].name
        self.output_name: str = proto.graph.output[0].name
        self._input_dims = _dims(inputs[0])
        opset = max((op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")), default=None)
        self.settings: dict[str, Any]
        if self.format == "qcdq":
            options = ort.SessionOptions()
            options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, GRAPH_OPTIMIZATIONS[graph_optimization])
            if intra_op_num_threads is not None:
                options.intra_op_num_threads = intra_op_num_threads
            self._session = ort.InferenceSession(
                str(self.path), options, providers=list(providers or ["CPUExecutionProvider"])
            )
            self.settings = {
                "runtime": "onnxruntime",
                "onnxruntime_version": ort.__version__,
                "format": "qcdq",
                "graph_optimization": graph_optimization,
                "graph_optimization_level": GRAPH_OPTIMIZATIONS[graph_optimization],
                "providers": list(self._session.get_providers()),
                "intra_op_num_threads": intra_op_num_threads,
                "opset_version": opset,
                "path": str(self.path),
            }
        else:
            if graph_optimization != "disabled" or intra_op_num_threads is not None or providers is not None:
                raise ValueError(
                    "a QONNX file runs in qonnx's node-by-node executor, which takes no graph "
                    "optimization, thread or provider options; pass graph_optimization='disabled' "
                    "and no intra_op_num_threads/providers, or export format='qcdq' for onnxruntime"
                )
            _require_modules("qonnx")
            from importlib.metadata import version

            self._proto = proto
            self._by_batch: dict[int, Any] = {}
            self.settings = {
                "runtime": "qonnx.core.onnx_exec.execute_onnx",
                "qonnx_version": version("qonnx"),
                "onnxruntime_version": ort.__version__,
                "format": "qonnx",
                "graph_optimization": "disabled",
                "graph_optimization_level": "none (node by node)",
                "providers": ["CPUExecutionProvider"],
                "intra_op_num_threads": None,
                "opset_version": opset,
                "path": str(self.path),
            }

    def _check_batch(self, batch: int) -> None:
        fixed = self._input_dims[0] if self._input_dims else None
        if isinstance(fixed, int) and fixed > 0 and fixed != batch:
            raise ValueError(
                f"{self.path.name} was exported with a fixed batch size of {fixed}, got a batch of {batch}; "
                "export with dynamic_batch=True"
            )

    def _qonnx_model(self, batch: int) -> Any:
        if batch not in self._by_batch:
            from qonnx.core.modelwrapper import ModelWrapper
            from qonnx.transformation.infer_shapes import InferShapes

            proto = copy.deepcopy(self._proto)
            for value in (*proto.graph.input, *proto.graph.output):
                if value.name in (self.input_name, self.output_name):
                    dim = value.type.tensor_type.shape.dim[0]
                    dim.ClearField("dim_param")
                    dim.dim_value = batch
            del proto.graph.value_info[:]
            self._by_batch[batch] = ModelWrapper(proto).transform(InferShapes())
        return self._by_batch[batch]

    def __call__(self, inputs: Tensor) -> Tensor:
        """Run a batch ``(N, ...)`` (any device) and return the logits as a CPU float tensor."""
        if not isinstance(inputs, Tensor) or inputs.dim() < 1:
            raise ValueError(f"inputs must be a batched tensor, got {type(inputs).__name__}")
        self._check_batch(int(inputs.shape[0]))
        array = inputs.detach().to("cpu", torch.float32).contiguous().numpy()
        if self.format == "qcdq":
            out = self._session.run([self.output_name], {self.input_name: array})[0]
        else:
            from qonnx.core.onnx_exec import execute_onnx

            out = execute_onnx(self._qonnx_model(array.shape[0]), {self.input_name: array})[self.output_name]
        return torch.from_numpy(out.copy())

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({str(self.path)!r}, format={self.format!r}, "
            f"graph_optimization={self.settings['graph_optimization']!r})"
        )


def onnxruntime_session(
    path: str | os.PathLike[str],
    *,
    graph_optimization: GraphOptimization = "disabled",
    intra_op_num_threads: int | None = None,
) -> OnnxRuntimeModel:
    """Open an exported model in its runtime; shorthand for :class:`OnnxRuntimeModel`."""
    return OnnxRuntimeModel(path, graph_optimization=graph_optimization, intra_op_num_threads=intra_op_num_threads)


def compare_deployed(
    model: nn.Module,
    path: str | os.PathLike[str],
    inputs: Tensor,
    targets: Tensor | None = None,
    *,
    graph_optimization: GraphOptimization | None = None,
    intra_op_num_threads: int | None = None,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Compare the Brevitas simulation with the exported model in its runtime.

    ``model`` must be at the precision it was exported at (wrap the call in the same
    :func:`~lightning_qsec.quant.at_precision` as the export). It runs in eval mode
    (flags restored after) without gradients; the exported file runs in
    :class:`OnnxRuntimeModel`.

    Args:
        model: the quantized model that was exported.
        path: the file written by :func:`export_onnx`.
        inputs: samples ``(N, ...)``.
        targets: optional class labels ``(N,)`` for the two accuracies.
        graph_optimization: onnxruntime level; ``None`` means what a deployment gets
            by default: ``"all"`` (onnxruntime's default) for QCDQ files and
            ``"disabled"`` for QONNX files (their executor has no graph optimizations).
        intra_op_num_threads: onnxruntime threads (QCDQ only); ``None`` is its default.
        batch_size: samples per forward pass.

    Returns:
        ``{"num_samples", "max_abs_logit_diff", "mean_abs_logit_diff",
        "prediction_flip_rate" (fraction of samples whose arg-max differs),
        "num_flipped", "simulation_accuracy", "runtime_accuracy" (``None`` without
        targets), "runtime"}``, where ``"runtime"`` is :attr:`OnnxRuntimeModel.settings`.

    Raises:
        ValueError: the model is not quantized, ``inputs`` is empty, ``targets`` does not
            match, or an option the runtime does not take.

    Example:
        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> from torch import nn
        >>> from lightning_qsec import quantize_model
        >>> from lightning_qsec.quant.export import export_onnx, compare_deployed
        >>> net = quantize_model(nn.Sequential(nn.Linear(4, 3)))
        >>> path = export_onnx(net, Path(tempfile.mkdtemp()) / "m.onnx", example_input=torch.randn(1, 4))
        >>> result = compare_deployed(net, path, torch.randn(8, 4), graph_optimization="disabled")
        >>> result["max_abs_logit_diff"] < 1e-4, result["prediction_flip_rate"]
        (True, 0.0)
    """
    require_quantized(model)
    check_positive_int(batch_size, "batch_size")
    if not isinstance(inputs, Tensor) or inputs.dim() < 1 or inputs.shape[0] == 0:
        raise ValueError("inputs must be a non-empty batched tensor (N, ...)")
    n = int(inputs.shape[0])
    if targets is not None and (not isinstance(targets, Tensor) or targets.shape != (n,)):
        raise ValueError(
            f"targets must be a tensor of shape ({n},) matching inputs, got {tuple(getattr(targets, 'shape', ()))}"
        )
    path = Path(path)
    if graph_optimization is None:
        _require_modules("onnx")
        import onnx

        graph_optimization = "disabled" if _is_qonnx(onnx.load(str(path), load_external_data=False)) else "all"
    runtime = OnnxRuntimeModel(path, graph_optimization=graph_optimization, intra_op_num_threads=intra_op_num_threads)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    sim_parts, rt_parts = [], []
    with torch.inference_mode(False), torch.no_grad(), eval_mode(model):
        for start in range(0, n, batch_size):
            chunk = inputs[start : start + batch_size]
            sim_parts.append(model(chunk.to(device)).detach().float().cpu())
            rt_parts.append(runtime(chunk))
    sim = torch.cat(sim_parts)
    deployed = torch.cat(rt_parts)
    if sim.shape != deployed.shape:
        raise ValueError(f"simulation logits {tuple(sim.shape)} and runtime logits {tuple(deployed.shape)} differ in shape")
    diff = (sim - deployed).abs()
    sim_pred, rt_pred = sim.argmax(1), deployed.argmax(1)
    flipped = int((sim_pred != rt_pred).sum())
    result: dict[str, Any] = {
        "num_samples": n,
        "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
        "prediction_flip_rate": flipped / n,
        "num_flipped": flipped,
        "simulation_accuracy": None,
        "runtime_accuracy": None,
        "runtime": dict(runtime.settings),
    }
    if targets is not None:
        labels = targets.detach().cpu()
        result["simulation_accuracy"] = float((sim_pred == labels).float().mean())
        result["runtime_accuracy"] = float((rt_pred == labels).float().mean())
    return result
