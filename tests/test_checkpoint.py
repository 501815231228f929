"""Checkpoints: edgeq's own format, upstream YOLOv5 pickles, refused pickles, broken files."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeq.errors import EdgeqError
from edgeq.models import checkpoint as ckpt_mod
from edgeq.models import safe_pickle, yolov5_import
from edgeq.models.checkpoint import LoadedCheckpoint, load_checkpoint, load_model, save_checkpoint
from edgeq.models.yolo import DetectionModel

REPO = Path(__file__).resolve().parents[1]
UPSTREAM = Path(__file__).resolve().parent / "fixtures" / "upstream"
IMGSZ = 96

# Runs in a child interpreter where the fake upstream ``models`` package is importable, the way
# a YOLOv5 checkout is when train.py saves last.pt.
MAKE_UPSTREAM = textwrap.dedent(
    """
    import copy, datetime, json, os, sys
    import numpy as np
    import torch
    from models.common import Conv
    from models.yolo import DetectionModel

    torch.set_num_threads(1)  # runs beside the test process
    out, specs = sys.argv[1], json.loads(sys.argv[2])

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + os.path.join(out, "pwned"),))

    def randomize_bn(model):
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.2, 0.2)

    def sgd_state_dict(model):
        # What torch.optim.SGD(...).state_dict() returns after a step, written out: creating a
        # real optimizer imports torch._dynamo (2+ s), too slow for a unit test.
        params = list(model.parameters())
        group = {"lr": 0.01, "momentum": 0.937, "dampening": 0, "weight_decay": 0.0005, "nesterov": True,
                 "maximize": False, "foreach": None, "differentiable": False, "fused": None,
                 "initial_lr": 0.01, "params": list(range(len(params)))}
        return {"state": {i: {"momentum_buffer": torch.randn_like(p)} for i, p in enumerate(params)},
                "param_groups": [group]}

    for spec in specs:
        torch.manual_seed(0)
        model = DetectionModel(spec["cfg"], nc=spec["nc"])
        randomize_bn(model)
        names = [f"class{i}" for i in range(spec["nc"])]
        model.names = {i: n for i, n in enumerate(names)} if spec["dict_names"] else names
        if spec["anchor_grid"]:  # pre-v6 YOLOv5 kept this buffer; edgeq ignores it
            det = model.model[-1]
            det.register_buffer("anchor_grid", det.anchors.clone().view(det.nl, 1, -1, 1, 1, 2))
        ema = copy.deepcopy(model).half()
        with torch.no_grad():  # the raw model differs from the EMA; loaders must take the EMA
            model.model[-1].m[0].bias += 1.0
        ckpt = {
            "epoch": 3,
            "best_fitness": np.float64(0.25),
            "model": model.half(),
            "ema": ema,
            "updates": 12,
            "optimizer": sgd_state_dict(model),
            "opt": {"imgsz": spec["imgsz"], "epochs": 10, "hyp": {"lr0": 0.01}, "save_dir": "runs/train/exp"},
            "git": {"remote": "https://github.com/ultralytics/yolov5", "branch": "master", "commit": "abc"},
            "date": datetime.datetime(2024, 1, 2).isoformat(),
        }
        torch.save(ckpt, os.path.join(out, spec["name"] + ".pt"))
        if spec["more_files"]:
            torch.save(ckpt, os.path.join(out, "legacy.pt"), _use_new_zipfile_serialization=False)  # pre-1.6 format
            torch.save(ema, os.path.join(out, "bare.pt"))  # a bare pickled model, no dict around it
        reference = ema.float().eval()  # the half-rounded weights, run in float
        torch.manual_seed(1)
        with torch.no_grad():
            y = reference(torch.rand(1, 3, spec["imgsz"], spec["imgsz"]))
        np.save(os.path.join(out, spec["name"] + ".npy"), y.numpy())

    hidden = Conv(3, 8)
    hidden.payload = Payload()  # os.system hidden in an upstream layer's state
    torch.save({"model": hidden}, os.path.join(out, "hidden_payload.pt"))
    """
)

UPSTREAM_SPECS = [
    {"name": "yolov5s", "cfg": "yolov5s", "nc": 3, "imgsz": IMGSZ,
     "dict_names": True, "anchor_grid": True, "more_files": False},
    {"name": "mnv3s", "cfg": "yolov5s-mobilenetv3-small", "nc": 8, "imgsz": IMGSZ,
     "dict_names": False, "anchor_grid": False, "more_files": True},
]


class Payload:
    """Pickles as a call to ``func(*args)``: what a malicious checkpoint carries."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(UPSTREAM), str(REPO), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and with the child beside us, spinning OpenMP
    threads on an oversubscribed CPU made this file several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", autouse=True)
def _upstream_child(tmp_path_factory):
    """Start writing the upstream checkpoints in a child process at once: it overlaps the
    in-process tests (importing torch alone takes seconds)."""
    out = tmp_path_factory.mktemp("upstream")
    cmd = [sys.executable, "-c", MAKE_UPSTREAM, str(out), json.dumps(UPSTREAM_SPECS)]
    proc = subprocess.Popen(cmd, env=_child_env(), cwd=out, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield proc, out
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


@pytest.fixture(scope="module")
def upstream_dir(_upstream_child) -> Path:
    proc, out = _upstream_child
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stderr
    return out


def _randomize_bn(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)


@pytest.fixture(scope="module")
def small_model() -> DetectionModel:
    torch.manual_seed(0)
    model = DetectionModel("yolov5s-mobilenetv3-small", nc=8)
    _randomize_bn(model)
    return model.eval()


@pytest.fixture(scope="module")
def saved(small_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("own") / "model.pt"
    names = [f"c{i}" for i in range(8)]
    save_checkpoint(small_model, path, names=names, imgsz=320, extra={"epochs": 5, "map50": np.float64(0.5)})
    return path


@pytest.fixture(scope="module")
def saved_dict(saved) -> dict:
    """The saved file read with plain torch.load(weights_only=True): no edgeq code needed."""
    return torch.load(saved, weights_only=True)


def _resave(data: dict, dst: Path, **changes) -> Path:
    """The saved checkpoint with some fields replaced (the original dict is left alone)."""
    torch.save({**data, **changes}, dst)
    return dst


# --------------------------------------------------------------------------- own format
def test_own_format_round_trip(small_model, saved):
    loaded = load_checkpoint(saved)
    assert isinstance(loaded, LoadedCheckpoint)
    assert loaded.source == "edgeq" and loaded.imgsz == 320 and loaded.path == saved
    assert loaded.names == [f"c{i}" for i in range(8)]
    assert loaded.stride == [8.0, 16.0, 32.0]
    assert loaded.extra == {"epochs": 5, "map50": 0.5}
    assert len(loaded.sha256) == 64 and not loaded.model.training
    x = torch.rand(1, 3, IMGSZ, IMGSZ)
    with torch.no_grad():
        assert torch.equal(small_model(x), loaded.model(x))


def test_own_format_is_plain_weights_only(saved, saved_dict):
    data = saved_dict
    assert data["format"] == "edgeq-checkpoint" and data["format_version"] == 1
    fields = {"format", "format_version", "edgeq_version", "yaml", "state_dict", "names", "imgsz", "stride", "extra"}
    assert set(data) == fields
    assert all(v.dtype in (torch.float32, torch.int64) for v in data["state_dict"].values())
    assert not list(saved.parent.glob(".*.tmp"))  # the temp file was renamed away


def test_save_into_unwritable_place(small_model, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(EdgeqError, match="is a file, not a folder"):
        save_checkpoint(small_model, blocker / "model.pt", imgsz=320)

    def denied(*args, **kwargs):  # chmod does not stop root, so simulate the OS refusing
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(ckpt_mod.tempfile, "mkstemp", denied)
    with pytest.raises(EdgeqError, match=r"folder .* is not writable \(Permission denied\)") as info:
        save_checkpoint(small_model, tmp_path / "model.pt", imgsz=320)
    assert "model.pt" in str(info.value) and not (tmp_path / "model.pt").exists()


def test_save_rejects_wrong_name_count(small_model, tmp_path):
    with pytest.raises(EdgeqError, match="3 class names"):
        save_checkpoint(small_model, tmp_path / "m.pt", names=["a", "b", "c"], imgsz=320)


def test_class_count_mismatch(saved_dict, tmp_path):
    bad = _resave(saved_dict, tmp_path / "bad_names.pt", names=["a", "b", "c"])
    with pytest.raises(EdgeqError, match=r"3 class names.*nc=8") as info:
        load_checkpoint(bad)
    assert "bad_names.pt" in str(info.value)


def test_missing_weight_is_named(saved_dict, tmp_path):
    state = {k: v for k, v in saved_dict["state_dict"].items() if k != "model.0.bn.weight"}
    bad = _resave(saved_dict, tmp_path / "bad_keys.pt", state_dict=state)
    with pytest.raises(EdgeqError, match=r"model\.0\.bn\.weight is missing.*supported YOLOv5 layout"):
        load_checkpoint(bad)


def test_stride_mismatch(saved_dict, tmp_path):
    bad = _resave(saved_dict, tmp_path / "bad_stride.pt", stride=[4.0, 8.0, 16.0])
    with pytest.raises(EdgeqError, match="strides"):
        load_checkpoint(bad)


# --------------------------------------------------------------------------- upstream YOLOv5
def test_models_package_not_importable_here():
    assert importlib.util.find_spec("models") is None


@pytest.mark.parametrize("spec", UPSTREAM_SPECS, ids=lambda s: s["name"])
def test_upstream_checkpoint(upstream_dir, spec):
    loaded = load_checkpoint(upstream_dir / f"{spec['name']}.pt")
    assert loaded.source == "yolov5" and loaded.imgsz == spec["imgsz"]
    assert loaded.names == [f"class{i}" for i in range(spec["nc"])]
    assert loaded.extra["epoch"] == 3 and loaded.extra["best_fitness"] == 0.25
    assert "optimizer" not in loaded.extra and "model" not in loaded.extra
    assert all(p.dtype == torch.float32 for p in loaded.model.state_dict().values() if p.is_floating_point())
    _assert_reference_outputs(loaded, upstream_dir / f"{spec['name']}.npy")


def _assert_reference_outputs(loaded: LoadedCheckpoint, reference: Path) -> None:
    """Same outputs as the child computed from the EMA's half-rounded weights in float."""
    torch.manual_seed(1)
    with torch.no_grad():
        got = loaded.model(torch.rand(1, 3, IMGSZ, IMGSZ)).numpy()
    np.testing.assert_allclose(got, np.load(reference), rtol=1e-5, atol=1e-5)


def test_upstream_legacy_format(upstream_dir):
    loaded = load_checkpoint(upstream_dir / "legacy.pt")
    assert loaded.source == "yolov5" and len(loaded.names) == 8 and loaded.imgsz == IMGSZ
    _assert_reference_outputs(loaded, upstream_dir / "mnv3s.npy")


def test_own_format_legacy_serialization(saved_dict, tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save(saved_dict, path, _use_new_zipfile_serialization=False)
    assert load_checkpoint(path).source == "edgeq"


def test_bare_pickled_model(upstream_dir):
    loaded = load_checkpoint(upstream_dir / "bare.pt")
    assert loaded.source == "yolov5" and len(loaded.names) == 8 and loaded.imgsz is None
    assert loaded.extra == {}


def test_trust_uses_full_pickle(upstream_dir, monkeypatch):
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append((kwargs.get("weights_only"), kwargs.get("pickle_module")))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    monkeypatch.syspath_prepend(str(UPSTREAM))
    try:
        loaded = load_checkpoint(upstream_dir / "mnv3s.pt", trust=True)
    finally:
        for name in [m for m in sys.modules if m == "models" or m.startswith("models.")]:
            del sys.modules[name]
    assert calls == [(True, None), (False, None)]
    assert loaded.source == "yolov5" and len(loaded.names) == 8
    _assert_reference_outputs(loaded, upstream_dir / "mnv3s.npy")


def test_trust_without_upstream_code_falls_back(upstream_dir):
    loaded = load_checkpoint(upstream_dir / "yolov5s.pt", trust=True)
    assert loaded.source == "yolov5" and len(loaded.names) == 3


# --------------------------------------------------------------------------- refused pickles
@pytest.mark.parametrize(
    "make, global_name",
    [
        (lambda t: Payload(os.system, f"touch {t / 'pwned'}"), os.system.__module__ + ".system"),
        (lambda t: Payload(eval, f"__import__('os').system('touch {t / 'pwned'}')"), "builtins.eval"),
        (lambda t: Payload(exec, f"open({str(t / 'pwned')!r}, 'w').close()"), "builtins.exec"),
    ],
    ids=["os.system", "eval", "exec"],
)
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_malicious_pickle_is_refused(tmp_path, make, global_name, zip_format):
    path = tmp_path / "evil.pt"
    torch.save({"epoch": 1, "model": make(tmp_path)}, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(EdgeqError, match="--trust-checkpoint") as info:
        load_checkpoint(path)
    assert global_name in str(info.value) and "evil.pt" in str(info.value)
    assert not (tmp_path / "pwned").exists()


def test_payload_hidden_in_upstream_layer_is_refused(upstream_dir):
    with pytest.raises(EdgeqError, match=r"(posix|os)\.system"):
        load_checkpoint(upstream_dir / "hidden_payload.pt")
    assert not (upstream_dir / "pwned").exists()


def test_bare_state_dict_is_explained(small_model, tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(small_model.state_dict(), path)
    with pytest.raises(EdgeqError, match="bare state_dict"):
        load_checkpoint(path)


def test_torch_layer_without_yaml(tmp_path):
    path = tmp_path / "conv.pt"
    torch.save({"model": torch.nn.Conv2d(1, 1, 1), "opt": {"weights": Path("a.pt")}}, path)  # all allowed globals
    with pytest.raises(EdgeqError, match="no 'yaml' dict"):
        load_checkpoint(path)


def test_non_upstream_class_is_refused(tmp_path):
    path = tmp_path / "edgeq_object.pt"
    torch.save({"model": DetectionModel("yolov5n", nc=2)}, path)  # edgeq.* classes are not YOLOv5's
    with pytest.raises(EdgeqError, match=r"edgeq\.models\.yolo\.DetectionModel"):
        load_checkpoint(path)


def test_layer_type_mismatch(tmp_path):
    """Same keys, different parameter-free layer (Hardswish for SiLU): refused, not silently wrong."""
    ours = DetectionModel("yolov5n", nc=2)
    theirs = DetectionModel("yolov5n", nc=2)
    theirs.model[0].act = torch.nn.Hardswish()
    modules = dict(theirs.named_modules(remove_duplicate=False))
    with pytest.raises(EdgeqError, match=r"model\.0\.act is Hardswish in the checkpoint but SiLU"):
        yolov5_import._check_layer_types(tmp_path / "x.pt", ours, modules)


def test_resolve_global_allow_list():
    from torch import nn

    assert safe_pickle.resolve_global("torch.nn.modules.conv", "Conv2d") is nn.Conv2d
    assert safe_pickle.resolve_global("__builtin__", "set") is set
    assert safe_pickle.resolve_global("torch", "float16") is torch.float16
    assert safe_pickle.resolve_global("models.common", "C3").upstream_name == "models.common.C3"
    for module, name in [("torch", "load"), ("torch.nn.modules.module", "_global_forward_hooks"),
                         ("torch.nn.functional", "conv2d"), ("builtins", "getattr"), ("models.common", "__builtins__")]:
        with pytest.raises(safe_pickle._RefusedGlobal):
            safe_pickle.resolve_global(module, name)


# --------------------------------------------------------------------------- broken files
def _broken_file(kind: str, saved: Path, tmp: Path) -> Path:
    path = tmp / f"{kind}.pt"
    if kind == "truncated":
        data = saved.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "directory":
        path.mkdir()
    return path  # "missing": never created


@pytest.mark.parametrize(
    "kind, message",
    [
        ("truncated", "not a readable PyTorch checkpoint"),
        ("random", "not a readable PyTorch checkpoint"),
        ("empty", "empty"),
        ("missing", "not found"),
        ("directory", "directory"),
    ],
)
def test_broken_files(saved, tmp_path, kind, message):
    path = _broken_file(kind, saved, tmp_path)
    with pytest.raises(EdgeqError, match=message) as info:
        load_checkpoint(path)
    assert path.name in str(info.value)


# --------------------------------------------------------------------------- load_model
def test_load_model_from_config():
    loaded = load_model("yolov5n", nc=4)
    assert loaded.source == "config" and loaded.imgsz is None
    assert loaded.names == ["0", "1", "2", "3"] and not loaded.model.training


def test_load_model_from_checkpoint(saved):
    assert load_model(saved).source == "edgeq"
    with pytest.raises(EdgeqError, match="nc=3"):
        load_model(saved, nc=3)


def test_load_model_unknown_name():
    with pytest.raises(EdgeqError, match="neither a checkpoint file nor a bundled model config"):
        load_model("yolov5x-does-not-exist")
