"""indexer: catalog readers, the ingestion pipeline, FAISS index construction and index-version artifacts."""

from indexer.ann import AnnConfig, AnnIndex, AnnInfo, IdSet, plan_factory
from indexer.catalog import MAX_IMAGES, CatalogError, CatalogRow, ImagePolicy, RowError, read_catalog
from indexer.faiss_import import gpu_count, import_faiss
from indexer.fetch import FetchError, fetch_image_url
from indexer.openmoji import ATTRIBUTION, DemoCatalog, DemoCatalogError, EmojiProduct, build_demo_catalog, load_demo_catalog
from indexer.incremental import PATCH_FIELDS, PATCH_METADATA_FIELDS, CatalogUpdater, UpdateError, UpsertOutcome
from indexer.pipeline import (
    EXTRA_IMAGE_INDEX,
    DEFAULT_MODEL_SPEC,
    CatalogIndexer,
    FeedSync,
    IndexOptions,
    IndexSummary,
    NoProgress,
    Progress,
    index_model_spec,
    product_text,
)
from indexer.retention import RetentionOutcome, apply_retention, build_hold
from indexer.vectors_file import VectorChunk, VectorsFileError, read_vectors_file
from indexer.versions import (
    IndexVersionError,
    LoadedIndexVersion,
    copy_version,
    fsync_dir,
    fsync_files,
    index_version_path,
    load_index_version,
    mark_pending,
    mark_recorded,
    remove_unrecorded,
)

__all__ = [
    "MAX_IMAGES",
    "EXTRA_IMAGE_INDEX",
    "PATCH_FIELDS",
    "PATCH_METADATA_FIELDS",
    "ATTRIBUTION",
    "apply_retention",
    "copy_version",
    "build_hold",
    "DemoCatalog",
    "DemoCatalogError",
    "EmojiProduct",
    "build_demo_catalog",
    "load_demo_catalog",
    "AnnConfig",
    "AnnIndex",
    "AnnInfo",
    "CatalogError",
    "CatalogIndexer",
    "FeedSync",
    "CatalogUpdater",
    "CatalogRow",
    "FetchError",
    "IdSet",
    "ImagePolicy",
    "IndexOptions",
    "IndexSummary",
    "DEFAULT_MODEL_SPEC",
    "index_model_spec",
    "IndexVersionError",
    "LoadedIndexVersion",
    "NoProgress",
    "Progress",
    "RetentionOutcome",
    "RowError",
    "UpdateError",
    "UpsertOutcome",
    "VectorChunk",
    "VectorsFileError",
    "fetch_image_url",
    "fsync_dir",
    "fsync_files",
    "gpu_count",
    "import_faiss",
    "index_version_path",
    "load_index_version",
    "mark_pending",
    "mark_recorded",
    "plan_factory",
    "product_text",
    "read_catalog",
    "read_vectors_file",
    "remove_unrecorded",
]
