"""The cluster stage: spherical k-means of the embedded crawl, every image assigned."""
