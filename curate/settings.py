"""Machine-level knobs, read from the environment (prefix CURATE_) and never from a job spec."""

from pathlib import Path

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from curate import __version__
from curate.core.storage import StorageError, Store, register


class CrawlSettings(BaseModel):
    """The crawler's limits; shipped to Ray workers as a plain value."""

    model_config = {"frozen": True}

    concurrency: int = Field(64, ge=1, description="requests in flight per worker")
    per_host: int = Field(8, ge=1, description="requests in flight per host per worker")
    timeout_s: float = Field(20.0, gt=0, description="whole-request timeout, body included")
    connect_timeout_s: float = Field(10.0, gt=0)
    retries: int = Field(3, ge=0, description="retries on 429, 5xx and connection errors")
    backoff_s: float = Field(0.5, ge=0, description="first retry delay; doubles each retry")
    max_backoff_s: float = Field(30.0, ge=0, description="cap on one delay, Retry-After included")
    max_bytes: int = Field(32 << 20, ge=1, description="largest response body accepted")
    max_redirects: int = Field(5, ge=0)
    user_agent: str = (
        f"lvd-curate/{__version__} (image dataset curation; honours X-Robots-Tag noai)"
    )
    allow_private_networks: bool = Field(
        False, description="allow private, loopback, link-local and multicast destinations"
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CURATE_", env_nested_delimiter="__", extra="forbid"
    )

    # A Path for a folder, the string itself for an object store URI (a Path would fold its
    # "//"); code reads stored files under `root`, never under this.
    data_root: Path | str = Field(
        Path("./data"), description="a folder, or an object store URI (s3://bucket/prefix)"
    )
    catalog_path: Path | None = Field(
        None, description="default: DATA_ROOT/catalog.duckdb (required with an object store root)"
    )
    cache_dir: Path | None = Field(
        None, description="where a node mirrors an object store root; default: under $TMPDIR"
    )
    cache_gb: float = Field(64, gt=0, description="what one process keeps of what it fetched")
    ray_address: str | None = Field(None, description="join this Ray cluster; default local")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray; default all")
    num_gpus: int | None = Field(None, ge=0, description="GPUs for a local Ray; default all")
    progress: bool = Field(True, description="progress bars on the terminal")

    copy_weights: Path | None = Field(
        None, description="SSCD-style copy-descriptor checkpoint (TorchScript or state dict)"
    )
    copy_arch: str = Field("resnet50", description="trunk of a state-dict or random copy model")
    embed_weights: Path | None = Field(
        None, description="embedding model checkpoint for the job's embed.arch (see README)"
    )
    allow_random_weights: bool = Field(
        False, description="run models without weights (tests, demo): their output means nothing"
    )

    # CURATE_CRAWL__TIMEOUT_S=5 and the like set one limit.
    crawl: CrawlSettings = CrawlSettings()
    allow_private_networks: bool = Field(
        False, description="let the crawler reach private and loopback addresses (tests, intranets)"
    )

    @field_validator("data_root", mode="before")
    @classmethod
    def _folder_or_uri(cls, value: object) -> object:
        return value if "://" in str(value) else Path(str(value))

    @property
    def store(self) -> Store:
        """The data root's store, registered in this process (curate.core.storage)."""
        return register(Store.open(self.data_root, self.cache_dir, self.cache_gb))

    @property
    def root(self) -> Path:
        """The local folder every stored path lives under (an object store's mirror)."""
        return self.store.root

    @property
    def thumb_dir(self) -> Path:
        """Thumbnails: a cache of this node, never uploaded to an object store root."""
        return self.store.local / "thumbs"

    @property
    def catalog_file(self) -> Path:
        if self.catalog_path is not None:
            return self.catalog_path
        store = self.store
        if store.remote:
            # DuckDB writes its file in place, which an object store cannot do.
            raise StorageError(
                f"CURATE_DATA_ROOT={self.data_root} is an object store: set CURATE_CATALOG_PATH "
                "to a local (or shared-volume) file for the catalog"
            )
        return store.root / "catalog.duckdb"

    def job_dir(self, job_id: str) -> Path:
        return self.root / "jobs" / job_id

    def crawl_settings(self) -> CrawlSettings:
        """The crawl limits as shipped to workers, with the network policy folded in."""
        return self.crawl.model_copy(update={"allow_private_networks": self.allow_private_networks})
