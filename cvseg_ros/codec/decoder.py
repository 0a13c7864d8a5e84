"""The compressed-stream reader: H.264 access units in, what the model consumes out.

One :class:`H264StreamDecoder` per camera. Each call to :meth:`H264StreamDecoder.feed` takes one
access unit (Annex B bytes, as carried by a ``sensor_msgs/CompressedImage`` with format ``h264``)
and returns the frames it decodes to (one ``av.Packet`` per access unit, slice threading only: no
delay beyond what the stream declares). Each picture carries the stamp of the unit it was coded in:
a stream whose SPS declares reordering (B-frames) gives its pictures in display order, some units
later, and the reader keeps the units' stamps until their pictures come out. Bad input never
raises: it is dropped, counted in :attr:`stats`, and the next good frame is marked ``reset`` so the
model restarts its state from the I-frame network.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import av
import cv2
import numpy as np

from cvseg_ros.codec.annexb import NAL_IDR, NAL_SLICE, nal_unit_count, nal_unit_spans
from cvseg_ros.codec.frames import UNIT_OUTCOMES, CompressedFrame, StreamStats, accounted_units
from cvseg_ros.codec.limits import StreamLimits
from cvseg_ros.codec.motion_vectors import dense_field, field_shape, fill_intra
from cvseg_ros.codec.reordering import PictureStamps
from cvseg_ros.codec.residual import MotionCompensator

__all__ = ["UNIT_OUTCOMES", "CompressedFrame", "H264StreamDecoder", "StreamLimits", "StreamStats",
           "accounted_units", "warm_up_motion_analysis"]

log = logging.getLogger(__name__)

PICT_I, PICT_P, PICT_B = 1, 2, 3


def _luma(frame: av.VideoFrame, copy: bool = True) -> np.ndarray:
    """A copy of the Y plane (no colour conversion; the decoder reuses its buffers). ``copy=False``:
    a view of the decoder's buffer, valid until the next decode."""
    if frame.format.name not in ("yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "yuv444p", "yuvj444p", "gray"):
        return frame.to_ndarray(format="gray")   # e.g. 10-bit: let swscale convert
    plane = frame.planes[0]
    rows = np.frombuffer(plane, np.uint8).reshape(frame.height, plane.line_size)
    return rows[:, : frame.width].copy() if copy else rows[:, : frame.width]


def _luma_at(frame: av.VideoFrame, size: Callable[[int, int], tuple[int, int]] | None) -> np.ndarray:
    """The luma plane at ``size(height, width)`` (area-resized), or at the frame's size; a copy (it
    is kept as the next frame's reference)."""
    if size is not None:
        h, w = size(frame.height, frame.width)
        if (h, w) != (frame.height, frame.width):
            return cv2.resize(_luma(frame, copy=False), (w, h), interpolation=cv2.INTER_AREA)
    return _luma(frame)


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
        self._stamps = PictureStamps()      # of the units whose pictures are not out yet
        self._open()

    def _open(self, keep_size: bool = False) -> None:
        """A new decoder that waits for an IDR; the pictures the old one held back are lost."""
        size = getattr(self, "_size", None) if keep_size else None
        self._forget_held()
        self._new_codec()
        self._seen_idr = False
        self._need_reset = True
        self._previous_luma: np.ndarray | None = None
        self._gop_index = 0
        self._size: tuple[int, int] | None = size   # (kept across a restart: size changes still count)

    def _new_codec(self) -> None:
        self._codec = av.CodecContext.create("h264", "r")
        self._codec.options = {"flags2": "+export_mvs"} if self.deblock_p_frames else \
            {"flags2": "+export_mvs", "skip_loop_filter": "nointra"}
        self._codec.thread_type = "SLICE"   # frame threading would add 2-3 frames of delay
        self._packets = 0           # packets into this decoder; they are numbered (pts) to check that
        self._late = False          # each picture comes out of its own packet
        self._reordering = False    # the stream itself holds pictures back (B-frames): no such check

    def _forget_held(self) -> None:
        """The units whose pictures never came out: no output."""
        self.stats.no_output += self._stamps.clear()
        self.stats.held = 0

    def _drain(self) -> list[tuple[av.VideoFrame, Any]]:
        """The pictures the decoder holds back, with their units' stamps (end of its stream)."""
        try:
            frames = self._codec.decode(None)
        except Exception as exc:  # noqa: BLE001 - a reader must never raise on data
            self.stats.note_error(f"draining the decoder failed: {type(exc).__name__}: {exc}")
            frames = []
        out = self._stamps.claim(frames)
        self._forget_held()
        return out

    def flush(self) -> list[CompressedFrame]:
        """End of the stream: the pictures the decoder holds back, under their units' stamps;
        then a new decoder waits for an IDR."""
        out = [r for f, stamp in self._drain() if (r := self._convert(f, stamp)) is not None]
        self._open(keep_size=True)
        return out

    def held_stamps(self) -> list:
        """The stamps of the units whose pictures the decoder holds back (a reordering stream)."""
        return self._stamps.stamps()

    def _decode_checked(self, data: bytes, idr: bool, stamp: Any, coded_picture: bool
                        ) -> tuple[list[tuple[av.VideoFrame, Any]], str | None]:
        """(the pictures out of this unit, each with its own unit's stamp; error), keeping the
        decoder free of damage that outlives an IDR. ``coded_picture``: the unit holds a slice.

        The decoder must give each picture out of its own packet (no added delay). Damaged input
        can make FFmpeg grow its reorder buffer for good: from then on every picture would come
        one unit late, under the next unit's stamp and size. A stream that reorders by design
        (B-frames) says so in the SPS of its IDR, on a fresh decoder; an I/P stream whose decoder
        starts to hold pictures back is damaged: the decoder is reopened and waits for an IDR. An
        IDR that gives no picture is retried on a fresh decoder (it needs nothing before it), so
        the stream recovers there. A reordering stream's decoder gives out the pictures it holds
        at each IDR (the IDR needs none of them) and a fresh one takes the IDR."""
        held = []
        if idr and self._reordering:        # B-frames: judge the stream afresh at each IDR
            held = self._drain()
            self._new_codec()
        while True:
            fresh = self._packets == 0
            frames, error = self._decode(data, stamp, coded_picture)
            if idr and fresh:
                self._reordering = bool(self._codec.has_b_frames)   # as its SPS declares it
                if not self._reordering and (error or not frames):
                    self._seen_idr = False  # a damaged IDR: wait for the next one
                return held + frames, error
            damaged = not self._reordering and (bool(self._codec.has_b_frames) or self._late)
            if damaged or (idr and not self._reordering and (error or not frames)):
                self._stamps.discard(self._packets)    # this unit's outcome is counted by the caller
            if idr and not self._reordering and (damaged or error or not frames):
                self._restart_decoder("no picture from an IDR" if not damaged else
                                      "damaged input made it hold pictures back")
                self._seen_idr = True       # and this IDR goes to the fresh decoder
                continue
            if damaged:
                self._restart_decoder("damaged input made it hold pictures back")
                return held, "decoder output delayed after damaged input: decoder restarted, waiting for an IDR"
            return held + frames, error

    def _decode(self, data: bytes, stamp: Any, coded_picture: bool
                ) -> tuple[list[tuple[av.VideoFrame, Any]], str | None]:
        """(pictures out of this packet with their units' stamps, error); packets are numbered
        through ``pts``. A unit whose picture is held back keeps its stamp (:class:`PictureStamps`)."""
        self._packets += 1
        packet = av.Packet(bytes(data))
        packet.pts = packet.dts = self._packets
        if coded_picture:
            self._stamps.add(self._packets, stamp)
        self._late = False
        try:
            frames = self._codec.decode(packet)
        except av.error.FFmpegError as exc:   # InvalidDataError and friends
            self._stamps.discard(self._packets)
            return [], f"decode error: {exc}"
        except Exception as exc:              # noqa: BLE001 - a reader must never raise on data
            self._stamps.discard(self._packets)
            return [], f"decode failure: {type(exc).__name__}: {exc}"
        if not self._reordering:              # a picture of an earlier packet: held back
            self._late = any(f.pts is not None and f.pts != self._packets for f in frames)
            if self._late:
                frames = [f for f in frames if f.pts == self._packets]
        pictures = self._stamps.claim(frames)
        if len(pictures) < len(frames):
            self.stats.note_error(f"{len(frames) - len(pictures)} picture(s) of units already counted: dropped")
        self.stats.no_output += self._stamps.expire(self._packets)   # none will come
        self.stats.held = len(self._stamps)
        return pictures, None

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

    def feed(self, data: bytes, stamp: Any = None, analyse: bool = True, residual: bool = True
             ) -> list[CompressedFrame]:
        """Decode one access unit; returns the frames it gives out (``[]`` or ``[frame]`` for a
        stream without reordering), each under its own unit's stamp. Never raises on bad data.

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
        coded_picture = NAL_IDR in nal_types or NAL_SLICE in nal_types
        pictures, error = self._decode_checked(data, NAL_IDR in nal_types, stamp, coded_picture)
        lost = not self._reordering and self._stamps.discard(self._packets)   # its picture is not out
        if not error and (not coded_picture or lost):
            st.no_output += 1             # parameter sets, SEI, ...; or a picture not given out
        st.held = len(self._stamps)
        out = []
        for frame, frame_stamp in pictures:
            result = self._convert(frame, frame_stamp, analyse, residual)
            if result is not None:
                out.append(result)
        if error:
            self._drop(error)
        return out

    def _convert_b(self, frame: av.VideoFrame, stamp: Any, analyse: bool, residual: bool) -> CompressedFrame:
        """A B-frame (given out in display order, between the frames it is predicted from): its
        past-reference vectors and its residual against the frame before it, for a P step from the
        current state that is not kept (no later frame refers to a B-frame's analysis). Without a
        chain to continue (a restart is pending, another size) it has no vectors."""
        st = self.stats
        st.frames += 1
        st.b_frames += 1
        height, width = frame.height, frame.width
        result = CompressedFrame(kind="B", key_frame=False, width=width, height=height, stamp=stamp,
                                 index=st.frames - 1, gop_index=self._gop_index + 1, reset=False)
        if self.rgb_for_p_frames:
            result.rgb = frame.to_ndarray(format="rgb24")
        chain = (analyse and self.motion and not self._need_reset and self._size == (height, width)
                 and self._previous_luma is not None)
        if not chain:
            return result
        luma = _luma_at(frame, self.residual_size)
        if luma.shape == self._previous_luma.shape:
            blocks = frame.side_data.get("MOTION_VECTORS")
            self._analyse(result, luma, blocks.to_ndarray() if blocks is not None else None, True, residual)
        return result

    def _analyse(self, result: CompressedFrame, luma: np.ndarray, blocks: np.ndarray | None,
                 predicted: bool, residual: bool) -> None:
        """``result``'s luma cells; for a predicted frame its vector field, intra cells and
        residual against the previous I/P frame (when there is one of the same size)."""
        height, width = result.height, result.width
        rows, cols = field_shape(height, width)
        result.luma_cells = cv2.resize(luma, (cols, rows), interpolation=cv2.INTER_AREA)
        if not predicted:
            return
        field, result.intra = dense_field(blocks, height, width)
        result.motion_vectors = fill_intra(field, result.intra)
        if (self.residual and residual and self._previous_luma is not None
                and self._previous_luma.shape == luma.shape):
            result.residual = self._compensator.residual_of_frame(luma, self._previous_luma, result.motion_vectors,
                                                                  height, width)

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
        if frame.is_corrupt:
            self._drop("decoder flagged the frame as corrupt (concealed errors)")
            return None
        if pict == PICT_B:
            return self._convert_b(frame, stamp, analyse, residual)
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
        luma = _luma_at(frame, self.residual_size) if self.motion else None
        reset = is_intra or self._need_reset or (self.motion and (
            self._previous_luma is None or self._previous_luma.shape != luma.shape))
        arr = self._count(frame, is_intra)
        result = CompressedFrame(kind="I" if is_intra else "P", key_frame=bool(frame.key_frame),
                                 width=width, height=height, stamp=stamp, index=st.frames - 1,
                                 gop_index=self._gop_index, reset=reset)
        if self.motion:
            self._analyse(result, luma, arr, not is_intra, residual)
        if reset:
            st.resets += 1
            if not is_intra:
                st.resyncs += 1
            self._need_reset = False
        if reset or self.rgb_for_p_frames:
            result.rgb = frame.to_ndarray(format="rgb24")
        self._previous_luma = luma
        return result
