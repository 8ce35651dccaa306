"""One dedicated thread for the model and FAISS work of a multi-threaded server.

A server answers requests on many threads, but a CPU forward pass is thousands of small OpenMP
parallel regions, and FAISS searches use OpenMP too. Every live OS thread that enters a parallel
region keeps its own thread team; with more OpenMP threads than cores the runtime stops spinning
between regions and each region pays a wake-up. Measured on 2 cores: one FAISS search on a second
live thread makes ViT-B-32 encoding of a one-query text batch go from 14 ms to 25 ms, for good.
Running model loading, encoding and ANN search on one thread keeps one team; it is also where
concurrent queries can be batched.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")


class ModelThread:
    def __init__(self, name: str = "prism-model"):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._ident: int | None = None
        self._executor.submit(self._remember).result()

    def _remember(self) -> None:
        self._ident = threading.get_ident()

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call `fn` on the model thread and wait for it (directly when already on it)."""
        if threading.get_ident() == self._ident:
            return fn(*args, **kwargs)
        return self._executor.submit(fn, *args, **kwargs).result()

    def load(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `fn` (a model load) on a short-lived thread and wait for it.

        The model thread keeps serving queries meanwhile; the loader's OpenMP team ends with its
        thread, so it leaves nothing behind to compete with the model thread's team.
        """
        out: dict[str, Any] = {}

        def target() -> None:
            try:
                out["value"] = fn(*args, **kwargs)
            except BaseException as exc:  # re-raised in the caller
                out["error"] = exc

        thread = threading.Thread(target=target, name="prism-model-loader", daemon=True)
        thread.start()
        thread.join()
        if "error" in out:
            raise out["error"]
        return out["value"]

    def bind(self, embedder) -> "ThreadBoundEmbedder":
        return ThreadBoundEmbedder(embedder, self)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class ThreadBoundEmbedder:
    """An Embedder whose query-time encoders run on a ModelThread; everything else is delegated."""

    def __init__(self, embedder, thread: ModelThread):
        self._embedder = embedder
        self._thread = thread

    @property
    def unbound(self):
        return self._embedder

    def encode_texts(self, texts, **kwargs) -> np.ndarray:
        return self._thread.run(self._embedder.encode_texts, texts, **kwargs)

    def encode_images(self, images) -> np.ndarray:
        return self._thread.run(self._embedder.encode_images, images)

    def __getattr__(self, name: str):
        return getattr(self._embedder, name)
