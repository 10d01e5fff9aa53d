"""Attention for SiT blocks and the DINOv2 encoder: softmax(q k^T / sqrt(Dh)) v.

Layout (B, N, H, Dh) in and out (flash-attn's native layout; SDPA gets transposed views).
Backends: "sdpa" (F.scaled_dot_product_attention) and "math" (explicit softmax, the reference's
``--no-fused-attn`` path of timm Attention).
"""

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "sdpa", "math")


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, N, Dh)
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    return (attn.softmax(dim=-1) @ v).transpose(1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "math":
        return attention_ref(q, k, v)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)
