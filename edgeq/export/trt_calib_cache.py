"""edgeq's calibration table -> TensorRT's text calibration cache (implicit INT8, older JetPack).

Why this exists: explicit Q/DQ (the ``int8-trt`` ONNX) is the recommended TensorRT path, but
implicit INT8 through a calibrator is what TensorRT 10 on older JetPack releases still runs best
for some models. Rather than calibrating a second time on the device (other images, another
algorithm, other ranges), edgeq writes the ranges it already measured in PyTorch into the cache
format TensorRT reads, so every backend quantizes with the same ranges and parity stays
meaningful. TensorRT then reads the cache and skips its own calibration pass.

The format, as TensorRT writes it (``IInt8EntropyCalibrator2::writeCalibrationCache``)::

    TRT-100300-EntropyCalibration2
    images: 3c010204
    /model.0/conv/Conv_output_0: 3d8e949a

A header ``TRT-<version>-<algorithm>`` (version = major*10000 + minor*100 + patch since
TensorRT 10, major*1000 + minor*100 + patch before: 10.3.0 -> 100300, 8.6.1 -> 8601), then one
line per tensor: the ONNX tensor name TensorRT sees, ``": "``, and the per-tensor scale as the
hex of its float32 bit pattern, most significant byte first (``struct.pack(">f")``). The scale
is symmetric: ``scale = amax / 127`` (an input in [0, 1] gives ``3c010204`` = 1/127).

Pure Python: no TensorRT needed, so the cache can be written on the x86 box that quantized the
model and copied to the device.
"""

from __future__ import annotations

import math
import re
import struct
from pathlib import Path

from edgeq.errors import EdgeqError
from edgeq.utils.files import atomic_write_text

#: JetPack 6.1/6.2 ship TensorRT 10.3.0; ``build_engine`` re-tags the header for other versions.
DEFAULT_TAG = "TRT-100300-EntropyCalibration2"
ALGORITHM = "EntropyCalibration2"
_HEADER = re.compile(r"^TRT-(\d+)-(\w+)$")
_INT8_MAX = 127.0


def tensorrt_version_tag(trt_version: str, algorithm: str = ALGORITHM) -> str:
    """The cache header TensorRT ``trt_version`` (``"10.3.0.30"``) writes and accepts.

    >>> tensorrt_version_tag("10.3.0.30"), tensorrt_version_tag("8.6.1")
    ('TRT-100300-EntropyCalibration2', 'TRT-8601-EntropyCalibration2')
    """
    parts = (str(trt_version).split(".") + ["0", "0"])[:3]
    try:
        major, minor, patch = (int(p) for p in parts)
    except ValueError:
        raise EdgeqError(f"cannot read TensorRT version {trt_version!r} (expected e.g. 10.3.0)") from None
    number = major * 10000 + minor * 100 + patch if major >= 10 else major * 1000 + minor * 100 + patch
    return f"TRT-{number}-{algorithm}"


def scale_from_amax(amax: float) -> float:
    """Symmetric int8 scale, computed in float32 as PyTorch's fake-quant does (amax / 127)."""
    if not math.isfinite(amax) or amax < 0:
        raise EdgeqError(f"calibration range amax={amax!r} is not a finite non-negative number")
    a = struct.unpack(">f", struct.pack(">f", amax))[0]
    return struct.unpack(">f", struct.pack(">f", a / _INT8_MAX))[0]


def encode_scale(scale: float) -> str:
    """Eight hex digits of the float32 bit pattern, big-endian: 0.1 -> ``3dcccccd``."""
    return struct.pack(">f", scale).hex()


def decode_scale(text: str) -> float:
    """Inverse of :func:`encode_scale`; accepts TensorRT's unpadded form too (``0`` for 0.0)."""
    bits = int(text.strip(), 16)
    if not 0 <= bits <= 0xFFFFFFFF:
        raise ValueError(f"{text!r} is not a 32-bit value")
    return struct.unpack(">f", bits.to_bytes(4, "big"))[0]


def format_calibration_cache(scales: dict[str, float], header: str = DEFAULT_TAG) -> str:
    """The cache text for per-tensor ``scales`` (not amax), in the given order."""
    _check_header(header)
    lines = [header]
    for name, scale in scales.items():
        if not name or "\n" in name:
            raise EdgeqError(f"tensor name {name!r} cannot be written to a calibration cache")
        lines.append(f"{name}: {encode_scale(scale)}")
    return "\n".join(lines) + "\n"


def parse_calibration_cache(text: str, source: str = "calibration cache") -> tuple[str, dict[str, float]]:
    """``(header, scales)`` from cache text. Tensor names may contain ``": "``: split on the last."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise EdgeqError(f"{source} is empty")
    header = lines[0].strip()
    _check_header(header, source)
    scales: dict[str, float] = {}
    for number, line in enumerate(lines[1:], start=2):
        name, sep, value = line.rpartition(":")
        try:
            if not sep or not name.strip():
                raise ValueError(line)
            scales[name.strip()] = decode_scale(value)
        except ValueError:
            raise EdgeqError(f"{source}, line {number}: expected 'tensor_name: hexscale', got {line!r}") from None
    return header, scales


def write_calibration_cache(
    amax_by_tensor: dict[str, float], path: str | Path, trt_version_tag: str = DEFAULT_TAG
) -> Path:
    """Write edgeq's ranges (amax per ONNX tensor name, the input ``images`` included).

    The header only matters to the TensorRT that reads it: ``build_engine`` presents the cache
    under the running TensorRT's tag, because these scales come from edgeq, not from a
    TensorRT calibration run, and do not depend on its version.
    """
    if not amax_by_tensor:
        raise EdgeqError("no calibration ranges to write: the calibration table is empty")
    scales = {name: scale_from_amax(amax) for name, amax in amax_by_tensor.items()}
    return atomic_write_text(Path(path), format_calibration_cache(scales, trt_version_tag))


def read_cache_text(path: str | Path) -> str:
    """A cache file's text, or one sentence saying why it cannot be read."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EdgeqError(f"calibration cache {path} does not exist") from None
    except UnicodeDecodeError:
        raise EdgeqError(f"{path} is not a TensorRT text calibration cache") from None


def read_calibration_cache(path: str | Path) -> dict[str, float]:
    """Per-tensor scales from a cache file (edgeq's or one TensorRT wrote)."""
    return parse_calibration_cache(read_cache_text(path), str(path))[1]


def retag_calibration_cache(text: str, trt_version: str) -> tuple[str, bool]:
    """Cache text under the header ``trt_version`` accepts; ``(text, changed)``.

    TensorRT ignores a cache whose header names another version or algorithm, and with no
    calibration data the INT8 build then fails.
    """
    header, _, rest = text.partition("\n")
    wanted = tensorrt_version_tag(trt_version)
    _check_header(header.strip())
    if header.strip() == wanted:
        return text, False
    return f"{wanted}\n{rest}", True


def cache_mismatch(scales: dict[str, float], onnx_tensors: set[str], input_name: str) -> str | None:
    """Why a cache does not belong to this ONNX (a stale cache from another export), or None.

    TensorRT silently drops scales for names it does not know and runs those tensors in float,
    so a cache from an earlier export "works" and loses INT8 without a word. Names TensorRT
    invents for its own layers (``(Unnamed Layer* 12) ...``) are not ONNX names and are skipped.
    """
    if input_name not in scales:
        return f"it has no scale for the input {input_name!r}"
    unknown = sorted(n for n in scales if n not in onnx_tensors and not n.startswith("(Unnamed Layer"))
    if unknown:
        shown = ", ".join(unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
        return f"{len(unknown)} of its {len(scales)} tensors are not in the ONNX ({shown})"
    return None


def _check_header(header: str, source: str = "calibration cache") -> None:
    if not _HEADER.match(header):
        raise EdgeqError(
            f"{source}: header {header!r} is not a TensorRT calibration cache header",
            note="expected e.g. TRT-100300-EntropyCalibration2",
        )
