"""Loading HF, Meta and bitsandbytes-4-bit checkpoints into a built Llama-2 model, one tensor at
a time.

The model may be built on the meta device (``with torch.device("meta"): model = ...``): each
weight is then created where it belongs as it is read, and a weight the model keeps in NF4 is
quantized on arrival (or taken as stored, for a bitsandbytes checkpoint), so loading never holds
more than one dense tensor beyond what the model itself keeps dense. Adapter weights are not part
of a base checkpoint: on the meta device they are initialized fresh (lora_b = 0).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from qlora_ext._dtypes import FLOAT_DTYPES
from qlora_ext._reference import dequantize_absmax
from qlora_ext.checkpoint.config import Llama2Config, read_json
from qlora_ext.checkpoint.convert import (
    hf_to_ours,
    is_rotary_projection,
    meta_to_hf_rotary,
    meta_to_ours,
    ours_to_hf,
    ours_to_meta,
    strip_wrappers,
    unwrap_parallel,
)
from qlora_ext.checkpoint.readers import (
    Entry,
    TensorFiles,
    hf_entries,
    hf_weight_files,
    meta_entries,
    meta_shard_order,
    meta_weight_files,
)
from qlora_ext.modules.lora_linear import LoRALinear
from qlora_ext.modules.peft import get_adapter_params
from qlora_ext.modules.position_embeddings import RotaryPositionalEmbeddings
from qlora_ext.nf4 import NF4Tensor, to_nf4

_LIST_LIMIT = 20


def checkpoint_format(checkpoint_dir: str | os.PathLike) -> str:
    """"hf" (config.json) or "meta" (params.json + consolidated.*.pth).

    Raises:
        FileNotFoundError: the folder is missing or holds neither.
        ValueError: the folder cannot be listed, or its files cannot be reached (permissions).
    """
    checkpoint_dir = os.fspath(checkpoint_dir)
    if not os.path.isdir(checkpoint_dir):
        raise FileNotFoundError(f"argument 'checkpoint_dir' must be an existing folder; got {checkpoint_dir!r}")
    try:
        names = os.listdir(checkpoint_dir)
        os.stat(os.path.join(checkpoint_dir, "."))  # a folder listed but not entered (no x permission) hides its files
    except OSError as e:
        raise ValueError(f"checkpoint folder {checkpoint_dir} cannot be read: {e.strerror}") from None
    present = [name for name in ("config.json", "params.json") if name in names and os.path.exists(os.path.join(checkpoint_dir, name))]
    if present:
        return "hf" if present[0] == "config.json" else "meta"
    dangling = [name for name in ("config.json", "params.json") if name in names]
    raise FileNotFoundError(
        f"{checkpoint_dir} is neither a HF checkpoint (config.json) nor a Meta one (params.json); found {sorted(names)}"
        + (f" ({', '.join(dangling)}: a link to a missing file)" if dangling else "")
    )


def _weight_files(checkpoint_dir: str, fmt: str, checkpoint_files: Sequence[str] | None) -> list[str]:
    """The weight files: those named (``checkpoint_files``, inside the folder), else found by name."""
    if checkpoint_files is not None:
        paths = _named_files(checkpoint_dir, checkpoint_files)
        # Meta shards listed in any order, as HF files may be; a single file under any name (torchtune's meta_model_0.pt)
        return paths if fmt == "hf" or len(paths) == 1 else meta_shard_order(paths)
    return hf_weight_files(checkpoint_dir) if fmt == "hf" else meta_weight_files(checkpoint_dir)


_DIGEST_PIECES = 16  # 4 KiB pieces that weights_digest reads of each weight file


def weights_digest(checkpoint_dir: str | os.PathLike, checkpoint_files: Sequence[str] | None = None) -> str:
    """A short description of the weights a checkpoint folder holds that changes when they do:
    the weight files' names (inside the folder) and sizes, and a sha256 of 16 pieces of 4 KiB
    spread over each file (a file of at most 64 KiB whole). Two checkpoints of one
    architecture have equal sizes; their sampled bytes differ. Moving or copying the folder keeps
    it. ``checkpoint_files`` as for ``load_checkpoint``.

    Raises:
        FileNotFoundError: no checkpoint there, or a named file is not there.
    """
    checkpoint_dir = os.fspath(checkpoint_dir)
    files = _weight_files(checkpoint_dir, checkpoint_format(checkpoint_dir), checkpoint_files)
    digest, total = hashlib.sha256(), 0
    for path in sorted(files):
        size = os.path.getsize(path)
        total += size
        digest.update(f"{os.path.relpath(path, checkpoint_dir)}\0{size}\0".encode())
        with open(path, "rb") as f:
            if size <= _DIGEST_PIECES * 4096:
                digest.update(f.read())
                continue
            for i in range(_DIGEST_PIECES):
                f.seek((size - 4096) * i // (_DIGEST_PIECES - 1))
                digest.update(f.read(4096))
    return f"{len(files)} file(s), {total} bytes, sampled sha256 {digest.hexdigest()[:16]}"


def stored_dtype(checkpoint_dir: str | os.PathLike, checkpoint_files: Sequence[str] | None = None) -> torch.dtype | None:
    """The dtype a checkpoint stores its token embedding in (for a Meta checkpoint, or a HF one whose
    config.json declares none); None where there is no such tensor. Only the file's header or
    index is read. ``checkpoint_files`` as for ``load_checkpoint``.

    Raises:
        FileNotFoundError: no checkpoint there, or a named file is not there.
    """
    checkpoint_dir = os.fspath(checkpoint_dir)
    fmt = checkpoint_format(checkpoint_dir)
    files = _weight_files(checkpoint_dir, fmt, checkpoint_files)
    if fmt == "hf":
        key = "model.embed_tokens.weight"
    else:
        files, key = files[:1], "tok_embeddings.weight"
    for file in files:
        with TensorFiles([file]) as tensors:
            if key in tensors.dtypes:
                return tensors.dtypes[key] if tensors.dtypes[key].is_floating_point else None
    return None


def read_checkpoint_config(checkpoint_dir: str | os.PathLike, checkpoint_files: Sequence[str] | None = None) -> Llama2Config:
    """The architecture a checkpoint folder holds, from config.json or params.json (Meta's
    vocab_size of -1 is taken from the embedding's shape, in the first weight file:
    ``checkpoint_files`` as for ``load_checkpoint``).

    Raises:
        FileNotFoundError: no checkpoint there, or a named file is not there.
        ValueError: an unsupported or incomplete config.
    """
    checkpoint_dir = os.fspath(checkpoint_dir)
    if checkpoint_format(checkpoint_dir) == "hf":
        return Llama2Config.from_hf(read_json(os.path.join(checkpoint_dir, "config.json")))
    first = _weight_files(checkpoint_dir, "meta", checkpoint_files)[0]
    with TensorFiles([first]) as shard:
        vocab = shard.shapes.get("tok_embeddings.weight", (None,))[0]
    params = read_json(os.path.join(checkpoint_dir, "params.json"))
    declared = params.get("vocab_size")
    if vocab is None and not (isinstance(declared, int) and declared > 0):  # as from_meta reads it
        raise ValueError(
            f"{first} holds no tok_embeddings.weight, and params.json gives no vocab_size (it has "
            f"{params.get('vocab_size')!r}): the vocabulary size cannot be told"
        )
    return Llama2Config.from_meta(params, vocab_size=vocab)


def load_checkpoint(
    model: nn.Module,
    checkpoint_dir: str | os.PathLike,
    *,
    device: torch.device | str | None = None,
    checkpoint_files: Sequence[str] | None = None,
) -> str:
    """Fills ``model`` (a Llama-2 ``TransformerDecoder``) with a checkpoint's weights.

    Reads HF folders (``config.json`` with ``model.safetensors``, sharded safetensors with
    ``model.safetensors.index.json``, or ``pytorch_model*.bin``; bitsandbytes 4-bit ones too, when
    NF4 with double quantization and blocksize 64, the format ``to_nf4`` makes) and
    Meta folders (``params.json`` + ``consolidated.*.pth``, model-parallel shards concatenated,
    q/k rows permuted to the HF rotary layout).

    Args:
        model: the model, on the meta device or already materialized (or the DistributedDataParallel
            wrapping it).
        checkpoint_dir: the folder.
        device: where weights of a meta-device model go (default: where the model's other
            weights are, else CPU); a materialized model's weights stay where they are.
        checkpoint_files: the weight files to read, names inside ``checkpoint_dir`` (torchtune's
            ``checkpointer.checkpoint_files``); default: found from the index or the file names.

    Returns:
        The format read: "hf" or "meta".

    Raises:
        FileNotFoundError: no checkpoint in ``checkpoint_dir``, or a named file is not there, or
            the folder was replaced while being read (a save of another folder renamed onto it).
        ValueError: the architecture differs from the model's, or keys are missing, unexpected
            or of the wrong shape (all listed), or the config is unsupported, or a LoRA module of
            the model has its adapter merged into its base weight (call ``unmerge_()`` first);
            nothing is loaded then. A weight to quantize that holds NaN or Inf is found only when
            it is read: the error names it and how many tensors were loaded before it. Also a
            folder that cannot be listed.
        TypeError: ``model`` is not a Llama-2 ``TransformerDecoder``.
    """
    model = unwrap_parallel(model)
    checkpoint_dir = os.fspath(checkpoint_dir)
    fmt = checkpoint_format(checkpoint_dir)
    folder = _folder_identity(checkpoint_dir)
    wanted = Llama2Config.from_model(model)
    given = read_checkpoint_config(checkpoint_dir, checkpoint_files)
    diffs = given.differences(wanted)
    if diffs:
        raise ValueError(f"load_checkpoint: checkpoint {checkpoint_dir} has another architecture than the model (checkpoint vs model): {'; '.join(diffs)}")
    paths = _weight_files(checkpoint_dir, fmt, checkpoint_files)
    with contextlib.ExitStack() as stack:
        if fmt == "hf":
            files = stack.enter_context(TensorFiles(paths))
            _check_not_replaced(checkpoint_dir, folder)
            load_entries(model, hf_entries(files), rename=hf_to_ours, name_in_source=ours_to_hf, device=device, source=checkpoint_dir)
        else:
            shards = [stack.enter_context(TensorFiles([path])) for path in paths]
            _check_not_replaced(checkpoint_dir, folder)
            _check_meta_shard_count(shards, given.embed_dim)

            def to_hf_rotary(name: str, value: Tensor) -> Tensor:
                if not is_rotary_projection(name):
                    return value
                heads = wanted.num_heads if name.endswith("q_proj.weight") else wanted.num_kv_heads
                return meta_to_hf_rotary(value, heads)

            load_entries(model, meta_entries(shards), rename=meta_to_ours, name_in_source=ours_to_meta, transform=to_hf_rotary,
                         device=device, source=checkpoint_dir)
    return fmt


def _folder_identity(folder: str) -> tuple[int, int]:
    info = os.stat(folder)
    return info.st_dev, info.st_ino


def _check_not_replaced(checkpoint_dir: str, identity: tuple[int, int]) -> None:
    """Every file is open (its content fixed however the folder changes): they came from one save
    unless the folder was swapped for another since the config was read, as the trainer's save of
    an epoch folder does (a reader in between got shards of two saves, or a folder not there)."""
    try:
        same = _folder_identity(checkpoint_dir) == identity
    except FileNotFoundError:
        same = False
    if not same:
        raise FileNotFoundError(
            f"checkpoint {checkpoint_dir} was replaced while it was being read (a save into it, as a training run's at "
            "an epoch end); load it again once the save is done"
        )


def _check_meta_shard_count(shards: list[TensorFiles], dim: int) -> None:
    """Rank 0's share of ``wq`` tells how many model-parallel shards the checkpoint was cut into;
    a shard too many or too few is said so (else every split tensor had the wrong size)."""
    key = "layers.0.attention.wq.weight"
    rows = shards[0].shapes.get(key, (0,))[0]
    if rows and dim % rows == 0 and dim // rows != len(shards):
        raise ValueError(
            f"load_checkpoint: {shards[0].paths[0]} holds {rows} of the {dim} rows of {key}, so the checkpoint was cut into "
            f"{dim // rows} model-parallel shards; found {len(shards)}: {[os.path.basename(s.paths[0]) for s in shards]}"
        )


def _named_files(checkpoint_dir: str, names: Sequence[str]) -> list[str]:
    if isinstance(names, str) or not names:
        raise ValueError(f"load_checkpoint: argument 'checkpoint_files' must be a non-empty list of file names; got {names!r}")
    paths = [os.path.join(checkpoint_dir, os.fspath(n)) for n in names]
    twice = [n for i, (n, p) in enumerate(zip(names, paths)) if os.path.normpath(p) in map(os.path.normpath, paths[:i])]
    if twice:
        raise ValueError(f"load_checkpoint: argument 'checkpoint_files' names each file once; got {twice[0]!r} twice")
    missing = [n for n, p in zip(names, paths) if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"checkpoint_files {missing} are not files in {checkpoint_dir}; it holds {sorted(os.listdir(checkpoint_dir))}")
    return paths


def load_entries(
    model: nn.Module,
    entries: list[Entry],
    *,
    rename: Callable[[str], str | None],
    name_in_source: Callable[[str], str | None] | None = None,
    transform: Callable[[str, Tensor], Tensor] | None = None,
    device: torch.device | str | None = None,
    source: str = "checkpoint",
) -> None:
    """Checks every entry's name and shape against the model, then loads them one at a time.

    Args:
        model: the model to fill (meta device or materialized).
        entries: the checkpoint's tensors.
        rename: checkpoint name -> model name ("" to skip the entry, None if unknown).
        name_in_source: model name -> checkpoint name, for naming missing keys as the checkpoint
            would have them (default: the model's names).
        transform: applied to each tensor after reading, with its model name.
        device: for a meta-device model, where its weights go.
        source: names the checkpoint in error messages.

    Raises:
        ValueError: missing, unexpected, wrongly shaped or not floating-point (int or bool) keys
            (listed, nothing loaded), LoRA modules with a merged adapter (nothing loaded), or a
            weight that holds NaN or Inf (named; the tensors before it are loaded, and the message
            says how many).
        RuntimeError: a meta-device model still has meta tensors afterwards.
    """
    refuse_merged(model, "load_checkpoint")
    targets = _targets(model)
    adapters = {strip_wrappers(name) for name in get_adapter_params(model)}
    plan, unexpected, mismatched, not_float = [], [], [], []
    for entry in entries:
        ours = rename(entry.name)
        if ours == "":
            continue
        if ours is None or ours not in targets:
            unexpected.append(entry.name)
            continue
        module, attr = targets[ours]
        have = tuple(getattr(module, attr).shape)
        if have != tuple(entry.shape):
            mismatched.append(f"{entry.name}: checkpoint {list(entry.shape)} vs model {list(have)}")
        if entry.dtype is not None and not entry.dtype.is_floating_point:  # weights, norms and embeddings all are
            not_float.append(f"{entry.name}: {entry.dtype}")
        plan.append((ours, entry))
    loaded = {ours for ours, _ in plan}
    missing = [name for name in targets if name not in loaded and name not in adapters]
    if name_in_source is not None:
        missing = [name_in_source(name) or name for name in missing]
    problems = [
        f"{what} ({len(names)}): {names[:_LIST_LIMIT]}{' ...' if len(names) > _LIST_LIMIT else ''}"
        for what, names in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", mismatched),
                            ("not floating point", not_float))
        if names
    ]
    if any(re.search(r"(^|\.)layers\.\d+\.(attn\.q_proj\.weight|sa_norm\.scale)$", name) for name in unexpected):
        problems.insert(0, "its keys are this package's parameter names (a qlora_ext model's state_dict(), or torchtune's "
                           "FullModelTorchTuneCheckpointer output, whose q/k rows are in Meta's rotary layout), which a checkpoint "
                           "is not read in: load a qlora_ext state dict with model.load_state_dict(); have torchtune write its "
                           "model with FullModelHFCheckpointer or FullModelMetaCheckpointer")
    if problems:
        raise ValueError(f"load_checkpoint: {source} does not fit the model: " + "; ".join(problems))

    device = torch.device(device) if device is not None else _home_device(model)
    for done, (ours, entry) in enumerate(plan):
        value = entry.load()
        if transform is not None:
            value = transform(ours, value)
        module, attr = targets[ours]
        try:
            # (to_nf4 checks a weight it quantizes; one stored in NF4 has had its scales checked)
            if not isinstance(value, NF4Tensor) and not isinstance(getattr(module, attr), NF4Tensor) and not _all_finite(value):
                raise ValueError("it holds NaN or Inf")
            # NF4 storage dequantizes to at most its largest block absmax
            in_range = dequantize_absmax(*value.components()[1:]) if isinstance(value, NF4Tensor) else value
            refuse_beyond_range(in_range, getattr(module, attr).dtype)
            _assign(module, attr, value, device)
        except ValueError as e:  # a weight that holds NaN or Inf
            # Checking every weight first would read the checkpoint twice; say what state is left.
            raise ValueError(
                f"load_checkpoint: {source}: entry {entry.name} cannot be loaded: {e}. The model now holds "
                f"{done} of the checkpoint's {len(plan)} tensors: rebuild it (or load a good checkpoint) before use"
            ) from None
        del value  # one checkpoint tensor alive at a time
    _materialize_rest(model, device)


def _all_finite(tensor: Tensor, chunk: int = 1 << 24) -> bool:
    """Whether a tensor holds no NaN or Inf; checked a slice at a time with aminmax, one pass that
    makes no temporary (isfinite makes a mask the size of the slice): NaN makes both ends NaN, an
    Inf is one of them."""
    if not tensor.is_floating_point():
        return True
    flat = tensor.reshape(-1)
    for i in range(0, flat.numel(), chunk):
        low, high = torch.aminmax(flat[i : i + chunk])
        if not (math.isfinite(low.item()) and math.isfinite(high.item())):
            return False
    return True


def refuse_beyond_range(tensor: Tensor, dtype: torch.dtype, chunk: int = 1 << 24) -> None:
    """A ValueError where a finite value of ``tensor`` is beyond the range of ``dtype`` (the model's),
    where it would be inf (1e6 in an fp32 checkpoint loaded as float16); checked a slice at a time."""
    if not (tensor.is_floating_point() and dtype.is_floating_point) or torch.finfo(tensor.dtype).max <= torch.finfo(dtype).max:
        return
    limit = torch.finfo(dtype).max
    flat = tensor.reshape(-1)
    for i in range(0, flat.numel(), chunk):
        low, high = (v.item() for v in torch.aminmax(flat[i : i + chunk]))  # (no temporary the size of the slice, as abs() would make)
        value = low if -low > high else high  # (the one of larger magnitude, with its sign)
        largest = abs(value)
        # (NaN and Inf are named by the finiteness checks; a value a little past the limit rounds to it)
        if math.isfinite(largest) and largest > limit and torch.tensor(largest, dtype=tensor.dtype).to(dtype).isinf():
            raise ValueError(f"it holds {value:g}, beyond the range of {str(dtype).removeprefix('torch.')} (the model's dtype; "
                             f"largest finite {limit:g}), where it would be inf; load the model in a wider dtype")


def refuse_merged(model: nn.Module, caller: str) -> None:
    """Raises ValueError naming the LoRA linears whose adapter is merged into their base weight
    (``merged=True``): weights loaded into such a module would leave its merged state wrong (the
    old adapter in a new base, or a new adapter next to the old one in the base)."""
    merged = [strip_wrappers(name) for name, m in model.named_modules() if isinstance(m, LoRALinear) and m.merged]
    if merged:
        raise ValueError(
            f"{caller}: argument 'model' must have no merged adapters; LoRA modules {merged[:_LIST_LIMIT]} have theirs "
            "merged into the base weight (merged=True): call unmerge_() on them before loading"
        )


def _targets(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Model name -> (owning module, attribute) of every parameter and persistent buffer."""
    targets = {}
    for module_name, module in model.named_modules():
        names = [n for n, p in module._parameters.items() if p is not None]
        names += [n for n, b in module._buffers.items() if b is not None and n not in module._non_persistent_buffers_set]
        for name in names:
            targets[strip_wrappers(f"{module_name}.{name}" if module_name else name)] = (module, name)
    return targets


def _home_device(model: nn.Module) -> torch.device:
    for tensor in [*model.parameters(), *model.buffers()]:
        if not tensor.is_meta:
            return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def _assign(module: nn.Module, attr: str, value: Tensor, device: torch.device) -> None:
    current = getattr(module, attr)
    where = device if current.is_meta else current.device
    if isinstance(current, NF4Tensor):
        if not isinstance(value, NF4Tensor):
            # Quantize from the checkpoint's own precision (fp16 -> NF4, not fp16 -> bf16 -> NF4).
            source = value if value.dtype in FLOAT_DTYPES else value.to(current.dtype)
            value = to_nf4(source.to(where))
        new = NF4Tensor.from_components(*(t.to(where) for t in value.components()), current.shape, current.dtype)
        if current.is_meta:
            module._parameters[attr] = nn.Parameter(new, requires_grad=False)
        else:
            current.copy_(new)
        return
    dense = value.dequantize(current.dtype) if isinstance(value, NF4Tensor) else value
    dense = dense.to(device=where, dtype=current.dtype)
    if not current.is_meta:
        current.copy_(dense)
    elif attr in module._parameters:
        module._parameters[attr] = nn.Parameter(dense, requires_grad=current.requires_grad)
    else:
        module._buffers[attr] = dense


def _materialize_rest(model: nn.Module, device: torch.device) -> None:
    for module in model.modules():
        if isinstance(module, LoRALinear) and (module.lora_a.weight.is_meta or module.lora_b.weight.is_meta):
            module.lora_a.to_empty(device=device)
            module.lora_b.to_empty(device=device)
            module.initialize_parameters()
        if isinstance(module, RotaryPositionalEmbeddings) and module.cos.is_meta:
            module.rope_init(device)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"load_checkpoint: these tensors are still on the meta device after loading: {left[:_LIST_LIMIT]}")
