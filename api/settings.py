"""Prism's one settings object: PRISM_* environment variables, then ./prism.toml, then defaults."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource


class PrismSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PRISM_", toml_file="prism.toml", extra="ignore")

    home: Path = Field(Path("prism-data"), description="PRISM_HOME: database, models, embeddings, indexes")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default sqlite:///$PRISM_HOME/prism.db")
    shared_dir: Path | None = Field(
        None, description="PRISM_SHARED_DIR: where replicas sharing one PostgreSQL keep index and model versions, "
        "vector caches and uploaded images (a shared filesystem path, the same on every host); unset: PRISM_HOME",
    )
    model: str | None = Field(
        None, description="model spec `prism index` embeds with; unset: the model of the home's active index "
        "version, or ViT-B-32:laion2b_s34b_b79k in an empty home",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    progress_log_s: float = Field(
        30.0, gt=0, description="where stderr is not a terminal (a log file, nohup, CI), a long job prints one "
        "progress line per stage this often, as a terminal's bars are only drawn at the end there",
    )
    threads: int = Field(0, ge=0, description="torch/faiss threads; 0 = all cores")
    batch_size: int = Field(64, ge=1, le=4096)
    decode_workers: int = Field(2, ge=1, le=64)
    admin_token: SecretStr | None = None
    flat_threshold: int = Field(20_000, ge=0, description="below this many vectors, exact Flat search")
    recall_target: float = Field(0.95, gt=0, le=1.0)
    rerank_compact_from: int = Field(
        500_000, ge=0, description="from this many vectors an IVF-PQ index keeps 6-bit re-rank residuals instead "
        "of 8-bit: 0.24x the bytes of float32 vectors instead of 0.30x at 1M x 512, where 8 bits reached the "
        "recall target at half the probed lists, 1.66x the batch-1 q/s (benchmarks/rerank_precision.py); raise "
        "it to trade memory for speed")
    allow_url_images: bool = False
    cors_origins: list[str] = Field(
        default_factory=list, description="browser origins allowed to call the API cross-site; none by default"
    )
    image_root: Path | None = None
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(40_000_000, ge=1)
    keep_versions: int = Field(
        3, ge=1,
        description="index versions kept after a build (the newest by creation, plus the active one); older "
        "ones lose their files and row, and the change journal entries every kept version holds are deleted; "
        "model versions Prism trained that no kept index uses, beyond the newest this many, go with their files",
    )
    query_batching: bool = Field(True, description="encode concurrent text queries as one batch")
    query_batch_window_ms: float = Field(2.0, ge=0, le=100, description="longest a batch waits for queries in flight")
    query_batch_max: int = Field(32, ge=1, le=1024, description="most text queries encoded in one batch")
    query_cache_entries: int = Field(
        10_000, ge=0, description="query vectors (text and image) kept per server process; 0 disables the cache")
    query_cache_bytes: int = Field(
        64 * 1024 * 1024, ge=0, description="memory the query-vector cache may hold per process; 0 disables it")
    result_cache_entries: int = Field(
        10_000, ge=0, description="ranked pages of repeated text queries kept per server process, for the catalog "
        "state they were ranked at (any catalog change or version swap empties it); 0 disables the cache")
    metadata_cache_entries: int = Field(
        50_000, ge=0, description="product records kept per server process for search hits, kept current with the "
        "catalog journal; 0 reads them from the database for every search")
    search_log_flush_ms: float = Field(
        20.0, ge=0, le=60_000,
        description="search-log rows are written in groups at least this often (ms), off the request path; "
        "a SIGKILL loses the rows of searches answered within this window (their events are refused), a "
        "graceful shutdown none; 0 writes each row before the search answers",
    )
    search_log_group_rows: int = Field(256, ge=1, le=10_000, description="a group is written as soon as this many rows wait")
    search_log_max_queued: int = Field(
        10_000, ge=1, description="search-log rows a server process holds unwritten; searches wait for room beyond it")
    encoder_precision: Literal["fp32", "bf16", "int8"] = Field(
        "fp32", description="precision `prism index` embeds at: int8 (Linear weights quantised), bf16 (only "
        "where the CPU has native bf16 kernels, else fp32 with a log line); queries always follow the "
        "precision the serving index was built at",
    )
    retrain_window_days: float = Field(30.0, gt=0, description="how far back the retrain job mines events")
    retrain_holdout_fraction: float = Field(0.2, gt=0, lt=1, description="latest share of clicked searches kept for the gate")
    retrain_min_mrr_gain: float = Field(
        0.0, ge=-1, le=1, description="the lower confidence bound of the MRR lift on later clicks must be above this "
        "(-1 lets any candidate through: for tests)")
    retrain_max_catalog_recall_drop: float = Field(0.01, ge=0, le=1, description="catalog title recall@1 a candidate may lose")
    retrain_gate_ci_level: float = Field(0.95, gt=0, lt=1, description="confidence level of the gate's bootstrap interval")
    retrain_gate_resamples: int = Field(1000, ge=10, le=100_000, description="bootstrap resamples of the later queries")
    retrain_catalog_mix: float = Field(0.8, ge=0, le=0.95, description="share of fine-tune items that are catalog pairs")
    retrain_min_pairs: int = Field(10, ge=1, description="fewer mined click pairs than this: the run is skipped")
    retrain_min_clicks: int = Field(2, ge=1, description="clicks a (query, product) pair needs to be trusted")
    retrain_epochs: int = Field(40, ge=1, le=1000, description="fine-tune epochs over the mined and catalog pairs")
    retrain_promotion: Literal["direct", "canary"] = Field(
        "direct", description="how a retrain's candidate that passes the gate is promoted: activated at once "
        "(direct), or started as an interleaved canary that promotes it only if it wins on live clicks (canary)",
    )
    canary_fraction: float = Field(
        0.1, gt=0, le=1, description="share of searches a canary started by a retrain interleaves")
    canary_min_queries: int = Field(
        200, ge=1, description="interleaved searches with a winner a canary needs before it is promoted or stopped")
    canary_max_queries: int = Field(
        5000, ge=1, description="with this many searches with a winner and no significant difference, a canary stops")
    canary_alpha: float = Field(0.05, gt=0, lt=1, description="p-value below which a canary wins or loses")
    canary_sequential: bool = Field(
        True, description="decide on the always-valid sequential p-value (true), which repeated reviews do not "
        "make too eager, or on the fixed-sample sign test's (false)")
    canary_review_interval_s: float = Field(
        5.0, ge=0, description="a server reviews the running canary's evidence at most this often, after events")
    retrain_adapters: bool = Field(
        True, description="fine-tune LoRA adapters on the towers' trunks (base weights frozen) and write the "
        "candidate as an adapter version over the serving model version; false: fine-tune the weights themselves",
    )
    retrain_adapter_rank: int = Field(8, ge=1, le=256, description="LoRA rank of the retrain's adapters")
    retrain_adapter_alpha: float = Field(16.0, gt=0, description="LoRA alpha (the adapters' output scales by alpha/rank)")
    retrain_adapter_lr: float = Field(1e-3, gt=0, le=1, description="learning rate of the adapters (the rest trains at 3e-4)")
    retrain_adapter_towers: str = Field(
        "text", description="towers whose trunks get adapters: text, image or text,image (a tower without them "
        "is frozen whole, see PRISM_RETRAIN_ADAPTER_FREEZE_UNADAPTED)",
    )
    retrain_adapter_freeze_unadapted: bool = Field(
        True, description="with adapters, freeze a tower that has none whole (its features are computed once "
        "per run, not every step: the retrain costs what the adapted trunk costs); false: it trains whole",
    )
    retrain_adapter_targets: str = Field(
        "c_fc,c_proj,query,key,value,dense",
        description="adapted modules: Linear layers inside a trunk whose names end with one of these (fnmatch "
        "patterns; attn adapts open_clip's whole MultiheadAttention)",
    )
    log_retention_days: float = Field(
        90.0, gt=0,
        description="searches (query text, uploaded image hashes) and their events older than this many days are "
        "deleted by every retrain run; never fewer than retrain_window_days, which the job reads",
    )

    text_fields: str = Field(
        "title,description",
        description="catalog fields whose values form a product's embedded and lexically indexed text, in order: "
        "title, description, category, brand or attributes.NAME (e.g. title,attributes.title_zh); a change "
        "re-embeds the texts at the next `prism index`",
    )
    id_attributes: str = Field(
        "",
        description="attributes whose values are exact identifiers (e.g. gtin,sku): a query equal to one, or to "
        "a product_id, returns that product first",
    )

    eval_language_fields: str = Field(
        "attributes.title_zh",
        description="`prism eval` reports one slice per field: its values as queries against the catalog's "
        "images (e.g. the Chinese titles of an English catalog); empty for none",
    )

    @field_validator("eval_language_fields")
    @classmethod
    def _valid_eval_language_fields(cls, value: str) -> str:
        from store import parse_field_list, parse_text_fields

        return ",".join(parse_text_fields(value)) if parse_field_list(value, what="eval language fields") else ""

    def eval_languages(self) -> tuple[str, ...]:
        from store import parse_field_list

        return parse_field_list(self.eval_language_fields, what="eval language fields")

    @field_validator("text_fields")
    @classmethod
    def _valid_text_fields(cls, value: str) -> str:
        from store import parse_text_fields

        return ",".join(parse_text_fields(value))

    @field_validator("retrain_adapter_towers", "retrain_adapter_targets")
    @classmethod
    def _valid_adapter_lists(cls, value: str, info) -> str:
        items = [v.strip() for v in value.split(",") if v.strip()]
        if not items:
            raise ValueError(f"{info.field_name} needs at least one name")
        if info.field_name == "retrain_adapter_towers" and not set(items) <= {"text", "image"}:
            raise ValueError(f"adapter towers are text and/or image, not {value!r}")
        return ",".join(items)

    @field_validator("id_attributes")
    @classmethod
    def _valid_id_attributes(cls, value: str) -> str:
        from store import parse_field_list

        return ",".join(parse_field_list(value, what="identifier attributes"))

    def lexical(self):
        """The lexical config `prism index` builds with (store.LexicalConfig, from text_fields and
        id_attributes), or None when neither is set: then the index keeps what its active version
        was built with. Other commands and servers always follow the served version's config."""
        from store import LexicalConfig, parse_field_list, parse_text_fields

        if not {"text_fields", "id_attributes"} & self.model_fields_set:
            return None
        return LexicalConfig(parse_text_fields(self.text_fields), parse_field_list(self.id_attributes, what="identifier attributes"))

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home.resolve() / 'prism.db'}"

    @property
    def artifacts(self) -> Path:
        """Where index and model versions, vector caches and uploaded images are published: the
        shared directory of a replica set, else the home. (The database, locks of a single host
        and a replica's local copies stay in the home.)"""
        return self.shared_dir if self.shared_dir is not None else self.home

    @property
    def models_dir(self) -> Path:
        return self.artifacts / "models"

    @property
    def indexes_dir(self) -> Path:
        return self.artifacts / "indexes"

    @property
    def local_copies(self) -> Path | None:
        """A replica's verified copies of the versions it serves (None: no shared directory)."""
        return self.home / "replica" if self.shared_dir is not None else None

    def image_limits(self):
        from embedder import ImageLimits

        return ImageLimits(self.max_image_bytes, self.max_image_pixels)

    def index_options(self):
        from indexer import AnnConfig, ImagePolicy, IndexOptions

        return IndexOptions(
            batch_size=self.batch_size,
            keep_versions=self.keep_versions,
            ann=AnnConfig(flat_threshold=self.flat_threshold, recall_target=self.recall_target,
                          compact_threshold=self.rerank_compact_from),
            image_policy=ImagePolicy(root=self.image_root, allow_urls=self.allow_url_images),
        )

    def batch_config(self):
        from search import BatchConfig

        return BatchConfig(enabled=self.query_batching, window_s=self.query_batch_window_ms / 1000.0, max_batch=self.query_batch_max)

    def query_cache_config(self):
        from embedder import QueryCacheConfig

        return QueryCacheConfig(max_entries=self.query_cache_entries, max_bytes=self.query_cache_bytes)

    def search_log_writer(self, store):
        from feedback import SearchLogWriter

        return SearchLogWriter(store, flush_ms=self.search_log_flush_ms, max_rows=self.search_log_group_rows,
                               max_queued=self.search_log_max_queued)

    def retrain_config(self):
        from dataclasses import replace

        from feedback import RetrainConfig

        # The defaults of these fields repeat RetrainConfig's, so `prism --help` and the docs can
        # show them without importing torch; a test keeps the two equal.
        base = RetrainConfig()
        return replace(
            base,
            window_days=self.retrain_window_days,
            catalog_mix=self.retrain_catalog_mix,
            min_pairs=self.retrain_min_pairs,
            log_retention_days=self.log_retention_days,
            promotion=self.retrain_promotion,
            canary_fraction=self.canary_fraction,
            canary=self.canary_policy(),
            train=replace(base.train, epochs=self.retrain_epochs, adapter_lr=self.retrain_adapter_lr),
            adapters=self.adapter_settings(),
            freeze_unadapted=self.retrain_adapter_freeze_unadapted,
            mining=replace(base.mining, min_clicks=self.retrain_min_clicks),
            gate=replace(
                base.gate,
                holdout_fraction=self.retrain_holdout_fraction,
                min_mrr_gain=self.retrain_min_mrr_gain,
                max_catalog_recall_drop=self.retrain_max_catalog_recall_drop,
                ci_level=self.retrain_gate_ci_level,
                bootstrap_resamples=self.retrain_gate_resamples,
            ),
        )

    def canary_policy(self):
        from feedback import CanaryPolicy

        return CanaryPolicy(min_queries=self.canary_min_queries, max_queries=self.canary_max_queries,
                            alpha=self.canary_alpha, sequential=self.canary_sequential)

    def adapter_settings(self):
        """The retrain's LoRA adapters (embedder.AdapterSettings), None when PRISM_RETRAIN_ADAPTERS is off."""
        if not self.retrain_adapters:
            return None
        from embedder import AdapterSettings

        return AdapterSettings(rank=self.retrain_adapter_rank, alpha=self.retrain_adapter_alpha,
                               towers=tuple(self.retrain_adapter_towers.split(",")),
                               targets=tuple(self.retrain_adapter_targets.split(",")))

    def apply_threads(self) -> None:
        """Set torch and faiss thread counts deliberately (small hosts have 2 cores)."""
        threads = self.threads or os.cpu_count() or 1
        import torch

        torch.set_num_threads(threads)
        try:
            import faiss

            faiss.omp_set_num_threads(threads)
        except ImportError:
            pass
