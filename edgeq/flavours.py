"""Every INT8 flavour once, as data: the one place that names them.

One calibration feeds three graphs, because each backend fuses a different Q/DQ pattern into
its integer kernels. A :class:`Flavour` says everything the rest of edgeq needs to know about
one of them: its name (file tag and ``edgeq.flavour`` metadata), the backend it is made for,
the export format that produces it, its Q/DQ :class:`Policy`, the steps after the Q/DQ rewrite
and the files it writes. Export, runtime, verify and the CLI read this module; none of them
spells a flavour name or keeps a list of its own.

Imports neither torch nor onnx: the runtime on a device reads it too.

    >>> get("ort").name, get("int8-ov").backend, for_format("engine").name
    ('int8-ort', 'openvino', 'int8-trt')
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeq.errors import EdgeqError

FLOAT = "float"  # the ``edgeq.flavour`` of every float artifact


@dataclass(frozen=True)
class OpRule:
    """What a flavour quantizes around one op type."""

    inputs: tuple[int, ...] | str = (0,)  # activation inputs to quantize, or "all"
    output: bool = False  # quantize the op's output too (whole DQ -> op -> Q units)
    constants: bool = False  # quantize constant (non-weight) inputs, e.g. Add's +3
    # "input": the input tensor takes the output's scale (a ReLU/Clip then disappears into the
    # saturating Q before it); "output": the output keeps the input's scale (MaxPool, Resize run
    # on int8 only when both sides agree).
    tie: str | None = None


@dataclass(frozen=True)
class Policy:
    """Where a flavour puts Q/DQ pairs and in which number format (applied by export.qdq)."""

    activations: str  # "int8" (symmetric, zero point 0), "uint8" (asymmetric) or "auto8" (uint8 zp 0 when >= 0, else int8)
    rules: dict[str, OpRule]
    quantize_bias: bool = False  # int32 bias with scale = input scale x weight scale (ONNX Runtime's QLinearConv)
    # the head convolutions' outputs (box and score logits, read by the float decode):
    # "float"; "per-tensor" (one scale: cost 2.4-3.0 mAP50-95 points on the demo); "per-channel"
    # (each channel's calibrated range folded into the convolution: the head normalization step)
    head_outputs: str = "float"
    note: str = ""
    # activation tensors the sensitivity analysis leaves float by default (export --fallback):
    # chosen per backend by measuring accuracy and speed together (docs/BENCHMARKS.md)
    default_fallback: int = 0

    @property
    def symmetric(self) -> bool:
        """Whether the calibrator should choose symmetric ranges for this number format."""
        return self.activations != "uint8"


HEAD_OUTPUTS = ("float", "per-channel", "per-tensor")

# The steps after the Q/DQ rewrite, in the order export runs them.
BIAS_CORRECTION = "bias-correction"  # mean shift of rounding taken out of the conv biases
HEAD_NORMALIZATION = "head-normalization"  # per-channel head ranges folded into the convolutions
OPENVINO_IR = "openvino-ir"  # the Q/DQ ONNX converted to IR (.xml + .bin)
CALIBRATION_CACHE = "calibration-cache"  # TensorRT's implicit-INT8 cache, from the same table
TENSORRT_ENGINE = "tensorrt-engine"  # built where TensorRT is installed, else trtexec lines


@dataclass(frozen=True)
class Flavour:
    name: str  # file tag and edgeq.flavour metadata: stem.<name>.onnx
    key: str  # the short form users may type (--flavour ort)
    backend: str  # the runtime backend it is made for (edgeq.runtime.backends)
    backend_title: str  # how people call that backend
    format: str  # the export format (--format) whose INT8 export produces it
    policy: Policy
    steps: tuple[str, ...] = ()
    uint8_weights: bool = False  # accepts --uint8-weights (weights stored as uint8, zero point 128)
    # the flavour whose Q/DQ graph the fine-tune trains this one's weights on (None: its own graph)
    finetune_on: str | None = None

    def onnx_name(self, stem: str) -> str:
        """The Q/DQ ONNX every flavour writes first."""
        return f"{stem}.{self.name}.onnx"

    def artifact_names(self, stem: str) -> dict[str, str]:
        """Artifact key -> file name for everything this flavour writes (besides the table)."""
        names = {self.name: self.onnx_name(stem)}
        if OPENVINO_IR in self.steps:
            names[f"{self.name}-ir"] = f"{stem}.{self.name}.xml"
        if TENSORRT_ENGINE in self.steps:
            names[f"{self.name}-engine"] = f"{stem}.{self.name}.engine"
        if CALIBRATION_CACHE in self.steps:
            names["trt-cache"] = f"{stem}.calib.cache"
        return names

    def deployed_key(self) -> str:
        """The artifact key of what this flavour's backend runs (the IR, the engine, or the ONNX)."""
        if OPENVINO_IR in self.steps:
            return f"{self.name}-ir"
        if TENSORRT_ENGINE in self.steps:
            return f"{self.name}-engine"
        return self.name


_ALL_OPS = OpRule(inputs="all", output=True, constants=True)

FLAVOURS: dict[str, Flavour] = {
    f.name: f
    for f in (
        # TensorRT explicit quantization: Q/DQ on the inputs of the layers that run in int8; the
        # builder propagates and fuses the rest. Symmetric int8 only, zero point 0.
        Flavour(
            "int8-trt", "trt", "tensorrt", "TensorRT", "engine",
            Policy("int8", {"Conv": OpRule((0,)), "Gemm": OpRule((0,))},
                   note="int8 symmetric, Q/DQ on Conv/Gemm inputs only (TensorRT explicit quantization)",
                   default_fallback=8),  # same placement as int8-ov, whose accuracy needs it
            steps=(BIAS_CORRECTION, CALIBRATION_CACHE, TENSORRT_ENGINE),
        ),
        # ONNX Runtime's CPU provider turns DQ -> op -> Q units into QLinear* kernels; a unit that
        # is not closed by a Q on its output stays float, so every op on the path is quantized.
        # The head convolutions' outputs (box and score logits) stay float by default: the three
        # head convolutions then run in float (1-3 % of the INT8 latency at 320 and 640) and save
        # 0.2 mAP50-95 points on the final demo checkpoint against per-channel output ranges
        # (--head-outputs per-channel); one per-tensor scale cost 2.4 points (docs/BENCHMARKS.md).
        Flavour(
            "int8-ort", "ort", "onnxruntime", "ONNX Runtime", "onnx",
            Policy("uint8", {
                "Conv": OpRule((0,), output=True),
                "Gemm": OpRule((0,), output=True),
                "Add": _ALL_OPS,
                "Mul": _ALL_OPS,
                "Sigmoid": OpRule((0,), output=True),
                "Clip": OpRule((0,), output=True, tie="input"),
                "Relu": OpRule((0,), output=True, tie="input"),
                "Concat": OpRule("all", output=True),
                "GlobalAveragePool": OpRule((0,), output=True),
                "MaxPool": OpRule((0,), output=True, tie="output"),
                "Resize": OpRule((0,), output=True, tie="output"),
            }, quantize_bias=True, head_outputs="float",
                note="uint8 asymmetric activations, whole DQ -> op -> Q units (ONNX Runtime QLinear kernels)",
                # phase 1's best demo checkpoint: drop 2.41 -> 1.60 mAP50-95 points for 1.10-1.14x
                # the latency (the stem and first blocks' convolutions run in float)
                default_fallback=8),
            steps=(BIAS_CORRECTION, HEAD_NORMALIZATION),
            uint8_weights=True,
            # its weights fine-tuned on int8-ov's graph (same uint8 activations, Q/DQ on Conv inputs)
            # lost 0.35 mAP50-95 points on ONNX Runtime, fine-tuned on its own whole-unit graph 0.59,
            # although ONNX Runtime's distillation loss was lower for the latter (docs/BENCHMARKS.md)
            finetune_on="int8-ov",
        ),
        # OpenVINO: measured on the demo model at 320 (docs/BENCHMARKS.md): Q/DQ on Conv/MatMul
        # inputs only ran as fast as adding Add/Concat inputs and faster than NNCF's graph, with
        # fewer rounding points. Asymmetric uint8 activations: h-swish outputs reach down to
        # -0.375 only, so a symmetric int8 scale wastes most of its negative half.
        Flavour(
            "int8-ov", "ov", "openvino", "OpenVINO", "openvino",
            Policy("uint8", {"Conv": OpRule((0,)), "Gemm": OpRule((0,))},
                   note="uint8 asymmetric activations on Conv/MatMul inputs (OpenVINO low-precision transformations)",
                   default_fallback=8),
            steps=(BIAS_CORRECTION, OPENVINO_IR),
        ),
    )
}

NAMES = tuple(FLAVOURS)
_BY_KEY = {f.key: f for f in FLAVOURS.values()}
_BY_FORMAT = {f.format: f for f in FLAVOURS.values()}
_BY_BACKEND = {f.backend: f for f in FLAVOURS.values()}


def get(name: str) -> Flavour:
    """A flavour by its name (``int8-ort``) or key (``ort``); an unknown one is a user error."""
    flavour = FLAVOURS.get(name) or _BY_KEY.get(name)
    if flavour is None:
        raise EdgeqError(f"unknown INT8 flavour {name!r}", note=f"choose from {', '.join(NAMES)}")
    return flavour


def for_format(fmt: str) -> Flavour:
    """The flavour an INT8 export for ``--format fmt`` writes."""
    if fmt not in _BY_FORMAT:
        raise EdgeqError(f"no INT8 flavour for the {fmt!r} format", note=f"INT8 formats: {', '.join(_BY_FORMAT)}")
    return _BY_FORMAT[fmt]


def for_backend(backend: str) -> Flavour | None:
    """The flavour made for ``backend``, or None (torch has none)."""
    return _BY_BACKEND.get(backend)


def is_int8(flavour: str) -> bool:
    """Whether an ``edgeq.flavour`` value names one of the INT8 flavours."""
    return flavour in FLAVOURS


def made_for(flavour: str) -> str | None:
    """The backend an ``edgeq.flavour`` value was quantized for; None for float or unknown."""
    f = FLAVOURS.get(flavour)
    return f.backend if f else None


def known(flavour: str) -> bool:
    """Whether ``flavour`` is a value edgeq writes into ``edgeq.flavour``."""
    return flavour == FLOAT or flavour in FLAVOURS


def engine_source(flavour: str) -> bool:
    """Whether TensorRT can build an engine from an ONNX of this flavour (float or its own)."""
    return flavour == FLOAT or made_for(flavour) == "tensorrt"
