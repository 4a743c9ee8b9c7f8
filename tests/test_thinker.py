"""course.thinker: shapes, tied head, causality, RoPE, initial loss, and that it learns."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from course.thinker import RMSNorm, ThinkerLM, apply_rope, rope_cos_sin

pytestmark = [pytest.mark.package, pytest.mark.usefixtures("one_thread")]



TINY = dict(vocab_size=64, n_layers=2, d_model=32, n_heads=4, d_ff=64, dropout=0.0, rope_theta=10000.0, ctx_len=16)


def tiny(**overrides) -> ThinkerLM:
    torch.manual_seed(0)
    return ThinkerLM(**dict(TINY, **overrides)).eval()


def test_constructor_keywords_and_config_round_trip():
    m = ThinkerLM(vocab_size=50, n_layers=1, d_model=16, n_heads=2, d_ff=32, dropout=0.1, rope_theta=500.0, ctx_len=8)
    assert m.config == dict(vocab_size=50, n_layers=1, d_model=16, n_heads=2, d_ff=32, dropout=0.1,
                            rope_theta=500.0, ctx_len=8)
    assert all(type(v) in (int, float) for v in m.config.values()), "config must be plain numbers (weights_only)"
    assert m.ctx_len == 8
    clone = ThinkerLM.from_config(m.config)
    clone.load_state_dict(m.state_dict())  # strict: same architecture
    # positional defaults as in the seed
    d = ThinkerLM(100, 2, 32, 4, 64)
    assert d.config["dropout"] == 0.0 and d.config["rope_theta"] == 10000.0 and d.config["ctx_len"] == 256


def test_logits_shape_from_ids_and_from_embeddings():
    m = tiny()
    ids = torch.randint(0, TINY["vocab_size"], (3, 10))
    logits = m(ids)
    assert logits.shape == (3, 10, TINY["vocab_size"]) and logits.dtype == torch.float32
    from_embeds = m(inputs_embeds=m.embed_tokens(ids))
    torch.testing.assert_close(from_embeds, logits)
    # arbitrary embeddings (e.g. image or audio features) work too
    assert m(inputs_embeds=torch.randn(2, 5, TINY["d_model"])).shape == (2, 5, TINY["vocab_size"])


def test_tied_head_and_parameter_count():
    m = tiny()
    assert isinstance(m.embed_tokens, torch.nn.Embedding) and isinstance(m.lm_head, torch.nn.Linear)
    assert m.lm_head.bias is None
    assert m.lm_head.weight is m.embed_tokens.weight
    V, D, F_, L = TINY["vocab_size"], TINY["d_model"], TINY["d_ff"], TINY["n_layers"]
    per_block = 4 * D * D + 3 * D * F_ + 2 * D  # q, k, v, o; gate, up, down; two norms
    assert sum(p.numel() for p in m.parameters()) == V * D + L * per_block + D  # tied matrix counted once
    # the RoPE tables are derived from the config, not saved
    assert not any("rope" in k for k in m.state_dict())


def test_context_length_and_input_errors():
    m = tiny()
    m(torch.zeros(1, TINY["ctx_len"], dtype=torch.long))  # exactly ctx_len is fine
    with pytest.raises(ValueError, match="ctx_len"):
        m(torch.zeros(1, TINY["ctx_len"] + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="ctx_len"):
        m(inputs_embeds=torch.zeros(1, TINY["ctx_len"] + 1, TINY["d_model"]))
    with pytest.raises(ValueError):
        m()
    with pytest.raises(ValueError):
        m(torch.zeros(1, 3, dtype=torch.long), inputs_embeds=torch.zeros(1, 3, TINY["d_model"]))
    with pytest.raises(ValueError):
        m(inputs_embeds=torch.zeros(1, 3, TINY["d_model"] + 1))
    with pytest.raises(ValueError):
        m(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible"):
        ThinkerLM(10, 1, 30, 4, 16)


@pytest.mark.parametrize("use_embeds", [False, True])
def test_causality_change_at_t_never_changes_earlier_logits(use_embeds):
    m = tiny()
    g = torch.Generator().manual_seed(1)
    T = TINY["ctx_len"]
    ids = torch.randint(0, TINY["vocab_size"], (2, T), generator=g)
    base = m(inputs_embeds=m.embed_tokens(ids)) if use_embeds else m(ids)
    for t in range(T):
        changed = ids.clone()
        changed[:, t] = (changed[:, t] + 1 + torch.randint(0, TINY["vocab_size"] - 1, (2,), generator=g)) % TINY["vocab_size"]
        out = m(inputs_embeds=m.embed_tokens(changed)) if use_embeds else m(changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-6, msg=f"changing token {t} changed earlier logits")
        assert not torch.allclose(out[:, t], base[:, t]), f"changing token {t} did not change its own logits"


def test_rope_preserves_norms_and_encodes_relative_position():
    head_dim, T = 16, 12
    cos, sin = rope_cos_sin(head_dim, T, theta=10000.0)
    assert cos.shape == sin.shape == (T, head_dim)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, T, head_dim, generator=g)
    r = apply_rope(x, cos, sin)
    torch.testing.assert_close(r.norm(dim=-1), x.norm(dim=-1))
    # each channel pair (i, i + head_dim/2) keeps its own length: a rotation per pair
    h = head_dim // 2
    torch.testing.assert_close(r[..., :h] ** 2 + r[..., h:] ** 2, x[..., :h] ** 2 + x[..., h:] ** 2)
    torch.testing.assert_close(r[..., 0, :], x[..., 0, :])  # position 0 is not rotated
    assert not torch.allclose(r[..., 1:, :], x[..., 1:, :])
    # <R_m q, R_n k> depends only on m - n
    q, k = torch.randn(head_dim, generator=g), torch.randn(head_dim, generator=g)
    qs = apply_rope(q.expand(T, head_dim), cos, sin)
    ks = apply_rope(k.expand(T, head_dim), cos, sin)
    dots = qs @ ks.T
    for offset in range(-3, 4):
        diag = torch.diagonal(dots, offset=offset)
        torch.testing.assert_close(diag, diag[0].expand_as(diag), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        rope_cos_sin(7, 4)


def test_rmsnorm_unit_rms():
    x = torch.randn(4, 5, 32) * 7 + 3
    y = RMSNorm(32)(x)
    torch.testing.assert_close(y.pow(2).mean(-1), torch.ones(4, 5), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_initial_loss_is_close_to_ln_vocab(seed):
    V = 512
    torch.manual_seed(seed)
    m = ThinkerLM(vocab_size=V, n_layers=2, d_model=64, n_heads=4, d_ff=128, ctx_len=32).eval()
    ids = torch.randint(0, V, (8, 32))
    with torch.no_grad():
        loss = F.cross_entropy(m(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).item()
    assert abs(loss - math.log(V)) < 0.1, f"initial loss {loss:.3f} vs ln V = {math.log(V):.3f}"


def test_a_few_adamw_steps_reduce_the_loss_on_a_fixed_batch():
    m = tiny().train()
    torch.manual_seed(0)
    ids = torch.randint(0, TINY["vocab_size"], (4, TINY["ctx_len"]))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(m(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0, f"loss went {losses[0]:.3f} -> {losses[-1]:.3f}"
    assert m.lm_head.weight is m.embed_tokens.weight, "training must not untie the head"


def test_dropout_only_in_train_mode():
    m = tiny(dropout=0.5)
    ids = torch.randint(0, TINY["vocab_size"], (2, 8))
    torch.testing.assert_close(m.eval()(ids), m(ids))
    m.train()
    assert not torch.allclose(m(ids), m(ids))
