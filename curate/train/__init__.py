"""The companion self-supervised trainer: DINO + iBOT + KoLeo over curated shards (issue 5).

Modules: losses (pure loss functions), model (timm ViT + heads), schedules, runtime (process
group, device, FSDP2 when launched by torchrun, RNG fences), setup (run folder, learner, resume),
step (one iteration), loop (the run), checkpoint (DCP), export (safetensors backbone for the
embedder), knn_eval (k-NN monitoring), shards, windows and data (curated shards -> per-pass plan
-> batches), augment (multi-crop and masks). The command line is services/cli/train.py.
"""
