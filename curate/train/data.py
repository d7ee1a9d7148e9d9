"""Curated shards -> endless, resumable streams of multi-crop batches for the trainer.

One pass over the data, for one rank, is a fixed sequence of rows (its "stream") decided from the
shard footers alone:

1. Every shard is cut into windows of whole row groups (about `window_rows` rows each).
2. From (seed, pass) the shard order is shuffled, then the window order inside each shard; the
   curated stage already shuffled its rows globally, so this is a reshuffle, not the only one.
3. Rows are shuffled inside each window, and the resulting row sequence is cut into
   `world_size` contiguous ranges of equal rows (±1): rank r reads its range, one shard (and one
   window) at a time; a window on a boundary is shared, each rank reading its part of it.
4. Batch k of the pass is stream rows [k*B, (k+1)*B).

Every rank yields floor(min over ranks of its rows / B) batches per pass, so all ranks step
together and no collective waits on a rank that ran dry; the ragged tail of each rank's stream
(fewer than one batch plus one row) is dropped for that pass only, and the next pass's
reshuffle puts other rows there.

Loader worker w of W builds the batches k with (k - first) % W == w, which is the order in which
torch's DataLoader collects from its workers, so the batch sequence is the same for any worker
count. A worker reads only the row groups that hold rows of its batches and keeps only those
rows' bytes (memory: its share of one window). Each sample's crops come from its own rng seeded
by (seed, pass, rank, stream row), each batch's masks from (seed, pass, rank, batch).

Resuming at DataPosition(pass, batches) recomputes the plan and starts reading at the window
holding row batches*B: nothing before it is read or decoded.

Finding and checking the shards is curate.train.shards; steps 1 to 3 (the plan) and reading a
window's rows are curate.train.windows; this module builds and orders the batches.
"""

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from curate.stages.ingest.decode import load_rgb
from curate.train.augment import MaskingConfig, MultiCrop, MultiCropConfig, block_masks
from curate.train.shards import ShardsError, shard_row_groups
from curate.train.windows import PassPlan, plan_pass, shard_windows, window_images

# Rows shuffled together: bounds a worker's memory (its share of one window's encoded images)
# while mixing across several of write_shard's 1024-row row groups.
WINDOW_ROWS = 2048


# -- positions and batches ------------------------------------------------------------------


@dataclass(frozen=True)
class DataPosition:
    pass_index: int = 0  # how many full passes over the shards this rank has finished
    batches: int = 0  # batches this rank has consumed in the current pass


@dataclass
class Batch:
    global_crops: Tensor  # float32 [2*B, 3, G, G], view-major: all images' view 0, then view 1
    local_crops: Tensor  # float32 [n_local*B, 3, L, L], view-major; [0,3,L,L] if n_local == 0
    masks: Tensor  # bool [2*B, (G // patch_size) ** 2], rows in global_crops order
    bad_images: int  # undecodable images skipped while building this batch

    def pin_memory(self) -> "Batch":
        """A copy in page-locked memory (DataLoader calls this when pin_memory is on)."""
        return Batch(
            self.global_crops.pin_memory(),
            self.local_crops.pin_memory(),
            self.masks.pin_memory(),
            self.bad_images,
        )


def _decode(data: bytes | None) -> Image.Image | None:
    if not data:
        return None
    try:
        return load_rgb(data)
    except Exception:  # any failure of any codec on any bytes: the image is skipped, not fatal
        return None


class _Stream:
    """Everything one rank needs to plan and build its batches; picklable into loader workers."""

    def __init__(
        self,
        files: list[Path],
        group_rows: list[list[int]],
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        crops: MultiCropConfig,
        masking: MaskingConfig,
        patch_size: int,
        window_rows: int,
    ):
        self.files = files
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.crops = crops
        self.masking = masking
        self.grid = crops.global_size // patch_size
        self.multicrop = MultiCrop(crops)
        self.windows = [shard_windows(f, rows, window_rows) for f, rows in enumerate(group_rows)]
        self.total_rows = sum(w.rows for ws in self.windows for w in ws)
        self._plans: dict[int, PassPlan] = {}

    def plan(self, pass_index: int) -> PassPlan:
        """This rank's windows and every rank's batch count in one pass (cached)."""
        if pass_index not in self._plans:
            if len(self._plans) > 4:
                self._plans.clear()
            self._plans[pass_index] = plan_pass(
                self.windows,
                seed=self.seed,
                pass_index=pass_index,
                rank=self.rank,
                world_size=self.world_size,
                batch_size=self.batch_size,
            )
        return self._plans[pass_index]

    def rows(self, pass_index: int, first: int, wanted) -> Iterator[tuple[int, bytes | None]]:
        """(stream row, bytes) for the rows >= `first` for which `wanted(row)`, in stream order."""
        plan = self.plan(pass_index)
        end = plan.batches * self.batch_size
        start = 0
        for window in plan.windows:
            lo, hi = max(start, first), min(start + window.rows, end)
            base = start
            start += window.rows
            if hi <= lo:
                if base >= end:
                    return
                continue
            positions = [row - base for row in range(lo, hi) if wanted(row)]
            if positions:
                data = window_images(
                    self.files[window.file], window, self.seed, pass_index, positions
                )
                for position in positions:
                    yield base + position, data[position]

    def _fallback_image(self, pass_index: int, after: int) -> Image.Image:
        """The first decodable image of the rank's stream after row `after`, wrapping around."""
        end = self.plan(pass_index).batches * self.batch_size
        for first in (after, 0):
            for _, data in self.rows(pass_index, first, lambda row: True):
                image = _decode(data)
                if image is not None:
                    return image
        raise ShardsError(
            f"pass {pass_index}: rank {self.rank} has no decodable image in its "
            f"{end} rows of {len(self.files)} shard(s), first {self.files[0]}"
        )

    def build_batch(
        self, pass_index: int, index: int, samples: list[tuple[int, bytes | None]]
    ) -> Batch:
        """Decode and augment one batch; undecodable images are replaced, and counted."""
        images = [_decode(data) for _, data in samples]
        good = [i for i, image in enumerate(images) if image is not None]
        bad = len(images) - len(good)
        if bad:
            # Keep the batch at B images (fixed shapes, KoLeo needs neighbours, ranks stay
            # equal): a bad slot takes the next good image of the batch, cropped with the bad
            # slot's own rng, so it is another view of that image, not a copy of its crops.
            for i, image in enumerate(images):
                if image is None:
                    donor = next((g for g in good if g > i), good[0] if good else None)
                    images[i] = (
                        images[donor]
                        if donor is not None
                        else self._fallback_image(pass_index, (index + 1) * self.batch_size)
                    )
        global_views: list[list[Tensor]] = [[], []]
        local_views: list[list[Tensor]] = [[] for _ in range(self.crops.n_local)]
        for (row, _), image in zip(samples, images, strict=True):
            rng = random.Random(f"crop:{self.seed}:{pass_index}:{self.rank}:{row}")
            globals_, locals_ = self.multicrop(image, rng)
            for view, crop in enumerate(globals_):
                global_views[view].append(crop)
            for view, crop in enumerate(locals_):
                local_views[view].append(crop)
        size = self.crops.local_size
        local = [crop for view in local_views for crop in view]
        mask_rng = random.Random(f"mask:{self.seed}:{pass_index}:{self.rank}:{index}")
        return Batch(
            global_crops=torch.stack([crop for view in global_views for crop in view]),
            local_crops=torch.stack(local) if local else torch.zeros((0, 3, size, size)),
            masks=block_masks(2 * len(samples), self.grid, self.masking, mask_rng),
            bad_images=bad,
        )

    def batches(
        self, start: DataPosition, worker: int, workers: int
    ) -> Iterator[tuple[int, int, Batch]]:
        """Endless (pass, batch, Batch) for this worker: every `workers`-th batch from `start`."""
        b = self.batch_size
        sequence = 0  # batches from `start`; ours are those with sequence % workers == worker
        for pass_index in itertools.count(start.pass_index):
            first = start.batches if pass_index == start.pass_index else 0
            total = self.plan(pass_index).batches
            offset = sequence - first

            def ours(row: int, offset: int = offset) -> bool:
                return (row // b + offset) % workers == worker

            pending: list[tuple[int, bytes | None]] = []
            for row, data in self.rows(pass_index, first * b, ours):
                pending.append((row, data))
                if len(pending) == b:
                    yield pass_index, row // b, self.build_batch(pass_index, row // b, pending)
                    pending = []
            sequence += max(0, total - first)


class _StreamDataset(IterableDataset):
    def __init__(self, stream: _Stream, start: DataPosition):
        self.stream = stream
        self.start = start

    def __iter__(self) -> Iterator[tuple[int, int, Batch]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        return self.stream.batches(self.start, worker, workers)


def _as_is(item):
    return item


class TrainLoader:
    """Endless multi-crop batches over curated shards for one rank (see the module docstring)."""

    def __init__(
        self,
        files: list[Path],
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        crops: MultiCropConfig,
        masking: MaskingConfig,
        patch_size: int,
        num_workers: int = 0,
        position: DataPosition = DataPosition(),
        window_rows: int = WINDOW_ROWS,
    ):
        if not files:
            raise ShardsError("no shards given to the train loader")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if patch_size < 1 or crops.global_size < patch_size:
            raise ValueError(f"patch_size {patch_size} does not fit {crops.global_size}px crops")
        if num_workers < 0 or window_rows < 1:
            raise ValueError(
                f"need num_workers >= 0 and window_rows >= 1: {num_workers}, {window_rows}"
            )
        if position.pass_index < 0 or position.batches < 0:
            raise ValueError(f"negative data position {position}")
        files = [Path(f) for f in files]
        self._stream = _Stream(
            files,
            [shard_row_groups(f) for f in files],
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
            seed=seed,
            crops=crops,
            masking=masking,
            patch_size=patch_size,
            window_rows=window_rows,
        )
        if self._stream.total_rows == 0:
            raise ShardsError(f"{len(files)} shard(s) hold no rows, first {files[0]}")
        self.num_workers = num_workers
        self._position = self._normalised(position)
        self.bad_images = 0  # total skipped so far on this rank

    def _normalised(self, position: DataPosition) -> DataPosition:
        """The same place, with `batches` inside its pass (a finished pass is the next's 0)."""
        pass_index, batches = position.pass_index, position.batches
        while batches >= (total := self._stream.plan(pass_index).batches):
            pass_index, batches = pass_index + 1, batches - total
        return DataPosition(pass_index, batches)

    def batches_per_pass(self, pass_index: int) -> int:
        """How many batches every rank yields in pass `pass_index`."""
        return self._stream.plan(pass_index).batches

    @property
    def position(self) -> DataPosition:
        """The position just after the last batch yielded: a new TrainLoader built with it
        yields exactly the batches the old one would have yielded next."""
        return self._position

    def __iter__(self) -> Iterator[Batch]:
        """Endless: pass after pass, each reshuffled deterministically from (seed, pass_index);
        shards split over ranks and loader workers; every rank yields the same number of batches
        per pass (drop the ragged tail) so collectives never hang."""
        loader = DataLoader(
            _StreamDataset(self._stream, self._position),
            batch_size=None,
            collate_fn=_as_is,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=False,
        )
        for pass_index, index, batch in loader:
            expected = self._position
            if (pass_index, index) != (expected.pass_index, expected.batches):
                raise RuntimeError(
                    f"loader out of order: got pass {pass_index} batch {index}, expected {expected}"
                )
            self.bad_images += batch.bad_images
            self._position = self._normalised(DataPosition(pass_index, index + 1))
            yield batch
