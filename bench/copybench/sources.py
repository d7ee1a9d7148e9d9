"""Where the benchmark's originals come from: real photographs and artwork in Debian's image
packages, fetched with `apt-get download` and unpacked with `dpkg-deb -x` under bench/work/
(git-ignored), never installed.

Packages (each a category source):
  - mate-backgrounds, sway-backgrounds, desktop-base: desktop wallpapers (photographs and
    rendered artwork); the same picture shipped at several resolutions is kept once.
  - mypaint-data-extras: scanned paper and canvas textures, look-alikes of each other.
  - openclipart-png: clip art in ~100 topic folders (flat colours on white: the hard case for a
    perceptual hash, whose low frequencies are mostly background).
  - gcompris-qt-data: the educational game's photographs and paintings (animals, monuments,
    paintings, objects), stored as WebP inside Qt resource files (.rcc), read out by signature.

Held out for acceptance and never used here: HELD_OUT.
"""

import hashlib
import io
import re
import shutil
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

# Someone else's acceptance set: fetching one of these by mistake would leak it into tuning.
HELD_OUT = frozenset(
    {
        "gnome-backgrounds",
        "plasma-workspace-wallpapers",
        "ukui-wallpapers",
        "lomiri-wallpapers",
        "tuxpaint-stamps-default",
    }
)
PACKAGES = (
    "mate-backgrounds",
    "sway-backgrounds",
    "desktop-base",
    "mypaint-data-extras",
    "openclipart-png",
    "gcompris-qt-data",
)
# Smaller pictures are icons and bullets, not images a crawl would keep.
MIN_SIDE = 128
MAX_ASPECT = 3.0
# Benchmark originals are stored at most this large (a crawl's typical size); it also keeps the
# benchmark quick to hash and describe on two cores.
MAX_SIDE = 512
_LOCK_WAIT_S = 600


@dataclass(frozen=True)
class Candidate:
    """One picture found in a package, before selection."""

    key: str  # package-relative name, unique
    category: str  # "<package>/<topic>": same-category images are each other's hard negatives
    kind: str  # "photo" (stored as JPEG) or "art" (stored as PNG)
    data: bytes  # the encoded picture as the package ships it


def _run_apt(args: list[str], cwd: Path) -> None:
    """apt-get, waiting while another process holds its lock (a shared machine)."""
    deadline = time.monotonic() + _LOCK_WAIT_S
    while True:
        done = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
        if done.returncode == 0:
            return
        locked = "lock" in done.stderr.lower()
        if not locked or time.monotonic() > deadline:
            raise RuntimeError(f"{' '.join(args)} failed: {done.stderr.strip()[-500:]}")
        time.sleep(10)


def fetch(work: Path, packages: tuple[str, ...] = PACKAGES) -> Path:
    """Download and unpack the packages under work/; returns the unpacked root. Idempotent."""
    leaked = HELD_OUT & set(packages)
    if leaked:
        raise ValueError(f"held-out packages must never be used here: {sorted(leaked)}")
    debs, root = work / "debs", work / "root"
    debs.mkdir(parents=True, exist_ok=True)
    for package in packages:
        unpacked = root / package
        if (unpacked / ".complete").exists():
            continue
        if not list(debs.glob(f"{package}_*.deb")):
            _run_apt(["apt-get", "download", package], debs)
        (deb,) = sorted(debs.glob(f"{package}_*.deb"))[-1:]
        shutil.rmtree(unpacked, ignore_errors=True)
        unpacked.mkdir(parents=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True)
        (unpacked / ".complete").write_text(deb.name + "\n")
    return root


def _usable(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except Exception:  # a broken or foreign file is simply not a candidate
        return False
    return min(width, height) >= MIN_SIDE and max(width, height) <= MAX_ASPECT * min(width, height)


# Resolutions in wallpaper names ("Elephants_3840x2160.jpg", "..._1366x768_Portrait.png").
_RESOLUTION = re.compile(r"[_-]?\d{3,5}x\d{3,5}")


def _picture_name(path: Path) -> str:
    return _RESOLUTION.sub("", path.stem).lower()


def _files(root: Path, pattern: str) -> list[Path]:
    return sorted(p for p in root.glob(pattern) if p.is_file())


def _largest_per_name(paths: list[Path]) -> list[Path]:
    """One file per picture: a wallpaper shipped at several resolutions is one original."""
    best: dict[tuple[Path, str], Path] = {}
    for path in paths:
        name = (path.parent, _picture_name(path))
        if name not in best or path.stat().st_size > best[name].stat().st_size:
            best[name] = path
    return sorted(best.values())


def _wallpapers(root: Path) -> Iterator[Candidate]:
    mate = root / "mate-backgrounds/usr/share/backgrounds/mate"
    for path in _largest_per_name(_files(mate, "*/*.[jp][pn]g")):
        kind = "photo" if path.suffix == ".jpg" else "art"
        yield Candidate(
            f"mate/{path.parent.name}/{path.name}",
            f"mate/{path.parent.name}",
            kind,
            path.read_bytes(),
        )
    sway = _files(root / "sway-backgrounds/usr/share/backgrounds/sway", "*.png")
    # One landscape and one portrait rendering of the one sway picture are copies of each other:
    # only the largest landscape file is an original.
    landscape = [p for p in sway if "Portrait" not in p.name]
    if landscape:
        path = max(landscape, key=lambda p: p.stat().st_size)
        yield Candidate(f"sway/{path.name}", "wallpaper/sway", "art", path.read_bytes())
    themes = root / "desktop-base/usr/share/desktop-base"
    # Each theme's 16:9 GRUB picture is its wallpaper artwork; the login and lock screens of a
    # theme reuse it, so one file per theme.
    for path in _files(themes, "*-theme/grub/grub-16x9.png"):
        theme = path.parent.parent.name
        yield Candidate(f"desktop-base/{theme}.png", "wallpaper/debian", "art", path.read_bytes())
    paper = root / "mypaint-data-extras/usr/share/mypaint/backgrounds"
    for path in _files(paper, "**/*.[jp][pn]g"):
        yield Candidate(f"mypaint/{path.name}", "texture/paper", "photo", path.read_bytes())


def _clipart(root: Path) -> Iterator[Candidate]:
    base = root / "openclipart-png/usr/share/openclipart/png"
    for path in _files(base, "**/*.png"):
        topic = path.parent.relative_to(base).as_posix()
        yield Candidate(
            f"openclipart/{path.relative_to(base)}",
            f"openclipart/{topic}",
            "art",
            path.read_bytes(),
        )


def _webp_in(blob: bytes) -> Iterator[bytes]:
    """Every RIFF/WEBP file stored in a binary blob (Qt keeps image files uncompressed)."""
    start = 0
    while (at := blob.find(b"RIFF", start)) >= 0:
        start = at + 4
        if blob[at + 8 : at + 12] != b"WEBP":
            continue
        (size,) = struct.unpack("<I", blob[at + 4 : at + 8])
        yield blob[at : at + 8 + size]


def _gcompris(root: Path) -> Iterator[Candidate]:
    resources = root / "gcompris-qt-data/usr/share/gcompris-qt/rcc"
    for path in _files(resources, "*.rcc"):
        for number, data in enumerate(_webp_in(path.read_bytes())):
            yield Candidate(
                f"gcompris/{path.stem}/{number:04d}.webp", f"gcompris/{path.stem}", "photo", data
            )


def candidates(root: Path) -> list[Candidate]:
    """Every usable picture of the packages, each distinct file once (by its bytes)."""
    seen: set[str] = set()
    found = []
    for candidate in (*_wallpapers(root), *_clipart(root), *_gcompris(root)):
        digest = hashlib.sha256(candidate.data).hexdigest()
        if digest in seen or not _usable(candidate.data):
            continue
        seen.add(digest)
        found.append(candidate)
    return found
