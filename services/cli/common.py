"""What the command groups share: the settings (CURATE_* variables) and the catalog they name."""

from pydantic import ValidationError

from curate.catalog import Catalog
from curate.settings import Settings
from schemas.job import describe_validation_error
from services.cli.errors import UsageError


def load_settings() -> Settings:
    """The settings from the environment; a bad CURATE_* value is a usage error."""
    try:
        return Settings()
    except ValidationError as error:
        raise UsageError(f"bad CURATE_* setting: {describe_validation_error(error)}") from None


def open_catalog(settings: Settings) -> Catalog:
    return Catalog(settings.catalog_file, settings.root)
