"""The compressed-stream reader: H.264 access units in, what the model consumes out.

One :class:`H264StreamDecoder` per camera. Each call to :meth:`H264StreamDecoder.feed` takes one
access unit (Annex B bytes, as carried by a ``sensor_msgs/CompressedImage`` with format ``h264``)
and returns the frame it decodes to, with no added delay (one ``av.Packet`` per access unit, slice
threading only). Bad input never raises: it is dropped, counted in :attr:`stats`, and the next good
frame is marked ``reset`` so the model restarts its state from the I-frame network.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field as dc_field
from typing import Any, Callable

import av
import cv2
import numpy as np

from cvseg_ros.codec.annexb import NAL_IDR, NAL_SPS, nal_unit_count, nal_unit_spans
from cvseg_ros.codec.h264_syntax import H264SyntaxError, parse_sps
from cvseg_ros.codec.motion_vectors import GRID, dense_field, field_shape, fill_intra, resize_field
from cvseg_ros.codec.residual import MotionCompensator

log = logging.getLogger(__name__)

PICT_I, PICT_P, PICT_B = 1, 2, 3


@dataclass
class CompressedFrame:
    """One decoded frame in the form the paper's model consumes (see docs/ARCHITECTURE.md)."""

    kind: str                      # "I" or "P"
    key_frame: bool
    width: int
    height: int
    stamp: Any
    index: int                     # decode order in the stream (successful frames)
    gop_index: int                 # 0 at an I-frame, then 1, 2, ... for the P-frames after it
    reset: bool                    # restart the model state here with the I-frame network
    rgb: np.ndarray | None = None                  # HxWx3 uint8
    motion_vectors: np.ndarray | None = None       # (2, H/4, W/4) float32, pixels (intra cells filled)
    intra: np.ndarray | None = None                # (H/4, W/4) bool
    residual: np.ndarray | None = None             # (h, w) int16, luma, at the decoder's residual size
                                                   # (default the frame's size H, W)
    luma_cells: np.ndarray | None = None           # (H/4, W/4) uint8, the mean luma of each cell of the
                                                   # motion-vector field (I- and P-frames)


#: the counters of :class:`StreamStats` that together count every access unit once
UNIT_OUTCOMES = ("frames", "skipped_before_keyframe", "over_limits", "corrupt", "no_output", "b_frames")


def accounted_units(stats: dict) -> int:
    """Access units a :meth:`StreamStats.as_dict` accounts for (equal to its ``access_units``)."""
    return sum(stats[k] for k in UNIT_OUTCOMES)


@dataclass
class StreamStats:
    """Counters of one stream; every dropped access unit is in exactly one of the drop counters."""

    access_units: int = 0
    frames: int = 0
    i_frames: int = 0
    p_frames: int = 0
    b_frames: int = 0                 # decoded B-frames: dropped (unsupported), see last_error
    frames_with_mvs: int = 0
    skipped_before_keyframe: int = 0  # access units before the first IDR (joined mid-GOP)
    over_limits: int = 0              # units beyond the stream limits, and the units after one up to
                                      # the next IDR within them (never given to FFmpeg)
    corrupt: int = 0                  # decode errors, empty / garbage / concealed-corrupt units
    no_output: int = 0                # units that decoded to no picture (parameter sets only, ...)
    resets: int = 0                   # frames where the state restarts (I-frames and resyncs)
    resyncs: int = 0                  # resets on a P-frame after an error or gap
    resolution_changes: int = 0
    decoder_restarts: int = 0         # the decoder held pictures back after damaged input: reopened
    last_error: str = ""
    errors: list[str] = dc_field(default_factory=list, repr=False)

    def note_error(self, message: str) -> None:
        self.last_error = message
        self.errors.append(message)
        del self.errors[:-20]

    def accounted(self) -> int:
        """Access units the counters account for (each unit lands in exactly one of them)."""
        return accounted_units(self.as_dict())

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d.pop("errors")
        return d


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


def _luma(frame: av.VideoFrame, copy: bool = True) -> np.ndarray:
    """A copy of the Y plane (no colour conversion; the decoder reuses its buffers). ``copy=False``:
    a view of the decoder's buffer, valid until the next decode."""
    if frame.format.name not in ("yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "yuv444p", "yuvj444p", "gray"):
        return frame.to_ndarray(format="gray")   # e.g. 10-bit: let swscale convert
    plane = frame.planes[0]
    rows = np.frombuffer(plane, np.uint8).reshape(frame.height, plane.line_size)
    return rows[:, : frame.width].copy() if copy else rows[:, : frame.width]


def warm_up_motion_analysis() -> None:
    """Compile (or load from Numba's disk cache) the motion-vector field's routines now, for the
    block layout PyAV exports, so that no camera's first P-frame waits for it (about 1 s without
    the cache)."""
    from cvseg_ros.codec.video import encode_frames
    ramp = np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))
    codec = av.CodecContext.create("h264", "r")
    codec.options = {"flags2": "+export_mvs"}
    for unit in encode_frames([np.dstack([np.roll(ramp, k, axis=1)] * 3) for k in range(2)], gop=2):
        for frame in codec.decode(av.Packet(unit)):
            side = frame.side_data.get("MOTION_VECTORS")
            if side is not None:
                field, intra = dense_field(side.to_ndarray(), frame.height, frame.width)
                intra[:2, :2], intra[2:, 2:] = True, False   # both kinds of cell: the fill runs
                fill_intra(field, intra)


class H264StreamDecoder:
    """Decodes one H.264 stream access unit by access unit, with motion vectors and residuals.

    ``rgb_for_p_frames``: also convert P-frames to RGB (off by default: the model does not need it).
    ``motion``: build the P-frames' motion-vector field and residual (off: only what ``rgb`` needs,
    e.g. for a network that runs on every frame).
    ``residual_size``: ``(height, width) -> (h, w)``, the size the residual is computed at (the
    size the model consumes it at); default the frame's size. At another size the luma planes are
    area-resized to it and warped with the field scaled to it (at exactly half size, each field
    cell covers 2x2 pixels; otherwise the field is resampled).
    ``deblock_p_frames``: False skips H.264's in-loop deblocking filter on the frames that are not
    intra-coded (FFmpeg's ``skip_loop_filter=nointra``): about 20 % less decoding time per P-frame.
    Their pixels then drift a little from the encoder's (a mean of about 1 grey level after 11
    P-frames of CamVid), which the vectors and the residual's statistics do not mind; I-frames are
    decoded exactly. For the compressed-domain model only, not for networks that see P-frame pixels.
    ``residual=False`` (with ``motion``): no residual image (for a model that does not read it).
    ``limits``: a unit beyond them is refused (counted in ``over_limits``, with the reason in
    ``last_error``), and so is every unit after it up to the next IDR within them.
    """

    def __init__(self, name: str = "stream", rgb_for_p_frames: bool = False, motion: bool = True,
                 residual_size: Callable[[int, int], tuple[int, int]] | None = None,
                 deblock_p_frames: bool = True, residual: bool = True,
                 limits: StreamLimits | None = None) -> None:
        self.name = name
        self.limits = limits or StreamLimits()
        self._refused = False       # a unit was beyond the limits: refuse all but an IDR within them
        self.rgb_for_p_frames = rgb_for_p_frames
        self.motion = motion
        self.residual = residual
        self.residual_size = residual_size
        self.deblock_p_frames = deblock_p_frames
        self.stats = StreamStats()
        self._compensator = MotionCompensator()
        self._open()

    def _open(self, keep_size: bool = False) -> None:
        size = getattr(self, "_size", None) if keep_size else None
        self._codec = av.CodecContext.create("h264", "r")
        self._codec.options = {"flags2": "+export_mvs"} if self.deblock_p_frames else \
            {"flags2": "+export_mvs", "skip_loop_filter": "nointra"}
        self._codec.thread_type = "SLICE"   # frame threading would add 2-3 frames of delay
        self._seen_idr = False
        self._need_reset = True
        self._previous_luma: np.ndarray | None = None
        self._gop_index = 0
        self._size: tuple[int, int] | None = size   # (kept across a restart: size changes still count)
        self._packets = 0           # packets into this decoder; they are numbered (pts) to check that
        self._late = False          # each picture comes out of its own packet
        self._reordering = False    # the stream itself holds pictures back (B-frames): no such check

    def _decode_checked(self, data: bytes, idr: bool) -> tuple[list, str | None]:
        """(this unit's pictures, error), keeping the decoder free of damage that outlives an IDR.

        The decoder must give each picture out of its own packet (no added delay). Damaged input
        can make FFmpeg grow its reorder buffer for good: from then on every picture would come
        one unit late, under the next unit's stamp and size. A stream that reorders by design
        (B-frames) says so in the SPS of its IDR, on a fresh decoder; an I/P stream whose decoder
        starts to hold pictures back is damaged: the decoder is reopened and waits for an IDR. An
        IDR that gives no picture is retried on a fresh decoder (it needs nothing before it), so
        the stream recovers there."""
        if idr and self._reordering:        # B-frames: judge the stream afresh at each IDR
            self._open(keep_size=True)
            self._seen_idr = True
        while True:
            fresh = self._packets == 0
            frames, error = self._decode(data)
            if idr and fresh:
                self._reordering = bool(self._codec.has_b_frames)   # as its SPS declares it
                if not self._reordering and (error or not frames):
                    self._seen_idr = False  # a damaged IDR: wait for the next one
                return frames, error
            damaged = not self._reordering and (bool(self._codec.has_b_frames) or self._late)
            if idr and not self._reordering and (damaged or error or not frames):
                self._restart_decoder("no picture from an IDR" if not damaged else
                                      "damaged input made it hold pictures back")
                self._seen_idr = True       # and this IDR goes to the fresh decoder
                continue
            if damaged:
                self._restart_decoder("damaged input made it hold pictures back")
                return [], "decoder output delayed after damaged input: decoder restarted, waiting for an IDR"
            return frames, error

    def _decode(self, data: bytes) -> tuple[list, str | None]:
        """(pictures out of this packet, error); packets are numbered through ``pts``."""
        self._packets += 1
        packet = av.Packet(bytes(data))
        packet.pts = packet.dts = self._packets
        self._late = False
        try:
            frames = self._codec.decode(packet)
        except av.error.FFmpegError as exc:   # InvalidDataError and friends
            return [], f"decode error: {exc}"
        except Exception as exc:              # noqa: BLE001 - a reader must never raise on data
            return [], f"decode failure: {type(exc).__name__}: {exc}"
        if not self._reordering:              # a picture of an earlier packet: held back
            self._late = any(f.pts is not None and f.pts != self._packets for f in frames)
            if self._late:
                frames = [f for f in frames if f.pts == self._packets]
        return frames, None

    def _restart_decoder(self, why: str) -> None:
        self.stats.decoder_restarts += 1
        self.stats.note_error(f"decoder restarted: {why}")
        self._open(keep_size=True)          # it waits for an IDR

    def mark_discontinuity(self, reason: str = "gap") -> None:
        """Tell the reader that access units were lost: the next good frame restarts the state."""
        self._need_reset = True
        self.stats.note_error(f"discontinuity: {reason}")

    def restart(self) -> None:
        """Forget everything (new decoder); the next frame decoded must be an IDR."""
        self._open()

    def _drop(self, message: str) -> list:
        self.stats.corrupt += 1
        self.stats.note_error(message)
        self._need_reset = True
        log.debug("%s: %s", self.name, message)
        return []

    def _residual(self, luma: np.ndarray, field: np.ndarray, height: int, width: int) -> np.ndarray:
        """``luma`` minus the previous luma warped along ``field`` (of a ``height`` x ``width`` frame),
        at the luma's size."""
        grid = GRID
        if luma.shape != (height, width):
            if luma.shape == field_shape(height, width, GRID // 2):
                grid, field = GRID // 2, field * np.float32(0.5)   # half size: same cells, 2x2 pixels each
            else:
                rows, cols = field_shape(*luma.shape)
                field = resize_field(field, rows, cols, luma.shape[1] / width, luma.shape[0] / height)
        return self._compensator.residual(luma, self._previous_luma, field, grid)

    def _residual_luma(self, frame: av.VideoFrame) -> np.ndarray:
        """The luma plane at the residual size (a copy: it is kept as the next frame's reference)."""
        if self.residual_size is not None:
            h, w = self.residual_size(frame.height, frame.width)
            if (h, w) != (frame.height, frame.width):
                return cv2.resize(_luma(frame, copy=False), (w, h), interpolation=cv2.INTER_AREA)
        return _luma(frame)

    def feed(self, data: bytes, stamp: Any = None, analyse: bool = True, residual: bool = True
             ) -> list[CompressedFrame]:
        """Decode one access unit; returns ``[]`` or ``[frame]``. Never raises on bad data.

        ``analyse=False``: decode only (keep the reference pictures, count the frame) and skip the
        image, vectors and residual; the next frame then restarts the model state (``reset``).
        ``residual=False``: this frame's vectors and luma without its residual (a frame the model
        carries its state through without a mask)."""
        st = self.stats
        st.access_units += 1
        if not data:
            return self._drop("empty access unit")
        lim = self.limits     # a unit over the size or count limit is refused without being scanned
        spans = nal_unit_spans(data) if len(data) <= lim.max_unit_bytes and \
            nal_unit_count(data) <= lim.max_nal_units else []
        over = self.limits.violation(data, spans)
        nal_types = [data[start] & 0x1F for start, _ in spans]
        if over or (self._refused and NAL_IDR not in nal_types):
            st.over_limits += 1
            if over:
                st.note_error(f"refused until the next IDR within the limits: {over}")
                log.warning("%s: %s", self.name, st.last_error)
            self._refused = True
            self._need_reset = True
            return []
        self._refused = False
        if not nal_types:
            return self._drop(f"no Annex B start code in a {len(data)}-byte access unit")
        if not self._seen_idr:
            if NAL_IDR not in nal_types:
                st.skipped_before_keyframe += 1
                return []
            self._seen_idr = True
        frames, error = self._decode_checked(data, NAL_IDR in nal_types)
        if error:
            return self._drop(error)
        if not frames:
            st.no_output += 1
            return []
        out = []
        for frame in frames:
            result = self._convert(frame, stamp, analyse, residual)
            if result is not None:
                out.append(result)
        return out

    def _count(self, frame: av.VideoFrame, is_intra: bool) -> np.ndarray | None:
        """Count a decoded frame and advance the GOP position; returns its exported vector blocks."""
        st = self.stats
        st.frames += 1
        if is_intra:
            st.i_frames += 1
            self._gop_index = 0
            return None
        st.p_frames += 1
        self._gop_index += 1
        blocks = frame.side_data.get("MOTION_VECTORS")
        arr = blocks.to_ndarray() if blocks is not None else None
        if arr is not None and len(arr):
            st.frames_with_mvs += 1
        return arr

    def _convert(self, frame: av.VideoFrame, stamp: Any, analyse: bool = True, residual: bool = True
                 ) -> CompressedFrame | None:
        st = self.stats
        pict = int(frame.pict_type)
        if pict == PICT_B:
            st.b_frames += 1
            self._need_reset = True
            st.note_error("B-frame dropped: B-frames are not supported (the motion vectors lose their "
                          "reference); re-encode the source with `cvseg transcode IN OUT`")
            return None
        if frame.is_corrupt:
            self._drop("decoder flagged the frame as corrupt (concealed errors)")
            return None
        height, width = frame.height, frame.width
        if self._size is not None and self._size != (height, width):
            st.resolution_changes += 1
            self._need_reset = True
        self._size = (height, width)
        is_intra = pict == PICT_I or frame.key_frame
        if not analyse:
            self._count(frame, is_intra)
            self._previous_luma = None   # no reference for a residual: the next frame restarts
            self._need_reset = True
            return CompressedFrame(kind="I" if is_intra else "P", key_frame=bool(frame.key_frame), width=width,
                                   height=height, stamp=stamp, index=st.frames - 1,
                                   gop_index=self._gop_index, reset=False)
        luma = self._residual_luma(frame) if self.motion else None
        reset = is_intra or self._need_reset or (self.motion and (
            self._previous_luma is None or self._previous_luma.shape != luma.shape))
        arr = self._count(frame, is_intra)
        result = CompressedFrame(kind="I" if is_intra else "P", key_frame=bool(frame.key_frame),
                                 width=width, height=height, stamp=stamp, index=st.frames - 1,
                                 gop_index=self._gop_index, reset=reset)
        if self.motion:
            rows, cols = field_shape(height, width)
            result.luma_cells = cv2.resize(luma, (cols, rows), interpolation=cv2.INTER_AREA)
        if not is_intra:
            if self.motion:
                field, result.intra = dense_field(arr, height, width)
                result.motion_vectors = fill_intra(field, result.intra)
                if (self.residual and residual and self._previous_luma is not None
                        and self._previous_luma.shape == luma.shape):
                    result.residual = self._residual(luma, result.motion_vectors, height, width)
        if reset:
            st.resets += 1
            if not is_intra:
                st.resyncs += 1
            self._need_reset = False
        if reset or self.rgb_for_p_frames:
            result.rgb = frame.to_ndarray(format="rgb24")
        self._previous_luma = luma
        return result
