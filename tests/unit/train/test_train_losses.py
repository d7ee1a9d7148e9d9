"""Each trainer loss against a direct, slow re-statement of its formula (loops, float64)."""

import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from curate.train.losses import (
    dino_loss,
    ibot_loss,
    koleo_loss,
    sinkhorn_knopp,
    softmax_center,
    update_center,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _log_softmax_row(row: list[float], temp: float) -> list[float]:
    scaled = [v / temp for v in row]
    peak = max(scaled)
    log_z = peak + math.log(sum(math.exp(v - peak) for v in scaled))
    return [v - log_z for v in scaled]


def _slow_sinkhorn(logits: torch.Tensor, temp: float, iterations: int) -> list[list[float]]:
    b, k = logits.shape
    q = [[math.exp(logits[i][j].item() / temp) for i in range(b)] for j in range(k)]  # K x B
    total = sum(sum(r) for r in q)
    q = [[v / total for v in r] for r in q]
    for _ in range(iterations):
        for j in range(k):
            row = sum(q[j])
            q[j] = [v / row / k for v in q[j]]
        for i in range(b):
            col = sum(q[j][i] for j in range(k))
            for j in range(k):
                q[j][i] = q[j][i] / col / b
    return [[q[j][i] * b for j in range(k)] for i in range(b)]


def test_softmax_center_and_update_center_match_the_formula():
    t = torch.randn(5, 7, generator=_gen(0))
    center = torch.randn(1, 7, generator=_gen(1)) * 0.1
    out = softmax_center(t, center, 0.04)
    for i in range(5):
        exps = [math.exp((t[i, k].item() - center[0, k].item()) / 0.04) for k in range(7)]
        for k in range(7):
            assert out[i, k].item() == pytest.approx(exps[k] / sum(exps), rel=1e-4, abs=1e-7)
    new = update_center(center, t, 0.9)
    for k in range(7):
        mean = sum(t[i, k].item() for i in range(5)) / 5
        assert new[0, k].item() == pytest.approx(center[0, k].item() * 0.9 + mean * 0.1, abs=1e-6)


@pytest.mark.parametrize("iterations", [1, 3])
def test_sinkhorn_matches_loops(iterations):
    t = torch.randn(6, 5, generator=_gen(2))
    out = sinkhorn_knopp(t, 0.1, iterations)
    expected = _slow_sinkhorn(t.double(), 0.1, iterations)
    assert out.shape == (6, 5)
    for i in range(6):
        for k in range(5):
            assert out[i, k].item() == pytest.approx(expected[i][k], rel=1e-4, abs=1e-7)


def test_sinkhorn_marginals():
    t = torch.randn(32, 8, generator=_gen(3)) * 3
    out = sinkhorn_knopp(t, 0.5, n_iterations=200)
    # Each sample is a distribution; each prototype gets B / K of the mass once converged.
    torch.testing.assert_close(out.sum(dim=1), torch.ones(32), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.sum(dim=0), torch.full((8,), 32 / 8), rtol=0, atol=1e-3)


def test_sinkhorn_is_finite_where_exp_overflows():
    # |t| / temp = 250: exp() overflows float32 in a direct implementation.
    t = torch.tensor([[10.0, -10.0, 0.0], [-10.0, 10.0, 0.0], [0.0, 0.0, 10.0]])
    out = sinkhorn_knopp(t, 0.04)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.sum(dim=1), torch.ones(3))
    torch.testing.assert_close(out.argmax(dim=1), torch.tensor([0, 1, 2]))


def test_dino_loss_matches_loops():
    students = [torch.randn(4, 6, generator=_gen(10 + v)) for v in range(3)]
    teachers = [torch.softmax(torch.randn(4, 6, generator=_gen(20 + v)), -1) for v in range(2)]
    expected = 0.0
    for s in students:
        for t in teachers:
            batch = 0.0
            for i in range(4):
                lsm = _log_softmax_row(s[i].tolist(), 0.1)
                batch += -sum(t[i, k].item() * lsm[k] for k in range(6))
            expected += batch / 4
    assert dino_loss(students, teachers, 0.1).item() == pytest.approx(expected, rel=1e-5)


def test_ibot_loss_matches_loops():
    masks = torch.tensor(
        [[1, 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool
    )  # image 1 has no masked token but still counts in the division
    m = int(masks.sum())
    s = torch.randn(m, 5, generator=_gen(30))
    t = torch.softmax(torch.randn(m, 5, generator=_gen(31)), -1)
    expected, row = 0.0, 0
    for image in range(3):
        n_masked = int(masks[image].sum())
        for patch in range(4):
            if masks[image, patch]:
                lsm = _log_softmax_row(s[row].tolist(), 0.1)
                ce = -sum(t[row, k].item() * lsm[k] for k in range(5))
                expected += ce / n_masked
                row += 1
    expected /= 3
    assert ibot_loss(s, t, masks, 0.1).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="masked tokens"):
        ibot_loss(s[:-1], t[:-1], masks)


def test_koleo_loss_matches_loops():
    x = torch.randn(7, 4, generator=_gen(40)).double()
    rows = [[v / math.sqrt(sum(u * u for u in r)) for v in r] for r in x.tolist()]
    expected = 0.0
    for i, r in enumerate(rows):
        best = max(
            (j for j in range(7) if j != i),
            key=lambda j: sum(a * b for a, b in zip(r, rows[j], strict=True)),
        )
        distance = math.sqrt(sum((a - b) ** 2 for a, b in zip(r, rows[best], strict=True)))
        expected += -math.log(distance + 1e-8)
    expected /= 7
    assert koleo_loss(x.float()).item() == pytest.approx(expected, rel=1e-4)


def test_koleo_loss_finite_on_duplicate_rows_and_float32_under_autocast():
    base = torch.randn(4, 8, generator=_gen(41))
    x = torch.cat([base, base[:2]]).requires_grad_(True)  # rows 4, 5 duplicate rows 0, 1
    loss = koleo_loss(x)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(x.grad).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = koleo_loss(base.bfloat16())
    assert low.dtype == torch.float32 and torch.isfinite(low)
    with pytest.raises(ValueError, match="koleo_loss"):
        koleo_loss(base[:1])


# -- across processes: sums over ranks -------------------------------------------------------------


def _distributed_worker(rank: int, init_file: str, result_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        logits = torch.randn(9, 5, generator=_gen(50))
        # Ranks hold different numbers of rows (masked patch tokens): 4 and 5.
        mine = logits[:4] if rank == 0 else logits[4:]
        out = sinkhorn_knopp(mine, 0.1, 3)
        center = update_center(torch.zeros(1, 5), mine, 0.5)
        gathered = [torch.zeros(5, 5), torch.zeros(5, 5)]
        padded = torch.zeros(5, 5)
        padded[: out.shape[0]] = out
        dist.all_gather(gathered, padded)
        if rank == 0:
            torch.save(
                {"sinkhorn": torch.cat([gathered[0][:4], gathered[1]]), "center": center},
                result_file,
            )
    finally:
        dist.destroy_process_group()


def test_sinkhorn_and_center_sum_over_ranks():
    with tempfile.TemporaryDirectory() as tmp:
        init_file, result_file = os.path.join(tmp, "init"), os.path.join(tmp, "out.pt")
        mp.spawn(_distributed_worker, args=(init_file, result_file), nprocs=2, join=True)
        result = torch.load(result_file)
    logits = torch.randn(9, 5, generator=_gen(50))
    # Two ranks give what one process gives on all the rows.
    torch.testing.assert_close(result["sinkhorn"], sinkhorn_knopp(logits, 0.1, 3))
    per_rank_mean = (logits[:4].mean(0) + logits[4:].mean(0)) / 2
    torch.testing.assert_close(result["center"][0], per_rank_mean * 0.5)
