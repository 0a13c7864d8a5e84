"""The three ROS 2 message types that carry H.264, read the same way (ROS-free).

- ``sensor_msgs/msg/CompressedImage`` (``compressed_image``): ``header``, ``format`` ("h264"), ``data``;
- ``foxglove_msgs/msg/CompressedVideo`` (``compressed_video``): ``timestamp``, ``frame_id``,
  ``data``, ``format`` ("h264"); one access unit per message; Foxglove shows H.264 only from it;
- ``ffmpeg_image_transport_msgs/msg/FFMPEGPacket`` (``ffmpeg_packet``): ``header``, ``width``,
  ``height``, ``encoding`` (the FFmpeg encoder's name: ``libx264``, ``h264_nvenc``, ...), ``pts``,
  ``flags``, ``is_bigendian``, ``data``.

:func:`unpack` gives ``(format, data, header)`` of any of them; the node subscribes with the
type a camera's ``type`` parameter names (or the topic advertises), the bag tools register the
two types that are not in ROS's standard set from :data:`DEFINITIONS`.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

#: input type name -> ROS 2 message type
INPUT_TYPES = {
    "compressed_image": "sensor_msgs/msg/CompressedImage",
    "compressed_video": "foxglove_msgs/msg/CompressedVideo",
    "ffmpeg_packet": "ffmpeg_image_transport_msgs/msg/FFMPEGPacket",
}
TYPE_NAMES = {ros: name for name, ros in INPUT_TYPES.items()}

#: input type name -> the topic its usual publisher uses for a camera (``{camera}``): Isaac ROS's
#: H.264 encoder (``image_compressed``), the ``foxglove`` and ``ffmpeg`` image transports beside
#: ``image_raw``
DEFAULT_TOPICS = {
    "compressed_image": "/{camera}/image_compressed",
    "compressed_video": "/{camera}/image_raw/foxglove",
    "ffmpeg_packet": "/{camera}/image_raw/ffmpeg",
}


def default_topic(camera: str, kind: str = "compressed_image") -> str:
    """The input topic of ``camera`` for input type ``kind`` when its ``topic`` parameter is empty."""
    return DEFAULT_TOPICS[kind].format(camera=camera)

#: message definitions (``.msg`` syntax) of the types outside ROS 2's standard messages, as their
#: packages define them, for rosbags' type store
DEFINITIONS = {
    "foxglove_msgs/msg/CompressedVideo":
        "builtin_interfaces/Time timestamp\nstring frame_id\nuint8[] data\nstring format\n",
    "ffmpeg_image_transport_msgs/msg/FFMPEGPacket":
        "std_msgs/Header header\nint32 width\nint32 height\nstring encoding\nuint64 pts\nuint8 flags\n"
        "bool is_bigendian\nuint8[] data\n",
}


def ffmpeg_encoding_format(encoding: str) -> str:
    """The codec of an ``FFMPEGPacket.encoding`` (an FFmpeg encoder's name) as a format string:
    ``h264`` for libx264, h264 and every ``h264_*`` encoder (nvenc, vaapi, qsv, v4l2m2m, ...);
    otherwise the name itself, which the format check then refuses with a clear error."""
    name = encoding.strip().lower()
    if name in ("libx264", "libx264rgb", "h264", "libopenh264") or name.startswith("h264_"):
        return "h264"
    return name or "(empty encoding)"


def input_type(msg) -> str:
    """Which of :data:`INPUT_TYPES` ``msg`` is, from its fields (duck-typed: ROS messages,
    rosbags messages and stand-ins alike)."""
    if hasattr(msg, "encoding") and hasattr(msg, "pts") and hasattr(msg, "header"):
        return "ffmpeg_packet"
    if hasattr(msg, "timestamp") and hasattr(msg, "frame_id"):
        return "compressed_video"
    return "compressed_image"


def unpack(msg, header: Any = None) -> tuple[str, Any, Any]:
    """``(format, data, header)`` of a message of any of the three types. A ``CompressedVideo``
    has no header: its ``timestamp`` and ``frame_id`` make one (``header`` given: that one, e.g.
    a ``std_msgs/Header`` the node built for its outputs)."""
    kind = input_type(msg)
    if kind == "ffmpeg_packet":
        return ffmpeg_encoding_format(str(msg.encoding)), msg.data, msg.header
    if kind == "compressed_video":
        if header is None:
            header = SimpleNamespace(stamp=msg.timestamp, frame_id=msg.frame_id)
        return str(msg.format), msg.data, header
    return str(msg.format), msg.data, msg.header
