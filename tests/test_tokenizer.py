"""course.tokenizer: fixed special ids, no BOS/EOS in encode, exact round trip on unseen text."""

from __future__ import annotations

import io

import pytest
import sentencepiece as spm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from course.data import CORPUS_PATH
from course.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, BPETokenizer

pytestmark = pytest.mark.package

VOCAB = 1024


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> BPETokenizer:
    return BPETokenizer.train(CORPUS_PATH, tmp_path_factory.mktemp("tok") / "tokenizer", VOCAB)


def test_special_ids_are_fixed_and_documented(tok):
    assert (PAD_ID, BOS_ID, EOS_ID, UNK_ID) == (0, 1, 2, 3)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert [tok.id_to_piece(i) for i in range(4)] == ["<pad>", "<s>", "</s>", "<unk>"]
    assert tok.vocab_size == len(tok) == VOCAB


def test_encode_adds_no_bos_or_eos_and_decode_drops_them(tok):
    ids = tok.encode("Once upon a time, there was a little fox.")
    assert ids and all(i not in (PAD_ID, BOS_ID, EOS_ID, UNK_ID) for i in ids)
    assert tok.decode([BOS_ID] + ids + [EOS_ID, PAD_ID, PAD_ID]) == "Once upon a time, there was a little fox."
    assert tok.encode("") == [] and tok.decode([]) == ""


def test_frequent_words_are_single_tokens(tok):
    # SentencePiece marks word starts with "▁" and adds one before the text
    assert [tok.id_to_piece(i) for i in tok.encode("Once upon a time")] == ["▁Once", "▁upon", "▁a", "▁time"]
    assert len(tok.encode("squirrel")) == 1


UNSEEN = [
    "Quantum chromodynamics explains why quarks never travel alone.",
    "Zebras zig-zag; jaguars JUMP! 42 + 58 = 100 (checked in 2024).",
    "Ça coûte 3,50 € — naïve café, Straße, 東京, 🙂",
    "  two leading spaces, a\ttab, trailing spaces  ",
    "line one\nline two\r\n\nline four",
]


@pytest.mark.parametrize("text", UNSEEN)
def test_round_trip_on_unseen_text(tok, text):
    assert text not in CORPUS_PATH.read_text(encoding="utf-8")
    ids = tok.encode(text)
    assert UNK_ID not in ids, "byte fallback should leave no <unk>"
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.characters(exclude_categories=("Cs",), exclude_characters="\u2581"), max_size=40))
def test_round_trip_on_arbitrary_text(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_the_one_character_that_does_not_round_trip_is_the_word_marker(tok):
    # SentencePiece writes spaces as U+2581 inside pieces, so a literal U+2581 decodes as a space.
    assert tok.decode(tok.encode("x\u2581y")) == "x y"


def test_decode_accepts_tensors_and_rejects_out_of_range(tok):
    import torch

    ids = tok.encode("a red ball")
    assert tok.decode(torch.tensor(ids)) == "a red ball"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([VOCAB])
    with pytest.raises(ValueError):
        tok.decode([-1])
    with pytest.raises(TypeError):
        tok.encode(ids)


def test_training_is_deterministic(tmp_path):
    a = BPETokenizer.train(CORPUS_PATH, tmp_path / "a" / "tok", VOCAB)
    b = BPETokenizer.train(CORPUS_PATH, tmp_path / "b" / "tok", VOCAB)
    assert a.model_file.read_bytes() == b.model_file.read_bytes()
    assert str(tmp_path) not in a.model_file.read_bytes().decode("latin-1"), "the model must not record paths"


def test_save_and_load_round_trip(tok, tmp_path):
    copy = tmp_path / "copy.model"
    copy.write_bytes(tok.model_file.read_bytes())
    again = BPETokenizer(copy)
    text = "Finn the owl counted seven stars."
    assert again.encode(text) == tok.encode(text)


def test_model_with_other_special_ids_is_rejected(tmp_path):
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["a b c d e f g"] * 20), model_writer=buf,
                                   vocab_size=12, model_type="bpe", minloglevel=2)  # default: unk=0, bos=1, eos=2
    path = tmp_path / "other.model"
    path.write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="special ids"):
        BPETokenizer(path)
