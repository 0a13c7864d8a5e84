"""Annex B scanning: NAL units of an access unit, and the formats that denote H.264."""
from __future__ import annotations

import pytest

from conftest import SMALL_CLIP, require
from cvseg_ros.codec.annexb import (NAL_IDR, NAL_PPS, NAL_SPS, UnsupportedStreamError, check_format,
                                    is_h264_format, nal_unit_spans, nal_unit_types, nal_units)

# a 4-byte start code, SPS (ref_idc 3), a 3-byte one, PPS, then an IDR slice ending in a zero byte
UNIT = b"\x00\x00\x00\x01\x67abc\x00\x00\x01\x68de\x00\x00\x00\x01\x65xy\x00"


def test_nal_units_of_a_made_access_unit():
    assert nal_unit_types(UNIT) == [NAL_SPS, NAL_PPS, NAL_IDR]
    assert nal_units(UNIT) == [(3, NAL_SPS, b"abc"), (3, NAL_PPS, b"de"), (3, NAL_IDR, b"xy\x00")]
    assert nal_unit_spans(UNIT) == [(4, 8), (11, 15), (18, len(UNIT))]   # (11, 15): a zero of the next start code
    assert nal_units(b"\x00\x00\x01\x41\x9a") == [(2, 1, b"\x9a")]     # a P slice, nal_ref_idc 2


def test_no_nal_unit():
    for data in (b"", b"\x00\x00", b"garbage", b"\x00\x00\x01"):   # a start code with nothing after it
        assert nal_unit_types(data) == [] and nal_units(data) == []
    assert nal_unit_types(b"junk\x00\x00\x01\x09\xf0") == [9]         # bytes before a start code are skipped


def test_real_access_units():
    from cvseg_ros.codec.video import read_access_units
    units = [u.data for u in read_access_units(require(SMALL_CLIP, "real clip"))][:13]
    first = nal_unit_types(units[0])
    assert NAL_SPS in first and NAL_PPS in first and NAL_IDR in first
    assert all(NAL_IDR not in nal_unit_types(u) for u in units[1:12])
    for unit in units:
        assert [t for _, t, _ in nal_units(unit)] == nal_unit_types(unit)


def test_formats():
    for fmt in ("h264", "H264", " avc1 ", "video/h264; profile=high", "h264/annexb"):
        assert is_h264_format(fmt), fmt
        check_format(fmt)
    for fmt in ("", "jpeg", "h265", "rgb8; png compressed bgr8"):
        assert not is_h264_format(fmt), fmt
        with pytest.raises(UnsupportedStreamError, match="needs an H.264 stream"):
            check_format(fmt)
