"""Checkpoints: finding, checking, loading and writing them, and random weights of named configs
(CONFIGS: published models' shapes) for benchmarks.

A checkpoint is a folder:
    config.json           the fields of model.ModelArgs (the model never guesses its shape from a
                          name)
    model.safetensors     weights named as Transformer.state_dict() names them (model.pth also
                          loads)
    tokenizer files       tokenizer.json / tokenizer.model, tokenizer_config.json, ...
    model_int8.pth        optional quantized copies (quantize.py), each with a sidecar config of the
    model_int8.json       same stem: ModelArgs plus a "quantization" record (see kernels.py)
q/k rows are in Meta's interleaved rotary order, q/k/v and gate/up already fused; a tied output
layer is stored once, as the embedding. Weights are read with safetensors or
torch.load(weights_only=True): a checkpoint never runs code.

Every file is checked before any weights are read: configs field by field (types, ranges, sizes),
weights tensor by tensor against the model built on the meta device, by name and shape. What a user
got wrong ends as an InputError, which the scripts print as one `error:` line.

Writes are sets: every file goes to a temp name first; once all are complete, a small journal
lists the renames (and the stale files to remove), then they happen. A process killed mid-way
leaves the previous checkpoint (temp files only, removed by the next write) or a journal that the
next reader or writer finishes: never weights without their config. A journal is renamed in and
carried out under a lock on the folder: two writers on one machine take turns at their renames.

Also here, for every script: InputError, the ArgumentParser that raises it and script_exits,
which prints it as one line; check_device, check_output (a report's path), write_files (any set of
files) and one_line.
"""
import argparse
import errno
import fcntl
import json
import math
import os
import pickle
import shutil
import signal
import socket
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

import kernels
from model import Experts, ModelArgs, Transformer


class InputError(Exception):
    """Bad input from the user (a flag, a file, a prompt): printed as one `error:` line, exit 1.
    Anything else that goes wrong is a bug and keeps its traceback."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose complaints (an unknown flag, a value of the wrong type, a missing
    required flag) are InputError like any other bad input, rather than its usage text and exit
    status 2."""

    def error(self, message: str):
        raise InputError(f"{message} (see --help)")

    def parse_known_args(self, args=None, namespace=None):
        """argparse's, and then no path given holds a name longer than the file system takes (the
        first look at it, Path.is_file say, would raise where it should find nothing)."""
        namespace, extras = super().parse_known_args(args, namespace)
        for dest, value in vars(namespace).items():
            for path in value if isinstance(value, list) else [value]:
                if isinstance(path, Path) and any(map(name_too_long, path.parts)):
                    raise InputError(f"--{dest} {path}: a name in it is longer than {NAME_MAX} "
                                     "bytes")
        return namespace, extras


@contextmanager
def script_exits(report: Optional[Callable] = None):
    """How every script ends on bad input or Ctrl-C. An InputError: one `error:` line and exit
    status 1 (`report` says it and exits instead: tp.exit_with_error, for torchrun's ranks).
    Ctrl-C: status 130, 128 + SIGINT as a shell reports a program it interrupted, with no traceback
    (an output being written removes its temp files as the interrupt unwinds). A reader that left
    (`| head`): stop quietly, as cat does. Anything else is a bug and keeps its traceback."""
    try:
        yield
    except InputError as e:
        if report is not None:
            report(e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush
        sys.exit(1)


WEIGHT_FILES = ("model.safetensors", "model.pth")  # float weights, described by config.json
WEIGHT_SUFFIXES = (".safetensors", ".pth")  # any weights file: float, or quantize.py's
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "chat_template.jinja", "generation_config.json")
JOURNAL = ".checkpoint-write.json"
MAX_PARAMETERS = 10 ** 13  # far above any released model; a config beyond it is a typo
MAX_BLOCK_SIZE = 1 << 24
MAX_LAYERS = 1_000  # the largest models have about 130
NAME_MAX = 255  # bytes in a file name, on Linux's and most other file systems


def name_too_long(name: str) -> bool:
    """Whether a file system would refuse `name` (one name, not a path) as longer than NAME_MAX."""
    return len(os.fsencode(name)) > NAME_MAX


def is_file_name(name) -> bool:
    """Whether name is one name a file could have in a folder: a string, no path, no NUL, at
    most NAME_MAX bytes, encodable (names read from JSON may hold a lone surrogate)."""
    if not (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name
            and "\0" not in name):
        return False
    try:
        return not name_too_long(name)
    except UnicodeEncodeError:
        return False


@dataclass
class Checkpoint:
    folder: Path
    weights: Path
    config: Path  # config.json, or the sidecar of a quantized weights file
    args: ModelArgs
    quantization: Optional[dict]  # None for float weights


# ---- reading -------------------------------------------------------------------------------------

def read_checkpoint(path) -> Checkpoint:
    """The checkpoint at a folder, or at a weights file inside one, with its config checked; no
    weights are read. `checkpoints/REPO/model.pth` finds model.safetensors too (gpt-fast's
    paths)."""
    path = Path(path)
    check_utf8(path)
    folder = path if path.is_dir() else path.parent
    finish_write(folder)  # a writer killed between its renames: complete them
    if path.is_file():
        if path.suffix not in WEIGHT_SUFFIXES:
            raise InputError(f"{path} is not a weights file (.safetensors or .pth): give the "
                             "checkpoint's folder or its weights file" + (
                                 " (a GGUF file: convert it with scripts/convert_gguf.py)"
                                 if path.suffix == ".gguf" else ""))
        weights = path
    elif path.is_dir() or path.name in WEIGHT_FILES and folder.is_dir():
        found = [folder / name for name in WEIGHT_FILES if (folder / name).is_file()]
        if not found:
            # a Hugging Face snapshot's sharded weights, or the one download.py puts in hf/
            unconverted = ((folder / "model.safetensors.index.json").is_file()
                           or (folder / "hf").is_dir())
            raise InputError(f"no weights ({' or '.join(WEIGHT_FILES)}) in {folder}" + (
                " (a Hugging Face snapshot? convert it with scripts/convert_hf_checkpoint.py)"
                if unconverted else weights_files_named(folder)))
        weights = found[0]
    else:
        raise InputError(f"checkpoint not found: {path}"
                         + (weights_files_named(folder) if folder.is_dir() else ""))
    config = (folder / "config.json" if weights.name in WEIGHT_FILES
              else weights.with_suffix(".json"))
    if not config.is_file():
        raise InputError(f"no {config.name} in {folder}: convert the model first "
                         "(scripts/convert_hf_checkpoint.py or scripts/convert_gguf.py)"
                         if config.name == "config.json"
                         else f"{weights} has no config {config.name}")
    data = read_json(config)
    quantization = data.pop("quantization", None)
    args = parse_config(data, config)
    if quantization is not None:
        check_quantization(quantization, args, config)
    return Checkpoint(folder, weights, config, args, quantization)


def weights_files_named(folder: Path) -> str:
    """A hint naming the weights files a folder holds (quantize.py's, say, under names of their
    own), or nothing where it holds none."""
    try:
        names = sorted(p.name for p in folder.iterdir()
                       if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    except OSError:  # a folder this user may not list
        return ""
    shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    return f"; it holds {shown}: give one of them" if names else ""


def check_utf8(path: Path, flag: str = ""):
    """Refuse a path named in another encoding than UTF-8 (the file system took its bytes as they
    came): torch, safetensors and the tokenizer libraries open files by UTF-8 names only."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")  # its bytes as \xff
        raise InputError(f"{flag + ' ' if flag else ''}{shown}: a path that is not UTF-8; torch, "
                         "safetensors and the tokenizer libraries open files by UTF-8 names only: "
                         "rename it") from None


def read_json(path: Path) -> dict:
    """A JSON object from a file the user supplied, or an InputError naming the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {path}: {e}") from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:  # RecursionError: nested deeper than Python's stack
        raise InputError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data


INT_FIELDS = ("dim", "n_layer", "n_head", "vocab_size", "intermediate_size", "n_kv_heads",
              "head_dim", "block_size")
ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor",
                     "original_max_position_embeddings")


def parse_config(data: dict, where) -> ModelArgs:
    """ModelArgs from a config's fields, each checked: a wrong type, a missing or unknown field,
    sizes that cannot work or could never fit in memory are refused in one sentence naming the
    file."""
    known = {f.name for f in fields(ModelArgs)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InputError(f"{where}: unknown fields {unknown} (is it a Hugging Face config.json? "
                         "convert the checkpoint with scripts/convert_hf_checkpoint.py)")
    missing = [name for name in ("dim", "n_layer", "n_head", "vocab_size", "intermediate_size")
               if name not in data]
    if missing:
        raise InputError(f"{where}: missing fields {missing}")
    for name in INT_FIELDS:
        value = data.get(name, ModelArgs.block_size if name == "block_size" else None)
        optional = name in ("n_kv_heads", "head_dim")  # None: derived from the other fields
        if (value is not None or not optional) and (type(value) is not int or value < 1):
            raise InputError(f"{where}: {name} must be a positive integer, got {value!r}")
    for name, least in (("rope_base", 1), ("norm_eps", 0)):  # no model's base is 1 or less
        value = data.get(name, getattr(ModelArgs, name))
        if not scalar(value) or not value > least:
            raise InputError(f"{where}: {name} must be a number above {least}, got {value!r}")
    for name in ("n_experts", "n_active_experts"):
        value = data.get(name, 0)
        if type(value) is not int or value < 0:
            raise InputError(f"{where}: {name} must be an integer >= 0, got {value!r}")
    for name in ("attention_bias", "tie_embeddings", "qk_norm", "norm_topk_prob"):
        if type(data.get(name, False)) is not bool:
            raise InputError(f"{where}: {name} must be true or false, got {data[name]!r}")
    scaling = data.get("rope_scaling")
    if scaling is not None and (
            not isinstance(scaling, dict) or sorted(scaling) != sorted(ROPE_SCALING_KEYS)
            or any(not scalar(v) or v <= 0 for v in scaling.values())
            or scaling["high_freq_factor"] <= scaling["low_freq_factor"]):
        raise InputError(f"{where}: rope_scaling must be null or Llama-3.1's positive "
                         f"{', '.join(ROPE_SCALING_KEYS)}, got {scaling!r}")
    args = ModelArgs(**data)
    if args.n_layer > MAX_LAYERS:
        raise InputError(f"{where}: n_layer {args.n_layer} is beyond any model (at most "
                         f"{MAX_LAYERS})")
    if args.n_head % args.n_kv_heads or args.head_dim % 2 or args.head_dim < 2:
        raise InputError(f"{where}: n_head {args.n_head} must be a multiple of n_kv_heads "
                         f"{args.n_kv_heads} and head_dim {args.head_dim} even")
    if not (0 < args.n_active_experts <= args.n_experts if args.n_experts
            else args.n_active_experts == 0):
        raise InputError(f"{where}: n_active_experts {args.n_active_experts} must be between 1 and "
                         f"n_experts {args.n_experts} (0 for a dense feed-forward)")
    qkv = (args.n_head + 2 * args.n_kv_heads) * args.head_dim
    ffn = 3 * args.intermediate_size * max(args.n_experts, 1) + args.n_experts  # router row
    per_layer = args.dim * (qkv + args.n_head * args.head_dim + ffn)
    parameters = args.n_layer * per_layer + 2 * args.vocab_size * args.dim
    if parameters > MAX_PARAMETERS or args.block_size > MAX_BLOCK_SIZE:
        raise InputError(f"{where}: {parameters:.3g} parameters and block_size {args.block_size}: "
                         f"beyond any model (at most {MAX_PARAMETERS:.0e} and {MAX_BLOCK_SIZE})")
    return args


def scalar(value) -> bool:
    """A number torch takes as a scalar: an int within int64, or a finite float."""
    return (type(value) is int and abs(value) < 2**63
            or type(value) is float and math.isfinite(value))


def check_quantization(record, args: ModelArgs, where):
    """A sidecar's quantization record: the format, mode and group size this code reads, and layers
    that are linear layers of this model."""
    version = record.get("format") if isinstance(record, dict) else None
    if version != kernels.FORMAT:
        raise InputError(f"{where}: quantization format {version!r} is not {kernels.FORMAT}: "
                         "quantize the checkpoint again with this quantize.py")
    mode, groupsize = record.get("mode"), record.get("groupsize")
    if not isinstance(mode, str) or mode not in kernels.LINEARS:
        raise InputError(f"{where}: unknown quantization mode {mode!r}")
    if (type(groupsize) is int and groupsize in kernels.GROUPSIZES) != (mode in kernels.INT4_MODES):
        raise InputError(f"{where}: groupsize {groupsize!r} does not suit mode {mode}")
    if record.get("output_mode") not in (None, "int8", mode):
        raise InputError(f"{where}: output layer mode {record['output_mode']!r} is neither int8 "
                         f"nor the mode {mode}")
    model = empty_model(args)
    linears = {name for name, m in model.named_modules() if isinstance(m, (nn.Linear, Experts))}
    layers = record.get("layers")
    if not (isinstance(layers, list) and all(isinstance(name, str) for name in layers)
            and set(layers) <= linears):
        raise InputError(f"{where}: quantized layers must be a list of this model's linear layers")
    if args.tie_embeddings and "output" in layers:  # quantize.py unties a quantized output layer
        raise InputError(f"{where}: a quantized output layer cannot share the embeddings "
                         "(tie_embeddings)")
    if record.get("padded", {}) != kernels.padding_record(record, model):
        raise InputError(f"{where}: 'padded' does not give each int4 layer's K padded to whole "
                         f"groups of {groupsize}: quantize the checkpoint again with this "
                         "quantize.py")


@contextmanager
def signals_held(signums=(signal.SIGINT, signal.SIGTERM)):
    """Ctrl-C and SIGTERM wait until the block ends, then go to the handlers they were meant for:
    for steps that must not stop half-way. Only the main thread may set handlers, and one that
    C code set (getsignal's None) could not be put back: then nothing is held."""
    held = []
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = {s: signal.getsignal(s) for s in signums} if on_main_thread else {}
    previous = {s: handler for s, handler in previous.items() if handler is not None}
    for s in previous:
        signal.signal(s, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in held:
            signal.raise_signal(s)


@contextmanager
def on_meta():
    """torch.device("meta"): modules made inside hold no memory. Signals are held: a
    KeyboardInterrupt landing while torch takes its device mode off the stack and puts it back
    (each parameter's init does) loses the mode, and torch's RuntimeError on leaving the block
    would replace the interrupt with a traceback."""
    with signals_held(), torch.device("meta"):
        yield


def empty_model(args: ModelArgs, quantization: Optional[dict] = None) -> Transformer:
    """The model on the meta device (no memory), with the quantized layers that `quantization`
    lists swapped in: its state_dict is what a checkpoint of it must hold."""
    with on_meta():
        model = Transformer(args)
        if quantization is not None:
            kernels.swap_linears(model, quantization)
    return model


def check_tensors(found: dict, model: nn.Module, what: str, dtypes: Optional[dict] = None):
    """found {name: shape} must be exactly the tensors of model's state_dict (a tied output layer is
    stored once, as the embedding; a stored copy is allowed), else an InputError naming the first
    tensor that is missing, unexpected or of another shape; with dtypes {name: dtype}, or of the
    wrong kind of dtype: float weights may come in any float dtype (they are converted), integer
    ones (quantized weights, bit patterns) in exactly theirs."""
    expected = model.state_dict()
    if model.args.tie_embeddings:
        del expected["output.weight"]
        found = {name: shape for name, shape in found.items() if name != "output.weight"}
    for name in sorted(expected.keys() | found.keys()):
        if name not in found:
            raise InputError(f"{what}: {name} is missing")
        if name not in expected:
            raise InputError(f"{what}: unexpected tensor {name}")
        want = expected[name]
        if tuple(found[name]) != tuple(want.shape):
            raise InputError(f"{what}: {name} has shape {list(found[name])}, expected "
                             f"{list(want.shape)}")
        dtype = None if dtypes is None else dtypes[name]
        if dtype is not None and not (dtype.is_floating_point if want.is_floating_point()
                                      else dtype == want.dtype):
            raise InputError(f"{what}: {name} is {dtype}, expected "
                             f"{'floats' if want.is_floating_point() else want.dtype}")


def unpermute(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Rotate-half row order (HF's, and llama.cpp's for Qwen) -> Meta interleaved, per head. Row
    r * head_dim/2 + i of a head holds Meta row 2i + r (r = 0, 1), so split rows as (head, r, i) and
    swap r and i. Works on weights and biases: (n_heads * head_dim, ...)."""
    return w.unflatten(0, (n_heads, 2, head_dim // 2)).transpose(1, 2).reshape(w.shape)


def one_line(e: Exception) -> str:
    """An exception from a library as one line: its type and the first line of its message
    (weights_only's UnpicklingError explains itself over several)."""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def unreadable(weights: Path, e: Exception) -> InputError:
    """The error for a weights file that its reader refused."""
    return InputError(f"cannot read weights {weights}: {one_line(e)}")


def read_weights(weights: Path) -> dict:
    """Every tensor of a weights file: safetensors, or a .pth through torch.load(weights_only=True),
    memory-mapped so that pages are read as they are used."""
    if weights.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(weights)
        # SafetensorError: a header it cannot parse, or that the file does not cover (truncated,
        # not safetensors); OSError: a folder, no permission
        except (SafetensorError, OSError) as e:
            raise unreadable(weights, e) from None
    try:
        tensors = torch.load(weights, map_location="cpu", mmap=True, weights_only=True)
    # RuntimeError: not a zip (or an old non-zip .pth), truncated, a zip not laid out by
    # torch.save; UnpicklingError: a global weights_only refuses, or a damaged data.pkl, as are
    # EOFError and UnicodeDecodeError; OSError: a folder, no permission
    except (RuntimeError, pickle.UnpicklingError, EOFError, UnicodeDecodeError, OSError) as e:
        raise unreadable(weights, e) from None
    if not (isinstance(tensors, dict) and all(isinstance(name, str) and isinstance(t, torch.Tensor)
                                              for name, t in tensors.items())):
        raise InputError(f"{weights} does not hold a state dict (tensor names to tensors)")
    # torch.save keeps a tensor's device and layout: a meta tensor holds no data, a sparse one
    # none that a layer reads
    hollow = next((name for name, t in tensors.items()
                   if t.is_meta or t.layout != torch.strided), None)
    if hollow is not None:
        raise InputError(f"{weights}: tensor {hollow} holds no dense data "
                         f"({tensors[hollow].device.type}, {tensors[hollow].layout})")
    return tensors


# safetensors' names of the dtypes a checkpoint's tensors may have
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "F8_E4M3": torch.float8_e4m3fn,
                      "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
                      "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class WeightsFile:
    """A weights file opened for reading parts of its tensors: `part(name)[index]` reads only that
    part (safetensors slices, or a memory-mapped .pth). For quantize.py (a tensor at a time) and
    tp.py (each rank its slices): no process holds a whole large model."""

    def __init__(self, weights: Path):
        self.path = weights
        if weights.suffix != ".safetensors":
            self.file = read_weights(weights)
            self.shapes = {name: tuple(t.shape) for name, t in self.file.items()}
            self.dtypes = {name: t.dtype for name, t in self.file.items()}
            return
        from safetensors import SafetensorError, safe_open
        try:
            # checks the header and that the file covers every tensor
            self.file = safe_open(weights, "pt")
            slices = {name: self.file.get_slice(name) for name in self.file.keys()}
        except (SafetensorError, OSError) as e:  # as in read_weights
            raise unreadable(weights, e) from None
        self.shapes = {name: tuple(s.get_shape()) for name, s in slices.items()}
        stored = {name: s.get_dtype() for name, s in slices.items()}
        unknown = next((f"{name} is {d}" for name, d in stored.items()
                        if d not in SAFETENSORS_DTYPES), None)
        if unknown:  # F4, say: no model here reads one
            raise InputError(f"{weights}: {unknown}, a dtype this project does not read")
        self.dtypes = {name: SAFETENSORS_DTYPES[d] for name, d in stored.items()}

    def part(self, name: str):
        return self.file[name] if isinstance(self.file, dict) else self.file.get_slice(name)

    def tensor(self, name: str) -> torch.Tensor:
        return self.part(name)[:]


def open_weights(ckpt: Checkpoint) -> WeightsFile:
    """The checkpoint's weights file opened, its tensors (names, shapes, kinds of dtype) checked
    against its config: a file that cannot load is refused before any tensor's data is read."""
    source = WeightsFile(ckpt.weights)
    check_tensors(source.shapes, empty_model(ckpt.args, ckpt.quantization),
                  f"{ckpt.weights} does not match {ckpt.config}", source.dtypes)
    return source


def check_device(name: str, flag: str) -> torch.device:
    """A device this machine has, or an InputError naming the flag. CUDA is asked without touching a
    GPU (under torchrun every process checks before it picks its own)."""
    try:
        device = torch.device(name)
    except RuntimeError:  # PyTorch's message lists some twenty device types
        raise InputError(f"{flag} {name}: not a device name (cpu, cuda or cuda:N)") from None
    if device.type == "meta":
        raise InputError(f"{flag} meta holds no data: choose cpu or a GPU")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"{flag} {name}: this PyTorch build sees no CUDA GPU")
        if (device.index or 0) >= torch.cuda.device_count():
            raise InputError(f"{flag} {name}: this machine has {torch.cuda.device_count()} GPUs")
        return device
    try:
        torch.empty(1, device=device)  # other backends (mps, xpu, ...): is it usable here?
    # A backend missing from the build asserts, or (hpu, privateuseone) imports a module it
    # lacks; PyTorch's message runs to a thousand characters of dispatch keys.
    except (RuntimeError, AssertionError, ModuleNotFoundError):
        raise InputError(f"{flag} {name}: this PyTorch cannot use a {device.type} device "
                         "here") from None
    return device


def load_model(ckpt: Checkpoint, device="cpu", dtype=None) -> Transformer:
    """The checkpoint's model with its weights, on device in dtype (quantized weights keep
    theirs)."""
    model = empty_model(ckpt.args, ckpt.quantization)
    tensors = read_weights(ckpt.weights)
    check_tensors({name: t.shape for name, t in tensors.items()}, model,
                  f"{ckpt.weights} does not match {ckpt.config}",
                  {name: t.dtype for name, t in tensors.items()})
    if ckpt.args.tie_embeddings:
        tensors["output.weight"] = tensors["tok_embeddings.weight"]
    model.load_state_dict(tensors, strict=True, assign=True)  # the tensors themselves: no copy
    return to_device(model, device, dtype)


def to_device(model: Transformer, device, dtype) -> Transformer:
    """A loaded model (or a rank's part of it) onto its device: device and dtype (integer weights
    keep theirs), the tied output layer tied again (assign=True and to_empty replace the shared
    parameter), and kernels.prepare_for_device's choice of kernels for the device (quantized
    layers repacked for theirs)."""
    model = model.to(device=device, dtype=dtype)
    if model.args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    kernels.prepare_for_device(model)
    return model.eval()


# Shared fields of a family's configs, then the named configs themselves.
LLAMA3_SCALING = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192)
LLAMA32_SCALING = {**LLAMA3_SCALING, "factor": 32.0}
LLAMA3 = dict(vocab_size=128256, rope_base=5e5, n_kv_heads=8)
LLAMA31 = dict(LLAMA3, block_size=131072, rope_scaling=LLAMA3_SCALING)
QWEN25 = dict(rope_base=1e6, norm_eps=1e-6, attention_bias=True, block_size=32768)
SMOLLM2 = dict(vocab_size=49152, block_size=8192, tie_embeddings=True)
QWEN3 = dict(vocab_size=151936, head_dim=128, rope_base=1e6, norm_eps=1e-6, qk_norm=True,
             block_size=40960)
QWEN3_MOE = dict(QWEN3, n_experts=128, n_active_experts=8, tie_embeddings=False)
MIXTRAL = dict(n_kv_heads=8, n_experts=8, n_active_experts=2, rope_base=1e6)
CONFIGS = {  # named shapes for --random_weights; real checkpoints carry their own config.json
    "stories15M": dict(dim=288, n_layer=6, n_head=6, vocab_size=32000, intermediate_size=768,
                       block_size=256),
    "stories110M": dict(dim=768, n_layer=12, n_head=12, vocab_size=32000, intermediate_size=2048,
                        block_size=1024),
    "TinyLlama-1.1B": dict(dim=2048, n_layer=22, n_head=32, n_kv_heads=4, vocab_size=32000,
                           intermediate_size=5632),
    "Llama-2-7B": dict(dim=4096, n_layer=32, n_head=32, vocab_size=32000, intermediate_size=11008,
                       block_size=4096),
    "Llama-2-13B": dict(dim=5120, n_layer=40, n_head=40, vocab_size=32000, intermediate_size=13824,
                        block_size=4096),
    "Llama-2-70B": dict(dim=8192, n_layer=80, n_head=64, n_kv_heads=8, vocab_size=32000,
                        intermediate_size=28672, block_size=4096),
    "CodeLlama-7B": dict(dim=4096, n_layer=32, n_head=32, vocab_size=32016, intermediate_size=11008,
                         block_size=16384, rope_base=1e6),
    "CodeLlama-34B": dict(dim=8192, n_layer=48, n_head=64, n_kv_heads=8, vocab_size=32000,
                          intermediate_size=22016, block_size=16384, rope_base=1e6),
    "Mistral-7B": dict(dim=4096, n_layer=32, n_head=32, n_kv_heads=8, vocab_size=32000,
                       intermediate_size=14336, block_size=4096),
    "Llama-3-8B": dict(LLAMA3, dim=4096, n_layer=32, n_head=32, intermediate_size=14336,
                       block_size=8192),
    "Llama-3-70B": dict(LLAMA3, dim=8192, n_layer=80, n_head=64, intermediate_size=28672,
                        block_size=8192),
    "Llama-3.1-8B": dict(LLAMA31, dim=4096, n_layer=32, n_head=32, intermediate_size=14336),
    "Llama-3.1-70B": dict(LLAMA31, dim=8192, n_layer=80, n_head=64, intermediate_size=28672),
    "Llama-3.1-405B": dict(LLAMA31, dim=16384, n_layer=126, n_head=128, intermediate_size=53248),
    "Llama-3.2-1B": dict(LLAMA31, dim=2048, n_layer=16, n_head=32, intermediate_size=8192,
                         rope_scaling=LLAMA32_SCALING, tie_embeddings=True),
    "Llama-3.2-3B": dict(LLAMA31, dim=3072, n_layer=28, n_head=24, intermediate_size=8192,
                         rope_scaling=LLAMA32_SCALING, tie_embeddings=True),
    "SmolLM2-135M": dict(SMOLLM2, dim=576, n_layer=30, n_head=9, n_kv_heads=3,
                         intermediate_size=1536, rope_base=1e5),
    "SmolLM2-360M": dict(SMOLLM2, dim=960, n_layer=32, n_head=15, n_kv_heads=5,
                         intermediate_size=2560, rope_base=1e5),
    "SmolLM2-1.7B": dict(SMOLLM2, dim=2048, n_layer=24, n_head=32, intermediate_size=8192,
                         rope_base=130000),
    "Qwen2.5-0.5B": dict(QWEN25, dim=896, n_layer=24, n_head=14, n_kv_heads=2, vocab_size=151936,
                         intermediate_size=4864, tie_embeddings=True),
    "Qwen2.5-1.5B": dict(QWEN25, dim=1536, n_layer=28, n_head=12, n_kv_heads=2, vocab_size=151936,
                         intermediate_size=8960, tie_embeddings=True),
    "Qwen2.5-7B": dict(QWEN25, dim=3584, n_layer=28, n_head=28, n_kv_heads=4, vocab_size=152064,
                       intermediate_size=18944),
    "Qwen3-0.6B": dict(QWEN3, dim=1024, n_layer=28, n_head=16, n_kv_heads=8,
                       intermediate_size=3072, tie_embeddings=True),
    "Qwen3-1.7B": dict(QWEN3, dim=2048, n_layer=28, n_head=16, n_kv_heads=8,
                       intermediate_size=6144, tie_embeddings=True),
    "Qwen3-4B": dict(QWEN3, dim=2560, n_layer=36, n_head=32, n_kv_heads=8,
                     intermediate_size=9728, tie_embeddings=True),
    "Qwen3-8B": dict(QWEN3, dim=4096, n_layer=36, n_head=32, n_kv_heads=8,
                     intermediate_size=12288),
    "Qwen3-14B": dict(QWEN3, dim=5120, n_layer=40, n_head=40, n_kv_heads=8,
                      intermediate_size=17408),
    "Qwen3-32B": dict(QWEN3, dim=5120, n_layer=64, n_head=64, n_kv_heads=8,
                      intermediate_size=25600),
    "Qwen3-30B-A3B": dict(QWEN3_MOE, dim=2048, n_layer=48, n_head=32, n_kv_heads=4,
                          intermediate_size=768),
    "Qwen3-235B-A22B": dict(QWEN3_MOE, dim=4096, n_layer=94, n_head=64, n_kv_heads=4,
                            intermediate_size=1536),
    "Mixtral-8x7B": dict(MIXTRAL, dim=4096, n_layer=32, n_head=32, vocab_size=32000,
                         intermediate_size=14336, block_size=32768),
    "Mixtral-8x22B": dict(MIXTRAL, dim=6144, n_layer=56, n_head=48, vocab_size=32768,
                          intermediate_size=16384, block_size=65536),
}


def random_model(name: str, device, dtype) -> Transformer:
    """A named config of CONFIGS with random weights, made on the device: benchmarks need no
    download, and random weights decode at the speed of real ones."""
    with on_meta():
        model = Transformer(ModelArgs(**CONFIGS[name])).to(dtype)  # cast on meta: no float32 copy
    model = to_device(model.to_empty(device=device), device, dtype)
    return randomize_(model)


@torch.no_grad()
def randomize_(model: nn.Module, skip_layers=()) -> nn.Module:
    """Fill the parameters in place: norm weights 1, the rest N(0, 0.02), which keeps activations
    finite through many layers; the layers named in skip_layers (quantized ones) are left alone."""
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.rpartition(".")[0] not in skip_layers:
            p.normal_(0.0, 0.02)
    return model


# ---- writing -------------------------------------------------------------------------------------

def check_readable(path: Path):
    """A file the work reads only later (a tokenizer file copied after the weights): refused now
    if this process may not read it."""
    if not os.access(path, os.R_OK):
        raise InputError(f"cannot read {path}: permission denied")


def check_writable(path: Path, flag: str):
    """A file is to be written at path: fail now, before the work, if it cannot be."""
    check_utf8(path, flag)
    if name_too_long(temp_name(path.name)):  # written first, then renamed
        raise InputError(f"{flag} {path}: the file name is too long")
    if path.name == JOURNAL:  # the writer would carry it out, then remove it
        raise InputError(f"{flag} {path}: {JOURNAL} is the name of the journal this project "
                         "writes beside its files; name another file")
    parent = path.resolve().parent
    if path.is_dir():
        raise InputError(f"{flag} {path} is a folder; name the file to write")
    # (the file is written beside its place, then renamed there: that would put a regular file in
    # place of a device such as /dev/null, a pipe or a link, not write through it)
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise InputError(f"{flag} {path} is a link, a device or a pipe, not a regular file; name "
                         "a file to write")
    if not parent.is_dir():
        raise InputError(f"{flag} {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {path}: folder {parent} is not writable")


def check_output(path: Path, flag: str, inputs=()):
    """A report (metrics, a trace, scores) is to be written at path: fail now if it cannot be, or
    if it would replace a file of a checkpoint (say the config.json of the one being read) or one
    of the run's inputs (other files it reads or writes)."""
    check_writable(path, flag)
    folder = path.resolve().parent
    if path.name in checkpoint_files(folder):
        raise InputError(f"{flag} {path} would replace a file of the checkpoint in {folder}; "
                         "name another file")
    if any(path.resolve() == Path(other).resolve() for other in inputs if other is not None):
        raise InputError(f"{flag} {path} is also another file of this run; name another file")


def write_files(folder: Path, writers: dict, remove=()):
    """Write a set of files into folder as one change. writers {name: write(path)}: each writes its
    file to the temp path it is given; once every one is complete, a journal of the renames (and of
    `remove`, stale files of an earlier set) is written, renamed into place and carried out. Killed
    before the journal, the folder is as it was; after it, the next reader or writer completes
    it."""
    # folders made here (innermost first) go again if nothing is written into them
    created = [path for path in (folder, *folder.parents) if not path.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # where the up-front check can't tell: a file system of no folders (/proc)
        raise InputError(f"cannot create {folder}: {e.strerror}") from None
    finish_write(folder)  # an earlier writer's, killed between its renames
    remove_orphans(folder)
    for name in writers:  # a rename onto a folder would fail halfway through the set
        if (folder / name).is_dir():
            raise InputError(f"{folder / name} is a folder, where the checkpoint writes a file")
    temps = {name: folder / temp_name(name) for name in writers}
    tmp_journal = folder / temp_name(JOURNAL)
    # SIGTERM (kill, a scheduler's stop) ends the process through Python, so the cleanup below runs.
    on_main_thread = threading.current_thread() is threading.main_thread()  # only it may set handlers
    previous = signal.signal(signal.SIGTERM, exit_on_sigterm) if on_main_thread else None
    journal_written = False
    try:
        for name, write in writers.items():
            write(temps[name])
        journal = {"rename": [[temps[name].name, name] for name in writers], "remove": list(remove)}
        tmp_journal.write_text(json.dumps(journal))
        journal_written = True
        # one writer at a time (every journal has one name), no signal between the steps
        with signals_held(), folder_lock(folder):
            carry_out_journal(folder)  # one whose writer was killed before carrying it out
            os.replace(tmp_journal, folder / JOURNAL)  # the moment the new set is the checkpoint
            carry_out_journal(folder)
    except BaseException as e:
        if journal_written and not tmp_journal.exists():  # failed after the journal's rename:
            finish_write(folder)  # the new set stands
            raise
        for tmp in [*temps.values(), tmp_journal]:
            tmp.unlink(missing_ok=True)
        for made in created:
            if any(made.iterdir()):
                break
            made.rmdir()
        if disk_full(e):
            raise InputError(f"disk full while writing into {folder}: "
                             "nothing was changed") from None
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def disk_full(e: BaseException) -> bool:
    """Whether e is the OS's ENOSPC: an OSError, or an error of a library's own raised while
    handling one (torch.save writing through a Python file: write_pth) or giving its number in
    its text (the Rust libraries safetensors and tokenizers)."""
    while e is not None:
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC
                or f"(os error {errno.ENOSPC})" in str(e)):
            return True
        e = e.__context__
    return False


def write_pth(tensors: dict, tmp: Path):
    """torch.save to tmp, a write_files temp file, through a Python file: torch's own writer of a
    path reports a full disk as an error that names no cause, where this one's holds the OSError
    it was raised from. A Ctrl-C or SIGTERM inside it, though, torch's writer buries under an
    error of its own (closing a zip that was cut short): the signal is raised again in its place."""
    try:
        with open(tmp, "wb") as f:
            torch.save(tensors, f)
    except RuntimeError as e:
        if isinstance(e.__context__, (KeyboardInterrupt, SystemExit)):
            raise e.__context__ from None
        raise


def temp_name(name: str) -> str:
    """The temp file write_files writes for `name`: its writer's host and pid in it, by which
    remove_orphans finds those of writers that died."""
    return f".{name}.{socket.gethostname()}-{os.getpid()}.tmp"


def finish_write(folder: Path):
    """Carry out the journal folder holds, if any: one whose writer was killed before its renames
    were done, or one that another process is carrying out now (the lock waits for it)."""
    if not (folder / JOURNAL).is_file():  # no write pending
        return
    try:
        with folder_lock(folder):
            carry_out_journal(folder)
    except OSError as e:
        if not isinstance(e, PermissionError) and e.errno != errno.EROFS:
            raise
        # a read-only file system, or another user's folder
        raise InputError(f"{folder} holds a write that was cut short ({JOURNAL}), which this "
                         f"process may not finish ({e.strerror}): read the folder once as its "
                         "owner, which finishes it") from None


NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)  # flock's "not here"


@contextmanager
def folder_lock(folder: Path):
    """Held while a journal is renamed into folder and carried out. Every writer's journal has
    one name: a second one renamed in while the first is carried out would be unlinked unread,
    or its renames would mix with the first one's. flock on the folder itself: no lock file to
    leave behind, and the kernel lets go of a killed holder's lock. It excludes processes of one
    machine (on NFS, flock on a folder is the client's own)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:  # a file system without locks (some network ones): writers that
            if e.errno not in NO_LOCKS:  # run one at a time, as most do, need none
                raise
        yield
    finally:
        os.close(fd)  # and the lock with it


def carry_out_journal(folder: Path):
    """Rename the set's temp files into place, remove stale files, then the journal; under
    folder_lock. A step done already (by a process killed after it) is skipped."""
    if not (folder / JOURNAL).is_file():  # carried out by another process meanwhile
        return
    journal = read_json(folder / JOURNAL)
    check_journal(journal, folder / JOURNAL)
    umask = os.umask(0)
    os.umask(umask)
    for tmp, name in journal["rename"]:
        if (folder / tmp).is_symlink():  # chmod would reach the file it points to
            raise InputError(f"{folder / JOURNAL}: {tmp} is a link, not a file a write made")
        try:
            os.chmod(folder / tmp, 0o666 & ~umask)  # temp files are private; a checkpoint isn't
            os.replace(folder / tmp, folder / name)
        except FileNotFoundError:  # renamed already
            pass
    for name in journal["remove"]:
        (folder / name).unlink(missing_ok=True)
    (folder / JOURNAL).unlink(missing_ok=True)


def check_journal(journal: dict, path: Path):
    """A journal names files of its own folder only, each temp file after the file it becomes
    (write_files's names): a folder read as a checkpoint must not move or remove files elsewhere,
    nor a folder of its own (write_files never writes over one)."""
    def plain(name) -> bool:
        if not is_file_name(name) or "\\" in name:
            return False
        entry = path.parent / name
        return not (entry.is_dir() and not entry.is_symlink())
    renames, removes = journal.get("rename"), journal.get("remove")
    if not (set(journal) == {"rename", "remove"} and isinstance(renames, list)
            and isinstance(removes, list) and all(map(plain, removes))
            and all(isinstance(pair, list) and len(pair) == 2 and all(map(plain, pair))
                    and pair[0].startswith(f".{pair[1]}.") and pair[0].endswith(".tmp")
                    for pair in renames)):
        raise InputError(f"{path} is not a write journal of this project; remove it if no "
                         "writer is running")


def remove_orphans(folder: Path):
    """Temp files (and write_safetensors's folders) of writers on this machine that died without
    cleaning up (SIGKILL)."""
    host = socket.gethostname()
    for tmp in folder.glob(f".*.{host}-*.tmp"):
        pid = tmp.name.rsplit("-", 1)[1].removesuffix(".tmp")
        if pid.isdigit() and not process_exists(int(pid)):
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)


def process_exists(pid: int) -> bool:
    """Whether a process of this pid runs on this machine (signal 0 checks without sending)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    except OverflowError:  # beyond any pid
        return False
    return True


def write_safetensors(tensors: dict, tmp: Path):
    """safetensors' save_file to tmp, a write_files temp file. save_file writes a temp file of its
    own beside its target, under a random name that remove_orphans could not tell from a user's
    file; so it writes inside a folder named as write_files names its temp files, which a kill
    leaves for remove_orphans, and the finished file is renamed out of it."""
    from safetensors.torch import save_file
    scratch = tmp.parent / temp_name("safetensors")
    shutil.rmtree(scratch, ignore_errors=True)  # left by a killed writer of this host and pid
    scratch.mkdir()
    try:
        save_file(tensors, scratch / "weights")  # a full disk: disk_full reads its error
        os.replace(scratch / "weights", tmp)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def checkpoint_files(folder: Path) -> list:
    """The files of the checkpoint in folder (configs, weights and their sidecars, tokenizer files);
    other files and sub-folders, such as a downloaded hf/ snapshot, are not part of it."""
    if not folder.is_dir():
        return []
    # Other weights belong to it when a sidecar config describes them (quantize.py's outputs, or
    # any weights file read_checkpoint reads so, a draft's included); files of the user's own that
    # no config describes are left alone.
    quantized = [p.name for suffix in ("*.pth", "*.safetensors") for p in folder.glob(suffix)
                 if p.with_suffix(".json").is_file()]
    sidecars = [Path(name).with_suffix(".json").name for name in quantized]
    names = ["config.json", *WEIGHT_FILES, *TOKENIZER_FILES, *quantized, *sidecars]
    return sorted({name for name in names if (folder / name).is_file()})


def check_folder_writable(folder: Path, flag: str):
    """Refuse now, before the work, a folder that could not be created or written into."""
    check_utf8(folder, flag)
    if (folder.exists() or folder.is_symlink()) and not folder.is_dir():
        raise InputError(f"{flag} {folder} is "
                         f"{'a file' if folder.exists() else 'a link to nothing'}, not a folder")
    existing = folder.absolute()
    while not existing.exists():
        if existing.is_symlink():  # mkdir(parents=True) would stop at it
            raise InputError(f"{flag} {folder}: cannot create it, {existing} is a link to nothing")
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{flag} {folder}: cannot create it, {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {folder}: {existing} is not writable")


def check_output_folder(folder: Path, flag: str, force: bool):
    """A checkpoint is to be written into folder: refuse now, before the work, a folder that could
    not be created or written, or that holds a checkpoint already and --force is not given."""
    check_folder_writable(folder, flag)
    finish_write(folder)  # a writer killed between its renames: its set is complete
    old = checkpoint_files(folder)
    if old and not force:
        raise InputError(f"{folder} holds a checkpoint already ({', '.join(old[:3])}, ...): pass "
                         "--force to replace it")


def save_checkpoint(folder: Path, args: ModelArgs, tensors: dict, others: dict = None,
                    force=False):
    """Write a converted checkpoint as one set: model.safetensors, config.json and others
    {name: write(path)} (the tokenizer files; `copier` copies one). A folder that holds a
    checkpoint already is replaced whole with force (its files that this set does not write are
    removed), else refused."""
    check_output_folder(folder, "output", force)
    old = checkpoint_files(folder)
    check_tensors({name: t.shape for name, t in tensors.items()}, empty_model(args),
                  "converted weights")
    stored = {k: v.contiguous() for k, v in tensors.items()
              if not (args.tie_embeddings and k == "output.weight")}
    config = json.dumps({f.name: getattr(args, f.name) for f in fields(args)}, indent=2) + "\n"
    writers = {"model.safetensors": lambda tmp: write_safetensors(stored, tmp),
               "config.json": lambda tmp: tmp.write_text(config),
               **(others or {})}
    write_files(folder, writers, remove=[name for name in old if name not in writers])


def copier(source: Path) -> Callable[[Path], None]:
    return lambda tmp: tmp.write_bytes(Path(source).read_bytes())
