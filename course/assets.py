"""Build the assets of the hands-on exercises, deterministically and offline.

    python -m course.assets            # build what is missing or out of date
    python -m course.assets --force    # rebuild everything
    python -m course.assets --out DIR  # build somewhere else (default: course.paths.HANDS_ON_ASSETS)

========================  =========  ===================================================
file                      committed  what it is
========================  =========  ===================================================
``sample_audio.wav``      yes        2 s of speech-like sound, 16 kHz mono 16-bit PCM
``sample_image.png``      yes        224 x 224 RGB scene drawn on the 16-pixel patch grid
``tokenizer.model``       yes        SentencePiece BPE, 1024 ids, trained on course/data/corpus.txt
``thinker_tiny.pt``       no         ThinkerLM trained on the same corpus; full training state
========================  =========  ===================================================

The three small files are committed and only rebuilt when missing or with
``--force``. The checkpoint (a few MB) is generated at setup and ignored by git;
it is rebuilt when it is missing or older than one of its inputs (the corpus,
the tokenizer, or the code of the model, the tokenizer, the training
utilities, the corpus reader or this module). When ``release/04_hands_on_exercises/`` exists, the assets are also
copied into its ``assets/`` folder, so the student version holds what its
notebooks load.

Reproducibility: the media and the tokenizer are byte-identical across builds.
The checkpoint is trained with fixed seeds and a fixed number of threads, so
two builds on the same machine and PyTorch version give identical files;
another CPU or PyTorch version may round floating-point sums differently and
give slightly different weights (the loss figures agree to about 1e-3).
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from course import media
from course.data import CORPUS_PATH, read_stories
from course.paths import HANDS_ON_ASSETS, HANDS_ON_ASSIGNMENT, RELEASE_DIR

AUDIO_NAME = "sample_audio.wav"
IMAGE_NAME = "sample_image.png"
TOKENIZER_NAME = "tokenizer.model"
CHECKPOINT_NAME = "thinker_tiny.pt"
ASSET_NAMES = (AUDIO_NAME, IMAGE_NAME, TOKENIZER_NAME, CHECKPOINT_NAME)
COMMITTED = (AUDIO_NAME, IMAGE_NAME, TOKENIZER_NAME)

TOKENIZER_VOCAB_SIZE = 1024

# The checkpoint's model: ThinkerLM(**THINKER_TINY_CONFIG).
THINKER_TINY_CONFIG = dict(
    vocab_size=TOKENIZER_VOCAB_SIZE,
    n_layers=2,
    d_model=96,
    n_heads=4,
    d_ff=256,
    dropout=0.0,
    rope_theta=10000.0,
    ctx_len=128,
)

# How it is trained (AdamW, linear warm-up then cosine decay, random windows of the corpus).
TRAIN_CONFIG = dict(
    seed=0,
    steps=300,
    batch_size=8,
    seq_len=128,
    lr=3e-3,
    min_lr_ratio=0.1,
    warmup_steps=30,
    weight_decay=0.1,
    grad_clip=1.0,
    eval_every=50,
    val_fraction=0.05,
    threads=1,  # deterministic, and fastest on a shared 2-core machine
)


@contextmanager
def _torch_threads(n: int):
    """Run with `n` intra-op threads (the result of float sums depends on it), then restore."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def corpus_token_streams(tokenizer, corpus_path=CORPUS_PATH, val_fraction: float = 0.05):
    """Train and validation token streams: each story as [BOS] + ids + [EOS], concatenated.

    The last `val_fraction` of the stories are held out for validation.
    """
    stories = read_stories(corpus_path)
    n_val = max(1, int(round(len(stories) * val_fraction)))

    def stream(texts):
        ids = []
        for text in texts:
            ids += [tokenizer.bos_id] + tokenizer.encode(text) + [tokenizer.eos_id]
        return torch.tensor(ids, dtype=torch.long)

    return stream(stories[:-n_val]), stream(stories[-n_val:])


def _warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warm-up to 1, then cosine decay to `min_ratio`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model, tokens: torch.Tensor, seq_len: int) -> float:
    """Mean next-token cross-entropy over consecutive windows of `tokens`."""
    was_training = model.training
    model.eval()
    n = (len(tokens) - 1) // seq_len
    x = tokens[: n * seq_len].view(n, seq_len)
    y = tokens[1 : n * seq_len + 1].view(n, seq_len)
    total = 0.0
    for i in range(0, n, 32):
        logits = model(x[i : i + 32])
        total += F.cross_entropy(logits.flatten(0, 1), y[i : i + 32].flatten(), reduction="sum").item()
    model.train(was_training)
    return total / (n * seq_len)


def train_thinker(tokenizer_path, out_path, model_config: dict | None = None, train_config: dict | None = None,
                  corpus_path=CORPUS_PATH, progress: bool = True) -> dict:
    """Train ThinkerLM on the corpus and save its full state to `out_path`; return a summary."""
    from course.thinker import ThinkerLM
    from course.tokenizer import BPETokenizer
    from course.training import check_gradient_explosion, save_checkpoint, validate_loss

    mc = dict(THINKER_TINY_CONFIG, **(model_config or {}))
    tc = dict(TRAIN_CONFIG, **(train_config or {}))
    tok = BPETokenizer(tokenizer_path)
    if tok.vocab_size != mc["vocab_size"]:
        raise ValueError(f"tokenizer has {tok.vocab_size} ids but the model config says {mc['vocab_size']}")
    train_ids, val_ids = corpus_token_streams(tok, corpus_path, tc["val_fraction"])
    seq_len = tc["seq_len"]

    t0 = time.perf_counter()
    with _torch_threads(tc["threads"]):
        torch.manual_seed(tc["seed"])
        model = ThinkerLM(**mc)
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": tc["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
            lr=tc["lr"], betas=(0.9, 0.95),
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: _warmup_cosine(s, tc["warmup_steps"], tc["steps"], tc["min_lr_ratio"])
        )
        gen = torch.Generator().manual_seed(tc["seed"])
        initial_val = evaluate(model, val_ids, seq_len)
        best_val = float("inf")
        history = []
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=tc["steps"], desc="training thinker_tiny", file=sys.stderr, mininterval=1.0)
        model.train()
        for step in range(1, tc["steps"] + 1):
            starts = torch.randint(0, len(train_ids) - seq_len - 1, (tc["batch_size"],), generator=gen)
            x = torch.stack([train_ids[s : s + seq_len] for s in starts.tolist()])
            y = torch.stack([train_ids[s + 1 : s + seq_len + 1] for s in starts.tolist()])
            logits = model(x)
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
            validate_loss(loss)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            check_gradient_explosion(model, max_grad_norm=1e3, raise_on_error=True)
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc["grad_clip"])
            optimizer.step()
            scheduler.step()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
            if step % tc["eval_every"] == 0 or step == tc["steps"]:
                val = evaluate(model, val_ids, seq_len)
                best_val = min(best_val, val)
                history.append((step, round(loss.item(), 4), round(val, 4)))
        if bar is not None:
            bar.close()
        final_val = history[-1][2] if history else initial_val
        save_checkpoint(out_path, model=model, optimizer=optimizer, scheduler=scheduler, scaler=None,
                        step=tc["steps"], best_val_loss=best_val, config=model.config)
    return {
        "parameters": sum(p.numel() for p in model.parameters()),  # the tied matrix once
        "initial_val_loss": initial_val,
        "val_loss": final_val,
        "best_val_loss": best_val,
        "ln_vocab": math.log(mc["vocab_size"]),
        "train_tokens": len(train_ids),
        "val_tokens": len(val_ids),
        "history": history,
        "seconds": time.perf_counter() - t0,
    }


def _stale(target: Path, inputs: list[Path]) -> bool:
    if not target.exists():
        return True
    mtime = target.stat().st_mtime
    return any(p.exists() and p.stat().st_mtime > mtime for p in inputs)


def build(out_dir=HANDS_ON_ASSETS, force: bool = False, progress: bool = True, release: bool | None = None,
          model_config: dict | None = None, train_config: dict | None = None) -> dict:
    """Build the assets into `out_dir`; return {name: "built" | "up to date"} plus a "summary" of training.

    `release`: also copy the assets into release/<hands-on assignment>/assets/
    (default: only when building into the default folder and that release exists).
    """
    from course.tokenizer import BPETokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict = {}
    here = Path(__file__).resolve().parent
    say = _log if progress else (lambda msg: None)

    def step(name, make, stale):
        path = out_dir / name
        if force or stale(path):
            t = time.perf_counter()
            make(path)
            report[name] = "built"
            say(f"[assets] built {name} ({path.stat().st_size:,} bytes, {time.perf_counter() - t:.1f} s)")
        else:
            report[name] = "up to date"
            say(f"[assets] {name} is up to date")

    def missing(path: Path) -> bool:  # committed files: rebuilt only when missing, or with force
        return not path.exists()

    step(AUDIO_NAME, media.write_sample_wav, missing)
    step(IMAGE_NAME, media.write_sample_png, missing)
    step(TOKENIZER_NAME,
         lambda p: BPETokenizer.train(CORPUS_PATH, p.with_suffix(""), TOKENIZER_VOCAB_SIZE), missing)

    ckpt_inputs = [out_dir / TOKENIZER_NAME, CORPUS_PATH, here / "thinker.py", here / "training.py",
                   here / "tokenizer.py", here / "data" / "__init__.py", here / "assets.py"]

    def make_ckpt(path):
        s = train_thinker(out_dir / TOKENIZER_NAME, path, model_config, train_config, progress=progress)
        report["summary"] = s
        say(f"[assets] {s['parameters']:,} parameters; validation loss {s['initial_val_loss']:.3f} -> "
            f"{s['val_loss']:.3f} (ln V = {s['ln_vocab']:.3f}); trained in {s['seconds']:.1f} s")

    step(CHECKPOINT_NAME, make_ckpt, lambda p: _stale(p, ckpt_inputs))

    release_dir = RELEASE_DIR / HANDS_ON_ASSIGNMENT
    if release is None:
        release = out_dir.resolve() == Path(HANDS_ON_ASSETS).resolve() and release_dir.is_dir()
    if release:
        dest = release_dir / "assets"
        dest.mkdir(parents=True, exist_ok=True)
        for name in ASSET_NAMES:
            src, dst = out_dir / name, dest / name
            if not dst.exists() or dst.read_bytes() != src.read_bytes():
                shutil.copy2(src, dst)
                say(f"[assets] copied {name} to {dest}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m course.assets", description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild every asset, even if up to date")
    parser.add_argument("--out", type=Path, default=HANDS_ON_ASSETS, help=f"output folder (default {HANDS_ON_ASSETS})")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    args = parser.parse_args(argv)
    t = time.perf_counter()
    build(args.out, force=args.force, progress=not args.quiet)
    if not args.quiet:
        _log(f"[assets] done in {time.perf_counter() - t:.1f} s: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
