"""Stream limits: units that would make FFmpeg allocate without bound are refused before it sees
them (counted in ``over_limits``), and the camera recovers at its next IDR within the limits."""
from __future__ import annotations

import time

from conftest import accounted
from cvseg_ros.codec.annexb import NAL_SPS, nal_unit_spans
from cvseg_ros.codec.decoder import H264StreamDecoder
from cvseg_ros.codec.limits import StreamLimits
from cvseg_ros.codec.h264_syntax import baseline_sps, parse_sps
from cvseg_ros.common.procfs import rss_bytes

MIB = 1 << 20


def with_sps(unit: bytes, sps: bytes) -> bytes:
    """``unit`` (a real IDR access unit) with its SPS replaced by ``sps``."""
    out = bytearray()
    spans = nal_unit_spans(unit)
    for k, (start, end) in enumerate(spans):
        begin = unit.rfind(b"\x00\x00\x01", 0, start)
        body = unit[begin:end]
        out += sps if unit[start] & 0x1F == NAL_SPS else (b"\x00" + body if k else body)
    return bytes(out)


def test_the_writer_makes_an_sps_the_reader_parses():
    nal = baseline_sps(512, 512, 16)
    sps = parse_sps(nal[5:])
    assert (sps.width, sps.height, sps.max_num_ref_frames) == (8192, 8192, 16)


def test_a_flood_of_tiny_nal_units_is_refused_before_ffmpeg_allocates(gop12_units):
    """3 MB of access-unit delimiters (600 000 NAL units) in one message, ten times: refused at
    once (FFmpeg kept about 850 bytes per NAL unit: 0.5 GB a message), RSS flat; the P-frames
    after it are refused too (their references are intact, but the camera waits for an IDR), and
    the next IDR decodes."""
    decoder = H264StreamDecoder()
    assert len(decoder.feed(gop12_units[0])) == 1 and len(decoder.feed(gop12_units[1])) == 1
    flood = b"\x00\x00\x01\x09\xf0" * 600_000
    before = rss_bytes()
    start = time.perf_counter()
    for _ in range(10):
        assert decoder.feed(flood) == []
    elapsed = time.perf_counter() - start
    grew = rss_bytes() - before
    st = decoder.stats
    assert st.over_limits == 10 and "NAL units in one access unit" in st.last_error, st
    assert grew < 64 * MIB, grew / MIB
    assert elapsed < 5.0, elapsed          # the scan stops at the limit (a generous bound)
    for unit in gop12_units[2:12]:
        assert decoder.feed(unit) == []
    assert st.over_limits == 20
    frames = decoder.feed(gop12_units[12])
    assert len(frames) == 1 and frames[0].kind == "I" and frames[0].reset
    assert len(decoder.feed(gop12_units[13])) == 1
    assert accounted(st) == st.access_units


def test_an_sps_beyond_the_picture_limits_is_refused_until_a_valid_idr(gop12_units):
    """An IDR whose SPS declares 8192x8192 with 16 reference frames (FFmpeg accepts up to
    16000x16000 and allocated 141 MB per message of such a stream), then a 4K UHD SPS with 16
    references (within the limits: passed on), then a real IDR: refused, passed, decoded."""
    limits = StreamLimits()
    huge = with_sps(gop12_units[0], baseline_sps(512, 512, 16))
    assert "8192x8192" in limits.violation(huge, nal_unit_spans(huge))
    many_refs = with_sps(gop12_units[0], baseline_sps(240, 135, 16))     # 3840x2160, 16 references
    assert limits.violation(many_refs, nal_unit_spans(many_refs)) is None
    assert "reference frames" in StreamLimits(max_reference_bytes=64 * MIB).violation(
        many_refs, nal_unit_spans(many_refs))
    decoder = H264StreamDecoder()
    before = rss_bytes()
    for _ in range(5):
        assert decoder.feed(huge) == []
    assert rss_bytes() - before < 64 * MIB
    st = decoder.stats
    assert st.over_limits == 5 and "8192x8192 pictures" in st.last_error
    assert decoder.feed(gop12_units[1]) == [] and st.over_limits == 6      # a P-frame: still refused
    frames = decoder.feed(gop12_units[0])
    assert len(frames) == 1 and frames[0].kind == "I"
    assert len(decoder.feed(gop12_units[1])) == 1
    assert accounted(st) == st.access_units


def test_an_oversized_unit_is_refused_without_scanning(gop12_units):
    decoder = H264StreamDecoder(limits=StreamLimits(max_unit_bytes=len(gop12_units[0]) - 1))
    assert decoder.feed(gop12_units[0]) == []
    assert decoder.stats.over_limits == 1 and "bytes, more than the limit" in decoder.stats.last_error
