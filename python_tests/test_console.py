"""The command-line tools' standard streams: an ASCII locale (LC_ALL=C with PYTHONUTF8=0) and a
stdout that cannot be written (a full device, a reader gone) end a tool with a line, never a
traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from qlora_ext import finetune
from qlora_ext.training.config import CONFIG_DIR

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASCII = {**{k: v for k, v in os.environ.items() if k not in ("PYTHONIOENCODING", "LANG", "LC_CTYPE")},
         "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0", "PYTHONPATH": REPO}


def _run(args, **kwargs):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO},
                          timeout=300, **kwargs)


def _reader_gone(args):
    process = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": REPO})
    process.stdout.close()
    code = process.wait(timeout=300)
    err = process.stderr.read()
    process.stderr.close()
    return code, err


def _needs_dev_full():
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full (Linux's always-full device)")


def test_text_stdout_cannot_encode_is_escaped():
    # a print of non-ASCII text under an ASCII locale raised UnicodeEncodeError (the trainer's
    # closing report, after training, lost whole)
    code = "from qlora_ext._console import tolerant_console; tolerant_console(); print('caf\\xe9 \\u65e5')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, env=ASCII, timeout=120)
    assert out.returncode == 0 and out.stdout == b"caf\\xe9 \\u65e5\n", out.stderr


def test_list_configs_and_plot_with_stdout_unwritable(tmp_path):
    # tracebacks (BrokenPipeError, OSError: No space left on device) after the work was done
    _needs_dev_full()
    (tmp_path / "run" / "logs").mkdir(parents=True)
    (tmp_path / "run" / "logs" / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1 / s}) + "\n" for s in (1, 2)))
    commands = {
        "list": ["-m", "qlora_ext.finetune", "--list-configs"],
        "plot": ["-m", "qlora_ext.plot", str(tmp_path / "run"), "-o", str(tmp_path / "curve.png")],
    }
    for name, args in commands.items():
        with open("/dev/full", "w") as full:
            out = subprocess.run([sys.executable, *args], stdout=full, stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, "PYTHONPATH": REPO}, timeout=300)
        assert out.returncode == 1 and "Traceback" not in out.stderr, (name, out.stderr)
        assert out.stderr.strip().endswith("cannot write to standard output: No space left on device"), (name, out.stderr)
        assert _reader_gone(args) == (1, ""), name
    assert (tmp_path / "curve.png").is_file()


def test_overrides_before_and_after_config(capsys):
    # key=value before --config used up the positional: those after it were "unrecognized arguments";
    # here the later one is read as an override, and its unknown key named
    assert finetune.main(["epochs=1", "--config", "tiny_qlora", "model.lora_rnk=3"]) == 2
    assert "unknown config key 'model.lora_rnk'" in capsys.readouterr().err


@pytest.mark.parametrize("key, line", [
    ("output_dir", "output_dir: qlora_output/tiny_qlora"),  # (was a traceback at mkdir)
    ("dataset.data_files", '  data_files: "{assets}/tiny_alpaca.jsonl"'),  # (these three were "not a file" / "not a folder")
    ("tokenizer.path", '  path: "{assets}/tokenizer.model"'),
    ("checkpointer.checkpoint_dir", '  checkpoint_dir: "{assets}/tiny_llama2"'),
    ("metric_logger.log_dir", "  type: disk"),  # (a traceback at its mkdir; the file sets no log_dir: one is put in)
])
def test_a_path_the_file_system_encoding_cannot_hold_is_named(tmp_path, key, line):
    # a non-ASCII path in a config file (read as UTF-8) under an ASCII locale
    name = key.split(".")[-1]
    path = f"{tmp_path}/caf\u00e9"
    text = (CONFIG_DIR / "tiny_qlora.yaml").read_text(encoding="utf-8")
    assert line in text
    text = text.replace(line, f"{line}\n  {name}: {path}" if name == "log_dir" else f"{line[: line.index(name)]}{name}: {path}")
    if key != "output_dir":
        text = text.replace("output_dir: qlora_output/tiny_qlora", f"output_dir: {tmp_path}/run")
    (tmp_path / "cfg.yaml").write_text(text, encoding="utf-8")
    out = subprocess.run([sys.executable, "-m", "qlora_ext.finetune", "--config", str(tmp_path / "cfg.yaml")],
                         capture_output=True, env=ASCII, timeout=300)
    stderr = out.stderr.decode("ascii", "replace")
    assert out.returncode == 2 and "Traceback" not in stderr, stderr
    assert (f"{key}: '{tmp_path}/caf\\xe9' cannot be a file name in this system's encoding (ascii); "  # (\\xe9: stderr's escape)
            "run with PYTHONUTF8=1 or under a UTF-8 locale") in stderr, stderr


def test_a_base_config_json_with_non_ascii_text_is_saved_under_an_ascii_locale(tmp_path):
    # The save read the base's config.json in the locale's encoding (everything else reads it as
    # UTF-8, as transformers does): a UnicodeDecodeError after training, and no checkpoint.
    import shutil

    base = tmp_path / "base"
    shutil.copytree(CONFIG_DIR.parent / "assets" / "tiny_llama2", base)
    config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    (base / "config.json").write_text(json.dumps({**config, "_name_or_path": "/data/mod\u00e8les/tiny"}, ensure_ascii=False),
                                      encoding="utf-8")
    args = ["-m", "qlora_ext.finetune", f"checkpointer.checkpoint_dir={base}", f"output_dir={tmp_path / 'run'}", "epochs=1",
            "max_steps_per_epoch=1", "eval.before_and_after=false", "metric_logger.plot_loss_curve=false"]
    out = subprocess.run([sys.executable, *args], capture_output=True, env=ASCII, timeout=300)
    assert out.returncode == 0, out.stderr.decode("ascii", "replace")[-2000:]
    saved = json.loads((tmp_path / "run" / "epoch_0" / "config.json").read_text(encoding="utf-8"))
    assert saved["_name_or_path"] == "/data/mod\u00e8les/tiny"


def test_generate_with_stderr_closed_writes_only_the_text(tmp_path):
    # 2>&- makes sys.stderr None, and print(..., file=None) writes to stdout: the timing report
    # ended up in the generated text.
    assets = CONFIG_DIR.parent / "assets"
    args = ["-m", "qlora_ext.generate", "--checkpoint-dir", str(assets / "tiny_llama2"), "--tokenizer", str(assets / "tokenizer.model"),
            "--prompt", "hi", "--max-new-tokens", "3", "--temperature", "0"]
    command = " ".join(f"'{a}'" for a in [sys.executable, *args])
    closed = subprocess.run(["bash", "-c", f"exec {command} 2>&-"], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": REPO}, timeout=300)
    both = _run(args)
    assert closed.returncode == 0 == both.returncode, both.stderr
    assert "tokens/s" in both.stderr and "tokens/s" not in closed.stdout
    assert closed.stdout == both.stdout
