"""What a request handler needs, built once per app and handed out by one dependency."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import secrets

from fastapi import Depends, Header, HTTPException, Request

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


def require_admin(services: ServicesDep, authorization: Annotated[str | None, Header()] = None) -> None:
    """Catalog changes (and later model activation, retraining) need `Authorization: Bearer <PRISM_ADMIN_TOKEN>`.

    Without a configured token they are disabled: an open write API is not a safe default, and
    "only from localhost" would wave through everything behind a local reverse proxy.
    """
    token = services.settings.admin_token
    if token is None:
        raise HTTPException(403, "this route is disabled: set PRISM_ADMIN_TOKEN on the server and send it as a Bearer token")
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), token.get_secret_value().encode()):
        raise HTTPException(
            401, "send 'Authorization: Bearer <PRISM_ADMIN_TOKEN>' for this route", headers={"WWW-Authenticate": "Bearer"}
        )


AdminDep = Depends(require_admin)
