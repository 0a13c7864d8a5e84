"""Compiled CPU loops (Numba) for the per-pixel and per-block work of the pipeline."""
from __future__ import annotations

import numba


def compiled(function=None, **options):
    """``numba.njit`` with the machine code cached on disk (beside the module, else in the user's
    cache folder), or without the disk cache where neither is writable (then compiled at first
    use in each process). ``nogil``: other threads (DDS callbacks, decoding) run meanwhile.
    ``@compiled(inline="always")`` passes options on to ``njit``."""
    if function is None:
        return lambda f: compiled(f, **options)
    try:
        return numba.njit(cache=True, nogil=True, **options)(function)
    except RuntimeError:   # "no locator available": nowhere to write the cache
        return numba.njit(nogil=True, **options)(function)
