"""The pictures of ``cvseg demo``: the input frames beside their colour masks blended in, as a PNG
strip (with the classes' legend) and an MP4 of every frame."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _input_frames(bag: Path, topic: str):
    """(stamp_ns, rgb) of the bag's ``topic``, decoded with the project's reader."""
    from cvseg_ros.codec.decoder import H264StreamDecoder
    from cvseg_ros.ros.bags import iter_compressed
    decoder = H264StreamDecoder("demo", rgb_for_p_frames=True)
    for m in iter_compressed(bag, [topic]):
        for frame in decoder.feed(m.data, m.stamp_ns):
            yield frame.stamp, frame.rgb


def _recorded(record_dir: Path, kind: str):
    from cvseg_ros.ros.bags import IMAGE, stamp_ns_of, typestore
    from rosbags.highlevel import AnyReader
    with AnyReader([record_dir], default_typestore=typestore()) as reader:
        conns = [c for c in reader.connections if c.topic.endswith(f"/semantic/{kind}")]
        for conn, _, raw in reader.messages(connections=conns):
            msg = reader.deserialize(raw, IMAGE)
            channels = 3 if kind == "color" else 1
            arr = msg.data.reshape(msg.height, msg.width, channels) if channels == 3 \
                else msg.data.reshape(msg.height, msg.width)
            yield stamp_ns_of(msg.header), arr


def _legend(width: int, class_names: list[str], palette: np.ndarray):
    import cv2
    cols = max(1, min(len(class_names), width // 120))
    rows = -(-len(class_names) // cols)
    img = np.full((rows * 22 + 6, width, 3), 255, np.uint8)
    for i, (name, color) in enumerate(zip(class_names, palette)):
        x, y = 6 + (i % cols) * (width // cols), 6 + (i // cols) * 22
        cv2.rectangle(img, (x, y), (x + 16, y + 16), tuple(int(c) for c in color), -1)
        cv2.putText(img, name, (x + 22, y + 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return img


def write_pictures(bag: Path, topic: str, record_dir: Path, out: Path, fps: float, strip_frames: int = 4,
                   alpha: float = 0.5, checkpoint: str | None = None) -> dict:
    """``out/overlay.png``: rows of input (``topic`` of ``bag``) | blended colour mask (the recording
    in ``record_dir``); ``out/overlay.mp4`` of the same, every frame."""
    import av
    import cv2

    colors = _recorded(record_dir, "color")
    matched = 0
    total = sum(1 for _ in _recorded(record_dir, "mask"))
    picks = set(np.linspace(0, max(total - 1, 0), num=min(strip_frames, total), dtype=int).tolist())
    rows = []
    container = stream = None
    mp4 = out / "overlay.mp4"
    pending_color = next(colors, None)
    try:
        for stamp, rgb in _input_frames(bag, topic):
            while pending_color is not None and pending_color[0] < stamp:
                pending_color = next(colors, None)
            if pending_color is None or pending_color[0] != stamp:
                continue
            color = pending_color[1]
            blend = cv2.addWeighted(rgb, 1 - alpha, color, alpha, 0)
            pair = np.concatenate([rgb, blend], axis=1)
            if matched in picks:
                rows.append(pair)
            if container is None:
                container = av.open(str(mp4), "w")
                stream = container.add_stream("libx264", rate=max(1, round(fps)))
                stream.width, stream.height = pair.shape[1] - pair.shape[1] % 2, pair.shape[0] - pair.shape[0] % 2
                stream.pix_fmt = "yuv420p"
                stream.codec_context.options = {"crf": "23", "preset": "veryfast"}
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pair[:stream.height, :stream.width]),
                                               format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
            matched += 1
    finally:
        if container is not None:
            for packet in stream.encode(None):
                container.mux(packet)
            container.close()
    result = {"overlay_mp4": str(mp4) if matched else None, "overlay_png": None, "frames_matched": matched}
    if rows:
        from cvseg_ros.model.checkpoint import read_metadata
        strip = np.concatenate(rows, axis=0)
        try:
            meta = read_metadata(checkpoint)
            strip = np.concatenate([strip, _legend(strip.shape[1], meta["classes"],
                                                   np.asarray(meta["palette"], np.uint8))], axis=0)
        except Exception:  # noqa: BLE001 - the legend is optional
            pass
        png = out / "overlay.png"
        cv2.imwrite(str(png), cv2.cvtColor(strip, cv2.COLOR_RGB2BGR))
        result["overlay_png"] = str(png)
    return result
