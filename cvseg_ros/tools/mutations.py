"""Real access units for ``cvseg fuzz`` and ``cvseg soak``: clips re-encoded (or taken as they are)
into :class:`Source` lists, and :func:`mutate`, which damages a window of messages in one of
the ways listed in :data:`OPS`."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from cvseg_ros.common.paths import cache_dir, shared_data_dir
from cvseg_ros.codec.annexb import NAL_IDR, NAL_PPS, NAL_SPS, nal_units
from cvseg_ros.codec.h264_syntax import baseline_sps, parse_sps

WRONG_FORMATS = ("jpeg", "png", "", "h265", "rgb8; jpeg compressed bgr8", "hevc", "av1", "h264x", "mpeg4")
DEFAULT_CLIPS = shared_data_dir() / "clips"
FALLBACK_VIDEO = cache_dir() / "vtest.avi"   # the demo's footage (``cvseg demo`` fetches it)
START_NS = 1_700_000_000 * 1_000_000_000
PERIOD_NS = 40_000_000


# -- real access units -----------------------------------------------------------------------------

@dataclass
class Source:
    """Clean access units of one real clip (one encoder session)."""
    name: str
    units: list[bytes]
    width: int
    height: int
    idr: list[int] = field(default_factory=list)     # positions of the IDR units
    presentation: list[int] | None = None            # display index of each unit (B-frames); None: in order

    @property
    def reorders(self) -> bool:
        return self.presentation is not None and self.presentation != sorted(self.presentation)

    def __post_init__(self) -> None:
        self.idr = [i for i, u in enumerate(self.units) if any(t == NAL_IDR for _, t, _ in nal_units(u))]
        if not self.idr:
            raise ValueError(f"{self.name}: no IDR in the access units")


def _size_of(unit: bytes) -> tuple[int, int]:
    for _, nal_type, payload in nal_units(unit):
        if nal_type == NAL_SPS:
            sps = parse_sps(payload)
            return sps.width, sps.height
    raise ValueError("no SPS in the first access unit")


def encoded_source(video: Path, width: int, frames: int, gop: int, preset: str = "veryfast",
                   crf: int = 23, tag: str = "", bframes: int = 0) -> Source:
    """``frames`` frames of a real video re-encoded (libx264, GOP ``gop``, I/P or ``bframes``
    B-frames) at ``width``."""
    import cv2

    from cvseg_ros.codec.video import H264Encoder, even_size, read_frames
    encoder, units = None, []
    for rgb in read_frames(video, frames):
        height = max(2, round(rgb.shape[0] * width / rgb.shape[1]))
        rgb = even_size(cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA))
        if encoder is None:
            encoder = H264Encoder(rgb.shape[1], rgb.shape[0], fps=25, gop=gop, crf=crf, preset=preset, bframes=bframes)
        units.extend(encoder.encode(rgb))
    if encoder is None:
        raise ValueError(f"{video}: no frames")
    units.extend(encoder.flush())
    w, h = _size_of(units[0])
    return Source(f"{video.name}@{w}x{h}{tag}", units, w, h, presentation=list(encoder.presentation) if bframes else None)


def native_source(video: Path, frames: int) -> Source:
    """A real clip's own H.264 access units (as its camera encoded them), Annex B."""
    import itertools

    from cvseg_ros.codec.video import read_access_units
    units = [u.data for u in itertools.islice(read_access_units(video), frames)]
    w, h = _size_of(units[0])
    return Source(f"{video.name}@{w}x{h} native", units, w, h)


def default_videos() -> list[Path]:
    """Every clip in :data:`DEFAULT_CLIPS`; without that folder, the demo's ``vtest.avi`` if it
    has been fetched."""
    if not DEFAULT_CLIPS.is_dir():
        return [FALLBACK_VIDEO] if FALLBACK_VIDEO.is_file() else []
    return sorted(p for p in DEFAULT_CLIPS.iterdir() if p.suffix.lower() in (".mp4", ".mkv", ".mov", ".avi"))


def load_sources(videos: Sequence[str | Path], *, width: int = 320, frames: int = 36, gop: int = 12,
                 native: bool = True) -> list[Source]:
    """Re-encoded sources (one per video), a second encoder (other SPS/PPS, other size) of the
    first video, the first video with 2 B-frames, and (``native``) the first H.264 clip's own
    access units."""
    import av

    videos = [Path(v) for v in videos]
    if not videos:
        raise ValueError(f"no video: give --video (or put clips in {DEFAULT_CLIPS}, or run `cvseg demo` "
                         f"once to fetch {FALLBACK_VIDEO})")
    sources = [encoded_source(v, width, frames, gop) for v in videos]
    other = max(64, (int(width * 0.75) // 16) * 16)
    sources.append(encoded_source(videos[0], other, frames, max(4, gop // 2), preset="ultrafast", crf=30,
                                  tag=" ultrafast"))
    sources.append(encoded_source(videos[0], width, frames, gop, tag=" bframes", bframes=2))
    if native:
        for v in videos:
            with av.open(str(v)) as container:
                if container.streams.video[0].codec_context.name != "h264":
                    continue
            sources.append(native_source(v, frames))
            break
    return sources


# -- mutations -------------------------------------------------------------------------------------

@dataclass
class Msg:
    data: bytes
    stamp_ns: int
    fmt: str = "h264"
    mutated: bool = False
    op: str = ""


def _flip(rng: random.Random, data: bytes, count: int, head: bool) -> bytes:
    if not data:
        return data
    buf = bytearray(data)
    span = min(len(buf), 64) if head else len(buf)
    for _ in range(count):
        buf[rng.randrange(span)] ^= 1 << rng.randrange(8)
    return bytes(buf)


def _nal_bytes(units: list[tuple[int, int, bytes]]) -> bytes:
    return b"".join(b"\x00\x00\x00\x01" + bytes([(ref << 5) | t]) + p for ref, t, p in units)


OPS = ("bitflip", "bitflip_head", "truncate", "duplicate", "reorder", "drop", "random", "random_nal",
       "empty", "wrong_format", "splice", "concat", "foreign", "nal_drop", "nal_corrupt", "stamp_back",
       "stamp_repeat", "stamp_jump", "stamp_far", "nal_flood", "sps_huge")


def mutate(rng: random.Random, window: list[Msg], sources: list[Source]) -> str:
    """Apply one random mutation to ``window`` in place; returns its name."""
    op = rng.choice(OPS)
    if not window:
        window.append(Msg(b"", 0))
    i = rng.randrange(len(window))
    m = window[i]

    def mark(msg: Msg) -> Msg:
        msg.mutated, msg.op = True, (msg.op + "+" if msg.op else "") + op
        return msg

    if op in ("bitflip", "bitflip_head"):
        m.data = _flip(rng, m.data, rng.randint(1, 40), op == "bitflip_head")
        mark(m)
    elif op == "truncate":
        m.data = m.data[: rng.choice((0, 1, 3, 4, 5, rng.randrange(max(1, len(m.data)))))]
        mark(m)
    elif op == "duplicate":
        dup = Msg(m.data, m.stamp_ns if rng.random() < 0.5 else m.stamp_ns + PERIOD_NS // 2, m.fmt)
        window.insert(i + 1, mark(dup))
    elif op == "reorder" and len(window) > 1:
        j = min(i + 1, len(window) - 1) if i + 1 < len(window) else i - 1
        a, b = sorted((i, j))
        window[a], window[b] = window[b], window[a]
        if rng.random() < 0.5:     # restamped in arrival order (the sender stamps at send time)
            window[a].stamp_ns, window[b].stamp_ns = window[b].stamp_ns, window[a].stamp_ns
        mark(window[a])
        mark(window[b])
    elif op == "drop" and len(window) > 1:
        del window[i]
    elif op == "random":
        m.data = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 3000)))
        mark(m)
    elif op == "random_nal":     # start code + a NAL header of a real type + random payload
        nal_type = rng.choice((1, 5, 7, 8, 6, 9, rng.randrange(32)))
        payload = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 400)))
        m.data = b"\x00\x00\x00\x01" + bytes([(rng.randrange(4) << 5) | nal_type]) + payload
        mark(m)
    elif op == "empty":
        m.data = b""
        mark(m)
    elif op == "wrong_format":
        m.fmt = rng.choice(WRONG_FORMATS)
        mark(m)
    elif op == "splice":
        other = rng.choice(rng.choice(sources).units)
        cut = rng.random()
        m.data = m.data[: int(cut * len(m.data))] + other[int(cut * len(other)):]
        mark(m)
    elif op == "concat":
        m.data = m.data + rng.choice(rng.choice(sources).units)
        mark(m)
    elif op == "foreign":        # a unit of another stream (other SPS/PPS, maybe another size)
        src = rng.choice(sources)
        m.data = src.units[rng.choice(src.idr) if rng.random() < 0.5 else rng.randrange(len(src.units))]
        mark(m)
    elif op in ("nal_drop", "nal_corrupt"):
        nals = nal_units(m.data)
        if nals:
            k = rng.randrange(len(nals))
            for idx, (_, t, _) in enumerate(nals):   # prefer the parameter sets when there are some
                if t in (NAL_SPS, NAL_PPS) and rng.random() < 0.7:
                    k = idx
                    break
            if op == "nal_drop":
                del nals[k]
            else:
                ref, t, payload = nals[k]
                nals[k] = (ref, t, _flip(rng, payload, rng.randint(1, 8), True))
            m.data = _nal_bytes(nals)
            mark(m)
    elif op == "nal_flood":      # thousands of tiny NAL units (delimiters, filler) before the unit
        tiny = rng.choice((b"\x00\x00\x01\x09\xf0", b"\x00\x00\x01\x0c\xff\x80"))
        m.data = tiny * rng.randint(2049, 6000) + m.data
        mark(m)
    elif op == "sps_huge":       # the unit's SPS (or a new one) declaring pictures beyond the limits
        huge = baseline_sps(rng.choice((300, 512, 1000)), rng.choice((200, 512, 1000)), rng.choice((1, 16)))
        nals = nal_units(m.data)
        if any(t == NAL_SPS for _, t, _ in nals):
            m.data = b"".join(huge if t == NAL_SPS else _nal_bytes([(ref, t, p)]) for ref, t, p in nals)
        else:
            m.data = huge + m.data
        mark(m)
    elif op == "stamp_back":
        m.stamp_ns -= rng.randint(1, 50) * PERIOD_NS
        mark(m)
    elif op == "stamp_repeat" and i > 0:
        m.stamp_ns = window[i - 1].stamp_ns
        mark(m)
    elif op == "stamp_jump":     # a gap: this and the following messages later
        shift = rng.randint(4, 200) * PERIOD_NS
        for later in window[i:]:
            later.stamp_ns += shift
        mark(m)
    elif op == "stamp_far":      # a stamp far in the future (then the clock seems to go back)
        m.stamp_ns += rng.randint(1, 10**6) * 1_000_000_000
        mark(m)
    return op
