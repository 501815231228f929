"""YOLO-format datasets (a data.yaml, or an ``images/`` + ``labels/`` folder).

Every label file is parsed and validated once, at load time, so that a typo on line 812 of
some label file is reported before a long calibration or evaluation run, not in the middle
of it. Images are only decoded on access (decoding thousands up front is slow).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from edgeq.data.base import LabelledImages
from edgeq.data.images import IMAGE_SUFFIXES, list_images
from edgeq.errors import EdgeqError

__all__ = ["DataConfig", "YoloDataset", "load_data_yaml", "label_path_for"]

COORD_TOL = 1e-3
_SHOW_NAMES = 5


@dataclass(frozen=True)
class DataConfig:
    """A parsed data.yaml: class names plus each split's image sources (folders or list files)."""

    yaml_path: Path
    root: Path
    names: list[str]
    splits: dict[str, list[Path]] = field(default_factory=dict)

    @property
    def nc(self) -> int:
        return len(self.names)


def _names_from(raw: object, nc: object, yaml_path: Path) -> list[str]:
    if nc is not None and (not isinstance(nc, int) or isinstance(nc, bool) or nc < 1):
        raise EdgeqError(f"{yaml_path}: 'nc' must be a positive integer, got {nc!r}.")
    if raw is None:
        if nc is None:
            raise EdgeqError(f"{yaml_path} needs 'names' (a list, or a dict {{0: name, ...}}) or 'nc'.")
        return [f"class{i}" for i in range(nc)]
    if isinstance(raw, dict):
        try:
            keys = sorted(int(k) for k in raw)
        except (TypeError, ValueError):
            raise EdgeqError(f"{yaml_path}: 'names' dict keys must be class ids 0..N-1.") from None
        if keys != list(range(len(keys))):
            raise EdgeqError(f"{yaml_path}: 'names' dict keys must be exactly 0..{len(keys) - 1}, got {keys}.")
        by_id = {int(k): v for k, v in raw.items()}
        names = [str(by_id[i]) for i in keys]
    elif isinstance(raw, list):
        names = [str(n) for n in raw]
    else:
        raise EdgeqError(f"{yaml_path}: 'names' must be a list or a dict, got {type(raw).__name__}.")
    if not names:
        raise EdgeqError(f"{yaml_path}: 'names' is empty.")
    if nc is not None and nc != len(names):
        raise EdgeqError(f"{yaml_path}: 'nc' is {nc} but 'names' lists {len(names)} classes.")
    return names


def load_data_yaml(yaml_path: str | os.PathLike) -> DataConfig:
    """Parse a YOLOv5-style data.yaml.

    ``path`` (if relative) is taken relative to the yaml's folder, and relative split entries
    relative to ``path`` (or the yaml's folder when ``path`` is absent), so a dataset folder
    can be moved as a whole.
    """
    yp = Path(yaml_path)
    if not yp.is_file():
        raise EdgeqError(f"Dataset file {yp} does not exist.")
    try:
        data = yaml.safe_load(yp.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise EdgeqError(f"Dataset file {yp} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise EdgeqError(f"Dataset file {yp} must be a YAML mapping with keys path/train/val/names.")
    names = _names_from(data.get("names"), data.get("nc"), yp)
    base = yp.parent.resolve()
    root = base
    if data.get("path"):
        root = Path(str(data["path"])).expanduser()
        root = root if root.is_absolute() else (base / root)
    splits: dict[str, list[Path]] = {}
    for key in ("train", "val", "test"):
        value = data.get(key)
        if value is None or value == "":
            continue
        items = value if isinstance(value, list) else [value]
        paths = []
        for item in items:
            p = Path(str(item)).expanduser()
            paths.append(p if p.is_absolute() else root / p)
        splits[key] = paths
    return DataConfig(yaml_path=yp, root=root, names=names, splits=splits)


def label_path_for(image_path: Path) -> Path:
    """YOLOv5 convention: the last ``images`` folder becomes ``labels``, the suffix ``.txt``."""
    parts = list(image_path.parts)
    for k in range(len(parts) - 2, -1, -1):
        if parts[k] == "images":
            parts[k] = "labels"
            return Path(*parts).with_suffix(".txt")
    raise EdgeqError(
        f"Cannot locate labels for {image_path}: YOLO datasets keep images under an 'images' "
        "folder with the .txt files in a sibling 'labels' folder."
    )


def _labels_dir_for(image_dir: Path) -> Path:
    parts = list(image_dir.parts)
    for k in range(len(parts) - 1, -1, -1):
        if parts[k] == "images":
            parts[k] = "labels"
            return Path(*parts)
    raise EdgeqError(
        f"Image folder {image_dir} is not inside an 'images' folder, so its YOLO labels cannot be found "
        "(expected .../images/<split> next to .../labels/<split>)."
    )


def _images_from_list(list_file: Path) -> list[Path]:
    """A split given as a .txt of image paths (relative lines are relative to the list file)."""
    out = []
    for line in list_file.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        p = Path(line).expanduser()
        out.append(p if p.is_absolute() else (list_file.parent / p))
    if not out:
        raise EdgeqError(f"Image list {list_file} is empty.")
    return out


def _parse_label_file(path: Path, nc: int | None) -> tuple[np.ndarray, int]:
    """Rows ``cls cx cy w h``; polygon rows (YOLO segments) become their bounding box.

    Returns the labels and the number of zero-size boxes dropped.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise EdgeqError(f"Label file {path} is not UTF-8 text.") from None
    rows: list[tuple[float, float, float, float, float]] = []
    degenerate = 0
    for lineno, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}, line {lineno}"
        try:
            values = [float(v) for v in fields]
        except ValueError:
            raise EdgeqError(f"{where}: expected numbers 'class cx cy w h', got {line.strip()!r}.") from None
        if len(values) != 5 and (len(values) < 7 or len(values) % 2 == 0):
            raise EdgeqError(
                f"{where}: expected 5 values 'class cx cy w h' (or a class and x y polygon pairs), "
                f"got {len(values)}."
            )
        if not all(math.isfinite(v) for v in values):
            raise EdgeqError(f"{where}: contains a non-finite number: {line.strip()!r}.")
        cls = values[0]
        if cls < 0 or cls != int(cls):
            raise EdgeqError(f"{where}: class id must be a non-negative integer, got {fields[0]!r}.")
        if nc is not None and cls >= nc:
            raise EdgeqError(
                f"{where}: class id {int(cls)} is out of range for nc={nc} (valid ids are 0..{nc - 1})."
            )
        coords = values[1:]
        if any(v < -COORD_TOL or v > 1 + COORD_TOL for v in coords):
            raise EdgeqError(
                f"{where}: coordinate outside [0, 1] in {line.strip()!r}; YOLO labels are normalized "
                "by the image width and height."
            )
        if len(values) == 5:
            cx, cy, w, h = coords
        else:
            xs, ys = coords[0::2], coords[1::2]
            cx, cy = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2
            w, h = max(xs) - min(xs), max(ys) - min(ys)
        if w <= 0 or h <= 0:
            degenerate += 1
            continue
        rows.append((cls, cx, cy, w, h))
    labels = np.asarray(rows, np.float32).reshape(-1, 5)
    np.clip(labels[:, 1:], 0.0, 1.0, out=labels[:, 1:])
    return labels, degenerate


def _warn_listing(message: str, paths: list[Path]) -> None:
    names = ", ".join(p.name for p in paths[:_SHOW_NAMES])
    more = f" and {len(paths) - _SHOW_NAMES} more" if len(paths) > _SHOW_NAMES else ""
    warnings.warn(f"{message} (e.g. {names}{more}).", stacklevel=3)


class YoloDataset(LabelledImages):
    """Images + validated labels of one split of a YOLO-format dataset.

    ``source`` is a data.yaml, or a folder holding ``images/`` and ``labels/`` (optionally
    with a ``<split>`` sub-folder in each, and a ``data.yaml`` or ``classes.txt`` for names).
    """

    def __init__(self, source: str | os.PathLike, split: str = "val"):
        src = Path(source)
        self.split = split
        if src.is_dir():
            if (src / "data.yaml").is_file():
                cfg = load_data_yaml(src / "data.yaml")
                sources = self._split_sources(cfg, split)
                names: list[str] | None = cfg.names
                self.yaml_path: Path | None = cfg.yaml_path
                self.root = cfg.root
            else:
                sources, names = self._folder_sources(src, split)
                self.yaml_path = None
                self.root = src
        elif src.suffix.lower() in (".yaml", ".yml") or src.is_file():
            cfg = load_data_yaml(src)
            sources = self._split_sources(cfg, split)
            names = cfg.names
            self.yaml_path = cfg.yaml_path
            self.root = cfg.root
        else:
            raise EdgeqError(
                f"Dataset {src} does not exist (pass a data.yaml or a folder with images/ and labels/)."
            )

        self.image_paths: list[Path] = self._collect_images(sources)
        self._labels: list[np.ndarray] = self._load_labels(names)
        if names is None:
            top = max((int(lab[:, 0].max()) for lab in self._labels if len(lab)), default=-1)
            names = [str(i) for i in range(top + 1)]
        self.names: list[str] = names

    @classmethod
    def from_dataset_yaml(cls, yaml_path: str | os.PathLike, split: str = "val") -> "YoloDataset":
        """Same as the constructor, but insists on a data.yaml (names as a list or a dict)."""
        yp = Path(yaml_path)
        if yp.suffix.lower() not in (".yaml", ".yml"):
            raise EdgeqError(f"Dataset file {yp} should be a .yaml file.")
        return cls(yp, split)

    # ------------------------------------------------------------------ loading

    @staticmethod
    def _split_sources(cfg: DataConfig, split: str) -> list[Path]:
        if split not in cfg.splits:
            have = ", ".join(cfg.splits) or "none"
            raise EdgeqError(f"{cfg.yaml_path} has no '{split}' split (splits present: {have}).")
        return cfg.splits[split]

    @staticmethod
    def _folder_sources(folder: Path, split: str) -> tuple[list[Path], list[str] | None]:
        images = folder / "images"
        if not images.is_dir():
            raise EdgeqError(
                f"Dataset folder {folder} has no images/ folder (expected images/ and labels/ side by side, "
                "or a data.yaml)."
            )
        source = images / split if (images / split).is_dir() else images
        names = None
        classes = folder / "classes.txt"
        if classes.is_file():
            names = [ln.strip() for ln in classes.read_text(encoding="utf-8").splitlines() if ln.strip()] or None
        return [source], names

    @staticmethod
    def _collect_images(sources: list[Path]) -> list[Path]:
        paths: list[Path] = []
        for s in sources:
            if s.is_dir():
                labels_dir = _labels_dir_for(s)
                if not labels_dir.is_dir():
                    raise EdgeqError(f"Labels folder {labels_dir} does not exist (expected next to {s}).")
                paths.extend(list_images(s))
            elif s.is_file() and s.suffix.lower() == ".txt":
                listed = _images_from_list(s)
                dirs = sorted({label_path_for(p).parent for p in listed})
                if not any(d.is_dir() for d in dirs):
                    raise EdgeqError(f"Labels folder {dirs[0]} does not exist (for images listed in {s}).")
                paths.extend(p for p in listed if p.suffix.lower() in IMAGE_SUFFIXES)
            elif s.is_file() and s.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(s)
            else:
                raise EdgeqError(f"Split source {s} does not exist (a folder of images or a .txt list of images).")
        if not paths:
            raise EdgeqError(f"No images found in {', '.join(map(str, sources))}.")
        return paths

    def _load_labels(self, names: list[str] | None) -> list[np.ndarray]:
        nc = len(names) if names is not None else None
        out: list[np.ndarray] = []
        missing: list[Path] = []
        degenerate = 0
        for p in self.image_paths:
            lp = label_path_for(p)
            if not lp.is_file():
                missing.append(p)
                out.append(np.zeros((0, 5), np.float32))
                continue
            labels, bad = _parse_label_file(lp, nc)
            degenerate += bad
            out.append(labels)
        if missing:
            _warn_listing(
                f"{len(missing)} of {len(self.image_paths)} images in split '{self.split}' have no label file "
                "and are treated as background",
                missing,
            )
        if degenerate:
            warnings.warn(f"Dropped {degenerate} zero-size box(es) from the '{self.split}' labels.", stacklevel=3)
        return out
