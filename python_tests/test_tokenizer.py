"""Llama2Tokenizer over a SentencePiece model trained here on local text (never downloaded)."""

from __future__ import annotations

import pytest
from llama_helpers import corpus_lines, train_tokenizer

from qlora_ext.models.llama2 import Llama2Tokenizer, llama2_tokenizer
from qlora_ext.training.config import ASSETS_DIR


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return llama2_tokenizer(train_tokenizer(str(tmp_path_factory.mktemp("spm")), vocab_size=320))


def test_ids_and_vocab(tokenizer):
    assert isinstance(tokenizer, Llama2Tokenizer)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, 0)
    assert tokenizer.vocab_size == 320
    assert tokenizer.stop_tokens == [2]


def test_encode_decode_round_trip(tokenizer):
    for text in [*corpus_lines(5, seed=3), "Write 3 words: ünïcödé ✓ falls back to bytes."]:
        ids = tokenizer.encode(text)
        assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
        assert all(0 <= i < tokenizer.vocab_size for i in ids)
        assert tokenizer.decode(ids) == text
    plain = tokenizer.encode("the quick fox", add_bos=False, add_eos=False)
    assert tokenizer.encode("the quick fox") == [1, *plain, 2]
    assert tokenizer.encode("the quick fox", add_eos=False) == [1, *plain]
    assert len(plain) < len("the quick fox")  # merges happened: pieces, not characters
    assert tokenizer.decode(plain) == "the quick fox"


def test_arguments_of_another_kind_are_named(tokenizer):
    # decode("abc") gave "abc" back (sentencepiece takes a str as pieces), an id past the vocabulary
    # sentencepiece's OUT_OF_RANGE naming none, encode(123) "Input must be str or bytes"
    import torch

    assert tokenizer.decode(torch.tensor(tokenizer.encode("the quick fox"))) == "the quick fox"
    with pytest.raises(TypeError, match=r"^Llama2Tokenizer.decode: argument 'ids' must be a sequence of token ids; got str$"):
        tokenizer.decode("abc")
    with pytest.raises(TypeError, match=r"^Llama2Tokenizer.decode: argument 'ids' must be a sequence of integer token ids; got \[1, 2.5\]$"):
        tokenizer.decode([1, 2.5])
    # bytes-likes were read as ids (bytes alone was refused), a dict decoded its keys, True was id 1
    for kind in (bytearray(b"ab"), memoryview(b"ab"), {5: "x"}, {5}):
        with pytest.raises(TypeError, match=rf"^Llama2Tokenizer.decode: argument 'ids' must be a sequence of token ids; got {type(kind).__name__}$"):
            tokenizer.decode(kind)
    with pytest.raises(TypeError, match=r"^Llama2Tokenizer.decode: argument 'ids' must be a sequence of integer token ids; got \[True, 5\]$"):
        tokenizer.decode([True, 5])
    with pytest.raises(TypeError, match=r"^Llama2Tokenizer.decode: argument 'ids' must be a sequence of integer token ids; got \[tensor\(True\)"):
        tokenizer.decode(torch.tensor([True, False]))
    assert tokenizer.decode(i for i in tokenizer.encode("the quick fox")) == "the quick fox"  # (any iterable of ids)
    for bad in (320, -1):
        with pytest.raises(ValueError, match=rf"^Llama2Tokenizer.decode: argument 'ids' must hold ids from 0 to 319 \(the vocabulary\); got {bad}$"):
            tokenizer.decode([5, bad])
    with pytest.raises(TypeError, match=r"^Llama2Tokenizer.encode: argument 'text' must be a str; got int$"):
        tokenizer.encode(123)


def test_text_that_is_not_unicode_is_named(tokenizer):
    # sentencepiece's binding failed on a lone surrogate (bytes that are not UTF-8, read with
    # surrogateescape) with "Unable to cast Python instance of type <class 'str'> to C++ type '?'"
    for trim in (False, True):
        with pytest.raises(ValueError, match=r"Llama2Tokenizer.encode: argument 'text' must be Unicode text; got a lone surrogate "
                                             r"'\\udce9' at character 3 \(bytes that are not UTF-8\?\)"):
            tokenizer.encode("caf\udce9", trim_leading_whitespace=trim)


def test_trim_leading_whitespace(tokenizer):
    prompt = tokenizer.encode("Question: the river", add_eos=False)
    answer = tokenizer.encode("carries stories", add_bos=False, trim_leading_whitespace=True)
    assert tokenizer.decode(prompt + answer) == "Question: the rivercarries stories"
    spaced = tokenizer.encode("carries stories", add_bos=False)
    assert tokenizer.decode(prompt + spaced) == "Question: the river carries stories"
    assert answer != spaced


def test_trim_leading_whitespace_keeps_leading_newlines():
    # The bundled tokenizer has a "\n\n" piece: "\n" + "\nhello" encodes the two newlines as
    # one piece, and slicing off the first newline's ids used to drop the text's own newline.
    bundled = llama2_tokenizer(ASSETS_DIR / "tokenizer.model")
    assert bundled.spm.encode("\n\n") != bundled.spm.encode("\n") * 2  # the merge this is about
    prompt = bundled.encode("Response:", add_eos=False)
    for text in ["\nhello", "\n\nhello there", "hello", " hello", "\n", ""]:
        answer = bundled.encode(text, add_bos=False, add_eos=False, trim_leading_whitespace=True)
        assert bundled.decode(prompt + answer) == "Response:" + text, repr(text)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"argument 'path' must be a SentencePiece model file; got '.*nope.model'"):
        llama2_tokenizer(tmp_path / "nope.model")


def test_a_file_far_larger_than_a_tokenizer_is_refused_by_its_size(tmp_path):
    # A weight shard given as tokenizer.path: sentencepiece read it whole for half a minute (and crashed past 2 GiB).
    big = tmp_path / "model-00001-of-00002.safetensors"
    with open(big, "wb") as f:
        f.truncate(3 << 30)  # sparse: no disk used
    with pytest.raises(ValueError, match=rf"argument 'path' must be a SentencePiece model file .*at most 64 MiB\); .* has {3 << 30} bytes"):
        llama2_tokenizer(big)


def test_builder_takes_torchtunes_arguments(tokenizer):
    from qlora_ext.models.llama2 import llama2_tokenizer

    tok = llama2_tokenizer(tokenizer.path, max_seq_len=16, prompt_template=None)
    assert tok.max_seq_len == 16 and tok.encode("hello") == tokenizer.encode("hello")
    with pytest.raises(ValueError, match=r"argument 'prompt_template' must be None: .*no chat template.*got 'torchtune.models.llama2.Llama2ChatTemplate'"):
        llama2_tokenizer(tokenizer.path, prompt_template="torchtune.models.llama2.Llama2ChatTemplate")
