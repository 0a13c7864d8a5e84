"""What one camera's stream may ask of the decoder: :class:`StreamLimits`, checked on each
access unit before FFmpeg sees it."""
from __future__ import annotations

from dataclasses import dataclass

from cvseg_ros.codec.annexb import NAL_SPS, nal_unit_count
from cvseg_ros.codec.h264_syntax import H264SyntaxError, parse_sps


@dataclass(frozen=True)
class StreamLimits:
    """What one camera's stream may ask of the decoder, checked before FFmpeg sees a unit (FFmpeg
    allocates first: about 850 bytes per NAL unit, kept; a picture buffer per reference frame of
    the size an SPS declares). The defaults are beyond any vehicle camera (4096x2304, 16
    reference frames at 4K UHD) and far below what would exhaust a machine."""
    max_unit_bytes: int = 16 << 20         # one access unit (message)
    max_nal_units: int = 2048              # NAL units in one access unit
    max_picture_pixels: int = 4096 * 2304  # width x height an SPS declares
    max_reference_bytes: int = 512 << 20   # 4:2:0 pictures x (max_num_ref_frames + 1) an SPS implies

    def violation(self, data: bytes, spans: list[tuple[int, int]]) -> str | None:
        """Why the access unit ``data`` (its NAL ``spans``) is beyond the limits, or None."""
        if len(data) > self.max_unit_bytes:
            return f"access unit of {len(data)} bytes, more than the limit of {self.max_unit_bytes}"
        if len(spans) > self.max_nal_units or nal_unit_count(data) > self.max_nal_units:
            return (f"{nal_unit_count(data)} NAL units in one access unit, more than the limit of "
                    f"{self.max_nal_units}")
        for start, end in spans:
            if data[start] & 0x1F != NAL_SPS:
                continue
            try:
                sps = parse_sps(data[start + 1:end])
            except (H264SyntaxError, IndexError, ValueError):
                continue               # FFmpeg refuses it too (a counted decode error)
            pixels = sps.width * sps.height
            if pixels > self.max_picture_pixels:
                return (f"SPS declares {sps.width}x{sps.height} pictures ({pixels} pixels), more than "
                        f"the limit of {self.max_picture_pixels}")
            references = pixels * 3 // 2 * (sps.max_num_ref_frames + 1)
            if references > self.max_reference_bytes:
                return (f"SPS declares {sps.max_num_ref_frames} reference frames of {sps.width}x{sps.height}: "
                        f"{references >> 20} MiB of pictures, more than the limit of "
                        f"{self.max_reference_bytes >> 20} MiB")
        return None
