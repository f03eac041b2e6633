"""Builds the bundled assets of the default run (``qlora_ext/assets/``), deterministically:

    python scripts/make_tiny_assets.py data        # tiny_alpaca.jsonl + pretraining corpus (not shipped)
    python scripts/make_tiny_assets.py tokenizer   # tokenizer.model (SentencePiece BPE, byte fallback)
    python scripts/make_tiny_assets.py model       # tiny_llama2/ : the pretrained base, HF format, bf16
    python scripts/make_tiny_assets.py all

The model stage pretrains a small Llama-2-architecture model on the synthetic corpus (a few
minutes on 2 CPU cores, done once here, never by the default run) and writes it with the package's
own HF checkpoint writer, so the trainer reads it exactly like a downloaded Llama-2 folder.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_world  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "qlora_ext" / "assets"
WORK = ROOT / "build" / "tiny_assets"  # intermediate files, not shipped
SEED = 0
VOCAB_SIZE = 1024


def make_data() -> None:
    ASSETS.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    records = tiny_world.instruction_records(SEED)
    with open(ASSETS / "tiny_alpaca.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    docs = tiny_world.corpus_documents(SEED)
    (WORK / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    print(f"wrote {ASSETS / 'tiny_alpaca.jsonl'} ({len(records)} records) and {WORK / 'corpus.jsonl'} ({len(docs)} documents)")


def read_corpus() -> list[str]:
    return [json.loads(line) for line in (WORK / "corpus.jsonl").read_text().splitlines()]


def make_tokenizer() -> None:
    import sentencepiece as spm

    sys.path.insert(0, str(ROOT))
    from qlora_ext.training.data import alpaca_prompt

    records = [json.loads(line) for line in (ASSETS / "tiny_alpaca.jsonl").read_text().splitlines()]
    text = [line for doc in read_corpus() for line in doc.split("\n")]
    text += [alpaca_prompt(r) + r["output"] for r in records]
    model = io.BytesIO()
    # Llama-2's conventions: BPE, byte fallback, unk=0 bos=1 eos=2, no pad piece, digits split.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text),
        model_writer=model,
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        byte_fallback=True,
        split_digits=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        add_dummy_prefix=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        num_threads=1,
        minloglevel=2,
    )
    (ASSETS / "tokenizer.model").write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    lengths = [len(sp.encode(alpaca_prompt(r) + r["output"])) for r in records]
    print(f"wrote {ASSETS / 'tokenizer.model'} ({len(model.getvalue())} bytes, vocab {sp.vocab_size()}); "
          f"examples are {min(lengths)}-{max(lengths)} tokens")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=["data", "tokenizer", "model", "all"])
    args = parser.parse_args()
    if args.stage in ("data", "all"):
        make_data()
    if args.stage in ("tokenizer", "all"):
        make_tokenizer()
    if args.stage in ("model", "all"):
        from pretrain_tiny import pretrain_and_save

        pretrain_and_save(ASSETS / "tiny_llama2", read_corpus(), ASSETS / "tokenizer.model", seed=SEED)


if __name__ == "__main__":
    main()
