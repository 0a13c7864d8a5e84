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

from .model.segmenter import CompressedSegmenter, ModelConfig, make_config

PACKAGE_CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"
DEFAULT_CHECKPOINT = PACKAGE_CHECKPOINT_DIR / "cvseg_improved.safetensors"
REQUIRED_KEYS = ("format", "classes", "palette", "input_size", "config")
FORMAT = "cvseg_ros/1"


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


def read_metadata(path: str | Path) -> dict:
    weights, meta_path = _paths(path)
    if not weights.exists():
        raise CheckpointError(f"checkpoint not found: {weights}")
    if not meta_path.exists():
        raise CheckpointError(f"{weights}: its metadata file {meta_path.name} is missing")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{meta_path}: not valid JSON ({exc})") from None
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise CheckpointError(f"{meta_path}: missing keys {missing}")
    if meta["format"] != FORMAT:
        raise CheckpointError(f"{meta_path}: format {meta['format']!r}, expected {FORMAT!r}")
    classes, palette = meta["classes"], meta["palette"]
    if not classes or len(palette) != len(classes) or any(len(c) != 3 for c in palette):
        raise CheckpointError(f"{meta_path}: {len(classes)} classes but a palette of {len(palette)} colours")
    if meta["config"].get("num_classes") != len(classes):
        raise CheckpointError(f"{meta_path}: config has {meta['config'].get('num_classes')} classes, "
                              f"metadata lists {len(classes)}")
    return meta


def load_checkpoint(path: str | Path | None = None, device: str | torch.device = "cpu"
                    ) -> tuple[CompressedSegmenter, dict]:
    """Build the model its metadata describes and load validated weights. Returns (model, metadata)."""
    weights, _ = _paths(path or DEFAULT_CHECKPOINT)
    meta = read_metadata(weights)
    cfg = dict(meta["config"])
    try:
        config = make_config(cfg.pop("name"), **cfg)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{weights}: bad model configuration ({exc})") from None
    model = CompressedSegmenter(config)
    expected = model.state_dict()
    state = {}
    try:
        with safe_open(str(weights), framework="pt") as f:
            names = set(f.keys())
            if names != set(expected):
                extra, missing = sorted(names - set(expected)), sorted(set(expected) - names)
                raise CheckpointError(f"{weights}: tensors do not match the '{config.name}' model "
                                      f"(unexpected {extra[:5]}, missing {missing[:5]})")
            for name in names:
                t = f.get_tensor(name)
                if t.shape != expected[name].shape:
                    raise CheckpointError(f"{weights}: {name} has shape {tuple(t.shape)}, "
                                          f"expected {tuple(expected[name].shape)}")
                if t.is_floating_point() and not torch.isfinite(t).all():
                    raise CheckpointError(f"{weights}: {name} holds non-finite values")
                state[name] = t
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
        raise CheckpointError(f"{weights}: not a readable safetensors file ({exc})") from None
    model.load_state_dict(state)
    return model.to(device).eval(), meta


def config_of(meta: dict) -> ModelConfig:
    cfg = dict(meta["config"])
    return make_config(cfg.pop("name"), **cfg)
