"""A byte-level-fallback BPE tokenizer, a thin wrapper around SentencePiece.

Special ids are fixed by training and never change:

========  ====  ==========================================================
constant  id    meaning
========  ====  ==========================================================
PAD_ID    0     padding (``<pad>``); fill short sequences, ignore in the loss
BOS_ID    1     beginning of sequence (``<s>``); prepend it to a prompt
EOS_ID    2     end of sequence (``</s>``); generation stops there
UNK_ID    3     unknown (``<unk>``); never produced, thanks to byte fallback
========  ====  ==========================================================

Pieces mark the start of a word with "▁" (U+2581), and ``encode`` treats the
text as if it started a new word: ``encode("time")`` is the one piece
``▁time``, the same as in "Once upon a time". ``encode`` adds **no** BOS/EOS: add them yourself, for example
``[BOS_ID] + tok.encode(text)``. ``decode`` drops PAD, BOS and EOS.

Characters never seen in training are split into UTF-8 bytes (``<0xE2>`` ...)
instead of becoming ``<unk>``, and no Unicode normalisation is applied, so
``decode(encode(text)) == text`` for any text, with one exception: the
character "▁" (U+2581), which SentencePiece uses for spaces, decodes as a space.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
UNK_ID = 3
SPECIAL_IDS = (PAD_ID, BOS_ID, EOS_ID, UNK_ID)


class BPETokenizer:
    """Load a trained SentencePiece BPE model: ``tok = BPETokenizer("assets/tokenizer.model")``."""

    pad_id = PAD_ID
    bos_id = BOS_ID
    eos_id = EOS_ID
    unk_id = UNK_ID

    def __init__(self, model_file: str | Path):
        self.model_file = Path(model_file)
        self.sp = spm.SentencePieceProcessor(model_file=str(self.model_file))
        expected = {"pad": PAD_ID, "bos": BOS_ID, "eos": EOS_ID, "unk": UNK_ID}
        found = {"pad": self.sp.pad_id(), "bos": self.sp.bos_id(), "eos": self.sp.eos_id(), "unk": self.sp.unk_id()}
        if found != expected:
            raise ValueError(f"{model_file}: special ids {found} differ from the course's {expected}")

    @property
    def vocab_size(self) -> int:
        """Number of ids, special ids and byte pieces included."""
        return self.sp.get_piece_size()

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS or EOS."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self.sp.encode(text, out_type=int)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` (a list or a 1-D tensor); PAD, BOS and EOS are dropped."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        return self.sp.decode([i for i in ids if i not in (PAD_ID, BOS_ID, EOS_ID)])

    def id_to_piece(self, i: int) -> str:
        """The vocabulary entry of one id, e.g. '▁the' (▁ marks a leading space)."""
        return self.sp.id_to_piece(int(i))

    def __repr__(self) -> str:
        return f"BPETokenizer({str(self.model_file)!r}, vocab_size={self.vocab_size})"

    @staticmethod
    def train(corpus_path: str | Path, model_prefix: str | Path, vocab_size: int) -> BPETokenizer:
        """Train a BPE model on a UTF-8 text file; writes ``<model_prefix>.model``; returns it loaded.

        Training is deterministic: one thread, no sentence sampling or
        shuffling, and the corpus is streamed in (not passed by path) so the
        model file does not record where it was built. Two runs on the same
        corpus give byte-identical model files.
        """
        lines = [line for line in Path(corpus_path).read_text(encoding="utf-8").splitlines() if line.strip()]
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            pad_id=PAD_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            unk_id=UNK_ID,
            byte_fallback=True,
            character_coverage=1.0,
            normalization_rule_name="identity",  # no NFKC: text round-trips exactly
            remove_extra_whitespaces=False,
            split_digits=True,
            num_threads=1,
            input_sentence_size=0,  # use every line: no random sampling
            shuffle_input_sentence=False,
            max_sentence_length=1 << 16,
            minloglevel=2,  # quiet: no training log on stderr
        )
        out = Path(str(model_prefix) + ".model")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(model.getvalue())
        return BPETokenizer(out)
