"""Small models used by the demo, the tests and the benchmarks.

``TinyGPT`` is a byte-level GPT-style decoder: token and position embeddings, pre-LayerNorm
blocks of causal self-attention and a GELU MLP, and an untied LM head. Attention is written
with explicit matmuls (not ``scaled_dot_product_attention``) so a compiled graph holds both
kinds of matmul the backend must tell apart: parameter x activation (projections, MLP, head:
rewritten sparse) and activation x activation (attention scores and values: left dense).

``ResNet`` is a ResNet of basic blocks (He et al., 2016): ``ResNet()`` has ResNet-18's layout
(four stages of two blocks, 64 to 512 channels, a 7x7 stride-2 stem and a max-pool), and
smaller widths, fewer blocks or a 3x3 stem make CPU-sized variants with the same kinds of
convolution: 3x3 kernels with stride 1 and 2, strided 1x1 shortcuts, a stem with few input
channels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BasicBlock", "Block", "GPTConfig", "ResNet", "TinyGPT"]


@dataclass(frozen=True)
class GPTConfig:
    """Sizes of a :class:`TinyGPT`. Defaults give a ~0.4 M parameter model for CPU runs."""

    vocab_size: int = 256
    seq_len: int = 128
    d_model: int = 128
    n_layer: int = 2
    n_head: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.0
    #: ``True``: attention through ``F.scaled_dot_product_attention`` (flash attention on a
    #: GPU) instead of explicit matmuls; for benchmarks at GPT-2 sizes.
    sdpa: bool = False

    def __post_init__(self) -> None:
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_head={self.n_head}")


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused QKV projection."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.sdpa = cfg.sdpa
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        mask = torch.tril(torch.ones(cfg.seq_len, cfg.seq_len, dtype=torch.bool))
        self.register_buffer("causal", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (y.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for y in (q, k, v))
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.proj(y.transpose(1, 2).reshape(b, t, d))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.n_head)
        scores = scores.masked_fill(~self.causal[:t, :t], float("-inf"))
        y = scores.softmax(dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: attention and a GELU MLP, each with a residual."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model)
        self.out = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.out(F.gelu(self.fc(self.ln2(x)))))


class TinyGPT(nn.Module):
    """Byte-level decoder-only LM: ``model(idx)`` gives logits, ``model(idx, targets)`` the loss."""

    def __init__(self, cfg: GPTConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or GPTConfig()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, T, V]``, or with ``targets`` the mean next-byte cross-entropy.

        The loss lives in ``forward`` (not a separate method) so that ``torch.compile(model)``
        compiles it: calling another method of a compiled module runs the eager original.
        """
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a residual; a 1x1 convolution (with batch norm)
    on the shortcut where the stride or the width changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNet(nn.Module):
    """Image classifier ``[B, in_channels, H, W] -> [B, num_classes]`` logits.

    Args:
        blocks: basic blocks per stage; each stage after the first halves the resolution.
        widths: channels per stage.
        in_channels, num_classes: input channels and classes.
        stem: ``"imagenet"`` (7x7 stride-2 convolution and a 3x3 stride-2 max-pool, as
            ResNet-18) or ``"small"`` (one 3x3 convolution, for small images).
    """

    def __init__(self, blocks: tuple[int, ...] = (2, 2, 2, 2),
                 widths: tuple[int, ...] = (64, 128, 256, 512), in_channels: int = 3,
                 num_classes: int = 1000, stem: str = "imagenet") -> None:
        super().__init__()
        if len(blocks) != len(widths) or stem not in ("imagenet", "small"):
            raise ValueError(f"ResNet: {len(blocks)} stages of blocks for {len(widths)} widths, "
                             f"stem {stem!r} (expected 'imagenet' or 'small')")
        layers: list[nn.Module] = []
        if stem == "imagenet":
            layers += [nn.Conv2d(in_channels, widths[0], 7, stride=2, padding=3, bias=False),
                       nn.BatchNorm2d(widths[0]), nn.ReLU(),
                       nn.MaxPool2d(3, stride=2, padding=1)]
        else:
            layers += [nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
                       nn.BatchNorm2d(widths[0]), nn.ReLU()]
        self.stem = nn.Sequential(*layers)
        stages, cin = [], widths[0]
        for i, (count, width) in enumerate(zip(blocks, widths, strict=True)):
            stage = [BasicBlock(cin if j == 0 else width, width, 2 if i and j == 0 else 1)
                     for j in range(count)]
            stages.append(nn.Sequential(*stage))
            cin = width
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
