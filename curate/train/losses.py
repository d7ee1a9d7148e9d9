"""DINO, iBOT and KoLeo losses as pure functions, with the maths of the DINOv2 reference.

Every cross-process sum goes through `all_reduce_sum`, which is the identity when no process
group is running, so one process needs no setup. Teacher-side functions run in float32 whatever
the autocast dtype: exp(t / 0.04) overflows bfloat16 long before float32.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


def world_size() -> int:
    """Processes in the default group; 1 when none is running."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum `tensor` over all ranks in place (no-op in one process) and return it."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def softmax_center(teacher_logits: Tensor, center: Tensor, teacher_temp: float) -> Tensor:
    """DINO's centred, sharpened teacher targets: softmax((t - center) / temp)."""
    return F.softmax((teacher_logits.float() - center) / teacher_temp, dim=-1)


@torch.no_grad()
def update_center(center: Tensor, teacher_logits: Tensor, momentum: float) -> Tensor:
    """The new centre: EMA of the teacher logits' batch mean, averaged over all ranks."""
    batch_mean = teacher_logits.float().mean(dim=0, keepdim=True)
    # Each rank's mean, averaged: the reference divides the summed per-rank means by world size.
    batch_mean = all_reduce_sum(batch_mean) / world_size()
    return center * momentum + batch_mean * (1 - momentum)


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: Tensor, teacher_temp: float, n_iterations: int = 3) -> Tensor:
    """SwAV/DINOv2 Sinkhorn-Knopp targets [B, K]: rows sum to 1, prototypes used equally.

    Q = exp(t / temp)^T (K x B, B over all ranks) is normalised to sum 1, then alternately each
    prototype row to 1/K and each sample column to 1/B; returned as (B * Q)^T. Rows may differ in
    number between ranks (masked patch tokens): B is the global row count.
    """
    logits = teacher_logits.float()
    # Subtracting the global maximum leaves Q unchanged after the first normalisation and keeps
    # exp() finite: the reference overflows to inf (then NaN) once |t| / temp passes ~88.
    peak = logits.max() if logits.numel() else logits.new_tensor(0.0)
    if world_size() > 1:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    q = torch.exp((logits - peak) / teacher_temp).t()
    rows = all_reduce_sum(torch.tensor(float(q.shape[1]), device=q.device))
    n_prototypes = q.shape[0]
    q /= all_reduce_sum(q.sum())
    for _ in range(n_iterations):
        q /= all_reduce_sum(q.sum(dim=1, keepdim=True))
        q /= n_prototypes
        q /= q.sum(dim=0, keepdim=True)
        q /= rows
    q *= rows
    return q.t()


def _cross_entropy(teacher_probs: Tensor, student_logits: Tensor, student_temp: float) -> Tensor:
    """Per-row sum_k t * log_softmax(s / temp): the negative of each row's loss."""
    log_probs = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    return torch.sum(teacher_probs * log_probs, dim=-1)


def dino_loss(
    student_logits: list[Tensor], teacher_probs: list[Tensor], student_temp: float = 0.1
) -> Tensor:
    """Sum over every (student view, teacher view) pair of the batch-mean cross-entropy."""
    total = student_logits[0].new_zeros((), dtype=torch.float32)
    for student in student_logits:
        for teacher in teacher_probs:
            total = total - _cross_entropy(teacher, student, student_temp).mean()
    return total


def ibot_loss(
    student_patch_logits: Tensor,
    teacher_patch_probs: Tensor,
    masks: Tensor,
    student_temp: float = 0.1,
) -> Tensor:
    """Masked-patch cross-entropy; tokens weighted 1 / (masked tokens of their image).

    `student_patch_logits` and `teacher_patch_probs` hold only the masked tokens [M, K], in the
    order of `masks.nonzero()` (image-major) where masks is bool [n_images, patches]. The
    weighted sum is divided by n_images, masked or not.
    """
    if masks.dtype != torch.bool or masks.ndim != 2:
        raise ValueError(f"masks must be bool [images, patches], got {masks.dtype} {masks.shape}")
    masked = int(masks.sum())
    if student_patch_logits.shape[0] != masked or teacher_patch_probs.shape[0] != masked:
        raise ValueError(
            f"{masked} masked tokens but {student_patch_logits.shape[0]} student and "
            f"{teacher_patch_probs.shape[0]} teacher rows"
        )
    per_image = masks.sum(dim=-1).clamp(min=1.0)
    weights = (1.0 / per_image).unsqueeze(-1).expand_as(masks)[masks]
    loss = _cross_entropy(teacher_patch_probs, student_patch_logits, student_temp) * weights
    return -loss.sum() / masks.shape[0]


def koleo_loss(features: Tensor, eps: float = 1e-8) -> Tensor:
    """Kozachenko-Leonenko entropy regulariser: -mean log distance to the nearest other row.

    Float32 whatever the autocast dtype. Finite on duplicate rows: the distance is taken as
    ||x_i - x_nn + eps|| (torch.pairwise_distance, as the reference), never exactly zero.
    """
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"koleo_loss needs [n >= 2, d] features, got {tuple(features.shape)}")
    device_type = features.device.type
    with torch.autocast(device_type=device_type, enabled=False):
        x = F.normalize(features.float(), p=2, dim=-1, eps=eps)
        with torch.no_grad():
            dots = x @ x.t()
            # Below any cosine, so a row is never its own nearest neighbour.
            dots.fill_diagonal_(-2.0)
            nearest = dots.argmax(dim=1)
        distances = F.pairwise_distance(x, x[nearest], p=2, eps=eps)
        return -torch.log(distances + eps).mean()
