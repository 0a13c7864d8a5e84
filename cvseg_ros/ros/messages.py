"""ROS 2 messages the node builds: images from arrays (through ``cv_bridge`` where it works),
CameraInfo for a mask's size, message classes by type name."""
from __future__ import annotations

import importlib

import numpy as np
from sensor_msgs.msg import CameraInfo, Image

from cvseg_ros.ros.camera_info import scaled_fields


def image_message(array: np.ndarray, encoding: str, header, bridge=None) -> Image:
    """``sensor_msgs/Image`` from a HxW (mono8) or HxWx3 (rgb8) uint8 array, with ``header``."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    if bridge is not None:
        msg = bridge.cv2_to_imgmsg(array, encoding=encoding)
        msg.header = header
        return msg
    msg = Image()
    msg.header = header
    msg.height, msg.width = int(array.shape[0]), int(array.shape[1])
    msg.encoding = encoding
    msg.is_bigendian = 0
    msg.step = int(array.strides[0])
    msg.data = array.tobytes()
    return msg


def make_bridge():
    """A ROS 2 ``cv_bridge.CvBridge`` when importable and working, else None (plain fields)."""
    try:
        from cv_bridge import CvBridge  # type: ignore
        bridge = CvBridge()
        probe = bridge.cv2_to_imgmsg(np.zeros((2, 2), np.uint8), encoding="mono8")
        if not isinstance(probe, Image):   # e.g. the ROS 1 package from PyPI
            return None
        return bridge
    except Exception:  # noqa: BLE001 - absent or broken (the PyPI ROS 1 build): fall back
        return None


def message_class(ros_type: str):
    """The rclpy class of ``pkg/msg/Name``; ImportError where its package is not installed."""
    package, _, name = ros_type.split("/")
    return getattr(importlib.import_module(f"{package}.msg"), name)


def camera_info_for(info: CameraInfo, header, width: int, height: int) -> CameraInfo:
    """``info`` under ``header`` for an image of ``width`` x ``height``: K and P scaled where the
    size differs from ``info``'s (:func:`cvseg_ros.ros.camera_info.scaled_fields`)."""
    out = CameraInfo()
    out.header = header
    for name, value in scaled_fields(info, width, height).items():
        setattr(out, name, value)
    return out
