"""Save and load detector checkpoints: edgeq's own format and upstream YOLOv5 ``.pt`` files.

edgeq's format is a dict of tensors and plain values, so it loads with
``torch.load(weights_only=True)``. Upstream YOLOv5 checkpoints pickle whole model objects
(``models.yolo.DetectionModel`` and friends), which ``weights_only`` refuses. Those are read with
a restricted unpickler: upstream YOLOv5 classes become inert placeholder modules that only hold
state, ``torch.nn`` layers, tensors and a few plain types are allowed, and any other global
(``os.system``, ``builtins.eval``...) stops the load before anything runs. Only
``trust=True`` (the CLI's ``--trust-checkpoint``) falls back to full pickle.

The weights are then copied into edgeq's own :class:`DetectionModel`, built from the
checkpoint's yaml, with strict checks on keys, shapes, layer types, strides and class count.
"""

from __future__ import annotations

import _compat_pickle
import collections
import contextlib
import hashlib
import importlib
import io
import math
import os
import pathlib
import pickle
import re
import tempfile
import types
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from edgeq.errors import EdgeqError
from edgeq.models.yolo import CFG_DIR, DetectionModel, resolve_cfg

FORMAT = "edgeq-checkpoint"
FORMAT_VERSION = 1
TRUST_NOTE = (
    "If you trust the file, --trust-checkpoint (load_checkpoint(..., trust=True)) loads it with full "
    "pickle, which can run arbitrary code."
)

# Modules of an upstream YOLOv5 checkout whose classes are replaced by inert placeholders.
UPSTREAM_MODULES = ("models.yolo", "models.common", "models.experimental")
# State dict entries of old YOLOv5 versions that edgeq recomputes instead of loading.
_IGNORED_SUFFIXES = ("anchor_grid", "grid")
_MAX_DEPTH = 64


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


# --------------------------------------------------------------------------- restricted unpickling
class _RefusedGlobal(Exception):
    """Raised from find_class: the pickle names a global outside the allow-list."""

    def __init__(self, qualname: str):
        super().__init__(qualname)
        self.qualname = qualname


class _UpstreamModule(nn.Module):
    """Inert stand-in for an upstream YOLOv5 class: holds the pickled state, runs nothing."""

    upstream_name = "?"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{self.upstream_name} placeholder from a checkpoint cannot run")


_PLACEHOLDERS: dict[str, type[_UpstreamModule]] = {}


def _placeholder(module: str, name: str) -> type[_UpstreamModule]:
    """One placeholder class per upstream global, so layer type names survive."""
    key = f"{module}.{name}"
    if key not in _PLACEHOLDERS:
        attrs = {"upstream_name": key, "__module__": f"edgeq.upstream.{module}"}
        _PLACEHOLDERS[key] = type(name, (_UpstreamModule,), attrs)
    return _PLACEHOLDERS[key]


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """Protocol-2 pickles write bytes as _codecs.encode(str, 'latin1'); allow only that codec."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise _RefusedGlobal(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _plain_reconstructor(cls: type, base: type, state: Any) -> Any:
    """copyreg._reconstructor (protocol 0/1 objects), only for plain ``object`` bases."""
    if base is not object:
        raise _RefusedGlobal(f"copyreg._reconstructor with base {base!r}")
    return object.__new__(cls)


def _numpy_multiarray() -> types.ModuleType:
    """numpy 2 moved numpy.core to numpy._core; old pickles name either."""
    try:
        return importlib.import_module("numpy._core.multiarray")
    except ImportError:
        return importlib.import_module("numpy.core.multiarray")


_TORCH_REBUILDERS = ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_parameter_with_state")
_PLAIN_BUILTINS = {"set": set, "frozenset": frozenset, "slice": slice, "complex": complex, "bytearray": bytearray,
                   "object": object}  # object: the base that copyreg._reconstructor names
_PATHS = {"PosixPath": pathlib.PurePosixPath, "WindowsPath": pathlib.PureWindowsPath,
          "PurePosixPath": pathlib.PurePosixPath, "PureWindowsPath": pathlib.PureWindowsPath}


def _fixed_globals() -> dict[str, Callable[[], Any]]:
    """Allowed 'module.name' -> how to get the object (lazy: numpy is imported only if named)."""
    table: dict[str, Callable[[], Any]] = {
        f"torch._utils.{n}": (lambda n=n: getattr(torch._utils, n)) for n in _TORCH_REBUILDERS
    }
    table.update({f"builtins.{n}": (lambda obj=obj: obj) for n, obj in _PLAIN_BUILTINS.items()})
    table.update({
        "collections.OrderedDict": lambda: collections.OrderedDict,
        "_codecs.encode": lambda: _latin1_encode,
        "copyreg._reconstructor": lambda: _plain_reconstructor,
        "torch.Size": lambda: torch.Size,
        "torch.device": lambda: torch.device,
        "torch.UntypedStorage": lambda: torch.UntypedStorage,
        "torch.serialization._get_layout": lambda: torch.serialization._get_layout,
        "numpy.dtype": lambda: importlib.import_module("numpy").dtype,
        "numpy.ndarray": lambda: importlib.import_module("numpy").ndarray,
    })
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        table[f"{mod}.scalar"] = lambda: _numpy_multiarray().scalar
        table[f"{mod}._reconstruct"] = lambda: _numpy_multiarray()._reconstruct
    # Paths become pure paths: same value, no filesystem access, loadable on any OS.
    for mod in ("pathlib", "pathlib._local"):
        table.update({f"{mod}.{n}": (lambda cls=cls: cls) for n, cls in _PATHS.items()})
    return table


_FIXED = _fixed_globals()
_TORCH_NN_MODULE = re.compile(r"torch\.nn\.modules(\.[A-Za-z_][A-Za-z0-9_]*)+")


def _normalize_global(module: str, name: str) -> tuple[str, str]:
    """Python 2 names (``__builtin__.set``) as protocol < 3 pickles write them.

    The stock find_class maps these itself; an overriding one has to.
    """
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def _torch_attr(name: str) -> Any:
    """``torch.float16``-style enum values (dtype, memory format, layout), else None."""
    obj = getattr(torch, name, None) if name.isidentifier() else None
    return obj if isinstance(obj, (torch.dtype, torch.memory_format, torch.layout)) else None


def _torch_nn_layer(module: str, name: str) -> type[nn.Module] | None:
    """A torch.nn.modules class (Conv2d, BatchNorm2d, SiLU...), never anything else."""
    if not (_TORCH_NN_MODULE.fullmatch(module) and name.isidentifier()):
        return None
    try:
        obj = getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None
    return obj if isinstance(obj, type) and issubclass(obj, nn.Module) else None


def resolve_global(module: str, name: str) -> Any:
    """The allow-list. Returns the object to use for a pickled global or raises _RefusedGlobal."""
    module, name = _normalize_global(module, name)
    qualname = f"{module}.{name}"
    if qualname in _FIXED:
        return _FIXED[qualname]()
    if module in UPSTREAM_MODULES and name.isidentifier() and not name.startswith("_"):
        return _placeholder(module, name)
    if module == "torch" and _torch_attr(name) is not None:
        return _torch_attr(name)
    layer = _torch_nn_layer(module, name)
    if layer is not None:
        return layer
    raise _RefusedGlobal(qualname)


class RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler whose find_class only hands out allow-listed globals."""

    def find_class(self, module: str, name: str) -> Any:
        return resolve_global(module, name)


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return RestrictedUnpickler(file, **kwargs).load()


# torch.load(pickle_module=...) subclasses ``pickle_module.Unpickler`` (its find_class maps
# storage names, then calls ours via super()), calls ``pickle_module.load`` for the legacy
# format's header records and reads ``pickle_module.__name__`` (its dill check).
restricted_pickle = types.ModuleType("edgeq_restricted_pickle")
restricted_pickle.Unpickler = RestrictedUnpickler
restricted_pickle.load = _restricted_load
restricted_pickle.UnpicklingError = pickle.UnpicklingError


# --------------------------------------------------------------------------- reading files
def _read_checkpoint_bytes(path: Path) -> bytes:
    """The file's bytes, or a clear error for missing, directory, empty and non-torch files."""
    if not path.exists():
        raise EdgeqError(f"checkpoint {path} not found")
    if path.is_dir():
        raise EdgeqError(f"{path} is a directory, not a checkpoint file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise EdgeqError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    if not data:
        raise EdgeqError(f"{path} is empty, not a PyTorch checkpoint")
    _check_container(path, data)
    return data


def _legacy_prefixes() -> tuple[bytes, ...]:
    """How torch's pre-1.6 (non-zip) format starts: its magic number pickled alone."""
    magic = torch.serialization.MAGIC_NUMBER
    return tuple(pickle.dumps(magic, protocol=p) for p in range(pickle.HIGHEST_PROTOCOL + 1))


def _check_container(path: Path, data: bytes) -> None:
    """A complete zip (not TorchScript) or a legacy torch file; truncation fails here."""
    if zipfile.is_zipfile(io.BytesIO(data)):
        try:
            members = zipfile.ZipFile(io.BytesIO(data)).namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            members = []
        if not any(m.endswith("data.pkl") for m in members):
            raise _corrupt(path)
        if any(m.endswith("constants.pkl") for m in members):
            raise EdgeqError(f"{path} is a TorchScript archive, not a checkpoint with weights")
        return
    if not data.startswith(_legacy_prefixes()):
        raise _corrupt(path)


def _corrupt(path: Path, detail: str = "") -> EdgeqError:
    suffix = f": {detail}" if detail else ""
    return EdgeqError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt){suffix}")


@contextlib.contextmanager
def _quiet_torch_load() -> Iterator[None]:
    """Hide torch's load warnings that say nothing to edgeq users."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        # The legacy format compares pickled class sources with the live classes; placeholders have none.
        warnings.filterwarnings("ignore", message="Couldn't retrieve source code", category=UserWarning)
        warnings.simplefilter("ignore", torch.serialization.SourceChangeWarning)
        yield


def _unpickle(path: Path, data: bytes, trust: bool) -> Any:
    """weights_only first, then the restricted unpickler (or full pickle when trusted)."""
    try:
        with _quiet_torch_load():
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001  (any failure: retry with the safe unpickler)
        pass
    if trust:
        return _full_pickle_load(path, data)
    return _restricted_torch_load(path, data)


def _restricted_torch_load(path: Path, data: bytes) -> Any:
    try:
        with _quiet_torch_load():
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False, pickle_module=restricted_pickle)
    except _RefusedGlobal as exc:
        raise _refusal(path, exc.qualname) from None
    except Exception as exc:  # noqa: BLE001  (torch and pickle raise many kinds for bad bytes)
        raise _corrupt(path, f"{type(exc).__name__}: {_first_line(exc)}") from None


def _full_pickle_load(path: Path, data: bytes) -> Any:
    """trust=True: plain pickle. Without the upstream code importable, placeholders still work."""
    try:
        with _quiet_torch_load():
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except (ImportError, AttributeError):
        return _restricted_torch_load(path, data)
    except Exception as exc:  # noqa: BLE001
        raise _corrupt(path, f"{type(exc).__name__}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no detail"


def _refusal(path: Path, qualname: str) -> EdgeqError:
    hint = ""
    if qualname.startswith("ultralytics."):
        hint = " (an Ultralytics YOLOv8+ checkpoint? edgeq reads YOLOv5 layouts)"
    return EdgeqError(
        f"{path} refers to {qualname}, which edgeq will not unpickle without trust{hint}; "
        "only YOLOv5 model classes, torch.nn layers, tensors and plain values are loaded safely",
        note=TRUST_NOTE,
    )


def file_sha256(data: bytes) -> str:
    """Hex digest of the exact bytes that were loaded (reports and export manifests cite it)."""
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- public loaders
def load_checkpoint(path: str | Path, *, trust: bool = False) -> LoadedCheckpoint:
    """Load an edgeq or upstream YOLOv5 checkpoint into edgeq's float32 DetectionModel (eval).

    Nothing in the file runs unless ``trust`` is set: see the module docstring.
    """
    path = Path(path)
    data = _read_checkpoint_bytes(path)
    obj = _unpickle(path, data, trust)
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
    model = _build_model(path, ckpt["yaml"], names)
    _load_weights(path, model, ckpt["state_dict"])
    _check_stride(path, model, ckpt["stride"])
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
_UPSTREAM_EXTRA_KEYS = ("epoch", "best_fitness", "updates", "date", "git", "opt", "wandb_id")


def _from_yolov5(path: Path, obj: Any, digest: str) -> LoadedCheckpoint:
    ckpt = obj if isinstance(obj, dict) else {"model": obj}
    src = _pick_model(path, ckpt)
    attrs = vars(src)
    yaml_dict = attrs.get("yaml")
    if not isinstance(yaml_dict, dict):
        raise EdgeqError(f"{path}: the pickled model has no 'yaml' dict; edgeq needs it to rebuild the model")
    names = _upstream_names(path, attrs.get("names"), yaml_dict.get("nc"))
    model = _build_model(path, yaml_dict, names)
    theirs = _walk_modules(path, src)
    _check_layer_types(path, model, theirs)
    _copy_bn_eps(model, theirs)
    _load_weights(path, model, _collect_state(theirs))
    _check_stride(path, model, _upstream_stride(attrs, theirs))
    return LoadedCheckpoint(
        model=model.eval(),
        names=names,
        imgsz=_upstream_imgsz(ckpt.get("opt")),
        stride=[float(s) for s in model.stride.tolist()],
        source="yolov5",
        sha256=digest,
        path=path,
        extra={k: v for k in _UPSTREAM_EXTRA_KEYS if k in ckpt and (v := to_plain(ckpt[k])) is not _DROP},
    )


def _pick_model(path: Path, ckpt: dict) -> nn.Module:
    """YOLOv5 keeps the EMA weights when present (strip_optimizer moves them to 'model')."""
    src = ckpt.get("ema")
    if src is None:
        src = ckpt.get("model")
    if src is None and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise EdgeqError(
            f"{path} is a bare state_dict without the model yaml; edgeq needs an edgeq or YOLOv5 checkpoint"
        )
    if src is None:
        keys = ", ".join(map(str, list(ckpt)[:8])) or "none"
        raise EdgeqError(
            f"{path} has no 'model' or 'ema' entry (keys: {keys}); expected an edgeq or YOLOv5 training checkpoint"
        )
    if not isinstance(src, nn.Module):
        raise EdgeqError(
            f"{path}: its model entry is a {type(src).__name__}, not a pickled YOLOv5 model "
            "(a bare state_dict has no model yaml to rebuild from)"
        )
    return src


def _upstream_names(path: Path, names: Any, nc: Any) -> list[str]:
    """YOLOv5 stores names as a list (old) or a {index: name} dict (v7)."""
    if names is None:
        return [str(i) for i in range(nc)] if isinstance(nc, int) and nc > 0 else []
    if isinstance(names, dict):
        if sorted(names) != list(range(len(names))):
            raise EdgeqError(f"{path}: class names dict keys must be 0..{len(names) - 1}")
        return [str(names[i]) for i in range(len(names))]
    if isinstance(names, (list, tuple)):
        return [str(n) for n in names]
    raise EdgeqError(f"{path}: class names are a {type(names).__name__}, expected a list or dict")


def _upstream_stride(attrs: dict, theirs: dict[str, nn.Module]) -> Any:
    """Model.stride, else the Detect layer's (very old pickles)."""
    if attrs.get("stride") is not None:
        return attrs["stride"]
    heads = [m for m in theirs.values() if _type_name(m) == "Detect"]
    return vars(heads[-1]).get("stride") if heads else None


def _upstream_imgsz(opt: Any) -> int | None:
    """train.py's ``vars(opt)``: ``imgsz`` (v6+) or ``img_size`` (a [train, test] list before)."""
    if not isinstance(opt, dict):
        opt = getattr(opt, "__dict__", {})
    size = opt.get("imgsz", opt.get("img_size"))
    if isinstance(size, (list, tuple)) and size:
        size = size[0]
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


# --------------------------------------------------------------------------- shared checks
def _build_model(path: Path, yaml_dict: dict, names: list[str]) -> DetectionModel:
    """edgeq's DetectionModel from the checkpoint's yaml, class count checked against names."""
    nc = yaml_dict.get("nc")
    if isinstance(nc, int) and len(names) != nc:
        raise EdgeqError(f"{path}: the checkpoint lists {len(names)} class names but its model yaml has nc={nc}")
    ch = yaml_dict.get("ch", 3)
    try:
        model = DetectionModel(yaml_dict, ch=ch if isinstance(ch, int) else 3)
    except EdgeqError as exc:
        raise EdgeqError(f"{path}: cannot rebuild the model from its yaml: {exc}") from None
    model.names = list(names)
    return model.float()


def _walk_modules(path: Path, root: nn.Module) -> dict[str, nn.Module]:
    """name -> module from the pickled objects' own dicts (no hooks, no pickled code runs)."""
    found: dict[str, nn.Module] = {}

    def visit(module: nn.Module, prefix: str, depth: int) -> None:
        if depth > _MAX_DEPTH:
            raise EdgeqError(f"{path}: the pickled model nests more than {_MAX_DEPTH} levels deep")
        found[prefix] = module
        children = vars(module).get("_modules") or {}
        for name, child in children.items():
            if child is None:
                continue
            if not isinstance(child, nn.Module):
                raise EdgeqError(f"{path}: pickled layer {prefix + name} is a {type(child).__name__}, not a module")
            visit(child, f"{prefix}{name}.", depth + 1)

    visit(root, "", 0)
    return {k.rstrip("."): v for k, v in found.items()}


def _collect_state(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers, like state_dict() but straight from each __dict__."""
    state: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        attrs = vars(module)
        prefix = f"{name}." if name else ""
        skip = attrs.get("_non_persistent_buffers_set") or set()
        tensors = list((attrs.get("_parameters") or {}).items())
        tensors += [(k, v) for k, v in (attrs.get("_buffers") or {}).items() if k not in skip]
        for key, value in tensors:
            if value is not None:
                state[prefix + key] = value
    return state


def _type_name(module: nn.Module) -> str:
    return type(module).__name__


def _check_layer_types(path: Path, model: DetectionModel, theirs: dict[str, nn.Module]) -> None:
    """Same layer classes at the same places: catches e.g. Hardswish vs SiLU, which keys cannot."""
    ours = {k: m for k, m in model.named_modules(remove_duplicate=False) if k}
    theirs = {k: m for k, m in theirs.items() if k}
    for name in [*ours, *theirs]:
        if name not in ours or name not in theirs:
            where = "edgeq's build of its yaml" if name in ours else "the checkpoint"
            raise _layout_error(path, f"layer {name} exists only in {where}")
        if _type_name(ours[name]) != _type_name(theirs[name]):
            kinds = f"{_type_name(theirs[name])} in the checkpoint but {_type_name(ours[name])} in edgeq"
            raise _layout_error(path, f"layer {name} is {kinds}")


def _layout_error(path: Path, detail: str) -> EdgeqError:
    return EdgeqError(f"{path}: {detail}; the checkpoint was not built from a supported YOLOv5 layout")


def _copy_bn_eps(model: DetectionModel, theirs: dict[str, nn.Module]) -> None:
    """BatchNorm eps is not in the state dict but changes outputs: take the checkpoint's."""
    for name, module in model.named_modules():
        eps = vars(theirs[name]).get("eps") if name in theirs else None
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and isinstance(eps, float):
            module.eps = eps


def _ignored(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in _IGNORED_SUFFIXES


def _load_weights(path: Path, model: DetectionModel, state: dict[str, Any]) -> None:
    """Strict key and shape match (old grid/anchor_grid entries ignored), floats to float32."""
    ours = model.state_dict()
    state = {k: v for k, v in state.items() if not _ignored(k)}
    missing = [k for k in ours if k not in state]
    unexpected = [k for k in state if k not in ours]
    if missing:
        raise _layout_error(path, f"weight {missing[0]} is missing ({len(missing)} missing in all)")
    if unexpected:
        raise _layout_error(path, f"weight {unexpected[0]} is unexpected ({len(unexpected)} unexpected in all)")
    converted = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise _layout_error(path, f"weight {key} is a {type(value).__name__}, not a tensor")
        if value.shape != ours[key].shape:
            shapes = f"{tuple(value.shape)} in the checkpoint, {tuple(ours[key].shape)} in edgeq"
            raise _layout_error(path, f"weight {key} has shape {shapes}")
        value = value.detach().to("cpu")
        converted[key] = value.float() if value.is_floating_point() else value.to(ours[key].dtype)
    model.load_state_dict(converted, strict=True)


def _check_stride(path: Path, model: DetectionModel, stride: Any) -> None:
    """The strides edgeq computes from the yaml must be the checkpoint's (anchors depend on them)."""
    ours = [float(s) for s in model.stride.tolist()]
    try:
        theirs = [float(s) for s in (stride.tolist() if isinstance(stride, torch.Tensor) else stride)]
    except (TypeError, ValueError):
        raise EdgeqError(f"{path}: the checkpoint's stride {stride!r} is not a list of numbers") from None
    if len(theirs) != len(ours) or not all(math.isclose(a, b) for a, b in zip(ours, theirs)):
        raise EdgeqError(f"{path}: the checkpoint's strides {theirs} differ from the strides {ours} its yaml builds")


__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "LoadedCheckpoint",
    "RestrictedUnpickler",
    "load_checkpoint",
    "load_model",
    "resolve_global",
    "restricted_pickle",
    "save_checkpoint",
    "to_plain",
]
