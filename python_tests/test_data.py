"""Alpaca data: reading JSON/JSONL, the prompt template, BOS/EOS, truncation, the loss mask,
padding collate, seeded order and held-out split."""

from __future__ import annotations

import json

import pytest
import torch

from qlora_ext.training.data import (
    IGNORE_INDEX,
    PROMPT_NO_INPUT,
    InstructDataset,
    alpaca_prompt,
    epoch_order,
    eval_batches,
    iterate_batches,
    padded_collate,
    split_records,
    tokenize_example,
)
from qlora_ext.training.data_files import DataError, load_alpaca_records


class CharTokenizer:
    """One token per character (id = ord + 3), bos 1, eos 2, pad 0: lengths are easy to predict."""

    bos_id, eos_id, pad_id = 1, 2, 0

    def encode(self, text, add_bos=True, add_eos=True, trim_leading_whitespace=False):
        return [self.bos_id] * add_bos + [ord(c) + 3 for c in text] + [self.eos_id] * add_eos


RECORDS = [
    {"instruction": "Add.", "input": "1 2", "output": "3"},
    {"instruction": "Greet.", "input": "", "output": "hi"},
    {"instruction": "Say no.", "output": "no"},
]


def test_json_and_jsonl_read_alike(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(RECORDS))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n\n")
    a = load_alpaca_records([tmp_path / "a.json"])
    b = load_alpaca_records([tmp_path / "b.jsonl"])
    assert a == b and len(a) == 3 and a[2]["input"] == ""
    assert load_alpaca_records([tmp_path / "a.json", tmp_path / "b.jsonl"]) == a + b


def test_files_with_a_byte_order_mark(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(RECORDS), encoding="utf-8-sig")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS), encoding="utf-8-sig")
    assert load_alpaca_records([tmp_path / "a.json"]) == load_alpaca_records([tmp_path / "b.jsonl"])
    assert load_alpaca_records([tmp_path / "a.json"])[0]["instruction"] == "Add."


def test_bad_files_and_records_are_named(tmp_path):
    with pytest.raises(DataError, match=r"dataset.data_files: '.*missing.json' is not a file"):
        load_alpaca_records([tmp_path / "missing.json"])
    (tmp_path / "bad.jsonl").write_text('{"instruction": "x", "output": "y"}\n{"instruction": 3, "output": "y"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: key 'instruction' must be a string; got 3"):
        load_alpaca_records([tmp_path / "bad.jsonl"])
    (tmp_path / "broken.jsonl").write_text('{"instruction": \n')
    with pytest.raises(DataError, match=r"broken.jsonl' line 1 is not valid JSON"):
        load_alpaca_records([tmp_path / "broken.jsonl"])
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": RECORDS}, indent=1))
    with pytest.raises(DataError, match=r"wrapped.json' is one JSON object \(keys: data\); it must be a JSON list"):
        load_alpaca_records([tmp_path / "wrapped.json"])
    (tmp_path / "number.jsonl").write_text('{"instruction": "x", "input": 5, "output": "y"}\n')
    with pytest.raises(DataError, match=r"number.jsonl:1: key 'input' must be a string or null when present; got 5"):
        load_alpaca_records([tmp_path / "number.jsonl"])


def test_the_files_datasets_and_pandas_write(tmp_path):
    import bz2
    import gzip
    import lzma

    lines = "\n".join(json.dumps(r, ensure_ascii=False) for r in RECORDS) + "\n"
    want = load_alpaca_records([_write(tmp_path / "plain.jsonl", lines)])
    # compressed as datasets' to_json("x.jsonl.gz") writes (and bzip2, xz): read as they are
    for name, compress in (("a.jsonl.gz", gzip.compress), ("a.jsonl.bz2", bz2.compress), ("a.jsonl.xz", lzma.compress)):
        (tmp_path / name).write_bytes(compress(lines.encode()))
        assert load_alpaca_records([tmp_path / name]) == want, name
    # a glob's matches, in sorted order; CRLF line ends
    (tmp_path / "parts").mkdir()
    _write(tmp_path / "parts" / "b.jsonl", lines.replace("\n", "\r\n"))
    _write(tmp_path / "parts" / "a.json", json.dumps(RECORDS[:1]))
    assert load_alpaca_records([tmp_path / "parts" / "*.json*"]) == want[:1] + want
    with pytest.raises(DataError, match=r"the pattern '.*\*.parquet' matches no file"):
        load_alpaca_records([tmp_path / "parts" / "*.parquet"])
    # U+2028, U+2029 and U+0085 may stand raw in a JSON string (ensure_ascii=False writes them so);
    # str.splitlines() broke such a record in two
    odd = [{"instruction": "Join\u2028these\u2029lines\x85please", "input": "", "output": "ok"}, RECORDS[0]]
    text = "\n".join(json.dumps(r, ensure_ascii=False) for r in odd) + "\n"
    assert "\u2028" in text
    assert [r["instruction"] for r in load_alpaca_records([_write(tmp_path / "odd.jsonl", text)])] == [odd[0]["instruction"], "Add."]


def test_other_forms_are_named(tmp_path):
    cases = [
        (_write(tmp_path / "pandas.json", json.dumps({k: {"0": v} for k, v in RECORDS[0].items()})),
         r"is column-oriented JSON \(pandas' default to_json, or columns as lists; keys: instruction, input, output\): write it one "
         r"record per line"),
        # columns as lists (df.to_dict("list"), Dataset.to_dict()) were read as one record whose instruction is no string
        (_write(tmp_path / "columns.json", json.dumps({k: [v, v] for k, v in RECORDS[0].items()})),
         r"'.*columns.json' is column-oriented JSON \(pandas' default to_json, or columns as lists; keys: instruction, input, output\)"),
        (_write(tmp_path / "columns_pretty.json", json.dumps({k: [v, v] for k, v in RECORDS[0].items()}, indent=1)),
         r"'.*columns_pretty.json' is column-oriented JSON"),
        (_write(tmp_path / "wrapped.jsonl", json.dumps({"train": RECORDS}) + "\n"),
         r"'.*wrapped.jsonl' is one JSON object \(keys: train\); it must be a JSON list"),
        (_write(tmp_path / "chat.jsonl", json.dumps({"conversations": [{"from": "human", "value": "hi"}]}) + "\n"),
         r"record .*chat.jsonl:1 has no 'instruction' \(its keys: conversations\); records must be "
         r"\{instruction, input, output\} \(chat records are not supported\)"),
        (_write(tmp_path / "pretty.jsonl", json.dumps(RECORDS[0], indent=1) + "\n" + json.dumps(RECORDS[1], indent=1)),
         r"holds 2 JSON values one after another, over several lines each"),
        (_write(tmp_path / "twice.jsonl", '{"instruction": "a", "output": "first", "output": "second"}\n'),
         r"record .*twice.jsonl:1 has the key 'output' twice"),
        (_write(tmp_path / "data.csv", "instruction,input,output\na,,b\n"), r"'.*data.csv' is a CSV file"),
        (_write(tmp_path / "data.parquet", "PAR1xxxx"), r"'.*data.parquet' is a Parquet file"),
    ]
    for path, message in cases:
        with pytest.raises(DataError, match=message):
            load_alpaca_records([path])
    # the message of a column-oriented file stays short, however many records it holds
    big = {k: {str(i): v for i in range(5000)} for k, v in RECORDS[0].items()}
    with pytest.raises(DataError, match=r"column-oriented JSON \(pandas' default to_json, or columns as lists; keys") as err:
        load_alpaca_records([_write(tmp_path / "big.json", json.dumps(big))])
    assert len(str(err.value)) < 400
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "dataset_info.json").write_text("{}")
    with pytest.raises(DataError, match=r"'.*saved' is a datasets.save_to_disk folder; export it as JSON lines"):
        load_alpaca_records([tmp_path / "saved"])
    with pytest.raises(DataError, match=r"'.*parts' is a folder; give its files"):
        (tmp_path / "parts").mkdir()
        load_alpaca_records([tmp_path / "parts"])
    with pytest.raises(DataError, match=r"is not a file \(several files go in a list: dataset.data_files=\[a.json,b.jsonl\]\)"):
        load_alpaca_records([f"{tmp_path / 'a.json'},{tmp_path / 'b.jsonl'}"])


def test_odd_inputs_are_named_or_read(tmp_path):
    import gzip

    rec = json.dumps(RECORDS[0])
    # CR-only line ends (classic Mac) and raw tabs in a list's strings (as datasets reads them)
    assert len(load_alpaca_records(_write(tmp_path / "cr.jsonl", rec + "\r" + rec + "\r"))) == 2
    tab = load_alpaca_records([_write(tmp_path / "tab.json", '[{"instruction": "a\tb", "output": "c"}]')])
    assert tab[0]["instruction"] == "a\tb"
    # a glob through a symbolic link to its own folder reads each file once
    (tmp_path / "d" / "sub").mkdir(parents=True)
    _write(tmp_path / "d" / "a.json", json.dumps(RECORDS[:1]))
    _write(tmp_path / "d" / "sub" / "b.jsonl", rec + "\n")
    (tmp_path / "d" / "loop").symlink_to(tmp_path / "d")
    assert len(load_alpaca_records([str(tmp_path / "d" / "**" / "*.json*")])) == 2
    damaged = bytearray(gzip.compress((rec + "\n").encode() * 1000))
    damaged[20:60] = bytes(b ^ 0x55 for b in damaged[20:60])
    cases = [
        (tmp_path / "damaged.jsonl.gz", bytes(damaged), r"is gzip-compressed but cannot be decompressed"),
        (tmp_path / "digits.jsonl", ('{"instruction": "a", "output": "c", "n": 1' + "0" * 5000 + "}\n").encode(),
         r"'.*digits.jsonl' line 1 is not valid JSON: Exceeds the limit \(4300 digits\) for integer string conversion: value has "
         r"5001 digits$"),  # (without Python's advice to raise that limit)
        (tmp_path / "deep.json", ('[{"instruction": "a", "output": "c", "x": ' + "[" * 100000 + "]" * 100000 + "}]").encode(),
         r"'.*deep.json' is not valid JSON: it nests its values too deeply to read$"),
        (tmp_path / "surrogate.jsonl", b'{"instruction": "a\\ud800b", "output": "c"}\n',
         r"record .*surrogate.jsonl:1: key 'instruction' holds a lone surrogate"),
        (tmp_path / "data.csv.gz", gzip.compress(b"instruction,input,output\na,,b\n"), r"'.*data.csv.gz' is a CSV file"),
        (tmp_path / "utf16.json", json.dumps(RECORDS).encode("utf-16"), r"cannot be read as UTF-8 JSON text \(it is UTF-16\).*save it as UTF-8"),
    ]
    for path, data, message in cases:
        path.write_bytes(data)
        with pytest.raises(DataError, match=message):
            load_alpaca_records([path])
    # a cut-off last line of a large file is named quickly (a whole-file rescan per failure was quadratic)
    big = _write(tmp_path / "big.jsonl", (rec + "\n") * 20000 + rec[:10])
    with pytest.raises(DataError, match=r"'.*big.jsonl' line 20001 is not valid JSON"):
        load_alpaca_records([big])
    # ".csv" earlier in a JSON lines file's name (a converted export) is not its format
    converted = _write(tmp_path / "export.csv.jsonl", rec + "\n")
    assert load_alpaca_records([converted]) == [json.loads(rec)]


def _write(path, text):
    path.write_text(text, encoding="utf-8", newline="")
    return path


def test_null_input_means_no_input(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"instruction": "Greet.", "input": None, "output": "Hi"}) + "\n")
    assert load_alpaca_records([tmp_path / "a.jsonl"]) == [{"instruction": "Greet.", "input": "", "output": "Hi"}]


def test_column_map_reads_records_named_otherwise(tmp_path):
    # torchtune's column_map (a Dolly-style file: instruction, context, response): was refused
    dolly = [{"instruction": r["instruction"], "context": r.get("input"), "response": r["output"], "category": "qa"} for r in RECORDS]
    path = _write(tmp_path / "dolly.jsonl", "\n".join(json.dumps(r) for r in dolly) + "\n")
    columns = {"input": "context", "output": "response"}
    assert load_alpaca_records([path], columns) == [{k: r.get(k) or "" for k in ("instruction", "input", "output")} for r in RECORDS]
    with pytest.raises(DataError, match=r"record .*dolly.jsonl:1 has no 'output' \(its keys: instruction, context, response, category\); "
                                        r"records must be \{instruction, input, output\}; where the file names it otherwise, "
                                        r"dataset.column_map.output=KEY reads it from KEY$"):
        load_alpaca_records([path])
    # a file of one record with a list among its values is a record, not an object wrapping records
    one = _write(tmp_path / "one.jsonl", json.dumps({"prompt": "Greet.", "response": "Hi", "tags": ["a"]}) + "\n")
    assert load_alpaca_records([one], {"instruction": "prompt", "output": "response"}) == [
        {"instruction": "Greet.", "input": "", "output": "Hi"}]
    with pytest.raises(DataError, match=r"'.*one.jsonl' is one JSON object \(keys: prompt, response, tags\); .* records whose keys "
                                        r"are named otherwise take dataset.column_map"):
        load_alpaca_records([one])
    # a lone record with the Alpaca names where the map names others is a record missing the mapped key
    alpaca = _write(tmp_path / "alpaca.jsonl", json.dumps({"instruction": "Greet.", "output": "Hi", "tags": ["a"]}) + "\n")
    with pytest.raises(DataError, match=r"record .*alpaca.jsonl:1 has no 'prompt' .*\(dataset.column_map.instruction\)"):
        load_alpaca_records([alpaca], {"instruction": "prompt"})
    # column-oriented JSON is named so under a map too
    columns_file = _write(tmp_path / "columns.json", json.dumps({"prompt": ["G", "X"], "response": ["H", "Y"]}))
    with pytest.raises(DataError, match=r"is column-oriented JSON"):
        load_alpaca_records([columns_file], {"instruction": "prompt", "output": "response"})
    with pytest.raises(DataError, match=r"has no 'answer' .*records must be \{instruction, context, answer\} \(dataset.column_map.output\)"):
        load_alpaca_records([path], {"input": "context", "output": "answer"})
    with pytest.raises(DataError, match=r"record .*bad.jsonl:1: key 'context' must be a string or null when present; got 3"):
        load_alpaca_records([_write(tmp_path / "bad.jsonl", json.dumps({**dolly[0], "context": 3}) + "\n")], columns)


def test_a_column_map_input_key_no_record_holds_is_named(tmp_path):
    # a typo (contxt for context) trained every example without its input, silently (helper-145)
    dolly = [{"instruction": r["instruction"], "context": r.get("input"), "response": r["output"]} for r in RECORDS]
    path = _write(tmp_path / "dolly.jsonl", "\n".join(json.dumps(r) for r in dolly) + "\n")
    with pytest.raises(DataError, match=r"^dataset.column_map.input: no record has the key 'contxt' \(the first record's keys: "
                                        r"instruction, context, response\); name the records' input key, or remove"):
        load_alpaca_records([path], {"input": "contxt", "output": "response"})
    # records without the default 'input' key are records without an input, as before
    plain = _write(tmp_path / "plain.jsonl", json.dumps({"instruction": "Greet.", "output": "Hi"}) + "\n")
    assert load_alpaca_records([plain]) == [{"instruction": "Greet.", "input": "", "output": "Hi"}]
    # one record holding the mapped key is enough (the others have no input)
    mixed = _write(tmp_path / "mixed.jsonl", json.dumps({"instruction": "A", "response": "B"}) + "\n"
                   + json.dumps({"instruction": "C", "ctx": "D", "response": "E"}) + "\n")
    assert [r["input"] for r in load_alpaca_records([mixed], {"input": "ctx", "output": "response"})] == ["", "D"]


def test_alpaca_template():
    assert alpaca_prompt(RECORDS[1]) == PROMPT_NO_INPUT.format(instruction="Greet.")
    with_input = alpaca_prompt(RECORDS[0])
    assert "paired with an input" in with_input
    assert with_input.endswith("### Instruction:\nAdd.\n\n### Input:\n1 2\n\n### Response:\n")


@pytest.mark.parametrize("train_on_input", [False, True])
def test_tokens_labels_and_mask(train_on_input):
    tok = CharTokenizer()
    tokens, labels = tokenize_example(tok, RECORDS[0], None, train_on_input)
    prompt = alpaca_prompt(RECORDS[0])
    assert tokens[0] == tok.bos_id and tokens[-1] == tok.eos_id
    assert len(tokens) == 1 + len(prompt) + 1 + 1
    assert tokens[-2] == ord("3") + 3
    if train_on_input:
        assert labels == tokens
    else:
        assert labels[: 1 + len(prompt)] == [IGNORE_INDEX] * (1 + len(prompt))
        assert labels[1 + len(prompt) :] == tokens[1 + len(prompt) :]


def test_truncation_keeps_eos_last():
    tok = CharTokenizer()
    full, _ = tokenize_example(tok, RECORDS[0], None, True)
    # Cut inside the prompt, training on it: the last token and its label become EOS (torchtune).
    tokens, labels = tokenize_example(tok, RECORDS[0], 10, True)
    assert tokens == full[:9] + [tok.eos_id] and labels == tokens
    # Not training on the prompt: the EOS there is not a label.
    tokens, labels = tokenize_example(tok, RECORDS[0], 10, False)
    assert tokens == full[:9] + [tok.eos_id] and labels == [IGNORE_INDEX] * 10
    # Cut inside the response: its cut end is labelled EOS.
    prompt_len = 1 + len(alpaca_prompt(RECORDS[1]))
    long = {**RECORDS[1], "output": "hello there"}
    full, _ = tokenize_example(tok, long, None, False)
    tokens, labels = tokenize_example(tok, long, prompt_len + 4, False)
    assert tokens == full[: prompt_len + 3] + [tok.eos_id]
    assert labels == [IGNORE_INDEX] * prompt_len + full[prompt_len : prompt_len + 3] + [tok.eos_id]
    # Exactly max_seq_len long: nothing changes.
    exact = len(tokenize_example(tok, RECORDS[0], None, True)[0])
    assert tokenize_example(tok, RECORDS[0], exact, True) == tokenize_example(tok, RECORDS[0], None, True)


# Token ids torchtune 0.6.1 gives with the bundled tokenizer (its alpaca_dataset through
# llama2_tokenizer), recorded here as the reference: its default Llama2ChatTemplate, and with
# prompt_template=None an output with trailing spaces (which torchtune strips).
_TORCHTUNE_CHAT_RECORD_0 = [
    1, 958, 94, 1001, 1011, 998, 980, 96, 494, 297, 439, 503, 449, 501, 262, 492, 969, 495, 262, 499, 449, 504, 500, 289, 496, 458, 502,
    446, 536, 289, 277, 330, 289, 283, 389, 370, 366, 386, 458, 497, 446, 958, 958, 94, 50, 1001, 1011, 998, 980, 96, 271, 283, 389, 370,
    366, 386, 273, 300, 277, 267, 386, 366, 370, 389, 969, 2,
]
_TORCHTUNE_PLAIN_TRAILING_SPACES = [
    1, 494, 297, 439, 503, 449, 501, 262, 492, 969, 495, 262, 499, 449, 504, 500, 289, 496, 458, 502, 446, 980, 318, 291, 597, 285, 972,
    961, 976, 351, 273, 729, 520, 458, 497, 446, 1020, 966, 962, 977, 259, 552, 272, 318, 291, 597, 285, 972, 961, 976, 351, 969, 2,
]


def test_tokens_are_torchtunes():
    from qlora_ext.models.llama2 import llama2_tokenizer
    from qlora_ext.training.config import ASSETS_DIR

    tok = llama2_tokenizer(ASSETS_DIR / "tokenizer.model")
    record = load_alpaca_records([ASSETS_DIR / "tiny_alpaca.jsonl"])[0]
    tokens, labels = tokenize_example(tok, record, None, False, "llama2_chat")
    assert tokens == _TORCHTUNE_CHAT_RECORD_0
    assert labels == [IGNORE_INDEX] * 50 + tokens[50:]  # BOS, [INST], the prompt and [/INST] are not trained
    assert tokenize_example(tok, record, 40, False, "llama2_chat") == (tokens[:39] + [tok.eos_id], [IGNORE_INDEX] * 40)
    spaces = {"instruction": "Trailing spaces in output.", "input": "", "output": "Answer with trailing spaces.   "}
    tokens, labels = tokenize_example(tok, spaces, None, False, "alpaca")
    assert tokens == _TORCHTUNE_PLAIN_TRAILING_SPACES and labels == [IGNORE_INDEX] * 36 + tokens[36:]
    with pytest.raises(ValueError, match=r"argument 'template' must be one of alpaca, llama2_chat; got 'chatml'"):
        tokenize_example(tok, record, None, False, "chatml")


def test_padded_collate():
    batch = padded_collate([([1, 5, 6], [IGNORE_INDEX, 5, 6]), ([1, 7], [IGNORE_INDEX, 7])], pad_id=0)
    assert batch["tokens"].tolist() == [[1, 5, 6], [1, 7, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 5, 6], [IGNORE_INDEX, 7, IGNORE_INDEX]]
    assert batch["tokens"].dtype == torch.long


def test_epoch_order_is_seeded_and_differs_by_epoch():
    assert epoch_order(50, 0, 7, True) == epoch_order(50, 0, 7, True)
    assert epoch_order(50, 0, 7, True) != epoch_order(50, 1, 7, True)
    assert epoch_order(50, 0, 7, True) != epoch_order(50, 0, 8, True)
    assert sorted(epoch_order(50, 3, 7, True)) == list(range(50))
    assert epoch_order(5, 0, 7, False) == [0, 1, 2, 3, 4]


def test_epoch_order_takes_any_valid_seed():
    # small seeds keep the order they always had; the largest (2**63 - 1) and 10**15 no longer overflow
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(7 * 100_003 + 1)).tolist()
    assert epoch_order(10, 1, 7, True) == expected
    for seed in (10**15, 2**63 - 1):
        order = epoch_order(10, 3, seed, True)
        assert sorted(order) == list(range(10)) and order == epoch_order(10, 3, seed, True)


def test_split_is_seeded_disjoint_and_complete():
    records = [{"instruction": str(i), "input": "", "output": "x"} for i in range(100)]
    train, val = split_records(records, 0.1, seed=3)
    assert len(val) == 10 and len(train) == 90
    assert {r["instruction"] for r in train}.isdisjoint(r["instruction"] for r in val)
    assert split_records(records, 0.1, seed=3) == (train, val)
    assert split_records(records, 0.1, seed=4)[1] != val
    assert split_records(records, 0.0, seed=3) == (records, [])
    # the nearest whole number, halves up alike (2.5 -> 3 as 3.5 -> 4; round() gave 2 and 4)
    assert [len(split_records(records[:n], 0.1, seed=3)[1]) for n in (25, 35, 44, 5)] == [3, 4, 4, 1]


def test_batches_resume_position_and_eval_batches():
    ds = InstructDataset(RECORDS * 4, CharTokenizer(), None, False)
    order = epoch_order(len(ds), 0, 1, True)
    full = list(iterate_batches(ds, order, 5, pad_id=0))
    assert len(full) == 2  # 12 examples, batch 5: the partial batch is dropped
    resumed = list(iterate_batches(ds, order, 5, pad_id=0, start_batch=1))
    assert torch.equal(resumed[0]["tokens"], full[1]["tokens"])
    ev = eval_batches(ds, 5, pad_id=0, max_batches=None)
    assert [b["tokens"].shape[0] for b in ev] == [5, 5, 2]
    assert len(eval_batches(ds, 5, pad_id=0, max_batches=1)) == 1


def test_bundled_dataset_with_bundled_tokenizer():
    import sentencepiece as spm

    from qlora_ext.training.config import ASSETS_DIR

    records = load_alpaca_records([ASSETS_DIR / "tiny_alpaca.jsonl"])
    assert len(records) >= 500
    sp = spm.SentencePieceProcessor(model_file=str(ASSETS_DIR / "tokenizer.model"))
    assert (sp.bos_id(), sp.eos_id(), sp.unk_id()) == (1, 2, 0)  # Llama-2's ids
    lengths = [len(sp.encode(alpaca_prompt(r) + r["output"])) for r in records]
    assert max(lengths) <= 128  # the tiny config's max_seq_len never cuts an answer


def test_bundled_dataset_is_what_the_project_script_generates():
    # qlora_ext/assets/tiny_alpaca.jsonl comes from scripts/make_tiny_assets.py (tiny_world, seed 0).
    import importlib.util
    from pathlib import Path

    from qlora_ext.training.config import ASSETS_DIR

    script = Path(__file__).resolve().parent.parent / "scripts" / "tiny_world.py"
    spec = importlib.util.spec_from_file_location("tiny_world", script)
    tiny_world = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny_world)
    generated = "".join(json.dumps(r) + "\n" for r in tiny_world.instruction_records(0))
    assert (ASSETS_DIR / "tiny_alpaca.jsonl").read_text() == generated
