"""Offline retrieval evaluation: recall@k and MRR, text->image and image->text.

An evaluation set is a gallery of items (an image and the text the text index holds for it), a
relevance key per item (items with the same key are interchangeable answers, e.g. the skin-tone
variants of one emoji), and text queries that each name the key they should find.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from embedder import Embedder, ImageSource

RECALL_AT = (1, 5, 10)


@dataclass(frozen=True)
class TextQuery:
    text: str
    key: str
    kind: str = "title"  # title | alias


@dataclass
class EvalSet:
    name: str
    item_ids: list[str]
    keys: list[str]
    images: list[ImageSource]
    texts: list[str]  # what the text index holds per item
    queries: list[TextQuery]

    def __post_init__(self) -> None:
        if not (len(self.item_ids) == len(self.keys) == len(self.images) == len(self.texts)):
            raise ValueError("item_ids, keys, images and texts must have the same length")
        if not self.item_ids:
            raise ValueError(f"evaluation set {self.name!r} is empty")


@dataclass
class RetrievalScores:
    queries: int
    recall: dict[str, float]
    mrr: float

    def at(self, k: int) -> float:
        return self.recall[f"@{k}"]


@dataclass
class EvalReport:
    name: str
    model_version: str
    gallery: int
    text_to_image: RetrievalScores
    image_to_text: RetrievalScores
    title_to_image: RetrievalScores
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def rank_metrics(similarity: np.ndarray, relevant: np.ndarray, ks: Sequence[int] = RECALL_AT) -> RetrievalScores:
    """similarity (queries x gallery); relevant: same shape, True where a gallery item answers the query."""
    if similarity.shape != relevant.shape:
        raise ValueError("similarity and relevant must have the same shape")
    if not relevant.any(axis=1).all():
        raise ValueError("every query needs at least one relevant gallery item")
    ranks = first_relevant_ranks(similarity, relevant)
    return RetrievalScores(
        queries=int(len(ranks)),
        recall={f"@{k}": round(float((ranks <= k).mean()), 4) for k in ks},
        mrr=round(float((1.0 / ranks).mean()), 4),
    )


def first_relevant_ranks(similarity: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """1-based rank of each query's best-placed relevant item: how many items score strictly higher, plus one."""
    best_relevant = np.where(relevant, similarity, -np.inf).max(axis=1)
    return (similarity > best_relevant[:, None]).sum(axis=1) + 1


def ndcg_at(similarity: np.ndarray, relevant: np.ndarray, k: int = 10, weights: np.ndarray | None = None) -> float:
    """Mean nDCG@k with binary gains (every relevant item in the top k counts, discounted by rank);
    `weights`: a weighted mean over the queries."""
    k = min(k, similarity.shape[1])
    top = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = (np.take_along_axis(relevant, top, axis=1) * discounts).sum(axis=1)
    ideal = np.array([discounts[: min(int(n), k)].sum() for n in relevant.sum(axis=1)])
    return round(float(np.average(dcg / np.maximum(ideal, 1e-12), weights=weights)), 4)


def evaluate(embedder: Embedder, data: EvalSet, *, batch_size: int = 256) -> EvalReport:
    image_vectors = embed_images(embedder, data.images, batch_size)
    text_vectors = embedder.encode_texts(data.texts)
    keys = np.asarray(data.keys)
    query_vectors = embedder.encode_texts([q.text for q in data.queries])
    query_keys = np.asarray([q.key for q in data.queries])

    t2i_relevant = query_keys[:, None] == keys[None, :]
    t2i = rank_metrics(query_vectors @ image_vectors.T, t2i_relevant)
    titles = np.asarray([q.kind == "title" for q in data.queries])
    title = rank_metrics((query_vectors @ image_vectors.T)[titles], t2i_relevant[titles])
    i2t = rank_metrics(image_vectors @ text_vectors.T, keys[:, None] == keys[None, :])
    return EvalReport(data.name, embedder.name, len(data.item_ids), t2i, i2t, title)


def embed_images(embedder: Embedder, images: Sequence[ImageSource], batch_size: int) -> np.ndarray:
    parts = []
    for batch in embedder.embed_images(enumerate(images), batch_size=batch_size):
        if batch.failures:
            key, reason, message = batch.failures[0]
            raise ValueError(f"cannot evaluate: image {key} failed ({reason}: {message})")
        parts.append(batch.vectors)
    return np.concatenate(parts)
