"""Regenerate BENCHMARKS.md (and its SVG plots) from benchmarks/results/*.json.

Every figure in BENCHMARKS.md comes from a JSON file that a benchmark script wrote; this script
only lays them out. Plots are plain SVG, written here, so no plotting library is needed.

    python benchmarks/report.py
"""

from __future__ import annotations

import json
import math
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ROOT = HERE.parent
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


# ---------------------------------------------------------------- SVG


def line_plot(path: Path, title: str, series: list[tuple[str, list[tuple[float, float]]]], *, x_label: str,
              y_label: str, log_x: bool = True, y_line: float | None = None) -> None:
    """Lines with markers; x on a log scale by default; an optional dashed horizontal target."""
    width, height, left, right, top, bottom = 640, 400, 64, 170, 36, 48
    points = [p for _, pts in series for p in pts]
    if not points:
        return
    fx = (lambda v: math.log10(max(v, 1e-9))) if log_x else (lambda v: v)
    xs, ys = [fx(x) for x, _ in points], [y for _, y in points] + ([y_line] if y_line is not None else [])
    x0, x1 = math.floor(min(xs)), math.ceil(max(xs)) if log_x else max(xs)
    if x1 == x0:
        x1 = x0 + 1
    y0, y1 = max(0.0, min(ys) - 0.02), min(1.0, max(ys) + 0.01) if max(ys) <= 1 else max(ys) * 1.05
    px = lambda v: left + (fx(v) - x0) / (x1 - x0) * (width - left - right)  # noqa: E731
    py = lambda v: top + (1 - (v - y0) / (y1 - y0)) * (height - top - bottom)  # noqa: E731
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2 - right / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>',
        f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="black"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="black"/>',
    ]
    ticks = range(int(x0), int(x1) + 1) if log_x else [x0 + i * (x1 - x0) / 5 for i in range(6)]
    for t in ticks:
        value = 10**t if log_x else t
        x = px(value)
        out.append(f'<line x1="{x}" y1="{height - bottom}" x2="{x}" y2="{top}" stroke="#ddd"/>')
        out.append(f'<text x="{x}" y="{height - bottom + 16}" text-anchor="middle">{value:g}</text>')
    for i in range(6):
        value = y0 + i * (y1 - y0) / 5
        y = py(value)
        out.append(f'<line x1="{left}" y1="{y}" x2="{width - right}" y2="{y}" stroke="#eee"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4}" text-anchor="end">{value:.3g}</text>')
    if y_line is not None:
        y = py(y_line)
        out.append(f'<line x1="{left}" y1="{y}" x2="{width - right}" y2="{y}" stroke="grey" stroke-dasharray="5,4"/>')
    for i, (name, pts) in enumerate(series):
        colour = COLOURS[i % len(COLOURS)]
        pts = sorted(pts)
        if len(pts) > 1:
            path_d = " ".join(f"{'M' if j == 0 else 'L'}{px(x):.1f},{py(y):.1f}" for j, (x, y) in enumerate(pts))
            out.append(f'<path d="{path_d}" fill="none" stroke="{colour}" stroke-width="2"/>')
        out += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3.5" fill="{colour}"/>' for x, y in pts]
        ly = top + 16 + i * 18
        out.append(f'<rect x="{width - right + 12}" y="{ly - 9}" width="12" height="12" fill="{colour}"/>')
        out.append(f'<text x="{width - right + 30}" y="{ly + 1}">{name}</text>')
    out.append(f'<text x="{(left + width - right) / 2}" y="{height - 10}" text-anchor="middle">{x_label}</text>')
    out.append(f'<text transform="translate(16,{(top + height - bottom) / 2}) rotate(-90)" text-anchor="middle">{y_label}</text>')
    out.append("</svg>")
    path.write_text("\n".join(out) + "\n")


# ---------------------------------------------------------------- sections


def table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_line(result: dict) -> str:
    m = result.get("machine", {})
    parts = [f"{m.get('cpus', '?')} CPUs", m.get("platform", ""), f"Python {m.get('python', '?')}"]
    parts += [f"{k} {m[k]}" for k in ("torch", "faiss") if m.get(k)]
    if m.get("cuda"):
        parts.append(f"GPU {m['cuda']}")
    return "Machine: " + ", ".join(p for p in parts if p) + "."


def embed_section(result: dict, name: str) -> list[str]:
    out = [f"## Embedding throughput (`benchmarks/embed_throughput.py{' --full' if name.endswith('full') else ''}`)", ""]
    out.append(f"Model {result.get('model')}, {result.get('images')} images, batch {result.get('batch_size')}, "
               f"device {result.get('device')}, {result.get('rounds')} alternating rounds. {machine_line(result)}")
    out.append("")
    rows = []
    for key, label in (
        ("bare_forward_images_per_s", "bare forward pass (preprocessed tensors, in-process)"),
        ("prism_index_loop_images_per_s", "`prism index`, embedding loop (read, decode, preprocess, encode, cache)"),
        ("prism_index_wall_images_per_s", "`prism index`, whole command (texts and index build included)"),
        ("clip_retrieval_loop_images_per_s", "`clip-retrieval inference`, its loop (stats json)"),
        ("clip_retrieval_wall_images_per_s", "`clip-retrieval inference`, whole command (images only)"),
        ("prism_index_loop_texts_per_s", "`prism index`, text loop (texts/s)"),
        ("clip_retrieval_text_loop_texts_per_s", "`clip-retrieval inference`, text loop (texts/s)"),
    ):
        if result.get(key) is not None:
            rows.append([label, f"{result[key]:.1f}"])
    out.append(table(["path", "images/s"], rows))
    out.append("")
    noise = result.get("noise_other_processes_cpu_cores")
    if noise:
        out.append("CPU cores other processes used during each round (of 2; well above 0 slows a run down): "
                   + "; ".join(f"{k} {', '.join(str(v) for v in vals)}" for k, vals in noise.items()) + ".")
        out.append("")
    ratios = [
        [label, result[key], result.get(f"target_{key}", "")]
        for key, label in (
            ("ratio_prism_over_clip_retrieval", "Prism / clip-retrieval, embedding loops"),
            ("ratio_prism_over_clip_retrieval_wall_images_only", "Prism / clip-retrieval, whole commands"),
            ("ratio_prism_text_loop_over_clip_retrieval", "Prism / clip-retrieval, text loops"),
            ("ratio_end_to_end_over_bare", "Prism loop / bare forward"),
        )
        if result.get(key) is not None
    ]
    if ratios:
        out.append(table(["ratio", "measured", "target"], ratios))
        out.append("")
    return out


def ann_section(result: dict, name: str) -> list[str]:
    out = [f"## ANN at scale (`benchmarks/ann_scale.py{' --full' if name.endswith('full') else ''}`)", ""]
    out.append(f"recall@{result['k']} against exact search; each index at the cheapest setting reaching "
               f"{result['recall_target']} (or its best). Batch-1 searches run on one thread for every index. "
               f"{machine_line(result)}")
    out.append("")
    for dataset, data in result["datasets"].items():
        shape = data.get("shape", {})
        out.append(f"### {dataset}: {data['vectors']:,} x {data['dim']}, {data['queries']} queries")
        if dataset.startswith("demo"):
            out.append("")
            out.append("Real demo-model vectors: the catalog's image vectors, queried by held-out title (text) vectors. "
                       "Prism is forced onto its IVF-PQ path here; at this size it serves exact Flat by default.")
        if shape:
            out.append("")
            out.append(f"Shape: mean pairwise cosine {shape.get('mean_pairwise_cosine')}, effective dimensionality "
                       f"{shape.get('effective_dim')}, top-10 components {shape.get('top10_variance_share')} of the variance.")
        out.append("")
        rows = []
        for row in data["rows"]:
            if "error" in row:
                rows.append([row["index"], "failed: " + row["error"][:80].replace("|", "/").replace("\n", " ")] + [""] * 8)
                continue
            rows.append([
                row["index"], f"`{row['factory']}`", row.get("param", ""), f"{row['recall_at_10']:.3f}",
                f"{row['qps_b1']:.0f}", f"{row['qps_b1_over_flat']:.1f}x", f"{row['qps_b64']:.0f}",
                f"{row['bytes'] / 1e6:.0f}", f"{row['bytes_over_flat']:.3f}", f"{row['build_s']:.1f}",
            ])
        out.append(table(["index", "factory", "setting", "recall@10", "q/s b1", "vs Flat", "q/s b64", "MB", "vs Flat", "build s"], rows))
        out.append("")
        autofaiss = next((r for r in data["rows"] if r["index"] == "autofaiss" and r.get("choice_under_prism_budget")), None)
        if autofaiss:
            out.append(f"Under Prism's memory budget (a quarter of Flat) autofaiss would pick "
                       f"`{autofaiss['choice_under_prism_budget']}`; the row above is its default choice.")
            out.append("")
        series = [(r["index"], [(p["qps_b1"], p["recall_at_10"]) for p in r.get("curve", [])])
                  for r in data["rows"] if r.get("curve")]
        flat = next((r for r in data["rows"] if r["index"].startswith("Flat")), None)
        if flat:
            series.append(("Flat", [(flat["qps_b1"], flat["recall_at_10"])]))
        if series:
            svg = RESULTS / f"{name}_{dataset}_recall_qps.svg"
            line_plot(svg, f"{dataset}: recall@10 vs queries/s (batch 1)", series, x_label="queries/s, batch 1 (log)",
                      y_label="recall@10", y_line=result["recall_target"])
            out.append(f"![recall vs QPS]({svg.relative_to(ROOT)})")
            out.append("")
    return out


def batching_section(result: dict) -> list[str]:
    out = ["## Query micro-batching over HTTP (`benchmarks/query_batching.py`)", ""]
    out.append(f"`prism serve` with batching on and off (two processes), text queries (catalog titles) from a closed-loop "
               f"generator on loopback; {result['rounds']} rounds x {result['seconds_per_level_per_round']:.0f} s per "
               f"level, the two modes alternating. {machine_line(result)}")
    out.append("")
    for name, setup in result["setups"].items():
        out.append(f"### {name} ({Path(setup['home']).name})")  # not the path: it is the benchmark machine's
        out.append("")
        rows = []
        for c, on in setup["batching_on"].items():
            off = setup["batching_off"][c]
            rows.append([c, f"{on['qps']:.1f}", f"{off['qps']:.1f}", f"{setup['qps_ratio_on_over_off'][c]:.2f}x",
                         f"{on['p50_ms']:.1f} / {on['p95_ms']:.1f} / {on['p99_ms']:.1f}",
                         f"{off['p50_ms']:.1f} / {off['p95_ms']:.1f} / {off['p99_ms']:.1f}", on["errors"] + off["errors"]])
        out.append(table(["clients", "q/s on", "q/s off", "on/off", "p50/p95/p99 ms on", "p50/p95/p99 ms off", "errors"], rows))
        out.append("")
        if setup.get("queries", "text") == "image":
            # Uploads (POST /v1/search/image, multipart) of the home's product images.
            out.append(f"Target: image-upload q/s at 32 clients on/off >= 1.5 (measured "
                       f"{setup['qps_ratio_on_over_off'].get('32', float('nan')):.2f}x).")
            out.append("")
            continue
        out.append(f"Targets: q/s at 32 clients on/off >= 2 (measured {setup['qps_ratio_on_over_off']['32']:.2f}x); "
                   f"lone-query p50 on/off <= 1.1 (measured {setup['p50_ratio_on_over_off']['1']:.2f}x).")
        out.append("")
        svg = RESULTS / f"query_batching_{name}_qps.svg"
        line_plot(svg, f"{name}: HTTP text queries/s by concurrency", [
            ("batching on", [(int(c), v["qps"]) for c, v in setup["batching_on"].items()]),
            ("batching off", [(int(c), v["qps"]) for c, v in setup["batching_off"].items()]),
        ], x_label="concurrent clients (log)", y_label="queries/s")
        out.append(f"![QPS by concurrency]({svg.relative_to(ROOT)})")
        out.append("")
    return out


def latency_section(result: dict) -> list[str]:
    out = ["## One text query over HTTP vs encode + ANN alone (`benchmarks/serve_latency.py`)", ""]
    out.append(f"Model {result['model']}, {result['products']} products, index `{result['index']}`. {machine_line(result)}")
    out.append("")
    rows = [[label, result[key]["p50_ms"], result[key]["p90_ms"], result[key]["p99_ms"]]
            for key, label in (("http_text_query", "HTTP, client side"), ("server_took_ms", "server took_ms"),
                               ("encode_plus_ann", "encode + ANN in-process"),
                               ("http_cache_hit", "HTTP, repeated query (cache hit)")) if key in result]
    out.append(table(["path", "p50 ms", "p90 ms", "p99 ms"], rows))
    out.append("")
    out.append(f"HTTP / (encode + ANN) at p50: {result['ratio_p50_http_over_encode_ann']}x (target <= 1.2)"
               + (f"; cache-hit HTTP p50 {result['http_cache_hit']['p50_ms']} ms (target <= 3 ms)" if "http_cache_hit" in result else "")
               + ". Server stage p50 (ms): " + ", ".join(f"{k} {v}" for k, v in result.get("stage_p50_ms", {}).items()))
    out.append("")
    return out


def precision_section(result: dict) -> list[str]:
    out = ["## Encoder precision: text encoder at batch 1 (`benchmarks/encoder_precision.py`)", ""]
    bf16 = result["bf16"]
    out.append(f"{machine_line(result)} torch threads {result['machine'].get('threads', '?')}. bf16: "
               f"{'supported' if bf16['supported'] else 'unsupported on this CPU'} ({bf16['why']}). Top-10 overlap: "
               "each query's top 10 over a gallery of demo titles, gallery and query embedded at that precision, "
               "against fp32.")
    out.append("")
    rows = []
    for m in result["models"]:
        for p, row in m["precisions"].items():
            if row.get("unsupported"):
                rows.append([m["model"], p, "unsupported on this CPU", "", "", "", ""])
                continue
            rows.append([m["model"], p, row["qps_batch1"], row["p50_ms"], f"{row['speedup_vs_fp32']}x",
                         row["top10_overlap_vs_fp32"], row["cosine_vs_fp32_min"]])
    out.append(table(["model", "precision", "q/s", "p50 ms", "vs fp32", "top-10 overlap", "cosine min"], rows))
    out.append("")
    images = [[m["model"], p, row["images_per_s_batch1"], f"{row['speedup_vs_fp32']}x", row["cosine_vs_fp32_min"]]
              for m in result["models"] for p, row in m.get("image_tower", {}).items()]
    if images:
        out.append("Image tower, one image per call:")
        out.append("")
        out.append(table(["model", "precision", "images/s", "vs fp32", "cosine min"], images))
        out.append("")
    return out


def fast_path_section() -> list[str]:
    """Issue 20's targets, each next to its figure and the results file it comes from: the runs
    that measured them are several (ViT-B-32 and the trained demo model, before/after pairs)."""
    rows = []

    def row(target, measured, verdict, name):
        rows.append([target, measured, verdict, f"`{name}.json`"])

    def met(ok: bool) -> str:
        return "met" if ok else "**miss**"

    for name, label in (("serve_latency", "ViT-B-32"), ("serve_latency_demo_trained300", "demo model")):
        if (r := load(name)) is not None:
            ratio = r["ratio_p50_http_over_encode_ann"]
            row(f"HTTP text p50 / (encode + ANN) <= 1.2, {label}", f"{ratio}x", met(ratio <= 1.2), name)
            if "http_cache_hit" in r:
                hit = r["http_cache_hit"]["p50_ms"]
                row(f"cache-hit HTTP p50 <= 3 ms, {label}", f"{hit} ms", met(hit <= 3), name)
    if (r := load("encoder_precision")) is not None:
        for m in r["models"]:
            int8 = m["precisions"].get("int8", {})
            if "speedup_vs_fp32" in int8:
                ok = int8["speedup_vs_fp32"] >= 2 and int8["top10_overlap_vs_fp32"] >= 0.95
                row(f"int8 text encoder batch 1 >= 2x fp32 and top-10 overlap >= 0.95, {m['model']}",
                    f"{int8['speedup_vs_fp32']}x, overlap {int8['top10_overlap_vs_fp32']}", met(ok), "encoder_precision")
    if (r := load("int8_variants")) is not None:
        best = max((v for k, v in r["variants"].items() if k != "fp32"),
                   key=lambda v: v["top10_overlap_vs_fp32_on_fp32_gallery"])
        row("int8: the best-overlap variant of the demo encoder (which Linear layers, smoothing; queries at int8, fp32 gallery)",
            f"{best['speedup_vs_fp32']}x, overlap {best['top10_overlap_vs_fp32_on_fp32_gallery']}",
            met(best["speedup_vs_fp32"] >= 2 and best["top10_overlap_vs_fp32_on_fp32_gallery"] >= 0.95), "int8_variants")
    if (r := load("encoder_precision_demo_trained1500")) is not None:
        int8 = r["models"][0]["precisions"]["int8"]
        ok = int8["speedup_vs_fp32"] >= 2 and int8["top10_overlap_vs_fp32"] >= 0.95
        row(f"int8 text encoder batch 1 >= 2x fp32 and top-10 overlap >= 0.95, trained demo ({r['models'][0]['queries']} queries)",
            f"{int8['speedup_vs_fp32']}x, overlap {int8['top10_overlap_vs_fp32']}", met(ok), "encoder_precision_demo_trained1500")
        held = r["models"][0]["held_out"]
        for precision in ("int8", "bf16"):
            points = held[precision]["text_to_image_recall_at_10_points_vs_fp32"]
            row(f"demo held-out recall@10 within 1 point of fp32, {precision} ({held[precision]['queries']} queries)",
                f"{held[precision]['text_to_image_recall_at_10']} vs {held['fp32']['text_to_image_recall_at_10']} "
                f"({points:+} points)", met(points >= -1), "encoder_precision_demo_trained1500")
    # Rows measured on code that later changed: shown for the record, judged by the newer rows.
    superseded = {("query_batching", "demo"): "measured before per-request work left the request path",
                  ("query_batching_tiny_swaps_zipf", "swaps"): "code before the swap fix 05edd67"}
    for name in ("query_batching", "query_batching_demo_trained300", "query_batching_tiny_swaps_zipf",
                 "query_batching_demo_swaps_before_after", "query_batching_vit_swaps_before_after"):
        if (r := load(name)) is None:
            continue
        for setup_name, setup in r.get("setups", {}).items():
            if (why := superseded.get((name, setup_name))) is not None:
                row(f"micro-batching at 32 clients, {setup_name} ({why})",
                    f"{setup['qps_ratio_on_over_off'].get('32')}x", "superseded", name)
                continue
            ratio = setup["qps_ratio_on_over_off"].get("32")
            if ratio is None:
                continue
            image = setup.get("queries") == "image"
            bar = 1.5 if image else 2.0
            kind = "image uploads" if image else "text"
            row(f"micro-batching at 32 clients >= {bar}x, {kind}, {setup_name}", f"{ratio}x", met(ratio >= bar), name)
        for setup_name, zipf in r.get("zipf", {}).items():
            on, off = zipf["caches_on"]["32"], zipf["caches_off"]["32"]
            row(f"Zipf(1.0) stream, 32 clients, caches on / off, {setup_name} (reported)",
                f"{on['qps']} / {off['qps']} q/s, p50 {on['p50_ms']} / {off['p50_ms']} ms, p99 {on['p99_ms']} / {off['p99_ms']} ms",
                "reported", name)
        for setup_name, swaps in r.get("swaps", {}).items():
            ratio, failures = swaps["p99_ratio_swaps_over_steady"], swaps["failures"]
            if (why := superseded.get((name, "swaps"))) is not None:
                row(f"{swaps['activations']} activations under {swaps['clients']} clients, {setup_name} ({why})",
                    f"{ratio}x, {failures} failures", "superseded", name)
                continue
            row(f"{swaps['activations']} activations under {swaps['clients']} clients: p99 <= 1.5x steady, 0 failures, "
                f"{setup_name} ({swaps.get('code', 'this tree')})", f"{ratio}x, {failures} failures",
                met(ratio <= 1.5 and failures == 0), name)
        for setup_name, runs in r.get("swap_comparison", {}).items():
            for run in runs:
                code = "before (86960aa)" if run.get("code") != "this tree" else "after"
                row(f"swaps side by side, {setup_name}, {code}", f"{run['p99_ratio_swaps_over_steady']}x, "
                    f"{run['failures']} failures", "side by side", name)
    if not rows:
        return []
    out = ["## The fast query path: targets and figures (`serve_latency.py`, `encoder_precision.py`, "
           "`int8_variants.py`, `query_batching.py`)", ""]
    out.append("Each figure comes from the results file named beside it, whose notes give the command, the host's "
               "load and the home it ran on. Ratios are side by side within one run; absolute times are not "
               "comparable across rows.")
    out.append("")
    out.append(table(["target", "measured", "verdict", "results"], rows))
    out.append("")
    return out


def commerce_section(evals: dict[str, dict], facets: dict | None) -> list[str]:
    out = ["## Commerce retrieval (`benchmarks/commerce_eval.py`, `benchmarks/commerce_facets.py`)", ""]
    rows = []
    for name, r in evals.items():
        if "identifier_rank1" in r:
            ids = r["identifier_rank1"]
            rows.append([f"{r['database']}: exact identifier at rank 1 ({r['products']} queries, {r['model']})",
                         " / ".join(f"{t} {v}" for t, v in ids.items()), "1.0 every target"])
            rows.append([f"{r['database']}: one-edit title words, hybrid hit@10 over correctly typed",
                         f"{r['typo']['ratio']} ({r['typo']['hit@10_one_edit']} / {r['typo']['hit@10_clean']})", ">= 0.9"])
        elif "views_per_product" in r:
            rows.append([f"{r['database']}: query by a non-primary image, hit@1 ({r['products']} OpenMoji products x "
                         f"{r['views_per_product']} views, {r['model']})",
                         f"{r['non_primary_hit@1']} vs primary {r['primary_hit@1']}", ">= primary"])
        elif "targets" in r:
            for target, t in r["targets"].items():
                rows.append([f"titles as queries, {r['queries']} of {r['products']} demo products ({name}), {target}",
                             f"hit@1 {t['hit@1']}, {t['ms_per_query']} ms a query", ">= 0.95 (hybrid)"])
    if facets is not None:
        for kind, f in facets.get("facets", {}).items():
            rows.append([f"facets, {kind} filter (~{f['matching_products_p50']} of {f['products']:,} match)",
                         f"p50 {f['p50_ms_with_facets']} vs {f['p50_ms_without_facets']} ms: {f['ratio_p50']}x",
                         f"<= {f['target_ratio']}x"])
        for key, pt in facets.items():
            if key.startswith("patch"):
                rows.append([f"PATCH of a price, {pt['database']} (server side; embeddings {pt['embeddings_computed']}, "
                             f"visible next search {pt['visible_in_next_search']})",
                             f"p50 {pt['p50_ms']} ms (load {pt['load_average_1m']})", f"<= {pt['target_p50_ms']} ms"])
    side_by_side = RESULTS / "commerce_patch_before_after.json"
    if side_by_side.exists():
        ab = json.loads(side_by_side.read_text())
        trips = ab["round_trips_per_patch_postgresql"]
        rows.append(["PATCH of a price, round trips to PostgreSQL (before -> after this code)",
                     f"{trips['before']} -> {trips['after']}", "-"])
        for kind in ("postgresql", "sqlite"):
            m = ab[kind]["median_of_p50_ms"]
            rows.append([f"PATCH of a price, {kind}, old and new code run alternately (median of "
                         f"{len(ab[kind]['rounds'])} p50s)", f"{m['before']} -> {m['after']} ms", f"<= {ab['target_p50_ms']} ms"])
    out.append("Measured on a host shared with other jobs (load average ~9 on 2 cores): ratios hold, absolute "
               "milliseconds are inflated.")
    out.append("")
    out.append(table(["check", "measured", "target"], rows))
    out.append("")
    return out


def scale_section(result: dict) -> list[str]:
    out = ["## Millions of products on one machine (`benchmarks/scale.py`, `make bench-scale`)", ""]
    out.append("`prism index CATALOG --vectors VECTORS --model ViT-B-32:random` on synthetic CLIP-shaped vectors "
               "(float16 Parquet, image vectors only), then the version served as `prism serve` loads it. Recall "
               "against the exact top-10 of 1,000 queries; q/s: the ANN search alone, batch 1, one thread; "
               f"p50: `similar_to` searches through the engine (sync, filter, ANN, metadata). {machine_line(result)}")
    out.append("")
    rows = []
    for r in result["sizes"]:
        index, serve, again = r.get("index", {}), r.get("serve", {}), r.get("rerun_1pct")
        float_bytes = serve.get("float32_bytes") or r["n"] * 512 * 4
        rows.append([
            f"{r['n']:,}", f"{r['generate']['vectors_bytes'] / 1e9:.1f} GB",
            f"{index['seconds']:.0f}" if index else "-", f"{index['peak_rss_mb'] / 1024:.2f}" if index else "-",
            f"{serve['serving_rss_mb'] / 1024:.2f} ({serve['serving_rss_mb'] * 2**20 / float_bytes:.3f})" if serve else "-",
            f"{serve['index_bytes_on_disk'] / float_bytes:.3f}" if serve else "-",
            serve.get("ann", {}).get("factory", "-") + (f" + {serve['ann']['rerank_store']}" if serve else ""),
            serve.get("recall_at_10", "-"), serve.get("batch1_qps_single_thread", "-"),
            serve.get("p50_ms_unfiltered", "-"), serve.get("p50_ms_category_10pct", "-"),
            f"{serve['p50_ms_after_delete']} ({serve['deleted']:,} deleted)" if serve else "-",
            f"{again['new_vectors']:,} new of {again['changed']:,} changed, {again['seconds']:.0f} s" if again else "not run",
        ])
    out.append(table(["products", "vectors file", "index s", "index peak RSS GB", "serving RSS GB (x float32)",
                      "index files (x float32)", "ANN", "recall@10", "q/s batch-1", "p50 ms", "p50 ms, 10% filter",
                      "p50 ms after deletes", "re-run, 1% changed"], rows))
    out.append("")
    for r in result["sizes"]:
        if r.get("note"):
            out += [f"{r['n']:,} products: {r['note']}", ""]
        memory = r.get("serve", {}).get("memory_breakdown")
        if memory:
            arrays = ", ".join(f"{name.replace('_', ' ')} {mb / 1024:.2f}" for name, mb in memory["index_arrays_mb"].items())
            added = memory["rss_added_mb"]
            out += [f"{r['n']:,} products, where the serving memory goes (GB): {arrays}; resident after the queries: "
                    f"{added['anonymous'] / 1024:.2f} private + {added['file_backed'] / 1024:.2f} memory-mapped re-rank "
                    "pages (page cache: shared between versions and processes, dropped under pressure).", ""]
    for r in result["sizes"]:
        sweep = r.get("serve", {}).get("sweep_same_index")
        if sweep:
            out.append(f"{r['n']:,} products, nprobe x re-rank depth on the same index ({sweep['note']}):")
            out.append("")
            out.append(table(["nprobe", "re-rank x", "recall@10", "q/s batch-1"],
                             [[p["nprobe"], p["rerank_factor"], p["recall_at_10"], p["qps_batch1"]] for p in sweep["points"]]))
            out.append("")
    return out


def query_cost_section(results: dict[str, dict]) -> list[str]:
    out = ["## One batch-1 ANN query, step by step (`benchmarks/ann_query_cost.py`)", ""]
    out.append("The served search (`AnnIndex.search`, k=10, one thread) and its steps, beside the re-rank of index "
               "format 3, which decoded each candidate's IVF-PQ reconstruction from the fast-scan blocks where "
               "format 4 reads q.b off the scan's distance with a stored norm. Medians over the queries; each "
               "query runs every way back to back. " + machine_line(next(iter(results.values()))))
    out.append("")
    rows = []
    for name, r in results.items():
        steps = r["steps_us_p50"]
        rows.append([
            f"{r['ntotal']:,}", f"{r['factory']} + {r['rerank_store']}", r["nprobe"], r["candidates"],
            steps["scan"], steps["re-rank decode"], steps["score"], steps["base decode"],
            f"{r['qps_batch1']:.0f} ({r.get('recall_at_10', '-')})",
            f"{r['decode_rerank_qps_batch1']:.0f} ({r.get('decode_rerank_recall_at_10', '-')})",
            f"{r['qps_batch1'] / r['decode_rerank_qps_batch1']:.2f}x", f"`{name}.json`",
        ])
    out.append(table(["vectors", "ANN", "nprobe", "candidates", "scan us", "re-rank decode us", "score us",
                      "base decode us (format 3 only)", "q/s (recall@10)", "format-3 re-rank q/s (recall@10)",
                      "q/s ratio", "results"], rows))
    out.append("")
    return out


def add_search_section(result: dict) -> list[str]:
    out = ["## Adds into an HNSW coarse quantizer (`benchmarks/ann_add_search.py`)", ""]
    fixed = result["fixed"]
    out.append(f"{result['n']:,} x {result['dim']} CLIP-shaped vectors, `{result['factory']}`: each setting of "
               "`AnnConfig.add_ef_search` (how widely an add walks the graph over the centroids for each vector's "
               f"list) builds the whole index. Recall@10 on {result['held_out']} held-out queries, at one fixed "
               f"setting for all (nprobe {fixed['nprobe']}, re-rank x{fixed['rerank_factor']}: what the list "
               "assignment costs) and at the tuner's choice (what a user gets). " + machine_line(result))
    out.append("")
    rows = [[r["add_ef_search"], f"{r['add_s']:.0f}", f"{r['build_s']:.0f}", f"{r['recall_fixed']:.4f}",
             f"nprobe {r['tuned_nprobe']} x{r['tuned_rerank_factor']}", f"{r['tuned_recall_held_out']:.4f}",
             f"{r['tuned_qps_b1']:.0f}"] for r in result["rows"]]
    out.append(table(["add efSearch", "add s", "build s", f"recall@10 at nprobe {fixed['nprobe']}", "tuned",
                      "recall@10 tuned", "q/s b1 tuned"], rows))
    out.append("")
    return out


def rerank_precision_section(result: dict) -> list[str]:
    out = ["## What limits IVF-PQ at 1M: candidates or re-rank precision (`benchmarks/rerank_precision.py`)", ""]
    shares = result["bytes_vs_float32"]
    out.append(f"{result['n']:,} x {result['dim']} CLIP-shaped vectors, `{result['factory']}` (tuned: nprobe "
               f"{result['tuned']['nprobe']} x{result['tuned']['rerank_factor']}). The same "
               f"{result['rerank_factor'] * 10} fast-scan candidates per held-out query ranked by the float vectors "
               "(`exact`: what the candidates hold) and by each re-rank code (its index bytes as a share of "
               "float32 in the header). " + machine_line(result))
    out.append("")
    names = list(shares)
    rows = [[r["nprobe"], f"{r['scan_us']:.0f}", f"{r['exact']:.4f}", *(f"{r[name]:.4f}" for name in names)]
            for r in result["rows"]]
    out.append(table(["nprobe", "scan us (b1)", "exact", *(f"{name} ({shares[name]:.3f}x)" for name in names)], rows))
    out.append("")
    if "settings" in result:
        out.append("Each re-rank setting `PRISM_RERANK_COMPACT_FROM` offers, built and tuned on the same queries, "
                   "measured at its tuned point on the held-out queries (q/s: median of alternating rounds):")
        out.append("")
        out.append(table(["re-rank", "bytes vs float32", "tuned", "recall@10", "q/s b1"],
                         [[name, f"{r['bytes_vs_float32']:.3f}", f"nprobe {r['nprobe']} x{r['rerank_factor']}",
                           f"{r['recall_at_10']:.4f}", f"{r['qps_b1']:.0f}"] for name, r in result["settings"].items()]))
        out.append("")
    return out


def ray_section(result: dict) -> list[str]:
    out = ["## Embedding on a Ray cluster (`benchmarks/ray_scale.py`, `make bench-ray`)", ""]
    out.append(f"`prism index CATALOG --model {result['model']} --json` on {result['products']:,} products (one image and "
               "one text each), a fresh home each run: locally with `PRISM_THREADS=2`, and with `--ray` on a "
               "`ray.cluster_utils.Cluster` on this machine (a head node of 0 CPUs, worker nodes of 1 CPU: one model "
               "replica each; a fresh cluster per run). images/s: images embedded / wall seconds of the whole command; "
               "embed stage: `CatalogIndexer.embed` alone (on Ray with the actors' start and model loads). "
               f"{machine_line(result)}")
    out.append("")
    if result.get("note"):
        out.append(f"Note: {result['note']}.")
        out.append("")
    labels = {"local": "local, `PRISM_THREADS=2`", "ray_1_node": "Ray, 1 worker node", "ray_2_nodes": "Ray, 2 worker nodes"}
    rows = [[labels.get(name, name), c["wall_s"], c["images_per_s"], c["embed_s"], c["embed_images_per_s"],
             c.get("own_cpu_cores", "-"), c.get("images_per_cpu_s", "-"), c["other_processes_cpu_cores"]]
            for name, c in result["configs"].items()]
    out.append(table(["run", "wall s", "images/s", "embed stage s", "embed-stage images/s", "CPU cores it got",
                      "images per CPU-second", "other processes' CPU cores"], rows))
    out.append("")
    out.append(table(["ratio", "whole command", "embed stage", "per CPU-second", "target (whole command)"], [
        ["Ray 2 nodes / 1 node", result["ratio_2_nodes_over_1_node"], result["ratio_2_nodes_over_1_node_embed_stage"],
         result.get("ratio_2_nodes_over_1_node_per_cpu_s", "-"), f">= {result['target_ratio_2_nodes_over_1_node']}"],
        ["Ray 2 nodes / local", result["ratio_ray_2_nodes_over_local"], result["ratio_ray_2_nodes_over_local_embed_stage"],
         result.get("ratio_ray_2_nodes_over_local_per_cpu_s", "-"), f">= {result['target_ratio_ray_2_nodes_over_local']}"],
    ]))
    out.append("")
    kill = result.get("kill")
    if kill:
        when = f"at {kill['killed']['after_s']} s" if kill.get("killed") else "(no busy actor was seen: not killed)"
        out.append(f"Kill run (2 worker nodes, an embed actor SIGKILLed while it held a batch, {when}): "
                   f"{kill['vectors_lost']} vectors lost, {kill['duplicated_keys']} duplicated "
                   f"({kill['cache_keys']} cache keys for {kill['expected_keys']} expected; must be 0 and 0), "
                   f"{kill['wall_s']} s.")
        out.append("")
    return out


def population_table(result: dict) -> list[str]:
    """Per shopper population, MRR@10 before the first night and after the last."""
    out = ["| population | queries | n | MRR@10 before | after | relative |", "| --- | --- | --- | --- | --- | --- |"]
    for name in result["populations"]:
        for key, label in (("seen", "seen (sent before the retrain)"), ("unseen", "never sent before")):
            r = result[name][key]
            lift = "" if r.get("mrr_relative_lift") is None else f"{r['mrr_relative_lift']:+.1%}"
            out.append(f"| {name} | {label} | {r['queries']} | {r['mrr_before']:.4f} | {r['mrr_after']:.4f} | {lift} |")
    recall = result.get("catalog_title_recall@1") or {}
    if recall:
        out.append(f"| catalog (`prism eval`) | title->image recall@1 | | {recall['before']:.4f} | {recall['after']:.4f} | "
                   f"{recall['after'] - recall['before']:+.4f} abs |")
    out += ["", "| night | searches | clicks | pairs mined | decision | later-click MRR lift (95% CI, queries) | retrain s |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for n, night in enumerate(result.get("nights", []), start=1):
        traffic = night.get("traffic", {}).values()
        lift = (night.get("gate") or {}).get("lift") or {}
        judged = (f"{lift['lift']:+.4f} [{lift['ci_low']:+.4f}, {lift['ci_high']:+.4f}], {lift['queries']}"
                  if lift else "")
        out.append(f"| {n} | {sum(t.get('searches', 0) for t in traffic)} | {sum(t.get('clicks', 0) for t in traffic)} | "
                   f"{(night.get('mining') or {}).get('pairs', '')} | {night['decision']} | {judged} | "
                   f"{night['retrain_seconds']:.0f} |")
    return out + [""]


def feedback_section(result: dict) -> list[str]:
    out = ["## Learning from clicks (`benchmarks/feedback_lift.py`, `make bench-feedback`)", ""]
    out.append("Simulated shoppers, then `prism retrain`; see docs/feedback.md for the click model. "
               "Not part of `make bench` (it needs the trained demo model and a retrain per night).")
    out.append("")
    if result.get("populations"):
        out += population_table(result)
    elif "before" in result:
        out += single_population_table(result)
    settings = result.get("settings", {})
    shown = {k: settings[k] for k in ("shoppers", "nights", "train_queries", "eval_queries", "demo_limit", "demo_epochs",
                                      "retrain_epochs", "min_clicks", "zipf_s", "page_size", "seed")
             if settings.get(k) is not None}
    if shown:
        out += [f"Settings: {', '.join(f'{k} {v}' for k, v in shown.items())}.", ""]
    return out


def single_population_table(result: dict) -> list[str]:
    """The catalog-vocabulary shoppers of runs before populations existed: MRR@10 and recall@10 on
    later queries, all and never sent before, with the serving model and after the retrain."""
    retrain = result.get("retrain", {})
    out = ["| later queries | n | MRR@10 before | after | recall@10 before | after |",
           "| --- | --- | --- | --- | --- | --- |"]
    for key, label in (("future", "all"), ("unseen", "never sent before")):
        b, a = result["before"][key], result["after"][key]
        out.append(f"| {label} | {b['queries']} | {b['mrr@10']:.4f} | {a['mrr@10']:.4f} | {b['recall@10']:.4f} | "
                   f"{a['recall@10']:.4f} |")
    out.append("")
    lift = result.get("relative_lift", {})
    if lift:
        out.append(f"Relative MRR@10 lift: later queries {lift.get('future_mrr@10', 0):+.1%}, never sent before "
                   f"{lift.get('unseen_mrr@10', 0):+.1%}. Retrain: {retrain.get('decision', '?')} in "
                   f"{retrain.get('seconds', 0):.0f} s ({result.get('traffic', {}).get('searches', '?')} searches).")
        out.append("")
    return out


def canary_section(result: dict) -> list[str]:
    out = ["## Interleaved canary (`benchmarks/canary_sim.py`)", "",
           "Seeded simulations of shoppers whose clicks follow a known relevance, through Prism's own "
           "team-draft interleaving and decision rule (docs/feedback.md).", "",
           "| scenario | promoted | stopped | undecided | median sessions to a decision |",
           "| --- | --- | --- | --- | --- |"]
    scenarios = result["scenarios"]
    items = scenarios.items() if isinstance(scenarios, dict) else ((s.get("name", "?"), s) for s in scenarios)
    for name, s in items:
        median = s.get("median_sessions_to_decision")
        out.append(f"| {name} | {s['promoted']} | {s['stopped']} | {s['undecided']} | {'-' if median is None else median} |")
    config, targets = result.get("config", {}), result.get("targets", {})
    out += ["", f"{config.get('seeds', '?')} seeds, at most {config.get('sessions', '?')} sessions each; targets: "
            f"the better model promoted in >= {targets.get('better_promoted_target', 0.95):.0%} "
            f"(measured {targets.get('better_promoted_share', 0):.0%}), a worse one never "
            f"(measured {targets.get('worse_promoted', '?')}).", ""]
    return out


def adapter_section(result: dict) -> list[str]:
    out = ["## LoRA adapters against a full fine-tune (`benchmarks/adapter_retrain.py`)", "",
           "| variant | decision | steps | train s | whole run s | image tower per step | later MRR serving -> candidate "
           "| catalog recall@1 | candidate on disk MB |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, v in result["variants"].items():
        before, after = v["later_mrr"]
        recall = v.get("catalog_recall@1") or [None, None]
        image = {True: "cached once", False: "runs"}.get(v.get("image_features_cached"), "?")
        size = f"{v['candidate_bytes'] / 1e6:.1f}" if v.get("candidate_bytes") else "-"
        recall_s = f"{recall[0]:.3f} -> {recall[1]:.3f}" if None not in recall else "-"
        out.append(f"| {name} | {v['decision']} | {v.get('steps', '?')} | {v['train_seconds']:.0f} | {v['run_seconds']:.0f} | "
                   f"{image} | {before:.3f} -> {after:.3f} | {recall_s} | {size} |")
    out += ["", f"{result.get('epochs', '?')} epochs on {result.get('traffic', {}).get('searches', '?')} searches "
            "(shoppers typing each product's Chinese name, which the indexed text lacks), one run, variants one "
            "after another on copies of one home; the host is shared, so compare within the table.", ""]
    return out


def main() -> None:
    parts = [
        "# Benchmarks",
        "",
        "Generated by `benchmarks/report.py` from `benchmarks/results/*.json`; `make bench` reruns everything at",
        "reduced sizes (~25 minutes on 2 cores), `make bench-full` at the issue's sizes. Every ratio is measured",
        "side by side in one run (alternating rounds where it matters): the host is shared and noisy, so",
        "absolute figures move between runs while ratios hold. Do not edit by hand.",
        "",
    ]
    for name in ("embed_throughput_full", "embed_throughput"):
        if (r := load(name)) is not None:
            parts += embed_section(r, name)
    for name in ("ann_scale_full", "ann_scale"):
        if (r := load(name)) is not None:
            parts += ann_section(r, name)
    if (r := load("scale")) is not None:
        parts += scale_section(r)
    costs = {p.stem: json.loads(p.read_text()) for p in sorted(RESULTS.glob("ann_query_cost*.json"))}
    if costs:
        parts += query_cost_section(costs)
    if (r := load("ann_add_search")) is not None:
        parts += add_search_section(r)
    if (r := load("rerank_precision")) is not None:
        parts += rerank_precision_section(r)
    if (r := load("ray_scale")) is not None:
        parts += ray_section(r)
    if (r := load("query_batching")) is not None:
        parts += batching_section(r)
    if (r := load("serve_latency")) is not None:
        parts += latency_section(r)
    if (r := load("encoder_precision")) is not None:
        parts += precision_section(r)
    parts += fast_path_section()
    evals = {p.stem.removeprefix("commerce_eval_"): json.loads(p.read_text())
             for p in sorted(RESULTS.glob("commerce_eval_*.json"))}
    if evals or load("commerce_facets") is not None:
        parts += commerce_section(evals, load("commerce_facets"))
    if (r := load("feedback_lift")) is not None:
        parts += feedback_section(r)
    if (r := load("adapter_retrain")) is not None:
        parts += adapter_section(r)
    if (r := load("canary_sim")) is not None:
        parts += canary_section(r)
    (ROOT / "BENCHMARKS.md").write_text("\n".join(parts))
    print(f"wrote {ROOT / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()
