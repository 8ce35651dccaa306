"""The embed stage on a Ray cluster (`prism index CATALOG --ray [ADDRESS]`), with Ray Data.

The driver (the `prism index` process) keeps everything that touches the home: it lists the live
products from SQL a page at a time, puts the work for them into the object store in small blocks
(what Ray Data hands an actor, and retries, as a whole), and writes
what comes back into the same content-hash `VectorCache` and the same SQL columns as the local
stage (`CatalogIndexer._embed_texts` / `_embed_images`). Only reading, decoding and encoding run
on the cluster, in a pool of actors (`map_batches` with an actor class) that each load the model
once with `load_embedder(spec, models_dir=...)`; a model version Prism trained lives under
`$PRISM_HOME/models/`, which must therefore be on a filesystem every node sees at the same path,
as must the catalog's image files.

What a rerun skips: texts whose `text:<sha256>` is already cached are never sent; images are sent
(their bytes must be read to know whether the file changed), and an actor that finds the bytes
hash to the product's recorded, cached hash returns that hash without running the model.

Faults: actors are restarted (`max_restarts`) and the batch a dead actor held is retried on the
restarted one (`max_task_retries`), so a killed worker costs a batch of work, not a vector. A
batch can then arrive twice: the driver takes each product once per modality and the cache
stores each key once. When retries run out, the job fails with a `RayEmbedError`; the vectors
that came back before it are flushed by the caller, so a rerun embeds only what is missing.

Ray is imported only here and only inside functions: without `--ray` nothing imports it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import socket
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from embedder import VectorCache
    from indexer.pipeline import CatalogIndexer, IndexSummary

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0  # ray.init waits minutes on an address where nothing answers: probe first


class RayEmbedError(RuntimeError):
    """The cluster cannot be reached, or the embed job on it failed; the message says which."""


@dataclass(frozen=True)
class RayOptions:
    """How `prism index --ray` uses the cluster."""

    address: str = "auto"  # "auto" (RAY_ADDRESS, or the cluster `ray start` made here), HOST:PORT, ray://HOST:PORT
    actors: int | None = None  # None: one per GPU; on a cluster without GPUs, its CPUs // cpus_per_actor
    cpus_per_actor: float = 1.0  # clusters without GPUs only; also each actor's torch threads
    max_restarts: int = 3  # restarts per actor (and retries of the batch it held) before the job fails
    models_dir: Path | None = None  # where actors find model versions (shared by all nodes); None: the home's models/

    def __post_init__(self):
        if not _valid_address(self.address):
            raise ValueError(f"--ray takes auto, HOST:PORT or ray://HOST:PORT, not {self.address!r}")
        if self.actors is not None and self.actors < 1:
            raise ValueError("the number of Ray actors must be at least 1")
        if self.cpus_per_actor <= 0:
            raise ValueError("CPUs per Ray actor must be more than 0")


def _valid_address(address: str) -> bool:
    if address == "auto":
        return True
    rest = address.removeprefix("ray://")
    host, _, port = rest.rpartition(":")
    return bool(host) and port.isdigit() and "/" not in rest


@dataclass(frozen=True)
class _ActorSetup:
    """What every actor needs to load the model and read images like the local stage does."""

    spec: str
    model_version: str
    models_dir: str
    device: str
    threads: int
    decode_workers: int
    max_image_bytes: int
    max_image_pixels: int
    max_image_aspect: float
    text_batch_size: int
    url_max_bytes: int
    url_timeout_s: float
    precision: str = "fp32"  # the driver's encoder precision: every actor embeds at it


# ---------------------------------------------------------------- driver


@contextlib.contextmanager
def ray_session(options: RayOptions):
    """Connected to the cluster for one `prism index --ray` run: its embed stage and its build.

    Ray prints the cluster's notices (a task retried after its worker died) to stdout, which
    carries only Prism's answer (`--json`): they go to stderr with the rest of the progress."""
    with contextlib.redirect_stdout(sys.stderr):
        ray = _connect(options.address)
        try:
            yield
        finally:
            _wait_for_ray_data_threads()
            ray.shutdown()


# Threads of a Ray Data job in this (driver) process. After a failed job, Ray 2.60's executor
# shutdown waits only 2 s for its scheduling loop; on a busy host the loop was still running when
# ray.shutdown() came, touched the shut-down core worker, and Ray ended the whole process with
# exit code 1 ("The core worker has already been shutdown ... The process will exit"), before
# the job's error was printed (seen once in a CI run of test_ray_index, in-process driver).
_RAY_DATA_THREADS = ("StreamingExecutor-", "ray-data-metadata-prefetch", "iter_threaded")


def _wait_for_ray_data_threads(timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and thread.name.startswith(_RAY_DATA_THREADS):
            thread.join(timeout=max(0.0, deadline - time.monotonic()))


def embed_on_ray(indexer: "CatalogIndexer", total: int, cache: "VectorCache", summary: "IndexSummary",
                 options: RayOptions) -> None:
    """Embed every live product's text and image on the cluster into `cache`, recording hashes
    and image states in SQL as the local stage does. Inside `ray_session`; the caller flushes
    `cache`."""
    _run_job(_import_ray(), indexer, total, cache, summary, options)


def check_reachable(address: str) -> None:
    """Raise RayEmbedError unless a cluster answers at `address`: a run checks this before it
    loads the catalog and the model, which take minutes on a large catalog."""
    _reach(_import_ray(), address)


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise RayEmbedError("--ray needs Ray with Ray Data on this host and the cluster: pip install -e '.[ray]'") from None
    return ray


def _connect(address: str):
    ray = _import_ray()
    _reach(ray, address)
    try:
        # Workers' prints (a random-weights warning from every actor) would interleave with
        # Prism's progress; they stay in the cluster's logs.
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    except Exception as exc:
        raise RayEmbedError(f"cannot connect to the Ray cluster at {address}: {_first_line(exc)}") from None
    return ray


def _reach(ray, address: str) -> None:
    if address.startswith("ray://"):
        try:
            import grpc  # noqa: F401  (Ray Client's transport, missing from a plain ray[data] install)
        except ImportError:
            raise RayEmbedError(f"{address}: ray:// addresses go through Ray Client, which needs "
                                "pip install 'ray[client]'; or give the cluster's HOST:PORT") from None
        host, port = _host_port(address.removeprefix("ray://"))
    else:
        host, port = _resolve(ray, address)
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        where = address if address.endswith(f"{host}:{port}") else f"{address} ({host}:{port})"
        raise RayEmbedError(f"cannot reach the Ray cluster at {where}: {exc.strerror or exc}") from None


def _resolve(ray, address: str) -> tuple[str, int]:
    """The GCS host and port `ray.init(address)` would dial ("auto" included)."""
    from ray._private.services import canonicalize_bootstrap_address

    try:
        resolved = canonicalize_bootstrap_address(address)
    except Exception as exc:  # "auto" with no cluster found: ConnectionError
        raise RayEmbedError(f"no Ray cluster at {address!r}: {_first_line(exc)} (start one with `ray start "
                            "--head`, or give --ray HOST:PORT)") from None
    if resolved is None:
        raise RayEmbedError(f"no Ray cluster at {address!r}: start one with `ray start --head`, or give --ray HOST:PORT")
    return _host_port(resolved)


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _plan(ray, options: RayOptions) -> tuple[int, dict]:
    """(number of actors, resources per actor) for this cluster."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus:
        return options.actors or gpus, {"num_gpus": 1}
    cpus = resources.get("CPU", 0)
    actors = options.actors or max(1, int(cpus // options.cpus_per_actor))
    return actors, {"num_cpus": options.cpus_per_actor}


def _run_job(ray, indexer: "CatalogIndexer", total: int, cache: "VectorCache", summary: "IndexSummary",
             options: RayOptions) -> None:
    actors, per_actor = _plan(ray, options)
    embedder, settings = indexer.embedder, indexer.options
    limits = embedder.image_limits
    setup = _ActorSetup(
        spec=embedder.spec, model_version=embedder.name,
        models_dir=str(Path(options.models_dir or indexer.home / "models").resolve()),
        device="cuda" if "num_gpus" in per_actor else "cpu",
        threads=max(1, int(per_actor.get("num_cpus", 1))),
        decode_workers=embedder.workers,
        max_image_bytes=limits.max_bytes, max_image_pixels=limits.max_pixels, max_image_aspect=limits.max_aspect,
        text_batch_size=settings.text_batch_size,
        url_max_bytes=settings.url_max_bytes, url_timeout_s=settings.url_timeout_s,
        precision=embedder.precision,
    )
    indexer.progress.start("embed texts", total)
    indexer.progress.start("embed images", total)
    # Blocks are what Ray Data hands an actor and retries as a whole: small enough that every
    # actor gets some even on a small catalog, and that a killed actor loses little.
    block_rows = max(1, min(4 * settings.batch_size, math.ceil(2 * total / (4 * actors))))
    refs, queued = _queue_work(ray, indexer, cache, summary, block_rows)
    log.info("embedding %d texts and images on %d Ray actors (%s each)", queued, actors, per_actor)
    if queued:
        data = ray.data
        context = data.DataContext.get_current()
        context.enable_progress_bars = False  # Prism's own progress shows the stage
        # A failed job would also log its traceback; the error reaches the user as RayEmbedError.
        ray_data_log = logging.getLogger("ray.data")
        level = ray_data_log.level
        ray_data_log.setLevel(logging.CRITICAL)
        with warnings.catch_warnings():
            # max_restarts / max_task_retries have no named parameter in map_batches yet.
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
            dataset = data.from_arrow_refs(refs).map_batches(
                _EmbedActor, fn_constructor_args=(setup,), batch_size=settings.batch_size, batch_format="numpy",
                compute=data.ActorPoolStrategy(size=actors), **per_actor,
                max_restarts=options.max_restarts, max_task_retries=options.max_restarts,
            )
        try:
            _take_results(ray, dataset, indexer, cache, summary)
        finally:
            ray_data_log.setLevel(level)
    indexer.progress.finish("embed texts")
    indexer.progress.finish("embed images")


def _work_schema():
    import pyarrow as pa

    return pa.schema([
        ("modality", pa.string()), ("row_id", pa.int64()), ("product_id", pa.string()),
        ("payload", pa.string()),  # the text, or the image's path or URL
        ("recorded_hash", pa.string()),  # what SQL holds now (the compare-and-set's `seen`); "": none
        ("cached", pa.bool_()),  # image: the recorded hash's vector is in the cache
    ])


def _queue_work(ray, indexer: "CatalogIndexer", cache: "VectorCache", summary: "IndexSummary",
                block_rows: int) -> tuple[list, int]:
    """Put the work into the object store in blocks of `block_rows`, listing a page of products
    at a time (the driver never holds the whole list); what needs no cluster (cached texts,
    products without images) is recorded here and now."""
    import pyarrow as pa

    from embedder import content_hash
    from indexer.pipeline import product_text

    store, progress = indexer.store, indexer.progress
    schema = _work_schema()
    refs, queued = [], 0
    rows: dict[str, list] = {name: [] for name in schema.names}

    def add(*values) -> None:
        nonlocal queued
        for column, value in zip(rows.values(), values):
            column.append(value)
        queued += 1
        if len(rows["row_id"]) >= block_rows:
            put()

    def put() -> None:
        if rows["row_id"]:
            refs.append(ray.put(pa.table(rows, schema=schema)))
            for column in rows.values():
                column.clear()

    for products in store.iter_live_products(indexer.options.chunk_rows):
        texts = [product_text(p, indexer.text_fields) for p in products]
        hashes = [content_hash(t) for t in texts]
        present = cache.contains_many([f"text:{h}" for h in hashes]).tolist()
        changed = {}
        for p, text, digest, have in zip(products, texts, hashes, present):
            if not have:
                add("text", p.row_id, p.product_id, text, p.text_hash or "", False)
            elif p.text_hash != digest:
                changed[p.row_id] = digest
        if changed:
            store.record_text_hashes(changed, seen={p.row_id: p.text_hash for p in products})
        summary.texts_cached += sum(present)
        progress.advance("embed texts", sum(present))

        indexer._record_imageless(products, summary)
        with_image = [p for p in products if p.image_uri]
        progress.advance("embed images", len(products) - len(with_image))
        known = cache.contains_many([f"image:{p.image_hash}" for p in with_image]).tolist() if with_image else []
        for p, have in zip(with_image, known):
            add("image", p.row_id, p.product_id, p.image_uri, p.image_hash or "", bool(have and p.image_hash))
    put()
    return refs, queued


def _take_results(ray, dataset, indexer: "CatalogIndexer", cache: "VectorCache", summary: "IndexSummary") -> None:
    batches = iter(dataset.iter_batches(batch_size=None, batch_format="numpy"))
    try:
        _take_batches(batches, indexer, cache, summary)
    finally:
        # Closing the iterator ends the job's executor and its threads in this process (see
        # _wait_for_ray_data_threads), also when a batch failed or taking one raised.
        close = getattr(batches, "close", None)
        if close is not None:
            close()


def _take_batches(batches, indexer: "CatalogIndexer", cache: "VectorCache", summary: "IndexSummary") -> None:
    from indexer.pipeline import _RowSet
    from store import ImageState

    store, progress = indexer.store, indexer.progress
    taken = {"text": _RowSet(), "image": _RowSet()}  # a retried batch can come back twice
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as exc:  # only Ray runs in next(): whatever it raises is the job's failure
            raise RayEmbedError(f"the Ray embed job failed: {_cause(exc)}; what came back is kept, run the same "
                                "command again to embed the rest") from None
        text_hashes, text_seen = {}, {}
        states, image_seen = [], {}
        for i, (modality, row) in enumerate(zip(batch["modality"].tolist(), batch["row_id"].tolist())):
            if not taken[modality].add(row):
                continue
            digest, recorded = _text_or_none(batch["hash"][i]), _text_or_none(batch["recorded_hash"][i])
            encoded, reason = bool(batch["encoded"][i]), _text_or_none(batch["failure_reason"][i])
            if modality == "text":
                cache.put(f"text:{digest}", batch["vector"][i], modality="text", ref=str(batch["product_id"][i]))
                summary.texts_embedded += 1
                if digest != recorded:
                    text_hashes[row], text_seen[row] = digest, recorded
                progress.advance("embed texts")
                continue
            image_seen[row] = (_text_or_none(batch["image_uri"][i]), recorded)
            if reason is not None:
                message = _text_or_none(batch["failure_message"][i]) or ""
                summary.image_failed(str(batch["product_id"][i]), reason, message)
                states.append(ImageState(row, image_hash=None, image_status=reason[:32], image_error=message[:2000]))
            else:
                if encoded:
                    cache.put(f"image:{digest}", batch["vector"][i], modality="image", ref=str(batch["product_id"][i]))
                    summary.images_embedded += 1
                else:
                    summary.images_cached += 1
                states.append(ImageState(row, image_hash=digest, image_status="ok"))
            progress.advance("embed images")
        if text_hashes:
            store.record_text_hashes(text_hashes, seen=text_seen)
        if states:
            store.record_image_states(states, seen=image_seen)


def _text_or_none(value) -> str | None:
    # String columns travel with "" for none: a column of nulls comes back from Ray Data as
    # float NaN. Values come back as numpy scalars (np.str_); SQL and keys want plain str.
    return str(value) or None if isinstance(value, str) else None


def _cause(exc: BaseException) -> str:
    """The innermost message of a Ray error: Ray Data wraps the actor's or the task's own
    (`SystemException` around `ActorDiedError`), and the wrappers say little."""
    chain = [exc]
    while len(chain) < 20:
        inner = getattr(chain[-1], "cause", None)
        inner = inner if isinstance(inner, BaseException) else chain[-1].__cause__
        if inner is None or inner in chain:
            break
        chain.append(inner)
    for error in reversed(chain):
        if str(error).strip():
            return f"{type(error).__name__}: {_first_line(error).rstrip('.')}"
    return type(exc).__name__


# ---------------------------------------------------------------- actors


class _EmbedActor:
    """One model on one worker: a batch of work rows in, their hashes and vectors out."""

    def __init__(self, setup: _ActorSetup):
        from embedder import ImageLimits, load_embedder

        if setup.device == "cpu":
            import torch

            # One actor per `cpus_per_actor`: more threads would fight the node's other actors.
            torch.set_num_threads(setup.threads)
        self.setup = setup
        self.limits = ImageLimits(setup.max_image_bytes, setup.max_image_pixels, setup.max_image_aspect)
        self.embedder = load_embedder(setup.spec, device=setup.device, models_dir=setup.models_dir,
                                      workers=setup.decode_workers, image_limits=self.limits,
                                      precision=setup.precision)
        if self.embedder.name != setup.model_version:
            raise RuntimeError(f"{setup.spec} is model {self.embedder.name} on {socket.gethostname()}, but "
                               f"{setup.model_version} on the driver: is {setup.models_dir} the same shared folder?")
        self.readers = ThreadPoolExecutor(max_workers=max(1, setup.decode_workers), thread_name_prefix="prism-read")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["row_id"])
        out = {
            "modality": batch["modality"], "row_id": batch["row_id"], "product_id": batch["product_id"],
            "recorded_hash": batch["recorded_hash"],
            # "" for none: Ray Data turns a column of nulls into float NaN.
            "image_uri": np.full(n, "", dtype=object),
            "hash": np.full(n, "", dtype=object),
            "encoded": np.zeros(n, dtype=bool),
            "vector": np.zeros((n, self.embedder.dim), dtype=np.float32),
            "failure_reason": np.full(n, "", dtype=object),
            "failure_message": np.full(n, "", dtype=object),
        }
        modality = batch["modality"]
        self._texts(batch, np.flatnonzero(modality == "text"), out)
        self._images(batch, np.flatnonzero(modality == "image"), out)
        return out

    def _texts(self, batch, at: np.ndarray, out: dict) -> None:
        if not len(at):
            return
        from embedder import content_hash

        texts = [str(batch["payload"][i]) for i in at]
        unique = list(dict.fromkeys(texts))  # catalogs repeat titles
        vectors = dict(zip(unique, self.embedder.encode_texts(unique, batch_size=self.setup.text_batch_size)))
        for i, text in zip(at, texts):
            out["hash"][i] = content_hash(text)
            out["vector"][i] = vectors[text]
            out["encoded"][i] = True

    def _images(self, batch, at: np.ndarray, out: dict) -> None:
        if not len(at):
            return
        from embedder import ImageDecodeError, content_hash

        uris = [str(batch["payload"][i]) for i in at]
        read = list(self.readers.map(self._read, uris))
        to_encode = []
        for i, uri, data in zip(at, uris, read):
            out["image_uri"][i] = uri
            if isinstance(data, ImageDecodeError):
                out["failure_reason"][i], out["failure_message"][i] = data.reason, str(data)
                continue
            digest = content_hash(data)
            out["hash"][i] = digest
            # The bytes are the ones whose vector the driver already holds: no model call.
            if not (batch["cached"][i] and digest == batch["recorded_hash"][i]):
                to_encode.append((int(i), data))
        if not to_encode:
            return
        # The local stage's own decode, preprocess and encode: the same vectors, the same failures.
        for embedded in self.embedder.embed_images(to_encode, batch_size=len(to_encode)):
            for i, digest, vector in zip(embedded.keys, embedded.hashes, embedded.vectors):
                out["hash"][i], out["vector"][i], out["encoded"][i] = digest, vector, True
            for i, reason, message in embedded.failures:
                out["hash"][i] = ""
                out["failure_reason"][i], out["failure_message"][i] = reason, message

    def _read(self, uri: str):
        """The image's bytes, or the ImageDecodeError that says why there are none."""
        from embedder import ImageDecodeError, read_image_bytes

        try:
            if uri.lower().startswith(("http://", "https://")):
                from indexer.fetch import FetchError, fetch_image_url

                try:
                    return fetch_image_url(uri, max_bytes=self.setup.url_max_bytes, timeout_s=self.setup.url_timeout_s)
                except FetchError as exc:
                    return ImageDecodeError(exc.reason, str(exc))
            return read_image_bytes(Path(uri), self.limits)
        except ImageDecodeError as exc:
            return exc
        except Exception as exc:  # a broken image never aborts a run
            return ImageDecodeError("broken", f"{type(exc).__name__}: {exc}")
