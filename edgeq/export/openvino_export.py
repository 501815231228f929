"""ONNX -> OpenVINO IR (.xml + .bin), metadata carried in the IR's rt_info.

The IR is what ``benchmark_app`` and OpenVINO's own tools open. Weights stay FP32 unless
``half=True`` (FP16-compressed weights; the CPU still computes at the precision hint it is
compiled with, f32 by default in edgeq's runtime).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from edgeq.errors import EdgeqError
from edgeq.graph import RT_INFO_ROOT, read_metadata
from edgeq.utils.files import check_writable_dir

log = logging.getLogger("edgeq")

def _import_openvino():
    try:
        import openvino as ov
    except ImportError:
        raise EdgeqError("OpenVINO is not installed", note="pip install openvino") from None
    return ov


def export_openvino(onnx_path: str | Path, xml_path: str | Path, *, half: bool = False) -> Path:
    """Convert an edgeq ONNX artifact to IR; both files appear only once both are written."""
    ov = _import_openvino()
    onnx_path, xml_path = Path(onnx_path), Path(xml_path)
    if xml_path.suffix != ".xml":
        raise EdgeqError(f"an OpenVINO IR path must end in .xml, got {xml_path}")
    folder = check_writable_dir(xml_path.parent)
    try:
        model = ov.convert_model(str(onnx_path))
    except Exception as exc:  # OpenVINO's frontend errors are plain RuntimeErrors with long text
        raise EdgeqError(f"OpenVINO could not convert {onnx_path}: {str(exc).splitlines()[0]}") from None
    for key, value in read_metadata(onnx_path).items():
        model.set_rt_info(value, [RT_INFO_ROOT, key])
    model.set_rt_info("fp16" if half else "fp32", [RT_INFO_ROOT, "edgeq.ir_weights"])

    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{xml_path.stem}.", dir=folder))
    try:
        tmp_xml = tmp_dir / xml_path.name
        ov.save_model(model, str(tmp_xml), compress_to_fp16=half)
        os.replace(tmp_xml.with_suffix(".bin"), xml_path.with_suffix(".bin"))
        os.replace(tmp_xml, xml_path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    log.debug("wrote %s", xml_path)
    return xml_path
