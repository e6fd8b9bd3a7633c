"""The quantization settings of a model, recorded in checkpoints."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from lightning_qsec._validation import check_bit_width


@dataclass(frozen=True)
class QuantConfig:
    """Settings that :func:`~lightning_qsec.quant.quantize_model` applies.

    Attributes:
        weight_bit_width: bit width of every weight quantizer (2..16).
        act_bit_width: bit width of every activation and input quantizer (2..16).
        layer_bit_widths: module-name glob -> bit width, overriding the defaults for
            the matching layers (weights and inputs of conv/linear layers, outputs
            of activations).
        skip: module names or globs left in float.
        quantize_input: quantize the input of the first conv/linear layer.
        per_channel: per-output-channel weight scales instead of per-tensor.
        input_bit_width: bit width of that input quantizer (2..16), held fixed: the
            data's own precision, which :func:`~lightning_qsec.quant.at_precision` leaves
            as it is, so evaluation at other bit widths varies the network, not its input
            (Brevitas' low-bit ``bnn_pynq`` networks keep an 8-bit input the same way).
            ``None``: ``act_bit_width`` (or the first layer's ``layer_bit_widths``
            entry), changed by ``at_precision`` like every activation. Needs
            ``quantize_input=True``.
    """

    weight_bit_width: int = 8
    act_bit_width: int = 8
    layer_bit_widths: Mapping[str, int] = field(default_factory=dict)
    skip: Sequence[str] = ()
    quantize_input: bool = True
    per_channel: bool = False
    input_bit_width: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "weight_bit_width", check_bit_width(self.weight_bit_width, "weight_bit_width"))
        object.__setattr__(self, "act_bit_width", check_bit_width(self.act_bit_width, "act_bit_width"))
        if not isinstance(self.layer_bit_widths, Mapping):
            raise ValueError(f"layer_bit_widths must be a mapping glob -> bit width, got {self.layer_bit_widths!r}")
        widths = {
            str(glob): check_bit_width(bits, f"layer_bit_widths[{glob!r}]")
            for glob, bits in self.layer_bit_widths.items()
        }
        object.__setattr__(self, "layer_bit_widths", widths)
        for flag in ("quantize_input", "per_channel"):  # the string "false" would be truthy
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        if self.input_bit_width is not None:
            object.__setattr__(self, "input_bit_width", check_bit_width(self.input_bit_width, "input_bit_width"))
            if not self.quantize_input:
                raise ValueError(
                    f"input_bit_width={self.input_bit_width} needs quantize_input=True (the input is left in float)"
                )
        if isinstance(self.skip, str) or not isinstance(self.skip, Sequence):
            raise ValueError(f"skip must be a sequence of module names or globs, got {self.skip!r}")
        object.__setattr__(self, "skip", tuple(str(s) for s in self.skip))

    def to_dict(self) -> dict[str, Any]:
        """A plain dict that ``torch.load(weights_only=True)`` reads back."""
        out = asdict(self)
        out["layer_bit_widths"] = dict(self.layer_bit_widths)
        out["skip"] = list(self.skip)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown quantization settings {sorted(unknown)}; allowed: {sorted(cls.__dataclass_fields__)}")
        return cls(**data)
