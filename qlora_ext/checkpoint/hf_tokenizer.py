"""The tokenizer files of a HF Llama-2 checkpoint folder: ``tokenizer.model`` and the files through
which transformers reads it.

From ``tokenizer.model`` alone, transformers builds a Llama tokenizer that adds no BOS token (it
adds one where ``tokenizer_config.json`` says ``add_bos_token`` or ``tokenizer.json``'s
post-processor does) and knows no added tokens. A model trained with BOS first then gets prompts
without it. So a folder gets the HF files that came with this very ``tokenizer.model``, or else a
Llama-2 ``tokenizer_config.json``.
"""

from __future__ import annotations

import filecmp
import os
import shutil
from pathlib import Path

from qlora_ext.checkpoint.atomic import StagedFiles
from qlora_ext.checkpoint.config import read_json, write_json

__all__ = ["HF_TOKENIZER_FILES", "save_hf_tokenizer", "source_tokenizer_files"]

# What transformers reads beside tokenizer.model; they describe that one file only.
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def save_hf_tokenizer(out_dir: str | os.PathLike, tokenizer_model: str | os.PathLike, *, source_dir: str | os.PathLike | None = None) -> list[str]:
    """Writes ``tokenizer.model`` into ``out_dir`` with what transformers needs to tokenize as the
    trainer does (BOS first, no EOS).

    Each file is written to a temporary and renamed over its old version, and ``HF_TOKENIZER_FILES``
    of an earlier save that this one does not write are removed last (``StagedFiles``). No file is
    ever missing on the way: transformers refuses no tokenizer folder, whatever it lacks, so a
    missing ``tokenizer_config.json`` would load silently without BOS. A save cut short over a
    different tokenizer can leave old and new files side by side; a checkpoint folder committed
    whole (as the trainer's are) never shows that.

    Args:
        out_dir: the folder (created if needed).
        tokenizer_model: the SentencePiece model file.
        source_dir: the HF folder the tokenizer came from. Its ``HF_TOKENIZER_FILES`` are copied
            when its ``tokenizer.model`` has the same bytes as ``tokenizer_model``, its
            ``tokenizer_config.json`` with ``add_bos_token`` true and ``add_eos_token`` false, its
            ``tokenizer.json`` with a post-processor that adds BOS only.

    Returns:
        The paths written. Where no ``tokenizer_config.json`` came along, one is written: class
        ``LlamaTokenizer``, ``add_bos_token`` true, ``add_eos_token`` false, and the model's own BOS,
        EOS and UNK pieces.

    Raises:
        FileNotFoundError: ``tokenizer_model`` is not a file.
        ValueError: it is no SentencePiece model, or ``source_dir``'s files are damaged or its
            tokenizer.json is another tokenizer's (as ``source_tokenizer_files``).
    """
    if not os.path.isfile(tokenizer_model):
        raise FileNotFoundError(f"save_hf_tokenizer: argument 'tokenizer_model' must be a SentencePiece model file; "
                                f"got {os.fspath(tokenizer_model)!r}")
    files = source_tokenizer_files(tokenizer_model, source_dir)
    config = files.pop("tokenizer_config.json", None) or _llama2_tokenizer_config(tokenizer_model)
    config.update(add_bos_token=True, add_eos_token=False)  # as the trainer encodes prompts
    if "tokenizer.json" in files:
        # transformers 5 adds BOS and EOS as tokenizer.json's post-processor says, whatever the config
        # says (a base saved with add_bos_token false has one that adds none): as the trainer, BOS only.
        files["tokenizer.json"] = {**files["tokenizer.json"], "post_processor": _bos_only_post_processor(tokenizer_model)}
    owned = {"tokenizer.model", *HF_TOKENIZER_FILES}
    with StagedFiles(out_dir, owns=lambda name: name in owned, finders=()) as staged:
        staged.write("tokenizer.model", lambda path: shutil.copyfile(tokenizer_model, path))
        for name, content in files.items():
            staged.write(name, lambda path, content=content: write_json(path, content))
        staged.write("tokenizer_config.json", lambda path: write_json(path, config))
        return staged.commit()


def source_tokenizer_files(tokenizer_model: str | os.PathLike, source_dir: str | os.PathLike | None) -> dict[str, dict]:
    """The ``HF_TOKENIZER_FILES`` of ``source_dir`` that describe ``tokenizer_model`` (those of a
    folder whose ``tokenizer.model`` has the same bytes), by name, as read; none for another folder.

    Raises:
        ValueError: one of them is not a UTF-8 JSON object, or tokenizer.json's vocabulary is not
            tokenizer.model's pieces at the same ids (transformers reads tokenizer.json first); the
            file is named.
    """
    source = Path(source_dir) if source_dir is not None else None
    if source is None or not (source / "tokenizer.model").is_file() or not filecmp.cmp(source / "tokenizer.model", tokenizer_model, shallow=False):
        return {}
    files = {name: read_json(source / name) for name in HF_TOKENIZER_FILES if (source / name).is_file()}
    if "tokenizer.json" in files:
        _check_same_pieces(files["tokenizer.json"], tokenizer_model, source / "tokenizer.json")
    return files


def _sentencepiece(tokenizer_model: str | os.PathLike):
    from sentencepiece import SentencePieceProcessor

    try:
        return SentencePieceProcessor(model_file=os.fspath(tokenizer_model))
    except (OSError, RuntimeError) as e:  # sentencepiece raises RuntimeError for a file it cannot parse
        raise ValueError(f"save_hf_tokenizer: argument 'tokenizer_model' must be a readable SentencePiece model file; "
                         f"{os.fspath(tokenizer_model)!r} is not: {e}") from None


def _check_same_pieces(tokenizer_json: dict, tokenizer_model: str | os.PathLike, path: Path) -> None:
    model = tokenizer_json.get("model")
    vocab = model.get("vocab") if isinstance(model, dict) else None
    if isinstance(vocab, list):  # (a Unigram model's: [piece, score] by id)
        vocab = {entry[0]: i for i, entry in enumerate(vocab) if isinstance(entry, list) and entry and isinstance(entry[0], str)}
    if not isinstance(vocab, dict):
        raise ValueError(f"{path} holds no vocabulary (model.vocab): not a tokenizer.json of the tokenizer.model beside it; "
                         "remove it (tokenizer.model is enough) or put the matching one")
    spm = _sentencepiece(tokenizer_model)
    for i in range(spm.get_piece_size()):
        piece = spm.id_to_piece(i)
        if vocab.get(piece) != i:
            raise ValueError(
                f"{path} does not describe the tokenizer.model beside it: piece {piece!r} is id {i} there and "
                f"{vocab.get(piece)} in tokenizer.json, which transformers reads first (and would give the model other ids); "
                "remove it (tokenizer.model is enough) or put the matching one"
            )


def _bos_only_post_processor(tokenizer_model: str | os.PathLike) -> dict:
    """tokenizer.json's post-processor that puts BOS before a text (and before each of a pair), as
    meta-llama/Llama-2-7b-hf's does."""
    spm = _sentencepiece(tokenizer_model)
    bos = spm.id_to_piece(spm.bos_id())
    return {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [
            {"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
            {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}},
        ],
        "special_tokens": {bos: {"id": bos, "ids": [spm.bos_id()], "tokens": [bos]}},
    }


def _llama2_tokenizer_config(tokenizer_model: str | os.PathLike) -> dict:
    """A Llama-2 ``tokenizer_config.json`` (as meta-llama/Llama-2-7b-hf's) for this model's pieces."""
    spm = _sentencepiece(tokenizer_model)
    return {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": spm.id_to_piece(spm.bos_id()),
        "eos_token": spm.id_to_piece(spm.eos_id()),
        "unk_token": spm.id_to_piece(spm.unk_id()),
        "pad_token": None,
        "legacy": False,
        "clean_up_tokenization_spaces": False,
    }
