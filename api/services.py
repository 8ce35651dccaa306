"""What a request handler needs, built once per app and handed out by one dependency."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import secrets

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.metrics import Metrics
from api.settings import PrismSettings
from feedback import CanaryReviewer, SearchLogWriter
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
    search_log: SearchLogWriter
    # Reviews the running canary after events arrive (None: never from this server).
    canary_reviewer: CanaryReviewer | None = None


async def get_services(request: Request) -> Services:
    # async: FastAPI runs a plain `def` dependency on its thread pool, a thread hop per request
    # (tenths of a millisecond on a busy host) for an attribute read.
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


# Declared as a Bearer security scheme so /openapi.json (and the docs page) show which routes
# need the token; auto_error=False because the answers below say more than FastAPI's default 403.
_bearer = HTTPBearer(auto_error=False, description="PRISM_ADMIN_TOKEN", scheme_name="admin token")


def require_admin(
    services: ServicesDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)] = None
) -> None:
    """Catalog changes, model activation and retraining need `Authorization: Bearer <PRISM_ADMIN_TOKEN>`.

    Without a configured token they are disabled: an open write API is not a safe default, and
    "only from localhost" would wave through everything behind a local reverse proxy.
    """
    token = services.settings.admin_token
    if token is None:
        raise HTTPException(403, "this route is disabled: set PRISM_ADMIN_TOKEN on the server and send it as a Bearer token")
    given = credentials.credentials.strip() if credentials is not None else ""
    if not secrets.compare_digest(given.encode(), token.get_secret_value().encode()):
        raise HTTPException(
            401, "send 'Authorization: Bearer <PRISM_ADMIN_TOKEN>' for this route", headers={"WWW-Authenticate": "Bearer"}
        )


AdminDep = Depends(require_admin)
