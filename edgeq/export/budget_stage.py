"""The budget stage of the INT8 export: one search per flavour with one judge, the choices applied.

It reads what earlier stages made (the calibration table, each flavour's sensitivity ranking,
the fine-tuned weights where a fine-tune ran) and gives back each flavour's chosen Q/DQ graph
with its report, so the writing stage treats it like any other.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

log = logging.getLogger("edgeq")


def budget_all(float_onnx: Path, model, table, flavour_list, options: dict, quantized: dict, weights: dict,
               rankings: dict, bias_batches, judge, request, precisions: dict) -> dict:
    """Flavour name -> (chosen Q/DQ ModelProto, report); updates ``options`` (the chosen float
    tensors and head outputs, for the record) and ``precisions`` (OpenVINO's chosen precision).

    ``quantized``/``weights``: the fine-tuned graphs and their trained float models (empty
    without a fine-tune); ``judge``: the :class:`edgeq.export.budget_judge.Judge` of the
    held-out images.
    """
    from edgeq.export.budget import SearchInputs, search

    log.info("budget %.2f mAP50-95 points, measured by %s", request.max_map_drop, judge.measure)
    out = {}
    for f in flavour_list:
        finetuned = f.name in weights
        inputs = SearchInputs(weights=weights.get(f.name, model), table=table, opts=options[f.name],
                              ranked=rankings[f.name], bias_batches=bias_batches, finetuned=finetuned,
                              float_onnx=float_onnx, head_outputs=request.head_outputs,
                              ov_precision=request.ov_precision)
        choice = search(f, inputs, judge, request.max_map_drop, progress=request.progress)
        c = choice.chosen
        options[f.name] = replace(options[f.name], float_tensors=c.float_tensors,
                                  head_outputs=c.head_outputs or options[f.name].head_outputs)
        report = c.report
        if finetuned:
            start = quantized[f.name][1]
            report.finetune, report.bias_corrected = start.finetune, start.bias_corrected
        report.budget = choice.record
        if c.ov_precision:
            precisions[f.name] = c.ov_precision
        out[f.name] = (c.model, report)
    return out
