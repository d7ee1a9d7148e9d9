"""One rank's plan of a pass over the shards, in windows of row groups, and reading a window.

Steps 1 to 3 of curate.train.data's scheme: shards cut into windows, shard and window order
shuffled from (seed, pass), rows shuffled inside each window, the row sequence cut into equal
contiguous ranges per rank. Everything here is decided from the shard footers; only
`window_images` reads image bytes.
"""

import bisect
import itertools
import random
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow as pa

from curate.core import storage
from curate.train.shards import IMAGE_COLUMN, ShardsError


@dataclass(frozen=True)
class Window:
    """Whole consecutive row groups of one shard, shuffled together; a rank may own only the
    positions [lo, hi) of the shuffled order (a window on a boundary between ranks)."""

    file: int
    groups: tuple[int, ...]
    group_rows: tuple[int, ...]
    lo: int = 0
    hi: int | None = None  # None: to the end

    @property
    def full_rows(self) -> int:
        return sum(self.group_rows)

    @property
    def rows(self) -> int:
        return (self.full_rows if self.hi is None else self.hi) - self.lo

    def part(self, lo: int, hi: int) -> "Window":
        """Positions [lo, hi) of this window's own rows."""
        return replace(self, lo=self.lo + lo, hi=self.lo + hi)


def shard_windows(file: int, group_rows: list[int], window_rows: int) -> list[Window]:
    """Shard `file` cut into windows of whole row groups of about `window_rows` rows."""
    windows, groups, rows = [], [], []
    for group, n in enumerate(group_rows):
        if n == 0:
            continue
        groups.append(group)
        rows.append(n)
        if sum(rows) >= window_rows:
            windows.append(Window(file, tuple(groups), tuple(rows)))
            groups, rows = [], []
    if groups:
        windows.append(Window(file, tuple(groups), tuple(rows)))
    return windows


@dataclass(frozen=True)
class PassPlan:
    windows: tuple[Window, ...]  # this rank's, in stream order
    batches: int  # batches every rank yields in this pass


def plan_pass(
    windows: list[list[Window]],
    *,
    seed: int,
    pass_index: int,
    rank: int,
    world_size: int,
    batch_size: int,
) -> PassPlan:
    """Rank `rank`'s windows of pass `pass_index` and every rank's batch count in it; `windows`
    are each shard's, in file order. ShardsError when a rank would get no whole batch."""
    total_rows = sum(w.rows for ws in windows for w in ws)
    rng = random.Random(f"shards:{seed}:{pass_index}")
    order = list(range(len(windows)))
    rng.shuffle(order)
    sequence: list[Window] = []
    for file in order:
        shuffled = list(windows[file])
        rng.shuffle(shuffled)
        sequence += shuffled
    # Contiguous ranges of equal rows: a window across a boundary is split between ranks, so
    # even a dataset of one row group feeds every rank.
    bounds = [r * total_rows // world_size for r in range(world_size + 1)]
    per_rank: list[list[Window]] = [[] for _ in range(world_size)]
    before = 0
    for window in sequence:
        start, end = before, before + window.rows
        for r in range(world_size):
            lo, hi = max(start, bounds[r]), min(end, bounds[r + 1])
            if hi > lo:
                whole = (lo, hi) == (start, end)
                per_rank[r].append(window if whole else window.part(lo - start, hi - start))
        before = end
    rows = [sum(w.rows for w in ws) for ws in per_rank]
    batches = min(rows) // batch_size
    if batches == 0:
        raise ShardsError(
            f"pass {pass_index}: {total_rows} rows in {len(windows)} shard(s), cut "
            f"into {len(sequence)} window(s), give the ranks {rows} rows: too few for "
            f"{world_size} rank(s) of batch size {batch_size}"
        )
    return PassPlan(tuple(per_rank[rank]), batches)


def window_images(
    path: Path, window: Window, seed: int, pass_index: int, wanted: list[int]
) -> dict[int, bytes | None]:
    """The image bytes of the window's shuffled rows `wanted` (positions in the window), read
    from shard `path`."""
    order = list(range(window.full_rows))
    random.Random(f"rows:{seed}:{pass_index}:{window.file}:{window.groups[0]}").shuffle(order)
    by_group: dict[int, list[tuple[int, int]]] = {}
    starts = list(itertools.accumulate(window.group_rows, initial=0))
    for position in wanted:
        row = order[window.lo + position]
        slot = bisect.bisect_right(starts, row) - 1
        by_group.setdefault(slot, []).append((position, row - starts[slot]))
    out: dict[int, bytes | None] = {}
    try:
        with storage.parquet_file(path) as shard:
            # Row group by row group: only one group's encoded images are in memory at once
            # besides the rows kept.
            for slot in sorted(by_group):
                picks = by_group[slot]
                table = shard.read_row_group(window.groups[slot], columns=[IMAGE_COLUMN])
                images = table.column(IMAGE_COLUMN).take(pa.array([r for _, r in picks]))
                for (position, _), image in zip(picks, images.to_pylist(), strict=True):
                    out[position] = None if image is None else image.get("bytes")
    except (OSError, pa.ArrowException) as error:
        raise ShardsError(f"{path}: cannot read row groups {window.groups}: {error}") from None
    return out
