"""What browsing refuses: ids that name nothing, or results not there yet (404 over REST)."""

from schemas.errors import NotFoundError


class ResultsNotFound(NotFoundError):
    """The job exists but has not produced what was asked for (no clusters yet, no dedup)."""

    code = "results_not_found"


class ClusterNotFound(NotFoundError):
    code = "cluster_not_found"


class SeedNotFound(NotFoundError):
    code = "seed_not_found"


class ImageNotFound(NotFoundError):
    code = "image_not_found"
