"""The dedup stage: exact, PCA-hash and copy-detection duplicates, and eval-set decontamination."""
