"""The embed stage: a timm backbone over the kept images, L2-normalised float16 embeddings."""
