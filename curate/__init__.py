"""lvd-curate: the curation work itself, one package per stage, free of Ray and HTTP serving."""

__version__ = "0.1.0"
