"""SSCD-style copy descriptors trained in-house: augmentations, the training run, calibration."""
