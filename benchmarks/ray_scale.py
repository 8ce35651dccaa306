"""`prism index --ray`: embedding throughput on 1 and 2 Ray worker nodes against the local run, and a
worker killed mid-job.

Every run indexes the same catalog (benchmarks/sample_catalog.py, `-n` products, each with a
drawn image and a text) with the same model (default `ViT-B-32:random`: seeded random weights,
so the forward pass is the real cost and nothing is downloaded), as `prism index CATALOG --model
MODEL --json [--ray ADDRESS]` in a subprocess on a fresh PRISM_HOME (nothing cached):

    local       no Ray, PRISM_THREADS=2: the two cores the two Ray worker nodes get;
    ray_1_node  a local `ray.cluster_utils.Cluster`: a head node with 0 CPUs (nothing is
                scheduled on it) and one worker node with 1 CPU, i.e. one model replica;
    ray_2_nodes the same with two worker nodes of 1 CPU each (two replicas);
    kill        two worker nodes, and an embed actor SIGKILLed while it holds a batch (as
                tests/test_ray_index.py does); the vectors lost (a product whose image or text
                vector is missing from the cache, per SQL's hashes) and duplicated (a cache key
                stored twice) are counted afterwards: both must be 0.

Each Ray configuration gets its own fresh cluster, so every run starts its actors (and their
model loads) cold, as a user's first run does. images/s is images embedded / wall seconds of
the whole command (process start to exit: imports, the driver's model load, catalog, Ray
connect, embed, index build); the embed stage alone (CatalogIndexer.embed: texts and images,
on Ray including the actors' start and model loads) is timed by a shim around the unchanged
CLI entry point, as benchmarks/embed_throughput.py does. Figures of merit: 2 nodes / 1 node
>= 1.8x, Ray 2 nodes / local >= 0.9x.

    python benchmarks/ray_scale.py                 # 400 products (make bench-ray)
    python benchmarks/ray_scale.py -n 200 --rounds 2 --model ViT-B-32:random

Prints a table and writes benchmarks/results/ray_scale.json. Every process of the "cluster"
runs on this one machine, so the cores are what the nodes share; other processes' CPU use
during each run is recorded (noise), and a running benchmarks/scale.py is noted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from embed_throughput import prism_index_shim  # noqa: E402

CONFIGS = ("local", "ray_1_node", "ray_2_nodes")
WORKERS = {"ray_1_node": 1, "ray_2_nodes": 2}
# Ray's own process title of an embed actor while it runs a batch (tests/test_ray_index.py).
BUSY_EMBED_ACTOR = "ray::MapWorker(MapBatches(_EmbedActor)).submit"
OBJECT_STORE_BYTES = 200 * 1024 * 1024  # per node; Ray's default (30% of RAM each) is a lot for 3 nodes on a small host

# `prism` with timers around the indexer's stages (embed_throughput.prism_index_shim).
PRISM_INDEX_SHIM = prism_index_shim("""import indexer.ray_embed  # no Ray import at module level
_timed(embedder, "load_embedder", "load_model_s")
_timed(indexer.ray_embed, "_connect", "ray_connect_s")
_timed(CatalogIndexer, "load_catalog", "load_catalog_s")
_timed(CatalogIndexer, "embed", "embed_s")
_timed(CatalogIndexer, "build", "build_s")""")


# ---------------------------------------------------------------- machine and noise


def background_jobs() -> list[str]:
    """Command lines of running benchmarks/scale.py processes: they take the cores we measure."""
    proc = subprocess.run(["pgrep", "-af", "benchmarks/scale.py"], capture_output=True, text=True)
    return [line for line in proc.stdout.splitlines() if line.strip()]


def machine_info() -> dict:
    import ray
    import torch

    with open("/proc/meminfo") as fh:
        mem_kb = int(fh.readline().split()[1])
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "memory_gb": round(mem_kb / 2**20, 1),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


def _machine_busy_s() -> float:
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class _TreeCpu:
    """CPU seconds of this process and everything it started (the Ray nodes: raylets, GCS,
    actors; `prism index`), sampled while the run goes: an actor that exits (or is killed) is
    a zombie of its raylet until reaped, which no one-off reading at the end would count."""

    def __init__(self, interval_s: float = 0.25):
        self.interval_s = interval_s
        self.last: dict[tuple[int, float], float] = {}  # (pid, start time) -> its own user + system s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> None:
        import psutil

        me = psutil.Process()
        for proc in [me, *me.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                self.last[(proc.pid, proc.create_time())] = t.user + t.system

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def start(self) -> dict:
        self.sample()
        base = dict(self.last)
        self._thread.start()
        return base

    def stop(self, base: dict) -> float:
        self._stop.set()
        self._thread.join()
        self.sample()
        return sum(v - base.get(k, 0.0) for k, v in self.last.items())


class Measured:
    """Wall time of a run, and the CPU cores other processes used meanwhile (the noise)."""

    def __enter__(self):
        self.tree = _TreeCpu()
        self.base = self.tree.start()
        self.t0, self.busy0 = time.perf_counter(), _machine_busy_s()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        busy, own = _machine_busy_s() - self.busy0, self.tree.stop(self.base)
        self.own_cores = own / self.wall
        # Up to one sampling interval of a process that exited is missed: this errs towards
        # more noise, never less.
        self.other_cores = max(0.0, busy - own) / self.wall
        return False


# ---------------------------------------------------------------- the cluster


@contextlib.contextmanager
def ray_cluster(workers: int):
    """A head with 0 CPUs (no embed actor, no build task lands on it: it stands for the host
    that runs `prism index`) and `workers` nodes of 1 CPU each, on loopback."""
    from ray.cluster_utils import Cluster

    # Ray's unix sockets live under its temp dir; their paths must stay under ~107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="prs-", dir="/tmp")
    cluster = None
    try:
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "num_gpus": 0, "object_store_memory": OBJECT_STORE_BYTES, "include_dashboard": False,
            "temp_dir": temp_dir})
        for _ in range(workers):
            # num_gpus=0: on a host with a GPU, Prism would otherwise plan one actor per GPU.
            cluster.add_node(num_cpus=1, num_gpus=0, object_store_memory=OBJECT_STORE_BYTES)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        if cluster is not None:
            cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _worker_raylet_pids(cluster) -> list[int]:
    from ray._private import ray_constants

    return [node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid for node in cluster.worker_nodes]


def _busy_embed_actors(raylet_pids: list[int]) -> list:
    import psutil

    found = []
    for pid in raylet_pids:
        try:
            children = psutil.Process(pid).children(recursive=True)
        except psutil.NoSuchProcess:
            continue
        for child in children:
            with contextlib.suppress(psutil.Error):
                if " ".join(child.cmdline()).startswith(BUSY_EMBED_ACTOR):
                    found.append(child)
    return found


# ---------------------------------------------------------------- one run


def _env(home: Path, threads: int) -> dict:
    env = dict(os.environ, PRISM_HOME=str(home), PRISM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")
    for name in ("PRISM_DATABASE_URL", "RAY_ADDRESS"):  # the home's own SQLite; the address each run gives
        env.pop(name, None)
    return env


def run_index(catalog: Path, home: Path, *, spec: str, n: int, threads: int, address: str | None = None,
              kill_on: list[int] | None = None) -> dict:
    """`prism index` on a fresh home; with `kill_on` (worker raylet pids), SIGKILL the first busy
    embed actor found under them."""
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    timings_file = home.parent / f"{home.name}-timings.json"
    out_path, err_path = home.parent / f"{home.name}.out", home.parent / f"{home.name}.err"
    cmd = [sys.executable, "-c", PRISM_INDEX_SHIM, "index", str(catalog), "--model", spec, "--json"]
    if address is not None:
        cmd += ["--ray", address]
    env = {**_env(home, threads), "PRISM_BENCH_TIMINGS": str(timings_file)}
    killed = None
    with Measured() as m:
        # Output to files: a full pipe would stall the run while we poll. cwd: the work dir, so
        # that no ./prism.toml of the checkout changes the settings.
        with open(out_path, "w") as out, open(err_path, "w") as err:
            proc = subprocess.Popen(cmd, cwd=home.parent, env=env, stdout=out, stderr=err)
        try:
            while kill_on and killed is None and proc.poll() is None:
                busy = _busy_embed_actors(kill_on)
                if busy:
                    busy[0].send_signal(signal.SIGKILL)
                    killed = {"pid": busy[0].pid, "after_s": round(time.perf_counter() - m.t0, 2)}
                else:
                    time.sleep(0.05)
            proc.wait(timeout=3600)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stdout, stderr = out_path.read_text(), err_path.read_text()
    if proc.returncode != 0:
        raise SystemExit(f"prism index {'--ray ' + address if address else ''} failed (exit {proc.returncode}):\n"
                         f"{stderr[-4000:]}{stdout[-2000:]}")
    summary = json.loads(stdout[stdout.index("{"):])
    timings = json.loads(timings_file.read_text())
    images = summary["images_embedded"]
    # The kill run reports a miscount (a retried batch counted twice) with its lost/duplicated figures.
    if images != n and kill_on is None:
        raise SystemExit(f"prism index embedded {images} images, expected {n}: {json.dumps(summary)[:2000]}")
    result = {
        "wall_s": round(m.wall, 2),
        "images_per_s": round(images / m.wall, 3),
        "embed_s": round(timings["embed_s"], 2),
        "embed_images_per_s": round(images / timings["embed_s"], 3),
        "summary_seconds": summary["seconds"],  # IndexSummary.seconds: catalog + embed + build
        "images_embedded": images,
        "texts_embedded": summary["texts_embedded"],
        "products_indexed": summary["products_indexed"],
        "image_failures": summary["image_failures"],
        "model_version": summary["model_version"],
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "own_cpu_cores": round(m.own_cores, 2),
        # What each run got of the shared cores differs with the noise: per CPU-second is the
        # efficiency, independent of how much CPU the rest of the machine left.
        "images_per_cpu_s": round(images / (m.own_cores * m.wall), 3),
        "other_processes_cpu_cores": round(m.other_cores, 2),
    }
    if kill_on is not None:
        result["killed"] = killed
        # Ray's notice of the retried task goes to stderr (indexer.ray_embed.ray_session).
        result["stderr_mentions_retry"] = any(w in stderr for w in ("retry", "retried", "died", "Died"))
    return result


# ---------------------------------------------------------------- what the home holds


def cache_keys(home: Path, model_version: str) -> list[str]:
    import pyarrow as pa
    import pyarrow.ipc as ipc

    keys = []
    for shard in sorted((home / "embeddings" / model_version).glob("part-*.arrow")):
        with pa.memory_map(str(shard)) as source:
            keys += ipc.open_file(source).read_all().column("key").to_pylist()
    return keys


def home_vectors(home: Path, model_version: str, dim: int):
    """(product ids, image vectors, text vectors, lost image ids, lost text ids), from SQL's
    hashes and the vector cache: a product's vector is lost when SQL records no hash for it or
    the cache has no vector under that hash."""
    from embedder import VectorCache
    from store import Store

    store = Store.open(f"sqlite:///{home.resolve() / 'prism.db'}")
    try:
        products = [p for chunk in store.iter_live_products() for p in chunk]
    finally:
        store.close()
    cache = VectorCache(home / "embeddings" / model_version, dim)
    images, found_images = cache.get_many([f"image:{p.image_hash}" for p in products])
    texts, found_texts = cache.get_many([f"text:{p.text_hash}" for p in products])
    lost_images = [p.product_id for p, ok in zip(products, found_images)
                   if p.image_uri and not (ok and p.image_hash)]
    lost_texts = [p.product_id for p, ok in zip(products, found_texts) if not (ok and p.text_hash)]
    return [p.product_id for p in products], images, texts, lost_images, lost_texts


def check_home(home: Path, model_version: str, dim: int, n: int, reference: tuple | None) -> dict:
    ids, images, texts, lost_images, lost_texts = home_vectors(home, model_version, dim)
    keys = cache_keys(home, model_version)
    out = {
        "products": len(ids),
        "vectors_lost": len(lost_images) + len(lost_texts),
        "image_vectors_lost": len(lost_images),
        "text_vectors_lost": len(lost_texts),
        "lost_ids": (lost_images + lost_texts)[:20],
        "cache_keys": len(keys),
        "duplicated_keys": len(keys) - len(set(keys)),
        "expected_keys": 2 * n,
    }
    if reference is not None:  # the same vectors as the local run (same model, same preprocessing)
        import numpy as np

        ref_ids, ref_images, ref_texts = reference[:3]
        at = {pid: i for i, pid in enumerate(ref_ids)}
        common = [(i, at[pid]) for i, pid in enumerate(ids) if pid in at]
        if common:
            ours, theirs = np.array([c[0] for c in common]), np.array([c[1] for c in common])
            out["min_cosine_vs_local_image"] = round(float((images[ours] * ref_images[theirs]).sum(1).min()), 5)
            out["min_cosine_vs_local_text"] = round(float((texts[ours] * ref_texts[theirs]).sum(1).min()), 5)
    return out


# ---------------------------------------------------------------- main


def _median(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 3) if xs else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=400, help="catalog products (each: one image, one text)")
    parser.add_argument("--model", default="ViT-B-32:random")
    parser.add_argument("--image-size", type=int, default=224, help="side of the catalog images in pixels")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat the three timed runs, in a rotating order; medians are reported")
    parser.add_argument("--no-kill", action="store_true", help="skip the kill run")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "ray_scale.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    from embedder import describe_model
    from sample_catalog import make_catalog

    machine = machine_info()
    background = background_jobs()
    dim = describe_model(args.model).dim
    work = Path(tempfile.mkdtemp(prefix="prism-rayscale-"))
    runs: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    checks: dict[str, dict] = {}
    kill: dict | None = None
    try:
        print(f"work dir {work}: catalog of {args.n} products ({args.image_size}px images)", flush=True)
        catalog = make_catalog(work / "catalog", args.n, image_size=args.image_size)
        reference = None
        for r in range(args.rounds):
            order = CONFIGS[r % 3:] + CONFIGS[: r % 3]
            for name in order:
                print(f"round {r + 1}/{args.rounds}: {name} ...", flush=True)
                home = work / f"home-{name}-{r}"
                common = dict(spec=args.model, n=args.n, threads=2)
                if name == "local":
                    res = run_index(catalog, home, **common)
                else:
                    with ray_cluster(WORKERS[name]) as cluster:
                        res = run_index(catalog, home, address=cluster.address, **common)
                runs[name].append(res)
                print(f"  {res['wall_s']:.1f} s, {res['images_per_s']:.2f} images/s (embed stage "
                      f"{res['embed_s']:.1f} s), other processes {res['other_processes_cpu_cores']:.2f} cores", flush=True)
                if name == "local" and reference is None:
                    reference = home_vectors(home, res["model_version"], dim)
                if r == 0 and name != "local":
                    checks[name] = {"home": home, "model_version": res["model_version"]}
        for name, c in checks.items():
            checks[name] = check_home(c["home"], c["model_version"], dim, args.n, reference)
        if not args.no_kill:
            print("kill run: 2 worker nodes, an embed actor SIGKILLed mid-batch ...", flush=True)
            home = work / "home-kill"
            with ray_cluster(2) as cluster:
                kill = run_index(catalog, home, spec=args.model, n=args.n, threads=2, address=cluster.address,
                                 kill_on=_worker_raylet_pids(cluster))
            kill.update(check_home(home, kill["model_version"], dim, args.n, reference))
            print(f"  killed {kill['killed']}; lost {kill['vectors_lost']}, duplicated {kill['duplicated_keys']}",
                  flush=True)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    background = background or background_jobs()

    med = {name: {key: _median([x[key] for x in runs[name]])
                  for key in ("wall_s", "images_per_s", "embed_s", "embed_images_per_s", "own_cpu_cores",
                              "images_per_cpu_s", "other_processes_cpu_cores")}
           for name in CONFIGS}
    result = {
        "benchmark": "ray_scale",
        "model": args.model,
        "products": args.n,
        "images": args.n,
        "texts": args.n,
        "image_size": args.image_size,
        "rounds": args.rounds,
        "setup": {
            "local": "prism index, no Ray, PRISM_THREADS=2",
            "ray": "ray.cluster_utils.Cluster on this machine: head node 0 CPUs, worker nodes 1 CPU each "
                   "(one embed actor per node, 1 torch thread); a fresh cluster per run",
            "kill": "2 worker nodes; the first embed actor seen busy with a batch is SIGKILLed",
        },
        "configs": med,
        "ratio_2_nodes_over_1_node": _ratio(med["ray_2_nodes"]["images_per_s"], med["ray_1_node"]["images_per_s"]),
        "ratio_2_nodes_over_1_node_embed_stage": _ratio(med["ray_2_nodes"]["embed_images_per_s"],
                                                        med["ray_1_node"]["embed_images_per_s"]),
        "target_ratio_2_nodes_over_1_node": 1.8,
        "ratio_ray_2_nodes_over_local": _ratio(med["ray_2_nodes"]["images_per_s"], med["local"]["images_per_s"]),
        "ratio_ray_2_nodes_over_local_embed_stage": _ratio(med["ray_2_nodes"]["embed_images_per_s"],
                                                           med["local"]["embed_images_per_s"]),
        "target_ratio_ray_2_nodes_over_local": 0.9,
        "ratio_2_nodes_over_1_node_per_cpu_s": _ratio(med["ray_2_nodes"]["images_per_cpu_s"],
                                                      med["ray_1_node"]["images_per_cpu_s"]),
        "ratio_ray_2_nodes_over_local_per_cpu_s": _ratio(med["ray_2_nodes"]["images_per_cpu_s"],
                                                         med["local"]["images_per_cpu_s"]),
        "kill": None if kill is None else {
            "killed": kill["killed"], "vectors_lost": kill["vectors_lost"], "duplicated_keys": kill["duplicated_keys"],
            "image_vectors_lost": kill["image_vectors_lost"], "text_vectors_lost": kill["text_vectors_lost"],
            "cache_keys": kill["cache_keys"], "expected_keys": kill["expected_keys"],
            "images_embedded": kill["images_embedded"], "texts_embedded": kill["texts_embedded"],
            "min_cosine_vs_local_image": kill.get("min_cosine_vs_local_image"),
            "min_cosine_vs_local_text": kill.get("min_cosine_vs_local_text"),
            "wall_s": kill["wall_s"], "images_per_s": kill["images_per_s"],
            "other_processes_cpu_cores": kill["other_processes_cpu_cores"],
        },
        "checks": checks,
        "notes": {
            "images_per_s": "images embedded / wall seconds of the whole `prism index` command (process start to "
                            "exit: imports, the driver's model load, catalog into SQL, Ray connect, embed, index build); "
                            "every run also embeds one text per product",
            "embed_stage": "CatalogIndexer.embed alone (texts and images; on Ray also the actor pool's start and each "
                           "actor's model load), timed by a shim around the unchanged CLI",
            "per_cpu_s": "images_per_cpu_s: images embedded / CPU seconds of this benchmark's process tree (the "
                         "`prism index` process and every Ray node) during the run: the run's efficiency whatever "
                         "share of the cores the rest of the machine left it (own_cpu_cores)",
            "noise": "other_processes_cpu_cores: cores the rest of the machine used during a run (/proc/stat minus "
                     "this benchmark's process tree, Ray nodes included); the machine has "
                     f"{os.cpu_count()} cores, all Ray nodes share them",
        },
        "runs": runs,
        "machine": machine,
    }
    if background:
        result["note"] = (f"benchmarks/scale.py was running during this benchmark ({len(background)} process(es): "
                          f"{'; '.join(background)[:300]}): it takes CPU from the {os.cpu_count()} cores every "
                          "configuration shares, so absolute figures are low; the configurations ran side by side "
                          "in one run, so the ratios are what to quote")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    from rich.console import Console
    from rich.table import Table

    def fmt(x, spec=".2f"):
        return "-" if x is None else format(x, spec)

    table = Table(title=f"prism index --ray: {args.model}, {args.n} products (images + texts), "
                        f"{args.rounds} round(s), {os.cpu_count()} cores shared by every node")
    for col in ("configuration", "wall s", "images/s", "embed stage s", "embed-stage images/s", "cores used",
                "images per CPU-s", "other procs' cores"):
        table.add_column(col, justify="right" if col != "configuration" else "left")
    labels = {"local": "local, PRISM_THREADS=2", "ray_1_node": "Ray, 1 worker node (1 CPU)",
              "ray_2_nodes": "Ray, 2 worker nodes (1 CPU each)"}
    for name in CONFIGS:
        c = med[name]
        table.add_row(labels[name], fmt(c["wall_s"], ".1f"), fmt(c["images_per_s"]), fmt(c["embed_s"], ".1f"),
                      fmt(c["embed_images_per_s"]), fmt(c["own_cpu_cores"]), fmt(c["images_per_cpu_s"]),
                      fmt(c["other_processes_cpu_cores"]))
    table.add_row("ratio 2 nodes / 1 node (target >= 1.8)", "", fmt(result["ratio_2_nodes_over_1_node"], ".3f"), "",
                  fmt(result["ratio_2_nodes_over_1_node_embed_stage"], ".3f"), "",
                  fmt(result["ratio_2_nodes_over_1_node_per_cpu_s"], ".3f"), "")
    table.add_row("ratio Ray 2 nodes / local (target >= 0.9)", "", fmt(result["ratio_ray_2_nodes_over_local"], ".3f"), "",
                  fmt(result["ratio_ray_2_nodes_over_local_embed_stage"], ".3f"), "",
                  fmt(result["ratio_ray_2_nodes_over_local_per_cpu_s"], ".3f"), "")
    if kill is not None:
        table.add_row("kill run, 2 nodes: " + ("actor SIGKILLed at %.1f s" % kill["killed"]["after_s"]
                                               if kill["killed"] else "NO busy actor seen"),
                      fmt(kill["wall_s"], ".1f"), fmt(kill["images_per_s"]), "", "", "", "",
                      fmt(kill["other_processes_cpu_cores"]))
        table.add_row("kill run: lost / duplicated (must be 0 / 0)", "",
                      f"{kill['vectors_lost']} / {kill['duplicated_keys']}", "", "", "", "", "")
    Console(width=160).print(table)
    for name, c in checks.items():
        print(f"{name}: lost {c['vectors_lost']}, duplicated {c['duplicated_keys']}, min cosine vs local "
              f"image {c.get('min_cosine_vs_local_image')} text {c.get('min_cosine_vs_local_text')}")
    if background:
        print("note:", result["note"])
    print(f"load average start {machine['loadavg_start']}, end {machine['loadavg_end']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
