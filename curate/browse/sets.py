"""Seed and evaluation sets as a person browses them: the registry and the presets, with what is
cached of each set under DATA_ROOT (`curate/stages/retrieve/seed_cache.py` writes the caches)."""

from pathlib import Path
from typing import Any

from curate.catalog import Catalog
from curate.core import storage
from curate.stages.retrieve.seed_sets import PRESETS
from schemas.errors import NotFoundError


class SetNotFound(NotFoundError):
    code = "set_not_found"


def _cache(data_root: Path, name: str, location: str | None) -> dict[str, Any]:
    """What the set's caches hold: its image count (the newest ingest of its current location)
    and the models its images are embedded with."""
    folder = data_root / "seed_sets" / name
    ingests = []
    for complete in storage.listing(folder, "ingest-*/complete.json"):
        manifest = storage.read_json(complete)
        if manifest.get("location") == location:
            ingests.append((storage.version(complete)[1], manifest))  # the newest wins
    newest = max(ingests, key=lambda pair: pair[0])[1] if ingests else None
    models = sorted(
        storage.read_json(complete).get("model", "")
        for complete in storage.listing(folder, "embed-*/complete.json")
    )
    return {
        "images": newest["images"] if newest else None,
        "ingested": newest is not None,
        "errors_by_reason": newest.get("errors_by_reason", {}) if newest else {},
        "embedded_with": models,
    }


def seed_set_rows(catalog: Catalog) -> list[dict[str, Any]]:
    """Registered seed sets, then the presets nobody registered yet (as `curate seeds list`)."""
    registered = catalog.seed_sets()
    rows = []
    for name, entry in registered.items():
        preset = PRESETS.get(name)
        rows.append(
            {
                "name": name,
                **entry,
                "preset": preset is not None,
                "registered": True,
                "description": preset.description if preset else None,
                "cache": _cache(catalog.data_root, name, entry["location"]),
            }
        )
    for name, preset in PRESETS.items():
        if name not in registered:
            rows.append(
                {
                    "name": name,
                    "location": None,
                    "policy": preset.policy,
                    "cap": preset.cap,
                    "created_at": None,
                    "preset": True,
                    "registered": False,
                    "description": preset.description,
                    "cache": _cache(catalog.data_root, name, None),
                }
            )
    return rows


def seed_set_row(catalog: Catalog, name: str) -> dict[str, Any]:
    for row in seed_set_rows(catalog):
        if row["name"] == name:
            return row
    raise SetNotFound(
        f"unknown seed set {name!r}; register it with: curate seeds add {name} LOCATION "
        "--policy POLICY (or POST /v1/seed-sets)"
    )


def eval_set_rows(catalog: Catalog) -> list[dict[str, Any]]:
    return [{"name": name, "location": loc} for name, loc in catalog.eval_sets().items()]
