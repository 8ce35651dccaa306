"""Image embedding throughput: `prism index` vs `clip-retrieval inference` vs the bare forward pass.

Same catalog images, same architecture and weights (seeded random ViT-B-32 saved once to a
checkpoint that both load), same batch size, device, torch threads and number of decode workers:

    prism index      `prism index CATALOG --json` as a subprocess on a fresh PRISM_HOME (nothing
                     cached). Reads, hashes, decodes, preprocesses (worker threads), encodes, writes
                     the vector cache and SQL, then builds the FAISS indexes. Its image and text
                     embedding loops are timed by a shim that wraps CatalogIndexer's stage methods
                     around the unchanged CLI entry point (api.cli:main).
    clip-retrieval   `clip-retrieval inference --input_format files` (2.45.0, in its own venv,
                     benchmarks/.envs/compare) on the catalog's image folder; images and texts as
                     two runs (its files reader fails with both enabled: upstream #345/#352). Loop
                     throughput from its stats/*.json (sum of per-batch read+inference+write).
    bare forward     in this process: model.encode_image on already preprocessed tensors.

Each round runs all three, in a rotating order, so that machine noise hits them alike; medians
over rounds are reported. Figures of merit: prism image loop >= 1.3 x clip-retrieval image loop,
and prism image loop >= 0.9 x bare forward. Usage:

    python benchmarks/embed_throughput.py                      # 512 images, 2 rounds (make bench)
    python benchmarks/embed_throughput.py --full               # the issue's size: 2,000 images, 3 rounds
    python benchmarks/embed_throughput.py -n 2000 --rounds 3 --batch-size 32 --workers 2
    python benchmarks/embed_throughput.py --no-clip-retrieval  # prism vs bare only
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

PRISM_PYTHON = Path(sys.executable)

def prism_index_shim(timers: str) -> str:
    """Python source (for `python -c`) that runs the real `prism` entry point (api.cli:main) with
    timers around the indexer's stages; `timers` are lines of `_timed(owner, "attr", "key")`, and
    may import what they name. The timings go to $PRISM_BENCH_TIMINGS as JSON when the process
    exits."""
    return r"""
import atexit, json, os, sys, time
_t0 = time.perf_counter()
timings = {}
def _timed(owner, attr, key):
    fn = getattr(owner, attr)
    def wrapper(*a, **k):
        started = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            timings[key] = timings.get(key, 0.0) + time.perf_counter() - started
    setattr(owner, attr, wrapper)
import embedder
from indexer.pipeline import CatalogIndexer
""" + timers + r"""
timings["imports_s"] = time.perf_counter() - _t0
def _dump():
    timings["process_s"] = time.perf_counter() - _t0
    with open(os.environ["PRISM_BENCH_TIMINGS"], "w") as fh:
        json.dump(timings, fh)
atexit.register(_dump)
from api.cli import main
sys.argv = ["prism", *sys.argv[1:]]
sys.exit(main())
"""


PRISM_INDEX_SHIM = prism_index_shim("""_timed(embedder, "load_embedder", "load_model_s")
_timed(CatalogIndexer, "load_catalog", "load_catalog_s")
_timed(CatalogIndexer, "_embed_texts", "embed_texts_s")
_timed(CatalogIndexer, "_embed_images", "embed_images_s")
_timed(CatalogIndexer, "build", "build_s")""")


def machine_info() -> dict:
    import torch

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


def _cpu_now() -> tuple[float, float]:
    """(CPU seconds the whole machine was busy, CPU seconds of this process and its reaped children)."""
    import resource

    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")
    own = sum(resource.getrusage(w).ru_utime + resource.getrusage(w).ru_stime
              for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return busy, own


class Measured:
    """Wall time of a step and the CPU (in cores) that other processes used meanwhile: the noise."""

    def __enter__(self):
        self.t0, (self.busy0, self.own0) = time.perf_counter(), _cpu_now()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        busy, own = _cpu_now()
        self.own_cores = (own - self.own0) / self.wall
        self.other_cores = max(0.0, (busy - self.busy0) - (own - self.own0)) / self.wall
        return False


def wait_for_idle(max_wait: float, threshold: float = 0.25) -> float:
    """Wait (at most max_wait s) until other processes use < threshold cores over 1 s; returns the wait."""
    started = time.perf_counter()
    while time.perf_counter() - started < max_wait:
        with Measured() as m:
            time.sleep(1.0)
        if m.other_cores < threshold:
            break
    return time.perf_counter() - started


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _r(x: float | None, nd: int = 2) -> float | None:
    return None if x is None else round(x, nd)


def caption(i: int) -> str:
    """The text Prism indexes for product i (indexer.product_text: title, then description)."""
    from sample_catalog import product_row

    row = product_row(i, None)
    return f"{row['title']}. {row['description']}"


def save_random_checkpoint(arch: str, path: Path) -> None:
    """Prism's seeded random `ARCH:random` weights as an open_clip state_dict both tools load."""
    import warnings

    import torch

    from embedder import load_embedder

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*random weights.*")
        emb = load_embedder(f"{arch}:random", device="cpu")
    torch.save(emb.model.state_dict(), path)


def _env(threads: int, device: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # clip-retrieval picks cuda whenever it sees one
    return env


def _fail(what: str, proc: subprocess.CompletedProcess) -> None:
    tail = (proc.stderr or "")[-4000:] + (proc.stdout or "")[-2000:]
    raise SystemExit(f"{what} failed (exit {proc.returncode}):\n{tail}")


def run_prism_index(catalog: Path, home: Path, *, spec: str, batch_size: int, workers: int, threads: int,
                    device: str, n: int) -> dict:
    timings_file = home.parent / f"{home.name}-timings.json"
    env = _env(threads, device)
    env.update(PRISM_HOME=str(home), PRISM_THREADS=str(threads), PRISM_DECODE_WORKERS=str(workers),
               PRISM_BENCH_TIMINGS=str(timings_file))
    cmd = [str(PRISM_PYTHON), "-c", PRISM_INDEX_SHIM, "index", str(catalog), "--model", spec,
           "--batch-size", str(batch_size), "--device", device, "--json"]
    # cwd: the work dir, so that no ./prism.toml of the repo's checkout changes the settings
    with Measured() as m:
        proc = subprocess.run(cmd, cwd=home.parent, env=env, capture_output=True, text=True)
    wall = m.wall
    if proc.returncode != 0:
        _fail("prism index", proc)
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    timings = json.loads(timings_file.read_text())
    if summary["images_embedded"] != n:
        raise SystemExit(f"prism index embedded {summary['images_embedded']} images, expected {n}: {summary}")
    return {
        "wall_s": wall,
        "wall_images_per_s": n / wall,
        "loop_images_per_s": n / timings["embed_images_s"],
        "loop_texts_per_s": summary["texts_embedded"] / timings["embed_texts_s"],
        "run_s": summary["seconds"],  # IndexSummary.seconds: read catalog + embed + build
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "model_version": summary["model_version"],
        "cpu_cores_used": m.own_cores,
        "other_processes_cpu_cores": m.other_cores,
    }


def run_clip_retrieval(cr_bin: Path, folder: Path, out: Path, *, ckpt: Path, arch: str, modality: str,
                       batch_size: int, workers: int, threads: int, device: str, n: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    images = modality == "image"
    cmd = [str(cr_bin), "inference", "--input_dataset", str(folder), "--output_folder", str(out),
           "--input_format", "files", "--enable_text", str(not images), "--enable_image", str(images),
           "--enable_metadata", "False", "--clip_model", f"open_clip:{arch}/{ckpt}",
           "--batch_size", str(batch_size), "--num_prepro_workers", str(workers)]
    with Measured() as m:
        proc = subprocess.run(cmd, cwd=out.parent, env=_env(threads, device), capture_output=True, text=True)
    wall = m.wall
    if proc.returncode != 0:
        _fail(f"clip-retrieval inference ({modality})", proc)
    stats = [json.loads(p.read_text()) for p in sorted((out / "stats").glob("*.json")) if not p.name.startswith("wip_")]
    if not stats:
        raise SystemExit(f"clip-retrieval wrote no stats under {out / 'stats'}:\n{proc.stderr[-3000:]}")
    count = sum(s["sample_count"] for s in stats)
    if count != n:
        raise SystemExit(f"clip-retrieval ({modality}) embedded {count} samples, expected {n}")
    # Its writer sums every field over batches (also start/end timestamps): only durations are meaningful.
    loop = sum(s["total_duration"] for s in stats)
    return {
        "wall_s": wall,
        "wall_per_s": n / wall,
        "loop_per_s": n / loop,
        "loop_s": loop,
        "read_s": sum(s["read_duration"] for s in stats),
        "inference_s": sum(s["inference_duration"] for s in stats),
        "write_s": sum(s["write_duration"] for s in stats),
        "cpu_cores_used": m.own_cores,
        "other_processes_cpu_cores": m.other_cores,
    }


def check_same_vectors(reference, n_check: int, *, cr_out: Path | None, prism_home: Path | None,
                       model_version: str | None, paths: list[str], dim: int) -> dict:
    """Cosine of each tool's first vectors with the bare forward's: same weights, same preprocessing."""
    import numpy as np

    ref = reference[:n_check]
    result = {}
    if cr_out is not None:
        cr = np.load(next((cr_out / "img_emb").glob("*.npy"))).astype(np.float32)[:n_check]
        result["clip_retrieval_min_cosine_vs_bare"] = round(float((cr * ref).sum(1).min()), 5)
    if prism_home is not None:
        from embedder import VectorCache

        cache = VectorCache(prism_home / "embeddings" / model_version, dim)
        rows = [cache.get("image:" + hashlib.sha256(Path(p).read_bytes()).hexdigest()) for p in paths[:n_check]]
        result["prism_min_cosine_vs_bare"] = round(float((np.stack(rows) * ref).sum(1).min()), 5)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="ViT-B-32", help="open_clip architecture (seeded random weights)")
    parser.add_argument("-n", type=int, default=512, help="catalog images")
    parser.add_argument("--image-size", type=int, default=256, help="side of the catalog images in pixels")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="decode workers for both tools")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads for all three")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--full", action="store_true", help="the issue's size: -n 2000 --rounds 3")
    parser.add_argument("--no-clip-retrieval", action="store_true", help="skip clip-retrieval (prism vs bare)")
    parser.add_argument("--no-texts", action="store_true", help="skip clip-retrieval's separate text run")
    parser.add_argument("--wait-idle", type=float, default=0, metavar="S",
                        help="before each step wait up to S seconds for other processes to use < 0.25 cores")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (catalog, checkpoint, outputs)")
    parser.add_argument("--out", type=Path, default=None, help="default: results/embed_throughput[_full].json")
    args = parser.parse_args()
    if args.out is None:
        args.out = HERE / "results" / ("embed_throughput_full.json" if args.full else "embed_throughput.json")
    if args.full:
        args.n, args.rounds = 2000, 3
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    import numpy as np
    import torch

    from embedder import decode_image, load_embedder, read_image_bytes
    from sample_catalog import make_catalog

    torch.set_num_threads(args.threads)
    machine = machine_info()
    cr_bin = None
    if not args.no_clip_retrieval:
        from compare_env import compare_env_versions, ensure_compare_env, env_bin

        ensure_compare_env()
        cr_bin = env_bin("clip-retrieval")
        machine["compare_env"] = compare_env_versions()

    work = Path(tempfile.mkdtemp(prefix="prism-bench-"))
    try:
        print(f"work dir {work}: catalog of {args.n} images, checkpoint", flush=True)
        catalog = make_catalog(work / "catalog", args.n, image_size=args.image_size)
        folder = work / "catalog" / "images"
        for i in range(args.n):  # captions for clip-retrieval's text run: the text Prism indexes
            (folder / f"{i:05d}.txt").write_text(caption(i))
        paths = sorted(str(p) for p in folder.glob("*.png"))
        assert len(paths) == args.n, len(paths)
        ckpt = work / f"{args.arch}-random-s0.pt"
        save_random_checkpoint(args.arch, ckpt)
        spec = f"{args.arch}:{ckpt}"

        # the bare forward pass, on tensors preprocessed up front from the same checkpoint
        embedder = load_embedder(spec, device=args.device)
        model = embedder.model
        tensors = [
            embedder.stack([embedder.preprocess(decode_image(read_image_bytes(p, embedder.image_limits),
                                                             embedder.image_limits)) for p in paths[i : i + args.batch_size]])
            for i in range(0, len(paths), args.batch_size)
        ]

        def bare() -> dict:
            with Measured() as m, torch.inference_mode(), embedder.autocast():
                for t in tensors:
                    model.encode_image(t.to(embedder.device)).float().cpu()
            return {"images_per_s": len(paths) / m.wall, "cpu_cores_used": m.own_cores,
                    "other_processes_cpu_cores": m.other_cores}

        with torch.inference_mode():  # warm-up, and the reference vectors for the agreement check
            ref = model.encode_image(tensors[0].to(embedder.device)).float().cpu().numpy()
            ref /= np.linalg.norm(ref, axis=1, keepdims=True)

        common = dict(batch_size=args.batch_size, workers=args.workers, threads=args.threads, device=args.device)
        runs: dict[str, list] = {"bare": [], "prism": [], "clip_retrieval_image": [], "clip_retrieval_text": []}
        checks: dict = {}
        steps = ["prism", "clip_retrieval", "bare"] if cr_bin else ["prism", "bare"]
        for r in range(args.rounds):
            order = steps[r % len(steps):] + steps[: r % len(steps)]
            for step in order:
                waited = wait_for_idle(args.wait_idle) if args.wait_idle else 0.0
                print(f"round {r + 1}/{args.rounds}: {step} ..." + (f" (waited {waited:.0f} s for idle)" if waited >= 1.5 else ""),
                      flush=True)
                if step == "bare":
                    runs["bare"].append(bare())
                elif step == "prism":
                    home = work / f"prism-home-{r}"
                    res = run_prism_index(catalog, home, spec=spec, n=args.n, **common)
                    runs["prism"].append(res)
                    if r == 0:
                        checks.update(check_same_vectors(ref, len(ref), cr_out=None, prism_home=home,
                                                         model_version=res["model_version"], paths=paths,
                                                         dim=embedder.dim))
                    shutil.rmtree(home, ignore_errors=True)
                else:
                    out = work / "clip-retrieval-out"
                    cr_args = dict(ckpt=ckpt, arch=args.arch, n=args.n, **common)
                    runs["clip_retrieval_image"].append(run_clip_retrieval(cr_bin, folder, out, modality="image", **cr_args))
                    if r == 0:
                        checks.update(check_same_vectors(ref, len(ref), cr_out=out, prism_home=None,
                                                         model_version=None, paths=paths, dim=embedder.dim))
                    if not args.no_texts:
                        runs["clip_retrieval_text"].append(
                            run_clip_retrieval(cr_bin, folder, out, modality="text", **cr_args))
                    shutil.rmtree(out, ignore_errors=True)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]

    prism, cri, crt = runs["prism"], runs["clip_retrieval_image"], runs["clip_retrieval_text"]
    bare_ips = _median([x["images_per_s"] for x in runs["bare"]])
    p_loop = _median([x["loop_images_per_s"] for x in prism])
    p_wall = _median([x["wall_s"] for x in prism])
    p_text = _median([x["loop_texts_per_s"] for x in prism])
    c_loop = _median([x["loop_per_s"] for x in cri])
    c_wall = _median([x["wall_s"] for x in cri])
    c_infer = _median([args.n / x["inference_s"] for x in cri])
    c_read = _median([x["read_s"] for x in cri])
    ct_loop = _median([x["loop_per_s"] for x in crt])
    ct_wall = _median([x["wall_s"] for x in crt])
    # Whole command, same work: prism index embeds all images and all texts (and builds the
    # indexes) in one command; clip-retrieval needs its image run plus its text run.
    c_wall_same_work = (c_wall + ct_wall) if (c_wall is not None and ct_wall is not None) else None

    result = {
        "benchmark": "embed_throughput",
        "model": f"{args.arch} (seeded random weights, seed 0, one checkpoint loaded by both)",
        "device": args.device,
        "images": args.n,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "decode_workers": args.workers,
        "threads": args.threads,
        "bare_forward_images_per_s": _r(bare_ips),
        "end_to_end_images_per_s": _r(p_loop),  # prism index's image embedding loop
        "prism_index_loop_images_per_s": _r(p_loop),
        "prism_index_loop_texts_per_s": _r(p_text),
        "prism_index_wall_s": _r(p_wall),
        "prism_index_wall_images_per_s": _r(args.n / p_wall),
        "clip_retrieval_loop_images_per_s": _r(c_loop),
        "clip_retrieval_inference_only_images_per_s": _r(c_infer),
        "clip_retrieval_loop_read_wait_s": _r(c_read),
        "clip_retrieval_wall_s": _r(c_wall),
        "clip_retrieval_wall_images_per_s": _r(args.n / c_wall) if c_wall else None,
        "clip_retrieval_text_loop_texts_per_s": _r(ct_loop),
        "clip_retrieval_text_wall_s": _r(ct_wall),
        "ratio_end_to_end_over_bare": _r(p_loop / bare_ips, 3),
        "target_ratio_end_to_end_over_bare": 0.9,
        "target_ratio": 0.9,
        "ratio_prism_over_clip_retrieval": _r(p_loop / c_loop, 3) if c_loop else None,
        "ratio_prism_over_clip_retrieval_wall_images_only": _r(c_wall / p_wall, 3) if c_wall else None,
        "ratio_prism_over_clip_retrieval_wall_same_work": _r(c_wall_same_work / p_wall, 3) if c_wall_same_work else None,
        "target_ratio_prism_over_clip_retrieval": 1.3,
        # the same ratios round by round (each pair ran minutes apart, under similar machine load)
        "ratio_prism_over_clip_retrieval_per_round": [_r(p["loop_images_per_s"] / c["loop_per_s"], 3)
                                                      for p, c in zip(prism, cri)],
        "ratio_end_to_end_over_bare_per_round": [_r(p["loop_images_per_s"] / b["images_per_s"], 3)
                                                 for p, b in zip(prism, runs["bare"])],
        "ratio_prism_text_loop_over_clip_retrieval": _r(p_text / ct_loop, 3) if ct_loop else None,
        "notes": {
            "loop": "images / time inside the embedding loop: prism = CatalogIndexer._embed_images (read, sha256, "
                    "decode, preprocess, encode, vector cache, SQL image states); clip-retrieval = sum of per-batch "
                    "read + inference + write durations from stats/*.json",
            "wall": "whole command, process start to exit (imports, model load, warm-up, catalog, build)",
            "wall_images_only": "clip-retrieval image run vs prism index, which also embeds texts and builds indexes",
            "wall_same_work": "clip-retrieval image run + text run vs one prism index",
            "noise": "noise_other_processes_cpu_cores: CPU cores other processes on the machine used during each "
                     "run (/proc/stat minus this benchmark's own CPU); runs with much more than 0 are slowed down",
        },
        "checks": checks,
        "noise_other_processes_cpu_cores": {
            k: [_r(x["other_processes_cpu_cores"]) for x in v] for k, v in runs.items() if v
        },
        "runs": {
            "bare": [{k: _r(v, 3) for k, v in x.items()} for x in runs["bare"]],
            "end_to_end": [_r(x["loop_images_per_s"]) for x in prism],
            "prism_index": [{k: (_r(v, 3) if isinstance(v, float) else v) for k, v in x.items()} for x in prism],
            "clip_retrieval_image": [{k: _r(v, 3) for k, v in x.items()} for x in cri],
            "clip_retrieval_text": [{k: _r(v, 3) for k, v in x.items()} for x in crt],
        },
        "machine": machine,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    from rich.console import Console
    from rich.table import Table

    def fmt(x, spec=".2f"):
        return "-" if x is None else format(x, spec)

    def joined(xs):
        return ", ".join(fmt(x) for x in xs)

    table = Table(title=f"embedding throughput: {args.arch} (random, one checkpoint), {args.n} images "
                        f"{args.image_size}px, batch {args.batch_size}, {args.workers} decode workers, "
                        f"{args.threads} threads, {args.device}, {args.rounds} rounds")
    table.add_column("what")
    table.add_column("median", justify="right")
    table.add_column("runs", justify="right")
    table.add_row("bare forward, images/s", fmt(bare_ips), joined([x["images_per_s"] for x in runs["bare"]]))
    table.add_row("prism index loop, images/s", fmt(p_loop), joined([x["loop_images_per_s"] for x in prism]))
    table.add_row("prism index wall, s (images+texts+build)", fmt(p_wall), joined([x["wall_s"] for x in prism]))
    table.add_row("prism index loop, texts/s", fmt(p_text), joined([x["loop_texts_per_s"] for x in prism]))
    if cr_bin:
        table.add_row("clip-retrieval loop, images/s", fmt(c_loop), joined([x["loop_per_s"] for x in cri]))
        table.add_row("clip-retrieval inference only, images/s", fmt(c_infer),
                      joined([args.n / x["inference_s"] for x in cri]))
        table.add_row("clip-retrieval wall, s (images)", fmt(c_wall), joined([x["wall_s"] for x in cri]))
        if crt:
            table.add_row("clip-retrieval loop, texts/s", fmt(ct_loop), joined([x["loop_per_s"] for x in crt]))
            table.add_row("clip-retrieval wall, s (texts)", fmt(ct_wall), joined([x["wall_s"] for x in crt]))
        table.add_row("ratio prism / clip-retrieval, image loop", fmt(result["ratio_prism_over_clip_retrieval"], ".3f"),
                      "target >= 1.3")
        table.add_row("  the same, round by round", "", joined(result["ratio_prism_over_clip_retrieval_per_round"]))
        table.add_row("ratio prism / clip-retrieval, wall (images only)",
                      fmt(result["ratio_prism_over_clip_retrieval_wall_images_only"], ".3f"), "")
        if crt:
            table.add_row("ratio prism / clip-retrieval, wall (images+texts)",
                          fmt(result["ratio_prism_over_clip_retrieval_wall_same_work"], ".3f"), "")
            table.add_row("ratio prism / clip-retrieval, text loop",
                          fmt(result["ratio_prism_text_loop_over_clip_retrieval"], ".3f"), "")
    table.add_row("ratio prism loop / bare forward", fmt(result["ratio_end_to_end_over_bare"], ".3f"), "target >= 0.9")
    table.add_row("  the same, round by round", "", joined(result["ratio_end_to_end_over_bare_per_round"]))
    for k, v in result["noise_other_processes_cpu_cores"].items():
        table.add_row(f"noise: other processes' CPU cores during {k}", "", joined(v))
    Console().print(table)
    if checks:
        print("same vectors (min cosine vs bare forward, first batch):", checks)
    print(f"load average start {machine['loadavg_start']}, end {machine['loadavg_end']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
