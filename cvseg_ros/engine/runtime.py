"""Where and how the engine runs: the device, the precision, the CPU threads and allocator, and
the compiled loops prepared before the first frame."""
from __future__ import annotations

import torch

from cvseg_ros.codec.decoder import warm_up_motion_analysis
from cvseg_ros.common.kernels import cpu_kernels
from cvseg_ros.engine.labels import class_ids, upsampled_class_ids
from cvseg_ros.model import enet, luma_matching
from cvseg_ros.model.inference import warm_up_affine_prelu
from cvseg_ros.model.segmenter import CompressedSegmenter
from cvseg_ros.model.warping import warm_up_warp

#: ``fp32``; ``bf16``: both networks under bf16 autocast; ``fp16``: both under fp16 autocast (for
#: a GPU; on a CPU it runs, slowly); ``mixed``: the I-frame network in fp32, the P-frame branch in
#: bf16; ``auto``: ``mixed`` on a CPU with native bf16 (AVX512-BF16 or AMX), else ``fp32``.
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "mixed")


def autocast_dtypes(precision: str) -> tuple[torch.dtype | None, torch.dtype | None]:
    """(the I-frame network's, the P-frame step's) autocast dtype for a resolved ``precision``;
    None: fp32."""
    return {"fp32": (None, None), "bf16": (torch.bfloat16, torch.bfloat16),
            "fp16": (torch.float16, torch.float16), "mixed": (None, torch.bfloat16)}[precision]


def native_bf16_cpu() -> bool:
    """True when this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX-BF16)."""
    from cvseg_ros.common.procfs import cpu_flags
    flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


_ALLOCATOR_TUNED = False


def tune_allocator() -> bool:
    """Keep the large, short-lived buffers of the networks in the heap (glibc ``mallopt``: no
    ``mmap`` for blocks below 32 MiB, no trimming below 512 MiB). Otherwise every I-frame, run
    between P-frames, maps its multi-megabyte activations afresh and page-faults them in.
    Process-wide, once; opt out with
    ``CVSEG_MALLOC_TUNING=0``. Returns whether it applied."""
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    import os
    import sys
    if not sys.platform.startswith("linux") or os.environ.get("CVSEG_MALLOC_TUNING", "1") == "0":
        return False
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 32 << 20) == 1 and libc.mallopt(m_trim_threshold, 512 << 20) == 1
    except (OSError, AttributeError):   # not glibc
        return False
    _ALLOCATOR_TUNED = bool(ok)
    return _ALLOCATOR_TUNED


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "mixed" if device.type == "cpu" and native_bf16_cpu() else "fp32"
    return precision


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; a clear error for anything unusable."""
    device = (device or "auto").strip().lower()
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available "
                             f"(torch {torch.__version__}); use 'cpu' or 'auto'")
        return torch.device(device)
    if device == "cpu":
        return torch.device("cpu")
    raise ValueError(f"unknown device {device!r}: use 'auto', 'cpu' or 'cuda[:N]'")


def set_threads(threads: int | None) -> None:
    """PyTorch's intra-op CPU threads (process-wide); ``None`` or 0 leaves them as they are."""
    if threads:
        torch.set_num_threads(threads)


def warm_up_compiled(motion: bool, model: CompressedSegmenter | None = None) -> None:
    """Compile (or load from Numba's disk cache) the compiled loops now, so that no camera's
    first frame waits for them: with ``motion`` the motion-vector field's (the decoder's, on the
    CPU whatever the device); where the model runs its CPU formulations (:mod:`cvseg_ros.common.kernels`),
    also the labels' (for ``model``'s number of classes), ENet's block ends' and the fused
    norm-and-PReLU's, and with
    ``motion`` the luma matching's, the warp's and ``model``'s correction head's."""
    if motion:
        warm_up_motion_analysis()
    parameter = next(model.parameters(), None) if model is not None else None
    if not cpu_kernels(parameter if parameter is not None else torch.zeros(0)):
        return
    config = getattr(model, "config", None)
    logits = torch.zeros(1, getattr(config, "num_classes", 2), 4, 4)
    for layout in (torch.contiguous_format, torch.channels_last):
        class_ids(logits.contiguous(memory_format=layout))
        upsampled_class_ids(logits.contiguous(memory_format=layout), 8, 8)
    enet.warm_up()
    warm_up_affine_prelu()
    if motion:
        luma_matching.warm_up()
        warm_up_warp()
        head = getattr(model, "head", None)
        if head is not None:
            head.warm_up()
