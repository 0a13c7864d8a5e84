"""Just enough H.264 syntax (Annex B) to follow a stream's continuity without decoding it.

The node uses it to notice, before the decoder sees a unit, that reference pictures were lost (a
message dropped on the network) or arrive out of order: every reference picture of a stream
carries ``frame_num`` (ITU-T H.264 7.4.3), which counts reference pictures modulo
``MaxFrameNum``. A reference picture whose ``frame_num`` is neither the previous reference
picture's nor the next one means pictures are missing in between. Stamps cannot tell this: one
lost frame at 25 fps is a 80 ms step, well inside a camera's jitter.

Parsed: NAL headers, the SPS up to the frame size, the PPS up to its SPS id, and slice headers up
to ``frame_num``. Anything unparsable is reported as unknown (``None``), never raised.
"""
from __future__ import annotations

from dataclasses import dataclass

from cvseg_ros.codec.annexb import NAL_IDR, NAL_PPS, NAL_SLICE, NAL_SPS, nal_unit_spans, nal_units

_HIGH_PROFILES = (100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135)
_SLICE_HEADER_BYTES = 48      # frame_num lies well within the first bytes of a slice NAL


class H264SyntaxError(ValueError):
    """A NAL unit whose header fields cannot be read (truncated, garbage)."""


def rbsp(payload: bytes) -> bytes:
    """Remove the emulation-prevention bytes (``00 00 03`` -> ``00 00``)."""
    return payload.replace(b"\x00\x00\x03", b"\x00\x00")


class BitReader:
    """MSB-first reader with Exp-Golomb codes (H.264 7.2 / 9.1)."""

    def __init__(self, data: bytes) -> None:
        self._value = int.from_bytes(data, "big")
        self._bits = 8 * len(data)
        self.pos = 0

    def u(self, n: int) -> int:
        if n == 0:
            return 0
        if self.pos + n > self._bits:
            raise H264SyntaxError("truncated")
        value = (self._value >> (self._bits - self.pos - n)) & ((1 << n) - 1)
        self.pos += n
        return value

    def ue(self) -> int:
        zeros = 0
        while self.u(1) == 0:
            zeros += 1
            if zeros > 31:
                raise H264SyntaxError("Exp-Golomb code longer than 32 bits")
        return (1 << zeros) - 1 + self.u(zeros)

    def se(self) -> int:
        k = self.ue()
        return (k + 1) // 2 if k & 1 else -(k // 2)


@dataclass(frozen=True)
class SPS:
    sps_id: int
    profile_idc: int
    log2_max_frame_num: int
    separate_colour_plane: bool
    gaps_allowed: bool
    width: int
    height: int
    max_num_ref_frames: int = 0

    @property
    def max_frame_num(self) -> int:
        return 1 << self.log2_max_frame_num


def _skip_scaling_list(r: BitReader, size: int) -> None:
    last = nxt = 8
    for _ in range(size):
        if nxt != 0:
            nxt = (last + r.se() + 256) % 256
        last = nxt if nxt != 0 else last


def parse_sps(payload: bytes) -> SPS:
    r = BitReader(rbsp(payload[:256]))
    profile = r.u(8)
    r.u(16)                                    # constraint flags, level_idc
    sps_id = r.ue()
    if sps_id > 31:
        raise H264SyntaxError(f"seq_parameter_set_id {sps_id} > 31")
    chroma_format, separate = 1, False
    if profile in _HIGH_PROFILES:
        chroma_format = r.ue()
        if chroma_format > 3:
            raise H264SyntaxError(f"chroma_format_idc {chroma_format}")
        if chroma_format == 3:
            separate = bool(r.u(1))
        r.ue()
        r.ue()                                 # bit depths
        r.u(1)                                 # qpprime_y_zero_transform_bypass_flag
        if r.u(1):                             # seq_scaling_matrix_present_flag
            for i in range(8 if chroma_format != 3 else 12):
                if r.u(1):
                    _skip_scaling_list(r, 16 if i < 6 else 64)
    log2_max_frame_num = r.ue() + 4
    if log2_max_frame_num > 16:
        raise H264SyntaxError(f"log2_max_frame_num {log2_max_frame_num} > 16")
    poc_type = r.ue()
    if poc_type == 0:
        r.ue()
    elif poc_type == 1:
        r.u(1)
        r.se()
        r.se()
        cycle = r.ue()
        if cycle > 255:
            raise H264SyntaxError(f"num_ref_frames_in_pic_order_cnt_cycle {cycle}")
        for _ in range(cycle):
            r.se()
    elif poc_type != 2:
        raise H264SyntaxError(f"pic_order_cnt_type {poc_type}")
    max_refs = r.ue()
    gaps = bool(r.u(1))
    width_mbs, height_units = r.ue() + 1, r.ue() + 1
    frame_mbs_only = r.u(1)
    if not frame_mbs_only:
        r.u(1)
    r.u(1)                                     # direct_8x8_inference_flag
    crop = (0, 0, 0, 0)
    if r.u(1):
        crop = (r.ue(), r.ue(), r.ue(), r.ue())
    sub_w = 2 if chroma_format in (1, 2) else 1
    sub_h = 2 if chroma_format == 1 else 1
    unit_x = 1 if chroma_format == 0 or separate else sub_w
    unit_y = (2 - frame_mbs_only) * (1 if chroma_format == 0 or separate else sub_h)
    width = width_mbs * 16 - unit_x * (crop[0] + crop[1])
    height = height_units * 16 * (2 - frame_mbs_only) - unit_y * (crop[2] + crop[3])
    return SPS(sps_id, profile, log2_max_frame_num, separate, gaps, width, height, max_refs)


def parse_pps(payload: bytes) -> tuple[int, int]:
    """``(pic_parameter_set_id, seq_parameter_set_id)``."""
    r = BitReader(rbsp(payload[:16]))
    pps_id, sps_id = r.ue(), r.ue()
    if pps_id > 255 or sps_id > 31:
        raise H264SyntaxError(f"pps id {pps_id} / sps id {sps_id} out of range")
    return pps_id, sps_id


@dataclass(frozen=True)
class SliceInfo:
    idr: bool
    reference: bool          # nal_ref_idc != 0
    frame_num: int
    max_frame_num: int
    gaps_allowed: bool
    width: int
    height: int


def parse_slice(nal_type: int, ref_idc: int, payload: bytes, sps: dict[int, SPS],
                pps: dict[int, int]) -> SliceInfo:
    r = BitReader(rbsp(payload[:_SLICE_HEADER_BYTES]))
    r.ue()                                     # first_mb_in_slice
    slice_type = r.ue()
    if slice_type > 9:
        raise H264SyntaxError(f"slice_type {slice_type}")
    pps_id = r.ue()
    if pps_id not in pps or pps[pps_id] not in sps:
        raise H264SyntaxError(f"slice refers to unknown pps {pps_id}")
    s = sps[pps[pps_id]]
    if s.separate_colour_plane:
        r.u(2)
    frame_num = r.u(s.log2_max_frame_num)
    return SliceInfo(nal_type == NAL_IDR, ref_idc != 0, frame_num, s.max_frame_num, s.gaps_allowed,
                     s.width, s.height)


SLICE_B = 1   # slice_type % 5 of a bi-predicted slice (B)


def first_slice_type(data: bytes, spans: list[tuple[int, int]] | None = None) -> int | None:
    """``slice_type % 5`` of an access unit's first slice (0 P, 1 B, 2 I, 3 SP, 4 SI), or None
    when it has no slice that parses. Needs no parameter set: the type precedes the PPS id. Reads
    the first bytes of that slice only (``spans``: the unit's NAL spans, when known)."""
    for start, end in nal_unit_spans(data) if spans is None else spans:
        if data[start] & 0x1F in (NAL_SLICE, NAL_IDR):
            try:
                r = BitReader(rbsp(data[start + 1: min(end, start + 17)]))
                r.ue()                               # first_mb_in_slice
                slice_type = r.ue()
            except (H264SyntaxError, IndexError, ValueError):
                return None
            return slice_type % 5 if slice_type <= 9 else None
    return None


#: Lost reference pictures up to which decoding goes on (the decoder conceals them with the
#: picture before); more, or ``frame_num`` going back, and the stream waits for its next IDR.
MAX_LOST_TO_RESYNC = 2


class FrameNumTracker:
    """Follows ``frame_num`` across the access units of one stream, in decoding order.

    :meth:`check` returns ``(status, reason)``: ``("ok", None)`` (also when the unit cannot be
    parsed: the decoder judges those); ``("lost", reason)``: up to :data:`MAX_LOST_TO_RESYNC`
    reference pictures are missing (decoding can go on; the model state must restart);
    ``("broken", reason)``: more are missing, or pictures come out of order, or from another
    stream (what follows cannot be decoded right until the next IDR).
    """

    def __init__(self, max_lost: int = MAX_LOST_TO_RESYNC) -> None:
        self.max_lost = max_lost
        self._sps: dict[int, SPS] = {}
        self._pps: dict[int, int] = {}
        self._prev_ref: int | None = None      # frame_num of the previous reference picture
        self.last: SliceInfo | None = None

    def reset(self) -> None:
        self._prev_ref = None

    def check(self, data: bytes) -> tuple[str, str | None]:
        info = None
        for ref_idc, nal_type, payload in nal_units(data):
            try:
                if nal_type == NAL_SPS:
                    sps = parse_sps(payload)
                    self._sps[sps.sps_id] = sps
                elif nal_type == NAL_PPS:
                    pps_id, sps_id = parse_pps(payload)
                    self._pps[pps_id] = sps_id
                elif nal_type in (NAL_SLICE, NAL_IDR) and info is None:
                    info = parse_slice(nal_type, ref_idc, payload, self._sps, self._pps)
            except H264SyntaxError:
                continue
        if info is None:
            return "ok", None
        self.last = info
        if info.idr:
            self._prev_ref = 0 if info.reference else None
            return "ok", None
        prev, self._prev_ref = self._prev_ref, (info.frame_num if info.reference else self._prev_ref)
        if prev is None or info.gaps_allowed:
            return "ok", None
        expected = (prev + 1) % info.max_frame_num
        if info.frame_num == expected:
            return "ok", None
        if info.frame_num == prev:
            if info.reference:
                return "broken", f"frame_num {info.frame_num} repeated (a repeated or reordered picture)"
            return "ok", None
        missing = (info.frame_num - expected) % info.max_frame_num
        if missing > info.max_frame_num // 2:
            return "broken", (f"frame_num went back from {prev} to {info.frame_num} "
                              f"(pictures out of order, or from another stream)")
        reason = f"frame_num jumped from {prev} to {info.frame_num}: {missing} reference picture(s) lost"
        return ("lost", reason) if missing <= self.max_lost else ("broken", reason)


# -- writing (hand-made parameter sets for tests and the fuzzer) ------------------------------------

class BitWriter:
    """Bits written MSB first: ``u(n, value)``, Exp-Golomb ``ue(value)``; :meth:`nal` makes them a NAL unit."""

    def __init__(self) -> None:
        self.bits: list[int] = []

    def u(self, n: int, value: int) -> None:
        self.bits += [(value >> (n - 1 - i)) & 1 for i in range(n)]

    def ue(self, value: int) -> None:
        code = value + 1
        self.u(2 * code.bit_length() - 1, code)

    def nal(self, header: int) -> bytes:
        """A 4-byte start code, ``header``, the bits with the RBSP stop bit, emulation prevention."""
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


def baseline_sps(width_mbs: int, height_mbs: int, refs: int, sps_id: int = 0) -> bytes:
    """A baseline-profile SPS NAL unit declaring ``width_mbs`` x ``height_mbs`` macroblocks and
    ``refs`` reference frames (frame_num in 4 bits, POC type 2, no cropping, no VUI)."""
    w = BitWriter()
    for value in (66, 0, 51):   # profile_idc, constraint flags, level_idc
        w.u(8, value)
    for value in (sps_id, 0, 2, refs):   # id, log2_max_frame_num - 4, POC type, max_num_ref_frames
        w.ue(value)
    w.u(1, 0)                   # gaps_in_frame_num_value_allowed_flag
    w.ue(width_mbs - 1)
    w.ue(height_mbs - 1)
    for flag in (1, 1, 0, 0):   # frame_mbs_only, direct_8x8_inference, cropping, VUI
        w.u(1, flag)
    return w.nal(0x67)
