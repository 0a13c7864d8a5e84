"""The three H.264 message types through the same message path: bags of each (rosbags registers
CompressedVideo and FFMPEGPacket from their definitions; their Python packages are not installable
here, so the live path for those two is not run over DDS), FFMPEGPacket's encoder names, and a
CompressedVideo's header made from its timestamp and frame_id."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import SMALL_CLIP, require
from cvseg_ros.ros.bags import typestore
from cvseg_ros.ros.inputs import INPUT_TYPES, ffmpeg_encoding_format, input_type, unpack
from cvseg_ros.ros.message_path import MessagePath
from cvseg_ros.tools.cli import main

START_NS = 1_700_000_000_000_000_000


class BagMessage:
    def __init__(self, topic: str, msgtype: str, message) -> None:
        self.topic, self.msgtype, self.message = topic, msgtype, message


def read_messages(bag) -> list[BagMessage]:
    """Every message of a bag in log-time order, deserialised with the project's type store."""
    from rosbags.highlevel import AnyReader
    with AnyReader([bag], default_typestore=typestore()) as reader:
        return [BagMessage(c.topic, c.msgtype, reader.deserialize(raw, c.msgtype)) for c, _, raw in reader.messages()]


@pytest.mark.parametrize("encoding,fmt", [("libx264", "h264"), ("h264_nvenc", "h264"), ("H264_VAAPI", "h264"),
                                          ("h264", "h264"), ("hevc_nvenc", "hevc_nvenc"), ("libx265", "libx265"),
                                          ("", "(empty encoding)")])
def test_ffmpeg_encoder_names_map_to_the_codec(encoding, fmt):
    assert ffmpeg_encoding_format(encoding) == fmt


@pytest.mark.parametrize("msg_type", list(INPUT_TYPES))
def test_a_bag_of_each_type_gets_every_mask_under_its_own_stamp(msg_type, tmp_path):
    """A real clip written as ``msg_type`` (with B-frames: decoding order, stamps going back),
    read back as that type, through eval-bag: every message a mask, under its stamp and frame_id."""
    require(SMALL_CLIP, "real clip")
    bag, rec = tmp_path / "bag", tmp_path / "masks"
    assert main(["bag", "from-video", str(SMALL_CLIP), str(bag), "--topic", "/front/h264", "--type", msg_type,
                 "--bframes", "2", "--max-frames", "24", "--width", "320", "--start-ns", str(START_NS)]) == 0
    msgs = read_messages(bag)
    assert {m.msgtype for m in msgs} == {INPUT_TYPES[msg_type]} and len(msgs) == 24
    assert {input_type(m.message) for m in msgs} == {msg_type}
    unpacked = [unpack(m.message) for m in msgs]
    assert {fmt for fmt, _, _ in unpacked} == {"h264"} and {h.frame_id for _, _, h in unpacked} == {"front"}
    if msg_type == "ffmpeg_packet":
        assert {m.message.encoding for m in msgs} == {"libx264"} and msgs[0].message.flags == 1
        assert (msgs[0].message.width, msgs[0].message.height) == (320, 180)
    assert main(["eval-bag", str(bag), "--record", str(rec), "--device", "cpu", "--threads", "1",
                 "--json", str(tmp_path / "e.json")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["frames_in"] == result["masks_out"] == 24, result
    stamps = sorted(h.stamp.sec * 10**9 + h.stamp.nanosec for _, _, h in unpacked)
    recorded = read_messages(rec)
    masks = [m.message for m in recorded if m.topic == "/front/semantic/mask"]
    assert {m.msgtype for m in recorded if m.topic == "/front/h264"} == {INPUT_TYPES[msg_type]}   # the input too
    assert [m.header.stamp.sec * 10**9 + m.header.stamp.nanosec for m in masks] == stamps
    assert {m.header.frame_id for m in masks} == {"front"} and {(m.width, m.height) for m in masks} == {(320, 180)}


def test_an_ffmpeg_packet_of_another_codec_is_a_counted_wrong_format(make_engine, gop12_units):
    """An FFMPEGPacket from ``hevc_nvenc``: refused before decoding with the encoder named, counted
    in ``wrong_format``; the H.264 packets of the same camera are segmented."""
    ts = typestore()
    Packet = ts.types[INPUT_TYPES["ffmpeg_packet"]]
    Header, Time = ts.types["std_msgs/msg/Header"], ts.types["builtin_interfaces/msg/Time"]

    def packet(unit: bytes, i: int, encoding: str):
        return Packet(header=Header(stamp=Time(sec=1_700_000_000, nanosec=i * 40_000_000), frame_id="front"),
                      width=320, height=180, encoding=encoding, pts=i, flags=int(i == 0), is_bigendian=False,
                      data=np.frombuffer(unit, np.uint8))
    path = MessagePath(make_engine(), ["front"], batch_window_ms=0.0)
    assert path.receive("front", packet(gop12_units[0], 0, "hevc_nvenc")) == "wrong_format"
    assert "'hevc_nvenc'" in path.cameras["front"].last_error
    for i in range(3):
        assert path.receive("front", packet(gop12_units[i], i + 1, "h264_nvenc")) == "queued"
    outs = path.drain()
    counts = path.cameras["front"].counts
    assert counts["wrong_format"] == 1 and counts["published"] == 3 == len(outs)
    assert [o.header.frame_id for o in outs] == ["front"] * 3


def test_a_compressed_video_gets_a_header_from_its_timestamp_and_frame_id(make_engine, gop12_units):
    ts = typestore()
    Video, Time = ts.types[INPUT_TYPES["compressed_video"]], ts.types["builtin_interfaces/msg/Time"]
    path = MessagePath(make_engine(), ["front"], batch_window_ms=0.0)
    for i in range(2):
        msg = Video(timestamp=Time(sec=1_700_000_000, nanosec=i * 40_000_000), frame_id="cam_front",
                    data=np.frombuffer(gop12_units[i], np.uint8), format="h264")
        assert path.receive("front", msg) == "queued"
    outs = path.drain()
    assert [(o.header.frame_id, o.stamp_ns) for o in outs] == [("cam_front", 1_700_000_000 * 10**9 + i * 40_000_000)
                                                                for i in range(2)]
