"""Incremental catalog changes: one product added, updated or deleted without a rebuild.

An upsert is embedded at once with the serving model and written, with its vectors, to the
product row and the change journal in one transaction (`Store.upsert_product_live`). Servers
replay the journal on top of their index version, so the change is searchable on the next query
in every worker; the next index build includes it like any other product.

Uploaded image bytes are kept content-addressed under `PRISM_HOME/images/<sha256>.<ext>`, so the
product's image can be served and re-embedded later exactly as it was indexed.
"""

from __future__ import annotations

import io
import os
import uuid
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import numpy as np

from embedder import Embedder, ImageDecodeError, ImageLimits, content_hash, decode_image, read_image_bytes
from indexer.catalog import MAX_IMAGES
from indexer.fetch import FetchError, fetch_image_url
from indexer.pipeline import product_text
from store import METADATA_COLUMNS, ConflictError, ProductInput, ProductRecord, ProductVectors, Store, text_field_values

_ATTEMPTS = 5


# Fields a partial update may change: the metadata ones embed nothing.
PATCH_METADATA_FIELDS = METADATA_COLUMNS
PATCH_FIELDS = ("title", "description", *PATCH_METADATA_FIELDS)


def _as_input(p: ProductRecord) -> ProductInput:
    return ProductInput(
        product_id=p.product_id, title=p.title, description=p.description, category=p.category, brand=p.brand,
        price=p.price, currency=p.currency, image_ref=p.image_ref, image_uri=p.image_uri,
        attributes=dict(p.attributes), stock=p.stock,
    )


class UpdateError(ValueError):
    """The change itself is unacceptable (maps to HTTP 4xx); nothing was stored."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class UpsertOutcome:
    product: ProductRecord
    created: bool
    seq: int
    image_action: str  # set | clear | keep
    metadata_only: bool = False  # nothing was embedded: a "meta" journal entry


class CatalogUpdater:
    def __init__(
        self,
        *,
        home: Path,
        store: Store,
        image_limits: ImageLimits = ImageLimits(),
        allow_url_images: bool = False,
        url_max_bytes: int = 10 * 1024 * 1024,
        url_timeout_s: float = 10.0,
    ):
        self.home = Path(home)
        self.store = store
        self.image_limits = image_limits
        self.allow_url_images = allow_url_images
        self.url_max_bytes = min(url_max_bytes, image_limits.max_bytes)
        self.url_timeout_s = url_timeout_s

    @property
    def images_dir(self) -> Path:
        return self.home / "images"

    def upsert(
        self,
        item: ProductInput,
        embedder: Embedder,
        *,
        image: bytes | None = None,
        image_url: str | None = None,
        images: list[bytes] | None = None,
        as_read_at: datetime | None = None,
    ) -> UpsertOutcome:
        """Add or replace one product. With neither `image` nor `image_url` nor `images`, the
        product keeps the images it has; a new product is then text-only. `images`: all its
        images, the first one first (at most MAX_IMAGES); `image` or `image_url` alone makes the
        product's one image (its other images go). `as_read_at`: `item` was made from the product
        as it was at that `updated_at` (a PATCH); ConflictError if it has changed since."""
        if sum(x is not None for x in (image, image_url, images)) > 1:
            raise UpdateError("conflict", "give image bytes, an image URL or a list of images, not more than one")
        extra = None
        if images is not None:
            if len(images) > MAX_IMAGES:
                raise UpdateError("too_many_images", f"{len(images)} images; the limit is {MAX_IMAGES} per product")
            if not images:
                raise UpdateError("no_images", "images is empty: give at least one image, or none to keep them")
            image, extra = images[0], [self._extra_image(data, embedder) for data in images[1:]]
        text = product_text(item, self.store.lexical.text_fields)
        if image is None and image_url is None:
            outcome = self._update_metadata(item, content_hash(text), as_read_at)
            if outcome is not None:
                return outcome
        if image_url is not None:
            image = self._download(image_url)
        new_image = self._new_image(item, image, image_url, embedder) if image is not None else None
        text_vector = embedder.encode_texts([text])[0]
        for attempt in range(_ATTEMPTS):
            # What to do with the image depends on the product as it is now; the store refuses
            # the write if another change lands between this read and the commit.
            current = self.store.get_product(item.product_id, include_deleted=True)
            if as_read_at is not None and (current is None or current.updated_at != as_read_at):
                raise ConflictError(f"product {item.product_id!r} changed after it was read")
            if new_image is not None:
                product, action, image_hash, image_vector = new_image
                # A new first image replaces the product's images: the others are those given.
                state = {"extra_images": tuple(extra or ())}
            else:
                product, action, image_hash, image_vector, state = self._existing_image(item, current, embedder)
            vectors = ProductVectors(
                # The vector space (model and precision): an int8 index must not take fp32 vectors.
                model_version=embedder.vector_space,
                text_hash=content_hash(text),
                text_vector=text_vector,
                image_action=action,
                image_hash=image_hash,
                image_vector=image_vector,
                **state,
            )
            try:
                record, created, seq = self.store.upsert_product_live(
                    product, vectors, expect_updated_at=None if current is None else current.updated_at
                )
            except ConflictError:
                if attempt == _ATTEMPTS - 1:
                    raise UpdateError("busy", f"product {item.product_id!r} keeps changing; try again") from None
                continue
            return UpsertOutcome(record, created, seq, action)
        raise AssertionError("unreachable")

    def _update_metadata(self, item: ProductInput, text_hash: str, as_read_at: datetime | None = None) -> UpsertOutcome | None:
        """A change of price, category, brand, currency or attributes only: no model call, and the
        product's vectors stay where they are (index or overlay). None when more than that changed
        (or the product has no embedded text and image to keep), or it keeps changing meanwhile."""
        for _ in range(_ATTEMPTS):
            current = self.store.get_product(item.product_id)
            if as_read_at is not None and (current is None or current.updated_at != as_read_at):
                raise ConflictError(f"product {item.product_id!r} changed after it was read")
            # The embedded text joins the text fields: compare each, since two different sets of
            # values can join to the same text (and its hash).
            fields = self.store.lexical.text_fields
            if current is None or current.text_hash != text_hash or \
                    (current.title, current.description) != (item.title, item.description) or \
                    text_field_values(current, fields) != text_field_values(item, fields):
                return None
            if current.image_uri is not None and current.image_status not in ("ok", "supplied"):
                return None  # an image no build has embedded: the full path embeds it now
            try:
                record, seq = self.store.update_product_metadata(item, expect_updated_at=current.updated_at)
            except ConflictError:
                continue
            return UpsertOutcome(record, False, seq, "keep", metadata_only=True)
        return None

    def patch_may_embed(self, changes: dict, *, image: bool = False) -> bool:
        """Whether a PATCH of these fields may need the serving model: a new image, or a change
        to a field the embedded text is made of (title and description, plus whatever
        PRISM_TEXT_FIELDS adds: category, brand or an attribute). `patch` writes metadata only,
        embedding nothing, when the embedded text comes out unchanged."""
        embedded = {"title", "description"} | {f.split(".", 1)[0] for f in self.store.lexical.text_fields}
        return image or bool(set(changes) & embedded)

    def patch(
        self,
        product_id: str,
        changes: dict,
        embedder: Embedder | None,
        *,
        image: bytes | None = None,
        image_url: str | None = None,
        images: list[bytes] | None = None,
    ) -> UpsertOutcome | None:
        """Change some fields of a live product (None: there is none by that id). `changes` holds
        catalog fields by name (None clears one). Metadata alone (price, currency, stock,
        category, brand, attributes) is written as a "meta" change, embedding nothing; a new
        title, description or image goes the way of `upsert` and is embedded with `embedder`."""
        unknown = set(changes) - set(PATCH_FIELDS)
        if unknown:
            raise UpdateError("unknown_field", f"cannot patch {', '.join(sorted(unknown))}")
        content = self.patch_may_embed(changes, image=image is not None or image_url is not None or images is not None)
        if not content:
            # One transaction reads and writes the row: one round trip fewer than read-then-write.
            written = self.store.patch_product_metadata(product_id, changes)
            if written is None:
                return None
            return UpsertOutcome(written[0], False, written[1], "keep", metadata_only=True)
        if embedder is None:
            raise UpdateError("no_model", "a change of title, description or image needs the serving model")
        for _ in range(_ATTEMPTS):
            current = self.store.get_product(product_id)
            if current is None:
                return None
            fields = dict(changes)
            if "attributes" in fields:  # Prism's own bookkeeping ("_" keys) is not the client's to drop
                fields["attributes"] = {**{k: v for k, v in current.attributes.items() if k.startswith("_")},
                                        **(fields["attributes"] or {})}
            # The fields not patched come from this read: a change landing after it (a price PATCH
            # from another worker) makes the write fail, and the patch is applied to the new row.
            try:
                return self.upsert(replace(_as_input(current), **fields), embedder, image=image, image_url=image_url,
                                   images=images, as_read_at=current.updated_at)
            except ConflictError:
                continue
        raise UpdateError("busy", f"product {product_id!r} keeps changing; try again")

    def delete(self, product_id: str) -> ProductRecord | None:
        return self.store.soft_delete_product(product_id)

    # ---------------------------------------------------------------- images

    def _download(self, url: str) -> bytes:
        if not self.allow_url_images:
            raise UpdateError("urls_disabled", "image URLs are disabled on this server (PRISM_ALLOW_URL_IMAGES)")
        try:
            return fetch_image_url(url, max_bytes=self.url_max_bytes, timeout_s=self.url_timeout_s)
        except FetchError as exc:
            raise UpdateError(exc.reason, f"cannot fetch the image URL: {exc}") from None

    def _new_image(self, item: ProductInput, data: bytes, url: str | None, embedder: Embedder):
        data = read_image_bytes(data, self.image_limits)  # size limits; raises ImageDecodeError
        decoded = decode_image(data, self.image_limits)
        vector = embedder.encode_images([decoded])[0]
        digest = content_hash(data)
        path = self._keep_image(data, digest)
        ref = url if url is not None else str(path.relative_to(self.home))
        return replace(item, image_ref=ref, image_uri=str(path.resolve())), "set", digest, vector

    def _extra_image(self, data: bytes, embedder: Embedder) -> tuple[str, str, str, "np.ndarray"]:
        """One of the images after the first of an upsert: checked, kept on disk, embedded."""
        data = read_image_bytes(data, self.image_limits)  # size limits; raises ImageDecodeError
        vector = embedder.encode_images([decode_image(data, self.image_limits)])[0]
        digest = content_hash(data)
        path = self._keep_image(data, digest)
        return str(path.relative_to(self.home)), str(path.resolve()), digest, vector

    def _existing_image(self, item: ProductInput, current: ProductRecord | None, embedder: Embedder):
        if current is not None and current.deleted_at is None and current.image_status == "supplied":
            # An image vector made elsewhere (`prism index --vectors`) stays the product's image.
            item = replace(item, image_ref=current.image_ref, image_uri=current.image_uri)
            return item, "keep", current.image_hash, None, {}
        if current is None or not current.image_uri:
            return replace(item, image_ref=None, image_uri=None), "clear", None, None, {"image_status": "none"}
        item = replace(item, image_ref=current.image_ref, image_uri=current.image_uri)
        if current.deleted_at is None and current.image_status == "ok":
            return item, "keep", current.image_hash, None, {}
        # A restored product, or one whose image no build has embedded yet: embed it now if it is
        # a local file; otherwise the product is text-only until the next build fetches it.
        if current.image_uri.lower().startswith(("http://", "https://")):
            return item, "clear", None, None, {"image_status": "pending"}
        try:
            data = read_image_bytes(current.image_uri, self.image_limits)
            vector = embedder.encode_images([decode_image(data, self.image_limits)])[0]
        except ImageDecodeError as exc:
            return item, "clear", None, None, {"image_status": exc.reason[:32], "image_error": str(exc)[:2000]}
        return item, "set", content_hash(data), vector, {}

    def _keep_image(self, data: bytes, digest: str) -> Path:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as img:
            ext = (img.format or "bin").lower()
        self.images_dir.mkdir(parents=True, exist_ok=True)
        path = self.images_dir / f"{digest}.{ext}"
        if not path.exists():
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        return path
