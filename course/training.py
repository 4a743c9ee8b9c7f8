"""Training utilities: loss and gradient sanity checks, full-state checkpoints.

* :func:`validate_loss` rejects a NaN, infinite or out-of-range loss, by
  raising :class:`InvalidLossError` or by returning False, as the caller asks.
* :func:`check_gradient_explosion` returns the total gradient norm and whether
  it is too large (or not finite); it can raise :class:`GradientExplosionError`.
* :func:`save_checkpoint` / :func:`load_checkpoint` store and restore the whole
  training state (model, optimiser, scheduler, AMP scaler, step, best validation
  loss, model config) as plain tensors, numbers, strings, lists and dicts, so the
  file loads with ``torch.load(path, weights_only=True)``: no pickled classes,
  nothing that runs code when it is read.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "step", "best_val_loss", "config")


class InvalidLossError(RuntimeError):
    """The loss is NaN, infinite or outside the expected range."""


class GradientExplosionError(RuntimeError):
    """The total gradient norm is above the limit, or not finite."""


def _as_float(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"expected a scalar loss, got a tensor of shape {tuple(value.shape)}")
        return float(value.detach().item())
    return float(value)


def validate_loss(loss, min_loss: float = 0.0, max_loss: float = 1e4, raise_on_error: bool = True) -> bool:
    """Return True if `loss` (a number or a one-element tensor) is finite and in [min_loss, max_loss].

    Otherwise raise :class:`InvalidLossError` saying what is wrong, or, with
    ``raise_on_error=False``, return False.
    """
    value = _as_float(loss)
    if math.isnan(value):
        problem = "loss is NaN"
    elif math.isinf(value):
        problem = f"loss is {'+' if value > 0 else '-'}inf"
    elif value < min_loss:
        problem = f"loss {value:.6g} is below min_loss={min_loss:g}"
    elif value > max_loss:
        problem = f"loss {value:.6g} is above max_loss={max_loss:g}"
    else:
        return True
    if raise_on_error:
        raise InvalidLossError(problem)
    return False


def check_gradient_explosion(model: torch.nn.Module, max_grad_norm: float = 100.0,
                             raise_on_error: bool = False) -> tuple[float, bool]:
    """Total L2 norm of all gradients, and whether it exploded (> max_grad_norm, NaN or inf).

    Parameters without a ``.grad`` are skipped; a shared (tied) parameter is
    counted once. Call it after ``loss.backward()`` and before
    ``optimizer.step()``. With ``raise_on_error=True`` an explosion raises
    :class:`GradientExplosionError` instead of returning.
    """
    grads = [p.grad.detach() for p in model.parameters() if p.grad is not None]
    if grads:
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        norm = float(total.item())
    else:
        norm = 0.0
    exploded = not math.isfinite(norm) or norm > max_grad_norm
    if exploded and raise_on_error:
        raise GradientExplosionError(f"total gradient norm {norm:.6g} exceeds max_grad_norm={max_grad_norm:g}"
                                     if math.isfinite(norm) else f"total gradient norm is {norm}")
    return norm, exploded


def save_checkpoint(path, *, model, optimizer=None, scheduler=None, scaler=None, step: int = 0,
                    best_val_loss: float = float("inf"), config: dict | None = None) -> Path:
    """Write the full training state to `path` as a dict with keys ``CHECKPOINT_KEYS``.

    Objects that are not given are stored as None. `config` defaults to
    ``model.config`` when the model has one (a dict), so that
    ``ThinkerLM.from_config(ckpt["config"])`` rebuilds the model. The file is
    written to a temporary name and renamed, so an interrupted save never
    leaves a truncated checkpoint behind.
    """
    if config is None:
        config = getattr(model, "config", None)
    if config is not None:
        config = dict(config)  # plain dict: weights_only loading accepts nothing else
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "step": int(step),
        "best_val_loss": float(best_val_loss),
        "config": config,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Serialise to memory first: torch.save names the archive's root folder after
    # the file, so saving straight to the temporary name would put that name
    # (and the process id in it) into the bytes.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(buffer.getvalue())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_checkpoint(path, model=None, optimizer=None, scheduler=None, scaler=None) -> dict:
    """Read a checkpoint with ``torch.load(..., weights_only=True)`` and restore the objects given.

    Returns the checkpoint dict. The model is loaded strictly: a config that
    does not match the checkpoint raises a RuntimeError listing the
    mismatched tensors. Restoring an optimiser, scheduler or scaler whose state
    the checkpoint does not hold raises a ValueError.
    """
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"{path} is not a full-state checkpoint (a dict with keys {CHECKPOINT_KEYS})")
    if model is not None:
        model.load_state_dict(ckpt["model"])
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        if obj is None:
            continue
        if ckpt.get(name) is None:
            raise ValueError(f"{path} holds no {name} state to restore")
        obj.load_state_dict(ckpt[name])
    return ckpt
