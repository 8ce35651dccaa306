"""Offline retrieval evaluation: recall@k and MRR, text->image and image->text.

An evaluation set is a gallery of items (an image and the text the text index holds for it), a
relevance key per item (items with the same key are interchangeable answers, e.g. the skin-tone
variants of one emoji), and text queries that each name the key they should find.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from embedder import Embedder, ImageSource
from feedback.pairs import normalise_query
from store import text_field_values

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


# ---- language slices: queries in another language's field against the catalog's images


@dataclass
class LanguageSlice:
    """Text -> image retrieval for queries written in one catalog field (e.g. attributes.title_zh):
    one query per distinct value; the products holding that value are its answers."""

    field: str
    products: int  # products with a value in the field
    gallery: int
    scores: RetrievalScores

    def to_dict(self) -> dict:
        return asdict(self)


def language_slices(embedder: Embedder, products: Sequence, fields: Sequence[str], *, gallery_max: int = 50_000,
                    seed: int = 0, batch_size: int = 256) -> dict[str, LanguageSlice]:
    """One slice per field in `fields` that any of `products` (store ProductRecords with images)
    has a value for. The gallery is every product's image (a seeded sample of `gallery_max` when
    larger, always keeping those with a value), so a query competes with the whole catalog, as it
    does when a shopper searches."""
    with_image = [p for p in products if p.image_status == "ok" and p.image_uri]
    values = {f: [text_field_values(p, (f,))[0] for p in with_image] for f in fields}
    holders = {f: [i for i, v in enumerate(vs) if v] for f, vs in values.items()}
    holders = {f: idx for f, idx in holders.items() if idx}
    if not holders:
        return {}
    keep = sorted({i for idx in holders.values() for i in idx})
    rest = sorted(set(range(len(with_image))) - set(keep))
    extra = random.Random(seed).sample(rest, max(0, min(len(rest), gallery_max - len(keep))))
    gallery = sorted(keep + extra)
    image_vectors = embed_images(embedder, [with_image[i].image_uri for i in gallery], batch_size)
    out = {}
    for f, idx in holders.items():
        keys = np.asarray([normalise_query(values[f][i]) if values[f][i] else "" for i in gallery])
        queries = sorted({normalise_query(values[f][i]) for i in idx})
        text_of = {normalise_query(values[f][i]): values[f][i].strip() for i in idx}
        query_vectors = embedder.encode_texts([text_of[q] for q in queries])
        relevant = np.asarray(queries)[:, None] == keys[None, :]
        out[f] = LanguageSlice(f, len(idx), len(gallery), rank_metrics(query_vectors @ image_vectors.T, relevant))
    return out
