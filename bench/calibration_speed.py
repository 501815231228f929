"""Wall time of the calibration's observation pass (ONNX Runtime forwards + activation statistics).

``edgeq export --int8`` spends most of its calibration in :func:`edgeq.export.observe.observe_onnx`:
one ONNX Runtime run per image, then every observed tensor folded into its histograms. This
times exactly that pass on the tensors :func:`edgeq.export.calib_table.collect` observes
(``candidate_tensors`` + the head tensors, per-channel for the heads; checkouts that still have
the PyTorch fake-quant model add its points),
with the images decoded and preprocessed beforehand so JPEG decoding is not in the figure.
``--forward-only`` times the ONNX Runtime runs alone (the floor the statistics add to).

    edgeq export --format onnx --imgsz 320 --out /tmp/calspeed --force
    python bench/calibration_speed.py --save /tmp/calspeed/states.json      # time + keep the table
    python bench/calibration_speed.py --compare /tmp/calspeed/states.json   # time + check identical

``--save`` writes the observed tensors and every tensor's :meth:`TensorStats.to_state`;
``--compare`` observes the same tensors again (e.g. after changing the statistics code, or with
another checkout on ``PYTHONPATH``) and checks the table is identical.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np

DEFAULT_ONNX = "/tmp/calspeed/demo-yolov5s-mnv3s-shapes.onnx"


def load_batches(data: Path, imgsz: int, num_images: int) -> list[np.ndarray]:
    """The calibration batches (1, 3, imgsz, imgsz) as :func:`collect` builds them."""
    from edgeq.data.images import iter_images, list_images
    from edgeq.runtime.preprocess import preprocess_batch

    paths = list_images(data)[:num_images]
    return [preprocess_batch([image], imgsz)[0] for _, image in iter_images(paths)]


def observed_tensors(onnx_path: Path) -> tuple[list[str], list[str]]:
    """(tensors, head tensors) exactly as :func:`edgeq.export.calib_table.collect` observes them."""
    import onnx

    from edgeq.export import calib_table
    from edgeq.graph import head_tensors

    try:
        from edgeq.export.qdq import candidate_tensors
    except ImportError:  # the planning half of qdq.py moved to qdq_plan.py
        from edgeq.export.qdq_plan import candidate_tensors

    model = onnx.load(str(onnx_path))
    heads = head_tensors(model.graph)
    # checkouts with the PyTorch fake-quant model also observe its points
    points = calib_table.torch_points(model).values() if hasattr(calib_table, "torch_points") else []
    return list(dict.fromkeys([*candidate_tensors(model), *points, *heads])), heads


def forward_only(onnx_path: Path, tensors: list[str], batches: list[np.ndarray], threads: int | None) -> float:
    import onnx

    from edgeq.graph import session_with_outputs

    model = onnx.load(str(onnx_path))
    name = model.graph.input[0].name
    fetch = [t for t in tensors if t != name]
    session = session_with_outputs(model, fetch, basic=True, threads=threads)
    start = time.perf_counter()
    for batch in batches:
        session.run(fetch, {name: batch})
    return time.perf_counter() - start


def table_digest(states: dict) -> str:
    return hashlib.sha256(json.dumps(states, sort_keys=True).encode()).hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--onnx", type=Path, default=Path(DEFAULT_ONNX))
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1] / "calib_data")
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    parser.add_argument("--forward-only", action="store_true", help="also time the ONNX Runtime runs alone")
    parser.add_argument("--no-overlap", action="store_true", help="statistics in turn with the runs, not on a worker")
    parser.add_argument("--save", type=Path, help="write every tensor's to_state() here (JSON)")
    parser.add_argument("--compare", type=Path, help="check the table equals one written by --save")
    args = parser.parse_args()
    if not args.onnx.exists():
        raise SystemExit(f"{args.onnx} is missing: edgeq export --format onnx --imgsz {args.imgsz} "
                         f"--out {args.onnx.parent} --force")

    from edgeq.export.observe import observe_onnx

    batches = load_batches(args.data, args.imgsz, args.num_images)
    reference = json.loads(args.compare.read_text()) if args.compare else None
    if reference:  # the same tensors as the saved run, whatever the planner picks today
        tensors, heads = reference["tensors"], reference["heads"]
    else:
        tensors, heads = observed_tensors(args.onnx)
    if args.forward_only:
        print(f"ONNX Runtime forwards alone: {forward_only(args.onnx, tensors, batches, args.threads):.2f} s")
    options = {"overlap": False} if args.no_overlap else {}  # older checkouts have no such option
    start = time.perf_counter()
    stats, seen = observe_onnx(args.onnx, tensors, iter(batches), total=len(batches), progress=False,
                               threads=args.threads, channel_tensors=heads, **options)
    elapsed = time.perf_counter() - start
    values = sum(s.n_values for s in stats.values())
    states = {name: s.to_state() for name, s in stats.items()}
    print(f"observe_onnx: {len(tensors)} tensors ({len(heads)} per-channel) x {seen} images "
          f"({values / seen / 1e6:.2f} M values per image): {elapsed:.2f} s; table {table_digest(states)}")
    if args.save:
        args.save.write_text(json.dumps({"tensors": tensors, "heads": heads, "states": states}))
    if reference:
        saved, fresh = reference["states"], json.loads(json.dumps(states))
        differ = [name for name in saved.keys() | fresh.keys() if saved.get(name) != fresh.get(name)]
        if differ:
            raise SystemExit(f"tables differ on {len(differ)} tensor(s), e.g. {sorted(differ)[0]}")
        print(f"identical to {args.compare} ({len(saved)} tensors)")


if __name__ == "__main__":
    main()
