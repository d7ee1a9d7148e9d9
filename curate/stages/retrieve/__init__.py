"""The retrieve stage: crawl images picked for each seed set by its policy."""
