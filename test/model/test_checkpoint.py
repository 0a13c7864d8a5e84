"""Safe checkpoint loading: safetensors + JSON metadata only, validated, one clear error, never a pickle."""
from __future__ import annotations

import json
import pickle
import random
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cvseg_ros.model.checkpoint import (DEFAULT_CHECKPOINT, CheckpointError, file_sha256, inference_defaults,
                                  load_checkpoint, read_metadata, resolve_checkpoint, save_checkpoint,
                                  set_inference_defaults)
from cvseg_ros.model.classes import CAMVID_CLASSES, CAMVID_PALETTE
from cvseg_ros.model.segmenter import CompressedSegmenter, make_config

DOMAIN = random.SystemRandom().randint(151, 160)   # ROS domain of the node start-up cases


def _save(model, path: Path, classes=CAMVID_CLASSES, palette=CAMVID_PALETTE) -> Path:
    return save_checkpoint(model, path, classes=list(classes), palette=palette, input_size=(360, 480))


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """A valid checkpoint written by :func:`save_checkpoint` (seeded random weights)."""
    torch.manual_seed(0)
    return _save(CompressedSegmenter(make_config("improved")), tmp_path_factory.mktemp("ck") / "good.safetensors")


def copy(good: Path, dst: Path) -> tuple[Path, Path]:
    weights = dst / "ck.safetensors"
    shutil.copy(good, weights)
    shutil.copy(good.with_suffix(".json"), weights.with_suffix(".json"))
    return weights, weights.with_suffix(".json")


def edit_meta(meta_path: Path, **changes) -> None:
    meta = json.loads(meta_path.read_text())
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    meta_path.write_text(json.dumps(meta))


def error_of(path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    return str(info.value)


def test_valid_checkpoints_load(good):
    model, meta = load_checkpoint(good)
    assert meta["classes"] == CAMVID_CLASSES and not model.training
    if DEFAULT_CHECKPOINT.exists():            # the shipped one passes the same checks
        _, shipped = load_checkpoint(DEFAULT_CHECKPOINT)
        assert len(shipped["classes"]) == len(shipped["palette"])


def test_truncated_weights(good, tmp_path):
    weights, meta = copy(good, tmp_path)
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert "SHA-256 differs" in error_of(weights)
    edit_meta(meta, weights_sha256=None)       # without the digest: safetensors itself refuses it
    assert "not a readable safetensors file" in error_of(weights)
    weights.write_bytes(b"")
    assert "not a readable safetensors file" in error_of(weights)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights(tmp_path, value):
    torch.manual_seed(0)
    model = CompressedSegmenter(make_config("improved"))
    with torch.no_grad():
        next(model.mv_cnn.parameters()).view(-1)[3] = value
    path = _save(model, tmp_path / "bad.safetensors")
    message = error_of(path)
    assert "non-finite" in message and "mv_cnn." in message


def test_wrong_shapes(tmp_path):
    """Weights of a model with 32 hidden channels, metadata saying 24."""
    path = _save(CompressedSegmenter(make_config("improved", hidden_channels=32)), tmp_path / "w.safetensors")
    meta = json.loads(path.with_suffix(".json").read_text())
    edit_meta(path.with_suffix(".json"), config=dict(meta["config"], hidden_channels=24))
    message = error_of(path)
    assert "has shape" in message and "expected" in message


def test_class_count_mismatches(good, tmp_path):
    # the weights were trained for 12 classes, the metadata lists 11
    twelve = CAMVID_CLASSES + ["Extra"]
    palette12 = CAMVID_PALETTE.tolist() + [[1, 2, 3]]
    path = _save(CompressedSegmenter(make_config("improved", num_classes=12)), tmp_path / "c12.safetensors",
                 twelve, palette12)
    meta = json.loads(path.with_suffix(".json").read_text())
    edit_meta(path.with_suffix(".json"), classes=CAMVID_CLASSES, palette=CAMVID_PALETTE.tolist(),
              config=dict(meta["config"], num_classes=11))
    assert "11 classes" in error_of(path)
    # inside the metadata: classes vs palette, classes vs config
    weights, meta_path = copy(good, tmp_path)
    edit_meta(meta_path, palette=CAMVID_PALETTE.tolist()[:-1])
    assert "palette" in error_of(weights)
    weights, meta_path = copy(good, tmp_path)
    edit_meta(meta_path, classes=twelve, palette=palette12)
    assert "config has 11 classes, metadata lists 12" in error_of(weights)


def test_missing_files_and_pickles_are_refused(good, tmp_path, monkeypatch):
    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load must never be called on a checkpoint")
    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    weights, meta_path = copy(good, tmp_path)
    meta_path.unlink()
    assert "metadata file ck.json is missing" in error_of(weights)
    assert "checkpoint not found" in error_of(tmp_path / "nothing.safetensors")
    pt = tmp_path / "model.pt"
    pt.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    assert "pickled PyTorch files are not loaded" in error_of(pt)


class _Tripwire:
    """Unpickling this would create a file: proof that nothing is ever unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_named_safetensors_is_never_unpickled(good, tmp_path):
    marker = tmp_path / "unpickled"
    weights, meta_path = copy(good, tmp_path)
    weights.write_bytes(pickle.dumps(_Tripwire(marker)))
    edit_meta(meta_path, weights_sha256=file_sha256(weights))
    assert "not a readable safetensors file" in error_of(weights)
    assert not marker.exists()


BAD_METADATA = [
    pytest.param("[1, 2]", "expected a JSON object", id="not-an-object"),
    pytest.param("{not json", "not valid JSON", id="not-json"),
    pytest.param({"format": None}, "missing keys", id="missing-key"),
    pytest.param({"format": "other/9"}, "format 'other/9'", id="wrong-format"),
    pytest.param({"classes": "Sky"}, "'classes' must be", id="classes-not-a-list"),
    pytest.param({"classes": []}, "'classes' must be", id="no-classes"),
    pytest.param({"palette": [[300, 0, 0]] * 11}, "RGB triples", id="palette-out-of-range"),
    pytest.param({"input_size": [0, 0]}, "input_size", id="input-size"),
    pytest.param({"input_size": [8, 8]}, "input_size", id="input-size-tiny"),
    pytest.param("[" * 100000 + "]" * 100000, "nested too deeply", id="deeply-nested"),
    pytest.param({"config": "improved"}, "'config' must be", id="config-not-an-object"),
    pytest.param({"config": {"name": "improved", "num_classes": 11, "hidden_channels": 10**9}},
                 "out of bounds", id="config-memory-bomb"),
    pytest.param({"config": {"name": "improved", "num_classes": 11, "bogus": 3}}, "bad model configuration",
                 id="config-unknown-key"),
    pytest.param({"config": {"name": "nope", "num_classes": 11}}, "bad model configuration", id="config-name"),
    pytest.param({"weights_sha256": 5}, "SHA-256", id="digest-type"),
    pytest.param({"inference": {"p_frame_branch": "no"}}, "'inference' must be", id="inference-not-a-flag"),
    pytest.param({"inference": {"turbo": True}}, "'inference' must be", id="inference-unknown-key"),
]


@pytest.mark.parametrize("change,needle", BAD_METADATA)
def test_bad_metadata_gives_one_clear_error(good, tmp_path, change, needle):
    weights, meta_path = copy(good, tmp_path)
    if isinstance(change, str):
        meta_path.write_text(change)
    else:
        edit_meta(meta_path, **change)
    message = error_of(weights)
    assert needle in message and str(tmp_path) in message, message


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_files_load_or_fail_with_a_checkpoint_error(good, tmp_path_factory, data):
    """Bytes of the weights (header and tensors) or of the metadata flipped / cut at random: the
    result is a loaded model or a :class:`CheckpointError`, never another exception."""
    weights, meta_path = copy(good, tmp_path_factory.mktemp("fuzz"))
    edit_meta(meta_path, weights_sha256=None)
    target = data.draw(st.sampled_from([weights, meta_path]))
    raw = bytearray(target.read_bytes())
    header = int.from_bytes(raw[:8], "little") + 8 if target == weights else len(raw)
    span = min(header, len(raw)) if data.draw(st.booleans()) else len(raw)
    for _ in range(data.draw(st.integers(1, 8))):
        where = data.draw(st.integers(0, span - 1))
        raw[where] ^= 1 << data.draw(st.integers(0, 7))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    target.write_bytes(bytes(raw))
    try:
        load_checkpoint(weights)
    except CheckpointError:
        pass


@pytest.mark.parametrize("kind", ["pickle", "nan"])
def test_node_refuses_a_bad_checkpoint_at_start_up_with_one_message(tmp_path, kind):
    pytest.importorskip("rclpy", reason="rclpy is not importable (ROS 2 wheels missing)")
    from ros_helpers import REPO, env_for, node_cmd
    if kind == "pickle":
        path = tmp_path / "model.pt"
        path.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
        needle = "pickled PyTorch files are not loaded"
    else:
        torch.manual_seed(0)
        model = CompressedSegmenter(make_config("improved"))
        with torch.no_grad():
            next(model.parameters()).view(-1)[0] = float("nan")
        path = _save(model, tmp_path / "nan.safetensors")
        needle = "non-finite"
    proc = subprocess.run(node_cmd("-p", f"checkpoint:={path}"), env=env_for(DOMAIN), capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    errors = [line for line in out.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and needle in errors[0] and "cannot start the segmentation engine" in errors[0], out
    assert "Traceback" not in out


def test_read_metadata_checks_without_building_a_model(good, tmp_path):
    weights, meta_path = copy(good, tmp_path)
    assert read_metadata(weights)["format"] == "cvseg_ros/1"
    edit_meta(meta_path, input_size=[360])
    with pytest.raises(CheckpointError, match="input_size"):
        read_metadata(weights)


@pytest.mark.parametrize("kind", ["dev-zero", "fifo", "directory"])
def test_special_files_are_refused_without_being_read(good, tmp_path, kind):
    """A checkpoint or metadata path that is a device, a FIFO or a directory gets one message at
    once: nothing reads /dev/zero until memory runs out, or waits on a FIFO's writer."""
    import os
    for target in ("weights", "metadata"):
        folder = tmp_path / target
        folder.mkdir()
        weights, meta_path = copy(good, folder)
        victim = weights if target == "weights" else meta_path
        victim.unlink()
        if kind == "dev-zero":
            victim.symlink_to("/dev/zero")
        elif kind == "fifo":
            os.mkfifo(victim)
        else:
            victim.mkdir()
        message = error_of(weights)
        assert "is not a regular file" in message and str(victim) in message, message


def test_absurd_but_finite_weights_are_refused(good, tmp_path):
    from safetensors.torch import load_file, save_file
    weights, meta_path = copy(good, tmp_path)
    tensors = load_file(str(weights))
    name = next(k for k in tensors if k.endswith("head.out.weight") or k.endswith(".weight"))
    tensors[name][0] = 3e38
    save_file(tensors, str(weights))
    edit_meta(meta_path, weights_sha256=file_sha256(weights))
    message = error_of(weights)
    assert name in message and "3e+38" in message, message


def test_inference_defaults_recorded_in_the_metadata_steer_the_engine(good, tmp_path):
    """``set_inference_defaults`` writes the choice into the JSON (the weights and their digest
    untouched); the engine follows it unless told otherwise. The shipped checkpoints (the
    held-out check's choices, README): the branch on for ``fast``, off for ``accurate``, which
    works at 512 rows (``fast`` at its 360-row input size)."""
    from cvseg_ros.engine.pipeline import SegmentationEngine
    weights, meta_path = copy(good, tmp_path)
    assert inference_defaults(read_metadata(weights)) == {"p_frame_branch": True, "work_height": 0}
    digest = file_sha256(weights)
    set_inference_defaults(weights, p_frame_branch=False)
    assert json.loads(meta_path.read_text())["inference"] == {"p_frame_branch": False}
    assert file_sha256(weights) == digest
    model, meta = load_checkpoint(weights)
    engines = {given: SegmentationEngine(model=model, metadata=meta, device="cpu", p_frame_branch=given)
               for given in (None, True, False)}
    assert {given: e.p_frame_branch for given, e in engines.items()} == {None: False, True: True, False: False}
    assert engines[None].work_size(720, 1280) == (360, 640)
    set_inference_defaults(weights, work_height=512)
    engine = SegmentationEngine(model=model, metadata=read_metadata(weights), device="cpu")
    assert engine.work_size(720, 1280) == (512, 912) and engine.work_size(360, 480) == (360, 480)
    for bad in ({"p_frame_branch": 1}, {"work_height": 500}, {"work_height": True}, {"work_height": 8192}):
        with pytest.raises(CheckpointError, match="'inference' must be"):
            set_inference_defaults(weights, **bad)
    shipped = {name: inference_defaults(read_metadata(resolve_checkpoint(name))) for name in ("fast", "accurate")}
    assert shipped == {"fast": {"p_frame_branch": True, "work_height": 0},
                       "accurate": {"p_frame_branch": False, "work_height": 512}}
