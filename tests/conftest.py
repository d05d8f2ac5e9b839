"""Fixtures shared by the test modules."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """Torch on one thread for the test (bitwise comparisons across runs; no oversubscription on 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def data_workspace(tmp_path_factory):
    """A copy of the repo with the data stages run once, up to and including `score`, at the default params (no
    onsuccess hook: no dvc.lock). The DAG fixtures (tests/test_dag.py, tests/test_slurm.py) copy it, mtimes and
    .snakemake metadata kept, so each reruns only from `select` on, the first stage their params change."""
    from test_dag import CORES, copy_repo, sh

    work = copy_repo(tmp_path_factory.mktemp("data"))
    sh(["snakemake", f"-c{CORES}", "--no-hooks", "--until", "score"], work)
    return work
