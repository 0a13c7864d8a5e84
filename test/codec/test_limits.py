"""Stream limits: units that would make FFmpeg allocate without bound are refused before it sees
them (counted in ``over_limits``), and the camera recovers at its next IDR within the limits."""
from __future__ import annotations

import time

from conftest import accounted
from cvseg_ros.codec.annexb import NAL_SPS, nal_unit_spans
from cvseg_ros.codec.decoder import H264StreamDecoder, StreamLimits
from cvseg_ros.codec.h264_syntax import parse_sps
from cvseg_ros.common.procfs import rss_bytes

MIB = 1 << 20


class BitWriter:
    def __init__(self) -> None:
        self.bits: list[int] = []

    def u(self, n: int, value: int) -> None:
        self.bits += [(value >> (n - 1 - i)) & 1 for i in range(n)]

    def ue(self, value: int) -> None:
        code = value + 1
        self.u(2 * code.bit_length() - 1, code)

    def nal(self, header: int) -> bytes:
        """Start code, header byte, the bits with the RBSP stop bit and emulation prevention."""
        bits = self.bits + [1] + [0] * (-(len(self.bits) + 1) % 8)
        raw = bytes(int("".join(map(str, bits[i:i + 8])), 2) for i in range(0, len(bits), 8))
        out, zeros = bytearray(), 0
        for b in raw:
            if zeros >= 2 and b <= 3:
                out.append(3)
                zeros = 0
            out.append(b)
            zeros = zeros + 1 if b == 0 else 0
        return b"\x00\x00\x00\x01" + bytes([header]) + bytes(out)


def baseline_sps(width_mbs: int, height_mbs: int, refs: int) -> bytes:
    """A baseline-profile SPS NAL unit (id 0) declaring ``width_mbs`` x ``height_mbs`` macroblocks."""
    w = BitWriter()
    w.u(8, 66)
    w.u(8, 0)
    w.u(8, 51)              # profile, constraints, level 5.1
    w.ue(0)                 # seq_parameter_set_id
    w.ue(0)                 # log2_max_frame_num - 4
    w.ue(2)                 # pic_order_cnt_type
    w.ue(refs)              # max_num_ref_frames
    w.u(1, 0)               # gaps
    w.ue(width_mbs - 1)
    w.ue(height_mbs - 1)
    w.u(1, 1)               # frame_mbs_only
    w.u(1, 1)               # direct_8x8_inference
    w.u(1, 0)               # no cropping
    w.u(1, 0)               # no VUI
    return w.nal(0x67)


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
