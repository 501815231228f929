"""The verification report: one self-contained page (Markdown or HTML) a person can read and forward.

It holds the verdict against the budgets, the table of backends (accuracy, drop, parity, time
per image), each INT8 artifact's latency against the float model at the backend's default
precision, the SNR of every layer (worst first), histograms of the output errors, each INT8
artifact's calibration settings and the versions of every backend. Charts are inline SVG
(:mod:`edgeq.svg`): the HTML page has no script, no external resource and no plotting dependency.
"""

from __future__ import annotations

import datetime
import html
import platform
from pathlib import Path

from edgeq.errors import EdgeqError
from edgeq.runtime.latency import latency_rows, latency_summary
from edgeq.svg import bar_chart, histogram


def versions() -> dict[str, str]:
    """Versions of edgeq and of every backend package present (absent ones are listed as such)."""
    import importlib.metadata

    from edgeq import __version__

    out = {"edgeq": __version__, "python": platform.python_version(), "machine": platform.machine()}
    for pkg in ("torch", "numpy", "onnx", "onnxruntime", "openvino", "tensorrt", "opencv-python-headless"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _verdict(report: dict) -> str:
    budgets = []
    if report.get("max_map_drop") is not None:
        budgets.append(f"{report['max_map_drop']:g} mAP50-95 points")
    if report.get("min_speedup") is not None:
        budgets.append(f"at least {report['min_speedup']:g}x faster than float")
    if not budgets:
        return "no budget given"
    return ("PASS" if report["passed"] else "FAIL") + f" (budget: {', '.join(budgets)})"


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    esc = html.escape
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    return "<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + f"</tr>{body}</table>"


def _table(report: dict) -> tuple[list[str], list[list[str]]]:
    from edgeq.verify import table_rows

    header, *rows = table_rows(report, timing=True)
    return header, rows


def to_markdown(report: dict) -> str:
    lines = [f"# edgeq verification: {_verdict(report)}", "",
             f"- float model: `{report['weights']}`", f"- labelled data: `{report['data']}` ({report['images']} images)",
             f"- written: {datetime.datetime.now().isoformat(timespec='seconds')}", "",
             "Drops are in mAP points (0-100 scale) against the float model at the artifact's input size; "
             "rel L2 and agreement (mAP50-95 of the artifact's boxes against the float model's) come from the "
             "parity images; ms/image is the time inside the backend during evaluation, not a benchmark.", "",
             "## Backends", ""]
    header, rows = _table(report)
    lines += _md_table(header, rows)
    latency = latency_rows(report)
    if latency:
        lines += ["", "## Latency against float", "", latency_summary(report) + ".", "", *_md_table(latency[0], latency[1:])]
    for a in report["artifacts"]:
        if a["worst_layers"]:
            lines += ["", f"## Worst layers of `{Path(a['artifact']).name}`", "",
                      "| layer | SNR dB | noise/signal added by the layer |", "|---|---|---|"]
            lines += [f"| `{r['node']}` | {r['snr_db']:.1f} | {r['added_nsr']:.4f} |" for r in a["worst_layers"]]
        if _error_summary(a):
            lines += ["", f"## Output error of `{Path(a['artifact']).name}` (artifact - float, parity images)", "",
                      "| part | mean abs error | 99.9% of errors within | beyond |", "|---|---|---|---|"]
            lines += [f"| {h['part']} | {h['mean_abs']:.3g} | +-{h['edges'][-1]:.3g} | {h['clipped']} |"
                      for h in _error_summary(a)]
    calibrated = [a for a in report["artifacts"] if a.get("calibration")]
    if calibrated:
        lines += ["", "## Calibration", ""]
        for a in calibrated:
            c = a["calibration"]
            lines.append(f"- `{Path(a['artifact']).name}`: {c.get('method')} (percentile {c.get('percentile')}), "
                         f"{c.get('images')} images (list SHA-256 {str(c.get('image_list_sha256', ''))[:16]}...), "
                         f"{len(c.get('float_tensors', []))} tensors left float; placement: {c.get('placement')}")
    lines += ["", "## Versions", "", *(f"- {k}: {v}" for k, v in versions().items()), ""]
    return "\n".join(lines)


def _layer_snrs(artifact: dict) -> tuple[list[str], list[float | None]]:
    """Every Conv's SNR when verify kept them (worst first), else the worst layers alone."""
    rows = artifact.get("layer_snr_db") or [[r["node"], r["snr_db"]] for r in artifact["worst_layers"]]
    return [r[0] for r in rows], [r[1] for r in rows]


def _error_summary(artifact: dict) -> list[dict]:
    return (artifact.get("parity") or {}).get("error_histograms") or []


def to_html(report: dict) -> str:
    esc = html.escape
    header, table = _table(report)
    verdict = _verdict(report)
    colour = "#2e7d32" if report.get("passed", True) else "#c62828"
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>edgeq verification</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse}"
        "td,th{border:1px solid #bbb;padding:.25em .6em;text-align:right}td:first-child{text-align:left}"
        "code{background:#f3f3f3}</style></head><body>",
        f"<h1>edgeq verification: <span style='color:{colour}'>{esc(verdict)}</span></h1>",
        f"<p>float model <code>{esc(report['weights'])}</code>; labelled data <code>{esc(report['data'])}</code> "
        f"({report['images']} images). Drops in mAP points (0-100) against the float model at each artifact's input "
        "size; rel L2 and agreement from the parity images; ms/image inside the backend during evaluation.</p>",
        "<h2>Backends</h2>" + _html_table(header, table),
    ]
    latency = latency_rows(report)
    if latency:
        parts.append(f"<h2>Latency against float</h2><p>{esc(latency_summary(report))}.</p>"
                     + _html_table(latency[0], latency[1:]))
    for a in report["artifacts"]:
        name = Path(a["artifact"]).name
        if a["worst_layers"]:
            body = "".join(f"<tr><td><code>{esc(r['node'])}</code></td><td>{r['snr_db']:.1f}</td>"
                           f"<td>{r['added_nsr']:.4f}</td></tr>" for r in a["worst_layers"])
            parts.append(f"<h2>Worst layers of <code>{esc(name)}</code></h2><table><tr><th>layer"
                         f"</th><th>SNR dB</th><th>noise/signal added</th></tr>{body}</table>")
            labels, values = _layer_snrs(a)
            parts.append("<figure>" + bar_chart(labels, values, title=f"SNR of each Conv output vs float, worst "
                                                f"first: {name}", unit="dB") + "</figure>")
        hists = _error_summary(a)
        if hists:
            charts = "".join(
                "<figure style='display:inline-block;margin:0 1em 1em 0'>"
                + histogram(h["edges"], h["counts"], title=h["part"])
                + f"<figcaption>mean |error| {h['mean_abs']:.3g}; {h['clipped']} beyond the range</figcaption></figure>"
                for h in hists)
            parts.append(f"<h2>Output error of <code>{esc(name)}</code></h2><p>artifact minus float on the parity "
                         f"images, counts on a log scale; 99.9% of the errors lie in the range shown.</p>{charts}")
    calibrated = [a for a in report["artifacts"] if a.get("calibration")]
    if calibrated:
        items = "".join(
            f"<li><code>{esc(Path(a['artifact']).name)}</code>: {esc(str(a['calibration'].get('method')))}, "
            f"{esc(str(a['calibration'].get('images')))} images, "
            f"{len(a['calibration'].get('float_tensors', []))} tensors left float; "
            f"{esc(str(a['calibration'].get('placement')))}</li>" for a in calibrated)
        parts.append(f"<h2>Calibration</h2><ul>{items}</ul>")
    items = "".join(f"<li>{esc(k)}: {esc(v)}</li>" for k, v in versions().items())
    parts.append(f"<h2>Versions</h2><ul>{items}</ul></body></html>")
    return "\n".join(parts)


FORMATS = {".md": "md", ".markdown": "md", ".html": "html", ".htm": "html"}


def report_format(path: str | Path) -> str:
    """"md" or "html" from the file name; refused otherwise (checked before verify's long run)."""
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise EdgeqError(f"--report {path}: use a .html or .md file name")
    return fmt


def write_report(report: dict, path: str | Path) -> Path:
    """Write ``report`` (from :func:`edgeq.verify.verify`) as .md or .html, atomically."""
    from edgeq.utils.files import atomic_write_text

    render = to_markdown if report_format(path) == "md" else to_html
    return atomic_write_text(Path(path), render(report))
