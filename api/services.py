"""What a request handler needs, built once per app and handed out by one dependency."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from api.metrics import Metrics
from api.settings import PrismSettings
from indexer import CatalogUpdater
from search import SearchEngine
from store import Store


@dataclass
class Services:
    settings: PrismSettings
    store: Store
    engine: SearchEngine
    updater: CatalogUpdater
    metrics: Metrics


def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]
