"""Stage 1 of ``cvseg train``: the I-frame network on CamVid stills, and what the Cityscapes
teachers know (:mod:`cvseg_ros.training.distill`).

Each step takes ``i_batch`` stills (cross-entropy with the human labels, plus ``distill`` times the
distillation term) and ``distill_batch`` unlabelled driving frames of the training clips
(distillation only), crops of H.264-decoded copies (share ``i_compressed``) or of the clean frames.

The network saved for stage 2 is ``i_mix`` x the trained weights + (1 - ``i_mix``) x its Cityscapes
initialisation (weight-space ensembling, as WiSE-FT: the mix keeps more of what the teacher knew
about streets CamVid does not show). With ``init_from`` the trained weights are an exported
checkpoint's I-frame network instead of this stage's.
"""
from __future__ import annotations

import json

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from cvseg_ros.model.classes import camvid_class_map
from cvseg_ros.training.data import IGNORE, h264_round_trip, random_crop
from cvseg_ros.training.distill import distillation_loss, driving_frames, planes_last, soft_targets
from cvseg_ros.training.distributed import load_train_state

TEACHERS_FILE = "iframe_teachers.json"   # beside the I-frame network: the teachers it learnt from


def _round_trip(frames: list[np.ndarray], seed: int, progress: bool) -> list[np.ndarray]:
    if len({f.shape for f in frames}) == 1:
        return list(h264_round_trip(np.stack(frames), seed=seed, progress=progress))
    return [h264_round_trip(f[None], seed=seed + i, progress=False)[0] for i, f in enumerate(frames)]


def mix_weights(trained: dict[str, torch.Tensor], initial: dict[str, torch.Tensor], share: float
                ) -> dict[str, torch.Tensor]:
    """``share`` x ``trained`` + (1 - ``share``) x ``initial`` for every floating-point tensor (the
    batch-norm statistics too); counters are the trained ones."""
    if set(trained) != set(initial):
        raise ValueError("the two networks' tensors differ: not the same architecture")
    return {k: (share * v.float() + (1 - share) * initial[k].float()).to(v.dtype) if v.is_floating_point() else v
            for k, v in trained.items()}


def _initial_network(trainer, num_classes: int):
    from cvseg_ros.model.i_frame import IFrameNet, i_frame_net_from_teacher
    cfg = trainer.cfg
    if cfg.teacher_init:
        return i_frame_net_from_teacher(cfg.i_frame_network, num_classes, camvid_class_map(),
                                        trainer.init_weights_path())
    return IFrameNet(num_classes, cfg.i_frame_network)


def _save(trainer, net, num_classes: int) -> None:
    """The network stage 2 starts from: the trained weights mixed with the initialisation (``i_mix``)."""
    cfg = trainer.cfg
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    if cfg.i_mix != 1.0:
        if not 0.0 <= cfg.i_mix <= 1.0 or not cfg.teacher_init:
            raise ValueError(f"i_mix={cfg.i_mix}: a share in [0, 1], and it needs teacher_init (the "
                             f"Cityscapes initialisation to mix with)")
        state = mix_weights(state, _initial_network(trainer, num_classes).state_dict(), cfg.i_mix)
    if trainer.dist.main:
        save_file({k: v.contiguous() for k, v in state.items()}, str(trainer.i_frame_path()))
    trainer.dist.barrier()


def _from_checkpoint(trainer, num_classes: int) -> None:
    """``init_from``: the I-frame network of an exported checkpoint (loaded and checked by the safe
    loader), mixed as a trained one would be; nothing is trained."""
    from cvseg_ros.model.checkpoint import load_checkpoint
    model, meta = load_checkpoint(trainer.cfg.init_from)
    source = meta["config"]
    if source.get("i_frame_network", "enet") != trainer.cfg.i_frame_network or source["num_classes"] != num_classes:
        raise ValueError(f"init_from={trainer.cfg.init_from}: its I-frame network is {source.get('i_frame_network', 'enet')} "
                         f"with {source['num_classes']} classes, this run's {trainer.cfg.i_frame_network} with {num_classes}")
    if trainer.dist.main and meta.get("distilled_from"):
        (trainer.out / TEACHERS_FILE).write_text(json.dumps(meta["distilled_from"]))
    _save(trainer, model.i_frame_net, num_classes)


def train_i_frame(trainer) -> list[float]:
    """Train (or resume) the I-frame network of ``trainer`` (a :class:`~cvseg_ros.training.train.Trainer`)
    and save it to its ``i_frame_path()``; returns the loss of every step."""
    from tqdm import tqdm

    from cvseg_ros.training.train import cosine_lr
    cfg, rng, device = trainer.cfg, trainer.rng, trainer.device
    num_classes = trainer.weights.numel()
    if cfg.init_from:
        _from_checkpoint(trainer, num_classes)
        return []
    net = _initial_network(trainer, num_classes)
    net.to(device).train()
    model = trainer.dist.wrap(net.segmentation)
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.i_lr, weight_decay=1e-4)
    state_path = trainer.out / "iframe_state.safetensors"
    step = load_train_state(state_path, net, optimizer) if state_path.exists() else 0
    images, labels = trainer.images, trainer.labels
    if cfg.i_limit:
        images, labels = images[: cfg.i_limit], labels[: cfg.i_limit]
    progress = trainer.dist.main
    decoded = h264_round_trip(images, seed=cfg.seed, progress=progress) if cfg.i_compressed else images
    still_soft, driving, driving_decoded, driving_soft = None, [], [], []
    if cfg.distill:
        from cvseg_ros.training.ensemble import default_teachers, teacher_names
        teachers = default_teachers(log=trainer.note, names=teacher_names(cfg.teachers), data=trainer.data)
        if trainer.dist.main:   # the export names them in the checkpoint's metadata
            (trainer.out / TEACHERS_FILE).write_text(json.dumps([t.name for t in teachers]))
        still_soft = soft_targets(list(images), teachers, trainer.out, progress)
        if cfg.distill_batch:
            driving = driving_frames(trainer.training_clips(), cfg.distill_frame_step, images.shape[1])
            driving_soft = soft_targets(driving, teachers, trainer.out, progress)
            driving_decoded = _round_trip(driving, cfg.seed, progress) if cfg.i_compressed else driving
    crop = tuple(int(v) for v in cfg.i_crop.lower().split("x"))
    bar = tqdm(total=cfg.i_steps, initial=step, desc="stage 1: I-frame network", disable=not progress)
    losses = []
    while step < cfg.i_steps:
        idx = rng.integers(0, len(images), cfg.i_batch)
        if still_soft is None:
            crops = [random_crop(decoded[i] if rng.random() < cfg.i_compressed else images[i], labels[i], rng, crop)
                     for i in idx]
        else:
            crops = [random_crop(decoded[i] if rng.random() < cfg.i_compressed else images[i], labels[i], rng, crop,
                                 soft=planes_last(still_soft[i])) for i in idx]
            for j in (rng.integers(0, len(driving), cfg.distill_batch) if driving else ()):
                frame = driving_decoded[j] if rng.random() < cfg.i_compressed else driving[j]
                unlabelled = np.full(frame.shape[:2], IGNORE, np.uint8)
                crops.append(random_crop(frame, unlabelled, rng, crop, soft=planes_last(driving_soft[j])))
        x = torch.from_numpy(np.stack([c[0] for c in crops])).to(device).permute(0, 3, 1, 2).float() / 255
        y = torch.from_numpy(np.stack([c[1] for c in crops])).to(device).long()
        for g in optimizer.param_groups:
            g["lr"] = cosine_lr(step, cfg.i_steps, cfg.i_lr)
        with trainer.autocast():
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y, weight=trainer.weights, ignore_index=IGNORE)
        if still_soft is not None:
            target = torch.from_numpy(np.stack([c[2] for c in crops])).to(device).permute(0, 3, 1, 2)
            loss = loss + cfg.distill * distillation_loss(logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        trainer.after_step(step, cfg.i_steps, loss, losses, bar, "iframe", state_path, net, optimizer)
    bar.close()
    _save(trainer, net, num_classes)
    return losses
