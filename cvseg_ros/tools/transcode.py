"""`cvseg transcode`: explicit conversion of unsupported sources to H.264 I/P."""
from __future__ import annotations

from cvseg_ros.codec.video import transcode


def register(sub) -> None:
    p = sub.add_parser("transcode", help="re-encode any video (MPEG-4 Part 2, B-frames, ...) to H.264 I/P")
    p.add_argument("src")
    p.add_argument("dst", help="output: .mp4/.mkv, or .h264 for a raw Annex B stream")
    p.add_argument("--gop", type=int, default=12)
    p.add_argument("--fps", type=float, default=None, help="output rate (default: the source's)")
    p.add_argument("--max-frames", type=int, default=None)
    p.set_defaults(func=_main)


def _main(args) -> int:
    n = transcode(args.src, args.dst, gop=args.gop, fps=args.fps, max_frames=args.max_frames)
    print(f"wrote {n} frames to {args.dst} (H.264 I/P, GOP {args.gop})")
    return 0
