"""What every file of the demo corpus is: the manifest written last, and how to read it back."""

import json
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path

from curate.demo.classes import CLASSES, SEED_CLASSES

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1


class FileKind(StrEnum):
    ORIGINAL = "original"
    EXACT_DUPLICATE = "exact_duplicate"
    NEAR_DUPLICATE = "near_duplicate"
    BROKEN = "broken"
    MODE_SAMPLE = "mode_sample"
    SEED = "seed"


# -- manifest -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoFile:
    path: str  # relative to the corpus folder, with forward slashes
    kind: FileKind
    sha256: str
    label: str | None = None  # the class, where the file has one
    duplicate_of: str | None = None  # the original's path, for exact and near duplicates
    edit: str | None = None  # how a near duplicate was made, e.g. "jpeg_q55", "crop_0.05"
    expected_reason: str | None = None  # the ingest reason code a broken file must get
    variant: str | None = None  # what a mode sample exercises, e.g. "cmyk", "animated"
    format: str | None = None  # as Pillow names it; None for files that are not images
    mode: str | None = None  # as Pillow opens it
    width: int | None = None  # upright, i.e. after EXIF orientation, as ingest reports it
    height: int | None = None


@dataclass(frozen=True)
class DemoManifest:
    seed: int
    count: int
    classes: tuple[str, ...] = CLASSES
    seed_classes: tuple[str, ...] = SEED_CLASSES
    files: tuple[DemoFile, ...] = field(default_factory=tuple)
    version: int = MANIFEST_VERSION

    def by_kind(self, kind: FileKind | str) -> list[DemoFile]:
        return [f for f in self.files if f.kind == kind]

    def file(self, path: str) -> DemoFile:
        for f in self.files:
            if f.path == path:
                return f
        raise KeyError(path)

    @property
    def crawl_files(self) -> list[DemoFile]:
        return [f for f in self.files if f.kind != FileKind.SEED]

    @property
    def seed_files(self) -> list[DemoFile]:
        return self.by_kind(FileKind.SEED)

    def expected_errors(self) -> dict[str, str]:
        """Relative path -> the reason code ingest must reject it with."""
        return {f.path: f.expected_reason for f in self.files if f.expected_reason is not None}

    def labels(self) -> dict[str, str]:
        """Relative path -> class, for every file that has one (crawl and seeds)."""
        return {f.path: f.label for f in self.files if f.label is not None}

    def duplicates(self) -> dict[str, str]:
        """Relative path of each exact or near duplicate -> the original it copies."""
        return {f.path: f.duplicate_of for f in self.files if f.duplicate_of is not None}

    def to_json(self) -> str:
        body = asdict(self)
        body["classes"] = list(self.classes)
        body["seed_classes"] = list(self.seed_classes)
        return json.dumps(body, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "DemoManifest":
        body = json.loads(text)
        if body.get("version") != MANIFEST_VERSION:
            raise ValueError(f"demo manifest version {body.get('version')!r} is not supported")
        files = tuple(
            DemoFile(**{**entry, "kind": FileKind(entry["kind"])}) for entry in body["files"]
        )
        return cls(
            seed=body["seed"],
            count=body["count"],
            classes=tuple(body["classes"]),
            seed_classes=tuple(body["seed_classes"]),
            files=files,
            version=body["version"],
        )


def load_manifest(out_dir: Path) -> DemoManifest:
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {out_dir} holds no complete demo corpus")
    return DemoManifest.from_json(path.read_text())
