"""Where tensors run: one choice for every model (embedder, copy descriptor, trainer)."""

import torch


def pick_device() -> str:
    """CUDA when a GPU is present, else CPU: the same code runs on both."""
    return "cuda" if torch.cuda.is_available() else "cpu"
