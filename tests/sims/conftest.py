"""Shared by the simulation tests: the small config and the bundles co-simulated.

Verilator builds are cached on disk by `trimem.sims.runner` (one build per top for the whole
session, and none in later sessions while the RTL is unchanged), so tests only share bundles.
"""
import pytest

from trimem.config import load_config


@pytest.fixture(scope="session")
def small():
    """The trimem-small config, the one the RTL is co-simulated at."""
    return load_config("trimem-small")


@pytest.fixture(scope="session")
def linear_bundles(tmp_path_factory):
    """One-GEMM bundles by N:M pattern index: 0 dense, 1 the 2:4 of trimem-small."""
    from trimem.sims.bundles import linear_bundle

    root = tmp_path_factory.mktemp("linear")
    return {nm: linear_bundle(root / f"nm{nm}", nm=nm, m=3, n=20, k=128, seed=nm)
            for nm in (0, 1)}


@pytest.fixture(scope="session")
def pim_bundle(tmp_path_factory):
    """One PIM.GEMV bundle: a tile of two rows per bank (a row miss per vector), two vectors."""
    from trimem.sims.bundles import pim_bundle

    return pim_bundle(tmp_path_factory.mktemp("pim") / "gemv", m=1, n=8, k=192, seed=3)
