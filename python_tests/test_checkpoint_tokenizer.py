"""The tokenizer files of a checkpoint folder: transformers reads them as our tokenizer encodes
(BOS first, no EOS), with the HF files of the source tokenizer kept where they describe it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qlora_ext.checkpoint.hf_tokenizer import save_hf_tokenizer
from qlora_ext.models.llama2 import llama2_tokenizer
from qlora_ext.training.config import ASSETS_DIR
from qlora_ext.training.data import alpaca_prompt

from llama_helpers import train_tokenizer

TOKENIZER = ASSETS_DIR / "tokenizer.model"
TEXTS = [alpaca_prompt({"instruction": "What is the opposite of thin?", "input": ""}), "Hello world", "a  b\n\nc", "café 5 38 32"]


def _hf_ids(folder, text):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(folder)(text)["input_ids"]


def test_a_bare_tokenizer_model_gets_a_llama2_config(tmp_path):
    paths = save_hf_tokenizer(tmp_path / "out", TOKENIZER)
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["tokenizer.model", "tokenizer_config.json"]
    config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is True and config["add_eos_token"] is False
    assert (config["bos_token"], config["eos_token"], config["unk_token"]) == ("<s>", "</s>", "<unk>")
    ours = llama2_tokenizer(TOKENIZER)
    for text in TEXTS:
        assert _hf_ids(tmp_path / "out", text) == ours.encode(text, add_bos=True, add_eos=False)
    # without the config, transformers would drop the BOS the model was trained with
    (tmp_path / "out" / "tokenizer_config.json").unlink()
    assert _hf_ids(tmp_path / "out", TEXTS[0])[0] != ours.bos_id


def test_a_tokenizer_model_that_is_missing_or_no_sentencepiece_model_is_named(tmp_path):
    # sentencepiece's own RuntimeErrors (NOT_FOUND, "could not parse ModelProto") came through
    with pytest.raises(FileNotFoundError, match=r"^save_hf_tokenizer: argument 'tokenizer_model' must be a SentencePiece model file; got "):
        save_hf_tokenizer(tmp_path / "out", tmp_path / "none.model")
    (tmp_path / "text.model").write_text("not a model\n")
    with pytest.raises(ValueError, match=r"^save_hf_tokenizer: argument 'tokenizer_model' must be a readable SentencePiece model file; "):
        save_hf_tokenizer(tmp_path / "out", tmp_path / "text.model")
    assert not (tmp_path / "out").exists()
    # a destination that is a file is named (NotADirectoryError came through)
    (tmp_path / "taken").write_text("x")
    for out in (tmp_path / "taken", tmp_path / "taken" / "sub"):
        with pytest.raises(ValueError, match=rf"{out} cannot be a folder to write into: {tmp_path / 'taken'} exists and is not a folder$"):
            save_hf_tokenizer(out, TOKENIZER)
    assert (tmp_path / "taken").read_text() == "x"


def test_the_source_folders_hf_files_come_along_with_its_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    source = tmp_path / "base"
    source.mkdir()
    shutil.copy(TOKENIZER, source / "tokenizer.model")
    save_hf_tokenizer(source, TOKENIZER)
    hf = transformers.AutoTokenizer.from_pretrained(source)
    hf.add_tokens(["<|im_start|>"])
    hf.save_pretrained(source)  # as transformers 5 saves it: BOS in tokenizer.json's post-processor, not in its config
    want = hf("<|im_start|> Hello world")["input_ids"]
    assert want[:2] == [llama2_tokenizer(TOKENIZER).bos_id, len(hf) - 1]  # BOS, and the added token whole
    out = tmp_path / "out"
    out.mkdir()
    (out / "added_tokens.json").write_text("{}")  # a stale file of an earlier save, gone after this one
    paths = save_hf_tokenizer(out, TOKENIZER, source_dir=source)
    expected = ["tokenizer.model"] + [n for n in ("tokenizer.json", "special_tokens_map.json", "added_tokens.json") if (source / n).exists()]
    assert [p.rsplit("/", 1)[-1] for p in paths] == expected + ["tokenizer_config.json"]
    assert sorted(p.name for p in out.iterdir()) == sorted(expected + ["tokenizer_config.json"])
    source_config = json.loads((source / "tokenizer_config.json").read_text())
    assert json.loads((out / "tokenizer_config.json").read_text()) == {**source_config, "add_bos_token": True, "add_eos_token": False}
    assert _hf_ids(out, "<|im_start|> Hello world") == want


def test_another_tokenizer_does_not_take_the_source_folders_files(tmp_path):
    source = tmp_path / "base"
    source.mkdir()
    shutil.copy(TOKENIZER, source / "tokenizer.model")
    (source / "tokenizer.json").write_text("{}")
    (source / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "add_bos_token": False}))
    (tmp_path / "spm").mkdir()
    other = train_tokenizer(str(tmp_path / "spm"))
    save_hf_tokenizer(tmp_path / "out", other, source_dir=source)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["tokenizer.model", "tokenizer_config.json"]
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["add_bos_token"] is True
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == Path(other).read_bytes()


def test_a_source_config_that_adds_eos_or_no_bos_is_set_to_encode_as_the_trainer(tmp_path):
    ours = llama2_tokenizer(TOKENIZER)
    for i, flags in enumerate(({"add_bos_token": True, "add_eos_token": True}, {"add_bos_token": False})):
        source = tmp_path / f"base{i}"
        source.mkdir()
        shutil.copy(TOKENIZER, source / "tokenizer.model")
        (source / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", **flags}))
        save_hf_tokenizer(tmp_path / f"out{i}", TOKENIZER, source_dir=source)
        for text in TEXTS:
            assert _hf_ids(tmp_path / f"out{i}", text) == ours.encode(text, add_bos=True, add_eos=False)


@pytest.mark.parametrize("flags", [{"add_bos_token": False}, {"add_bos_token": True, "add_eos_token": True}], ids=["no-bos", "eos"])
def test_a_source_saved_by_transformers_without_bos_or_with_eos_is_set_to_encode_as_the_trainer(tmp_path, flags):
    # transformers 5 saves the BOS/EOS rule in tokenizer.json's post-processor and goes by it when
    # loading: forcing the config's flags alone left the copied folder without BOS (or with EOS).
    transformers = pytest.importorskip("transformers")
    ours = llama2_tokenizer(TOKENIZER)
    source = tmp_path / "base"
    source.mkdir()
    shutil.copy(TOKENIZER, source / "tokenizer.model")
    (source / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", **flags}))
    transformers.AutoTokenizer.from_pretrained(source).save_pretrained(source)
    assert (source / "tokenizer.json").is_file()
    save_hf_tokenizer(tmp_path / "out", TOKENIZER, source_dir=source)
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    for text in TEXTS:
        assert _hf_ids(tmp_path / "out", text) == ours.encode(text, add_bos=True, add_eos=False)


def test_a_source_tokenizer_json_that_is_damaged_or_another_tokenizers_is_named(tmp_path):
    # They were copied as they were: the checkpoints then failed to load in transformers, or
    # tokenized with another vocabulary (a GPT-2 BPE tokenizer.json beside Llama's tokenizer.model).
    source = tmp_path / "base"
    source.mkdir()
    shutil.copy(TOKENIZER, source / "tokenizer.model")
    (source / "special_tokens_map.json").write_text("{not json")
    with pytest.raises(ValueError, match=rf"^{source / 'special_tokens_map.json'} is not valid JSON"):
        save_hf_tokenizer(tmp_path / "out", TOKENIZER, source_dir=source)
    (source / "special_tokens_map.json").unlink()
    (source / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": {"<unk>": 0, "Hello": 1}}}))
    with pytest.raises(ValueError, match=rf"^{source / 'tokenizer.json'} does not describe the tokenizer.model beside it: piece "
                                         r"'<s>' is id 1 there and None in tokenizer.json, .*; remove it"):
        save_hf_tokenizer(tmp_path / "out", TOKENIZER, source_dir=source)
    assert not (tmp_path / "out").exists()


def test_a_save_cut_short_leaves_every_file_in_place(tmp_path, monkeypatch):
    # The config had been taken away first, as a loader's "finder"; transformers then loaded the
    # folder without it, and without BOS.
    from qlora_ext.checkpoint import atomic

    out = tmp_path / "out"
    save_hf_tokenizer(out, TOKENIZER)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = atomic.os.replace

    def failing(src, dst):
        if str(dst).endswith("tokenizer_config.json"):
            raise OSError("disk full")
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", failing)
    with pytest.raises(OSError, match="disk full"):
        save_hf_tokenizer(out, TOKENIZER)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temporaries left, nothing missing
    assert _hf_ids(out, TEXTS[0]) == llama2_tokenizer(TOKENIZER).encode(TEXTS[0], add_bos=True, add_eos=False)
