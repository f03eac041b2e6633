"""Reading instruction records from the files users bring: a JSON list of ``{instruction, input,
output}`` records (as alpaca_data_cleaned.json) or JSON lines (one record a line, as
``datasets.Dataset.to_json`` writes), plain or compressed with gzip, bzip2 or xz, named one by one
or by a glob. Any other form (Parquet, CSV, Arrow, a ``save_to_disk`` folder, column-oriented JSON,
chat records) is refused with what it is and how to turn it into one of these.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import json
import lzma
import os
import reprlib
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from qlora_ext._arguments import lone_surrogate_at, parse_error_text

FORMS = "local JSON or JSONL files of {instruction, input, output} records"
_COMPRESSED = {b"\x1f\x8b": ("gzip", gzip.decompress), b"BZh": ("bzip2", bz2.decompress),
               b"\xfd7zXZ\x00": ("xz", lzma.decompress)}
_CHAT_KEYS = {"conversations", "messages", "dialog", "chosen"}
ALPACA_COLUMNS = {"instruction": "instruction", "input": "input", "output": "output"}


class DataError(ValueError):
    """A data file or record the trainer cannot use."""


def load_alpaca_records(files: Sequence[str | Path] | str | Path, column_map: Mapping[str, str] | None = None) -> list[dict[str, str]]:
    """Reads and checks the records of JSON / JSONL files (a list of them, or one), in the order
    given (a glob's matches in sorted order, each file once). ``column_map`` (torchtune's, the
    config's ``dataset.column_map``): the records' key for each of instruction, input and output,
    where they are named otherwise; the records returned use the Alpaca names.

    Raises:
        DataError: a missing or unreadable file, a form other than a JSON list or JSON lines, bad
            JSON, a record without a string instruction/output, or a ``column_map`` input key
            that no record holds.
    """
    if isinstance(files, (str, Path)):
        files = [files]
    if not files:
        raise DataError("dataset.data_files: must name at least one JSON or JSONL file; got an empty list")
    records: list[dict[str, str]] = []
    columns = {**ALPACA_COLUMNS, **(column_map or {})}
    input_seen, first_keys = False, None
    for file in [path for entry in files for path in _expand(entry)]:
        for where, item in _items(file, _text(file), columns):
            records.append(_check_record(where, item, columns))
            input_seen = input_seen or columns["input"] in item
            first_keys = first_keys or _keys(item)
    if not records:
        raise DataError(f"dataset.data_files: no records in {', '.join(map(str, files))}")
    if not input_seen and columns["input"] != ALPACA_COLUMNS["input"]:  # (a typo would drop every input silently)
        raise DataError(f"dataset.column_map.input: no record has the key '{columns['input']}' (the first record's keys: "
                        f"{first_keys}); name the records' input key, or remove dataset.column_map.input for records without one")
    return records


def _expand(entry: str | Path) -> list[Path]:
    """The file an entry names, or a glob's matches; refused with what the entry is otherwise."""
    path = Path(entry)
    if path.is_file():
        return [path]
    text = str(entry)
    if any(c in text for c in "*?["):
        # each file once: a ** pattern follows symbolic links to folders, to the same files again
        matches = sorted({os.path.realpath(p): Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file()}.values())
        if not matches:
            raise DataError(f"dataset.data_files: the pattern '{entry}' matches no file")
        return matches
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
            raise DataError(
                f"dataset.data_files: '{entry}' is a datasets.save_to_disk folder; export it as JSON lines, e.g. "
                "datasets.load_from_disk(folder).to_json('train.jsonl'), and give that file"
            )
        raise DataError(f"dataset.data_files: '{entry}' is a folder; give its files, e.g. '{path / '*.json'}' or a list")
    if "://" in text:
        raise DataError(f"dataset.data_files: '{entry}' is a URL; downloads are not supported: give {FORMS}")
    hint = " (several files go in a list: dataset.data_files=[a.json,b.jsonl])" if "," in text else ""
    raise DataError(f"dataset.data_files: '{entry}' is not a file{hint}; give {FORMS}")


def _text(file: Path) -> str:
    try:
        data = file.read_bytes()
    except OSError as e:
        raise DataError(f"dataset.data_files: '{file}' cannot be read: {e}") from None
    for magic, (kind, decompress) in _COMPRESSED.items():
        if data.startswith(magic):
            try:
                data = decompress(data)
            except (OSError, EOFError, lzma.LZMAError, zlib.error, ValueError) as e:
                raise DataError(f"dataset.data_files: '{file}' is {kind}-compressed but cannot be decompressed: {e}") from None
            break
    other = _other_format(file, data)
    if other:
        raise DataError(f"dataset.data_files: '{file}' is {other}; give {FORMS}")
    try:
        return data.decode("utf-8-sig")  # a byte order mark (Windows editors) is not JSON
    except UnicodeDecodeError as e:
        utf16 = " (it is UTF-16)" if data.startswith((b"\xff\xfe", b"\xfe\xff")) else ""
        raise DataError(f"dataset.data_files: '{file}' cannot be read as UTF-8 JSON text{utf16}: {e}; save it as UTF-8") from None


def _other_format(file: Path, data: bytes) -> str | None:
    """What a file that is neither JSON nor JSON lines is, where its first bytes or name tell."""
    if data.startswith(b"PAR1"):
        return "a Parquet file (export it with datasets or pandas: .to_json(path, orient='records', lines=True))"
    if data.startswith((b"ARROW1", b"\xff\xff\xff\xff")):
        return "an Arrow file (a datasets.save_to_disk shard: export the dataset with .to_json('train.jsonl'))"
    if data.startswith(b"PK\x03\x04"):
        return "a zip archive (extract its JSON files)"
    if data.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd-compressed (decompress it first, e.g. with unzstd)"
    suffixes = [s.lower() for s in file.suffixes]  # the format's suffix: the last, or the one before a compression suffix
    if suffixes and suffixes[-1] in (".gz", ".bz2", ".xz", ".zst", ".zstd"):
        suffixes = suffixes[:-1]
    if suffixes and suffixes[-1] in (".csv", ".tsv"):
        return "a CSV file (convert it to JSON lines, e.g. pandas.read_csv(path).to_json(out, orient='records', lines=True))"
    return None


def _items(file: Path, text: str, columns: Mapping[str, str]) -> list[tuple[str, Any]]:
    """(where, item) of each record of a JSON list or of JSON lines (``columns``: the records' keys,
    which tell a lone record from an object that wraps records)."""
    if text.lstrip().startswith("["):
        try:  # (strict=False: raw tabs and newlines in strings, as datasets' reader takes them in a list)
            items = json.loads(text, object_pairs_hook=_unique_keys, strict=False)
        except _DuplicateKey as e:
            raise DataError(f"dataset.data_files: '{file}' has a record with the key '{e}' twice") from None
        except (ValueError, RecursionError) as e:  # bad JSON; a 5000-digit number; nesting too deep
            raise DataError(f"dataset.data_files: '{file}' is not valid JSON: {parse_error_text(e)}") from None
        return [(f"{file}[{i}]", item) for i, item in enumerate(items)]
    # Lines end at "\n", "\r\n" or "\r" (JSON strings hold no raw CR or LF), not at U+2028, U+2029
    # or U+0085, which JSON strings may hold raw and where str.splitlines() would also break.
    located, first = [], True
    for n, line in enumerate(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            located.append((f"{file}:{n}", json.loads(line, object_pairs_hook=_unique_keys)))
        except _DuplicateKey as e:
            raise DataError(f"dataset.data_files: record {file}:{n} has the key '{e}' twice") from None
        except (ValueError, RecursionError) as e:
            if first:  # one object, or several, written over several lines each
                _refuse_objects(file, text, columns)
            raise DataError(f"dataset.data_files: '{file}' line {n} is not valid JSON: {parse_error_text(e)}") from None
        first = False
    if len(located) == 1 and _wrapper(located[0][1], columns):
        raise _one_object_error(file, located[0][1], columns)
    return located


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Python's json keeps the last of repeated keys; datasets refuses such a record, and so do we.
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def _refuse_objects(file: Path, text: str, columns: Mapping[str, str]) -> None:
    """For JSON that fails as lines: one (pretty-printed) object, or several one after another."""
    try:
        whole = json.loads(text)
    except (ValueError, RecursionError):
        whole = None
    if isinstance(whole, dict):
        raise _one_object_error(file, whole, columns)
    decoder, end, count = json.JSONDecoder(), len(text.rstrip()), 0
    index = len(text) - len(text.lstrip())
    try:
        while index < end:
            _, index = decoder.raw_decode(text, index)
            index = json.decoder.WHITESPACE.match(text, index).end()
            count += 1
    except (ValueError, RecursionError):
        return
    if count > 1:
        raise DataError(
            f"dataset.data_files: '{file}' holds {count} JSON values one after another, over several lines each; write "
            "one record per line (JSON lines) or a JSON list of records"
        )


def _column_oriented(item: Any, instruction: str) -> bool:
    # pandas' default to_json: {"instruction": {"0": ..., "1": ...}, ...}; or columns as lists,
    # {"instruction": [...], ...}, as json.dump of df.to_dict("list") or a datasets Dataset's to_dict()
    if not isinstance(item, dict) or not item:
        return False
    return all(isinstance(v, dict) for v in item.values()) or (
        isinstance(item.get(instruction), list) and all(isinstance(v, list) for v in item.values()))


def _wrapper(item: Any, columns: Mapping[str, str]) -> bool:
    """An object that holds records rather than being one: {"data": [records]}, column-oriented;
    not one that holds a record's key (the Alpaca names or the column_map's)."""
    return _column_oriented(item, columns["instruction"]) or (
        isinstance(item, dict) and not set(item) & {*columns.values(), *ALPACA_COLUMNS} and not _CHAT_KEYS & set(item)
        and any(isinstance(v, (list, dict)) for v in item.values())
    )


def _one_object_error(file: Path, item: dict, columns: Mapping[str, str]) -> DataError:
    if _column_oriented(item, columns["instruction"]):
        return DataError(
            f"dataset.data_files: '{file}' is column-oriented JSON (pandas' default to_json, or columns as lists; keys: {_keys(item)}): "
            "write it one record per line, with to_json(path, orient='records', lines=True)"
        )
    return DataError(
        f"dataset.data_files: '{file}' is one JSON object (keys: {_keys(item)}); it must be a JSON list of "
        f"{{{', '.join(columns.values())}}} records or one record per line (JSON lines); records whose keys are named "
        "otherwise take dataset.column_map"
    )



def _keys(item: dict) -> str:
    names = list(map(str, item))
    return ", ".join(names[:8]) + (f", ... ({len(names)} keys)" if len(names) > 8 else "")


def _check_record(where: str, item: Any, columns: Mapping[str, str]) -> dict[str, str]:
    """The record as {instruction, input, output}; ``columns``: the record's key for each."""
    names = ", ".join(columns.values())
    if not isinstance(item, dict):
        raise DataError(f"record {where} must be an object with {names}; got {type(item).__name__}")
    for key in columns.values():
        if isinstance(item.get(key), str) and lone_surrogate_at(item[key]) is not None:
            raise DataError(f"record {where}: key '{key}' holds a lone surrogate (a \\ud800-\\udfff escape without its pair): "
                            "it is no text a tokenizer can encode")
    for field in ("instruction", "output"):
        key = columns[field]
        if key not in item:
            chat = " (chat records are not supported)" if _CHAT_KEYS & set(item) else ""
            if key != field:
                hint = f" (dataset.column_map.{field})"
            elif not chat:
                hint = f"; where the file names it otherwise, dataset.column_map.{field}=KEY reads it from KEY"
            else:
                hint = ""
            raise DataError(f"record {where} has no '{key}' (its keys: {_keys(item)}); records must be {{{names}}}{chat}{hint}")
        if not isinstance(item[key], str):
            raise DataError(f"record {where}: key '{key}' must be a string; got {reprlib.repr(item[key])}")
    value = item.get(columns["input"])  # absent or null (as a dataset export may write it): no input
    if value is not None and not isinstance(value, str):
        raise DataError(f"record {where}: key '{columns['input']}' must be a string or null when present; got {reprlib.repr(value)}")
    return {"instruction": item[columns["instruction"]], "input": value or "", "output": item[columns["output"]]}
