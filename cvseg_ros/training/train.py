"""`cvseg train`: train the model and export the checkpoint the package ships.

One script, config overrides on the command line (``cvseg train --i_steps=400 --models=paper``),
a progress bar, resumable training state, and DDP under ``torchrun`` (gloo on CPU, nccl on GPU):
``torchrun --nproc_per_node 2 -m cvseg_ros.training.train --out=runs/ddp``.

Loss (the paper's Eq. 1): cross-entropy on the I-frame plus on every P-frame of a group. It is
optimised in two stages over the same model:

1. ``iframe``: the I-frame network (``i_frame_network``: ENet or ESPNetv2, initialised from its
   converted Cityscapes weights, the classifier remapped to CamVid) on CamVid train stills with
   human labels (the I-frame term) and the Cityscapes teachers' outputs (``teachers``), then mixed
   with that initialisation (``i_mix``);
2. ``pframe``: the P-frame branch (both CNNs, the ConvLSTM, the heads) on groups of real H.264
   (CamVid stills given camera motion + teacher-labelled dashcam clips), the I-frame network
   frozen (its term is then constant), for each configuration in ``models``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from cvseg_ros.common.paths import REPO_ROOT, shared_data_dir
from cvseg_ros.training.distributed import Dist, load_train_state, save_train_state
from cvseg_ros.training.ensemble import ENET_FILE, ESPNETV2_FILE
from cvseg_ros.training.loss import GroupLoss, class_weights
from cvseg_ros.model.checkpoint import (PACKAGE_CHECKPOINT_DIR, checkpoint_name, file_sha256, resolve_checkpoint,
                                        save_checkpoint)
from cvseg_ros.model.classes import CAMVID_CLASSES, CAMVID_PALETTE
from cvseg_ros.training.data import (DEBLOCK_P_FRAMES, HELD_OUT_CLIPS, IGNORE, RESIDUAL_STRIDE, Group,
                                     camvid_pairs, clip_groups, files_digest, load_camvid,
                                     still_groups)
from cvseg_ros.model.segmenter import CompressedSegmenter, make_config

NUM_CLASSES = len(CAMVID_CLASSES)
#: version of the cached training groups (part of their cache key): bump when the reader's
#: output changes (2: intra cells get their neighbours' motion; 3: the intra cells are kept;
#: 4: the residual at half size; 5: P-frames decoded without the deblocking filter; 6: + luma cells)
GROUPS_FORMAT = 6


@dataclass
class TrainConfig:
    data: str = str(shared_data_dir())       # ../shared/data
    out: str = "runs/train"                  # training state, logs
    export_dir: str = str(PACKAGE_CHECKPOINT_DIR)  # where cvseg_<model>.safetensors go ("" = don't export)
    p_frame_branch: bool = True              # the exported checkpoints' default (metadata "inference"):
                                             # false where the held-out check finds warping alone better
    stages: str = "iframe,pframe"
    models: str = "improved,paper"
    seed: int = 0
    threads: int = 0                         # 0 = all cores
    precision: str = "bf16"                  # bf16 autocast (CPU with AMX / GPU) or fp32
    device: str = "auto"
    input_size: str = "360x480"              # h x w of CamVid; the reference size in the checkpoint
    work_height: int = 0                     # the exported checkpoints' work height (metadata
                                             # "inference"; 0: input_size's): taller frames are scaled to it
    # stage 1: I-frame network
    i_steps: int = 1500
    i_batch: int = 8
    i_crop: str = "256x320"
    i_lr: float = 1e-3
    i_limit: int = 0                         # use only the first N stills (0 = all)
    leave_out: str = ""                      # CamVid sequences whose stills no stage uses, comma-separated
                                             # (e.g. 0006R0: the leave-one-sequence-out check)
    i_compressed: float = 0.7                # share of samples taken from H.264-decoded copies
    i_frame_network: str = "enet"            # enet (the fast checkpoints) | espnetv2 (the accurate one);
                                             # exported as cvseg_<model> / cvseg_<model>_<network>
    teacher_init: bool = True                # initialise from that network's Cityscapes weights
    distill: float = 1.0                     # weight of the teachers' distillation term (0 = labels only)
    teachers: str = "enet"                   # the Cityscapes teachers distilled: enet, espnetv2 (comma-separated)
    i_mix: float = 1.0                       # stage 2's I-frame network: i_mix x the trained weights +
                                             # (1 - i_mix) x the Cityscapes initialisation (1 = trained only)
    init_from: str = ""                      # an exported checkpoint (fast | accurate | path) whose I-frame
                                             # network replaces stage 1's training and whose P-frame branch
                                             # stage 2 continues from (p_steps=0: kept as it is)
    distill_batch: int = 4                   # unlabelled driving frames per step (distillation only)
    distill_frame_step: int = 2              # every N-th frame of the training clips
    # stage 2: P-frame branch
    accumulate: bool = True                  # improved model: warp along the accumulated motion
    improved_config: str = ""                # more improved-model settings, "key=value,key=value"
                                             # (fields of cvseg_ros.model.segmenter.ModelConfig)
    p_steps: int = 700
    p_batch: int = 4
    p_lr: float = 3e-3
    group_length: int = 12
    p_limit: int = 0                         # use only the first N stills for groups (0 = all)
    clip_labels: str = "iframe_net"          # pseudo-labels of the clip groups: "iframe_net" (stage 1's
                                             # teacher-initialised network, what P-frames should match) | "teacher"
    clip_groups_per_clip: int = 0            # cap per dashcam clip (0 = no cap)
    clip_frame_step: int = 2                 # 25 fps clips -> 12.5 fps groups (CamVid val is 15 fps)
    clip_stride: int = 6                     # source frames between group starts
    clip_confidence: float = 0.5             # pseudo-labels below this softmax score are ignored
    use_clips: bool = True
    held_out_clips: str = ",".join(HELD_OUT_CLIPS)   # clips left out of training (``cvseg heldout``)
    save_every: int = 100


def parse_overrides(argv: list[str], config: TrainConfig) -> TrainConfig:
    """``--key=value`` (or ``--key value``) overrides of :class:`TrainConfig` fields."""
    types = {f.name: f.type for f in fields(config)}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}: use --key=value")
        key, _, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if not _:
            i += 1
            if i >= len(argv):
                raise ValueError(f"--{key} needs a value")
            value = argv[i]
        if key not in types:
            raise ValueError(f"unknown setting --{key}; settings: {', '.join(types)}")
        current = getattr(config, key)
        if isinstance(current, bool):
            parsed = value.lower() in ("1", "true", "yes", "on")
        else:
            parsed = type(current)(value)
        setattr(config, key, parsed)
        i += 1
    return config


def _model_overrides(text: str) -> dict:
    """"state_stride=8,warp=false" -> {"state_stride": 8, "warp": False} (types of ModelConfig)."""
    from cvseg_ros.model.segmenter import ModelConfig
    types = {f.name: f.type for f in fields(ModelConfig)}
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in types or key in ("name", "num_classes"):
            raise ValueError(f"bad model setting {item!r}: use key=value with a key from "
                             f"{', '.join(k for k in types if k not in ('name', 'num_classes'))}")
        value = value.strip()
        out[key] = value.lower() in ("1", "true", "yes", "on") if types[key] in (bool, "bool") else int(value)
    return out


def _size(text: str) -> tuple[int, int]:
    h, w = text.lower().split("x")
    return int(h), int(w)


def cosine_lr(step: int, total: int, base: float, warmup: int = 50) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


class Trainer:
    def __init__(self, config: TrainConfig) -> None:
        from cvseg_ros.engine.runtime import resolve_device
        self.cfg = config
        self.device = resolve_device(config.device)
        torch.set_num_threads(config.threads or os.cpu_count() or 1)
        self.dist = Dist(self.device)
        self.out = Path(config.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.data = Path(config.data)
        if not (self.data / "camvid" / "train").is_dir():
            raise FileNotFoundError(f"training data not found: {self.data}/camvid/train (see ../shared/data/README.md)")
        self.rng = np.random.default_rng(config.seed + 1000 * self.dist.rank)
        torch.manual_seed(config.seed)
        self.use_bf16 = config.precision == "bf16"
        images, labels = load_camvid(self.data / "camvid" / "train", self.data / "camvid" / "trainannot",
                                     leave_out=[s.strip() for s in config.leave_out.split(",") if s.strip()])
        self.images, self.labels = images, labels
        self.weights = class_weights(labels).to(self.device)
        self.teacher_path = self.data / ENET_FILE
        self.log = open(self.out / "log.txt", "a") if self.dist.main else None

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16)

    def note(self, text: str) -> None:
        if self.log:
            self.log.write(text + "\n")
            self.log.flush()

    def after_step(self, step: int, total: int, loss: torch.Tensor, losses: list[float], bar, label: str,
                   state_path: Path, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Progress bar, log line every 20 steps, resumable state every ``save_every`` steps and at the end."""
        losses.append(loss.item())
        recent = float(np.mean(losses[-20:]))
        bar.update(1)
        bar.set_postfix(loss=f"{recent:.3f}")
        if step % 20 == 0:
            self.note(f"{label} step {step} loss {recent:.4f}")
        if self.dist.main and (step % self.cfg.save_every == 0 or step == total):
            save_train_state(state_path, module, optimizer, step)

    # -- stage 1 ---------------------------------------------------------------------------------
    def training_clips(self) -> list[Path]:
        """The dashcam clips of the data but the held-out ones (MPEG-4 Part 2 ones too: re-encoded)."""
        held_out = {c.strip() for c in self.cfg.held_out_clips.split(",")}
        return sorted(c for c in (self.data / "clips").glob("*.mp4") if c.name not in held_out)

    def init_weights_path(self) -> Path:
        """The Cityscapes weights the I-frame network starts from (those of its network)."""
        return self.teacher_path if self.cfg.i_frame_network == "enet" else self.data / ESPNETV2_FILE

    def i_frame_path(self) -> Path:
        return self.out / "iframe_net.safetensors"

    def train_iframe(self) -> None:
        from cvseg_ros.training.i_frame_stage import train_i_frame
        self.i_losses = train_i_frame(self)

    # -- stage 2 ---------------------------------------------------------------------------------
    def build_groups(self) -> list[Group]:
        cfg = self.cfg
        key = (f"v{GROUPS_FORMAT}_L{cfg.group_length}_n{cfg.p_limit}_{cfg.leave_out}_{cfg.use_clips}_{cfg.held_out_clips}_{cfg.clip_labels}_"
               f"{cfg.clip_groups_per_clip}_{cfg.clip_frame_step}_{cfg.clip_stride}_{cfg.clip_confidence}_s{cfg.seed}")
        if cfg.use_clips and cfg.clip_labels == "iframe_net":   # the clips' labels come from stage 1's network
            key += "_" + file_sha256(self.i_frame_path())
        cache = self.out / f"groups_{hashlib.sha256(key.encode()).hexdigest()[:12]}.npz"
        if cache.exists():
            z = np.load(cache)
            return [Group(z[f"rgb{i}"], z[f"mv{i}"], z[f"res{i}"], z[f"lab{i}"], z[f"intra{i}"], z[f"luma{i}"])
                    for i in range(int(z["n"]))]
        images, labels = self.images, self.labels
        if cfg.p_limit:
            images, labels = images[: cfg.p_limit], labels[: cfg.p_limit]
        groups = still_groups(images, labels, cfg.group_length, seed=cfg.seed, progress=self.dist.main)
        if cfg.use_clips:
            groups += clip_groups(self.training_clips(), self.clip_labeller(), cfg.group_length, _size(cfg.input_size),
                                  frame_step=cfg.clip_frame_step, stride=cfg.clip_stride,
                                  max_groups_per_clip=cfg.clip_groups_per_clip, progress=self.dist.main)
        arrays = {"n": np.array(len(groups))}
        for i, g in enumerate(groups):
            arrays.update({f"rgb{i}": g.rgb, f"mv{i}": g.motion_vectors, f"res{i}": g.residuals, f"lab{i}": g.labels,
                           f"intra{i}": g.intra, f"luma{i}": g.luma})
        if self.dist.main:
            np.savez(cache, **arrays)
        return groups

    def clip_labeller(self):
        """rgb -> CamVid ids for the unlabelled clips: the stage-1 network or the raw teacher."""
        if self.cfg.clip_labels == "teacher":
            from cvseg_ros.training.teacher import Teacher
            return Teacher(self.teacher_path).predict_camvid
        if self.cfg.clip_labels != "iframe_net":
            raise ValueError(f"clip_labels must be 'iframe_net' or 'teacher', not {self.cfg.clip_labels!r}")
        from cvseg_ros.model.i_frame import IFrameNet
        net = IFrameNet(NUM_CLASSES, self.cfg.i_frame_network)
        net.load_state_dict(load_file(str(self.i_frame_path())))
        net.to(self.device).eval()

        @torch.inference_mode()
        def label(rgb: np.ndarray) -> np.ndarray:
            x = torch.from_numpy(rgb).to(self.device).permute(2, 0, 1)[None].float() / 255
            prob = net(x)[1].softmax(dim=1)[0]
            score, ids = prob.max(dim=0)
            ids[score < self.cfg.clip_confidence] = IGNORE
            return ids.to(torch.uint8).cpu().numpy()
        return label

    def i_frame_outputs(self, model: CompressedSegmenter, groups: list[Group]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """z(I) and H/4-pooled logits of every group's I-frame (the I-frame network is frozen)."""
        from tqdm import tqdm
        outs = []
        model.eval()
        with torch.inference_mode():
            for g in tqdm(groups, desc="I-frame features", disable=not self.dist.main):
                x = torch.from_numpy(g.rgb).to(self.device).permute(2, 0, 1)[None].float() / 255
                z, _, quarter = model.i_frame_net(x, quarter=True)
                outs.append((z[0].half(), quarter[0].half()))
        return outs

    def train_pframe(self, name: str, groups: list[Group]) -> CompressedSegmenter:
        from tqdm import tqdm
        cfg = self.cfg
        # (luma matching corrects the accumulated motion: none without it)
        extra = {"accumulate": cfg.accumulate, **({} if cfg.accumulate else {"luma_matching": False}),
                 **_model_overrides(cfg.improved_config)} if name == "improved" else {}
        config = make_config(name, NUM_CLASSES, i_frame_network=cfg.i_frame_network, **extra)
        if config.residual_stride != RESIDUAL_STRIDE or config.deblock_p_frames != DEBLOCK_P_FRAMES:
            raise ValueError(f"{name}: residual_stride={config.residual_stride}, deblock_p_frames="
                             f"{config.deblock_p_frames}, but the training groups hold the residual at "
                             f"1/{RESIDUAL_STRIDE} of the frame size with deblock_p_frames={DEBLOCK_P_FRAMES}")
        model = CompressedSegmenter(config).to(self.device)
        if cfg.init_from:
            self._branch_from(model, cfg.init_from)
        model.i_frame_net.load_state_dict(load_file(str(self.i_frame_path())))
        for p in model.i_frame_net.parameters():
            p.requires_grad_(False)
        i_out = self.i_frame_outputs(model, groups)
        model.train()
        model.i_frame_net.eval()
        loss_module = self.dist.wrap(GroupLoss(model, self.weights))
        optimizer = torch.optim.AdamW(model.p_frame_parameters(), lr=cfg.p_lr, weight_decay=1e-4)
        state_path = self.out / f"pframe_{name}_state.safetensors"
        step = load_train_state(state_path, model, optimizer) if state_path.exists() else 0
        bar = tqdm(total=cfg.p_steps, initial=step, desc=f"stage 2: P-frame branch ({name})", disable=not self.dist.main)
        losses = []
        while step < cfg.p_steps:
            idx = self.rng.integers(0, len(groups), cfg.p_batch)
            flip = self.rng.random() < 0.5
            batch = collate([groups[i] for i in idx], [i_out[i] for i in idx], flip, self.device)
            for g in optimizer.param_groups:
                g["lr"] = cosine_lr(step, cfg.p_steps, cfg.p_lr)
            with self.autocast():
                loss = loss_module(*batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.p_frame_parameters(), 5.0)
            optimizer.step()
            step += 1
            self.after_step(step, cfg.p_steps, loss, losses, bar, f"pframe {name}", state_path, model, optimizer)
        bar.close()
        self.p_losses = losses
        return model.eval()

    @staticmethod
    def _branch_from(model: CompressedSegmenter, spec: str) -> None:
        """The P-frame branch of the exported checkpoint ``spec`` (same model configuration)."""
        from cvseg_ros.model.checkpoint import load_checkpoint
        source, _ = load_checkpoint(spec)
        if source.config != model.config:
            raise ValueError(f"init_from={spec}: its model configuration differs from this run's "
                             f"({source.config} against {model.config})")
        model.load_state_dict(source.state_dict())

    def _distilled_from(self) -> list[str]:
        from cvseg_ros.training.i_frame_stage import TEACHERS_FILE
        path = self.out / TEACHERS_FILE
        return json.loads(path.read_text()) if path.is_file() and self.cfg.distill else []

    def export(self, model: CompressedSegmenter, name: str) -> Path | None:
        if not self.cfg.export_dir or not self.dist.main:
            return None
        clips = self.training_clips()
        meta = {
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": "cvseg train " + " ".join(shlex.quote(a) for a in sys.argv[2:] if a != "train")
                       if sys.argv[1:2] == ["train"] else " ".join(shlex.quote(a) for a in sys.argv),
            "train_config": asdict(self.cfg),
            "data": {
                "camvid_train": files_digest([p for p, _ in camvid_pairs(self.data / "camvid" / "train",
                                                                          self.data / "camvid" / "trainannot")]),
                "clips": files_digest(clips),
                "teacher_sha256": file_sha256(self.teacher_path) if self.teacher_path.exists() else None,
            },
            "distilled_from": self._distilled_from(),
            "i_frame": {"mix": self.cfg.i_mix,
                        "from": (file_sha256(resolve_checkpoint(self.cfg.init_from)) if self.cfg.init_from else None)},
            "git_commit": _git_commit(),
            "torch": torch.__version__,
        }
        path = Path(self.cfg.export_dir) / f"{checkpoint_name(name, self.cfg.i_frame_network)}.safetensors"
        inference = {}
        if not self.cfg.p_frame_branch and model.config.accumulate:   # the paper's model needs its branch
            inference["p_frame_branch"] = False
        if self.cfg.work_height:
            inference["work_height"] = self.cfg.work_height
        if inference:
            meta["inference"] = inference
        return save_checkpoint(model, path, classes=CAMVID_CLASSES, palette=CAMVID_PALETTE,
                               input_size=_size(self.cfg.input_size), extra=meta)

    def run(self) -> dict[str, Path | None]:
        stages = [s.strip() for s in self.cfg.stages.split(",") if s.strip()]
        exported = {}
        if "iframe" in stages:
            self.train_iframe()
        if "pframe" in stages:
            if not self.i_frame_path().exists():
                raise FileNotFoundError(f"{self.i_frame_path()} missing: run the iframe stage first")
            groups = self.build_groups() if self.cfg.p_steps else []   # nothing to train on
            for name in [m.strip() for m in self.cfg.models.split(",") if m.strip()]:
                model = self.train_pframe(name, groups)
                exported[name] = self.export(model, name)
                self.dist.barrier()
        self.dist.close()
        return exported


def collate(groups: list[Group], i_out, flip: bool, device: torch.device):
    z = torch.stack([o[0] for o in i_out]).float()
    seg = torch.stack([o[1] for o in i_out]).float()
    mvs = torch.from_numpy(np.stack([g.motion_vectors for g in groups]).astype(np.float32))
    res = torch.from_numpy(np.stack([g.residuals for g in groups])).float().unsqueeze(2) / 255.0
    lab = torch.from_numpy(np.stack([g.labels for g in groups])).long()
    intra = torch.from_numpy(np.stack([g.intra for g in groups])).float().unsqueeze(2)
    luma = torch.from_numpy(np.stack([g.luma for g in groups])).float().unsqueeze(2)
    if flip:
        z, seg, res, lab, intra, luma = (t.flip(-1) for t in (z, seg, res, lab, intra, luma))
        mvs = mvs.flip(-1)
        mvs[:, :, 0] = -mvs[:, :, 0]
    return tuple(t.to(device) for t in (z, seg, mvs, res, lab, intra, luma))


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=REPO_ROOT).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def register(sub) -> None:
    p = sub.add_parser("train", help="train the model (config overrides: --key=value) and export checkpoints",
                       description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("--show-config", action="store_true", help="print the settings (and overrides) and exit")
    p.epilog = "Settings are given as --key=value; --show-config lists them."
    p.set_defaults(func=_main, takes_overrides=True, overrides=[])


def _main(args) -> int:
    config = parse_overrides(args.overrides, TrainConfig())
    if args.show_config:
        print(json.dumps(asdict(config), indent=2))
        return 0
    exported = Trainer(config).run()
    for name, path in exported.items():
        if path:
            print(f"exported {name}: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``python -m cvseg_ros.training.train`` / torchrun."""
    config = parse_overrides(sys.argv[1:] if argv is None else argv, TrainConfig())
    Trainer(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
