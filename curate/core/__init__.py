"""Shared plumbing every stage uses: the stage contract, shards, atomic writes, FAISS, weights."""
