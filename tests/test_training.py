"""course.training: loss and gradient checks, and full-state checkpoints that resume exactly."""

from __future__ import annotations

import math
import stat

import pytest
import torch
import torch.nn.functional as F

from course.thinker import ThinkerLM
from course.training import (
    CHECKPOINT_KEYS,
    GradientExplosionError,
    InvalidLossError,
    check_gradient_explosion,
    load_checkpoint,
    save_checkpoint,
    validate_loss,
)

pytestmark = [pytest.mark.package, pytest.mark.usefixtures("one_thread")]

TINY = dict(vocab_size=48, n_layers=1, d_model=16, n_heads=2, d_ff=32, dropout=0.1, ctx_len=12)




# ---------------------------------------------------------------- validate_loss

@pytest.mark.parametrize("loss", [0.0, 2.5, 1e4, torch.tensor(3.0), torch.tensor([[1.5]]), 7])
def test_validate_loss_accepts_finite_in_range(loss):
    assert validate_loss(loss) is True
    assert validate_loss(loss, raise_on_error=False) is True


@pytest.mark.parametrize(
    "loss, kwargs, words",
    [
        (float("nan"), {}, "NaN"),
        (torch.tensor(float("nan")), {}, "NaN"),
        (float("inf"), {}, "+inf"),
        (torch.tensor(float("-inf")), {"min_loss": -1e6}, "-inf"),
        (-0.1, {}, "below"),
        (1e4 + 1, {}, "above"),
        (5.0, {"max_loss": 4.0}, "above"),
        (-2e6, {"min_loss": -1e6, "max_loss": 1e6}, "below"),
    ],
)
def test_validate_loss_rejects_nan_inf_and_out_of_range(loss, kwargs, words):
    with pytest.raises(InvalidLossError, match=words.replace("+", r"\+")):
        validate_loss(loss, **kwargs)
    assert validate_loss(loss, raise_on_error=False, **kwargs) is False
    assert issubclass(InvalidLossError, RuntimeError)


def test_validate_loss_takes_a_loss_with_grad_and_leaves_it_alone():
    w = torch.tensor(2.0, requires_grad=True)
    loss = (w * 3) ** 2
    assert validate_loss(loss)
    loss.backward()
    assert w.grad.item() == 36.0
    with pytest.raises(ValueError):
        validate_loss(torch.tensor([1.0, 2.0]))


# ---------------------------------------------------------- check_gradient_explosion

def test_gradient_norm_matches_a_manual_computation_and_counts_tied_weights_once():
    torch.manual_seed(0)
    m = ThinkerLM(**TINY)
    ids = torch.randint(0, TINY["vocab_size"], (2, 8))
    F.cross_entropy(m(ids).flatten(0, 1), ids.flatten()).backward()
    norm, exploded = check_gradient_explosion(m)
    expected = math.sqrt(sum(p.grad.pow(2).sum().item() for p in m.parameters()))  # parameters() yields a tied one once
    assert norm == pytest.approx(expected, rel=1e-5) and exploded is False
    assert norm == pytest.approx(torch.nn.utils.clip_grad_norm_(m.parameters(), float("inf")).item(), rel=1e-5)


def test_gradient_explosion_flag_and_raise():
    m = torch.nn.Linear(2, 2)
    assert check_gradient_explosion(m) == (0.0, False)  # no gradients yet
    m.weight.grad = torch.full((2, 2), 30.0)  # norm 60
    assert check_gradient_explosion(m, max_grad_norm=100.0) == (pytest.approx(60.0), False)
    norm, exploded = check_gradient_explosion(m, max_grad_norm=50.0)
    assert norm == pytest.approx(60.0) and exploded is True
    with pytest.raises(GradientExplosionError, match="exceeds"):
        check_gradient_explosion(m, max_grad_norm=50.0, raise_on_error=True)
    assert issubclass(GradientExplosionError, RuntimeError)
    torch.testing.assert_close(m.weight.grad, torch.full((2, 2), 30.0))  # grads untouched (not clipped)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradients_count_as_exploded(bad):
    m = torch.nn.Linear(2, 2)
    m.weight.grad = torch.tensor([[1.0, bad], [0.0, 0.0]])
    norm, exploded = check_gradient_explosion(m, max_grad_norm=1e9)
    assert exploded is True and not math.isfinite(norm)
    with pytest.raises(GradientExplosionError):
        check_gradient_explosion(m, raise_on_error=True)


# ------------------------------------------------------------------ checkpoints

def make_state(seed=0):
    torch.manual_seed(seed)
    model = ThinkerLM(**TINY)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3) * 0.9 ** s)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    return model, opt, sched, scaler


def train_step(model, opt, sched, scaler, step):
    """One step whose batch and dropout mask depend only on the step number."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, TINY["vocab_size"], (4, TINY["ctx_len"]), generator=g)
    torch.manual_seed(step)  # dropout
    model.train()
    loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    opt.zero_grad()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    sched.step()
    return loss.item()


def test_checkpoint_keys_and_weights_only_loading(tmp_path):
    model, opt, sched, scaler = make_state()
    for s in range(2):
        train_step(model, opt, sched, scaler, s)
    path = save_checkpoint(tmp_path / "sub" / "ck.pt", model=model, optimizer=opt, scheduler=sched, scaler=scaler,
                           step=2, best_val_loss=3.5)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)  # no custom classes inside
    assert tuple(ckpt) == CHECKPOINT_KEYS
    assert ckpt["step"] == 2 and ckpt["best_val_loss"] == 3.5
    assert ckpt["config"] == model.config and type(ckpt["config"]) is dict  # defaulted from the model
    assert ckpt["scaler"]["scale"] == 1024.0 and ckpt["scheduler"]["last_epoch"] == 2
    assert ckpt["optimizer"]["state"], "optimizer moments must be saved"
    # the file is readable by others and no temporary file is left behind
    assert path.stat().st_mode & stat.S_IRGRP or path.stat().st_mode & stat.S_IROTH
    assert [p.name for p in path.parent.iterdir()] == ["ck.pt"]


def test_save_with_only_a_model_stores_none(tmp_path):
    model = ThinkerLM(**TINY)
    ckpt = load_checkpoint(save_checkpoint(tmp_path / "m.pt", model=model))
    assert (ckpt["optimizer"], ckpt["scheduler"], ckpt["scaler"], ckpt["step"]) == (None, None, None, 0)
    assert ckpt["best_val_loss"] == float("inf")
    rebuilt = ThinkerLM.from_config(ckpt["config"])
    rebuilt.load_state_dict(ckpt["model"])
    with pytest.raises(ValueError, match="optimizer"):
        load_checkpoint(tmp_path / "m.pt", optimizer=torch.optim.SGD(rebuilt.parameters(), lr=0.1))


def test_loading_into_a_different_architecture_fails_loudly(tmp_path):
    save_checkpoint(tmp_path / "m.pt", model=ThinkerLM(**TINY))
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_checkpoint(tmp_path / "m.pt", model=ThinkerLM(**dict(TINY, d_model=32)))


def test_resume_matches_an_uninterrupted_run_exactly(tmp_path):
    total, cut = 6, 3
    # uninterrupted
    model, opt, sched, scaler = make_state()
    straight = [train_step(model, opt, sched, scaler, s) for s in range(total)]
    final = {k: v.clone() for k, v in model.state_dict().items()}

    # interrupted after `cut` steps, saved, rebuilt from scratch with another seed, resumed
    model, opt, sched, scaler = make_state()
    first = [train_step(model, opt, sched, scaler, s) for s in range(cut)]
    save_checkpoint(tmp_path / "ck.pt", model=model, optimizer=opt, scheduler=sched, scaler=scaler, step=cut,
                    best_val_loss=min(first))
    del model, opt, sched, scaler
    model, opt, sched, scaler = make_state(seed=123)
    ckpt = load_checkpoint(tmp_path / "ck.pt", model=model, optimizer=opt, scheduler=sched, scaler=scaler)
    assert model.lm_head.weight is model.embed_tokens.weight, "loading must keep the tie"
    assert sched.get_last_lr() == pytest.approx([1e-2 * min(1.0, (cut + 1) / 3) * 0.9 ** cut])
    resumed = first + [train_step(model, opt, sched, scaler, s) for s in range(ckpt["step"], total)]

    assert resumed == straight, "the losses after resuming must equal the uninterrupted run's"
    for k, v in model.state_dict().items():
        assert torch.equal(v, final[k]), f"{k} differs after resuming"
