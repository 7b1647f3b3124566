"""OUT/report.html: a self-contained, human-readable view of report.json.

One HTML file with inline CSS and inline SVG charts drawn here (no scripts, no external
URLs, no images to fetch), so it can be archived as a CI artifact and opened anywhere.
Every string that comes from the report is escaped. ``render(report) -> str``.
"""
from __future__ import annotations

import html
import math
from typing import Any

COLORS = {"attention": "#4c78a8", "ffn": "#f58518", "before": "#e45756", "after": "#54a24b",
          "grid": "#dddddd", "axis": "#555555", "track": "#eeeeee"}

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1100px;padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ccc;
padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #d0d0d0;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
table.kv th{width:16em}
.pass{color:#1a7f37;font-weight:600}.fail{color:#cf222e;font-weight:600}
.verdict{display:inline-block;padding:.3em .8em;border-radius:4px;font-weight:700;color:#fff}
.verdict.pass{background:#1a7f37;color:#fff}.verdict.fail{background:#cf222e;color:#fff}
.muted{color:#666}.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.88em;
word-break:break-all}
svg{display:block;margin:.6em 0;max-width:100%;height:auto}
svg text{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif}
"""


def e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def num(v: Any, digits: int = 4) -> str:
    if v is None:
        return "&ndash;"
    if isinstance(v, bool):
        return e(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return e(v)
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
            return f"{v:.{digits - 1}e}"
        return f"{v:.{digits}g}" if abs(v) >= 1 else f"{v:.{digits}f}".rstrip("0").rstrip(".") or "0"
    return e(v)


def pct(v: float | None) -> str:
    return "&ndash;" if v is None else f"{100 * v:.2f}%"


def _table(headers: list[str], rows: list[list[str]], cls: str = "", num_cols=()) -> str:
    """headers/rows hold already-escaped HTML."""
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join("<tr>" + "".join(
        f'<td class="num">{c}</td>' if i in num_cols else f"<td>{c}</td>" for i, c in enumerate(r)) + "</tr>"
        for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _kv(rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{e(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="kv"><tbody>{body}</tbody></table>'


# ------------------------------------------------------------------------------ sections

def _summary(r: dict) -> str:
    p = r.get("params", {})
    before, after = p.get("before"), p.get("after")
    change = f" ({100 * (after / before - 1):+.2f}%)" if before and after is not None else ""
    calib = r.get("calibration")
    calib_s = (f"{e(calib.get('source') or 'kjv (default)')}: {num(calib.get('samples'))} windows of "
               f"{num(calib.get('seq_len'))} tokens, seed {num(calib.get('seed'))}"
               if isinstance(calib, dict) else "none (data-free criterion, no reconstruction)")
    rows = [
        ("Model", e(r.get("model", ""))),
        ("Model spec", f'<span class="mono">{e(r.get("model_spec"))}</span>'),
        ("Ratio requested", num(r.get("ratio_requested"))),
        ("Ratio achieved", num(r.get("ratio_achieved"))),
        ("Criterion", e(r.get("criterion", ""))),
        ("Reconstruction", e(r.get("reconstruction", ""))),
        ("Allocation", e(r.get("allocation", ""))),
        ("Seed", num(r.get("seed"))),
        ("Calibration", calib_s),
        ("Parameters before", num(before)),
        ("Parameters after", num(after) + change),
        ("Structured parameters removed",
         f"{num(p.get('structured_removed'))} of {num(p.get('structured_before'))}"),
        ("ONNX initializer elements", num(p.get("onnx_initializers"))),
        ("ONNX vs PyTorch (max rel. diff)", num(r.get("verify", {}).get("max_rel_diff_onnx_vs_torch"))),
    ]
    if r.get("skipped_layers"):
        rows.append(("Blocks kept dense", e(", ".join(map(str, r["skipped_layers"])))))
    return '<section id="summary"><h2>Run summary</h2>' + _kv(rows) + "</section>"


def _gates(r: dict) -> str:
    g = r.get("gates") or {}
    results = g.get("results") or []
    out = ['<section id="gates"><h2>Quality gates</h2>']
    if not results:
        out.append('<p class="muted">No gates set (--max-ppl-increase, --max-logit-error, --min-speedup).</p>')
        return "".join(out) + "</section>"
    ok = bool(g.get("passed"))
    out.append(f'<p><span class="verdict {"pass" if ok else "fail"}">{"PASSED" if ok else "FAILED"}</span> '
               f'{sum(1 for x in results if x.get("passed"))} of {len(results)} gates passed</p>')
    rows = []
    for x in results:
        unit = "%" if x.get("name") == "max-ppl-increase" else ("x" if x.get("name") == "min-speedup" else "")
        fmt = pct if unit == "%" else (lambda v, u=unit: "&ndash;" if v is None else f"{num(v)}{u}")
        status = '<span class="pass">pass</span>' if x.get("passed") else '<span class="fail">FAIL</span>'
        rows.append([e(x.get("name")), fmt(x.get("threshold")), fmt(x.get("measured")),
                     fmt(x.get("by")) if x.get("by") is not None else "&ndash;", status, e(x.get("message", ""))])
    out.append(_table(["gate", "threshold", "measured", "by (&gt; 0: failed by)", "result", "message"],
                      rows, num_cols=(1, 2, 3)))
    return "".join(out) + "</section>"


def _quality(r: dict) -> str:
    out = ['<section id="quality"><h2>Perplexity, output error and speed</h2>']
    pp = r.get("perplexity")
    if isinstance(pp, dict):
        inc = pp.get("increase")
        if inc is None and pp.get("before") and pp.get("after") is not None:
            inc = pp["after"] / pp["before"] - 1
        out.append("<h3>Perplexity</h3>" + _table(
            ["data", "tokens", "dense (before)", "pruned (after)", "increase", "measured on"],
            [[e(pp.get("data")), num(pp.get("tokens")), num(pp.get("before")), num(pp.get("after")),
              pct(inc), e(pp.get("measured_on", ""))]], num_cols=(1, 2, 3, 4)))
    else:
        out.append('<p class="muted">Perplexity not measured (--eval DATA or --max-ppl-increase).</p>')
    le = r.get("logit_error")
    if isinstance(le, dict):
        out.append("<h3>Output error</h3>" + _table(
            ["relative error", "windows", "data", "definition"],
            [[num(le.get("value")), f"{num(le.get('windows'))} &times; {num(le.get('seq_len'))}",
              e(le.get("data", "")), e(le.get("definition", ""))]], num_cols=(0,)))
    lat = r.get("latency")
    if isinstance(lat, dict):
        out.append("<h3>Latency</h3>" + _table(
            ["dense (ms)", "pruned (ms)", "speedup", "input", "measured on"],
            [[num(lat.get("dense_ms")), num(lat.get("pruned_ms")), f"{num(lat.get('speedup'))}x",
              f"batch {num(lat.get('batch'))}, {num(lat.get('seq_len'))} tokens",
              e(lat.get("measured_on", ""))]], num_cols=(0, 1, 2)))
    else:
        out.append('<p class="muted">Latency not measured (--measure-speed or --min-speedup).</p>')
    return "".join(out) + "</section>"


def _layers(r: dict) -> list[dict]:
    """Per layer: {'layer', 'attention': module, 'ffn': module} (either may be missing)."""
    by: dict[int, dict] = {}
    for m in r.get("modules", []):
        by.setdefault(m.get("layer", -1), {"layer": m.get("layer", -1)})[m.get("kind", "?")] = m
    return [by[k] for k in sorted(by)]


def _kept(m: dict | None) -> tuple[int, int] | None:
    if not m or "total" not in m:
        return None
    return len(m.get("kept", [])), int(m["total"])


def _allocation(r: dict) -> str:
    layers = _layers(r)
    rows = []
    for L in layers:
        cells = [num(L["layer"])]
        for kind in ("attention", "ffn"):
            m = L.get(kind)
            k = _kept(m)
            if k is None:
                cells += ["&ndash;", "&ndash;"]
                continue
            txt = f"{k[0]}/{k[1]} {e(_unit_name(m))}"
            if m.get("kv_total"):
                txt += f" ({len(m.get('kv_kept', []))}/{m['kv_total']} K/V groups)"
            cells += [txt, pct(k[0] / k[1]) if k[1] else "&ndash;"]
        rows.append(cells)
    table = _table(["layer", "attention kept/total", "attention kept", "FFN kept/total", "FFN kept"],
                   rows, cls="allocation", num_cols=(0, 2, 4))
    return ('<section id="allocation"><h2>Per-layer pruning allocation</h2>'
            + allocation_svg(layers) + table + "</section>")


def _unit_name(m: dict) -> str:
    return "heads" if m.get("kind") == "attention" else "neurons"


def _errors(m: dict) -> tuple[float | None, float | None]:
    oe = m.get("output_error") or {}
    return oe.get("pruned_no_reconstruction"), oe.get("final")


def _reconstruction(r: dict) -> str:
    mods = r.get("modules", [])
    out = ['<section id="reconstruction"><h2>Reconstruction error per module</h2>']
    have = [m for m in mods if isinstance(m.get("output_error"), dict)]
    if not have:
        out.append('<p class="muted">No per-module output errors: reconstruction did not run '
                   f'(reconstruction {e(r.get("reconstruction"))}, criterion {e(r.get("criterion"))}).</p>')
        return "".join(out) + "</section>"
    out.append('<p class="muted">Mean squared error (per element) of each module&#x27;s output on the '
               'calibration data, against the dense model&#x27;s output: pruned without reconstruction '
               '(before) and as emitted (after). Level 1: the same for the first projections, before and '
               'after their refit.</p>')
    out.append(errors_svg(have))
    rows = []
    for m in have:
        b, a = _errors(m)
        l1 = m.get("level1_error") or {}
        rows.append([e(m.get("name")), e(m.get("kind")), num(b), num(a),
                     num(l1.get("before")), num(l1.get("after")),
                     "yes" if l1.get("kept_original") else ""])
    out.append(_table(["module", "kind", "error before", "error after", "level-1 error before",
                       "level-1 error after", "level 1 kept original"], rows, cls="errors",
                      num_cols=(2, 3, 4, 5)))
    return "".join(out) + "</section>"


def _decoder(r: dict) -> str:
    """What deploys: the decoder's per-layer widths and cache, and the PyTorch checkpoint."""
    dec, ck = r.get("decoder"), r.get("checkpoint")
    if not dec and not ck:
        return ""
    out = ['<section id="decoder"><h2>Decoder and checkpoint</h2>']
    if dec and dec.get("kv_cache") and "kv_cache_bytes_per_token" in dec:
        kv = dec["kv_cache_bytes_per_token"]
        out.append(_kv([("model.onnx", f"KV-cache decoder, {e(dec['dtype'])}"),
                        ("KV-cache bytes per token", f"{kv['dense']:,} dense &rarr; {kv['pruned']:,} pruned"),
                        ("files", e(", ".join(dec.get("files", []))))]))
        mods = {(m["layer"], m["kind"]): m for m in r.get("modules", [])}
        rows = []
        for row in dec["layers"]:
            att, ffn = mods.get((row["layer"], "attention")), mods.get((row["layer"], "ffn"))
            heads = f"{len(att['kept'])} / {att['total']}" if att else "dense"
            width = f"{len(ffn['kept'])} / {ffn['total']}" if ffn else "dense"
            rows.append([str(row["layer"]), heads, f"{row['kv_heads']['pruned']} / {row['kv_heads']['dense']}",
                         str(row["key_dim"]), width])
        out.append(_table(["layer", "query heads", "K/V heads", "head size", "FFN width"], rows,
                          num_cols=(0, 3)))
    elif dec and dec.get("kv_cache"):
        out.append(_kv([("model.onnx", f"KV-cache decoder: {e(dec.get('genai', ''))}")]))
    elif dec:
        out.append(_kv([("model.onnx", f"plain graph, no KV cache: {e(dec.get('reason', ''))}")]))
    if ck:
        text = f"{e(ck['form'])}: {e(ck['reason'])}" if ck["written"] else f"not written: {e(ck['reason'])}"
        out.append(_kv([("OUT/hf", text)]))
    out.append("</section>")
    return "".join(out)


def _inputs(r: dict) -> str:
    inputs = r.get("inputs") or {}
    out = ['<section id="inputs"><h2>Inputs</h2>']
    if not inputs:
        out.append('<p class="muted">Not recorded.</p>')
        return "".join(out) + "</section>"
    rows = []
    for what, rec in inputs.items():
        if not isinstance(rec, dict):
            continue
        src = rec.get("source") or rec.get("path") or rec.get("hub_id") or rec.get("spec") or ""
        digest = rec.get("sha256") or rec.get("revision") or rec.get("gguf_sha256")
        files = rec.get("files") or {}
        detail = "<br>".join(f'{e(k)}: <span class="mono">{e(v)}</span>' for k, v in files.items())
        rows.append([e(what), f'<span class="mono">{e(src)}</span>', f'<span class="mono">{e(digest)}</span>',
                     detail])
    out.append(_table(["input", "source", "sha256 (or revision)", "files"], rows, cls="inputs"))
    return "".join(out) + "</section>"


def _versions(r: dict) -> str:
    v = r.get("versions") or {}
    rows = [(k, e(x if x is not None else "not installed")) for k, x in v.items()]
    return '<section id="versions"><h2>Versions</h2>' + (_kv(rows) if rows else
                                                          '<p class="muted">Not recorded.</p>') + "</section>"


def _timings(r: dict) -> str:
    t = r.get("timings") or {}
    if not t:
        return ""
    rows = [[e(k), num(float(v))] for k, v in t.items()]
    rows.append(["<b>total</b>", f"<b>{num(float(sum(t.values())))}</b>"])
    return '<section id="timings"><h2>Timings (s)</h2>' + _table(["phase", "seconds"], rows, num_cols=(1,)) + \
        "</section>"


def _whole_experts(r: dict) -> str:
    w = r.get("whole_experts")
    if not w:
        return ""
    rows = []
    for block, gone in w.get("removed", {}).items():
        loss = w.get("loss", {}).get(block, [])
        rows.append([e(block), f"{w.get('experts_before', {}).get(block, '')}", e(", ".join(map(str, gone))),
                     e(" ".join(f"{v:.3g}" for v in loss))])
    return ('<section id="whole-experts"><h2>Whole experts removed</h2>'
            f'<p class="muted">{int(w.get("params_removed", 0)):,} parameters; score: {e(w.get("score", ""))}</p>'
            + _table(["layer", "experts", "removed", "loss of each expert"], rows) + "</section>")


def _notes(r: dict) -> str:
    notes = r.get("notes") or []
    if not notes:
        return ""
    return '<section id="notes"><h2>Notes</h2><ul>' + "".join(f"<li>{e(n)}</li>" for n in notes) + \
        "</ul></section>"


def render(report: dict) -> str:
    """The whole report as one self-contained HTML document."""
    title = f"goa-compiler report: {report.get('model', '')}"
    version = (report.get("versions") or {}).get("goa-compiler")
    gates = report.get("gates") or {}
    verdict = ""
    if gates.get("results"):
        ok = gates.get("passed")
        verdict = f' &middot; gates <span class="{"pass" if ok else "fail"}">{"passed" if ok else "FAILED"}</span>'
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title><style>{CSS}</style></head><body>",
        "<header><h1>goa-compiler report</h1>",
        f'<p class="muted">{e(report.get("model", ""))} &middot; ratio {num(report.get("ratio_achieved"))} '
        f'achieved ({num(report.get("ratio_requested"))} requested){verdict}'
        f'{" &middot; goa-compiler " + e(version) if version else ""}</p></header>',
        "<main>", _summary(report), _gates(report), _quality(report), _whole_experts(report), _allocation(report),
        _reconstruction(report), _decoder(report), _inputs(report), _versions(report), _timings(report), _notes(report),
        "</main></body></html>",
    ]
    return "\n".join(p for p in parts if p) + "\n"


# ------------------------------------------------------------------------------ charts (SVG)

def _svg_open(w: int, h: int, label: str, cls: str) -> str:
    return (f'<svg class="{cls}" width="{w}" height="{h}" '
            f'viewBox="0 0 {w} {h}" role="img" aria-label="{e(label)}">')


def _legend(items: list[tuple[str, str]], x: float, y: float) -> str:
    out = []
    for label, color in items:
        out.append(f'<rect x="{x:.1f}" y="{y - 9:.1f}" width="10" height="10" fill="{color}"/>'
                   f'<text x="{x + 14:.1f}" y="{y:.1f}" font-size="12">{e(label)}</text>')
        x += 24 + 7 * len(label)
    return "".join(out)


def allocation_svg(layers: list[dict], width: int = 900, height: int = 280) -> str:
    """Grouped bars: per layer, the fraction of attention heads and FFN neurons kept."""
    left, right, top, bottom = 48, 12, 28, 36
    pw, ph = width - left - right, height - top - bottom
    n = max(1, len(layers))
    group = pw / n
    bar = max(1.0, min(24.0, group * 0.38))
    out = [_svg_open(width, height, "fraction of units kept per layer", "chart allocation-chart")]
    for frac in (0, 0.25, 0.5, 0.75, 1.0):
        y = top + ph * (1 - frac)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="{COLORS["grid"]}"/>'
                   f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{int(frac * 100)}%</text>')
    for i, L in enumerate(layers):
        x0 = left + i * group + (group - 2 * bar) / 2
        for j, kind in enumerate(("attention", "ffn")):
            k = _kept(L.get(kind))
            if k is None or not k[1]:
                continue
            frac = k[0] / k[1]
            h = ph * frac
            x = x0 + j * bar
            out.append(f'<rect class="bar {kind}" x="{x:.1f}" y="{top + ph - h:.1f}" width="{bar:.1f}" '
                       f'height="{h:.1f}" fill="{COLORS[kind]}"><title>layer {e(L["layer"])} {kind}: '
                       f'{k[0]}/{k[1]} {_unit_name(L[kind])} kept</title></rect>')
        if n <= 40 or i % max(1, n // 20) == 0:
            out.append(f'<text x="{left + (i + 0.5) * group:.1f}" y="{top + ph + 14}" font-size="11" '
                       f'text-anchor="middle">{e(L["layer"])}</text>')
    out.append(f'<text x="{left + pw / 2:.1f}" y="{height - 4}" font-size="12" text-anchor="middle">layer</text>')
    out.append(f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="{COLORS["axis"]}"/>')
    out.append(_legend([("attention (heads kept)", COLORS["attention"]),
                        ("FFN (neurons kept)", COLORS["ffn"])], left, 16))
    out.append("</svg>")
    return "".join(out)


def errors_svg(mods: list[dict], width: int = 900, height: int = 300) -> str:
    """Grouped bars on a log scale: each module's output error before/after reconstruction."""
    left, right, top, bottom = 56, 12, 28, 40
    pw, ph = width - left - right, height - top - bottom
    vals = [v for m in mods for v in _errors(m) if isinstance(v, (int, float)) and v > 0 and math.isfinite(v)]
    lo = math.floor(math.log10(min(vals))) if vals else -6
    hi = math.ceil(math.log10(max(vals))) if vals else 0
    if hi <= lo:
        hi = lo + 1
    span = hi - lo

    def y_of(v: float) -> float:
        return top + ph * (1 - (math.log10(v) - lo) / span)

    n = max(1, len(mods))
    group = pw / n
    bar = max(1.0, min(20.0, group * 0.38))
    out = [_svg_open(width, height, "output error per module before and after reconstruction",
                     "chart error-chart")]
    step = max(1, span // 8)
    for p in range(lo, hi + 1, step):
        y = y_of(10.0 ** p)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="{COLORS["grid"]}"/>'
                   f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">1e{p}</text>')
    for i, m in enumerate(mods):
        x0 = left + i * group + (group - 2 * bar) / 2
        for j, (label, v) in enumerate(zip(("before", "after"), _errors(m))):
            if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                continue
            y = y_of(v)
            out.append(f'<rect class="bar {label}" x="{x0 + j * bar:.1f}" y="{y:.1f}" width="{bar:.1f}" '
                       f'height="{top + ph - y:.1f}" fill="{COLORS[label]}"><title>{e(m.get("name"))} '
                       f'{label}: {v:.3e}</title></rect>')
        short = f'{m.get("layer", "?")}{"a" if m.get("kind") == "attention" else "f"}'
        if n <= 60 or i % max(1, n // 30) == 0:
            out.append(f'<text x="{left + (i + 0.5) * group:.1f}" y="{top + ph + 14}" font-size="10" '
                       f'text-anchor="middle">{e(short)}</text>')
    out.append(f'<text x="{left + pw / 2:.1f}" y="{height - 6}" font-size="12" text-anchor="middle">'
               f'module (layer; a = attention, f = FFN)</text>')
    out.append(f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="{COLORS["axis"]}"/>')
    out.append(_legend([("before reconstruction", COLORS["before"]),
                        ("after reconstruction", COLORS["after"])], left, 16))
    out.append("</svg>")
    return "".join(out)
