"""Copy descriptors (SSCD-style model, weights, preprocessing) and the FAISS copy graph."""

import pickle
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from curate.stages.dedup.copy_detection import (
    WEIGHTS_SETTING,
    CopyWeightsError,
    GeM,
    SSCDNet,
    copy_descriptors,
    copy_transform,
    load_copy_descriptor,
    normalize_scores,
)
from curate.stages.dedup.knn_graph import (
    build_index,
    contamination,
    copy_edges,
    cross_edges,
    knn_edges,
)

SIZE = 64  # pixels: enough for a ResNet's 32x downsampling, small enough for a fast test


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def noisy_copy(x: np.ndarray, cosine: float, rng: np.random.Generator) -> np.ndarray:
    """Unit vectors at about `cosine` to the rows of x."""
    noise = unit(rng.standard_normal(x.shape))
    noise = unit(noise - (noise * x).sum(-1, keepdims=True) * x)  # orthogonal to x
    return unit(cosine * x + np.sqrt(1 - cosine**2) * noise)


def planted_set(n: int, d: int, n_copies: int, cosine: float, seed: int = 0):
    """n random unit vectors whose last n_copies rows are noisy copies of the first ones."""
    rng = np.random.default_rng(seed)
    x = unit(rng.standard_normal((n, d)))
    x[n - n_copies :] = noisy_copy(x[:n_copies], cosine, rng)
    return x.astype(np.float16), n_copies


def pairs(edges) -> set[tuple[int, int]]:
    left, right, _ = edges
    return set(zip(left.tolist(), right.tolist(), strict=True))


@pytest.fixture(scope="module")
def tiny_model() -> SSCDNet:
    torch.manual_seed(0)
    return SSCDNet(trunk="resnet18").eval()


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


# --- model -------------------------------------------------------------------------------------


def test_gem_matches_its_formula():
    x = torch.rand(2, 3, 4, 5) + 0.1
    expected = (x**3).mean(dim=(2, 3)) ** (1 / 3)
    torch.testing.assert_close(GeM(3.0)(x), expected)
    torch.testing.assert_close(GeM(1.0)(x), x.mean(dim=(2, 3)))  # p = 1 is average pooling


def test_descriptor_is_unit_norm_512(tiny_model, batch):
    with torch.inference_mode():
        out = tiny_model(batch)
    assert out.shape == (3, 512)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))


def test_copy_descriptors_from_images(tiny_model):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 70, 3), np.uint8)) for _ in range(5)]
    images.append(images[0].convert("L"))  # any mode goes in as RGB
    out = copy_descriptors(tiny_model, images, batch_size=4, transform=copy_transform(SIZE))
    assert out.shape == (6, 512) and out.dtype == np.float16
    np.testing.assert_allclose(np.linalg.norm(out.astype(np.float32), axis=1), 1, atol=2e-3)
    # Short-side resizing keeps the aspect ratio; mixed shapes in one batch still work.
    keep_aspect = copy_transform(None, short_side=SIZE)
    assert keep_aspect(images[0]).shape == (3, SIZE, 112)
    mixed = images[:2] + [images[0].resize((70, 70))]
    assert copy_descriptors(tiny_model, mixed, transform=keep_aspect).shape == (3, 512)


def test_copy_transform_normalises_like_imagenet():
    white = copy_transform(32)(Image.new("RGB", (50, 40), (255, 255, 255)))
    assert white.shape == (3, 32, 32)
    expected = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(white[:, 0, 0], expected)


# --- weights -----------------------------------------------------------------------------------


def test_torchscript_round_trip(tmp_path, tiny_model, batch):
    path = tmp_path / "sscd_tiny.torchscript.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still published
        torch.jit.trace(tiny_model, batch).save(str(path))
    loaded = load_copy_descriptor(path, allow_random=False, device="cpu")
    assert isinstance(loaded, torch.jit.ScriptModule)
    expected = copy_descriptors(tiny_model, batch, device="cpu")
    np.testing.assert_allclose(copy_descriptors(loaded, batch), expected, atol=2e-3)


def test_state_dict_round_trip_with_prefix(tmp_path, tiny_model, batch):
    path = tmp_path / "copy.pt"
    state = {f"module.{key}": value for key, value in tiny_model.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 3}, path)
    loaded = load_copy_descriptor(path, allow_random=False, device="cpu")
    with torch.inference_mode():
        torch.testing.assert_close(loaded(batch), tiny_model(batch))


def test_sscd_torchvision_release_layout(tmp_path, tiny_model, batch):
    # SSCD's *.torchvision.pt: the whole torchvision ResNet under backbone., projection as fc.
    state = {}
    for key, value in tiny_model.state_dict().items():
        key = key.replace("trunk.", "backbone.").replace("projection.", "backbone.fc.")
        state[key] = value
    path = tmp_path / "sscd.torchvision.pt"
    torch.save(state, path)
    loaded = load_copy_descriptor(path, allow_random=False, device="cpu")
    with torch.inference_mode():
        torch.testing.assert_close(loaded(batch), tiny_model(batch))


def test_safetensors_round_trip(tmp_path, tiny_model, batch):
    safetensors = pytest.importorskip("safetensors.torch")
    path = tmp_path / "copy.safetensors"
    safetensors.save_file(dict(tiny_model.state_dict()), str(path))
    loaded = load_copy_descriptor(path, allow_random=False, device="cpu")
    with torch.inference_mode():
        torch.testing.assert_close(loaded(batch), tiny_model(batch))


def test_strict_load_names_missing_and_unexpected_keys(tmp_path, tiny_model):
    state = dict(tiny_model.state_dict())
    del state["trunk.layer4.1.bn2.weight"]
    state["head.extra"] = torch.zeros(1)
    path = tmp_path / "broken.pt"
    torch.save(state, path)
    with pytest.raises(CopyWeightsError, match=r"layer4\.1\.bn2\.weight") as error:
        load_copy_descriptor(path, allow_random=False, device="cpu")
    assert "head.extra" in str(error.value) and str(path) in str(error.value)


def test_missing_and_unreadable_files_name_the_path(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(CopyWeightsError, match="nope.pt"):
        load_copy_descriptor(missing, allow_random=True)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CopyWeightsError, match="junk.pt"):
        load_copy_descriptor(junk, allow_random=True)


def test_no_weights_skips_loudly_naming_the_setting():
    with pytest.warns(RuntimeWarning, match=WEIGHTS_SETTING):
        assert load_copy_descriptor(None, allow_random=False) is None
    with pytest.warns(RuntimeWarning, match="RANDOM WEIGHTS"):
        model = load_copy_descriptor(None, allow_random=True, device="cpu")
    assert isinstance(model, SSCDNet) and not model.training


def test_score_normalisation_subtracts_background_level():
    sims = np.array([[0.9, 0.5], [0.9, 0.5]], np.float32)
    background = np.array([[0.6, 0.3, 0.0, -1.0], [0.1, 0.1, 0.1, 0.1]], np.float32)
    out = normalize_scores(sims, background, beta=1.0)  # mean of ranks 0..2
    np.testing.assert_allclose(out, [[0.6, 0.2], [0.8, 0.4]], atol=1e-6)
    one = normalize_scores(sims[:, 0], background, beta=0.5, ranks=(1, 1))  # the paper's form
    np.testing.assert_allclose(one, [0.75, 0.85], atol=1e-6)


# --- copy graph --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def planted():
    # d = 128: random pairs above 0.6 cosine have odds ~1e-12, so every edge is a planted one.
    return planted_set(3000, 128, n_copies=60, cosine=0.8)


def test_flat_finds_exactly_the_planted_copies(planted):
    x, n_copies = planted
    left, right, sims = copy_edges(x, k=16, threshold=0.6)
    expected = {(i, len(x) - n_copies + i) for i in range(n_copies)}
    assert pairs((left, right, sims)) == expected
    assert np.all(left < right) and np.all((sims > 0.7) & (sims < 0.9))


def test_ivf_pq_gives_the_flat_edges(planted):
    x, _ = planted
    flat = copy_edges(x, k=16, threshold=0.6)
    index = build_index(x, exact_below=1000, nlist=16, pq_m=16, nprobe=8)
    assert not index.exact
    ivf = knn_edges(index, x, k=16, threshold=0.6)
    assert pairs(ivf) == pairs(flat)
    # Re-scored exactly: the same cosines, not PQ estimates.
    np.testing.assert_allclose(ivf[2], flat[2], atol=1e-3)


def test_blockwise_search_equals_one_shot(planted):
    x, _ = planted
    index = build_index(x)
    one_shot = knn_edges(index, x, k=16, threshold=0.6, block=len(x))
    blocked = knn_edges(index, x, k=16, threshold=0.6, block=256)
    assert pairs(blocked) == pairs(one_shot)
    np.testing.assert_allclose(blocked[2], one_shot[2], atol=1e-5)
    # Workers each search a slice with its offset; the union is the whole graph.
    halves = [knn_edges(index, x[s : s + 1500], 16, 0.6, offset=s) for s in (0, 1500)]
    assert pairs(halves[0]) | pairs(halves[1]) == pairs(one_shot)


def test_slices_searched_anywhere_in_any_order_give_the_same_edges(planted):
    x, _ = planted
    whole = copy_edges(x, k=16, threshold=0.6)
    shipped = []

    def elsewhere(search, slices):
        """Stands in for Ray tasks: the search travels pickled, slices run out of order."""
        remote = pickle.loads(pickle.dumps(search))
        shipped.extend(slices)
        return [remote(start, stop) for start, stop in reversed(slices)]

    sliced = copy_edges(x, k=16, threshold=0.6, map_slices=elsewhere, slice_rows=700)
    assert shipped == [(0, 700), (700, 1400), (1400, 2100), (2100, 2800), (2800, 3000)]
    np.testing.assert_array_equal(sliced[0], whole[0])
    np.testing.assert_array_equal(sliced[1], whole[1])
    # BLAS sums a query's products in an order that depends on the batch shape: last bits only.
    np.testing.assert_allclose(sliced[2], whole[2], atol=1e-5)


def test_copy_chains_form_components(planted):
    x, _ = planted
    rng = np.random.default_rng(5)
    x = x.astype(np.float32)
    x[100] = noisy_copy(x[:1], 0.9, rng)[0]
    x[101] = noisy_copy(x[100:101], 0.9, rng)[0]  # a chain 0 - 100 - 101, plus 0's planted copy
    left, right, _ = copy_edges(x.astype(np.float16), k=8, threshold=0.6)
    graph = coo_matrix((np.ones(len(left)), (left, right)), shape=(len(x), len(x)))
    _, labels = connected_components(graph, directed=False)
    assert labels[0] == labels[100] == labels[101] == labels[len(x) - 60]
    assert len(np.unique(labels)) == len(x) - 60 - 2


def test_background_normalisation_raises_the_bar(planted):
    x, n_copies = planted
    rng = np.random.default_rng(3)
    # A background crowded around copy pair 0 makes that pair ordinary; the others stay copies.
    crowd = noisy_copy(np.repeat(x[:1].astype(np.float64), 8, 0), 0.75, rng)
    background = np.concatenate([crowd, unit(rng.standard_normal((500, x.shape[1])))])
    # Normalised scores: copies ~0.8 - ~0.3 (random background level), pair 0 ~0.8 - 0.75.
    left, _, _ = copy_edges(x, k=16, threshold=0.3, background=background.astype(np.float16))
    assert 0 not in left.tolist()
    assert len(left) == n_copies - 1


def test_cross_edges_point_from_query_to_reference(planted):
    x, n_copies = planted
    eval_set = x[:5]
    left, right, sims = cross_edges(x[-n_copies:], eval_set, k=4, threshold=0.45)
    np.testing.assert_array_equal(left, np.arange(5))
    np.testing.assert_array_equal(right, np.arange(5))
    assert np.all(sims > 0.7)


def test_contamination_removes_copies_of_eval_images_only():
    rng = np.random.default_rng(7)
    d = 256  # random pairs stay far below 0.45
    eval_set = unit(rng.standard_normal((20, d)))
    crawl = unit(rng.standard_normal((2000, d)))
    # Directions orthogonal to eval image 3 (and each other) place crawl images exactly.
    frame, _ = np.linalg.qr(np.stack([eval_set[3], *rng.standard_normal((3, d))], axis=1))
    e, (u, w, v) = eval_set[3], frame[:, 1:].T
    crawl[0] = 0.8 * e + 0.6 * u  # a copy of eval image 3 (cosine 0.8)
    crawl[1] = 0.3 * e + 0.5 * u + np.sqrt(0.66) * w  # 0.54 to crawl 0, 0.3 to the eval image
    crawl[2] = noisy_copy(crawl[1000:1001], 0.8, rng)[0]  # a crawl-only copy pair: kept
    crawl[3] = 0.3 * e + np.sqrt(0.91) * v  # an unrelated neighbour of the eval image: kept
    rows, names, sims = contamination(crawl.astype(np.float16), eval_set.astype(np.float16))
    np.testing.assert_array_equal(rows, [0, 1])
    np.testing.assert_array_equal(names, [3, 3])
    assert sims[0] == pytest.approx(0.8, abs=2e-3)  # the direct copy
    assert sims[1] == pytest.approx(0.3, abs=2e-3)  # linked through crawl 0: below threshold


def test_gpu_branch_runs_through_faiss_gpu_calls(planted, monkeypatch):
    """The GPU path is the CPU path plus cloner calls; stand-ins for them keep it exercised."""
    import faiss

    cloned = []

    class ClonerOptions:
        useFloat16 = False
        shard = False

    def to_all_gpus(index, co=None):
        cloned.append((type(index).__name__, getattr(co, "useFloat16", None)))
        return index

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", to_all_gpus)
    monkeypatch.setattr(faiss, "GpuMultipleClonerOptions", ClonerOptions, raising=False)
    monkeypatch.setattr(faiss, "GpuParameterSpace", faiss.ParameterSpace, raising=False)
    x, _ = planted
    index = build_index(x, exact_below=1000, nlist=16, pq_m=16, nprobe=8)
    assert index.on_gpu
    assert cloned == [("IndexFlatIP", None), ("IndexIVFPQ", True)]  # k-means, then the index
    assert pairs(knn_edges(index, x, 16, 0.6)) == pairs(copy_edges(x, 16, 0.6, use_gpu=False))
