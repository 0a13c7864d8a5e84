"""Checkpoints: safetensors weights + JSON metadata, loaded with validation (never a pickle).

``<name>.safetensors`` holds the tensors; ``<name>.json`` holds classes, palette, input size, the
model configuration, and how it was made (command, data hashes). Loading checks the metadata, the
class count against the palette and the classifier, every tensor's name and shape against the
model the configuration builds, and that all values are finite.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cvseg_ros.model.segmenter import CONFIGS, CompressedSegmenter, ModelConfig

PACKAGE_CHECKPOINT_DIR = Path(__file__).resolve().parents[1] / "checkpoints"
DEFAULT_CHECKPOINT = PACKAGE_CHECKPOINT_DIR / "cvseg_improved.safetensors"
REQUIRED_KEYS = ("format", "classes", "palette", "input_size", "config")
FORMAT = "cvseg_ros/1"
MAX_CLASSES = 255
MAX_METADATA_BYTES = 1 << 20      # a checkpoint's JSON is a few kB
MAX_WEIGHTS_BYTES = 1 << 30       # the shipped weights are a few MB
#: the largest magnitude a tensor of a trained model may hold (the shipped ones: below 20); larger
#: finite values (e.g. 3e38 in a classifier) would make every mask one class
MAX_MAGNITUDE = 1e4
#: how the engine runs a checkpoint unless told otherwise; a checkpoint's metadata may set them
#: (``"inference": {...}``), as measured on the held-out check (see :func:`inference_defaults`):
#: whether the P-frame branch runs; the work height (frames taller than it are scaled to it;
#: 0: the height of the checkpoint's ``input_size``)
INFERENCE_DEFAULTS = {"p_frame_branch": True, "work_height": 0}


#: names the tools and the node take instead of a checkpoint path -> the shipped file they mean
CHECKPOINT_ALIASES = {"fast": "cvseg_improved", "accurate": "cvseg_improved_espnetv2"}
#: every name :func:`resolve_checkpoint` takes instead of a path
CHECKPOINT_NAMES = ("auto", *CHECKPOINT_ALIASES)


CHECKPOINT_HELP = ("fast (ENet I-frame network), accurate (ESPNetv2), auto (accurate on CUDA, fast on the "
                   "CPU; the default) or a .safetensors path")


def resolve_checkpoint(spec: str | Path | None = None, device: str | torch.device = "cpu") -> Path:
    """The checkpoint file ``spec`` names: ``fast`` (ENet I-frame network), ``accurate`` (ESPNetv2),
    ``auto``, empty or None (``accurate`` on CUDA, ``fast`` on a CPU), or a path (``./fast`` for a
    file of that name)."""
    text = str(spec).strip() if spec else "auto"
    if text == "auto":
        text = "accurate" if torch.device(device).type == "cuda" else "fast"
    if text in CHECKPOINT_ALIASES:
        return PACKAGE_CHECKPOINT_DIR / f"{CHECKPOINT_ALIASES[text]}.safetensors"
    return Path(text)


def checkpoint_argument(spec: str | Path) -> str:
    """``spec`` as another process (a node) takes it: a name of :func:`resolve_checkpoint` as it
    is, a path made absolute."""
    text = str(spec).strip()
    return text if text in CHECKPOINT_NAMES else str(Path(text).expanduser().resolve())


def checkpoint_name(model: str, i_frame_network: str = "enet") -> str:
    """The file name (without suffix) ``cvseg train`` exports a model configuration as:
    ``cvseg_<model>`` with the ENet I-frame network, ``cvseg_<model>_<network>`` with another."""
    return f"cvseg_{model}" if i_frame_network == "enet" else f"cvseg_{model}_{i_frame_network}"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says which file and why."""


def _paths(path: str | Path) -> tuple[Path, Path]:
    path = Path(path)
    if path.suffix == ".json":
        path = path.with_suffix(".safetensors")
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: checkpoints are .safetensors files (+ .json metadata); "
                              f"pickled PyTorch files are not loaded")
    return path, path.with_suffix(".json")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(model: CompressedSegmenter, path: str | Path, *, classes: list[str],
                    palette: np.ndarray, input_size: tuple[int, int], extra: dict | None = None) -> Path:
    """Write ``path`` (.safetensors) and its .json metadata."""
    weights, meta_path = _paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().cpu().contiguous() if v.is_floating_point() else v.detach().cpu().contiguous()
               for k, v in model.state_dict().items()}
    save_file(tensors, str(weights))
    meta = {
        "format": FORMAT,
        "classes": list(classes),
        "palette": np.asarray(palette, dtype=np.uint8).tolist(),
        "input_size": list(input_size),
        "config": model.config.to_dict(),
        "weights_sha256": file_sha256(weights),
    }
    meta.update(extra or {})
    meta_path.write_text(json.dumps(meta, indent=2))
    return weights


def inference_defaults(meta: dict) -> dict:
    """How the engine runs this checkpoint unless told otherwise: :data:`INFERENCE_DEFAULTS`
    updated with the metadata's ``inference`` object (checked by :func:`read_metadata`)."""
    return {**INFERENCE_DEFAULTS, **(meta.get("inference") or {})}


def set_inference_defaults(path: str | Path, **defaults) -> Path:
    """Record ``defaults`` (names of :data:`INFERENCE_DEFAULTS`) in a checkpoint's metadata, as a
    held-out measurement decided; the weights are untouched. Returns the .json path."""
    weights, meta_path = _paths(path)
    meta = read_metadata(weights)
    meta["inference"] = {**(meta.get("inference") or {}), **defaults}
    _check_metadata(meta, meta_path)
    meta_path.write_text(json.dumps(meta, indent=2))
    return meta_path


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_metadata(meta, meta_path: Path) -> None:
    """Types and ranges of the metadata fields (the file is untrusted input)."""
    def bad(message: str):
        raise CheckpointError(f"{meta_path}: {message}")

    if not isinstance(meta, dict):
        bad(f"expected a JSON object, got {type(meta).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        bad(f"missing keys {missing}")
    if meta["format"] != FORMAT:
        bad(f"format {meta['format']!r}, expected {FORMAT!r}")
    classes, palette = meta["classes"], meta["palette"]
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes):
        bad("'classes' must be a non-empty list of class names")
    if len(classes) > MAX_CLASSES:
        bad(f"{len(classes)} classes: at most {MAX_CLASSES} (id 255 means unknown)")
    if not isinstance(palette, list) or len(palette) != len(classes) or not all(
            isinstance(c, list) and len(c) == 3 and all(_is_int(v) and 0 <= v <= 255 for v in c)
            for c in palette):
        bad(f"{len(classes)} classes but the palette is not {len(classes)} RGB triples of 0..255 "
            f"({len(palette) if isinstance(palette, list) else type(palette).__name__})")
    size = meta["input_size"]
    if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) and 64 <= v <= 8192 for v in size)):
        bad(f"'input_size' must be [height, width] in pixels (64..8192), got {size!r}")
    config = meta["config"]
    if not isinstance(config, dict) or not isinstance(config.get("name"), str):
        bad("'config' must be an object with a model 'name'")
    if config.get("num_classes") != len(classes):
        bad(f"config has {config.get('num_classes')} classes, metadata lists {len(classes)}")
    for key, value in config.items():    # bounds that keep a hostile file from building a huge model
        ok = (isinstance(value, bool) or (_is_int(value) and 0 <= value <= 4096)
              or (isinstance(value, float) and math.isfinite(value) and abs(value) <= 1e6)
              or (isinstance(value, str) and len(value) <= 64))
        if not ok:
            bad(f"config value {key}={value!r} is out of bounds (flags, integers 0..4096, finite numbers, "
                f"short names)")
    digest = meta.get("weights_sha256")
    if digest is not None and not (isinstance(digest, str) and len(digest) == 64):
        bad(f"'weights_sha256' is not a SHA-256 hex digest: {digest!r}")
    inference = meta.get("inference", {})
    if not (isinstance(inference, dict) and all(k in INFERENCE_DEFAULTS and _inference_value_ok(k, v)
                                                for k, v in inference.items())):
        bad(f"'inference' must be an object of {sorted(INFERENCE_DEFAULTS)} (p_frame_branch a flag, "
            f"work_height 0 or 64..4096 and a multiple of 8), got {inference!r}")


def _inference_value_ok(key: str, value) -> bool:
    if key == "work_height":
        return type(value) is int and (value == 0 or (64 <= value <= 4096 and value % 8 == 0))
    return isinstance(value, bool)


def _regular_file(path: Path, what: str, limit: int) -> None:
    """``CheckpointError`` unless ``path`` is a regular file (symlinks followed) of at most ``limit``
    bytes: no directory, device, FIFO or socket is opened."""
    if not path.exists():
        raise CheckpointError(f"{what} not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"{what} {path} is not a regular file")
    size = path.stat().st_size
    if size > limit:
        raise CheckpointError(f"{what} {path} is {size} bytes: more than the {limit} a checkpoint's can be")


def read_metadata(path: str | Path) -> dict:
    weights, meta_path = _paths(resolve_checkpoint(path))
    _regular_file(weights, "checkpoint", MAX_WEIGHTS_BYTES)
    if not meta_path.exists():
        raise CheckpointError(f"{weights}: its metadata file {meta_path.name} is missing")
    _regular_file(meta_path, "metadata file", MAX_METADATA_BYTES)
    try:
        with open(meta_path, "rb") as f:
            meta = json.loads(f.read(MAX_METADATA_BYTES + 1).decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{meta_path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise CheckpointError(f"{meta_path}: JSON nested too deeply") from None
    except OSError as exc:
        raise CheckpointError(f"{meta_path}: cannot be read ({exc.strerror or exc})") from None
    _check_metadata(meta, meta_path)
    return meta


def load_checkpoint(path: str | Path | None = None, device: str | torch.device = "cpu"
                    ) -> tuple[CompressedSegmenter, dict]:
    """Build the model its metadata describes and load validated weights. Returns (model, metadata).
    ``path``: a file or a name :func:`resolve_checkpoint` takes (None: the device's default)."""
    weights, _ = _paths(resolve_checkpoint(path, device))
    meta = read_metadata(weights)
    try:
        config = config_of(meta)
        model = CompressedSegmenter(config)
    except Exception as exc:  # noqa: BLE001 - TypeError, ValueError, RuntimeError from the model
        raise CheckpointError(f"{weights}: bad model configuration ({type(exc).__name__}: {exc})") from None
    digest = meta.get("weights_sha256")
    if digest is not None and file_sha256(weights) != digest:
        raise CheckpointError(f"{weights}: its SHA-256 differs from the one in its metadata (truncated, "
                              f"modified, or not the file the metadata was written for)")
    expected = model.state_dict()
    state = {}
    try:
        with safe_open(str(weights), framework="pt") as f:
            names = set(f.keys())
            if names != set(expected):
                extra, missing = sorted(names - set(expected)), sorted(set(expected) - names)
                raise CheckpointError(f"{weights}: tensors do not match the '{config.name}' model "
                                      f"(unexpected {extra[:5]}, missing {missing[:5]})")
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in sorted(names)}
            wrong = [n for n in shapes if shapes[n] != tuple(expected[n].shape)]
            if wrong:
                k = config.num_classes
                hint = any(k in expected[n].shape and k not in shapes[n] for n in wrong)
                raise CheckpointError(
                    f"{weights}: {len(wrong)} tensor(s) do not have the '{config.name}' model's shapes, "
                    f"e.g. {wrong[0]} has shape {shapes[wrong[0]]}, expected {tuple(expected[wrong[0]].shape)}"
                    + (f" (the metadata lists {k} classes: the weights were made for another class count)"
                       if hint else ""))
            for name in sorted(names):
                t = f.get_tensor(name)
                if t.dtype != expected[name].dtype:
                    raise CheckpointError(f"{weights}: {name} is {t.dtype}, expected {expected[name].dtype}")
                if t.is_floating_point() and not torch.isfinite(t).all():
                    raise CheckpointError(f"{weights}: {name} holds non-finite values")
                if t.is_floating_point() and t.numel() and t.abs().max() > MAX_MAGNITUDE:
                    raise CheckpointError(f"{weights}: {name} holds values up to {t.abs().max().item():.3g}, "
                                          f"beyond the {MAX_MAGNITUDE:g} of a trained model's weights")
                state[name] = t
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
        raise CheckpointError(f"{weights}: not a readable safetensors file ({exc})") from None
    model.load_state_dict(state)
    return model.to(device).eval(), meta


def config_of(meta: dict) -> ModelConfig:
    """The model configuration a checkpoint's metadata stores. A field it lacks (written before the
    field existed) takes the dataclass default: what the model did before the field existed; but
    ``logits_state``, which the ``paper`` configuration's name implied before it was a field."""
    cfg = dict(meta["config"])
    name = cfg.pop("name")
    if name not in CONFIGS:
        raise ValueError(f"unknown model configuration {name!r}; choose from {sorted(CONFIGS)}")
    cfg.setdefault("logits_state", name == "paper")
    return ModelConfig(name=name, **cfg)
