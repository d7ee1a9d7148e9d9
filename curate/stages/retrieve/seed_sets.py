"""Seed sets: the curated datasets whose look-alikes are retrieved from the crawl.

A seed set is a name, a location (folder, glob, URL list, .tar or .parquet) and a retrieval
policy, registered in the catalog. The LVD recipe's sources are presets: a preset knows its
policy (DINOv2, Table 15) but never where the user keeps the data, so it must be registered once
with a location before a job can name it.

Policy grammar: one or more of `as-is`, `knn:K`, `cluster:M`, `balanced:N` joined by `+`, e.g.
`as-is+knn:4` (ImageNet-22k: the set enters whole and every seed image pulls its 4 nearest crawl
images). `cluster:M` takes M crawl images from every k-means cluster holding more than 3 seed
images; `balanced:N` takes N crawl images spread evenly over a hierarchical k-means (Vo et al.
2024). The cap bounds the crawl images each policy step of a seed set may pull (DINOv2: 1M for
cluster retrieval).
"""

import re
from dataclasses import dataclass
from typing import Literal

from schemas.errors import ConflictError, InputError
from schemas.job import NAME_PATTERN

PolicyKind = Literal["as-is", "knn", "cluster", "balanced"]
_STEP = re.compile(r"^(as-is|knn|cluster|balanced)(?::([0-9]+))?$")
_NEEDS_VALUE = {"knn": "K neighbours", "cluster": "M images per cluster", "balanced": "N images"}


class SeedSetError(InputError, ValueError):
    """A seed set that cannot be used: unknown, unregistered preset, or a bad policy."""

    code = "seed_set_invalid"


class SeedSetConflict(ConflictError, SeedSetError):
    """A job resumed after its seed sets were registered anew: its committed parts no longer
    fit them."""

    code = "seed_set_changed"


@dataclass(frozen=True)
class PolicyStep:
    kind: PolicyKind
    value: int | None = None  # K, M or N; None for as-is

    def __str__(self) -> str:
        return self.kind if self.value is None else f"{self.kind}:{self.value}"


def parse_policy(text: str) -> tuple[PolicyStep, ...]:
    """`as-is+knn:4` → (as-is, knn:4); raises SeedSetError saying what a step must look like."""
    steps: list[PolicyStep] = []
    for raw in text.replace(" ", "").split("+"):
        match = _STEP.match(raw)
        if match is None:
            raise SeedSetError(
                f"bad policy step {raw!r} in {text!r}: expected as-is, knn:K, cluster:M or "
                "balanced:N joined by '+'"
            )
        kind, value = match.group(1), match.group(2)
        if kind == "as-is" and value is not None:
            raise SeedSetError(f"policy step {raw!r}: as-is takes no number")
        if kind != "as-is" and (value is None or int(value) < 1):
            raise SeedSetError(f"policy step {raw!r}: {kind} needs a positive {_NEEDS_VALUE[kind]}")
        step = PolicyStep(kind, None if value is None else int(value))  # type: ignore[arg-type]
        if any(s.kind == step.kind for s in steps):
            raise SeedSetError(f"policy {text!r} names {kind} twice")
        steps.append(step)
    return tuple(steps)


def format_policy(steps: tuple[PolicyStep, ...]) -> str:
    return "+".join(str(step) for step in steps)


@dataclass(frozen=True)
class Preset:
    policy: str
    cap: int | None
    description: str


_CLUSTER = "cluster:10000"
_CAP = 1_000_000

# DINOv2 (Oquab et al. 2023), Table 15: how each source of LVD-142M was retrieved.
PRESETS: dict[str, Preset] = {
    "imagenet22k": Preset("as-is+knn:4", None, "ImageNet-22k: whole, plus 4 neighbours per image"),
    "imagenet1k": Preset("knn:32", None, "ImageNet-1k train: 32 neighbours per image"),
    "gldv2": Preset("as-is+knn:4", None, "Google Landmarks v2: whole, plus 4 neighbours"),
    "mapillary-sls": Preset("as-is", None, "Mapillary SLS: whole"),
    **{
        name: Preset(_CLUSTER, _CAP, f"{title}: cluster-based retrieval")
        for name, title in {
            "caltech101": "Caltech 101",
            "cub200": "CUB-200-2011",
            "dtd": "Describable Textures",
            "fgvc-aircraft": "FGVC Aircraft",
            "flowers102": "Oxford Flowers-102",
            "food101": "Food-101",
            "oxford-pets": "Oxford-IIIT Pets",
            "stanford-cars": "Stanford Cars",
            "sun397": "SUN397",
            "pascal-voc": "Pascal VOC 2007",
            "ade20k": "ADE20K",
            "cityscapes": "Cityscapes",
            "kitti": "KITTI",
            "nyu-depth": "NYU Depth v2",
            "sun-rgbd": "SUN RGB-D",
            "amstertime": "AmsterTime",
            "met": "The Met",
            "roxford": "Revisited Oxford",
            "rparis": "Revisited Paris",
        }.items()
    },
}


@dataclass(frozen=True)
class SeedSet:
    name: str
    location: str
    policy: tuple[PolicyStep, ...]
    cap: int | None  # most crawl images one policy step may pull; None: no cap

    def describe(self) -> dict:
        return {
            "name": self.name,
            "location": self.location,
            "policy": format_policy(self.policy),
            "cap": self.cap,
        }


def check_name(name: str) -> str:
    if not re.match(NAME_PATTERN, name):
        raise SeedSetError(f"{name!r} is not a set name (lowercase, digits, _ . -)")
    return name


def registration(
    name: str, location: str, policy: str | None, cap: int | None
) -> tuple[str, str, int | None]:
    """The (location, policy, cap) to store for `curate seeds add`; presets fill the gaps."""
    check_name(name)
    if not location.strip():
        raise SeedSetError("seed set location is empty")
    preset = PRESETS.get(name)
    if policy is None:
        if preset is None:
            raise SeedSetError(
                f"{name!r} is not a preset ({', '.join(sorted(PRESETS))}): give its policy, "
                "e.g. --policy knn:4 or --policy cluster:10000"
            )
        policy = preset.policy
    steps = parse_policy(policy)
    if cap is None and preset is not None and policy == preset.policy:
        cap = preset.cap
    if cap is not None and cap < 1:
        raise SeedSetError(f"cap must be positive, got {cap}")
    return location.strip(), format_policy(steps), cap


def resolve_seed_sets(names: list[str], registered: dict[str, dict]) -> list[SeedSet]:
    """The named sets from the registry; raises before any work with the command that fixes it."""
    sets = []
    for name in names:
        entry = registered.get(name)
        if entry is None:
            if name in PRESETS:
                raise SeedSetError(
                    f"seed set {name!r} is a preset ({PRESETS[name].description}) but has no "
                    f"location yet; register it with: curate seeds add {name} /path/to/{name}"
                )
            known = sorted(set(registered) | set(PRESETS))
            raise SeedSetError(
                f"unknown seed set {name!r}; register it with: curate seeds add {name} LOCATION "
                f"--policy POLICY (registered or preset: {', '.join(known)})"
            )
        sets.append(
            SeedSet(name, entry["location"], parse_policy(entry["policy"]), entry.get("cap"))
        )
    return sets
