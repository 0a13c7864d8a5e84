"""Several cameras' access units of one engine call decoded at once: each camera's units in order,
by one thread, the cameras in parallel (decoding and the compiled analysis release the GIL)."""
from __future__ import annotations

import concurrent.futures
import os
from typing import Any, Callable, Sequence

from cvseg_ros.codec.decoder import CompressedFrame, H264StreamDecoder

#: the most cameras decoded at once with ``threads=0`` (one thread per core)
MAX_DECODE_THREADS = 8


class DecodePool:
    """``threads`` cameras decoded at once (1: one after the other, on the calling thread; None or
    0: one per core, at most :data:`MAX_DECODE_THREADS`); the threads start with the first call
    that has several cameras."""

    def __init__(self, threads: int | None = 1) -> None:
        if threads is not None and not 0 <= threads <= 64:
            raise ValueError(f"decode_threads must be 0..64, got {threads}")
        self.threads = threads or max(1, min(MAX_DECODE_THREADS, os.cpu_count() or 1))
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    @property
    def started(self) -> bool:
        return self._pool is not None

    def decode(self, units: Sequence[tuple[str, bytes, Any]], decoder_of: Callable[[str], H264StreamDecoder]
               ) -> list[tuple[str, list[CompressedFrame]]]:
        """(camera, frames) of every ``(camera, unit, stamp)``, in input order."""
        per_camera: dict[str, list[tuple[bytes, Any]]] = {}
        for camera, data, stamp in units:
            per_camera.setdefault(camera, []).append((data, stamp))

        def feed_all(camera: str) -> list[list[CompressedFrame]]:
            decoder = decoder_of(camera)
            return [decoder.feed(data, stamp) for data, stamp in per_camera[camera]]

        if len(per_camera) > 1 and self.threads > 1:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(self.threads, thread_name_prefix="cvseg-decode")
            futures = {c: self._pool.submit(feed_all, c) for c in per_camera}
            frames = {c: iter(f.result()) for c, f in futures.items()}
        else:
            frames = {c: iter(feed_all(c)) for c in per_camera}
        return [(camera, next(frames[camera])) for camera, _, _ in units]

    def close(self) -> None:
        """Stop the threads; decode on the calling thread from now on."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self.threads = 1
