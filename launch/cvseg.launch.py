"""Launch cvseg_node with the package's params file, plus overrides from the command line.

    ros2 launch cvseg_ros cvseg.launch.py
    ros2 launch cvseg_ros cvseg.launch.py cameras:="[front, rear]" device:=cuda
    ros2 launch cvseg_ros cvseg.launch.py params_file:=/path/to/my.yaml

``cameras`` and ``device`` override the params file only when given (empty = keep the file's);
each camera's input topic is where its input type's publishers put it (``/<camera>/image_compressed``
for ``sensor_msgs/CompressedImage``) unless the file sets ``<camera>.topic``.
"""
import os

import yaml
from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

PACKAGE = "cvseg_ros"
EXECUTABLE = "cvseg_node"
PARAMS_FILE = "config/cvseg.yaml"   # under share/<package>/


def parse_cameras(text):
    """'[front, rear]', 'front,rear' or 'front' -> ['front', 'rear'] / ['front']."""
    text = text.strip()
    if not text:
        return []
    if text.startswith("["):
        value = yaml.safe_load(text)
        return [str(v).strip() for v in (value or [])]
    return [part.strip() for part in text.split(",") if part.strip()]


def _node(context):
    overrides = {}
    cameras = LaunchConfiguration("cameras").perform(context)
    if cameras.strip():
        overrides["cameras"] = parse_cameras(cameras)
    device = LaunchConfiguration("device").perform(context).strip()
    if device:
        overrides["device"] = device
    params_file = LaunchConfiguration("params_file").perform(context)
    return [Node(
        package=PACKAGE,
        executable=EXECUTABLE,
        name="cvseg_node",
        output="screen",
        emulate_tty=True,
        parameters=[params_file, overrides],
    )]


def generate_launch_description():
    default_params = os.path.join(get_package_share_directory(PACKAGE), PARAMS_FILE)
    return LaunchDescription([
        DeclareLaunchArgument("params_file", default_value=default_params,
                              description="cvseg_node parameters (YAML, cvseg_node: ros__parameters: ...)"),
        DeclareLaunchArgument("cameras", default_value="",
                              description="camera list overriding the params file, e.g. \"[front, rear]\""),
        DeclareLaunchArgument("device", default_value="",
                              description="auto | cpu | cuda (empty: the params file's)"),
        OpaqueFunction(function=_node),
    ])
