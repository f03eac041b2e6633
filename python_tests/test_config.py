"""Trainer configs: bundled files load, overrides apply with YAML typing, mistakes name the key,
the rule, the value and the choices."""

from __future__ import annotations

import inspect
import re

import pytest
import yaml

from qlora_ext.models.llama2 import lora_llama2_7b
from qlora_ext.training.config import ASSETS_DIR, CONFIG_DIR, SCHEMA, ConfigError, available_configs, load_config

SEED_7B_QLORA = "llama2_7b_qlora_single_device"


def test_bundled_configs_all_load():
    names = available_configs()
    for expected in ("tiny_qlora", SEED_7B_QLORA, "llama2_7b_lora_single_device", "llama2_13b_qlora_single_device", "llama2_70b_qlora_single_device"):
        assert expected in names
    for name in names:
        load_config(name)


def test_seed_config_fields_and_defaults():
    cfg = load_config(SEED_7B_QLORA)
    assert cfg.model.builder == "qlora_llama2_7b"
    assert cfg.model.lora_attn_modules == ["q_proj", "v_proj", "output_proj"]
    assert cfg.model.apply_lora_to_mlp is True and cfg.model.apply_lora_to_output is False
    assert (cfg.model.lora_rank, cfg.model.lora_alpha) == (8, 16.0)
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay) == (3e-4, 0.01)
    assert (cfg.lr_scheduler.name, cfg.lr_scheduler.num_warmup_steps) == ("cosine_with_warmup", 100)
    assert (cfg.batch_size, cfg.gradient_accumulation_steps) == (2, 8)
    assert cfg.dtype == "bf16" and cfg.enable_activation_checkpointing is True and cfg.compile is False


def test_torchtune_config_names():
    for name in ("llama2/7B_qlora_single_device", "7B_qlora_single_device", "LLAMA2_7B_QLORA_SINGLE_DEVICE"):
        assert load_config(name) == load_config(SEED_7B_QLORA)
    assert load_config("13B_qlora_single_device").model.builder == "qlora_llama2_13b"


def test_lora_and_qlora_7b_differ_only_in_quantization_and_output_dir():
    q, l = load_config(SEED_7B_QLORA).to_dict(), load_config("llama2_7b_lora_single_device").to_dict()
    assert l["model"].pop("builder") == "lora_llama2_7b" and q["model"].pop("builder") == "qlora_llama2_7b"
    # Apart, so the two runs can be compared (a second run in the same folder replaces the first's logs).
    assert (q.pop("output_dir"), l.pop("output_dir")) == ("/tmp/qlora_finetune_output", "/tmp/lora_finetune_output")
    assert q == l


def test_shipped_configs_write_to_different_folders():
    dirs = [load_config(name).output_dir for name in available_configs()]
    assert len(set(dirs)) == len(dirs), dirs


def test_overrides_are_typed_and_dotted(tmp_path):
    cfg = load_config(
        SEED_7B_QLORA,
        ["model.lora_rank=16", "compile=True", f"checkpointer.checkpoint_dir={tmp_path}", "optimizer.lr=1e-4",
         "model.lora_attn_modules=[q_proj,k_proj]", "seed=null", "dataset.data_files=a.json"],
    )
    assert cfg.model.lora_rank == 16 and cfg.compile is True
    assert cfg.checkpointer.checkpoint_dir == str(tmp_path)
    assert cfg.optimizer.lr == pytest.approx(1e-4)
    assert cfg.model.lora_attn_modules == ["q_proj", "k_proj"]
    assert cfg.seed is None
    assert cfg.dataset.data_files == ["a.json"]  # a single file becomes a list


def test_an_alpha_of_zero_is_noted():
    # Legal, but the adapters' output is scaled by 0: the run would train nothing, and says so.
    notes = []
    assert load_config("tiny_qlora", ["model.lora_alpha=0"], notes).model.lora_alpha == 0
    assert notes == ["model.lora_alpha=0 scales every adapter's output by 0 (scale = alpha / rank): training will not "
                     "change what the model computes"]
    notes.clear()
    load_config("tiny_qlora", ["model.lora_alpha=0.5"], notes)
    assert notes == []
    # So is a clipping norm of 0 (torch's clip_grad_norm_ zeroes every gradient; HF's Trainer
    # would not clip at all).
    assert load_config("tiny_qlora", ["clip_grad_norm=0"], notes).clip_grad_norm == 0
    assert notes == ["clip_grad_norm=0 clips every gradient to zero: training will not change what the model computes "
                     "(clip_grad_norm=null turns clipping off)"]
    notes.clear()
    load_config("tiny_qlora", ["clip_grad_norm=0.1"], notes)
    assert notes == []


@pytest.mark.parametrize("eps", ["0", "1e-46", "1e-300", "1e-38"])
def test_an_adamw_eps_that_float32_holds_as_zero_is_refused(eps):
    # AdamW divides by sqrt(v) + eps: a parameter whose gradient is still zero (lora_a, while
    # lora_b is zero) would become NaN at the first step; 1e-46 is 0 in float32.
    with pytest.raises(ConfigError, match=r"config key 'optimizer.eps' must be >= 1.2e-38 \(AdamW eps; below float32's "
                                          rf"smallest normal number it may be flushed to 0, which divides a zero gradient by zero\); "
                                          rf"got {float(eps)!r}"):
        load_config("tiny_qlora", [f"optimizer.eps={eps}"])
    assert load_config("tiny_qlora", ["optimizer.eps=1e-12"]).optimizer.eps == 1e-12


def test_string_and_path_overrides_are_taken_as_written():
    # YAML would cut a value at " #" and make dates, numbers and booleans of what are names here
    cfg = load_config(SEED_7B_QLORA, [
        "output_dir=/tmp/runs/my run #2", "metric_logger.project=2024-06-01", "checkpointer.checkpoint_dir=2024",
        "tokenizer.path={assets}/tokenizer.model", "dataset.data_files=/data/set #1.json", "device=cpu",
    ])
    assert cfg.output_dir == "/tmp/runs/my run #2" and cfg.metric_logger.project == "2024-06-01"
    assert cfg.checkpointer.checkpoint_dir == "2024" and cfg.tokenizer.path == str(ASSETS_DIR / "tokenizer.model")
    assert cfg.dataset.data_files == ["/data/set #1.json"] and cfg.device == "cpu"
    assert load_config(SEED_7B_QLORA, ["metric_logger.project=on"]).metric_logger.project == "on"
    # lists, null and the other kinds are still YAML
    cfg = load_config(SEED_7B_QLORA, ["dataset.data_files=[a.json, 'b #2.json']", "metric_logger.log_dir=null", "model.lora_rank=16"])
    assert cfg.dataset.data_files == ["a.json", "b #2.json"] and cfg.metric_logger.log_dir is None and cfg.model.lora_rank == 16
    with pytest.raises(ConfigError, match=r"config key 'metric_logger.project' must not be null"):
        load_config(SEED_7B_QLORA, ["metric_logger.project=~"])
    # one pair of quotes around a whole string or path is the shell's or a list of arguments', as
    # OmegaConf (tune run) reads it: it made a folder '"runs' and a device '"cpu"'
    cfg = load_config(SEED_7B_QLORA, ['output_dir="runs/x"', "metric_logger.project='my proj'", 'dataset.data_files="a b.json"',
                                      'device="cpu"', 'checkpointer.checkpoint_dir="null"'])
    assert (cfg.output_dir, cfg.metric_logger.project, cfg.dataset.data_files, cfg.device) == ("runs/x", "my proj", ["a b.json"], "cpu")
    assert cfg.checkpointer.checkpoint_dir == "null"  # (quoted: a name, not null)
    cfg = load_config(SEED_7B_QLORA, ["output_dir='it's'", 'metric_logger.project="a"b"', "tokenizer.path='", "device='cpu'"])
    assert (cfg.output_dir, cfg.metric_logger.project, cfg.tokenizer.path) == ("'it's'", '"a"b"', "'")  # not one pair: as written
    assert cfg.device == "cpu"
    # an empty path, quoted or in a file, is refused: output_dir="" ran in the working directory and
    # swept its step_* folders away
    for override in ('output_dir=""', "output_dir=''", 'tokenizer.path=" "', 'dataset.data_files=""', "dataset.data_files=['']"):
        key = override.partition("=")[0] + ("[0]" if "[" in override else "")  # (one path is named as given, not as [0])
        with pytest.raises(ConfigError, match=rf"config key '{re.escape(key)}' must be a path, not empty"):
            load_config(SEED_7B_QLORA, [override])
    # ... except where null may be given: there it is null, as the trainer always read it (log_dir: "" in a
    # saved config.yaml meant output_dir/logs)
    assert load_config(SEED_7B_QLORA, ['metric_logger.log_dir=""']).metric_logger.log_dir is None
    with pytest.raises(ConfigError, match=r"config key 'dataset.data_files' must name at least one JSON or JSONL file; got \[\]$"):
        load_config(SEED_7B_QLORA, ["dataset.data_files=[]"])


def test_config_from_path_and_assets_placeholder(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"builder": "qlora_llama2", "embed_dim": 64},
        "tokenizer": {"path": "{assets}/tokenizer.model"},
        "checkpointer": {"checkpoint_dir": "x"},
        "dataset": {"data_files": ["d.jsonl"]},
    }))
    cfg = load_config(str(path))
    assert cfg.tokenizer.path == str(ASSETS_DIR / "tokenizer.model")
    assert cfg.model.embed_dim == 64 and cfg.epochs == 1  # defaults filled in


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config("tiny_qlora", ["model.lora_rank=4"])
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(str(path)) == cfg


@pytest.mark.parametrize(
    "override, needles",
    [
        ("model.lora_rnk=3", ["model.lora_rnk", "did you mean 'model.lora_rank'", "valid keys under 'model'"]),
        ("modle.lora_rank=3", ["'modle'", "did you mean 'model'"]),
        ("dtype=fp16", ["'dtype'", "one of auto, bf16, fp32", "'fp16'"]),
        ("model.builder=gpt2", ["model.builder", "qlora_llama2_7b", "'gpt2'"]),
        ("model.lora_attn_modules=[q_proj,foo]", ["model.lora_attn_modules[1]", "q_proj, k_proj, v_proj, output_proj", "'foo'"]),
        ("batch_size=0", ["'batch_size'", ">= 1", "got 0"]),
        ("batch_size=two", ["'batch_size'", "integer", "'two'"]),
        ("compile=maybe", ["'compile'", "true or false", "'maybe'"]),
        ("optimizer.lr=fast", ["optimizer.lr", "number", "'fast'"]),
        ("model.embed_dim=64", ["model.embed_dim", "generic builder", "qlora_llama2_7b"]),
        ("model=3", ["'model' is a section", "model.lora_rank"]),
        ("epochs", ["key=value"]),
        ("lora_rank=3", ["unknown config key 'lora_rank'", "did you mean 'model.lora_rank'?"]),
        ("lr=3e-4", ["unknown config key 'lr'", "did you mean 'optimizer.lr'?"]),
        ("max_seq_len=512", ["did you mean 'model.max_seq_len' or 'tokenizer.max_seq_len'?"]),
        ("metric_logger._component_=torchtune.training.metric_logging.WandBLogger",
         ["'metric_logger._component_'", "not torchtune's _component_", "metric_logger.type", "type, log_dir, project"]),
        ("optimizer.lr=nan", ["'optimizer.lr'", "finite number", "got nan"]),
        ("clip_grad_norm=.inf", ["'clip_grad_norm'", "finite number", "got inf"]),
        ("lr_scheduler.num_cycles=1e400", ["'lr_scheduler.num_cycles'", "finite number", "got 1e400"]),  # (as given, not inf)
        ("dataset.validation_fraction=nan", ["'dataset.validation_fraction'", "finite number", "got nan"]),
        ("optimizer.betas=[0.9,.nan]", ["'optimizer.betas[1]'", "finite number", "got nan"]),
        ("seed=9223372036854775808", ["'seed'", "<= 9223372036854775807", "2**63", "got 9223372036854775808"]),
        ("seed=-1", ["'seed'", ">= 0", "got -1"]),
    ],
)
def test_bad_overrides_name_key_rule_and_value(override, needles):
    with pytest.raises(ConfigError) as e:
        load_config(SEED_7B_QLORA, [override])
    for needle in needles:
        assert needle in str(e.value)


def test_largest_seed_is_accepted():
    assert load_config(SEED_7B_QLORA, [f"seed={2**63 - 1}"]).seed == 2**63 - 1


def test_unknown_key_in_file_and_unknown_config_name(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  builder: qlora_llama2\n  lora_rank: 8\n  rank: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'model.rank' in .*bad.yaml"):
        load_config(str(path))
    with pytest.raises(ConfigError, match=r"'nope' is neither a file nor a bundled config; bundled configs: .*tiny_qlora"):
        load_config("nope")


def test_required_key_missing(tmp_path):
    path = tmp_path / "partial.yaml"
    path.write_text("model:\n  builder: qlora_llama2\n")
    with pytest.raises(ConfigError, match=r"config key 'tokenizer.path' is required"):
        load_config(str(path))


def test_interpolations_and_python_none_in_our_own_configs(tmp_path):
    # ${...} was resolved in torchtune configs only: ours kept the text and made a folder named '${output_dir}'.
    cfg = load_config("tiny_qlora", ["output_dir=/runs/a", "metric_logger.log_dir=${output_dir}/logs"])
    assert cfg.metric_logger.log_dir == "/runs/a/logs"
    own = tmp_path / "own.yaml"
    raw = yaml.safe_load((CONFIG_DIR / "tiny_qlora.yaml").read_text())
    raw["output_dir"], raw["metric_logger"]["log_dir"] = f"{tmp_path}/out", "${output_dir}/tb"
    own.write_text(yaml.safe_dump(raw))
    assert load_config(str(own)).metric_logger.log_dir == f"{tmp_path}/out/tb"
    with pytest.raises(ConfigError, match=r"--config: .*tiny_qlora.yaml or its overrides: interpolation .\$\{no_such_key\}.: the config has no key .no_such_key."):
        load_config("tiny_qlora", ["metric_logger.log_dir=${no_such_key}/logs"])
    # None, as Python spells it, is null (log_dir=None had logged to ./None, max_steps_per_epoch=None was refused).
    cfg = load_config("tiny_qlora", ["metric_logger.log_dir=None", "max_steps_per_epoch=None", "seed=none"])
    assert cfg.metric_logger.log_dir is None and cfg.max_steps_per_epoch is None and cfg.seed is None
    assert load_config("tiny_qlora", ["output_dir=none"]).output_dir == "none"  # a folder: output_dir may not be null
    # A key left at its default can be referred to; a null one cannot be formatted into a path.
    assert load_config("tiny_qlora", ["metric_logger.log_dir=${output_dir}/tb"]).metric_logger.log_dir == "qlora_output/tiny_qlora/tb"
    del raw["output_dir"]
    own.write_text(yaml.safe_dump(raw))
    assert load_config(str(own)).metric_logger.log_dir.endswith("/tb")
    with pytest.raises(ConfigError, match=r"interpolation '\$\{seed\}': 'seed' is null, which cannot be part of a longer value"):
        load_config("tiny_qlora", ["seed=null", "output_dir=/runs/${seed}"])


def test_hostile_yaml_is_named_not_expanded(tmp_path):
    """A key given twice (the later silently replaced the earlier, a whole section too), aliases
    nested ten deep (each resolved copy multiplied them: gigabytes, then a MemoryError), keys that
    each repeat the one before (exponential time), nesting past Python's recursion limit, and a
    section formatted into a string: each a ConfigError naming it."""
    base = (CONFIG_DIR / "tiny_qlora.yaml").read_text()
    cases = [
        (base + "\nbatch_size: 3\nbatch_size: 5\n", r"found the key 'batch_size' twice \(first on line \d+\)"),
        ("model: {lora_rank: 64}\n" + base, r"found the key 'model' twice \(first on line 1\)"),
        (base.replace("output_dir:", "unused_key: 1\noutput_dir:", 1) + "\n" + "a: &a0 [x, x, x, x, x, x, x, x, x, x]\n"
         + "".join(f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]\n"
                   for i in range(1, 10)), r"unknown config key 'unused_key'"),
        ("seed: " + "[" * 20_000 + "]" * 20_000 + "\n", r"cannot be read: it nests its values too deeply to read$"),
        (base.replace("\noutput_dir:", "\noutput_dir: runs/${model}  #", 1), r"interpolation '\$\{model\}': 'model' is a section, which cannot be part of a longer value"),
    ]
    for i, (text, needle) in enumerate(cases):
        path = tmp_path / f"c{i}.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=needle):
            load_config(str(path))
    # A YAML merge key may still be overridden, as YAML intends.
    from qlora_ext.training.config import _UniqueKeyLoader
    from qlora_ext.training.interpolation import InterpolationError, resolve_interpolations

    growing = {"x0": "ab", **{f"x{i}": f"${{x{i - 1}}}" * 4 for i in range(1, 16)}}
    with pytest.raises(InterpolationError, match=r"the value grows to \d+ characters, more than 1000000"):
        resolve_interpolations(growing)

    text = "a: &a {x: 1, y: 2}\nb:\n  <<: *a\n  x: 3\n"
    assert yaml.load(text, Loader=_UniqueKeyLoader) == {"a": {"x": 1, "y": 2}, "b": {"x": 3, "y": 2}} == yaml.safe_load(text)


def test_integer_overrides_are_read_in_base_10(tmp_path):
    # YAML 1.1 read batch_size=010 as 8, 1:30 as 90 (base 60) and 0b11 as 3, silently.
    assert load_config("tiny_qlora", ["batch_size=010", "model.lora_rank=08"]).batch_size == 10
    assert load_config("tiny_qlora", ["model.lora_rank=08"]).model.lora_rank == 8
    assert load_config("tiny_qlora", ["max_steps_per_epoch=1_000"]).max_steps_per_epoch == 1000  # as YAML reads it
    for text in ("0b11", "1:30", "0x10"):
        with pytest.raises(ConfigError, match=rf"config key 'batch_size' must be an integer .*; got '{text}'"):
            load_config("tiny_qlora", [f"batch_size={text}"])
    # a float key too (model.lora_alpha=010 was 8.0, optimizer.lr=0x10 16.0, num_cycles=1:30 90.0)
    cfg = load_config("tiny_qlora", ["model.lora_alpha=010", "optimizer.lr=3e-4", "lr_scheduler.num_cycles=0.5"])
    assert (cfg.model.lora_alpha, cfg.optimizer.lr, cfg.lr_scheduler.num_cycles) == (10.0, 3e-4, 0.5)
    for key, text in (("optimizer.lr", "0x10"), ("lr_scheduler.num_cycles", "1:30"), ("model.lora_alpha", "0b11")):
        with pytest.raises(ConfigError, match=rf"config key '{key}' must be a number .*; got '{text}'"):
            load_config("tiny_qlora", [f"{key}={text}"])
    # an integer past float's range for a float key, and one past every width for a size, are named
    # (an OverflowError; torch.empty's overflow when the model was built)
    with pytest.raises(ConfigError, match=r"config key 'model.lora_alpha' must be a number within float's range \(about 1.8e308\) .*; "
                                          r"got an integer of 400 digits$"):
        load_config("tiny_qlora", ["model.lora_alpha=" + "9" * 400])
    with pytest.raises(ConfigError, match=r"config key 'optimizer.lr' must be a number within float's range .*; got an integer of 400 digits$"):
        load_config("tiny_qlora", ["optimizer.lr=-" + "9" * 400])
    # more digits than Python converts, in an override or a file: named, without Python's advice
    for override in ("optimizer.lr=1" + "0" * 5000, "model.lora_rank=1" + "0" * 5000, "dataset.data_files=[1" + "0" * 5000 + "]"):
        with pytest.raises(ConfigError, match=rf"override '{re.escape(override[:80])}': its value cannot be read: Exceeds the limit "
                                              r"\(4300 digits\) for integer string conversion: value has 5001 digits$"):
            load_config("tiny_qlora", [override])
    path = tmp_path / "long.yaml"
    path.write_text(re.sub(r"(?m)^seed:.*$", "seed: 1" + "0" * 5000, (CONFIG_DIR / "tiny_qlora.yaml").read_text()))
    with pytest.raises(ConfigError, match=r"--config: .*long.yaml cannot be read: Exceeds the limit \(4300 digits\) for integer "
                                          r"string conversion: value has 5001 digits$"):
        load_config(str(path))
    # YAML 1.1's base-60 floats (num_cycles=1:30.0 was 90.0)
    for key, text in (("lr_scheduler.num_cycles", "1:30.0"), ("model.lora_alpha", "1:00.5")):
        with pytest.raises(ConfigError, match=rf"config key '{key}' must be a number .*; got '{text}'"):
            load_config("tiny_qlora", [f"{key}={text}"])
    for key in ("model.lora_rank", "model.vocab_size", "model.embed_dim", "model.intermediate_dim"):
        with pytest.raises(ConfigError, match=rf"config key '{key}' must be <= 16777216 .*; got 10{{24}}$"):
            load_config("tiny_qlora", [f"{key}=1{'0' * 24}"])
    # a value nested past Python's recursion limit: a RecursionError
    with pytest.raises(ConfigError, match=r"override 'model.lora_attn_modules=\[\[\[.*': its value cannot be read: it nests its values too deeply to read$"):
        load_config("tiny_qlora", ["model.lora_attn_modules=" + "[" * 5000 + "]" * 5000])



def test_dates_in_a_config_file_are_text_as_torchtune_reads_them(tmp_path):
    # OmegaConf (torchtune's loader) leaves 2024-06-01 as text; YAML 1.1 made it a datetime.date that no
    # key takes, and an impossible date (2024-13-45) an error naming neither key nor line.
    path = tmp_path / "dated.yaml"
    path.write_text("model: {builder: qlora_llama2, embed_dim: 64}\ncheckpointer: {checkpoint_dir: x}\ntokenizer: {path: t.model}\n"
                    "dataset: {data_files: [2024-06-01]}\noutput_dir: 2024-06-01\n")
    cfg = load_config(str(path))
    assert cfg.output_dir == "2024-06-01" and cfg.dataset.data_files == ["2024-06-01"]
    assert load_config(str(path), ["dataset.data_files=[2024-06-02]"]).dataset.data_files == ["2024-06-02"]
    path.write_text(path.read_text() + "seed: 2024-13-45\n")
    with pytest.raises(ConfigError, match=r"config key 'seed' must be an integer .*; got '2024-13-45'"):
        load_config(str(path))


# the schema's own defaults and limits (a config that leaves the adapter settings out)
def _minimal(tmp_path, *extra):
    path = tmp_path / "minimal.yaml"
    path.write_text("model:\n  builder: qlora_llama2_7b\ntokenizer:\n  path: /x/tokenizer.model\n"
                    "checkpointer:\n  checkpoint_dir: /x\ndataset:\n  data_files: /x/data.json\n")
    return load_config(str(path), list(extra))


def test_lora_defaults_of_the_config_are_the_builders(tmp_path):
    # A config that leaves the adapter settings out trains what lora_llama2_7b() (torchtune's defaults) builds.
    cfg = _minimal(tmp_path)
    builder = inspect.signature(lora_llama2_7b).parameters
    for key in ("lora_rank", "lora_alpha", "lora_dropout"):
        assert getattr(cfg.model, key) == builder[key].default, key


def test_lora_dropout_of_one_is_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.lora_dropout"):
        _minimal(tmp_path, "model.lora_dropout=1.0")


# a section's key given at top level is answered with the dotted key, before difflib's near top-level key (helper-154)
_SECTION_KEYS = sorted({(sec, k) for sec, keys in SCHEMA.items() if isinstance(keys, dict) for k in keys if k not in SCHEMA})


@pytest.mark.parametrize("section, key", _SECTION_KEYS, ids=[f"{s}.{k}" for s, k in _SECTION_KEYS])
def test_a_section_key_at_top_level_names_its_section(section, key):
    with pytest.raises(ConfigError) as e:
        load_config("tiny_qlora", [f"{key}=1"])
    assert f"'{section}.{key}'" in str(e.value).split("(valid keys")[0], str(e.value)


@pytest.mark.parametrize("override, misleading", [("num_heads=32", "'num_threads'"), ("vocab_size=32000", "'batch_size'"),
                                                  ("every_n_steps=50", "'log_every_n_steps'"), ("type=wandb", "'dtype'")])
def test_a_section_key_is_not_answered_with_another_valid_top_level_key(override, misleading):
    # following the hint would set a different, valid key (num_threads=32, batch_size=32000)
    with pytest.raises(ConfigError) as e:
        load_config("tiny_qlora", [override])
    assert f"did you mean {misleading}?" not in str(e.value)


def test_in_a_yaml_file_too(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("num_heads: 32\n")
    with pytest.raises(ConfigError, match=r"did you mean 'model.num_heads'\?"):
        load_config(str(path))
