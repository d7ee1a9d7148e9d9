"""The seed sets a job retrieves for, pinned with the job: what retrieval used stays what the
curated stage reads, whatever the registry says later."""

from pathlib import Path

from curate.core import atomic, storage
from curate.stages.retrieve.seed_sets import SeedSetConflict

PINNED_SEED_SETS = "seed_sets.json"


def pin_seed_sets(stage_dir: Path, pin: dict) -> None:
    """Record the seed sets a job retrieves for, and their ingest shards; a resume with other
    registrations is refused.

    Retrieve parts are numbered by (seed set, policy step), and as-is rows point into the seed
    set's ingest shards: re-registering a set between a crash and its resume would otherwise
    pair committed parts with other policies, or as-is rows with other shards.
    """
    pinned = stage_dir / PINNED_SEED_SETS
    if storage.exists(pinned):
        before = storage.read_json(pinned)
        if before["seed_sets"] != pin["seed_sets"]:
            raise SeedSetConflict(
                f"the seed sets changed since this job started retrieving (was "
                f"{before['seed_sets']}, now {pin['seed_sets']}); run it under a new --job"
            )
        return
    atomic.write_json(pinned, pin)


def pinned_seed_ingest(stage_dir: Path, root: Path) -> dict[str, dict[int, Path]]:
    """The seed sets' ingest shards the job's retrieval used, whatever the registry says now."""
    pinned = storage.read_json(stage_dir / PINNED_SEED_SETS)["ingest"]
    return {
        name: {int(part): storage.resolve(path, root) for part, path in shards.items()}
        for name, shards in pinned.items()
    }
