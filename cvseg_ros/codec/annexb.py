"""H.264 byte streams (Annex B): the ``CompressedImage`` formats that carry them, and their NAL units.

An access unit is a run of NAL units, each after a start code (``00 00 01`` or ``00 00 00 01``);
the first byte of a NAL unit is its header (``nal_ref_idc``, ``nal_unit_type``). The scanner
(:func:`nal_unit_spans`) finds them without decoding anything; bytes before the first start code
are ignored.
"""
from __future__ import annotations

NAL_SLICE, NAL_IDR, NAL_SPS, NAL_PPS = 1, 5, 7, 8
START_CODE = b"\x00\x00\x01"
H264_FORMATS = ("h264", "avc", "avc1", "video/h264", "h264/annexb")


class UnsupportedStreamError(ValueError):
    """The input is not an H.264 I/P stream this reader can use (the message says why and what to do)."""


def is_h264_format(fmt: str) -> bool:
    """True for the ``CompressedImage.format`` strings that denote an H.264 stream."""
    head = fmt.strip().lower().split(";")[0].strip()
    return head in H264_FORMATS


def check_format(fmt: str) -> None:
    """Raise :class:`UnsupportedStreamError` naming ``fmt`` unless it denotes H.264."""
    if not is_h264_format(fmt):
        raise UnsupportedStreamError(
            f"unsupported format {fmt!r}: cvseg_ros needs an H.264 stream "
            f"(format one of {', '.join(H264_FORMATS)}; Annex B, one access unit per message)")


def nal_unit_count(data: bytes) -> int:
    """How many NAL units an Annex B access unit holds (start codes counted at C speed: no start
    code occurs inside a NAL unit, emulation prevention sees to that)."""
    return data.count(START_CODE)


def nal_unit_spans(data: bytes) -> list[tuple[int, int]]:
    """``(start, end)`` of each NAL unit of an Annex B access unit: ``data[start]`` is its header
    byte, ``end`` is where the next start code begins (or ``len(data)``), so ``data[start:end]``
    may end with the zero bytes of a 4-byte start code. Empty if no start code is found."""
    spans = []
    pos = data.find(START_CODE)
    while pos != -1 and pos + 3 < len(data):
        start = pos + 3
        pos = data.find(START_CODE, start)
        spans.append((start, len(data) if pos == -1 else pos))
    return spans


def nal_units(data: bytes) -> list[tuple[int, int, bytes]]:
    """``(nal_ref_idc, nal_unit_type, payload)`` of each NAL unit of an Annex B access unit; the
    payload starts after the one-byte NAL header and still holds emulation-prevention bytes; its
    trailing zero bytes are stripped, except from the last NAL unit's."""
    out = []
    for start, end in nal_unit_spans(data):
        header = data[start]
        payload = data[start + 1:end]
        if end < len(data):
            payload = payload.rstrip(b"\x00")   # trailing zero bytes / the next 4-byte start code
        out.append(((header >> 5) & 0x3, header & 0x1F, payload))
    return out


def nal_unit_types(data: bytes) -> list[int]:
    """Types of the NAL units in an Annex B access unit (empty if no start code is found)."""
    return [data[start] & 0x1F for start, _ in nal_unit_spans(data)]
