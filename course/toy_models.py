"""Small models for the lessons on input embeddings.

Two kinds of model, both small enough to build in milliseconds on a CPU:

* stubs written in plain PyTorch (:class:`SimpleModel`, :class:`SimpleCausalLM`)
  that follow the embedding-access API of ``transformers``
  (``get_input_embeddings`` / ``set_input_embeddings`` and the output
  counterparts) and nothing else, so every line of them can be read;
* a real ``transformers`` :class:`~transformers.DeepseekV3ForCausalLM`
  (the architecture Kimi-K2 reuses), built offline from a tiny
  :class:`~transformers.DeepseekV3Config` by :func:`tiny_deepseek`.

Nothing here downloads anything. Nothing here is a reference answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "ToyConfig",
    "SimpleModel",
    "SimpleCausalLM",
    "tiny_deepseek_config",
    "tiny_deepseek",
]


@dataclass
class ToyConfig:
    """The few configuration fields the stubs read (names as in ``transformers`` configs)."""

    vocab_size: int = 100
    hidden_size: int = 64
    pad_token_id: int | None = None
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02


class SimpleModel(nn.Module):
    """A base model reduced to its token embedding table.

    ``forward(input_ids)`` returns the embedding vectors of the tokens, shape
    ``(*input_ids.shape, hidden_size)``.
    """

    def __init__(self, config: ToyConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embed_tokens = value

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)


class SimpleCausalLM(nn.Module):
    """A causal-LM wrapper around :class:`SimpleModel`, laid out like ``XxxForCausalLM`` in ``transformers``.

    * ``self.model`` is the base model, ``self.lm_head`` a bias-free
      ``nn.Linear(hidden_size, vocab_size)``;
    * the embedding accessors delegate to ``self.model``, as the library's do;
    * with ``config.tie_word_embeddings`` the head shares the embedding's
      weight Parameter from the start;
    * ``forward(input_ids)`` returns logits, shape ``(*input_ids.shape, vocab_size)``
      (no transformer layers: the embedding goes straight to the head).
    """

    def __init__(self, config: ToyConfig):
        super().__init__()
        self.config = config
        self.model = SimpleModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model(input_ids))


def tiny_deepseek_config(
    vocab_size: int = 64,
    hidden_size: int = 32,
    tie_word_embeddings: bool = False,
    pad_token_id: int | None = None,
    **overrides,
):
    """A :class:`~transformers.DeepseekV3Config` a few thousand parameters large.

    Same architecture as DeepSeek-V3 / Kimi-K2 (multi-head latent attention,
    one dense layer then one mixture-of-experts layer), with every width
    shrunk. ``overrides`` replace any other field.
    """
    from transformers import DeepseekV3Config

    fields = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        first_k_dense_replace=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_shared_experts=1,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        max_position_embeddings=64,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=pad_token_id,
    )
    fields.update(overrides)
    return DeepseekV3Config(**fields)


def tiny_deepseek(
    vocab_size: int = 64,
    hidden_size: int = 32,
    tie_word_embeddings: bool = False,
    pad_token_id: int | None = None,
    seed: int = 0,
    **overrides,
):
    """A freshly initialised, tiny :class:`~transformers.DeepseekV3ForCausalLM`, in eval mode.

    Built offline (no download) from :func:`tiny_deepseek_config`; the same
    arguments and ``seed`` give the same weights. The global torch RNG is
    left as it was.
    """
    from transformers import DeepseekV3ForCausalLM

    config = tiny_deepseek_config(vocab_size, hidden_size, tie_word_embeddings, pad_token_id, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DeepseekV3ForCausalLM(config)
    return model.eval()
