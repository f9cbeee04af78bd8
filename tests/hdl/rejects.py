"""The one way the HDL tests check that a component refuses a config."""
import gc
import warnings

import pytest
from amaranth.hdl import UnusedElaboratable


def rejects(pattern: str, build) -> None:
    """`build()` raises ValueError matching `pattern` (its half-built parts warn nothing)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnusedElaboratable)
        with pytest.raises(ValueError, match=pattern):
            build()
        gc.collect()
