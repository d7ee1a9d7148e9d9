"""k-NN evaluation of a backbone on a labelled image folder (DINO's protocol: k = 20, T = 0.07).

The folder holds one sub-folder per class. Its images are split deterministically in two by a
hash of their relative path: one half is the memory bank, the other the queries. Each query's
class is the vote of its k most cosine-similar bank images, each weighted exp(cosine / T).
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor, nn
from torchvision.transforms import v2

from schemas.errors import DataError, NotFoundError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class KnnDataError(DataError, ValueError):
    """A labelled folder that cannot be evaluated on (missing, no classes, too few images)."""

    code = "knn_data_invalid"


class KnnFolderNotFound(NotFoundError, KnnDataError):
    """A labelled folder path that names no folder."""

    code = "knn_folder_not_found"


@dataclass(frozen=True)
class LabelledImages:
    paths: list[Path]
    labels: list[int]
    classes: list[str]


@dataclass(frozen=True)
class KnnResult:
    accuracy: float  # top-1 on the query half
    queries: int
    bank: int
    classes: int
    skipped: int  # images that did not decode


def labelled_folder(root: Path) -> LabelledImages:
    """Every image under root/<class>/ (recursively), classes in name order."""
    root = Path(root)
    if not root.is_dir():
        raise KnnFolderNotFound(f"{root}: labelled image folder not found")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    paths: list[Path] = []
    labels: list[int] = []
    for index, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(path)
                labels.append(index)
    if len(classes) < 2 or len(paths) < 4:
        raise KnnDataError(
            f"{root}: needs >= 2 class folders and >= 4 images, found {len(classes)} and "
            f"{len(paths)}"
        )
    return LabelledImages(paths, labels, classes)


def is_query(relative_path: str) -> bool:
    """The deterministic half of the images that are queries rather than the memory bank."""
    return hashlib.sha256(relative_path.encode()).digest()[0] % 2 == 1


def eval_transform(img_size: int) -> v2.Compose:
    """Resize the short side to img_size * 256 / 224, centre crop img_size, normalise."""
    return v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize(round(img_size * 256 / 224), antialias=True),
            v2.CenterCrop(img_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


@torch.no_grad()
def extract_features(
    backbone: nn.Module, paths: list[Path], img_size: int, batch_size: int = 64
) -> tuple[Tensor, list[bool]]:
    """L2-normalised backbone outputs [n_ok, D] of the images that decode, and which did."""
    device = next(backbone.parameters()).device
    transform = eval_transform(img_size)
    was_training = backbone.training
    backbone.eval()
    features: list[Tensor] = []
    ok: list[bool] = []
    batch: list[Tensor] = []

    def flush() -> None:
        if batch:
            out = backbone(torch.stack(batch).to(device))
            features.append(F.normalize(out.float(), dim=-1).cpu())
            batch.clear()

    for path in paths:
        try:
            with Image.open(path) as img:
                batch.append(transform(img.convert("RGB")))
            ok.append(True)
        except (OSError, UnidentifiedImageError, ValueError):
            ok.append(False)
        if len(batch) == batch_size:
            flush()
    flush()
    backbone.train(was_training)
    dim = features[0].shape[1] if features else 0
    return (torch.cat(features) if features else torch.zeros(0, dim)), ok


def knn_predict(
    bank: Tensor,
    bank_labels: Tensor,
    queries: Tensor,
    n_classes: int,
    k: int = 20,
    temperature: float = 0.07,
) -> Tensor:
    """Predicted class per query: exp(cosine / T)-weighted vote of its k nearest bank rows."""
    k = min(k, bank.shape[0])
    similarity = queries @ bank.t()
    top, index = similarity.topk(k, dim=1)
    votes = torch.zeros(queries.shape[0], n_classes)
    votes.scatter_add_(1, bank_labels[index], (top / temperature).exp())
    return votes.argmax(dim=1)


def evaluate_knn(
    backbone: nn.Module,
    data: LabelledImages,
    root: Path,
    img_size: int,
    k: int = 20,
    temperature: float = 0.07,
    batch_size: int = 64,
) -> KnnResult:
    """Top-1 k-NN accuracy of `backbone` on the query half of `data` against its bank half."""
    features, ok = extract_features(backbone, data.paths, img_size, batch_size)
    kept = [i for i, good in enumerate(ok) if good]
    labels = torch.tensor([data.labels[i] for i in kept], dtype=torch.long)
    query = torch.tensor(
        [is_query(data.paths[i].relative_to(root).as_posix()) for i in kept], dtype=torch.bool
    )
    if query.all() or not query.any():
        raise KnnDataError(f"{root}: too few images to split into a bank and queries")
    predicted = knn_predict(
        features[~query], labels[~query], features[query], len(data.classes), k, temperature
    )
    accuracy = (predicted == labels[query]).float().mean().item()
    return KnnResult(
        accuracy=accuracy,
        queries=int(query.sum()),
        bank=int((~query).sum()),
        classes=len(data.classes),
        skipped=len(ok) - len(kept),
    )
