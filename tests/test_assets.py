"""course.assets, course.media, course.data: the hands-on assets are right, reproducible and usable.

What may differ between builds: nothing on one machine. The committed WAV is
compared with a fresh one to within one 16-bit step, because NumPy may
evaluate sin/cos with different SIMD code on another CPU and a sample that sits
on a rounding boundary can then round the other way. The checkpoint is not
committed; it is reproducible byte for byte on a given machine and PyTorch
version (fixed seeds, one thread), not across CPUs.
"""

from __future__ import annotations

import math
import os
import wave

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from course import assets, media
from course.data import CORPUS_PATH, make_corpus, read_stories
from course.thinker import ThinkerLM
from course.tokenizer import BPETokenizer
from course.training import CHECKPOINT_KEYS, load_checkpoint
from course_tools.paths import HANDS_ON_ASSETS

pytestmark = [pytest.mark.package, pytest.mark.usefixtures("one_thread")]

TINY_MODEL = dict(n_layers=1, d_model=16, n_heads=2, d_ff=32, ctx_len=32)
TINY_TRAIN = dict(steps=4, batch_size=2, seq_len=32, warmup_steps=2, eval_every=2)




def tiny_build(out, **kw):
    return assets.build(out, progress=False, model_config=TINY_MODEL, train_config=TINY_TRAIN, **kw)


# ------------------------------------------------------------------------ media

def test_wav_header_and_signal(tmp_path):
    path = media.write_sample_wav(tmp_path / "a.wav")
    with wave.open(str(path)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 16000)
        assert w.getnframes() == 32000  # 2.0 s
    audio, sr = media.read_wav(path)
    assert sr == 16000 and audio.shape == (1, 32000) and audio.dtype == np.float32
    assert 0.75 < np.abs(audio).max() <= 0.8
    # speech-like: voiced energy below 4 kHz while the vowels sound, hiss above 4 kHz during the "s"
    x = audio[0]
    def band_energy(seg, lo, hi):
        spec = np.abs(np.fft.rfft(seg)) ** 2
        f = np.fft.rfftfreq(len(seg), 1 / sr)
        return spec[(f >= lo) & (f < hi)].sum() / spec.sum()
    vowel, hiss = x[int(0.3 * sr):int(0.5 * sr)], x[int(1.12 * sr):int(1.22 * sr)]
    assert band_energy(vowel, 80, 4000) > 0.95 and band_energy(hiss, 4000, 8000) > 0.95
    assert np.abs(x[: int(0.05 * sr)]).max() < 0.01, "starts with a short silence"


def test_png_is_224_rgb_8bit_with_structure_at_the_patch_scale(tmp_path):
    path = media.write_sample_png(tmp_path / "a.png")
    img = Image.open(path)
    assert img.format == "PNG" and img.mode == "RGB" and img.size == (224, 224)
    px = np.asarray(img)
    assert px.dtype == np.uint8 and px.shape == (224, 224, 3)
    assert len(np.unique(px.reshape(-1, 3), axis=0)) >= 20, "colourful"
    patches = px.reshape(14, 16, 14, 16, 3).transpose(0, 2, 1, 3, 4).reshape(196, 256, 3).astype(float)
    spread = patches.std(axis=1).sum(axis=1)
    uniform = int((spread == 0).sum())
    assert 40 <= uniform <= 160, f"{uniform} of 196 patches are one flat colour; expected a mix of flat and edged"
    means = patches.mean(axis=1)
    assert len(np.unique(means.round(), axis=0)) >= 30, "patches should differ from each other"


def test_media_are_deterministic(tmp_path):
    for write in (media.write_sample_wav, media.write_sample_png):
        a, b = write(tmp_path / "a"), write(tmp_path / "b")
        assert a.read_bytes() == b.read_bytes()


# ----------------------------------------------------------------------- corpus

def test_shipped_corpus_is_the_generators_output():
    assert CORPUS_PATH.read_text(encoding="utf-8") == make_corpus(), "run python -m course.data"
    stories = read_stories()
    assert len(stories) == 800 and all(s.endswith((".", "!", '"')) for s in stories)
    assert CORPUS_PATH.stat().st_size < 400_000


# ---------------------------------------------------------------- the build

def test_build_is_reproducible_byte_for_byte(tmp_path):
    r1 = tiny_build(tmp_path / "one")
    r2 = tiny_build(tmp_path / "two")
    assert r1["summary"]["history"] == r2["summary"]["history"]
    for name in assets.ASSET_NAMES:
        a, b = (tmp_path / "one" / name).read_bytes(), (tmp_path / "two" / name).read_bytes()
        assert a == b, f"{name} differs between two builds"
    assert str(tmp_path).encode() not in (tmp_path / "one" / assets.CHECKPOINT_NAME).read_bytes()


def test_build_skips_what_is_up_to_date(tmp_path):
    out = tmp_path / "assets"
    first = tiny_build(out)
    assert all(first[n] == "built" for n in assets.ASSET_NAMES)
    again = tiny_build(out)
    assert all(again[n] == "up to date" for n in assets.ASSET_NAMES)
    # a newer input makes the checkpoint stale; committed files are only rebuilt when missing
    later = (out / assets.CHECKPOINT_NAME).stat().st_mtime + 10
    os.utime(out / assets.TOKENIZER_NAME, (later, later))
    third = tiny_build(out)
    assert third[assets.CHECKPOINT_NAME] == "built" and third[assets.TOKENIZER_NAME] == "up to date"
    (out / assets.IMAGE_NAME).unlink()
    assert tiny_build(out)[assets.IMAGE_NAME] == "built"
    forced = tiny_build(out, force=True)
    assert all(forced[n] == "built" for n in assets.ASSET_NAMES)


def test_tiny_build_checkpoint_loads_safely_and_generates(tmp_path):
    tiny_build(tmp_path)
    ckpt = torch.load(tmp_path / assets.CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    assert tuple(ckpt) == CHECKPOINT_KEYS and ckpt["step"] == TINY_TRAIN["steps"]
    model = ThinkerLM.from_config(ckpt["config"])
    model.load_state_dict(ckpt["model"])
    ids = greedy(model.eval(), [1, 5, 6], 5)
    assert len(ids) <= 8 and all(0 <= i < 1024 for i in ids)


def greedy(model, ids, n, eos=2):
    """Greedy decoding, written out here on purpose: the course package has no generate()."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids[-model.ctx_len:]]))[0, -1].argmax())
            ids.append(nxt)
            if nxt == eos:
                break
    return ids


# ------------------------------------------------------- the committed assets

def test_committed_assets_match_a_fresh_build(tmp_path):
    for name in assets.COMMITTED:
        assert (HANDS_ON_ASSETS / name).exists(), f"{name} is missing: run python -m course.assets"
    assert (HANDS_ON_ASSETS / assets.IMAGE_NAME).read_bytes() == media.write_sample_png(tmp_path / "i.png").read_bytes()
    fresh_tok = BPETokenizer.train(CORPUS_PATH, tmp_path / "tok", assets.TOKENIZER_VOCAB_SIZE)
    assert (HANDS_ON_ASSETS / assets.TOKENIZER_NAME).read_bytes() == fresh_tok.model_file.read_bytes(), (
        "tokenizer.model is stale: run python -m course.assets --force")
    committed, sr = media.read_wav(HANDS_ON_ASSETS / assets.AUDIO_NAME)
    fresh, _ = media.read_wav(media.write_sample_wav(tmp_path / "a.wav"))
    assert sr == 16000 and committed.shape == fresh.shape
    assert np.abs(committed - fresh).max() <= 1 / 32768 + 1e-9, "the WAV may differ by one 16-bit step at most"


CHECKPOINT = HANDS_ON_ASSETS / assets.CHECKPOINT_NAME


@pytest.mark.skipif(not CHECKPOINT.exists(), reason="thinker_tiny.pt not built: run python -m course.assets")
def test_the_shipped_checkpoint_is_trained_and_generates_story_text():
    ckpt = load_checkpoint(CHECKPOINT)  # weights_only=True inside
    assert tuple(ckpt) == CHECKPOINT_KEYS
    assert ckpt["config"] == assets.THINKER_TINY_CONFIG
    assert ckpt["optimizer"]["state"] and ckpt["scheduler"]["last_epoch"] == ckpt["step"] == assets.TRAIN_CONFIG["steps"]
    assert CHECKPOINT.stat().st_size < 5_000_000
    model = ThinkerLM.from_config(ckpt["config"])
    load_checkpoint(CHECKPOINT, model=model)
    model.eval()
    tok = BPETokenizer(HANDS_ON_ASSETS / assets.TOKENIZER_NAME)
    assert tok.vocab_size == model.config["vocab_size"]

    # validation loss on the held-out stories: far below chance (ln V)
    _, val = assets.corpus_token_streams(tok)
    val_loss = assets.evaluate(model, val, 128)
    assert val_loss == pytest.approx(ckpt["best_val_loss"], abs=1e-3)
    assert val_loss < 0.2 * math.log(tok.vocab_size), f"val loss {val_loss:.3f} vs ln V {math.log(tok.vocab_size):.3f}"

    # greedy continuation of a prompt is made of the corpus's words, not random pieces
    ids = greedy(model, [tok.bos_id] + tok.encode("Once upon a time,"), 30)
    text = tok.decode(ids)
    assert text.startswith("Once upon a time, there was")
    words = set(CORPUS_PATH.read_text(encoding="utf-8").replace('"', " ").replace(".", " ").replace(",", " ").split())
    generated = text.replace('"', " ").replace(".", " ").replace(",", " ").split()
    assert sum(w in words for w in generated) >= 0.95 * len(generated), text
    # the loss of the real continuation is low, the loss on shuffled tokens is high
    story = torch.tensor([[tok.bos_id] + tok.encode(read_stories()[-1])])[:, :128]
    with torch.no_grad():
        real = F.cross_entropy(model(story[:, :-1])[0], story[0, 1:]).item()
        perm = story[:, torch.randperm(story.shape[1], generator=torch.Generator().manual_seed(0))]
        shuffled = F.cross_entropy(model(perm[:, :-1])[0], perm[0, 1:]).item()
    assert real < 1.0 < shuffled
