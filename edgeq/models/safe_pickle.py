"""Unpickle torch checkpoint files without running their code: a weights_only-style allow-list.

Upstream YOLOv5 checkpoints pickle whole model objects (``models.yolo.DetectionModel`` and
friends), which ``torch.load(weights_only=True)`` refuses. This module reads them with a
restricted unpickler instead: upstream YOLOv5 classes become inert placeholder modules that only
hold state, ``torch.nn`` layers, tensors and a few plain types are allowed, and any other global
(``os.system``, ``builtins.eval``...) stops the load before anything runs. Only ``trust=True``
(the CLI's ``--trust-checkpoint``) falls back to full pickle. Files are checked first (missing,
empty, truncated, TorchScript) so a bad file fails with a clear message, not a pickle traceback.
"""

from __future__ import annotations

import _compat_pickle
import collections
import contextlib
import importlib
import io
import pathlib
import pickle
import re
import types
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from edgeq.errors import EdgeqError

TRUST_NOTE = (
    "If you trust the file, --trust-checkpoint (load_checkpoint(..., trust=True)) loads it with full "
    "pickle, which can run arbitrary code."
)

# Modules of an upstream YOLOv5 checkout whose classes are replaced by inert placeholders.
UPSTREAM_MODULES = ("models.yolo", "models.common", "models.experimental")

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
def read_checkpoint_bytes(path: Path) -> bytes:
    """The file's bytes, or a clear error for missing, directory, empty and non-torch files.

    Checked before unpickling so that a truncated download names the file instead of failing
    somewhere inside torch.load.
    """
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


def unpickle_checkpoint(path: Path, data: bytes, *, trust: bool = False) -> Any:
    """The object in a torch file's bytes: weights_only first, then the restricted unpickler.

    weights_only already reads edgeq's own format; only pickled model objects (upstream YOLOv5)
    need the allow-list. ``trust`` swaps the allow-list for full pickle, which can run code.
    """
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


__all__ = [
    "TRUST_NOTE",
    "UPSTREAM_MODULES",
    "RestrictedUnpickler",
    "read_checkpoint_bytes",
    "resolve_global",
    "restricted_pickle",
    "unpickle_checkpoint",
]
