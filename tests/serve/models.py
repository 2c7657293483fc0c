"""Small models for fast tests (referenced as ``tests.serve.models:tiny_cnn``)."""

from __future__ import annotations

import torch
from torch import nn


class TinyCNN(nn.Module):
    def __init__(self, width: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        return self.head(x.mean(dim=(2, 3)))


def tiny_cnn() -> nn.Module:
    return TinyCNN()


def tiny_cnn_wide() -> nn.Module:
    """Another architecture: same code, other hyper-parameters."""
    return TinyCNN(width=12)


def not_a_module() -> object:
    return object()


def tiny_cnn_fails_in_replicas() -> nn.Module:
    """tiny_cnn, except in a process whose environment says it is a replica (for start-failure tests)."""
    import os

    if os.environ.get("TINY_CNN_FAIL"):
        raise RuntimeError("tiny_cnn refuses to build here (TINY_CNN_FAIL is set)")
    return TinyCNN()


class TwoHeads(nn.Module):
    """One input, two outputs (a tuple): class scores and a feature map."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = torch.relu(self.conv(x))
        return self.head(features.mean(dim=(2, 3))), features


def two_heads() -> nn.Module:
    return TwoHeads()


class Frames(nn.Module):
    """Frames of features with a dynamic count, and a masked token sequence of its own length."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 4)
        self.embed = nn.Embedding(16, 4)

    def forward(self, feats: torch.Tensor, ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens = self.embed(ids) * attention_mask[..., None]
        return {"frames": self.proj(feats), "tokens": tokens, "pooled": self.proj(feats).mean(1) + tokens.sum(1)}


def frames() -> nn.Module:
    return Frames()


class Chunks(nn.Module):
    """Tokens summed in chunks of 8 where the length allows: it runs at any length, but export's guard on the
    length's remainder holds only for multiples of 8 (as transformers' BERT with SDPA specialises its length)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        if ids.shape[1] % 8 == 0:
            return x.view(ids.shape[0], ids.shape[1] // 8, 8, 4).sum(2).sum(1)
        return x.sum(1)


def chunks() -> nn.Module:
    return Chunks()


def odd_lengths_only() -> nn.Module:
    """A forward that fails at some lengths of its declared range (even ones)."""
    return OddLengths()


class OddLengths(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] % 2 == 0:
            raise RuntimeError(f"no even lengths here ({ids.shape[1]})")
        return self.embed(ids).sum(1)


class Positions(nn.Module):
    """Token ids plus their positions, read from non-persistent buffers as transformers' ``BertEmbeddings``
    reads ``position_ids`` and ``token_type_ids``: tensors of the module that no weights file holds."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 4)
        self.position = nn.Embedding(32, 4)
        self.register_buffer("position_ids", torch.arange(32)[None], persistent=False)
        self.register_buffer("offset", torch.full((4,), 0.5), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = self.position_ids[:, : ids.shape[1]]
        return (self.embed(ids) + self.position(positions) + self.offset).sum(1)


def positions() -> nn.Module:
    return Positions()


class Eights(nn.Module):
    """Reads its tokens in groups of 8, so it takes a length in multiples of 8 only, as CUDA's attention kernels
    do for transformers' BERT: export keeps such a length dynamic only as ``8 * n``. Each token's answer is its
    own embedding plus its group's sum (padding, masked to zeros, adds nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 4)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        b, n = ids.shape
        x = self.embed(ids) * attention_mask.unsqueeze(-1).to(torch.float32)
        groups = x.reshape(b, n // 8, 8, 4).sum(2)
        return x + groups.repeat_interleave(8, dim=1)


def eights() -> nn.Module:
    return Eights()


def tiny_hf_bert() -> nn.Module:
    """transformers' ``BertModel`` (SDPA attention) at a tiny config, where transformers is installed: its
    ``position_ids`` and ``token_type_ids`` are non-persistent buffers."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        attn_implementation="sdpa",
    )
    return BertModel(config, add_pooling_layer=True)
