"""The tokenizer files of a checkpoint folder: transformers reads them as our tokenizer encodes
(BOS first, no EOS), with the HF files of the source tokenizer kept where they describe it."""

from __future__ import annotations

import json
import shutil

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
    assert (out / "tokenizer_config.json").read_bytes() == (source / "tokenizer_config.json").read_bytes()
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
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == open(other, "rb").read()
