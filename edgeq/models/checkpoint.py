"""edgeq's checkpoint format: save and load detectors, also from upstream YOLOv5 ``.pt`` files.

edgeq's format is a dict of tensors and plain values, so it loads with
``torch.load(weights_only=True)``. Upstream YOLOv5 checkpoints pickle whole model objects; those
are read by the restricted unpickler of :mod:`edgeq.models.safe_pickle` (nothing in the file runs
unless ``trust`` is set) and rebuilt by :mod:`edgeq.models.yolov5_import`. Either way the result
is a :class:`LoadedCheckpoint` holding edgeq's own float32 :class:`DetectionModel`.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from edgeq.errors import EdgeqError
from edgeq.models.safe_pickle import read_checkpoint_bytes, unpickle_checkpoint
from edgeq.models.yolo import CFG_DIR, DetectionModel, resolve_cfg
from edgeq.models.yolov5_import import build_model, check_stride, import_yolov5, load_weights

FORMAT = "edgeq-checkpoint"
FORMAT_VERSION = 1
DEFAULT_IMGSZ = 640  # what YOLOv5 checkpoints are trained at when they do not say


@dataclass
class LoadedCheckpoint:
    """A float32 eval-mode model plus what the checkpoint says about it."""

    model: DetectionModel
    names: list[str]
    imgsz: int | None
    stride: list[float]
    source: str  # "edgeq", "yolov5" or "config"
    sha256: str
    path: Path
    extra: dict = field(default_factory=dict)

    def input_size(self, requested: int | None = None) -> int:
        """The square input size to run at: ``requested``, else the checkpoint's, else 640; a
        size that is not a positive multiple of the model's stride is refused here, once."""
        size = requested or self.imgsz or DEFAULT_IMGSZ
        stride = int(max(self.stride)) if self.stride else 32
        if size <= 0 or size % stride:
            raise EdgeqError(f"--imgsz {size} must be a positive multiple of the model's stride {stride}")
        return size


# --------------------------------------------------------------------------- saving
def save_checkpoint(
    model: DetectionModel,
    path: str | Path,
    *,
    names: list[str] | None = None,
    imgsz: int,
    extra: dict | None = None,
    half: bool = False,
) -> Path:
    """Write ``model`` in edgeq's format (plain values only), atomically.

    ``half=True`` stores floating tensors as float16 (half the size, e.g. for a checkpoint that
    ships in a repository); they load back as float32, so the loaded model *is* the rounded one.
    """
    path = Path(path)
    if not isinstance(model, DetectionModel):
        raise TypeError(f"save_checkpoint needs an edgeq DetectionModel, got {type(model).__name__}")
    names = [str(n) for n in (names if names is not None else model.names)]
    if len(names) != model.nc:
        raise EdgeqError(f"{path}: {len(names)} class names given for a model with nc={model.nc}")
    if not isinstance(imgsz, int) or isinstance(imgsz, bool) or imgsz < 1:
        raise EdgeqError(f"{path}: imgsz must be a positive integer, got {imgsz!r}")
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "edgeq_version": _edgeq_version(),
        "yaml": to_plain(model.yaml, strict=True),
        "state_dict": _float32_state(model.state_dict(), half=half),
        "names": names,
        "imgsz": imgsz,
        "stride": [float(s) for s in model.stride.tolist()],
        "extra": to_plain(extra or {}, strict=True),
    }
    _atomic_torch_save(payload, path)
    return path


def _edgeq_version() -> str:
    from edgeq import __version__

    return __version__


def _float32_state(state: dict[str, torch.Tensor], half: bool = False) -> dict[str, torch.Tensor]:
    """Detached CPU copies, floating tensors as float32 (or float16 with ``half``)."""
    dtype = torch.float16 if half else torch.float32
    out = {}
    for k, v in state.items():
        v = v.detach().to("cpu").clone()
        out[k] = v.to(dtype) if v.is_floating_point() else v
    return out


def _atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save to a temp file in the same folder, then os.replace: no half-written files."""
    folder = path.parent
    if folder.exists() and not folder.is_dir():
        raise EdgeqError(f"cannot write {path}: {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise EdgeqError(f"cannot write {path}: folder {folder} is not writable ({exc.strerror or exc})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        from edgeq.utils.files import default_file_mode

        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except OSError as exc:
        raise EdgeqError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def to_plain(value: Any, *, strict: bool = False) -> Any:
    """Convert to values ``weights_only`` loads (dict/list/str/number/bool/None).

    numpy scalars and arrays, 0-d tensors and paths are converted; anything else raises
    ``TypeError`` when ``strict`` and is dropped (returned as ``_DROP``) otherwise.
    """
    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, dict):
        items = ((str(k), to_plain(v, strict=strict)) for k, v in value.items())
        return {k: v for k, v in items if v is not _DROP}
    if isinstance(value, (list, tuple)):
        return [v for v in (to_plain(x, strict=strict) for x in value) if v is not _DROP]
    if isinstance(value, pathlib.PurePath):
        return str(value)
    if isinstance(value, torch.Tensor) or type(value).__module__ == "numpy":
        try:
            return to_plain(value.tolist(), strict=strict)
        except (AttributeError, TypeError, ValueError):
            pass
    for kind in (bool, int, float, str):  # subclasses (IntEnum, str enums) as the base type
        if isinstance(value, kind):
            return kind(value)
    if strict:
        raise TypeError(f"checkpoint values must be plain (dict, list, str, number, bool, None), got {type(value)}")
    return _DROP


_DROP = object()


def file_sha256(data: bytes) -> str:
    """Hex digest of the exact bytes that were loaded (reports and export manifests cite it)."""
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- public loaders
def load_checkpoint(path: str | Path, *, trust: bool = False) -> LoadedCheckpoint:
    """Load an edgeq or upstream YOLOv5 checkpoint into edgeq's float32 DetectionModel (eval).

    Nothing in the file runs unless ``trust`` is set: see :mod:`edgeq.models.safe_pickle`.
    """
    path = Path(path)
    data = read_checkpoint_bytes(path)
    obj = unpickle_checkpoint(path, data, trust=trust)
    digest = file_sha256(data)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        return _from_edgeq(path, obj, digest)
    return _from_yolov5(path, obj, digest)


def load_model(source: str | Path, *, nc: int | None = None, trust: bool = False) -> LoadedCheckpoint:
    """A model yaml / bundled config name (untrained model) or a checkpoint file."""
    if _is_config(source):
        return _from_config(source, nc)
    path = Path(source)
    if not path.exists() and not path.suffix:
        known = ", ".join(sorted(p.stem for p in CFG_DIR.glob("*.yaml")))
        message = f"{source} is neither a checkpoint file nor a bundled model config"
        raise EdgeqError(message, note=f"bundled configs: {known}")
    loaded = load_checkpoint(path, trust=trust)
    if nc is not None and nc != len(loaded.names):
        raise EdgeqError(f"{path} has {len(loaded.names)} classes but nc={nc} was asked for")
    return loaded


def _is_config(source: str | Path) -> bool:
    path = Path(source)
    if path.suffix.lower() in (".yaml", ".yml"):
        return True
    return not path.exists() and str(source) == path.name and (CFG_DIR / f"{path.name}.yaml").is_file()


def _from_config(source: str | Path, nc: int | None) -> LoadedCheckpoint:
    cfg = resolve_cfg(source)
    model = DetectionModel(cfg, nc=nc).float().eval()
    return LoadedCheckpoint(
        model=model,
        names=list(model.names),
        imgsz=None,
        stride=[float(s) for s in model.stride.tolist()],
        source="config",
        sha256=file_sha256(cfg.read_bytes()),
        path=cfg,
        extra={},
    )


# --------------------------------------------------------------------------- edgeq format
_EDGEQ_FIELDS = {"yaml": dict, "state_dict": dict, "names": list, "stride": list}


def _from_edgeq(path: Path, ckpt: dict, digest: str) -> LoadedCheckpoint:
    version = ckpt.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise EdgeqError(
            f"{path} has edgeq checkpoint format version {version!r}; this edgeq reads up to {FORMAT_VERSION}"
        )
    for key, kind in _EDGEQ_FIELDS.items():
        if not isinstance(ckpt.get(key), kind):
            raise EdgeqError(f"{path}: edgeq checkpoint field {key!r} is missing or not a {kind.__name__}")
    names = [str(n) for n in ckpt["names"]]
    model = build_model(path, ckpt["yaml"], names)
    load_weights(path, model, ckpt["state_dict"])
    check_stride(path, model, ckpt["stride"])
    imgsz = ckpt.get("imgsz")
    return LoadedCheckpoint(
        model=model.eval(),
        names=names,
        imgsz=imgsz if isinstance(imgsz, int) else None,
        stride=[float(s) for s in model.stride.tolist()],
        source="edgeq",
        sha256=digest,
        path=path,
        extra=dict(ckpt.get("extra") or {}),
    )


# --------------------------------------------------------------------------- upstream YOLOv5
def _from_yolov5(path: Path, obj: Any, digest: str) -> LoadedCheckpoint:
    """The rebuilt upstream model; of its training-run entries only the plain values are kept."""
    imported = import_yolov5(path, obj)
    model = imported.model
    return LoadedCheckpoint(
        model=model,
        names=imported.names,
        imgsz=imported.imgsz,
        stride=[float(s) for s in model.stride.tolist()],
        source="yolov5",
        sha256=digest,
        path=path,
        extra={k: v for k, raw in imported.extra.items() if (v := to_plain(raw)) is not _DROP},
    )


__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "LoadedCheckpoint",
    "load_checkpoint",
    "load_model",
    "save_checkpoint",
    "to_plain",
]
