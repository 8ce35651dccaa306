"""Prism's one settings object: PRISM_* environment variables, then ./prism.toml, then defaults."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource


class PrismSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PRISM_", toml_file="prism.toml", extra="ignore")

    home: Path = Field(Path("prism-data"), description="PRISM_HOME: database, models, embeddings, indexes")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default sqlite:///$PRISM_HOME/prism.db")
    model: str = Field("ViT-B-32:laion2b_s34b_b79k", description="model spec used by `prism index`")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(0, ge=0, description="torch/faiss threads; 0 = all cores")
    batch_size: int = Field(64, ge=1, le=4096)
    decode_workers: int = Field(2, ge=1, le=64)
    admin_token: SecretStr | None = None
    flat_threshold: int = Field(20_000, ge=0, description="below this many vectors, exact Flat search")
    recall_target: float = Field(0.95, gt=0, le=1.0)
    allow_url_images: bool = False
    image_root: Path | None = None
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(40_000_000, ge=1)

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
    def models_dir(self) -> Path:
        return self.home / "models"

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
