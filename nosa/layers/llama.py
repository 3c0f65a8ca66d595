"""The Llama building blocks NOSA keeps unchanged: RMSNorm, SwiGLU and rotary embeddings."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from nosa import ops


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # `nosa.ops.reference.rms_norm`: transformers' LlamaRMSNorm arithmetic (float32 variance, cast back
        # before the weight). Without a gradient to keep (the engine, generate, evaluation) it is dispatched:
        # on CUDA one Triton launch instead of ~7; training keeps the autograd reference.
        return ops.rms_norm(x, self.weight, self.variance_epsilon)


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rotary_inverse_frequencies(head_dim: int, theta: float, rope_type: str = "default", scaling: dict | None = None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope_type == "default":
        return inv_freq
    # Llama 3 frequency-dependent scaling: long wavelengths divided by `factor`, short ones kept, smooth between.
    factor = scaling["factor"]
    low_freq_wavelen = scaling["original_max_position_embeddings"] / scaling["low_freq_factor"]
    high_freq_wavelen = scaling["original_max_position_embeddings"] / scaling["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (scaling["original_max_position_embeddings"] / wavelen - scaling["low_freq_factor"]) / (
        scaling["high_freq_factor"] - scaling["low_freq_factor"]
    )
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding. The inverse frequencies are recomputed per device rather than stored as a
    buffer, so meta-device construction in `from_pretrained` never leaves them uninitialised."""

    def __init__(self, head_dim: int, theta: float, rope_type: str = "default", scaling: dict | None = None):
        super().__init__()
        self.head_dim, self.theta, self.rope_type, self.scaling = head_dim, theta, rope_type, scaling
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    def inverse_frequencies(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq:
            self._inv_freq[device] = rotary_inverse_frequencies(self.head_dim, self.theta, self.rope_type, self.scaling).to(device)
        return self._inv_freq[device]

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids: [B, T] -> (cos, sin), each [B, T, D] in `dtype`."""
        freqs = position_ids[..., None].float() * self.inverse_frequencies(position_ids.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, D]; cos, sin: [B, T, D] -> x's dtype (`nosa.ops.reference.apply_rotary`). Dispatched
    when no gradient is kept (on CUDA one Triton launch instead of ~6), the autograd reference otherwise."""
    return ops.apply_rotary(x, cos, sin)
