"""report.html: the run's report.json as one self-contained, readable page.

Teacher vs student vs deployed side by side (size, parameters, latency, memory, QA
scores, retention), the budgets with their verdicts (one not measured shown as such,
never as a number), every stage's status and time, the host the profile ran on, and
the stages' plots embedded as base64 PNG so the file can be mailed or archived alone.
Standard library only.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from kd2edge.artifacts import MANIFEST

MIB = 2**20
SCORE_KEYS = ("em", "f1", "accuracy", "rouge_l")
# Plots embedded per stage folder, in this order; any other PNG there follows.
KNOWN_PLOTS = {"distill": ["loss_curve.png"], "profile": ["ttft_vs_prompt.png", "token_latency.png"],
               "evaluate": ["quality.png"]}

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#222;padding:0 1rem}
h1{margin-bottom:.2rem}h2{border-bottom:2px solid #eee;padding-bottom:.2rem;margin-top:2rem}
table{border-collapse:collapse;margin:.5rem 0;font-size:.93rem}
th,td{border:1px solid #ddd;padding:.35rem .7rem;text-align:left;vertical-align:top}
th{background:#f6f6f6}td.num{text-align:right;font-variant-numeric:tabular-nums}
.pass{color:#0a6b2d;font-weight:600}.fail{color:#b00020;font-weight:700}.open{color:#777}
.missing{color:#9a6700;font-style:italic}.badge{display:inline-block;padding:.2rem .7rem;border-radius:1rem;color:#fff;font-weight:700}
.badge.pass{background:#0a6b2d}.badge.fail{background:#b00020}.badge.open{background:#888}
.warn{background:#fff8e1;border-left:4px solid #f0b400;padding:.4rem .8rem;margin:.3rem 0}
figure{margin:1rem 0}figure img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:.9rem}
.muted{color:#666;font-size:.9rem}pre{background:#f6f6f6;padding:.8rem;overflow:auto;font-size:.8rem}
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def fmt(value: Any, digits: int = 1, unit: str = "") -> str:
    """A figure for a table cell: numbers rounded, thousands separated; None as an em dash."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}{unit}"
    if isinstance(value, float):
        return f"{value:,.{digits}f}{unit}"
    return f"{value}{unit}"


def pct(fraction: float | None) -> str:
    """0.873 -> '87.3%'; None -> an em dash."""
    return fmt(None if fraction is None else 100 * fraction, 1, "%")


def mib(n_bytes: int | None) -> str:
    """Bytes as MiB for a table cell; None -> an em dash."""
    return fmt(None if n_bytes is None else n_bytes / MIB, 1, " MiB")


def verdict_html(passed: bool | None) -> str:
    if passed is True:
        return '<span class="pass">pass</span>'
    if passed is False:
        return '<span class="fail">FAIL</span>'
    return '<span class="open">not measured</span>'


def _table(header: list[str], rows: list[list[str]], numeric_from: int = 1) -> str:
    """An HTML table; cells are already HTML. Columns from `numeric_from` are right-aligned."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td{" class=num" if i >= numeric_from else ""}>{c}</td>'
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _profile_manifest(report: dict) -> dict:
    """The profile stage's manifest, for the figures report.json does not copy (baseline, warnings)."""
    path = (report.get("stages", {}).get("profile") or {}).get("path")
    if not path or not (Path(path) / MANIFEST).is_file():
        return {}
    try:
        return json.loads((Path(path) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def comparison_rows(report: dict, baseline: dict) -> list[list[str]]:
    """Teacher / student / deployed rows: parameters, size, latency, memory, QA scores, retention.

    A cell with no measurement is an em dash.
    """
    teacher, student = report.get("teacher") or {}, report.get("student") or {}
    artifact, latency, quality = report.get("artifact") or {}, report.get("latency") or {}, report.get("quality") or {}
    base_ok = baseline.get("status") == "done"
    # Like for like: the deployed TTFT and decode rate at the teacher baseline's prompt length.
    base_len = str(baseline.get("prompt_tokens")) if base_ok else None
    ttft_at = (latency.get("ttft_ms_by_prompt") or {}).get(base_len, {}).get("p50") if base_len else None
    decode_at = (latency.get("decode_by_prompt") or {}).get(base_len, {}).get("tokens_per_s") if base_len else None
    base_note = f" ({base_len}-token prompt)" if base_len else ""
    rows = [
        ["Model", _e(teacher.get("id") or "—"), _e(student.get("id") or "—"),
         _e(f"{artifact.get('format', 'onnx')} (4-bit)")],
        ["Parameters", fmt(teacher.get("params")), fmt(student.get("params")), fmt(student.get("params"))],
        ["Size on disk", "—", "—", mib(artifact.get("size_bytes"))],
        [f"TTFT p50{base_note}", fmt(baseline.get("ttft_ms_p50") if base_ok else None, 1, " ms"), "—",
         fmt(ttft_at if base_len else latency.get("ttft_ms_p50"), 1, " ms")],
        [f"Decode speed{base_note}", fmt(baseline.get("decode_tokens_per_s") if base_ok else None, 1, " tok/s"), "—",
         fmt(decode_at if base_len else latency.get("decode_tokens_per_s"), 1, " tok/s")],
        ["Peak memory (process peak RSS, VmHWM)", fmt(baseline.get("peak_rss_mb") if base_ok else None, 0, " MiB"), "—",
         fmt(latency.get("peak_rss_mb"), 0, " MiB")],
    ]
    for key in SCORE_KEYS:
        if any(key in (quality.get(m) or {}) for m in ("teacher", "student", "deployed")):
            rows.append([f"QA {key.upper() if key == 'em' else key.replace('_', '-').title()}",
                         *(fmt((quality.get(m) or {}).get(key), 3) for m in ("teacher", "student", "deployed"))])
    student_kept = ((quality.get("retention") or {}).get("student") or {}).get("f1")
    rows.append(["Retention (F1 vs teacher)", "100%", pct(student_kept), pct(quality.get("retention_f1"))])
    return rows


def _section_comparison(report: dict, baseline: dict) -> str:
    note = ""
    if baseline and baseline.get("status") != "done":
        note = f'<p class="muted">Teacher latency not measured: {_e(baseline.get("reason", baseline.get("status")))}</p>'
    elif baseline:
        note = (f'<p class="muted">Teacher timed in PyTorch {_e(baseline.get("dtype", "fp32"))} on the same host '
                f'({_e(baseline.get("threads"))} threads, {_e(baseline.get("new_tokens"))} new tokens); the deployed '
                f'figures are the ONNX runtime\'s at the same prompt length.</p>')
    reduction = report.get("param_reduction")
    extra = f"<p>Parameter reduction: <b>{pct(reduction)}</b></p>" if reduction is not None else ""
    return ("<h2>Teacher vs student vs deployed</h2>"
            + _table(["", "Teacher", "Student (fp32)", "Deployed"], comparison_rows(report, baseline)) + extra + note)


def _section_retention(report: dict) -> str:
    """Where the QA figures come from, and the deployed model's F1 retention per language with its interval."""
    quality = report.get("quality") or {}
    intervals = quality.get("retention_f1_interval") or {}
    if not intervals:
        return ""

    def cell(interval: dict) -> str:
        if interval.get("value") is None:
            return "undefined"
        span = (f' <span class="muted">[{pct(interval["low"])}, {pct(interval["high"])}]</span>'
                if interval.get("low") is not None else "")
        return pct(interval["value"]) + span

    def scores(model: str, lang: str | None) -> dict:
        block = quality.get(model) or {}
        return block if lang is None else (block.get("by_language") or {}).get(lang, {})

    rows = []
    for lang, by in [(None, intervals)] + list((intervals.get("by_language") or {}).items()):
        rows.append([_e(lang or "all"), fmt(by["deployed"]["n"]),
                     *(fmt(scores(m, lang).get("f1"), 3) for m in ("teacher", "student", "deployed")),
                     fmt(scores("deployed", lang).get("em"), 3), cell(by["student"]), cell(by["deployed"])])
    split = quality.get("split_info") or {}
    where = (f"{_e(quality.get('dataset'))}, {_e(quality.get('split'))} part"
             + (f" ({_e(split['groups']['validation'])} of {_e(split['groups']['validation'] + split['groups']['train'])} "
                f"{_e(split['by'])}s, never trained on)" if split.get("groups") else "")
             + f", {_e(quality.get('shots'))}-shot")
    level = (intervals.get("deployed") or {}).get("level", 0.95)
    return ("<h2>QA retention</h2>"
            f"<p>{where}. Retention is the model's F1 over the teacher's on the same items, with a paired "
            f"bootstrap {pct(level)} interval.</p>"
            + _table(["Language", "Items", "Teacher F1", "Student F1", "Deployed F1", "Deployed EM",
                      "Student retention", "Deployed retention"], rows))


def _section_budgets(report: dict) -> str:
    rows = []
    for name, b in (report.get("budgets") or {}).items():
        what = b.get("measured_as") or b.get("status") or ""
        if b.get("interval") and b["interval"][0] is not None:
            what = f"F1 retention, {pct(b.get('level', 0.95))} interval [{fmt(b['interval'][0], 2)}, {fmt(b['interval'][1], 2)}]"
        note = f'<div class="warn">{_e(b["note"])}</div>' if b.get("note") else ""
        rows.append([_e(name), fmt(b.get("limit"), 2), fmt(b.get("value"), 2), verdict_html(b.get("pass")),
                     f'<span class="muted">{_e(what)}</span>{note}'])
    return "<h2>Budgets</h2>" + _table(["Budget", "Limit", "Measured", "Verdict", "Measured as"], rows)


def _section_stages(report: dict) -> str:
    rows = []
    for name, s in (report.get("stages") or {}).items():
        rows.append([_e(name), _e(s.get("status")), fmt(s.get("seconds"), 1, " s"), _e(s.get("path") or "")])
    return "<h2>Stages</h2>" + _table(["Stage", "Status", "Time", "Folder"], rows, numeric_from=2)


def _section_latency(report: dict, manifest: dict) -> str:
    latency = report.get("latency") or {}
    rows = [[_e(n), fmt(v.get("p50"), 1), fmt(v.get("p90"), 1), fmt(v.get("min"), 1), fmt(v.get("max"), 1),
             fmt((latency.get("decode_by_prompt") or {}).get(n, {}).get("tokens_per_s"), 1)]
            for n, v in (latency.get("ttft_ms_by_prompt") or {}).items()]
    tl = latency.get("token_latency_ms") or {}
    host = latency.get("host") or {}
    host_line = (f"{_e(host.get('cpu_model', '?'))}, {_e(host.get('cores_usable', '?'))} usable cores, "
                 f"{fmt((host.get('memory_bytes') or 0) / 2**30, 1, ' GiB')} RAM, {_e(host.get('arch', '?'))}, "
                 f"{_e(host.get('os', '?'))}, onnxruntime {_e(host.get('onnxruntime', '?'))}")
    providers = ", ".join(latency.get("providers") or [])
    if latency.get("fallback"):
        providers += ' <span class="fail">(CPU fallback: the profile\'s provider is missing here)</span>'
    warnings = "".join(f'<div class="warn">{_e(w)}</div>' for w in manifest.get("warnings", []))
    return ("<h2>On-device profile</h2>"
            f"<p>Host: {host_line}<br>Execution providers: {providers or '—'}<br>"
            f"Load {fmt(latency.get('load_s'), 2, ' s')}, peak RSS {fmt(latency.get('peak_rss_mb'), 0, ' MiB')}, "
            f"per-token latency p50/p90/p99 {fmt(tl.get('p50'), 2)}/{fmt(tl.get('p90'), 2)}/{fmt(tl.get('p99'), 2)} ms "
            f"at {_e(latency.get('ttft_prompt_tokens', '?'))} prompt tokens</p>" + warnings
            + _table(["Prompt tokens", "TTFT p50 (ms)", "p90", "min", "max", "Decode tok/s (median)"], rows)
            + _llama_cpp_table(report.get("llama_cpp") or (manifest.get("metrics") or {}).get("llama_cpp") or {}))


def _llama_cpp_table(ref: dict) -> str:
    """llama.cpp's llama-bench figures at the same prompt lengths, and kd2edge's ratios to them."""
    if not ref:
        return ""
    if ref.get("status") != "done":
        return f'<p class="missing">llama.cpp reference: {_e(ref.get("status"))} ({_e(ref.get("reason", ""))})</p>'
    rows = [[_e(n), fmt(v.get("ttft_ms"), 1), fmt(v.get("decode_tok_s"), 1),
             fmt((ref.get("ratios") or {}).get(n, {}).get("ttft"), 2),
             fmt((ref.get("ratios") or {}).get(n, {}).get("decode"), 2)] for n, v in ref["by_prompt"].items()]
    return (f"<p>llama.cpp reference: {_e(Path(ref['gguf']).name)} ({mib(ref.get('gguf_bytes'))}), "
            f"llama-bench, {_e(ref.get('threads'))} threads; {_e(ref.get('note', ''))}</p>"
            + _table(["Prompt tokens", "llama.cpp TTFT (ms)", "llama.cpp decode tok/s", "kd2edge TTFT x",
                      "kd2edge decode x"], rows))


def embedded_plots(report: dict) -> list[tuple[str, str, str]]:
    """(stage, file name, base64 PNG) for the plots in the stages' folders, known ones first."""
    out = []
    for stage, s in (report.get("stages") or {}).items():
        folder = Path(s["path"]) if s.get("path") else None
        if folder is None or not folder.is_dir():
            continue
        known = [folder / n for n in KNOWN_PLOTS.get(stage, [])]
        others = sorted(p for p in folder.glob("*.png") if p not in known)
        for png in [p for p in known if p.is_file()] + others:
            out.append((stage, png.name, base64.b64encode(png.read_bytes()).decode("ascii")))
    return out


def _section_plots(report: dict) -> str:
    figures = "".join(f'<figure><img alt="{_e(stage)}: {_e(name)}" src="data:image/png;base64,{data}">'
                      f"<figcaption>{_e(stage)}: {_e(name)}</figcaption></figure>"
                      for stage, name, data in embedded_plots(report))
    return "<h2>Plots</h2>" + (figures or '<p class="missing">no plots</p>')


def render_html(report: dict) -> str:
    """The report page as a string (see the module docstring)."""
    manifest = _profile_manifest(report)
    baseline = report.get("baseline_teacher") or (manifest.get("metrics") or {}).get("baseline_teacher") or {}
    verdict = report.get("pass")
    badge = {True: ("pass", "PASS"), False: ("fail", "FAIL")}.get(verdict, ("open", "OPEN (a budget not measured)"))
    config = json.dumps(report.get("config", {}), indent=2, default=str)
    return (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width, initial-scale=1">'
        f"<title>kd2edge report: {_e(report.get('profile', ''))}</title><style>{_CSS}</style></head><body>"
        f"<h1>kd2edge report</h1><p>Device profile <b>{_e(report.get('profile', '?'))}</b> &nbsp; "
        f'<span class="badge {badge[0]}">{_e(badge[1])}</span></p>'
        + _section_comparison(report, baseline) + _section_retention(report) + _section_budgets(report)
        + _section_stages(report)
        + _section_latency(report, manifest) + _section_plots(report)
        + f"<h2>Configuration</h2><details><summary>resolved run config</summary><pre>{_e(config)}</pre></details>"
        + "</body></html>\n"
    )


def write_html(report: dict, path: Path) -> Path:
    """Write the report page to `path` (atomically) and return the path.

    Args:
        report: report.json's content (kd2edge.report.build_report).
        path: the .html file to write.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(render_html(report), encoding="utf-8")
    tmp.replace(path)
    return path
