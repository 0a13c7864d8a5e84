"""Video files <-> H.264 access units: readers for mp4/mkv/raw .h264 and a libx264 encoder.

Access units are Annex B bytes, one per frame, as a camera driver would publish them. Sources
that this project cannot use as they are (MPEG-4 Part 2, ...) are refused with a message that
names the problem; :func:`transcode` (``cvseg transcode``) converts them explicitly.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator

import av
import numpy as np

from cvseg_ros.codec.annexb import UnsupportedStreamError


@dataclass
class AccessUnit:
    data: bytes            # Annex B
    time: float            # presentation time in seconds from the stream's start (< 0: pre-roll)
    key_frame: bool
    discard: bool = False  # outside the container's edit list: decode it (it may be a reference
                           # of the frames after it) but do not present it, as FFmpeg does


@dataclass
class VideoInfo:
    codec: str
    width: int
    height: int
    fps: float
    frames: int | None


def video_info(path: str | Path) -> VideoInfo:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or 25
        return VideoInfo(stream.codec_context.name, stream.width, stream.height, float(rate),
                         stream.frames or None)


def read_access_units(path: str | Path) -> Iterator[AccessUnit]:
    """Yield the H.264 access units of a video file as Annex B bytes, in decode order.

    Raises :class:`UnsupportedStreamError` for a video that is not H.264 (with the codec named).
    MP4/MKV carry length-prefixed (AVCC) units: they go through ``h264_mp4toannexb``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such video: {path}")
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise UnsupportedStreamError(f"{path} has no video stream")
        stream = container.streams.video[0]
        codec = stream.codec_context.name
        if codec != "h264":
            raise UnsupportedStreamError(
                f"{path} is {codec} ({stream.codec_context.codec.long_name}), not H.264: "
                f"convert it with `cvseg transcode {path} OUT.mp4`")
        extradata = stream.codec_context.extradata or b""
        bsf = None
        if extradata[:1] == b"\x01":   # avcC: length-prefixed units
            from av.bitstream import BitStreamFilterContext
            bsf = BitStreamFilterContext("h264_mp4toannexb", stream)
        time_base = stream.time_base or Fraction(1, 90000)
        # MP4 edit lists: the presentation starts at stream.start_time; earlier packets are pre-roll
        start = float(stream.start_time * time_base) if stream.start_time is not None else None

        def emit(packet: av.Packet) -> AccessUnit | None:
            nonlocal start
            if packet.size == 0:
                return None
            pts = packet.pts if packet.pts is not None else packet.dts
            t = float(pts * time_base) if pts is not None else 0.0
            if start is None:
                start = t
            return AccessUnit(bytes(packet), t - start, bool(packet.is_keyframe),
                              bool(packet.is_discard))

        for packet in container.demux(stream):
            outs = bsf.filter(packet) if bsf is not None else ([packet] if packet.size else [])
            for out in outs:
                unit = emit(out)
                if unit is not None:
                    yield unit
        if bsf is not None:
            for out in bsf.filter(None):
                unit = emit(out)
                if unit is not None:
                    yield unit


def read_frames(path: str | Path, max_frames: int | None = None) -> Iterator[np.ndarray]:
    """Decode any video file to RGB frames (uint8 HxWx3), for re-encoding and evaluation."""
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if max_frames is not None and i >= max_frames:
                break
            yield frame.to_ndarray(format="rgb24")


class H264Encoder:
    """libx264, fixed GOP: I/P only (one reference frame, zero latency) unless ``bframes``.

    ``encode(rgb) -> list[bytes]`` returns the Annex B access units ready so far (zero-latency:
    one per frame); every IDR repeats SPS/PPS so a receiver can join at any GOP. ``bframes > 0``:
    that many B-frames between the I/P pictures (fixed pattern, x264's B-pyramid, no zero-latency
    tuning), as libx264's defaults and recorded videos have them; units then come in decoding
    order, and :attr:`presentation` holds each returned unit's display index.
    """

    def __init__(self, width: int, height: int, fps: float = 15.0, gop: int = 12, crf: int = 23,
                 preset: str = "veryfast", bframes: int = 0) -> None:
        if width % 2 or height % 2:
            raise ValueError(f"H.264 (yuv420p) needs even frame sizes, got {width}x{height}")
        self.width, self.height, self.gop = width, height, gop
        ctx = av.CodecContext.create("libx264", "w")
        ctx.width, ctx.height = width, height
        ctx.pix_fmt = "yuv420p"
        rate = Fraction(fps).limit_denominator(1001)
        ctx.time_base = 1 / rate
        ctx.framerate = rate
        ctx.gop_size = gop
        ctx.max_b_frames = bframes
        if not 0 <= bframes <= 4:
            raise ValueError(f"bframes must be 0..4, got {bframes}")
        order = f"bframes={bframes}:b-adapt=0:ref={2 if bframes else 1}"
        ctx.options = {
            "preset": preset, "crf": str(crf), **({} if bframes else {"tune": "zerolatency"}),
            "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:{order}:"
                           f"repeat-headers=1:sliced-threads=0:threads=1",
        }
        self._ctx = ctx
        self._pts = 0
        self.presentation: list[int] = []   # display index of each unit returned so far

    def encode(self, rgb: np.ndarray) -> list[bytes]:
        if rgb.shape[:2] != (self.height, self.width):
            raise ValueError(f"frame is {rgb.shape[1]}x{rgb.shape[0]}, encoder is {self.width}x{self.height}")
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24").reformat(format="yuv420p")
        frame.pts = self._pts
        self._pts += 1
        return self._units(self._ctx.encode(frame))

    def flush(self) -> list[bytes]:
        return self._units(self._ctx.encode(None))

    def _units(self, packets) -> list[bytes]:
        self.presentation += [int(p.pts) for p in packets]
        return [bytes(p) for p in packets]


def encode_frames(frames: Iterable[np.ndarray], fps: float = 15.0, gop: int = 12, crf: int = 23,
                  preset: str = "veryfast", bframes: int = 0, presentation: list[int] | None = None
                  ) -> list[bytes]:
    """Encode RGB frames (all the same even size) to H.264 access units, one per frame, in
    decoding order; ``presentation`` (a list), when given, gets each unit's display index (the
    units' order unless ``bframes``)."""
    encoder: H264Encoder | None = None
    units: list[bytes] = []
    for rgb in frames:
        if encoder is None:
            encoder = H264Encoder(rgb.shape[1], rgb.shape[0], fps, gop, crf, preset, bframes)
        units.extend(encoder.encode(rgb))
    if encoder is not None:
        units.extend(encoder.flush())
        if presentation is not None:
            presentation[:] = encoder.presentation
    return units


def even_size(rgb: np.ndarray) -> np.ndarray:
    """Crop a frame by at most one row/column so that both sides are even (yuv420p)."""
    h, w = rgb.shape[:2]
    return rgb[: h - h % 2, : w - w % 2]


def write_h264(path: str | Path, units: Iterable[bytes]) -> None:
    """Write access units as a raw Annex B ``.h264`` elementary stream."""
    with open(path, "wb") as f:
        for unit in units:
            f.write(unit)


def transcode(src: str | Path, dst: str | Path, gop: int = 12, fps: float | None = None,
              max_frames: int | None = None, crf: int = 23) -> int:
    """Re-encode any video to H.264 I/P (GOP ``gop``, no B-frames); ``.h264`` or a container by suffix.

    Returns the number of frames written.
    """
    info = video_info(src)
    fps = fps or info.fps
    dst = Path(dst)
    frames = (even_size(f) for f in read_frames(src, max_frames))
    if dst.suffix == ".h264":
        units = encode_frames(frames, fps, gop, crf)
        write_h264(dst, units)
        return len(units)
    rate = Fraction(fps).limit_denominator(1001)
    count = 0
    with av.open(str(dst), "w") as out:
        stream = None
        for rgb in frames:
            if stream is None:
                stream = out.add_stream("libx264", rate=rate)
                stream.width, stream.height = rgb.shape[1], rgb.shape[0]
                stream.pix_fmt = "yuv420p"
                stream.codec_context.gop_size = gop
                stream.codec_context.max_b_frames = 0
                stream.codec_context.options = {
                    "preset": "veryfast", "tune": "zerolatency", "crf": str(crf),
                    "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes=0:ref=1:repeat-headers=1"}
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
            count += 1
        if stream is not None:
            for packet in stream.encode(None):
                out.mux(packet)
    return count
