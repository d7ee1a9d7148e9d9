"""The trainer's network: heads, mask token, teacher copy, parameter groups, timm export."""

import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from curate.stages.embed.model import ModelSpec, load_backbone
from curate.train.export import backbone_tensors, save_backbone
from curate.train.knn_eval import knn_predict
from curate.train.model import (
    SSLNetwork,
    WeightNormLinear,
    build_student_teacher,
    param_groups,
    param_multipliers,
)
from schemas.train import load_train_config

TINY = load_train_config(preset="tiny")


def _crops(n: int, size: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_student_and_teacher_outputs():
    student, teacher = build_student_teacher(TINY.model, 32, seed=0)
    k = TINY.model.prototypes
    masks = torch.zeros(4, 4, dtype=torch.bool)
    masks[0, :3] = True
    masks[3, 1] = True
    out = student(_crops(4, 32, 0), _crops(6, 16, 1), masks)
    assert out.global_logits.shape == (4, k)
    assert out.local_logits.shape == (6, k)
    assert out.patch_logits.shape == (4, k)  # one row per masked token
    assert out.global_cls.shape == (4, student.backbone.embed_dim)
    t = teacher(_crops(4, 32, 0), None, masks, teacher=True)
    assert t.global_logits.shape == (4, k) and t.patch_logits.shape == (4, k)
    assert not any(p.requires_grad for p in teacher.parameters())
    # Same weights, and without masks or drop path the student computes what the teacher does.
    student.eval()
    none = torch.zeros(4, 4, dtype=torch.bool)
    s = student(_crops(4, 32, 0), None, none)
    t = teacher(_crops(4, 32, 0), None, none, teacher=True)
    torch.testing.assert_close(s.global_logits, t.global_logits)
    # The teacher has no drop path; the student does.
    assert teacher.backbone.blocks[-1].drop_path1.__class__.__name__ == "Identity"
    assert student.backbone.blocks[-1].drop_path1.__class__.__name__ == "DropPath"


def test_mask_token_replaces_masked_patches():
    network = SSLNetwork(TINY.model, 32, drop_path_rate=0.0).eval()
    all_masked = torch.ones(2, 4, dtype=torch.bool)
    a = network.tokens(_crops(2, 32, 3), all_masked)
    b = network.tokens(_crops(2, 32, 4), all_masked)
    # Every patch is the mask token: the image no longer matters.
    torch.testing.assert_close(a, b)
    c = network.tokens(_crops(2, 32, 3), torch.zeros(2, 4, dtype=torch.bool))
    assert not torch.allclose(a, c)


def test_weight_norm_rows_have_the_gain_as_norm():
    layer = WeightNormLinear(8, 5)
    with torch.no_grad():
        layer.weight_g.copy_(torch.arange(1.0, 6.0).unsqueeze(1))
    # The effective weight, read back through the identity.
    weight = layer(torch.eye(8)).t()
    torch.testing.assert_close(weight.norm(dim=1), torch.arange(1.0, 6.0))


def test_parameter_multipliers_follow_the_reference():
    def mult(name):
        return param_multipliers(name, 12, 0.9, 0.2)

    assert mult("backbone.patch_embed.proj.weight").lr == 0.9**13 * 0.2
    assert mult("backbone.cls_token").lr == 0.9**13
    assert mult("mask_token").lr == 0.9**13
    assert mult("backbone.blocks.0.attn.qkv.weight").lr == 0.9**12
    assert mult("backbone.blocks.11.mlp.fc2.weight").lr == 0.9**1
    assert mult("backbone.norm.weight").lr == 1.0
    assert mult("dino_head.mlp.0.weight").lr == 1.0
    assert mult("backbone.blocks.3.attn.qkv.bias").weight_decay == 0.0
    assert mult("backbone.blocks.3.norm1.weight").weight_decay == 0.0
    assert mult("backbone.blocks.3.ls1.gamma").weight_decay == 0.0
    assert mult("backbone.blocks.3.mlp.fc1.weight").weight_decay == 1.0
    assert mult("dino_head.last_layer.weight_v").last_layer
    assert not mult("dino_head.mlp.4.weight").last_layer
    student, _ = build_student_teacher(TINY.model, 32, seed=0)
    groups = param_groups(student, 0.9, 0.2)
    grouped = sum(len(g["params"]) for g in groups)
    assert grouped == len(list(student.parameters()))
    assert len(groups) < grouped  # parameters sharing multipliers share a group


def test_exported_backbone_loads_strictly_in_timm(tmp_path):
    # A plain ViT, and DINOv2's layout (LayerScale gammas, patch 14).
    for arch, size in (("test_vit", 32), ("vit_small_patch14_dinov2", 28)):
        options = TINY.model.model_copy(update={"arch": arch})
        teacher = SSLNetwork(options, size, drop_path_rate=0.0).eval()
        out = save_backbone(
            backbone_tensors(teacher.state_dict()),
            tmp_path / f"{arch}.safetensors",
            arch,
            size,
            teacher.patch_size,
        )
        with safe_open(str(out), framework="pt") as handle:
            meta = handle.metadata()
        assert meta == {
            "format": "lvd-curate-backbone",
            "arch": arch,
            "img_size": str(size),
            "patch_size": str(teacher.patch_size),
        }
        # Exactly what the embedder does.
        model = timm.create_model(
            meta["arch"], pretrained=False, num_classes=0, img_size=int(meta["img_size"])
        )
        model.load_state_dict(load_file(str(out)), strict=True)
        model.eval()
        images = _crops(2, size, 5)
        with torch.no_grad():
            expected = teacher.tokens(images)[:, 0]
            torch.testing.assert_close(model(images), expected)
            # And through the embed stage's loader: the loop from training back to curation.
            embedder = load_backbone(ModelSpec(arch, out, img_size=size))
            torch.testing.assert_close(embedder(images), expected)


def test_knn_predict_is_the_weighted_vote_of_the_k_nearest():
    gen = torch.Generator().manual_seed(7)
    bank = torch.nn.functional.normalize(torch.randn(30, 8, generator=gen), dim=1)
    labels = torch.randint(0, 3, (30,), generator=gen)
    queries = torch.nn.functional.normalize(torch.randn(5, 8, generator=gen), dim=1)
    predicted = knn_predict(bank, labels, queries, n_classes=3, k=4, temperature=0.07)
    for q in range(5):
        sims = sorted(((float(queries[q] @ bank[i]), i) for i in range(30)), reverse=True)[:4]
        votes = [0.0, 0.0, 0.0]
        for sim, i in sims:
            votes[int(labels[i])] += torch.tensor(sim / 0.07).exp().item()
        assert int(predicted[q]) == max(range(3), key=lambda c: votes[c])
