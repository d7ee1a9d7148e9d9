"""The service's own settings (prefix CURATE_, like the machine settings in curate/settings.py):
where it listens, whether it asks for tokens, which local folders a job submitted over HTTP may
read, CORS, the thumbnail cache, the event stream's pacing and whether ended jobs' browse indexes
are built ahead of their first request."""

from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _split(value: Any, separator: str) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(separator) if item.strip()]
    return value


class ServiceSettings(BaseSettings):
    # The machine settings share the prefix: their variables are not ours to refuse.
    model_config = SettingsConfigDict(env_prefix="CURATE_", extra="ignore")

    host: str = Field("127.0.0.1", description="address to bind; 0.0.0.0 exposes the service")
    port: int = Field(8765, ge=0, le=65535, description="0: any free port")
    auth: bool = Field(True, description="require API tokens (`curate serve --no-auth`: off)")
    source_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="folders HTTP jobs and sets may read, ':'-separated; none: no local path",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="origins allowed cross-site, ','-separated; none: no CORS"
    )
    thumb_dir: Path | None = Field(
        None, description="thumbnail cache; default DATA_ROOT/thumbs (the node cache on a store)"
    )
    heartbeat_s: float = Field(15.0, gt=0, description="event-stream heartbeat interval")
    events_poll_s: float = Field(1.0, ge=0.2, description="catalog polls of an event stream")
    cancel_grace_s: float = Field(
        120.0, gt=0, description="a cancelled driver still running after this is killed"
    )
    warm_indexes: bool = Field(
        True,
        description="build a job's browse indexes in the background when it ends (and, at "
        "start, those of jobs that ended before) instead of on its first results request",
    )

    @field_validator("source_roots", mode="before")
    @classmethod
    def _roots(cls, value: Any) -> Any:
        return _split(value, ":")

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _origins(cls, value: Any) -> Any:
        return _split(value, ",")

    @field_validator("source_roots")
    @classmethod
    def _absolute(cls, roots: list[Path]) -> list[Path]:
        for root in roots:
            if not root.is_absolute():
                raise ValueError(f"source root {str(root)!r} must be an absolute path")
        return roots
