"""What every router's endpoints take from the app: the settings, the catalog, the job manager
and the thumbnail folder (set once by `create_app` on `app.state`), and the paging parameters.

    @router.get("/things")
    def things(catalog: CatalogDep, limit: Limit = 50, cursor: Cursor = None): ...
"""

from pathlib import Path
from typing import Annotated

from fastapi import Depends, Query, Request

from curate.catalog import Catalog
from curate.settings import Settings
from services.api.manager import JobManager
from services.api.settings import ServiceSettings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_service(request: Request) -> ServiceSettings:
    return request.app.state.service


def get_catalog(request: Request) -> Catalog:
    return request.app.state.catalog


def get_manager(request: Request) -> JobManager:
    return request.app.state.manager


def get_thumb_dir(request: Request) -> Path:
    return request.app.state.thumb_dir


SettingsDep = Annotated[Settings, Depends(get_settings)]
ServiceDep = Annotated[ServiceSettings, Depends(get_service)]
CatalogDep = Annotated[Catalog, Depends(get_catalog)]
ManagerDep = Annotated[JobManager, Depends(get_manager)]
ThumbDirDep = Annotated[Path, Depends(get_thumb_dir)]

Limit = Annotated[int, Query(ge=1, le=500, description="items per page")]
Cursor = Annotated[
    str | None, Query(max_length=2048, description="next_cursor of the previous page")
]
