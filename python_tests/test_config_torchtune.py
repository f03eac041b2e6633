"""torchtune recipe configs (``_component_`` sections, ``${...}`` interpolation) read as the
trainer's own: the seed's 7B QLoRA file resolves to the bundled config's values, overrides use
torchtune's keys, what has no counterpart is refused with the reason, and one such file trains."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from qlora_ext import finetune
from qlora_ext.training.config import ASSETS_DIR, ConfigError, load_config

from trainer_helpers import metrics, write_small_dataset, write_tiny_hf_checkpoint

# torchtune's llama2/7B_qlora_single_device.yaml in its schema, with the values of our bundled
# llama2_7b_qlora_single_device (the seed's LoRA targets and accumulation).
TORCHTUNE_7B_QLORA = """
model:
  _component_: torchtune.models.llama2.qlora_llama2_7b
  lora_attn_modules: ['q_proj', 'v_proj', 'output_proj']
  apply_lora_to_mlp: True
  apply_lora_to_output: False
  lora_rank: 8
  lora_alpha: 16
  lora_dropout: 0.0
tokenizer:
  _component_: torchtune.models.llama2.llama2_tokenizer
  path: /tmp/Llama-2-7b-hf/tokenizer.model
  max_seq_len: null
checkpointer:
  _component_: torchtune.training.FullModelHFCheckpointer
  checkpoint_dir: /tmp/Llama-2-7b-hf
  checkpoint_files: [
    pytorch_model-00001-of-00002.bin,
    pytorch_model-00002-of-00002.bin
  ]
  adapter_checkpoint: null
  recipe_checkpoint: null
  output_dir: /tmp/Llama-2-7b-hf
  model_type: LLAMA2
resume_from_checkpoint: False
save_adapter_weights_only: False
dataset:
  _component_: torchtune.datasets.alpaca_cleaned_dataset
seed: null
shuffle: True
batch_size: 2
optimizer:
  _component_: torch.optim.AdamW
  fused: True
  weight_decay: 0.01
  lr: 3e-4
lr_scheduler:
  _component_: torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup
  num_warmup_steps: 100
loss:
  _component_: torchtune.modules.loss.CEWithChunkedOutputLoss
epochs: 1
max_steps_per_epoch: null
gradient_accumulation_steps: 8
compile: False
output_dir: /tmp/qlora_finetune_output
metric_logger:
  _component_: torchtune.training.metric_logging.DiskLogger
  log_dir: ${output_dir}/logs
log_every_n_steps: 1
log_peak_memory_stats: True
device: cuda
dtype: bf16
enable_activation_checkpointing: True
enable_activation_offloading: False
profiler:
  _component_: torchtune.training.setup_torch_profiler
  enabled: False
  output_dir: ${output_dir}/profiling_outputs
low_cpu_ram: False
"""


def _write(tmp_path, text: str = TORCHTUNE_7B_QLORA, edit=None):
    raw = yaml.safe_load(text)
    if edit is not None:
        edit(raw)
    path = tmp_path / "torchtune.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


def test_seed_config_in_torchtune_schema_equals_the_bundled_one(tmp_path):
    local = ["dataset.data_files=alpaca.json", "output_dir=/runs/a"]
    notes: list[str] = []
    theirs = load_config(_write(tmp_path), local, notes).to_dict()
    ours = load_config("llama2_7b_qlora_single_device", local + ["metric_logger.log_dir=/runs/a/logs"]).to_dict()
    assert theirs["checkpointer"].pop("checkpoint_files") == ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    assert ours["checkpointer"].pop("checkpoint_files") is None
    assert theirs["optimizer"].pop("fused") is True and ours["optimizer"].pop("fused") is None
    # a torchtune 0.3+ file without prompt_template: Llama2ChatTemplate, as its torchtune applied
    # (it was the Alpaca prompt alone, the bundled config's choice, the seed tutorial's)
    assert theirs["dataset"].pop("template") == "llama2_chat" and ours["dataset"].pop("template") == "alpaca"
    assert theirs == ours  # every other key, defaults included; log_dir followed the overridden output_dir
    assert notes == [
        "checkpoints go to output_dir (/runs/a), with the logs; checkpointer.output_dir (/tmp/Llama-2-7b-hf) is not used",
        "tokenizer: no prompt_template, so Llama2ChatTemplate ([INST] ... [/INST]), the default of torchtune 0.3 and later "
        "(this config's torchtune.training components); tokenizer.prompt_template=null gives the Alpaca prompt alone, as the "
        "seed tutorial's torchtune trained",
    ]


@pytest.mark.parametrize(
    "override, template",
    [("tokenizer.prompt_template=torchtune.models.llama2.Llama2ChatTemplate", "llama2_chat"), ("tokenizer.prompt_template=null", "alpaca")],
)
def test_prompt_template_chooses_the_dataset_template(tmp_path, override, template):
    notes: list[str] = []
    cfg = load_config(_write(tmp_path), ["dataset.data_files=alpaca.json", override], notes)
    assert cfg.dataset.template == template
    assert not any(note.startswith("tokenizer:") for note in notes)
    with pytest.raises(ConfigError, match=r"'tokenizer.prompt_template: torchtune.data.ChatMLTemplate' is not supported: null .* or "
                                          r"torchtune.models.llama2.Llama2ChatTemplate"):
        load_config(_write(tmp_path), ["dataset.data_files=alpaca.json", "tokenizer.prompt_template=torchtune.data.ChatMLTemplate"])


def test_our_dataset_template_key_is_kept_and_a_contradiction_refused(tmp_path):
    # dataset.template given without tokenizer.prompt_template had been overwritten with alpaca, silently.
    for template in ("llama2_chat", "alpaca"):
        notes: list[str] = []
        cfg = load_config(_write(tmp_path), ["dataset.data_files=alpaca.json", f"dataset.template={template}"], notes)
        assert cfg.dataset.template == template
        assert not any(note.startswith("tokenizer:") for note in notes)
    cfg = load_config(_write(tmp_path), ["dataset.data_files=alpaca.json", "dataset.template=llama2_chat",
                                         "tokenizer.prompt_template=torchtune.models.llama2.Llama2ChatTemplate"])
    assert cfg.dataset.template == "llama2_chat"
    with pytest.raises(ConfigError, match=r"'dataset.template: alpaca' contradicts 'tokenizer.prompt_template: "
                                          r"torchtune.models.llama2.Llama2ChatTemplate' \(which means dataset.template=llama2_chat\)"):
        load_config(_write(tmp_path), ["dataset.data_files=alpaca.json", "dataset.template=alpaca",
                                       "tokenizer.prompt_template=torchtune.models.llama2.Llama2ChatTemplate"])


def test_overrides_use_torchtune_keys(tmp_path):
    cfg = load_config(_write(tmp_path), [
        "dataset.data_files=[a.json,b.jsonl]", "checkpointer.checkpoint_files=[model.safetensors]",
        "tokenizer_checkpoint=/t/tokenizer.model", "model._component_=torchtune.models.llama2.lora_llama2_7b",
        "model.quantize_base=True", "metric_logger._component_=torchtune.training.metric_logging.TensorBoardLogger",
        "dataset.source=json", "dataset.train_on_input=False", "compile=True",
    ])
    assert cfg.dataset.data_files == ["a.json", "b.jsonl"] and cfg.dataset.train_on_input is False
    assert cfg.checkpointer.checkpoint_files == ["model.safetensors"] and cfg.tokenizer.path == "/t/tokenizer.model"
    assert cfg.model.builder == "qlora_llama2_7b"  # torchtune's qlora builders are lora ones with quantize_base
    assert cfg.metric_logger.type == "tensorboard" and cfg.compile is True
    # an explicit quantize_base false wins over the qlora builder's, as in torchtune (it was ignored: NF4 all the same)
    notes: list[str] = []
    assert load_config(_write(tmp_path), ["dataset.data_files=a.json", "model.quantize_base=false"], notes).model.builder == "lora_llama2_7b"
    assert "model: quantize_base false on qlora_llama2_7b keeps the base weights dense, as torchtune does: lora_llama2_7b" in notes
    with pytest.raises(ConfigError, match=r"'model.quantize_base: yes please' must be true or false"):
        load_config(_write(tmp_path), ["dataset.data_files=a.json", "model.quantize_base=yes please"])
    with pytest.raises(ConfigError, match=r"'model.quantize_base: 0' must be true or false"):
        load_config(_write(tmp_path), ["dataset.data_files=a.json", "model.quantize_base=0"])
    # null, as torchtune's modules test its truth: dense (it was read as absent: NF4)
    assert load_config(_write(tmp_path), ["dataset.data_files=a.json", "model.quantize_base=null"]).model.builder == "lora_llama2_7b"


def test_tune_run_override_forms(tmp_path):
    # ~key deletes a key, section=COMPONENT sets its _component_, max_filename keeps its zeros,
    # as tune run reads them (refused as not key=value, a section replaced by a string, 00010 read as 8)
    cfg = load_config(_write(tmp_path), ["dataset.data_files=a.json", "~checkpointer.checkpoint_files", "~tokenizer.max_seq_len",
                                         "model=torchtune.models.llama2.lora_llama2_7b",
                                         "metric_logger=torchtune.training.metric_logging.TensorBoardLogger"])
    assert cfg.checkpointer.checkpoint_files is None and cfg.model.builder == "lora_llama2_7b"
    assert cfg.metric_logger.type == "tensorboard" and cfg.metric_logger.log_dir.endswith("/logs")
    for section in ("~model._component_", "~lr_scheduler", "~optimizer"):  # (~lr_scheduler was undone by the defaults)
        with pytest.raises(ConfigError, match=rf"override '{section}': a component cannot be removed"):
            load_config(_write(tmp_path), ["dataset.data_files=a.json", section])
    with pytest.raises(ConfigError, match=r"override '~model.lora_rnk': the config has no key 'model.lora_rnk' to remove"):
        load_config(_write(tmp_path), ["dataset.data_files=a.json", "~model.lora_rnk"])
    with pytest.raises(ConfigError, match=r"'~key' \(torchtune's deletion of a key\) applies to torchtune config files"):
        load_config("tiny_qlora", ["~model.lora_rank"])
    shards = {"filename_format": "model-{}-of-{}.safetensors", "max_filename": "00002"}
    for text, count in (("00010", 10), ("00003", 3)):
        cfg = load_config(_write(tmp_path, edit=_set("checkpointer.checkpoint_files", shards)),
                          ["dataset.data_files=a.json", f"checkpointer.checkpoint_files.max_filename={text}"])
        assert cfg.checkpointer.checkpoint_files == [f"model-{i:05d}-of-{text}.safetensors" for i in range(1, count + 1)]


def test_a_config_that_does_not_train_or_lists_datasets_is_named(tmp_path, monkeypatch):
    # generation/evaluation configs were called "a full fine-tune"; a dataset list "must be a section"
    with pytest.raises(ConfigError, match=r"it has no 'optimizer' section: a config of a torchtune recipe that does not train"):
        load_config(_write(tmp_path, edit=lambda raw: raw.pop("optimizer")), ["dataset.data_files=a.json"])
    two = [{"_component_": "torchtune.datasets.alpaca_dataset"}, {"_component_": "torchtune.datasets.alpaca_cleaned_dataset"}]
    with pytest.raises(ConfigError, match=r"'dataset' lists 2 datasets \(torchtune concatenates them\); this trainer reads one"):
        load_config(_write(tmp_path, edit=_set("dataset", two)), [])
    # --config ~/... names the home folder, as the path keys do
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_config("~/" + _write(tmp_path).rsplit("/", 1)[-1], ["dataset.data_files=a.json"]).model.builder == "qlora_llama2_7b"


def test_overrides_of_our_path_keys_are_taken_as_written(tmp_path):
    # YAML cut '/runs/a #2' at ' #' (a comment) where the key is one of ours of kind path.
    cfg = load_config(_write(tmp_path), ["output_dir=/runs/a #2", "tokenizer_checkpoint=/t/tok #1.model", "dataset.data_files=d #v2.json"])
    assert cfg.output_dir == "/runs/a #2" and cfg.tokenizer.path == "/t/tok #1.model" and cfg.dataset.data_files == ["d #v2.json"]


def test_an_override_through_a_value_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"override 'seed.x=1': 'seed' in the config file is not a section"):
        load_config(_write(tmp_path), ["dataset.data_files=a.json", "seed=3", "seed.x=1"])


def test_checkpoint_files_as_a_filename_format(tmp_path):
    def edit(raw):
        raw["checkpointer"]["checkpoint_files"] = {"filename_format": "model-{}-of-{}.safetensors", "max_filename": "00003"}

    cfg = load_config(_write(tmp_path, edit=edit), ["dataset.data_files=a.json"])
    assert cfg.checkpointer.checkpoint_files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    # A damaged max_filename listed a billion names (a MemoryError); other fields in the format were tracebacks.
    for files, needle in [
        ({"filename_format": "model-{}-of-{}.safetensors", "max_filename": "999999999"}, r"a numeric max_filename from 1 to 10000"),
        ({"filename_format": "model-{}-of-{}.safetensors", "max_filename": "\u00b2"}, r"a numeric max_filename from 1 to 10000"),  # isdigit, not int
        ({"filename_format": "model-{name}-{}-of-{}", "max_filename": "2"}, r"filename_format 'model-\{name\}-\{\}-of-\{\}' cannot be filled"),
    ]:
        with pytest.raises(ConfigError, match=needle):
            load_config(_write(tmp_path, edit=lambda raw: raw["checkpointer"].__setitem__("checkpoint_files", files)), ["dataset.data_files=a.json"])


def _before_0_3(raw):
    # torchtune 0.1/0.2 files: components under torchtune.utils, no lora_dropout, no max_seq_len,
    # the multi-GPU recipe's fsdp section in the distributed ones, log_every_n_steps null in 0.1's LoRA file
    raw["checkpointer"]["_component_"] = "torchtune.utils.FullModelHFCheckpointer"
    raw["metric_logger"]["_component_"] = "torchtune.utils.metric_logging.DiskLogger"
    del raw["model"]["lora_dropout"], raw["tokenizer"]["max_seq_len"]


def test_torchtune_before_0_3_keeps_its_defaults(tmp_path):
    # Where a torchtune 0.1/0.2 config was silent, its builders gave LoRA dropout 0.05 and its
    # alpaca_dataset cut examples at 512 tokens; read as 0.0 and no limit, it trained otherwise.
    notes: list[str] = []
    cfg = load_config(_write(tmp_path, edit=_before_0_3), ["dataset.data_files=a.json"], notes)
    assert (cfg.model.lora_dropout, cfg.tokenizer.max_seq_len) == (0.05, 512)
    assert cfg.dataset.template == "alpaca" and not any(n.startswith("tokenizer:") for n in notes)  # it had no templates
    assert "model.lora_dropout: 0.05, as torchtune before 0.3 (this config's torchtune.utils components) applied where its config was silent" in notes
    assert "tokenizer.max_seq_len: 512, as torchtune before 0.3 cut Alpaca examples (its alpaca_dataset's max_seq_len) where its config was silent" in notes
    # what the file or an override says wins
    cfg = load_config(_write(tmp_path, edit=_before_0_3), ["dataset.data_files=a.json", "model.lora_dropout=0.1", "dataset.max_seq_len=1024"])
    assert (cfg.model.lora_dropout, cfg.tokenizer.max_seq_len) == (0.1, 1024)
    # torchtune 0.3 and later: their own defaults are ours
    cfg = load_config(_write(tmp_path, edit=lambda raw: raw["model"].pop("lora_dropout")), ["dataset.data_files=a.json"])
    assert (cfg.model.lora_dropout, cfg.tokenizer.max_seq_len) == (0.0, None)


def test_dataset_max_seq_len_and_other_recipes_settings(tmp_path):
    # dataset.max_seq_len next to a 0.3+ file's tokenizer.max_seq_len: null was dropped, silently
    assert load_config(_write(tmp_path), ["dataset.data_files=a.json", "dataset.max_seq_len=512"]).tokenizer.max_seq_len == 512
    with pytest.raises(ConfigError, match=r"'dataset.max_seq_len: 512' contradicts 'tokenizer.max_seq_len: 256'; set one of them"):
        load_config(_write(tmp_path), ["dataset.data_files=a.json", "dataset.max_seq_len=512", "tokenizer.max_seq_len=256"])
    # a tokenizer that is not a section, where dataset.max_seq_len moves to: named (an AttributeError);
    # a null one is an empty section, whose path is then required
    with pytest.raises(ConfigError, match=r"'tokenizer' must be a section \(its _component_, path and max_seq_len\), where "
                                          r"'dataset.max_seq_len' moves to; got '/data/tokenizer.model'$"):
        load_config(_write(tmp_path, edit=_set("tokenizer", "/data/tokenizer.model")), ["dataset.data_files=a.json", "dataset.max_seq_len=512"])
    with pytest.raises(ConfigError, match=r"config key 'tokenizer.path' is required"):
        load_config(_write(tmp_path, edit=_set("tokenizer", None)), ["dataset.data_files=a.json", "dataset.max_seq_len=512"])
    # an override with more digits than Python converts was its ValueError and traceback
    with pytest.raises(ConfigError, match=r"override 'seed=10+': its value cannot be read: Exceeds the limit \(4300 digits\)"):
        load_config(_write(tmp_path), ["dataset.data_files=a.json", "seed=1" + "0" * 5000])
    # torchtune's recipes read log_every_n_steps: null as 1 (0.1's 7B_lora_single_device.yaml has it)
    assert load_config(_write(tmp_path, edit=_set("log_every_n_steps", None)), ["dataset.data_files=a.json"]).log_every_n_steps == 1

    # the multi-GPU recipe's configs: its FSDP settings are dropped with a note
    def distributed(raw):
        raw["fsdp"] = {"cpu_offload": False}
        raw["custom_sharded_layers"] = ["tok_embeddings", "output"]

    notes: list[str] = []
    load_config(_write(tmp_path, edit=distributed), ["dataset.data_files=a.json"], notes)
    assert ("fsdp, custom_sharded_layers: settings of torchtune's multi-GPU recipe (lora_finetune_distributed), not used by this "
            "one-device trainer; that recipe's batch_size is per GPU, so a batch here is one GPU's share") in notes
    # its LoRA configs (llama2/7B_lora) have no FSDP key: the launch command in their comments says it
    header = ("# Config for multi-device LoRA finetuning in lora_finetune_distributed.py\n#\n# To launch on 2 devices, run:\n"
              "#   tune run --nnodes 1 --nproc_per_node 2 lora_finetune_distributed --config llama2/7B_lora\n")
    body = Path(_write(tmp_path)).read_text()
    path = tmp_path / "7B_lora.yaml"
    path.write_text(header + body)
    notes = []
    load_config(str(path), ["dataset.data_files=a.json"], notes)
    assert ("the file's comments run it with torchtune's multi-GPU recipe (lora_finetune_distributed), whose batch_size is per "
            "GPU: a batch here is one GPU's share") in notes
    # a single-device file that names the multi-GPU recipe in prose, not in its launch command: no note
    path.write_text("# For 2+ GPUs use lora_finetune_distributed.\n#   tune run lora_finetune_single_device --config x  "
                    "# (on 2 GPUs: lora_finetune_distributed)\n" + body)
    notes = []
    load_config(str(path), ["dataset.data_files=a.json"], notes)
    assert not any("multi-GPU" in n for n in notes)

    # Meta's checkpointer: the Meta checkpoint is read, and the note says the save is in HF format
    notes = []
    load_config(_write(tmp_path, edit=_set("checkpointer._component_", "torchtune.training.FullModelMetaCheckpointer")),
                ["dataset.data_files=a.json"], notes)
    assert any(n.startswith("checkpointer: FullModelMetaCheckpointer reads the Meta checkpoint; the merged model is saved in HF "
                            "format") for n in notes)


def _set(dotted: str, value):
    def edit(raw):
        *parents, last = dotted.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value

    return edit


@pytest.mark.parametrize(
    "edit, needles",
    [
        (None, ["dataset.data_files=PATH", "yahma/alpaca-cleaned", "Hugging Face Hub"]),
        (_set("optimizer._component_", "bitsandbytes.optim.PagedAdamW8bit"), ["'optimizer._component_'", "PagedAdamW8bit", "AdamW"]),
        (_set("model._component_", "torchtune.models.llama2.llama2_7b"), ["full fine-tune", "qlora_llama2_7b"]),
        (_set("model._component_", "torchtune.models.llama3.lora_llama3_8b"), ["'model._component_'", "lora_llama3_8b", "qlora_llama2_13b"]),
        (_set("lr_scheduler._component_", "torchtune.training.lr_schedulers.get_linear_schedule"), ["get_cosine_schedule_with_warmup"]),
        (_set("profiler.enabled", True), ["'profiler.enabled: True' is not supported"]),
        (_set("dataset.packed", True), ["'dataset.packed: True' is not supported", "padded"]),
        (_set("dataset.field", "data"), ["'dataset.field: data' is not supported", "top-level JSON list"]),
        (_set("dataset.column_map", {"outptu": "response"}), ["unknown config key 'dataset.column_map.outptu'", "did you mean"]),
        (_set("checkpointer.recipe_checkpoint", "recipe_state.pt"), ["checkpointer.recipe_checkpoint", "resume_from_checkpoint=True"]),
        (_set("enable_activation_offloading", True), ["'enable_activation_offloading: True' is not supported"]),
        (_set("model.use_dora", True), ["'model.use_dora: True'", "DoRA"]),
        (_set("metric_logger.log_dir", "${oc.env:HOME}/logs"), ["${oc.env:HOME}", "resolvers"]),
        (_set("metric_logger.log_dir", "${out_dir}/logs"), ["${out_dir}", "no key 'out_dir'"]),
        (_set("metric_logger.log_dir", "${checkpointer.${x}}/logs"), ["${checkpointer.${x}}", "nested references"]),
        (_set("output_dir", "${metric_logger.log_dir}"), ["refers to itself"]),
        (_set("model.lora_rnk", 8), ["unknown config key 'model.lora_rnk'", "torchtune config", "did you mean 'model.lora_rank'"]),
        (_set("dataset.source", "yahma/alpaca-cleaned"), ["dataset.data_files=PATH"]),
    ],
)
def test_what_has_no_counterpart_is_refused_with_the_reason(tmp_path, edit, needles):
    overrides = [] if needles[0] == "dataset.data_files=PATH" else ["dataset.data_files=a.json"]
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, edit=edit), overrides)
    for needle in needles:
        assert needle in str(e.value)


def test_the_launch_recipe_is_read_from_the_first_tune_run_comment():
    from qlora_ext.training.torchtune_config import launch_recipe

    for command in ("tune run --nnodes 1 --nproc_per_node 2 lora_finetune_distributed --config llama2/7B_lora",
                    "tune run --nproc_per_node gpu lora_finetune_distributed --config llama2/7B_lora",  # (torchrun's gpu, auto, 1:2)
                    "tune run --nnodes 1:2 --nproc_per_node 8 lora_finetune_distributed",
                    "tune run --nnodes 2 --rdzv_endpoint host:29500 lora_finetune_distributed"):
        assert launch_recipe(f"# Config for ...\n#   {command}\n") == "lora_finetune_distributed", command
    for text in ("#   tune run lora_finetune_single_device --config x  # (on 2 GPUs: lora_finetune_distributed)\n",
                 "#   tune run lora_finetune_single_device --config x\n# or: tune run --nproc_per_node 2 lora_finetune_distributed\n",
                 "tune run --nproc_per_node 2 lora_finetune_distributed --config x\n",  # (not a comment)
                 "#   tune run lora_finetune_single_device --config x  # or: tune run --nproc_per_node 2 lora_finetune_distributed --config y\n"):
        assert launch_recipe(text) is None, text


def test_column_map_is_read(tmp_path):
    # torchtune's dataset.column_map (its records' keys for instruction, input, output): was refused
    cfg = load_config(_write(tmp_path, edit=_set("dataset.column_map", {"input": "context", "output": "response"})),
                      ["dataset.data_files=a.json"])
    assert cfg.dataset.column_map.to_dict() == {"instruction": "instruction", "input": "context", "output": "response"}
    assert load_config(_write(tmp_path, edit=_set("dataset.column_map", None)), ["dataset.data_files=a.json"]).dataset.column_map.output == "output"
    cfg = load_config(_write(tmp_path), ["dataset.data_files=a.json", "dataset.column_map.output=response"])  # (tune run's override)
    assert cfg.dataset.column_map.output == "response"


def test_a_torchtune_config_trains(tmp_path, capsys):
    """The tiny model's run from a file in torchtune's schema, end to end on CPU."""
    ckpt = write_tiny_hf_checkpoint(tmp_path / "tiny_hf")
    data = write_small_dataset(tmp_path / "small.jsonl")
    out = tmp_path / "run"

    def edit(raw):
        raw["model"]["_component_"] = "torchtune.models.llama2.qlora_llama2"  # architecture from config.json
        raw["checkpointer"]["checkpoint_files"] = ["model.safetensors"]
        raw["checkpointer"]["output_dir"] = str(out)
        del raw["output_dir"], raw["profiler"]  # then torchtune's checkpointer.output_dir is where everything goes
        raw["metric_logger"]["log_dir"] = "${checkpointer.output_dir}/logs"
        raw["tokenizer"]["prompt_template"] = "torchtune.models.llama2.Llama2ChatTemplate"  # torchtune 0.3+'s default

    args = ["--config", _write(tmp_path, edit=edit), f"checkpointer.checkpoint_dir={ckpt}",
            f"tokenizer.path={ASSETS_DIR / 'tokenizer.model'}", f"dataset.data_files={data}", "device=cpu", "dtype=fp32",
            "max_steps_per_epoch=2", "gradient_accumulation_steps=1", "lr_scheduler.num_warmup_steps=1"]
    assert finetune.main(args) == 0
    text = capsys.readouterr().out
    assert "builder: qlora_llama2\n" in text and "note:" not in text
    assert [r["step"] for r in metrics(out)] == [1, 2]
    assert (out / "epoch_0" / "adapter" / "adapter_model.safetensors").is_file()
    saved = load_config(str(out / "config.yaml"))  # the resolved config is ours, and reloads
    assert saved.model.builder == "qlora_llama2" and saved.dataset.train_on_input is True and saved.dataset.template == "llama2_chat"


def _with_dataset(tmp_path, dataset):
    raw = yaml.safe_load(TORCHTUNE_7B_QLORA)
    raw["dataset"] = dataset
    path = tmp_path / "torchtune.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


@pytest.mark.parametrize("component, source", [
    ("torchtune.datasets.alpaca_dataset", "yahma/alpaca-cleaned"),
    ("torchtune.datasets.alpaca_cleaned_dataset", "tatsu-lab/alpaca"),
])
def test_either_alpaca_hub_source_with_local_files_reads_the_files(tmp_path, component, source):
    # alpaca_cleaned_dataset is alpaca_dataset with source=yahma/alpaca-cleaned; with local files given, the
    # other spelling was refused ("'dataset.source: ...' is not supported"), with no word of what to do
    cfg = load_config(_with_dataset(tmp_path, {"_component_": component, "source": source}), ["dataset.data_files=a.json"])
    assert cfg.dataset.data_files == ["a.json"] and cfg.dataset.train_on_input is True


def test_dataset_sources_and_formats_this_trainer_cannot_read_say_what_to_do(tmp_path):
    alpaca = "torchtune.datasets.alpaca_dataset"
    for dataset, overrides, message in (
        ({"_component_": alpaca, "source": "someone/my-alpaca"}, ["dataset.data_files=a.json"],
         r"'dataset.source: someone/my-alpaca' is not supported: this trainer reads the local files dataset.data_files names "
         r"\(JSON or JSONL\); remove dataset.source, or set it to json"),
        ({"_component_": alpaca, "source": "json"}, [],  # (not a Hub download)
         r"'dataset': source json reads the files dataset.data_files names: set dataset.data_files=PATH"),
        ({"_component_": alpaca, "split": "train[:90%]"}, ["dataset.data_files=a.json"],
         r"'dataset.split: train\[:90%\]' is not supported: it picks part of the records: give a file holding just those"),
        ({"_component_": "torchtune.datasets.instruct_dataset", "source": "json", "template": "torchtune.data.AlpacaInstructTemplate"},
         ["dataset.data_files=a.json"], r"'dataset._component_' is 'torchtune.datasets.instruct_dataset' with the Alpaca template, "
         r"which is torchtune's alpaca_dataset: set dataset._component_=torchtune.datasets.alpaca_dataset"),
        ({"_component_": "torchtune.datasets.instruct_dataset", "column_map": {"input": "prompt"}}, ["dataset.data_files=a.json"],
         r"'dataset._component_' is 'torchtune.datasets.instruct_dataset', which formats raw input -> output records or chat "
         r"turns without the Alpaca prompt; .* convert the records to instruction/input/output fields"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config(_with_dataset(tmp_path, dataset), overrides)


def _config_with_dataset(tmp_path, dataset):
    raw = yaml.safe_load(TORCHTUNE_7B_QLORA)
    raw["dataset"] = dataset
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_the_instruct_dataset_advice_keeps_its_train_on_input_default(tmp_path):
    # torchtune's instruct_dataset defaults to train_on_input=False, alpaca_dataset to True: switching the
    # component as advised, without the flag, trains on the prompts too
    path = _config_with_dataset(tmp_path, {"_component_": "torchtune.datasets.instruct_dataset", "source": "json",
                              "template": "torchtune.data.AlpacaInstructTemplate"})
    with pytest.raises(ConfigError, match=r"train_on_input=False"):
        load_config(path, ["dataset.data_files=a.json"])


def test_a_data_files_dict_with_the_split_is_read_as_torchtune_reads_it(tmp_path):
    # HF datasets' (and so torchtune's) data_files={split: files}; split defaults to train
    path = _config_with_dataset(tmp_path, {"_component_": "torchtune.datasets.alpaca_dataset", "source": "json",
                              "data_files": {"train": "a.json"}})
    assert load_config(path).dataset.data_files == ["a.json"]


@pytest.mark.parametrize("override, advice", [
    ("checkpointer.output_dir=/runs/x", "give output_dir=/runs/x"),
    ("dataset.max_seq_len=512", "give tokenizer.max_seq_len=512"),
    ("model=torchtune.models.llama2.lora_llama2_7b", "give model.builder=lora_llama2_7b"),
    ("metric_logger=torchtune.training.metric_logging.WandBLogger", "give metric_logger.type=wandb"),
    ("dataset.source=json", "drop it: the files dataset.data_files names are read as JSON"),
    ("profiler.enabled=False", "drop it: this trainer has no profiler setting"),
])
def test_torchtune_override_keys_on_the_bundled_config_name_ours(override, advice):
    # `--config llama2/7B_qlora_single_device` (the tutorial's name) reads the bundled config, in this trainer's keys:
    # torchtune's own override keys, taken on a torchtune YAML, were refused naming no key of ours (helper-145)
    with pytest.raises(ConfigError, match=re.escape(f"(that is torchtune's key, and this config is in this trainer's keys: {advice}")):
        load_config("llama2/7B_qlora_single_device", [override])
    assert load_config("tiny_qlora", ["tokenizer.max_seq_len=512"]).tokenizer.max_seq_len == 512  # (the key advised works)


def test_a_sliced_split_of_a_data_files_dict_is_refused_for_the_slice(tmp_path):
    path = _config_with_dataset(tmp_path, {"_component_": "torchtune.datasets.alpaca_dataset", "source": "json",
                                           "data_files": {"train": "a.json"}, "split": "train[:95%]"})
    # now: "'dataset.data_files' maps the splits ['train'] to files, and dataset.split 'train[:95%]' is none of them"
    with pytest.raises(ConfigError, match=r"dataset.split: train\[:95%\]' is not supported: it picks part of the records"):
        load_config(str(path))
