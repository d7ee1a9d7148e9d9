"""The student and teacher networks: a timm ViT with an iBOT mask token, and DINO/iBOT heads.

The backbone is `timm.create_model(arch, num_classes=0, img_size=global_size)` with the arch's
own defaults otherwise, so its state dict is exactly what the embedder builds for `arch`; only
behaviour-level options differ (drop path, dynamic image size for local crops). The mask token
and the heads live beside it, never inside it.
"""

import math
from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from schemas.train import ModelOptions


class WeightNormLinear(nn.Module):
    """Linear layer without bias whose rows are weight_g * weight_v / ||weight_v||.

    The reference uses torch.nn.utils.weight_norm; plain parameters here keep the layer
    shardable by FSDP2 and give the reference's parameter names.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)
        return F.linear(x, weight)


class DINOHead(nn.Module):
    """MLP (GELU) to a bottleneck, L2 normalisation, weight-normalised prototypes layer."""

    def __init__(
        self,
        in_dim: int,
        prototypes: int,
        hidden: int = 2048,
        bottleneck: int = 256,
        layers: int = 3,
    ):
        super().__init__()
        dims = [in_dim] + [hidden] * (layers - 1) + [bottleneck]
        blocks: list[nn.Module] = []
        for i in range(layers):
            blocks.append(nn.Linear(dims[i], dims[i + 1]))
            if i < layers - 1:
                blocks.append(nn.GELU())
        self.mlp = nn.Sequential(*blocks)
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = WeightNormLinear(bottleneck, prototypes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        return self.last_layer(x)


@dataclass
class StudentOutput:
    global_logits: Tensor  # [2B, K] DINO head on the global crops' class tokens
    local_logits: Tensor  # [n_local * B, K]
    patch_logits: Tensor  # [M, K_ibot] iBOT head on the masked patch tokens, masks.nonzero order
    global_cls: Tensor  # [2B, D] backbone class tokens of the global crops (KoLeo's input)


@dataclass
class TeacherOutput:
    global_logits: Tensor  # [2B, K]
    patch_logits: Tensor  # [M, K_ibot] at the positions the student saw masked


def create_backbone(arch: str, img_size: int, drop_path_rate: float = 0.0) -> nn.Module:
    """A randomly initialised timm backbone whose state dict is the embedder's for `arch`."""
    try:
        model = timm.create_model(
            arch,
            pretrained=False,
            num_classes=0,
            img_size=img_size,
            drop_path_rate=drop_path_rate,
            # Local crops are smaller than global ones: interpolate position embeddings.
            dynamic_img_size=True,
        )
    except RuntimeError as error:  # timm's "Unknown model" is a RuntimeError
        raise ValueError(f"model.arch {arch!r}: {error}") from None
    for attribute in ("patch_embed", "blocks", "norm", "cls_token", "_pos_embed"):
        if not hasattr(model, attribute):
            raise ValueError(f"model.arch {arch!r} is not a timm VisionTransformer")
    if model.cls_token is None:
        raise ValueError(f"model.arch {arch!r} has no class token; DINO needs one")
    return model


def patch_size_of(backbone: nn.Module) -> int:
    """The backbone's (square) patch size in pixels."""
    size = backbone.patch_embed.patch_size
    return int(size[0] if isinstance(size, tuple | list) else size)


class SSLNetwork(nn.Module):
    """Backbone + mask token + heads; the same class serves as student and as EMA teacher.

    Everything runs inside forward() so that FSDP2's root hooks gather the parameters that
    live outside the blocks (tokens, position embeddings, heads).
    """

    def __init__(self, options: ModelOptions, img_size: int, drop_path_rate: float | None = None):
        super().__init__()
        rate = options.drop_path_rate if drop_path_rate is None else drop_path_rate
        self.backbone = create_backbone(options.arch, img_size, rate)
        dim = self.backbone.embed_dim
        self.num_prefix_tokens = int(self.backbone.num_prefix_tokens)
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        head = {
            "hidden": options.head_hidden,
            "bottleneck": options.head_bottleneck,
            "layers": options.head_layers,
        }
        self.dino_head = DINOHead(dim, options.prototypes, **head)
        self.ibot_head = (
            DINOHead(dim, options.ibot_prototypes or options.prototypes, **head)
            if options.separate_ibot_head
            else None
        )

    @property
    def patch_size(self) -> int:
        """The backbone's patch size in pixels."""
        return patch_size_of(self.backbone)

    def tokens(self, images: Tensor, masks: Tensor | None = None) -> Tensor:
        """Normalised output tokens [B, prefix + patches, D]; masked patches see the mask token."""
        backbone = self.backbone
        x = backbone.patch_embed(images)
        if masks is not None:
            # The patch embedding is [B, N, D], or [B, H, W, D] with dynamic image sizes.
            flat_masks = masks.view(*x.shape[:-1], 1)
            x = torch.where(flat_masks, self.mask_token.to(x.dtype), x)
        x = backbone._pos_embed(x)
        x = backbone.patch_drop(x)
        x = backbone.norm_pre(x)
        for block in backbone.blocks:
            x = block(x)
        return backbone.norm(x)

    def _heads(self, cls_tokens: Tensor, patch_tokens: Tensor) -> tuple[Tensor, Tensor]:
        if self.ibot_head is None:
            # One pass through the shared head for class and patch tokens, as the reference.
            out = self.dino_head(torch.cat([cls_tokens, patch_tokens]))
            return out[: cls_tokens.shape[0]], out[cls_tokens.shape[0] :]
        return self.dino_head(cls_tokens), self.ibot_head(patch_tokens)

    def forward(
        self,
        global_crops: Tensor,
        local_crops: Tensor | None,
        masks: Tensor,
        teacher: bool = False,
    ) -> StudentOutput | TeacherOutput:
        """Student (masked globals + locals) or teacher (unmasked globals) outputs."""
        prefix = self.num_prefix_tokens
        tokens = self.tokens(global_crops, None if teacher else masks)
        cls = tokens[:, 0]
        patches = tokens[:, prefix:]
        if patches.shape[1] != masks.shape[1]:
            raise ValueError(
                f"masks have {masks.shape[1]} patches per crop, the backbone {patches.shape[1]}"
            )
        masked_patches = patches[masks]
        if teacher:
            cls_logits, patch_logits = self._heads(cls, masked_patches)
            return TeacherOutput(global_logits=cls_logits, patch_logits=patch_logits)
        n_global = cls.shape[0]
        if local_crops is not None and local_crops.shape[0] > 0:
            local_cls = self.tokens(local_crops)[:, 0]
            all_cls = torch.cat([cls, local_cls])
        else:
            all_cls = cls
        cls_logits, patch_logits = self._heads(all_cls, masked_patches)
        return StudentOutput(
            global_logits=cls_logits[:n_global],
            local_logits=cls_logits[n_global:],
            patch_logits=patch_logits,
            global_cls=cls,
        )


def build_student_teacher(
    options: ModelOptions, img_size: int, seed: int
) -> tuple[SSLNetwork, SSLNetwork]:
    """Student and teacher with identical weights (teacher without drop path, no gradients).

    Seeded so that every rank builds the same initial weights before FSDP shards them.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = SSLNetwork(options, img_size)
    teacher = SSLNetwork(options, img_size, drop_path_rate=0.0)
    teacher.load_state_dict(student.state_dict(), strict=True)
    teacher.requires_grad_(False)
    return student, teacher


# -- optimiser parameter groups --------------------------------------------------------------------


@dataclass(frozen=True)
class ParamMultipliers:
    lr: float
    weight_decay: float
    last_layer: bool


def param_multipliers(
    name: str, num_layers: int, layerwise_decay: float, patch_embed_lr_mult: float
) -> ParamMultipliers:
    """The reference's per-parameter lr and weight-decay multipliers for a student param name.

    Layer-wise decay: tokens and patch embedding are layer 0, block i is layer i + 1, the final
    norm and the heads are layer num_layers + 1 (multiplier 1). No weight decay on biases,
    norms and layer-scale gammas.
    """
    layer = num_layers + 1
    if name.startswith("backbone.") or name == "mask_token":
        if any(
            part in name for part in ("pos_embed", "patch_embed", "mask_token", "cls_token", "reg_")
        ):
            layer = 0
        elif ".blocks." in name:
            layer = int(name.split(".blocks.")[1].split(".")[0]) + 1
    lr = layerwise_decay ** (num_layers + 1 - layer)
    if "patch_embed" in name:
        lr *= patch_embed_lr_mult
    no_decay = name.endswith(".bias") or "norm" in name or "gamma" in name
    return ParamMultipliers(
        lr=lr, weight_decay=0.0 if no_decay else 1.0, last_layer="last_layer" in name
    )


def param_groups(
    student: nn.Module, layerwise_decay: float, patch_embed_lr_mult: float
) -> list[dict]:
    """AdamW parameter groups, one per distinct set of multipliers (fused like the reference)."""
    num_layers = len(student.backbone.blocks)
    groups: dict[ParamMultipliers, list[nn.Parameter]] = {}
    for name, param in student.named_parameters():
        if not param.requires_grad:
            continue
        key = param_multipliers(name, num_layers, layerwise_decay, patch_embed_lr_mult)
        groups.setdefault(key, []).append(param)
    return [
        {
            "params": params,
            "lr_multiplier": key.lr,
            "wd_multiplier": key.weight_decay,
            "is_last_layer": key.last_layer,
        }
        for key, params in groups.items()
    ]
