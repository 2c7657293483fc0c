"""A BERT-like text encoder written with torch alone, built from its config (no model hub, no tokenizer).

Serve it as ``warmserve.serve.text:tiny_encoder`` (2 layers, hidden 128: for tests and CPUs) or
``warmserve.serve.text:base_encoder`` (BERT-base's sizes: 12 layers, hidden 768, vocabulary 30522), with the
signature `SIGNATURE` (token ids and an attention mask, INT64, a dynamic sequence length). Its module and
tensor names follow Hugging Face's ``BertModel``. ``warmserve.serve.text:hf_bert_base`` is transformers' own
``BertModel`` of the same config, where transformers is installed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from warmserve.serve.errors import ModelSpecError


@dataclass(frozen=True)
class EncoderConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12


def signature(config: EncoderConfig, max_len: int = 128) -> str:
    """The `--inputs` of an encoder of ``config``: token ids below its vocabulary, and their attention mask."""
    return f"input_ids:int64[seq=1:{max_len}]<{config.vocab_size} attention_mask:int64[seq]"


class Embeddings(nn.Module):
    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
        x = x + self.token_type_embeddings.weight[0]  # one segment: token type 0 everywhere
        return self.LayerNorm(x)  # type: ignore[no-any-return]


class SelfAttention(nn.Module):
    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self.heads = c.num_attention_heads
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, s, self.heads, h // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.query(x)), heads(self.key(x)), heads(self.value(x)), mask)
        return out.transpose(1, 2).reshape(b, s, h)


class DenseNorm(nn.Module):
    """A projection, then the residual and a layer norm (Hugging Face's ``BertSelfOutput``/``BertOutput``)."""

    def __init__(self, c: EncoderConfig, width: int) -> None:
        super().__init__()
        self.dense = nn.Linear(width, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)  # type: ignore[no-any-return]


class Attention(nn.Module):
    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        setattr(self, "self", SelfAttention(c))  # noqa: B010 - Hugging Face's name for it
        self.output = DenseNorm(c, c.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        attend: SelfAttention = getattr(self, "self")  # noqa: B009 - a Tensor to mypy as an attribute
        return self.output(attend(x, mask), x)  # type: ignore[no-any-return]


class Intermediate(nn.Module):
    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class Layer(nn.Module):
    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self.attention = Attention(c)
        self.intermediate = Intermediate(c)
        self.output = DenseNorm(c, c.intermediate_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)  # type: ignore[no-any-return]


class Layers(nn.Module):
    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(Layer(c) for _ in range(c.num_hidden_layers))


class Pooler(nn.Module):
    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x[:, 0]))


class TextEncoder(nn.Module):
    """Token ids [batch, seq] and an attention mask (1 for a token, 0 for padding) -> ``last_hidden_state``
    [batch, seq, hidden] and ``pooler_output`` [batch, hidden]. Padding changes no token's state."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = Layers(config)
        self.pooler = Pooler(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        x = self.embeddings(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # [batch, 1, 1, seq]: every query position sees the real tokens only
        mask = attention_mask[:, None, None, :].to(torch.bool)
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return {"last_hidden_state": x, "pooler_output": self.pooler(x)}


TINY = EncoderConfig(
    vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256
)
BASE = EncoderConfig()


def tiny_encoder() -> nn.Module:
    """2 layers, hidden 128, a vocabulary of 1000: serve with `signature(TINY)`."""
    return TextEncoder(TINY)


def base_encoder() -> nn.Module:
    """BERT-base's sizes: 12 layers, hidden 768, 12 heads, a vocabulary of 30522."""
    return TextEncoder(BASE)


def hf_bert_base() -> nn.Module:
    """transformers' ``BertModel`` with BERT-base's config and SDPA attention (needs transformers)."""
    try:
        from transformers import BertConfig, BertModel
    except ImportError as e:
        raise ModelSpecError("warmserve.serve.text:hf_bert_base needs transformers (pip install transformers)") from e
    config = BertConfig(attn_implementation="sdpa")
    return BertModel(config, add_pooling_layer=True)
