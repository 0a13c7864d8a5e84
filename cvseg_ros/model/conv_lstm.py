"""ConvLSTM cell (Shi et al. 2015): an LSTM whose gates are convolutions over feature maps."""
from __future__ import annotations

import torch
from torch import nn


class ConvLSTM(nn.Module):
    """One ConvLSTM cell. ``forward(x, (h, c)) -> (h, c)``; all maps share the spatial size."""

    def __init__(self, input_channels: int, hidden_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.hidden_channels = hidden_channels
        self.gates = nn.Conv2d(input_channels + hidden_channels, 4 * hidden_channels, kernel_size,
                               padding=kernel_size // 2)
        with torch.no_grad():  # forget-gate bias 1: keep the I-frame state by default
            self.gates.bias.zero_()
            self.gates.bias[hidden_channels:2 * hidden_channels].fill_(1.0)
        # the gates' scale in the channels-last path: 1 for i, f, o; 2 for g (tanh(g) = 2 sigmoid(2g) - 1)
        scale = torch.ones(4 * hidden_channels)
        scale[3 * hidden_channels:] = 2
        self.register_buffer("gate_scale", scale, persistent=False)

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        h, c = state
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            h = h.contiguous(memory_format=torch.channels_last)
        # h in x's dtype: under autocast the convolution casts it anyway, and a concatenation of
        # mixed dtypes (or layouts) is a slow copy
        gates = self.gates(torch.cat([x, h.to(x.dtype)], dim=1))
        n = self.hidden_channels
        if not gates.is_contiguous() and gates.is_contiguous(memory_format=torch.channels_last):
            # channels-last (inference copy): the same arithmetic on the NHWC view, where each
            # gate is a run of channels (channel slices of the NCHW view are slow, strided loops)
            # in fp32, and tanh(x) as 2 sigmoid(2x) - 1: PyTorch's CPU tanh (and any bf16
            # arithmetic) is several times slower than its sigmoid
            gp, cp = gates.permute(0, 2, 3, 1).float(), c.permute(0, 2, 3, 1)
            s = torch.sigmoid(gp * self.gate_scale)
            cp = torch.addcmul(s[..., n: 2 * n] * cp, s[..., :n], s[..., 3 * n:] * 2 - 1)
            hp = s[..., 2 * n: 3 * n] * (torch.sigmoid(cp * 2) * 2 - 1)
            return hp.permute(0, 3, 1, 2), cp.permute(0, 3, 1, 2)
        i, f, o, g = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, c
