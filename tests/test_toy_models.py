"""course.toy_models: the stubs follow the transformers embedding API, the tiny DeepSeek-V3 builds offline."""

from __future__ import annotations

import time
import warnings

import pytest
import torch
from torch import nn

from course.toy_models import SimpleCausalLM, SimpleModel, ToyConfig, tiny_deepseek, tiny_deepseek_config

pytestmark = pytest.mark.package


def test_simple_model_get_set_is_identity():
    m = SimpleModel(ToyConfig(vocab_size=10, hidden_size=4))
    e = m.get_input_embeddings()
    assert isinstance(e, nn.Embedding) and e is m.embed_tokens
    assert e.weight.shape == (10, 4)
    new = nn.Embedding(12, 4)
    m.set_input_embeddings(new)
    assert m.get_input_embeddings() is new
    assert m(torch.tensor([11])).shape == (1, 4)


def test_simple_model_padding_row_is_zero():
    m = SimpleModel(ToyConfig(vocab_size=10, hidden_size=4, pad_token_id=2))
    assert m.embed_tokens.padding_idx == 2
    assert torch.all(m.embed_tokens.weight[2] == 0)


@pytest.mark.parametrize("tie", [True, False])
def test_simple_causal_lm_delegates_and_ties_as_configured(tie):
    m = SimpleCausalLM(ToyConfig(vocab_size=10, hidden_size=4, tie_word_embeddings=tie))
    assert m.get_input_embeddings() is m.model.embed_tokens
    assert m.get_output_embeddings() is m.lm_head
    assert (m.lm_head.weight is m.model.embed_tokens.weight) is tie
    assert m.vocab_size == 10
    assert m(torch.tensor([[1, 2, 3]])).shape == (1, 3, 10)
    new = nn.Embedding(10, 4)
    m.set_input_embeddings(new)
    assert m.model.embed_tokens is new
    # the accessor replaces the module only: a tied head keeps the old Parameter
    assert m.lm_head.weight is not new.weight


def test_stubs_hold_no_transformers_import():
    import course.toy_models as tm

    src = open(tm.__file__).read()
    top = src.split("def tiny_deepseek_config")[0]
    assert "import transformers" not in top and "from transformers" not in top


def test_tiny_deepseek_config_is_small_and_overridable():
    cfg = tiny_deepseek_config(vocab_size=50, hidden_size=24, tie_word_embeddings=True, pad_token_id=3,
                               initializer_range=0.05)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.tie_word_embeddings, cfg.pad_token_id) == (50, 24, True, 3)
    assert cfg.initializer_range == 0.05
    assert cfg.model_type == "deepseek_v3"


@pytest.mark.parametrize("tie", [True, False])
def test_tiny_deepseek_builds_offline_fast_and_quietly(tie, recwarn):
    from transformers import DeepseekV3ForCausalLM  # noqa: F401  (importing takes seconds; time the build only)

    t = time.perf_counter()
    m = tiny_deepseek(vocab_size=40, hidden_size=24, tie_word_embeddings=tie, pad_token_id=5)
    assert time.perf_counter() - t < 2.0
    assert not [w for w in recwarn.list if not issubclass(w.category, DeprecationWarning)]
    assert type(m).__name__ == "DeepseekV3ForCausalLM"
    assert not m.training
    assert m.get_input_embeddings() is m.model.embed_tokens
    assert m.get_input_embeddings().weight.shape == (40, 24)
    assert m.lm_head.weight.shape == (40, 24)
    assert (m.lm_head.weight is m.model.embed_tokens.weight) is tie
    assert torch.all(m.model.embed_tokens.weight[5] == 0)
    assert sum(p.numel() for p in m.parameters()) < 50_000
    with torch.no_grad():
        assert m(torch.tensor([[1, 2, 39]])).logits.shape == (1, 3, 40)


def test_tiny_deepseek_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = tiny_deepseek(seed=1)
    after = torch.rand(3)
    assert torch.equal(after, expected), "building the model consumed the global RNG"
    b = tiny_deepseek(seed=1)
    c = tiny_deepseek(seed=2)
    for (na, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), na
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


def test_tiny_deepseek_default_is_untied_like_the_library():
    from transformers import DeepseekV3Config

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert DeepseekV3Config().tie_word_embeddings is False
    assert tiny_deepseek().config.tie_word_embeddings is False
