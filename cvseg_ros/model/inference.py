"""An inference copy of a trained :class:`CompressedSegmenter`: batch norms folded into the
convolutions before them, the two P-frame CNNs run as one grouped stack, the convolutions'
weights packed once for oneDNN, optionally channels-last weights. Same
architecture, same weights (up to float rounding), same outputs; the checkpoint on disk is untouched.
"""
from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from cvseg_ros.common.jit import compiled
from cvseg_ros.common.kernels import cpu_kernels
from cvseg_ros.model.enet import Bottleneck, DownsamplingBottleneck, UpsamplingBottleneck
from cvseg_ros.model.espnetv2 import _NormAct, _PyramidPool, _Unit
from cvseg_ros.model.p_frame import FusedBranches

log = logging.getLogger(__name__)

# (conv, batch norm) attribute pairs where the norm directly follows the convolution in forward()
_PAIRS = {
    Bottleneck: (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
    DownsamplingBottleneck: (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
    UpsamplingBottleneck: (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"), ("main_conv", "main_bn")),
    _Unit: (("conv", "bn"),),      # ESPNetv2's conv [+ norm] [+ PReLU]
}


def _fold(conv: nn.Module, bn: nn.BatchNorm2d) -> nn.Module:
    if isinstance(conv, nn.Sequential):   # asymmetric 1xk then kx1: the norm follows the last one
        conv[-1] = _fold(conv[-1], bn)
        return conv
    return fuse_conv_bn_eval(conv, bn, transpose=isinstance(conv, nn.ConvTranspose2d))


def fold_batchnorms_(model: nn.Module) -> int:
    """Fold every eval-mode BatchNorm2d that directly follows a convolution into it (in place).
    Returns the number folded."""
    folded = 0
    for module in model.modules():
        for conv_name, bn_name in _PAIRS.get(type(module), ()):
            bn = getattr(module, bn_name, None)
            if isinstance(bn, nn.BatchNorm2d):
                setattr(module, conv_name, _fold(getattr(module, conv_name), bn))
                setattr(module, bn_name, nn.Identity())
                folded += 1
        if isinstance(module, nn.Sequential):   # conv_bn_relu blocks of the P-frame branch
            for i in range(len(module) - 1):
                if isinstance(module[i], nn.Conv2d) and isinstance(module[i + 1], nn.BatchNorm2d):
                    module[i] = fuse_conv_bn_eval(module[i], module[i + 1])
                    module[i + 1] = nn.Identity()
                    folded += 1
    return folded


@compiled(fastmath=True)
def _affine_prelu_rows(x, scale, shift, slope, out):
    """out[p, c] = PReLU_c(x[p, c] * scale[c] + shift[c]) over [pixels, channels] rows."""
    for p in range(x.shape[0]):
        for c in range(x.shape[1]):
            v = x[p, c] * scale[c] + shift[c]
            out[p, c] = v if v > 0 else v * slope[c]


class AffinePReLU(nn.Module):
    """An eval-mode ``BatchNorm2d`` and the ``PReLU`` after it, in one pass: on the CPU one
    compiled loop over a channels-last float32 map (PyTorch's eval-mode norm alone takes longer),
    elsewhere ``addcmul`` and ``prelu``. Same values up to float rounding."""

    def __init__(self, bn: nn.BatchNorm2d, prelu: nn.PReLU) -> None:
        super().__init__()
        scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
        self.register_buffer("scale", scale.clone())
        self.register_buffer("shift", (bn.bias.detach() - bn.running_mean * scale).clone())
        self.register_buffer("slope", prelu.weight.detach().expand(scale.numel()).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        if (cpu_kernels(x) and x.dim() == 4 and x.dtype == torch.float32 == self.scale.dtype
                and x.is_contiguous(memory_format=torch.channels_last) and not x.requires_grad):
            out = torch.empty_like(x, memory_format=torch.channels_last)
            rows = (lambda t: t.permute(0, 2, 3, 1).reshape(-1, c).numpy())
            _affine_prelu_rows(rows(x), self.scale.numpy(), self.shift.numpy(), self.slope.numpy(), rows(out))
            return out
        view = (1, c, 1, 1)
        y = torch.addcmul(self.shift.to(x.dtype).view(view), x, self.scale.to(x.dtype).view(view))
        return F.prelu(y, self.slope.to(x.dtype))


def fuse_norm_prelu_(model: nn.Module) -> int:
    """Replace every eval-mode ``BatchNorm2d`` directly followed by a ``PReLU`` (in a
    ``Sequential``, or ESPNetv2's norm-and-activation pairs) by :class:`AffinePReLU` (in place).
    Returns the number replaced."""
    fused = 0
    for module in model.modules():
        if isinstance(module, _NormAct) and isinstance(module.bn, nn.BatchNorm2d):
            module.bn, module.act = AffinePReLU(module.bn, module.act), nn.Identity()
            fused += 1
        elif isinstance(module, nn.Sequential):
            for i in range(len(module) - 1):
                if isinstance(module[i], nn.BatchNorm2d) and isinstance(module[i + 1], nn.PReLU):
                    module[i], module[i + 1] = AffinePReLU(module[i], module[i + 1]), nn.Identity()
                    fused += 1
    return fused


def warm_up_affine_prelu() -> None:
    """Compile (or load from Numba's disk cache) :class:`AffinePReLU`'s loop now."""
    x = torch.zeros(1, 2, 2, 2).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        AffinePReLU(nn.BatchNorm2d(2).eval(), nn.PReLU(2))(x)


def _packing_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._convolution_pointwise is not None
    except (AttributeError, RuntimeError):   # a PyTorch built without oneDNN
        return False


def _cpu_autocast_dtype() -> torch.dtype | None:
    """The dtype CPU autocast casts to where it is on, else None."""
    try:
        return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    except TypeError:   # a PyTorch before 2.4 (a vehicle's CUDA build may be older)
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None


class PackedConv2d(nn.Module):
    """A trained convolution, and optionally the ReLU after it, for inference on the CPU with its
    weights packed for oneDNN once per dtype (bf16 under autocast, else the input's).

    PyTorch's eager convolution casts the weights (under autocast) and reorders them into oneDNN's
    blocked layout at every call: 10-30 us per convolution, as much as a third of the work at the
    P-frame branch's map sizes, and a sixth of the I-frame network's time. Here one oneDNN call
    (the kernel PyTorch's compiler emits) runs the packed weights and the ReLU. The same kernels
    compute the same values. Elsewhere (CUDA, with gradients, a PyTorch without oneDNN, other
    dtypes, a dtype oneDNN refuses on this CPU: logged once) it is the convolution and the ReLU as
    they were."""

    available = _packing_available()
    #: dtypes oneDNN refused to pack or run on this machine (then the plain convolution runs)
    refused: set = set()

    @staticmethod
    def takes(module: nn.Module) -> bool:
        """Whether ``module`` is a convolution this class runs: an ``nn.Conv2d`` with numeric zero padding."""
        return type(module) is nn.Conv2d and module.padding_mode == "zeros" and not isinstance(module.padding, str)

    def __init__(self, conv: nn.Conv2d, relu: bool = False) -> None:
        super().__init__()
        if not self.takes(conv):
            raise ValueError("PackedConv2d takes convolutions with numeric zero padding")
        self.conv = conv
        self.relu = relu
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self._packed: dict = {}   # (dtype, input size, weight storage and version) -> (packed weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        dtype = (_cpu_autocast_dtype() or x.dtype) if self.available and cpu_kernels(x) else None
        if (dtype in (torch.float32, torch.bfloat16) and dtype not in self.refused
                and not (torch.is_grad_enabled() and (x.requires_grad or c.weight.requires_grad))):
            try:
                weight, bias = self._weights(dtype, x.shape)
                return torch.ops.mkldnn._convolution_pointwise(
                    x.to(dtype), weight, bias, list(c.padding), list(c.stride),
                    list(c.dilation), c.groups, "relu" if self.relu else "none", [], "")
            except (RuntimeError, TypeError) as exc:   # e.g. bf16 on a CPU without its kernels
                PackedConv2d.refused.add(dtype)
                log.warning("packed %s convolutions unavailable on this machine (%s); using PyTorch's",
                            str(dtype).removeprefix("torch."), str(exc).splitlines()[0][:120])
        y = c(x)
        return F.relu(y) if self.relu else y

    def _weights(self, dtype: torch.dtype, input_size: torch.Size) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weights packed for inputs of this size (oneDNN's layout depends on it: a packing for
        another size can make small maps 40x slower; one for a single image serves a batch as
        well) and dtype; repacked when the weights change."""
        c = self.conv
        key = (dtype, tuple(input_size[1:]), c.weight.data_ptr(), c.weight._version)
        packed = self._packed.get(key)
        if packed is None:
            with torch.no_grad():
                weight = torch.ops.aten.mkldnn_reorder_conv2d_weight(
                    c.weight.detach().to(dtype).contiguous().to_mkldnn(), list(c.padding), list(c.stride),
                    list(c.dilation), c.groups, [1, *input_size[1:]])
                bias = c.bias.detach().to(dtype) if c.bias is not None else None
            if len(self._packed) >= 8:   # sizes seen: the cameras' work sizes
                self._packed.clear()
            packed = self._packed[key] = (weight, bias)
        return packed

    def __deepcopy__(self, memo):   # packed (oneDNN) tensors do not copy: the copy packs its own
        copied = PackedConv2d(copy.deepcopy(self.conv, memo), self.relu)
        memo[id(self)] = copied
        return copied


def pack_convolutions_(model: nn.Module) -> int:
    """Replace the convolutions of the I-frame network (and of the state's initialisation), the
    fused P-frame CNNs' (with their ReLUs) and the ConvLSTM's gate convolution by
    :class:`PackedConv2d` (in place; the correction head reads its weights itself). Returns the
    number replaced."""
    packed = 0

    def pack_all(parent: nn.Module, names) -> None:
        nonlocal packed
        for name in names:
            child = getattr(parent, name, None)
            if PackedConv2d.takes(child):
                setattr(parent, name, PackedConv2d(child))
                packed += 1
            elif isinstance(child, nn.Module):
                pack_all(child, [n for n, _ in child.named_children()])

    pack_all(model, ["i_frame_net", "init_state"])
    fused = getattr(model, "fused_branches", None)
    if fused is not None:
        layers = []
        for child in fused.net:
            if isinstance(child, nn.ReLU) and layers and isinstance(layers[-1], PackedConv2d) and not layers[-1].relu:
                layers[-1].relu = True
            elif PackedConv2d.takes(child):
                layers.append(PackedConv2d(child))
                packed += 1
            else:
                layers.append(child)
        fused.net = nn.Sequential(*layers)
    lstm = getattr(model, "conv_lstm", None)
    if lstm is not None and PackedConv2d.takes(lstm.gates):
        lstm.gates = PackedConv2d(lstm.gates)
        packed += 1
    return packed


def inference_copy(model: nn.Module, channels_last: bool = True) -> nn.Module:
    """A deep copy in eval mode with batch norms folded (or fused with the PReLU after them),
    ESPNetv2's pyramid shuffles folded into their concatenations, the P-frame CNNs fused (for a
    :class:`CompressedSegmenter`), the convolutions packed (:func:`pack_convolutions_`) and
    channels-last weights."""
    fast = copy.deepcopy(model).eval()
    with torch.no_grad():
        fold_batchnorms_(fast)
        for module in fast.modules():
            if isinstance(module, _PyramidPool):
                module.interleave_()
        fuse_norm_prelu_(fast)
        if hasattr(fast, "mv_cnn") and hasattr(fast, "residual_cnn"):
            # both CNNs come from one h4_encoder geometry (ModelConfig): they always fuse
            fast.fused_branches = FusedBranches(fast.mv_cnn, fast.residual_cnn)
        pack_convolutions_(fast)
    for p in fast.parameters():
        p.requires_grad_(False)
    if channels_last:
        fast = fast.to(memory_format=torch.channels_last)
    return fast
