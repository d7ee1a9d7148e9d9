"""Shared by every unit test: FAISS on one thread."""

import faiss
import pytest


@pytest.fixture(autouse=True)
def one_faiss_thread():
    """FAISS's OpenMP threads spin while waiting: on a shared 2-core machine two of them turn
    PQ training from 3 s into 20 s. No unit test's result depends on the thread count."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)
