"""Embedding backbones load from every checkpoint format, strictly, or say what is wrong."""

import warnings
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer, _create_vision_transformer

from curate.stages.embed.model import IMAGENET_MEAN, ModelSpec, WeightsError, load_backbone
from curate.train.export import save_backbone

TINY = "vit_tiny_patch16_224"
# Miniature DINOv2 ViTs (layer scale, patch 14, 518 px position grid; with and without
# registers) and plain ViTs of two widths: timm's real ones build too slowly for a test.
DINOV2 = "vit_test_patch14_dinov2"
DINOV2_REG = "vit_test_patch14_reg4_dinov2"
SMALL = "vit_test_patch16"
WIDE = "vit_test_wide_patch16"
_TEST_ARCHS = {
    DINOV2: dict(patch_size=14, embed_dim=48, depth=4, num_heads=3, init_values=1e-5),
    DINOV2_REG: dict(
        patch_size=14,
        embed_dim=48,
        depth=4,
        num_heads=3,
        init_values=1e-5,
        reg_tokens=4,
        no_embed_class=True,
    ),
    SMALL: dict(patch_size=16, embed_dim=32, depth=2, num_heads=2),
    WIDE: dict(patch_size=16, embed_dim=64, depth=2, num_heads=2),
}


def _register(name: str) -> None:
    def build(pretrained: bool = False, **kwargs) -> VisionTransformer:
        return _create_vision_transformer(
            name, pretrained=pretrained, **(_TEST_ARCHS[name] | kwargs)
        )

    build.__name__ = name
    register_model(build)


for _name in _TEST_ARCHS:
    _register(_name)


def _source(arch: str = SMALL, img_size: int = 32, seed: int = 1) -> torch.nn.Module:
    # Seed 1: load_backbone's own random init uses seed 0, so a load that silently kept the
    # initial weights would not pass for a load of these.
    torch.manual_seed(seed)
    return timm.create_model(arch, pretrained=False, num_classes=0, img_size=img_size).eval()


def _assert_same_state(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert set(state) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=1e-6, msg=key)


def test_safetensors_loads_strictly(tmp_path: Path) -> None:
    source = _source(TINY)
    path = tmp_path / "vit_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = load_backbone(ModelSpec(TINY, path, img_size=32))
    _assert_same_state(model, source.state_dict())
    assert not model.training
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), source(x))


@pytest.mark.parametrize(
    "layout",
    ["raw", "model/_orig_mod", "state_dict/module", "dino_teacher_student", "dinov2_train"],
)
def test_wrapped_state_dicts_load(tmp_path: Path, layout: str) -> None:
    source = _source()
    state = source.state_dict()
    head = {"head.mlp.0.weight": torch.randn(8, 32), "head.last_layer.weight": torch.randn(4, 8)}
    if layout == "raw":
        checkpoint: dict = state
    elif layout == "model/_orig_mod":
        checkpoint = {"model": {f"_orig_mod.{k}": v for k, v in state.items()}, "epoch": 3}
    elif layout == "state_dict/module":
        checkpoint = {"state_dict": {f"module.{k}": v for k, v in state.items()}}
    elif layout == "dino_teacher_student":
        # DINO's checkpoints: DDP-wrapped MultiCropWrappers (backbone + projection head) per net.
        student = {f"module.backbone.{k}": torch.zeros_like(v) for k, v in state.items()}
        teacher = {f"backbone.{k}": v for k, v in state.items()}
        teacher |= {f"{k}": v for k, v in head.items()}
        checkpoint = {"student": student, "teacher": teacher, "epoch": 100}
    else:
        # DINOv2's training checkpoints: one meta-arch state dict with teacher. / student. halves.
        weights = {f"teacher.backbone.{k}": v for k, v in state.items()}
        weights |= {f"student.backbone.{k}": torch.zeros_like(v) for k, v in state.items()}
        weights |= {f"teacher.dino_head.{k}": v for k, v in head.items()}
        checkpoint = {"model": weights, "iteration": 10}
    path = tmp_path / "checkpoint.pth"
    torch.save(checkpoint, path)
    _assert_same_state(load_backbone(ModelSpec(SMALL, path, img_size=32)), state)


def _dinov2_release(source: torch.nn.Module, chunked: bool) -> dict[str, torch.Tensor]:
    """A timm *_dinov2 model's weights under the reference (facebookresearch/dinov2) names."""
    state = {k: v.clone() for k, v in source.state_dict().items()}
    dim = state["cls_token"].shape[-1]
    release = {"mask_token": torch.randn(1, dim)}
    if "reg_token" in state:
        # The reference adds pos_embed[:, 0] to the class token; timm folds it into cls_token.
        class_position = torch.randn(1, 1, dim)
        release["register_tokens"] = state.pop("reg_token")
        release["cls_token"] = state.pop("cls_token") - class_position
        release["pos_embed"] = torch.cat([class_position, state.pop("pos_embed")], dim=1)
    for key, value in state.items():
        if chunked and key.startswith("blocks."):
            index = int(key.split(".")[1])
            key = f"blocks.{index // 4}.{key[len('blocks.') :]}"  # block_chunks = 3 of 4 blocks
        release[key] = value
    return release


@pytest.mark.parametrize(
    ("arch", "chunked"), [(DINOV2, False), (DINOV2, True), (DINOV2_REG, False)]
)
def test_dinov2_release_file_maps_onto_timm(tmp_path: Path, arch: str, chunked: bool) -> None:
    # Released DINOv2 position embeddings are for 518 px (37 x 37 patches of 14).
    source = _source(arch, img_size=518)
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(_dinov2_release(source, chunked), path)

    model = load_backbone(ModelSpec(arch, path, img_size=518))
    _assert_same_state(model, source.state_dict())
    assert model.pretrained_cfg["mean"] == IMAGENET_MEAN

    small = load_backbone(ModelSpec(arch, path, img_size=56))
    prefix = 0 if arch == DINOV2_REG else 1
    expected = resample_abs_pos_embed(
        source.pos_embed.detach(), new_size=[4, 4], num_prefix_tokens=prefix
    )
    torch.testing.assert_close(small.pos_embed.detach(), expected)
    torch.testing.assert_close(small.blocks[3].mlp.fc2.weight, source.blocks[3].mlp.fc2.weight)


def test_dinov2_release_needs_a_matching_dinov2_arch(tmp_path: Path) -> None:
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(_dinov2_release(_source(DINOV2_REG, img_size=56), False), path)
    with pytest.raises(WeightsError, match="register tokens"):
        load_backbone(ModelSpec(DINOV2, path, img_size=56))
    with pytest.raises(WeightsError, match="DINOv2 release file"):
        load_backbone(ModelSpec(SMALL, path, img_size=56))


def test_trainer_export_loads_and_checks_its_arch(tmp_path: Path) -> None:
    source = _source(TINY, img_size=32)
    path = save_backbone(
        {k: v.contiguous() for k, v in source.state_dict().items()},
        tmp_path / "backbone.safetensors",
        TINY,
        32,
        16,
    )
    model = load_backbone(ModelSpec(TINY, path, img_size=32))
    _assert_same_state(model, source.state_dict())
    # The trainer normalises with ImageNet statistics, not timm's 0.5 default for this arch.
    assert model.pretrained_cfg["mean"] == IMAGENET_MEAN
    # Embedding at another size than the trainer's crops resamples the position embedding.
    assert load_backbone(ModelSpec(TINY, path, img_size=64)).pos_embed.shape == (1, 17, 192)
    with pytest.raises(WeightsError, match=f"backbone of '{TINY}'.*embed arch is '{SMALL}'"):
        load_backbone(ModelSpec(SMALL, path, img_size=32))


def test_wrong_arch_and_missing_keys_are_named(tmp_path: Path) -> None:
    state = {k: v.contiguous() for k, v in _source().state_dict().items()}
    path = tmp_path / "tiny.safetensors"
    save_file(state, str(path))
    with pytest.raises(
        WeightsError,
        match=r"shape mismatches \(file vs model\) \(30\): \['blocks.0.attn.proj.bias \(32,\) vs",
    ):
        load_backbone(ModelSpec(WIDE, path, img_size=32))

    del state["blocks.0.norm1.weight"]
    state["extra.weight"] = torch.zeros(1)
    broken = tmp_path / "broken.safetensors"
    save_file(state, str(broken))
    with pytest.raises(WeightsError) as caught:
        load_backbone(ModelSpec(SMALL, broken, img_size=32))
    message = str(caught.value)
    assert "missing keys (1): ['blocks.0.norm1.weight']" in message
    assert "unexpected keys (1): ['extra.weight']" in message


def test_unreadable_or_absent_weights(tmp_path: Path) -> None:
    garbage = tmp_path / "weights.pth"
    garbage.write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(WeightsError, match="cannot read embedding weights"):
        load_backbone(ModelSpec(SMALL, garbage, img_size=32))
    with pytest.raises(WeightsError, match="not found"):
        load_backbone(ModelSpec(SMALL, tmp_path / "absent.safetensors", img_size=32))
    with pytest.raises(WeightsError, match="unknown timm architecture 'vit_nonsense'"):
        load_backbone(ModelSpec("vit_nonsense", None, allow_random=True))
    torch.save({"optimizer": {"lr": 0.1}}, tmp_path / "optim.pth")
    with pytest.raises(WeightsError, match="no state dict found"):
        load_backbone(ModelSpec(SMALL, tmp_path / "optim.pth", img_size=32))


def test_random_weights_need_allow_random_and_are_loud() -> None:
    with pytest.raises(WeightsError, match="CURATE_EMBED_WEIGHTS"):
        load_backbone(ModelSpec(SMALL, None, img_size=32))
    with pytest.warns(RuntimeWarning, match="RANDOM WEIGHTS"):
        first = load_backbone(ModelSpec(SMALL, None, allow_random=True, img_size=32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        second = load_backbone(ModelSpec(SMALL, None, allow_random=True, img_size=32))
    # Every actor and process builds the same random model, so crawl and seeds share a space.
    _assert_same_state(first, second.state_dict())


def test_fingerprint_names_arch_size_and_content(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(2)}, str(path))
    spec = ModelSpec(SMALL, path, img_size=32)
    first = spec.fingerprint()
    assert first.startswith(f"{SMALL}@32:") and len(first.split(":")[1]) == 64
    save_file({"a": torch.ones(2)}, str(path))
    assert spec.fingerprint() != first
    assert ModelSpec(SMALL, None, True, 64).fingerprint() == f"{SMALL}@64:random"
