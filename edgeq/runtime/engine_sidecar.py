"""The JSON sidecar beside a TensorRT engine: where it lives, what it holds, writing, reading, checking.

An engine is a plan for one TensorRT version and one GPU: it does not load elsewhere (or loads
and misbehaves), and the engine file itself says neither. The builder
(:mod:`edgeq.export.trt_build`) therefore writes ``model.engine.json`` next to it, and the
TensorRT backend (:mod:`edgeq.runtime.backends.tensorrt`) reads it back to refuse a mismatch
in one sentence, with the command that rebuilds the engine, instead of an opaque
deserialization error. It also carries the ONNX's ``edgeq.*`` metadata (class names, strides,
image size, flavour), which a serialized engine cannot hold.

Both sides use this one module, so the file name, the keys and their meaning cannot drift
apart. It lives in the runtime because the runtime never imports ``edgeq.export``; it needs
neither TensorRT nor a GPU, so every rule here is tested anywhere.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgeq.errors import EdgeqError
from edgeq.runtime.backends.base import META_KEYS, META_PREFIX, ModelMeta, parse_meta

Shape = tuple[int, ...]
FORMAT = "edgeq-engine/1"  # the sidecar's own format tag
REBUILD = "TensorRT engines are not portable across TensorRT versions or GPU models: rebuild the engine on this device"
# sidecar keys the backend keeps in ModelMeta.extra (the engine's build facts, besides edgeq.*)
BUILD_FACTS = ("tensorrt_version", "device")


# ---------------------------------------------------------------------------- where


def sidecar_path(engine: str | Path) -> Path:
    """Where edgeq writes the sidecar: ``model.engine`` -> ``model.engine.json``."""
    engine = Path(engine)
    return engine.with_name(engine.name + ".json")


def find_sidecar(engine: str | Path) -> Path | None:
    """The sidecar to read: ``model.engine.json`` (edgeq's), else ``model.json``, else None.

    ``model.json`` is accepted because hand-written or other tools' records of an engine
    often use that name; an engine without either still loads, unchecked.
    """
    for candidate in (sidecar_path(engine), Path(engine).with_suffix(".json")):
        if candidate.is_file():
            return candidate
    return None


# ---------------------------------------------------------------------------- writing


def sidecar_dict(
    meta: dict[str, str],
    trt_version: str,
    device: dict[str, Any],
    onnx_sha256: str,
    *,
    fp16: bool,
    workspace_gb: float,
    calibration_cache: str | Path | None = None,
    profile: dict[str, tuple[Shape, Shape, Shape]] | None = None,
    int8: str | None = None,
    onnx_name: str | None = None,
    trtexec: str | None = None,
    build_seconds: float | None = None,
    built_at: str | None = None,
) -> dict[str, Any]:
    """Everything needed to tell, later and elsewhere, whether this engine can be used.

    ``tensorrt_version`` and ``device`` drive :func:`check_engine_compatibility`; the ONNX's
    ``edgeq.*`` metadata sits at the top level, where :func:`sidecar_props` finds it; the ONNX
    file and the trtexec line make the rebuild advice. ``int8`` is ``"explicit"``,
    ``"implicit"`` (then ``calibration_cache`` is recorded) or None.
    """
    from edgeq import __version__

    return {
        "format": FORMAT,
        "tensorrt_version": trt_version,
        "device": {"name": device.get("name", "unknown"), "compute_capability": device.get("compute_capability")},
        "precision": {"fp16": bool(fp16), "int8": int8},
        "workspace_gb": workspace_gb,
        "profile": {k: {"min": list(v[0]), "opt": list(v[1]), "max": list(v[2])} for k, v in (profile or {}).items()},
        "onnx": {"file": onnx_name, "sha256": onnx_sha256},
        "built_at": built_at or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": None if build_seconds is None else round(build_seconds, 2),
        "trtexec": trtexec,
        "calibration_cache": str(calibration_cache) if int8 == "implicit" and calibration_cache else None,
        "edgeq_version": __version__,
        **{k: v for k, v in meta.items() if k.startswith(META_PREFIX)},
    }


def write_sidecar(engine: str | Path, data: dict[str, Any]) -> Path:
    """``<engine>.json``, written beside the engine (temp file + rename: never half a record)."""
    from edgeq.utils.files import atomic_write_text

    return atomic_write_text(sidecar_path(engine), json.dumps(data, indent=2, sort_keys=False) + "\n")


# ---------------------------------------------------------------------------- reading


def read_sidecar(engine: str | Path) -> dict[str, Any]:
    """The sidecar's JSON object ({} when there is none: engines built by other tools)."""
    path = find_sidecar(engine)
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EdgeqError(f"cannot read the engine sidecar {path}: {exc}") from None
    if not isinstance(data, dict):
        raise EdgeqError(f"the engine sidecar {path} must hold a JSON object")
    return data


def sidecar_props(sidecar: dict[str, Any]) -> dict[str, str]:
    """Sidecar values as ``edgeq.*`` strings (keys with or without the prefix, values JSON or strings).

    The same strings ONNX ``metadata_props`` and OpenVINO ``rt_info`` give, so
    :func:`~edgeq.runtime.backends.base.parse_meta` reads all three alike.
    """
    props = {}
    for key, value in sidecar.items():
        short = key[len(META_PREFIX):] if key.startswith(META_PREFIX) else key
        if short in META_KEYS:
            props[META_PREFIX + short] = value if isinstance(value, str) else json.dumps(value)
    return props


def model_meta(sidecar: dict[str, Any], source: str) -> ModelMeta:
    """The engine's :class:`ModelMeta`: the ONNX's metadata, plus the build facts in ``extra``."""
    meta = parse_meta(sidecar_props(sidecar), source)
    meta.extra.update({k: v for k, v in sidecar.items() if k in BUILD_FACTS})
    return meta


# ---------------------------------------------------------------------------- checking


def _version(v: str) -> tuple[str, ...]:
    """Major.minor.patch: build numbers after them do not change the engine format."""
    return tuple(str(v).strip().split("."))[:3]


def _known(value: Any) -> str | None:
    """A recorded value, or None when it is missing or "unknown"."""
    text = str(value).strip() if value is not None else ""
    return None if text.lower() in ("", "unknown", "none") else text


def _capability(value: Any) -> tuple[int, int] | None:
    if isinstance(value, str) and "." in value:
        value = value.split(".")
    if isinstance(value, (list, tuple)) and len(value) == 2:
        try:
            return int(value[0]), int(value[1])
        except (TypeError, ValueError):
            return None
    return None


def check_engine_compatibility(
    sidecar: dict[str, Any],
    *,
    trt_version: str,
    device_name: str,
    compute_capability: tuple[int, int] | None,
    engine: str | Path,
) -> None:
    """Raise EdgeqError when the engine was built with another TensorRT version or on another GPU.

    ``sidecar["device"]`` is ``{"name": ..., "compute_capability": [major, minor] or "8.6"}``
    (a bare name string is accepted). Keys the sidecar lacks, or records as "unknown" (the
    exporter could not query the GPU), are not checked.
    """
    built: list[str] = []
    here: list[str] = []
    want_version = _known(sidecar.get("tensorrt_version"))
    if want_version and _version(want_version) != _version(trt_version):
        built.append(f"TensorRT {want_version}")
        here.append(f"TensorRT {trt_version}")
    device = sidecar.get("device")
    device = {"name": device} if isinstance(device, str) else device if isinstance(device, dict) else {}
    want_name = _known(device.get("name"))
    want_cc = _capability(device.get("compute_capability"))
    name_differs = bool(want_name) and str(want_name).strip() != str(device_name).strip()
    cc_differs = want_cc is not None and compute_capability is not None and want_cc != tuple(compute_capability)
    if name_differs or cc_differs:
        cc = f" (compute capability {want_cc[0]}.{want_cc[1]})" if want_cc else ""
        here_cc = f" (compute capability {compute_capability[0]}.{compute_capability[1]})" if compute_capability else ""
        built.append(f"{want_name or 'another GPU'}{cc}")
        here.append(f"{device_name}{here_cc}")
    if built:
        raise EdgeqError(
            f"{Path(engine).name} was built for {' on '.join(built)} "
            f"but this machine has {' on '.join(here)}; {REBUILD}{_rebuild_command(sidecar)}"
        )


def _rebuild_command(sidecar: dict[str, Any]) -> str:
    """' with `edgeq export m.onnx --format engine` or `trtexec ...`' when the sidecar names its ONNX."""
    onnx = sidecar.get("onnx")
    onnx_file = onnx.get("file") if isinstance(onnx, dict) else None
    if not onnx_file:
        return ""
    trtexec = f" or `{sidecar['trtexec']}`" if sidecar.get("trtexec") else ""
    return f" with `edgeq export {onnx_file} --format engine`{trtexec}"
