"""``cvseg_node``'s parameters: one table, from which they are declared, checked and documented.

Each :class:`Param` gives a parameter's name, type, default, range (bounds, allowed values or a
pattern), description and read-only flag. A name with ``<camera>`` is a template, one parameter
per entry of ``cameras`` (``front.topic``). ``class_names`` is set by the node from the
checkpoint, not read. The node declares each entry with a ``ParameterDescriptor`` built from it
and checks every value with :meth:`Param.check` (:func:`read`); ``config/cvseg.yaml`` and the
README's table follow the table (``test/ros/test_param_table.py``). ROS-free;
``python -m cvseg_ros.ros.params`` prints the table as Markdown (:func:`markdown`).
"""
from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from cvseg_ros.model.checkpoint import CHECKPOINT_NAMES

#: What stands for a camera's name in a template parameter.
CAMERA = "<camera>"
#: The parameter whose entries instantiate the templates.
CAMERAS = "cameras"
TYPES = ("bool", "int", "float", "string", "string[]")
_TYPE_WORDS = {"bool": "true or false", "int": "an integer", "float": "a number", "string": "a string",
               "string[]": "a list of strings"}


class ParameterError(ValueError):
    """A value the table does not allow; the message names the parameter and what it allows."""


def _num(x: float) -> str:
    return f"{x:g}"


def _or(words) -> str:
    words = [repr(w) for w in words]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


@dataclass(frozen=True)
class Param:
    """One parameter. Ranges: ``minimum`` / ``maximum`` (numbers; ``exclusive_minimum`` excludes the
    bound), ``choices`` (strings), ``pattern`` (a string, or each item of a list: a full match,
    ``pattern_help`` in words), ``nonempty`` / ``unique`` (lists), ``existing_file`` (a string:
    empty, one of ``names``, or a file). ``strip`` / ``lower``: how a string is normalised before the checks;
    ``bool_words``: a string that also takes ``true`` / ``false`` as booleans (read as those words).
    ``what``: the noun the messages use for a value (``camera``, ``device``)."""
    name: str
    type: str
    default: Any
    description: str
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    choices: tuple[str, ...] = ()
    pattern: str | None = None
    pattern_help: str = ""
    nonempty: bool = False
    unique: bool = False
    existing_file: bool = False
    names: tuple[str, ...] = ()
    strip: bool = False
    lower: bool = False
    bool_words: bool = False
    what: str = "value"
    read_only: bool = True
    set_by_node: bool = False

    def __post_init__(self) -> None:
        if self.type not in TYPES:
            raise ValueError(f"{self.name}: unknown type {self.type!r}")

    @property
    def is_template(self) -> bool:
        return CAMERA in self.name

    def for_camera(self, camera: str) -> Param:
        """The template instantiated for ``camera``."""
        def sub(v):
            return v.replace(CAMERA, camera) if isinstance(v, str) else v
        return replace(self, name=sub(self.name), default=sub(self.default),
                       description=sub(self.description))

    @property
    def has_bounds(self) -> bool:
        return self.minimum is not None or self.maximum is not None

    # -- checks -----------------------------------------------------------------------------------
    def check(self, value: Any) -> Any:
        """``value`` checked against the table and normalised (floats as float, strings stripped /
        lower-cased as the entry says, a checkpoint path expanded); raises :class:`ParameterError`."""
        name, kind = self.name, self.type
        if kind == "string[]" and value is None:      # ROS reads `[]` as an unset value
            value = []
        if self.bool_words and isinstance(value, bool):
            value = "true" if value else "false"
        ok = {"bool": isinstance(value, bool),
              "int": isinstance(value, int) and not isinstance(value, bool),
              "float": isinstance(value, (int, float)) and not isinstance(value, bool),
              "string": isinstance(value, str),
              "string[]": isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)}[kind]
        if not ok:
            got = "no value" if value is None else repr(value)
            raise ParameterError(f"parameter '{name}' must be {_TYPE_WORDS[kind]}, got {got}")
        if kind == "float":
            if not math.isfinite(value):
                raise ParameterError(f"parameter '{name}' must be a finite number, got {value}")
            self._check_bounds(value)
            return float(value)
        if kind == "int":
            self._check_bounds(value)
            return value
        if kind == "string":
            return self._check_string(value)
        if kind == "string[]":
            return self._check_list(list(value))
        return value

    def _check_bounds(self, value: float) -> None:
        lo, hi = self.minimum, self.maximum
        if lo is not None and (value <= lo if self.exclusive_minimum else value < lo):
            op = ">" if self.exclusive_minimum else ">="
            raise ParameterError(f"parameter '{self.name}' must be {op} {_num(lo)}, got {value}")
        if hi is not None and value > hi:
            raise ParameterError(f"parameter '{self.name}' must be <= {_num(hi)}, got {value}")

    def _check_string(self, value: str) -> str:
        if self.strip:
            value = value.strip()
        if self.lower:
            value = value.lower()
        if self.choices and value not in self.choices:
            raise ParameterError(f"parameter '{self.name}': unknown {self.what} {value!r}; "
                                 f"use {_or(self.choices)}")
        if self.pattern and not re.fullmatch(self.pattern, value):
            raise ParameterError(f"parameter '{self.name}': unknown {self.what} {value!r}; "
                                 f"use {self.pattern_help}")
        if self.existing_file and value and value not in self.names:
            path = Path(value).expanduser()
            if not path.is_file():
                why = "not a regular file" if path.exists() else "file not found"
                raise ParameterError(f"parameter '{self.name}': {why}: {path}")
            value = str(path)
        return value

    def _check_list(self, value: list[str]) -> list[str]:
        if self.nonempty and not value:
            raise ParameterError(f"parameter '{self.name}' is empty: list at least one {self.what}, "
                                 f"e.g. -p {self.name}:=[{', '.join(self.default)}]")
        for item in value:
            if self.pattern and not re.fullmatch(self.pattern, item):
                raise ParameterError(f"parameter '{self.name}': {item!r} is not a valid {self.what} "
                                     f"name ({self.pattern_help})")
        if self.unique and len(set(value)) != len(value):
            raise ParameterError(f"parameter '{self.name}' lists a {self.what} twice: {value}")
        return value

    # -- in words -----------------------------------------------------------------------------------
    def range_text(self) -> str:
        """The allowed values in words (empty: any value of the type)."""
        parts = []
        if self.minimum is not None:
            parts.append(f"{'>' if self.exclusive_minimum else '>='} {_num(self.minimum)}")
        if self.maximum is not None:
            parts.append(f"<= {_num(self.maximum)}")
        if self.choices:
            parts.append(" or ".join(self.choices))
        if self.nonempty:
            parts.append(f"at least one {self.what}")
        if self.unique:
            parts.append("each once")
        if self.pattern_help:
            parts.append(self.pattern_help)
        if self.existing_file:
            parts.append(f"empty, {', '.join(self.names)} or an existing file" if self.names else "empty or an existing file")
        if self.set_by_node:
            parts.append("set by the node")
        return "; ".join(parts)

    def default_text(self) -> str:
        """The default as it is written in a params file."""
        if self.set_by_node:
            return "from the checkpoint"
        if isinstance(self.default, bool):
            return "true" if self.default else "false"
        if isinstance(self.default, list) or self.default == "":
            return json.dumps(self.default)
        return str(self.default)


PARAMETERS: tuple[Param, ...] = (
    Param(CAMERAS, "string[]", ["front"],
          f"camera names; each camera `{CAMERA}` subscribes to `{CAMERA}.topic` and publishes "
          f"`{CAMERA}/semantic/mask` and `{CAMERA}/semantic/color`",
          pattern=r"[A-Za-z][A-Za-z0-9_]*", pattern_help="letters, digits and '_', starting with a letter",
          nonempty=True, unique=True, what="camera"),
    Param(f"{CAMERA}.topic", "string", "",
          f"input topic of camera `{CAMERA}`: H.264, Annex B, one access unit per message, of the "
          f"type `{CAMERA}.type` names; empty: where that type's publishers put it, "
          f"`/{CAMERA}/image_compressed` (`compressed_image`, Isaac ROS's H.264 encoder), "
          f"`/{CAMERA}/image_raw/foxglove` (`compressed_video`, the foxglove image transport), "
          f"`/{CAMERA}/image_raw/ffmpeg` (`ffmpeg_packet`, the ffmpeg image transport); with `auto`, "
          f"the first of the three that has a publisher", strip=True),
    Param(f"{CAMERA}.type", "string", "auto",
          "the input's message type: `compressed_image` (`sensor_msgs/CompressedImage`, format "
          "`h264`), `compressed_video` (`foxglove_msgs/CompressedVideo`, format `h264`; the masks "
          "get its timestamp and frame_id), `ffmpeg_packet` (`ffmpeg_image_transport_msgs/FFMPEGPacket`, "
          "encoding `libx264`, `h264_nvenc` or another `h264_*`); `auto`: the type the topic is "
          "published with (checked again every diagnostics period), `compressed_image` until one is seen",
          choices=("auto", "compressed_image", "compressed_video", "ffmpeg_packet"), strip=True, lower=True),
    Param(f"{CAMERA}.expected_rate_hz", "float", 0.0,
          f"the camera's frame rate: input below 80 % of it turns camera `{CAMERA}`'s diagnostics to "
          f"WARN (messages lost before the node, a slow camera); 0: not checked", minimum=0.0, maximum=1000.0),
    Param(f"{CAMERA}.camera_info_topic", "string", "auto",
          f"the camera's `sensor_msgs/CameraInfo`; the latest one is republished on "
          f"`{CAMERA}/semantic/camera_info` with each mask's header (its intrinsics scaled to the "
          f"mask's size where that differs), for RViz's Camera display and fusion; `auto`: the "
          f"`camera_info` beside the input's base topic, as image_transport places it "
          f"(`/{CAMERA}/image_compressed`, `/{CAMERA}/image_raw/ffmpeg` -> `/{CAMERA}/camera_info`); "
          f"empty: none", strip=True),
    Param("device", "string", "auto",
          "inference device; `auto`: CUDA when available, else the CPU",
          pattern=r"auto|cpu|cuda(:\d+)?", pattern_help="'auto', 'cpu' or 'cuda[:N]'", strip=True,
          lower=True, what="device"),
    Param("checkpoint", "string", "auto",
          "model checkpoint: `fast` (ENet I-frame network) or `accurate` (ESPNetv2, about 2.5x its "
          "time per frame on a CPU), both shipped; `auto` or empty: `accurate` on CUDA, `fast` on the CPU; or a "
          "`.safetensors` path (its `.json` beside it)", existing_file=True, names=CHECKPOINT_NAMES, strip=True),
    Param("publish_mask", "bool", True,
          f"publish `{CAMERA}/semantic/mask` (`mono8` class ids, 255 = unknown)"),
    Param("publish_color", "bool", True,
          f"publish `{CAMERA}/semantic/color` (`rgb8`, the checkpoint's palette or `palette`'s)"),
    Param("palette", "string", "",
          "a colour-map file (JSON or YAML: class name -> `[r, g, b]` or `'#rrggbb'`) whose colours "
          f"replace the checkpoint's in `{CAMERA}/semantic/color` and the label info; classes it "
          "leaves out keep theirs; empty: the checkpoint's palette", existing_file=True, strip=True),
    Param("qos_reliability", "string", "best_effort",
          "reliability of the input subscriptions: `best_effort` (sensor-data QoS) or `reliable`; "
          "the outputs are reliable, which serves subscribers of both kinds",
          choices=("best_effort", "reliable"), strip=True, lower=True),
    Param("queue_depth", "int", 5,
          "per camera: frames waiting for the engine (the input QoS depth is max(2 x this, 30)); when "
          "the engine falls behind, the oldest waiting frame is decoded only (no mask) or the queue "
          "jumps to a waiting IDR, counted in `queue_drops`", minimum=1, maximum=1000),
    Param("batch_window_ms", "float", 5.0,
          "how long the worker waits for the other cameras' frames to run them as one batch (ms)",
          minimum=0.0, maximum=1000.0),
    Param("max_stamp_gap_periods", "float", 3.0,
          "a stamp step larger than this many frame periods restarts the camera's model state",
          minimum=1.0, exclusive_minimum=True, maximum=1e6),
    Param("diagnostics_period", "float", 1.0, "seconds between `/diagnostics` messages",
          minimum=0.05, maximum=3600.0),
    Param("input_timeout_s", "float", 1.0,
          "a camera with no message for this many seconds is reported STALE in `/diagnostics` (and "
          "gets no mask meanwhile)", minimum=0.0, exclusive_minimum=True, maximum=3600.0),
    Param("luma_matching", "bool", True,
          "correct the motion accumulated since the I-frame against the frames' luma where the "
          "checkpoint's model does; false: less time per P-frame, a little less accuracy"),
    Param("p_frame_branch", "string", "auto",
          "run the P-frame branch (CNNs, ConvLSTM, correction head); false: each P-frame's mask is the "
          "I-frame's logits warped along the accumulated motion (less time per P-frame; needs a model "
          "that accumulates the motion since the I-frame, as the shipped ones do, not the paper's); "
          "`auto`: the checkpoint's choice, measured on the held-out check (`fast`: true, `accurate`: false)",
          choices=("auto", "true", "false"), bool_words=True, strip=True, lower=True),
    Param("precision", "string", "auto",
          "arithmetic of the networks: `fp32`; `bf16` or `fp16` autocast (fp16 is for a GPU); `mixed`: "
          "the I-frame network in fp32, the P-frame branch in bf16; `auto`: `mixed` on a CPU with native "
          "bf16, else fp32", choices=("auto", "fp32", "bf16", "fp16", "mixed"), strip=True, lower=True),
    Param("threads", "int", 0, "torch CPU threads of the engine; 0: torch's default (one per core)",
          minimum=0, maximum=256),
    Param("decode_threads", "int", 1, "cameras whose messages are decoded at once (each camera's in "
          "order); 1: one after the other; 0: one per core, at most 8 (see docs/PERFORMANCE.md)",
          minimum=0, maximum=64),
    Param("class_names", "string[]", None,
          "class id -> name, from the checkpoint (a value given is ignored)", set_by_node=True),
)
BY_NAME = {p.name: p for p in PARAMETERS}


def read(value_of: Callable[[Param], Any]) -> dict[str, Any]:
    """Every parameter the node reads, checked, in the table's order: ``{name: value}``, the
    templates once per camera. ``value_of(param)`` gives a parameter's given value (or its default);
    the first bad one raises :class:`ParameterError`."""
    cfg: dict[str, Any] = {}
    for param in PARAMETERS:
        if param.set_by_node:
            continue
        for p in ([param.for_camera(c) for c in cfg[CAMERAS]] if param.is_template else [param]):
            cfg[p.name] = p.check(value_of(p))
    return cfg


def markdown(params: tuple[Param, ...] = PARAMETERS) -> str:
    """The table in Markdown: ``parameter | type | default | range | description``."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|")
    rows = ["| parameter | type | default | range | description |", "|---|---|---|---|---|"]
    for p in params:
        default = p.default_text() if p.set_by_node else f"`{p.default_text()}`"
        rows.append(f"| `{p.name}` | {p.type} | {cell(default)} | {cell(p.range_text())} | "
                    f"{cell(p.description)}{'' if p.read_only else ' (writable)'} |")
    return "\n".join(rows) + "\n"


def main() -> int:
    sys.stdout.write(markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
