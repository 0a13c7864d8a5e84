"""A camera's intrinsics beside its masks (ROS-free): a calibration file as ``camera_calibration``
writes it, and the fields of a ``sensor_msgs/CameraInfo`` for an image of another size.

The node republishes the latest CameraInfo it received (by default on the input's
:func:`camera_info_topic`) with each mask's header (:func:`cvseg_ros.ros.messages.camera_info_for`), ``cvseg bag from-video --camera-info`` writes one
per frame from a calibration file, ``cvseg eval-bag --record`` republishes a bag's as the node
does. All three scale K and P by :func:`scaled_fields` where the sizes differ.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

def scaled_fields(info: Any, width: int, height: int) -> dict:
    """The CameraInfo fields of ``info`` (an rclpy or rosbags CameraInfo, or a namespace with its
    fields) for an image of ``width`` x ``height``: rows 0 and 1 of K and P scaled by the ratio of
    the sizes (an ``info`` of size 0: unscaled); distortion, R, binning and ROI kept."""
    sx = width / info.width if info.width else 1.0
    sy = height / info.height if info.height else 1.0
    k, p = [float(v) for v in info.k], [float(v) for v in info.p]
    for row, scale in ((0, sx), (1, sy)):
        k[3 * row: 3 * row + 3] = [v * scale for v in k[3 * row: 3 * row + 3]]
        p[4 * row: 4 * row + 4] = [v * scale for v in p[4 * row: 4 * row + 4]]
    return {"height": int(height), "width": int(width), "distortion_model": str(info.distortion_model),
            "d": [float(v) for v in info.d], "k": k, "r": [float(v) for v in info.r], "p": p,
            "binning_x": int(info.binning_x), "binning_y": int(info.binning_y), "roi": info.roi}


def read_calibration(path: str | Path) -> dict:
    """A ``camera_calibration`` YAML file (``image_width``, ``image_height``, ``camera_matrix``,
    ``distortion_model``, ``distortion_coefficients``, ``rectification_matrix``,
    ``projection_matrix``; each matrix ``{rows, cols, data}``) as CameraInfo fields, ROI empty.
    ValueError naming the file and what is wrong."""
    import yaml
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"camera info {path}: cannot read it ({' '.join(str(exc).split())})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"camera info {path}: not a calibration file (a mapping of image_width, camera_matrix, ...)")

    def matrix(key: str, size: int | None, default: list[float] | None = None) -> list[float]:
        value = doc.get(key)
        if value is None and default is not None:
            return default
        data = value.get("data") if isinstance(value, dict) else None
        if not isinstance(data, list) or (size is not None and len(data) != size):
            raise ValueError(f"camera info {path}: '{key}' needs 'data' with {size or 'its'} numbers")
        try:
            return [float(v) for v in data]
        except (TypeError, ValueError):
            raise ValueError(f"camera info {path}: '{key}' holds a value that is not a number") from None

    try:
        width, height = int(doc["image_width"]), int(doc["image_height"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"camera info {path}: needs integer 'image_width' and 'image_height'") from None
    if width <= 0 or height <= 0:
        raise ValueError(f"camera info {path}: image size {width}x{height}")
    k = matrix("camera_matrix", 9)
    identity = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    return {"height": height, "width": width,
            "distortion_model": str(doc.get("distortion_model") or "plumb_bob"),
            "d": matrix("distortion_coefficients", None, []), "k": k,
            "r": matrix("rectification_matrix", 9, identity),
            "p": matrix("projection_matrix", 12, k[0:3] + [0.0] + k[3:6] + [0.0] + k[6:9] + [0.0]),
            "binning_x": 0, "binning_y": 0, "roi": None}


#: last names of image_transport topics beside their base topic (``<base>/<transport>``)
TRANSPORTS = ("compressed", "ffmpeg", "foxglove", "h264", "theora")


def camera_info_topic(topic: str) -> str:
    """The CameraInfo topic beside an image topic, as image_transport places it: a sibling of the
    base topic (``/front/image_raw/ffmpeg`` and ``/front/image_compressed`` -> ``/front/camera_info``)."""
    parts = [p for p in topic.strip("/").split("/") if p]
    if len(parts) > 1 and parts[-1] in TRANSPORTS:
        parts = parts[:-1]
    return "/" + "/".join(parts[:-1] + ["camera_info"])
