"""The companion self-supervised trainer: DINO + iBOT + KoLeo over curated shards (issue 5).

Modules: losses (pure loss functions), model (timm ViT + heads), schedules, loop (the run,
FSDP2 when launched by torchrun), checkpoint (DCP), export (safetensors backbone for the
embedder), knn_eval (k-NN monitoring), data and augment (curated shards -> multi-crop batches),
cli (`curate train ...`).
"""
