"""The built-in demo corpus: a synthetic crawl with planted problems, seeds and a manifest."""

from curate.demo.classes import CLASSES, SEED_CLASSES
from curate.demo.generate import MIN_SEEDS, generate_demo, planted_counts
from curate.demo.manifest import MANIFEST_NAME, DemoFile, DemoManifest, FileKind, load_manifest

__all__ = [
    "CLASSES",
    "MANIFEST_NAME",
    "MIN_SEEDS",
    "SEED_CLASSES",
    "DemoFile",
    "DemoManifest",
    "FileKind",
    "generate_demo",
    "load_manifest",
    "planted_counts",
]
