"""Llama-2's SentencePiece tokenizer (``tokenizer.model``) with torchtune's text interface:
``encode``/``decode``, ``bos_id``, ``eos_id``, ``pad_id``, ``vocab_size``, ``stop_tokens``. torchtune's
chat side (``tokenize_messages``, prompt templates) is not here: the trainer formats its
instruction data itself."""

from __future__ import annotations

import operator
import os

import torch

from qlora_ext._arguments import lone_surrogate_at

# SentencePiece models of large vocabularies stay well below this; a file above it is not one.
MAX_TOKENIZER_BYTES = 64 << 20

class Llama2Tokenizer:
    """Text <-> token ids through a SentencePiece model.

    Args:
        path: the ``tokenizer.model`` file.
        max_seq_len: kept as an attribute, as torchtune's (which cuts only ``tokenize_messages``,
            not here; ``encode`` never truncates, in either).
        prompt_template: must be None: no chat templates here (see the module docstring).

    Attributes:
        bos_id, eos_id: the model's begin/end-of-sequence ids (1 and 2 for Llama-2).
        pad_id: 0, the id batches are padded with (Llama-2 has no pad piece; 0 is ``<unk>``,
            and padded positions are masked out of the loss anyway).
        vocab_size: number of pieces.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a readable SentencePiece model, or defines no BOS or EOS piece,
            or ``prompt_template`` is given.
    """

    def __init__(self, path: str | os.PathLike, max_seq_len: int | None = None, prompt_template=None):
        from sentencepiece import SentencePieceProcessor

        if prompt_template is not None:
            raise ValueError(
                "Llama2Tokenizer: argument 'prompt_template' must be None: this tokenizer encodes plain text (no "
                "tokenize_messages, so no chat template; the trainer's dataset.template picks the prompt format); got "
                f"{prompt_template!r}"
            )
        self.max_seq_len = max_seq_len

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Llama2Tokenizer: argument 'path' must be a SentencePiece model file; got {path!r}")
        self.path = path
        size = os.path.getsize(path)
        if size > MAX_TOKENIZER_BYTES:  # a weight shard given by mistake: sentencepiece would read it whole (or crash past 2 GiB)
            raise ValueError(f"Llama2Tokenizer: argument 'path' must be a SentencePiece model file (Llama-2's is 0.5 MB; at most "
                             f"{MAX_TOKENIZER_BYTES >> 20} MiB); {path!r} has {size} bytes: is it another file of the checkpoint?")
        try:
            self.spm = SentencePieceProcessor(model_file=path)
        except (OSError, RuntimeError) as e:  # sentencepiece raises RuntimeError for a file it cannot parse
            raise ValueError(f"Llama2Tokenizer: argument 'path' must be a readable SentencePiece model file; {path!r} is not: {e}") from None
        self.vocab_size = self.spm.vocab_size()
        self.bos_id = self.spm.bos_id()
        self.eos_id = self.spm.eos_id()
        self.pad_id = 0
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(
                f"Llama2Tokenizer: the SentencePiece model {path} must define BOS and EOS pieces; "
                f"got bos_id={self.bos_id}, eos_id={self.eos_id}"
            )
        # Ids of "\n" and of the lone space piece; used to strip SentencePiece's leading space
        # (see encode).
        self._newline_ids = self.spm.encode("\n")
        self._space_id = self.spm.piece_to_id("\u2581")  # unk_id if the model has no lone "▁"

    @property
    def stop_tokens(self) -> list[int]:
        """Ids that end generation."""
        return [self.eos_id]

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True, trim_leading_whitespace: bool = False) -> list[int]:
        """Token ids of ``text``.

        Args:
            text: the string.
            add_bos: prepend ``bos_id``.
            add_eos: append ``eos_id``.
            trim_leading_whitespace: SentencePiece encodes a text as if it began with a space;
                set this when ``text`` continues an earlier piece (e.g. a response encoded
                apart from its prompt) so no space token appears at the junction.

        Returns:
            The ids, a list of ints.

        Raises:
            TypeError: ``text`` is not a str.
            ValueError: ``text`` holds a lone surrogate (no Unicode text: bytes that were not
                UTF-8, decoded with ``errors="surrogateescape"``, or a ``\\ud800`` escape).
        """
        if not isinstance(text, str):
            raise TypeError(f"Llama2Tokenizer.encode: argument 'text' must be a str; got {type(text).__name__}")
        try:
            ids = self._encode_trimmed(text) if trim_leading_whitespace else self.spm.encode(text)
        except RuntimeError:  # sentencepiece's binding cannot convert such a str (and names nothing)
            at = lone_surrogate_at(text) if isinstance(text, str) else None
            if at is None:
                raise
            raise ValueError(f"Llama2Tokenizer.encode: argument 'text' must be Unicode text; got a lone surrogate "
                             f"{text[at]!r} at character {at} (bytes that are not UTF-8?)") from None
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def _encode_trimmed(self, text: str) -> list[int]:
        # Encode after a newline, then drop the newline's ids: the dummy space prefix attaches to
        # the newline, not to the text (torchtune's approach).
        ids = self.spm.encode("\n" + text)
        n = len(self._newline_ids)
        if ids[:n] == self._newline_ids:
            return ids[n:]
        # The text's own first characters merged with that newline (a text starting with "\n"
        # and a model with a "\n\n" piece): slicing would drop them. Encode the text alone and
        # drop the dummy prefix when it stands as its own piece.
        ids = self.spm.encode(text)
        if ids and ids[0] == self._space_id and self._space_id != self.spm.unk_id():
            return ids[1:]
        return ids  # the prefix merged into the first piece: keep it rather than lose text

    def decode(self, ids: list[int]) -> str:
        """The text of ``ids`` (BOS/EOS and other control pieces produce no text).

        Raises:
            TypeError: ``ids`` is a string, or holds something other than integers.
            ValueError: an id outside the vocabulary (0 to ``vocab_size`` - 1).
        """
        # (sentencepiece took a str as pieces, and gave it back; bytes are read as ids; a dict or set
        # has no order)
        if isinstance(ids, (str, bytes, bytearray, memoryview, dict, set, frozenset)):
            raise TypeError(f"Llama2Tokenizer.decode: argument 'ids' must be a sequence of token ids; got {type(ids).__name__}")
        try:
            ids = list(ids)
            # (True is 1 to operator.index; a bool tensor's elements are 0-d bool tensors)
            if any(isinstance(i, bool) or (isinstance(i, torch.Tensor) and i.dtype == torch.bool) for i in ids):
                raise TypeError
            ids = [operator.index(i) for i in ids]  # (a tensor's elements too)
        except TypeError:
            raise TypeError(f"Llama2Tokenizer.decode: argument 'ids' must be a sequence of integer token ids; got {ids!r:.100}") from None
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"Llama2Tokenizer.decode: argument 'ids' must hold ids from 0 to {self.vocab_size - 1} (the "
                             f"vocabulary); got {bad}")
        return self.spm.decode(ids)


def llama2_tokenizer(path: str | os.PathLike, max_seq_len: int | None = None, prompt_template=None) -> Llama2Tokenizer:
    """The Llama-2 tokenizer from a ``tokenizer.model`` file (torchtune's builder name and
    arguments; ``prompt_template`` must be None, see ``Llama2Tokenizer``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: as ``Llama2Tokenizer``.
    """
    return Llama2Tokenizer(path, max_seq_len, prompt_template)
