"""Which formulation of a step runs: the CPU's compiled loops and packed convolutions, or the tensor
operations written for a GPU.

Every step that has both asks :func:`cpu_kernels` with its input tensor. :func:`device_kernels`
makes the GPU formulations run on CPU tensors too, so that CI machines without a GPU run and
compare them (the tests, ``scripts/gpu_check.sh --dry-run``); ``CVSEG_DEVICE_KERNELS=1`` does
the same for a whole process.
"""
from __future__ import annotations

import collections
import contextlib
import os
from typing import Iterator

from torch.utils._python_dispatch import TorchDispatchMode

_forced = os.environ.get("CVSEG_DEVICE_KERNELS", "0") not in ("", "0")


def cpu_kernels(tensor) -> bool:
    """Whether the CPU formulation runs for ``tensor``: it is on the CPU and the GPU formulations
    are not forced."""
    return tensor.device.type == "cpu" and not _forced


@contextlib.contextmanager
def device_kernels(enabled: bool = True) -> Iterator[None]:
    """Within the block, CPU tensors take the GPU formulations (process-wide, not thread-local)."""
    global _forced
    before, _forced = _forced, enabled
    try:
        yield
    finally:
        _forced = before


class OperationCounter(TorchDispatchMode):
    """Within the block, counts the tensor operations dispatched (``ops``: name -> count), views
    excluded: on a GPU each of the others is a kernel launch."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops[str(func.overloadpacket).removeprefix("aten.")] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())
