"""The compressed-stream reader on the real clips: counts against PyAV, the probe command, MPEG-4."""
from __future__ import annotations

import json
import subprocess
import sys

import av
import numpy as np
import pytest

from conftest import (CLIPS_DIR, MPEG4_CLIP, REPO, SMALL1_CLIP, SMALL_CLIP, clip_params,
                      pyav_frame_count, require)
from cvseg_ros.tools.probe import probe
from cvseg_ros.codec.annexb import UnsupportedStreamError
from cvseg_ros.codec.decoder import PICT_I, H264StreamDecoder
from cvseg_ros.codec.video import read_access_units, transcode

PROBE_KEYS = {"frames", "i_frames", "p_frames", "b_frames", "frames_with_mvs",
              "skipped_before_keyframe", "corrupt", "width", "height", "gop_sizes",
              "decode_ms_per_frame"}


def check_probe(result: dict, expected_frames: int, width: int, height: int) -> None:
    assert result["frames"] == expected_frames, result
    assert result["i_frames"] >= 1
    assert result["i_frames"] + result["p_frames"] == result["frames"], result
    assert result["frames_with_mvs"] == result["p_frames"], "a P-frame came without motion vectors"
    assert sum(result["gop_sizes"]) == result["frames"], result["gop_sizes"]
    assert len(result["gop_sizes"]) >= result["i_frames"]
    assert result["b_frames"] == 0 and result["corrupt"] == 0
    assert result["skipped_before_keyframe"] == 0
    assert (result["width"], result["height"]) == (width, height)
    assert result["decode_ms_per_frame"] > 0


@pytest.mark.parametrize("clip", clip_params())
def test_probe_counts_equal_pyav(clip):
    with av.open(str(clip)) as container:
        stream = container.streams.video[0]
        width, height = stream.width, stream.height
    check_probe(probe(clip), pyav_frame_count(clip), width, height)


def test_presented_frames_match_pyav(clips):
    """Frame by frame: kinds, times and I-frame pixels equal PyAV's, edit-list pre-roll left out."""
    clip = next((c for c in clips if c == SMALL1_CLIP), clips[0])
    with av.open(str(clip)) as container:
        ref = [(int(f.pict_type), round(f.time, 6), f.to_ndarray(format="rgb24") if
                int(f.pict_type) == PICT_I else None) for f in container.decode(video=0)]
    decoder = H264StreamDecoder()
    got = []
    for unit in read_access_units(clip):
        frames = decoder.feed(unit.data, unit.time)
        assert len(frames) <= 1
        if not unit.discard:
            got.extend(frames)
    assert len(got) == len(ref)
    for frame, (pict, time, rgb) in zip(got, ref):
        assert frame.kind == ("I" if pict == PICT_I else "P")
        assert round(frame.stamp, 6) == time
        if rgb is not None:
            assert frame.reset and np.array_equal(frame.rgb, rgb)
        else:
            assert frame.rgb is None and frame.motion_vectors is not None and frame.residual is not None
    assert got[0].stamp == 0.0   # the presentation starts at 0 (pre-roll units have times < 0)


def test_cli_probe_json(tmp_path):
    clip = require(SMALL_CLIP, "real clip")
    exe = REPO / ".venv" / "bin" / "cvseg"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "cvseg_ros.tools.cli"]
    out = tmp_path / "sub" / "probe.json"
    proc = subprocess.run(cmd + ["probe", str(clip), "--json", str(out)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert PROBE_KEYS <= set(result), PROBE_KEYS - set(result)
    with av.open(str(clip)) as container:
        stream = container.streams.video[0]
        check_probe(result, pyav_frame_count(clip), stream.width, stream.height)


def test_mpeg4_clip_refused_then_transcoded(tmp_path):
    clip = require(MPEG4_CLIP, "MPEG-4 Part 2 clip")
    with pytest.raises(UnsupportedStreamError, match=r"(?i)mpeg4|mpeg-4") as info:
        probe(clip)
    assert "transcode" in str(info.value)
    with pytest.raises(UnsupportedStreamError, match=r"(?i)mpeg4|mpeg-4"):
        next(read_access_units(clip))
    # the command line says so too, with exit status 1 and no traceback
    proc = subprocess.run([sys.executable, "-m", "cvseg_ros.tools.cli", "probe", str(clip)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "mpeg4" in proc.stderr.lower() and "transcode" in proc.stderr

    dst = tmp_path / "converted.mp4"
    assert transcode(clip, dst, gop=12, max_frames=40) == 40
    result = probe(dst)
    with av.open(str(dst)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        check_probe(result, pyav_frame_count(dst), stream.width, stream.height)
    assert result["frames"] == 40
    assert result["gop_sizes"] == [12, 12, 12, 4]


def test_clips_dir_has_the_known_clips():
    """Guard against the data layout changing under the parametrised tests above."""
    require(CLIPS_DIR, "clips")
    names = {p.name for p in CLIPS_DIR.iterdir()}
    assert MPEG4_CLIP.name in names and SMALL_CLIP.name in names
