"""`prism index --ray`: the embed stage on a real Ray cluster (a head and one worker node, one CPU
each, on loopback), run as a user runs it, against the local embed stage on the same catalog."""

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY
from prism_cli import PRISM, ROOT, run_prism
from ray_cluster import isolated_cluster

pytest.importorskip("ray.data")

IMAGES = TEXTS = 120  # every product of small_catalog has a text and a readable image


@pytest.fixture(scope="module")
def ray_cluster():
    with isolated_cluster(num_cpus=1, object_store_memory=100 * 1024 * 1024) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory, small_catalog, tiny_embedder, databases):
    """The small catalog indexed by the local embed stage: (home, database URL)."""
    from indexer import CatalogIndexer, IndexOptions
    from store import Store

    home = tmp_path_factory.mktemp("local-reference")
    store = Store.open(databases.url(home))
    try:
        CatalogIndexer(home=home, store=store, embedder=tiny_embedder, options=IndexOptions(batch_size=32)).run(small_catalog)
    finally:
        store.close()
    return home, databases.url(home)


def _env(databases, home: Path) -> dict[str, str]:
    env = databases.env(home, PRISM_THREADS="1")
    env.pop("RAY_ADDRESS", None)  # it would override the address each test gives
    return env


def _index_args(catalog: Path, address: str, *extra: str) -> list[str]:
    return ["index", str(catalog), "--model", TINY, "--ray", address, "--json", *extra]


def _vectors(home: Path, url: str, dim: int, name: str) -> dict[str, tuple[str, np.ndarray, str, np.ndarray]]:
    """product_id -> (image hash, image vector, text hash, text vector), from SQL and the cache."""
    from embedder import VectorCache
    from store import Store

    store = Store.open(url)
    try:
        products = [p for chunk in store.iter_live_products() for p in chunk]
    finally:
        store.close()
    cache = VectorCache(home / "embeddings" / name, dim)
    images, found_images = cache.get_many([f"image:{p.image_hash}" for p in products])
    texts, found_texts = cache.get_many([f"text:{p.text_hash}" for p in products])
    lost = [p.product_id for p, a, b in zip(products, found_images, found_texts) if not (a and b)]
    assert not lost, f"vectors lost: {lost[:10]}"
    return {p.product_id: (p.image_hash, images[i], p.text_hash, texts[i]) for i, p in enumerate(products)}


def _assert_matches_local(home: Path, url: str, local_reference, tiny_embedder) -> None:
    ours = _vectors(home, url, tiny_embedder.dim, tiny_embedder.name)
    reference = _vectors(*local_reference, tiny_embedder.dim, tiny_embedder.name)
    assert ours.keys() == reference.keys()
    for pid, (image_hash, image, text_hash, text) in ours.items():
        ref_image_hash, ref_image, ref_text_hash, ref_text = reference[pid]
        assert (image_hash, text_hash) == (ref_image_hash, ref_text_hash), pid
        assert float(image @ ref_image) >= 0.9999, pid
        assert float(text @ ref_text) >= 0.9999, pid


def _cache_keys(home: Path, name: str) -> list[str]:
    import pyarrow as pa
    import pyarrow.ipc as ipc

    keys = []
    for shard in sorted((home / "embeddings" / name).glob("part-*.arrow")):
        with pa.memory_map(str(shard)) as source:
            keys += ipc.open_file(source).read_all().column("key").to_pylist()
    return keys


def test_without_ray_nothing_imports_it():
    code = ("import sys, api.cli, indexer, indexer.pipeline, indexer.ray_embed; "
            "sys.exit(1 if 'ray' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=120).returncode == 0


def test_unreachable_cluster_is_a_clear_error(databases, small_catalog, tmp_path):
    with socket.socket() as s:  # a port on which nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = _env(databases, tmp_path / "home")
    started = time.monotonic()
    proc = run_prism(_index_args(small_catalog, f"127.0.0.1:{port}"), env, check=False, timeout=120, fresh_process=True)
    assert proc.returncode == 2, proc.stderr
    assert f"cannot reach the Ray cluster at 127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - started < 90
    bad = run_prism(_index_args(small_catalog, "not a cluster"), env, check=False, timeout=120, fresh_process=True)
    assert bad.returncode == 2 and "--ray takes auto, HOST:PORT or ray://HOST:PORT" in bad.stderr, bad.stderr


def test_ray_index_equals_local_search_answers_and_rerun_embeds_nothing(
    ray_cluster, small_catalog, local_reference, tiny_embedder, databases, tmp_path
):
    home = tmp_path / "home"
    env = _env(databases, home)
    first = json.loads(run_prism(_index_args(small_catalog, ray_cluster.address), env, fresh_process=True).stdout)
    assert (first["texts_embedded"], first["images_embedded"], first["products_indexed"]) == (TEXTS, IMAGES, 120), json.dumps(first)
    assert first["image_failures"] == {}
    _assert_matches_local(home, databases.url(home), local_reference, tiny_embedder)

    answer = json.loads(run_prism(["search", "red shoe", "--target", "image", "-k", "5", "--json"], env).stdout)
    assert len(answer["results"]) == 5 and answer["index_version"] == first["index_version"]

    # The rerun builds IVF-PQ indexes (a threshold below the catalog's size), their vectors added
    # in Ray tasks (indexer/ray_build.py); the index still answers.
    again = json.loads(run_prism(_index_args(small_catalog, ray_cluster.address), {**env, "PRISM_FLAT_THRESHOLD": "60"}, fresh_process=True).stdout)
    assert (again["texts_embedded"], again["images_embedded"]) == (0, 0)
    assert (again["texts_cached"], again["images_cached"]) == (TEXTS, IMAGES)
    for modality in ("image", "text"):
        built = again["indexes"][modality]
        assert built["kind"] == "ivfpq" and built["tuning"]["ray_partitions"] >= 1, built
    answer = json.loads(run_prism(["search", "red shoe", "--target", "image", "-k", "5", "--json"], env).stdout)
    assert len(answer["results"]) == 5 and answer["index_version"] == again["index_version"]
    keys = _cache_keys(home, tiny_embedder.name)
    assert len(keys) == len(set(keys)) == TEXTS + IMAGES


def _descendants_titled(root_pid: int, prefix: str) -> list:
    import psutil

    try:
        children = psutil.Process(root_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for child in children:
        try:
            if " ".join(child.cmdline()).startswith(prefix):
                found.append(child)
        except psutil.Error:
            continue
    return found


def _worker_raylet_pid(cluster) -> int:
    from ray._private import ray_constants

    (worker_node,) = cluster.worker_nodes
    return worker_node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid


BUSY_EMBED_ACTOR = "ray::MapWorker(MapBatches(_EmbedActor)).submit"  # its process title while it holds a batch


def test_worker_killed_mid_job_loses_and_duplicates_nothing(
    ray_cluster, small_catalog, local_reference, tiny_embedder, databases, tmp_path
):
    home = tmp_path / "home"
    env = _env(databases, home)
    raylet_pid = _worker_raylet_pid(ray_cluster)
    # Batches of 2 rows: the job is many small tasks, so one is in flight when the actor dies.
    out_path, err_path = tmp_path / "stdout", tmp_path / "stderr"
    with open(out_path, "w") as out, open(err_path, "w") as err:  # files: a full pipe would stall the run
        proc = subprocess.Popen(PRISM + _index_args(small_catalog, ray_cluster.address, "--batch-size", "2"), env=env,
                                cwd=ROOT, stdout=out, stderr=err)
    try:
        killed = None
        deadline = time.monotonic() + 240
        while killed is None and proc.poll() is None and time.monotonic() < deadline:
            # An actor of the embed pool on the worker node, busy with a batch.
            busy = _descendants_titled(raylet_pid, BUSY_EMBED_ACTOR)
            if busy:
                busy[0].send_signal(signal.SIGKILL)
                killed = busy[0].pid
            else:
                time.sleep(0.05)
        assert killed is not None, "no busy embed actor seen on the worker node while the job ran"
        assert proc.poll() is None, "the job had ended before the kill"
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err_path.read_text()
    summary = json.loads(out_path.read_text())
    # Every product once: a batch retried after the kill is not counted (nor written) twice.
    assert (summary["texts_embedded"], summary["images_embedded"], summary["products_indexed"]) == (TEXTS, IMAGES, 120)
    keys = _cache_keys(home, tiny_embedder.name)
    assert len(keys) == len(set(keys)) == TEXTS + IMAGES
    _assert_matches_local(home, databases.url(home), local_reference, tiny_embedder)


def test_job_out_of_retries_fails_clearly_and_a_rerun_resumes(
    ray_cluster, small_catalog, tiny_embedder, databases, tmp_path
):
    """No actor restarts: the first kill ends the job with a RayEmbedError (what `prism index`
    prints as its error), what came back before it is kept, and the CLI rerun embeds the rest."""
    import threading

    from indexer import CatalogIndexer, IndexOptions
    from indexer.ray_embed import RayEmbedError, RayOptions
    from store import Store

    home = tmp_path / "home"
    raylet_pid = _worker_raylet_pid(ray_cluster)
    killed, stop = [], threading.Event()

    def kill_first_busy_actor() -> None:
        while not stop.is_set() and not killed:
            busy = _descendants_titled(raylet_pid, BUSY_EMBED_ACTOR)
            if busy:
                busy[0].send_signal(signal.SIGKILL)
                killed.append(busy[0].pid)
            else:
                time.sleep(0.05)

    killer = threading.Thread(target=kill_first_busy_actor, daemon=True)
    killer.start()
    store = Store.open(databases.url(home))
    try:
        indexer = CatalogIndexer(home=home, store=store, embedder=tiny_embedder, options=IndexOptions(batch_size=2))
        with pytest.raises(RayEmbedError, match="the Ray embed job failed: .*run the same command again"):
            indexer.run(small_catalog, ray=RayOptions(address=ray_cluster.address, max_restarts=0))
    finally:
        stop.set()
        killer.join()
        store.close()
    assert killed, "no busy embed actor seen on the worker node while the job ran"
    kept = len(_cache_keys(home, tiny_embedder.name))
    assert kept < TEXTS + IMAGES

    rerun = json.loads(run_prism(_index_args(small_catalog, ray_cluster.address), _env(databases, home), fresh_process=True).stdout)
    assert rerun["texts_embedded"] + rerun["images_embedded"] == TEXTS + IMAGES - kept
    keys = _cache_keys(home, tiny_embedder.name)
    assert len(keys) == len(set(keys)) == TEXTS + IMAGES
