"""`cvseg probe PATH`: what the compressed-stream reader sees in a video file."""
from __future__ import annotations

import json
import time
from pathlib import Path

from cvseg_ros.codec.decoder import H264StreamDecoder
from cvseg_ros.codec.video import read_access_units


def probe(path: str | Path) -> dict:
    """Feed every access unit of ``path`` through :class:`H264StreamDecoder` and count."""
    decoder = H264StreamDecoder(name=str(path))
    units = list(read_access_units(path))
    gop_sizes: list[int] = []
    width = height = 0
    st = decoder.stats
    # frames of units outside the container's edit list are decoded (references) but, as in
    # FFmpeg / `read_frames`, not presented: they are not counted as frames here
    presented = ("frames", "i_frames", "p_frames", "frames_with_mvs")
    hidden = dict.fromkeys(presented, 0)
    start = time.perf_counter()
    for unit in units:
        before = [getattr(st, key) for key in presented]
        frames = decoder.feed(unit.data, unit.time)
        if unit.discard:
            for key, value in zip(presented, before):
                hidden[key] += getattr(st, key) - value
            continue
        for frame in frames:
            width, height = frame.width, frame.height
            if frame.kind == "I" or not gop_sizes:   # a leading partial GOP counts too
                gop_sizes.append(1)
            else:
                gop_sizes[-1] += 1
    elapsed = time.perf_counter() - start
    return {
        "path": str(path),
        "access_units": st.access_units,
        "frames": st.frames - hidden["frames"],
        "i_frames": st.i_frames - hidden["i_frames"],
        "p_frames": st.p_frames - hidden["p_frames"],
        "b_frames": st.b_frames,
        "frames_with_mvs": st.frames_with_mvs - hidden["frames_with_mvs"],
        "not_presented": hidden["frames"],
        "skipped_before_keyframe": st.skipped_before_keyframe,
        "corrupt": st.corrupt,
        "width": width,
        "height": height,
        "gop_sizes": gop_sizes,
        "decode_ms_per_frame": round(1000 * elapsed / max(st.access_units, 1), 3),
        "last_error": st.last_error,
    }


def register(sub) -> None:
    p = sub.add_parser("probe", help="decode a video with the compressed-stream reader and count what it sees")
    p.add_argument("path", help="video file (mp4/mkv/raw .h264, H.264 I/P)")
    p.add_argument("--json", dest="json_out", help="also write the result as JSON here")
    p.set_defaults(func=_main)


def _main(args) -> int:
    result = probe(args.path)
    for key, value in result.items():
        print(f"{key:>24}: {value}")
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(result, indent=2))
    return 0
