"""Import faiss with an error that names the fix."""

from __future__ import annotations


def import_faiss():
    try:
        import faiss
    except ImportError as exc:
        raise ImportError(
            "faiss is not installed. Install exactly one of the extras: "
            "`pip install 'prism-search[cpu]'` (faiss-cpu) or `pip install 'prism-search[gpu]'` (faiss-gpu). "
            "Both provide the module `faiss`; never install both."
        ) from exc
    return faiss


def gpu_count() -> int:
    faiss = import_faiss()
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0
