"""The Embedder interface and its streaming pipeline.

Reading, hashing, decoding and preprocessing run in a thread pool that stays a few batches ahead
of the model, so the model never waits for the disk (Pillow and torch release the GIL for the
heavy parts). Vectors come out L2-normalised float32.
"""

from __future__ import annotations

import logging
import queue
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embedder.cache import VectorCache
from embedder.images import ImageDecodeError, ImageLimits, ImageSource, content_hash, decode_image, image_data

log = logging.getLogger(__name__)


@dataclass
class EmbeddedBatch:
    """One batch out of the pipeline. `keys[i]` owns `vectors[i]` and `hashes[i]`."""

    keys: list[Any]
    hashes: list[str]
    vectors: np.ndarray
    failures: list[tuple[Any, str, str]] = field(default_factory=list)  # (key, reason, message)
    encoded: int = 0  # computed by the model now; the rest came from the cache
    attempted: int = 0


@dataclass
class _Prepared:
    key: Any
    hash: str | None = None
    tensor: Any = None
    cached: bool = False
    failure: tuple[str, str] | None = None


_END = object()


class Embedder(ABC):
    """Projects images and texts into one L2-normalised space."""

    name: str  # the model version: a stable name for these weights
    spec: str
    dim: int

    def __init__(
        self, *, name: str, spec: str, device: str, image_limits: ImageLimits | None = None, workers: int = 2,
        precision: str = "fp32",
    ):
        self.name = name
        # fp32, bf16 or int8 (embedder.precision): what the weights were loaded as; set by the factory.
        self.precision = str(getattr(precision, "value", precision))
        self.spec = spec
        self.device = device
        self.image_limits = image_limits or ImageLimits()
        self.workers = max(1, workers)

    # ---- what a backend provides

    @abstractmethod
    def preprocess(self, image) -> Any:
        """PIL RGB image -> model input tensor (runs in worker threads)."""

    @abstractmethod
    def _encode_image_tensors(self, batch) -> np.ndarray:
        """Stacked preprocessed images -> unnormalised features as float32 numpy."""

    @abstractmethod
    def _encode_text_list(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> unnormalised features as float32 numpy."""

    @abstractmethod
    def stack(self, tensors: list) -> Any:
        """Preprocessed tensors -> one batch for `_encode_image_tensors`."""

    def calibration_pass(self, texts: Sequence[str]) -> None:
        """Run the text tower on `texts` the way queries run it (int8 calibration watches this)."""
        self._encode_text_list(texts)

    def probe_towers(self) -> None:
        """One text and one blank image through both towers: a model that cannot run at its
        precision fails here, when it loads, instead of on a shopper's first query."""
        from PIL import Image

        self._encode_text_list(["probe"])
        self._encode_image_tensors(self.stack([self.preprocess(Image.new("RGB", (64, 64), "white"))]))

    # ---- simple calls (queries)

    def encode_images(self, images: Sequence[ImageSource]) -> np.ndarray:
        """Encode images now; raises ImageDecodeError on the first unusable one."""
        tensors = [self._preprocess_checked(decode_image(image_data(src, self.image_limits), self.image_limits)) for src in images]
        if not tensors:
            return np.zeros((0, self.dim), dtype=np.float32)
        return _normalise(self._encode_image_tensors(self.stack(tensors)))

    def _preprocess_checked(self, image) -> Any:
        try:
            return self.preprocess(image)
        except MemoryError:
            raise ImageDecodeError("too_many_pixels", "image is too large to preprocess") from None
        except Exception as exc:  # a decoded image the transforms still cannot take
            raise ImageDecodeError("broken", f"cannot preprocess image: {type(exc).__name__}: {exc}") from None

    def encode_texts(self, texts: Sequence[str], *, batch_size: int = 256) -> np.ndarray:
        parts = [
            _normalise(self._encode_text_list(texts[i : i + batch_size])) for i in range(0, len(texts), batch_size)
        ]
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), dtype=np.float32)

    # ---- streaming (indexing)

    def embed_images(
        self,
        items: Iterable[tuple[Any, ImageSource]],
        *,
        batch_size: int = 64,
        cache: VectorCache | None = None,
        ref: Callable[[Any], str] = str,
        prefetch_batches: int = 3,
    ) -> Iterator[EmbeddedBatch]:
        """Embed (key, image source) pairs in batches; failures are reported, never raised."""
        limits = self.image_limits

        def prepare(item: tuple[Any, ImageSource]) -> _Prepared:
            key, src = item
            try:
                data = image_data(src, limits)
                digest = content_hash(data) if isinstance(data, bytes) else None
                if digest is not None and cache is not None and f"image:{digest}" in cache:
                    return _Prepared(key, digest, cached=True)
                tensor = self.preprocess(decode_image(data, limits))
                return _Prepared(key, digest, tensor)
            except ImageDecodeError as exc:
                return _Prepared(key, failure=(exc.reason, str(exc)))
            except Exception as exc:  # a broken image never aborts a run
                return _Prepared(key, failure=("broken", f"{type(exc).__name__}: {exc}"))

        for prepared in _prefetch(_batched(items, batch_size), prepare, self.workers, prefetch_batches):
            yield self._finish_image_batch(prepared, cache, ref)

    def _finish_image_batch(self, prepared: list[_Prepared], cache: VectorCache | None, ref) -> EmbeddedBatch:
        to_encode = [p for p in prepared if p.tensor is not None]
        fresh = {}
        if to_encode:
            vectors = _normalise(self._encode_image_tensors(self.stack([p.tensor for p in to_encode])))
            for p, vec in zip(to_encode, vectors):
                if p.hash is None:  # an in-memory image: hash the decoded tensor instead
                    p.hash = content_hash(np.ascontiguousarray(vec).tobytes())
                fresh[id(p)] = vec
                if cache is not None:
                    cache.put(f"image:{p.hash}", vec, modality="image", ref=ref(p.key))
        keys, hashes, rows, failures = [], [], [], []
        ok = [p for p in prepared if p.failure is None]
        cached = [p for p in ok if id(p) not in fresh]
        # One batched cache read (a lookup per key, a read per shard), not a shard open per key.
        from_cache = dict(zip(map(id, cached), cache.get_many([f"image:{p.hash}" for p in cached])[0])) if cached else {}
        for p in prepared:
            if p.failure is not None:
                failures.append((p.key, *p.failure))
                continue
            keys.append(p.key)
            hashes.append(p.hash)
            rows.append(fresh[id(p)] if id(p) in fresh else from_cache[id(p)])
        matrix = np.stack(rows).astype(np.float32) if rows else np.zeros((0, self.dim), np.float32)
        return EmbeddedBatch(keys, hashes, matrix, failures, encoded=len(to_encode), attempted=len(prepared))

    def embed_texts(
        self,
        items: Iterable[tuple[Any, str]],
        *,
        batch_size: int = 256,
        cache: VectorCache | None = None,
        ref: Callable[[Any], str] = str,
    ) -> Iterator[EmbeddedBatch]:
        for chunk in _batched(items, batch_size):
            keys = [k for k, _ in chunk]
            hashes = [content_hash(t) for _, t in chunk]
            missing = [i for i, h in enumerate(hashes) if cache is None or f"text:{h}" not in cache]
            missing_set = set(missing)
            vectors = np.zeros((len(chunk), self.dim), dtype=np.float32)
            if missing:
                # De-duplicate identical texts inside a batch: catalogs repeat titles a lot.
                unique = list(dict.fromkeys(chunk[i][1] for i in missing))
                encoded = dict(zip(unique, _normalise(self._encode_text_list(unique))))
                for i in missing:
                    vectors[i] = encoded[chunk[i][1]]
                    if cache is not None:
                        cache.put(f"text:{hashes[i]}", vectors[i], modality="text", ref=ref(keys[i]))
            cached = [i for i in range(len(chunk)) if i not in missing_set]
            if cached:
                vectors[cached] = cache.get_many([f"text:{hashes[i]}" for i in cached])[0]
            yield EmbeddedBatch(keys, hashes, vectors, encoded=len(missing), attempted=len(chunk))

    def autocast(self):
        if self.device.startswith("cuda"):
            import torch

            return torch.autocast("cuda", dtype=torch.float16)
        if self.precision == "bf16":
            import torch

            return torch.autocast("cpu", dtype=torch.bfloat16)
        return nullcontext()

    @property
    def vector_space(self) -> str:
        """What this embedder's vectors are cached under: the model version, and the precision
        when it is not fp32 (vectors of one model at two precisions are not interchangeable)."""
        from embedder.precision import vector_space

        return vector_space(self.name, self.precision)

    def query_text_key(self, text: str) -> str:
        """`text` as a query-cache key: only differences this embedder's tokenizer cannot see are
        folded. Every tokenizer here splits on whitespace, so runs of Unicode whitespace (and the
        ends) collapse to one space; case is folded only where the tokenizer lowercases itself
        (`_tokenizer_lowercases`). Accents, Unicode forms and punctuation are kept as typed."""
        key = " ".join(text.split())
        return key.lower() if self._tokenizer_lowercases() else key

    def _tokenizer_lowercases(self) -> bool:
        return False


def tokenizer_lowercases(tokenizer) -> bool:
    """Whether `tokenizer` lowercases text itself before it splits it, asked of its own normaliser
    (not guessed from the model's name): open_clip's `clean_fn`, a Hugging Face fast tokenizer's
    normaliser (open_clip's HFTokenizer wraps one). Unknown kinds: False, so the query cache
    folds nothing a model might distinguish."""
    probe = "Prism QUERY"
    clean = getattr(tokenizer, "clean_fn", None)
    if callable(clean) and not hasattr(tokenizer, "tokenizer"):  # open_clip SimpleTokenizer
        try:
            return clean(probe) == probe.lower()
        except Exception:
            return False
    inner = getattr(tokenizer, "tokenizer", None)  # open_clip HFTokenizer -> its transformers tokenizer
    hf = inner if inner is not None else tokenizer
    normalizer = getattr(getattr(hf, "backend_tokenizer", None), "normalizer", None)
    if normalizer is None:
        return False
    try:
        return normalizer.normalize_str(probe) == probe.lower()
    except Exception:
        return False


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def _batched(items: Iterable, size: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _prefetch(batches: Iterator[list], fn, workers: int, depth: int) -> Iterator[list]:
    """Map fn over each batch in a thread pool, up to `depth` batches ahead of the consumer."""
    out: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def produce() -> None:
        try:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="prism-decode") as pool:
                for batch in batches:
                    if stop.is_set():
                        return
                    result = list(pool.map(fn, batch))
                    while not stop.is_set():
                        try:
                            out.put(result, timeout=0.1)
                            break
                        except queue.Full:
                            continue
        except BaseException as exc:  # surface reader errors in the consuming thread
            out.put(exc)
            return
        out.put(_END)

    thread = threading.Thread(target=produce, name="prism-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = out.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
