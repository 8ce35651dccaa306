"""Where a server's extra encode time comes from (issue 20: server encode stage p50 23.5 ms against
21.4 ms for encode + ANN in-process, ViT-B-32). The same ViT-B-32 text encode, batch 1, called: the same ViT-B-32 text encode, batch 1, called
(A) directly on this thread, (B) through a ModelThread hop, (C) through the QueryBatcher as a server
runs it (dispatcher + model thread), (D) = C with a second Python thread doing request-like work
(JSON + small numpy) meanwhile. Blocks alternate so host noise hits each alike.

    python benchmarks/encode_paths.py [--model ViT-B-32:random] [--out benchmarks/results/encode_paths.json]
"""
import argparse, json, os, statistics, sys, threading, time, warnings
from pathlib import Path
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent)); sys.path.insert(0, str(HERE))
parser = argparse.ArgumentParser()
parser.add_argument("--model", default="ViT-B-32:random")
parser.add_argument("--out", type=Path, default=HERE / "results" / "encode_paths.json")
args = parser.parse_args()
warnings.filterwarnings("ignore")
import numpy as np
from api.settings import PrismSettings
PrismSettings(model=args.model, device="cpu", database_url=None).apply_threads()  # PRISM_THREADS, as a server
from embedder import load_embedder, ModelThread
from search.batcher import BatchConfig, QueryBatcher
from embed_throughput import machine_info
from serve_latency import queries
e = load_embedder(args.model, device="cpu")
mt = ModelThread(); bound = mt.bind(e)
qb = QueryBatcher(BatchConfig(enabled=True), run=mt.run)
qs = queries(400)
def a(q): t=time.perf_counter(); e.encode_texts([q]); return (time.perf_counter()-t)*1000
def b(q): t=time.perf_counter(); bound.encode_texts([q]); return (time.perf_counter()-t)*1000
def c(q):
    t=time.perf_counter()
    with qb.expecting(True) as submit:
        out, stats = submit(bound.unbound, q, lambda v: v)
    return (time.perf_counter()-t)*1000, stats.encode_ms
busy = threading.Event()
def background():
    while True:
        busy.wait()
        json.dumps({"results": [{"id": i, "score": float(i)} for i in range(10)]}); np.arange(1000).sum()
        time.sleep(0.0005)
threading.Thread(target=background, daemon=True).start()
for q in qs[:10]: a(q); b(q); c(q)
res = {k: [] for k in ("direct", "model_thread", "batcher_total", "batcher_encode", "batcher+busy_total", "batcher+busy_encode")}
for start in range(0, 300, 25):
    blk = qs[start:start+25]
    for q in blk: res["direct"].append(a(q))
    for q in blk: res["model_thread"].append(b(q))
    for q in blk: t, enc = c(q); res["batcher_total"].append(t); res["batcher_encode"].append(enc)
    busy.set()
    for q in blk: t, enc = c(q); res["batcher+busy_total"].append(t); res["batcher+busy_encode"].append(enc)
    busy.clear()
out = {"benchmark": "encode_paths", "model": args.model, "queries_per_path": len(res["direct"]),
       "p50_ms": {k: round(statistics.median(v), 2) for k, v in res.items()},
       "load_average_1_5_15_at_end": [round(x, 2) for x in os.getloadavg()], "machine": machine_info()}
args.out.parent.mkdir(parents=True, exist_ok=True)
args.out.write_text(json.dumps(out, indent=2))
print(json.dumps(out["p50_ms"]), out["load_average_1_5_15_at_end"])
