"""The scripts driven as a hostile user would: every bad input ends in exactly one `error: ...` line, exit
status 1 and no traceback, found before any real work (no gigabytes allocated, no model run, nothing written),
and the disk is left as it was. Most cases use a tiny random checkpoint with SmolLM2's real tokenizer."""
import collections
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from checkpoint import InputError
from conftest import ROOT, assert_one_error_line, load_script, main_error, run_script

TINY = dict(dim=64, n_layer=2, n_head=4, n_kv_heads=2, vocab_size=49152, intermediate_size=128, block_size=256)
GEN = ("--max_new_tokens", 2, "--num_samples", 1, "--temperature", 0, "--device", "cpu")
FAST_S = 30  # a start-up and a refusal take a few seconds; the old code hung for hours on some of these
UNWRITABLE = "/proc/self"  # an existing folder where no one, root included, may create a file (os.access says so too)


def tiny_state(c: dict) -> dict:
    """Random float weights named as Transformer.state_dict() names them."""
    torch.manual_seed(0)
    dim, hd, inter = c["dim"], c["dim"] // c["n_head"], c["intermediate_size"]
    r = lambda *shape: torch.randn(*shape) * 0.02  # noqa: E731
    state = {"tok_embeddings.weight": r(c["vocab_size"], dim), "norm.weight": torch.ones(dim),
             "output.weight": r(c["vocab_size"], dim)}
    for i in range(c["n_layer"]):
        state.update({f"layers.{i}.attention_norm.weight": torch.ones(dim), f"layers.{i}.ffn_norm.weight": torch.ones(dim),
                      f"layers.{i}.attention.wqkv.weight": r((c["n_head"] + 2 * c["n_kv_heads"]) * hd, dim),
                      f"layers.{i}.attention.wo.weight": r(dim, c["n_head"] * hd),
                      f"layers.{i}.feed_forward.w13.weight": r(2 * inter, dim),
                      f"layers.{i}.feed_forward.w2.weight": r(dim, inter)})
    return state


@pytest.fixture(scope="module")
def tiny_base(smollm2_checkpoint, tmp_path_factory) -> Path:
    from safetensors.torch import save_file
    folder = tmp_path_factory.mktemp("tiny_base")
    (folder / "config.json").write_text(json.dumps(TINY))
    save_file(tiny_state(TINY), folder / "model.safetensors")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_checkpoint / name, folder / name)
    return folder


@pytest.fixture
def tiny(tiny_base, tmp_path) -> Path:
    """This test's own copy of the tiny checkpoint, free to edit."""
    return Path(shutil.copytree(tiny_base, tmp_path / "tiny"))


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM
    folder = tmp_path_factory.mktemp("tiny_hf")
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def snapshot(folder: Path) -> dict:
    """Every entry under folder; files with their size, inode, mtime and (under 16 MB) content hash: any write,
    replacement, new or removed file changes it."""
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        st = p.stat()
        small = p.is_file() and st.st_size < 2**24
        out[str(p.relative_to(folder))] = "folder" if p.is_dir() else (
            st.st_size, st.st_ino, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest() if small else None)
    return out


def run(*args, timeout=FAST_S, **kw) -> subprocess.CompletedProcess:
    try:
        return run_script(*args, timeout=timeout, **kw)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{args[0]} still running after {timeout} s: the check must come before the work")


def refused(*args, words=(), timeout=FAST_S) -> str:
    r = run(*args, timeout=timeout)
    assert r.returncode == 1, r.stderr[-2000:]
    return assert_one_error_line(r.stderr, *words)


def refused_here(script: str, *args, words=(), capsys) -> str:
    """A refusal run in this process (no interpreter and torch start-up per case), for cases about what is
    refused rather than about the command line: the one error line the script prints. generate.py's
    `__main__` prints the InputError its main() raises; quantize.py's and the converters' main() print it
    and exit 1. The real command lines give the same line: the subprocess cases of each script here."""
    argv = [str(a) for a in args]
    if script == "generate.py":
        with pytest.raises(InputError) as e:
            main_of(script)(argv)
        return assert_one_error_line(f"error: {e.value}", *words)
    return main_error(main_of(script), argv, capsys, *words)


def main_of(script: str):
    """The main(argv) of generate.py, quantize.py or scripts/NAME.py."""
    if script in ("generate.py", "quantize.py"):
        return __import__(script.removesuffix(".py")).main
    return load_script(Path(script).stem).main


def succeeds_here(script: str, *args):
    """A run that must succeed, through the script's main() in this process (no interpreter and torch
    start-up; a failure is the exception itself)."""
    main_of(script)([str(a) for a in args])


def edit_json(path: Path, **changes):
    """Set keys of a JSON object file; a change to None removes the key."""
    data = {**json.loads(path.read_text()), **changes}
    path.write_text(json.dumps({k: v for k, v in data.items() if v is not None or k not in changes}))


class WeightOps(TorchDispatchMode):
    """Counts the tensor operations that touch a tensor of over a million elements (model weights being read,
    converted or quantized); a refusal made before any work counts none."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        self.count += any(t.device.type != "meta" and t.numel() > 1_000_000 for t in tensors)
        return out


def in_process(main, argv: list, monkeypatch, capsys) -> tuple[str, float]:
    """Run a script's main() in this process, where the work it does is visible: it must exit with status 1
    in one error line without touching any weights. Returns (the error line, seconds taken)."""
    monkeypatch.setattr(sys, "argv", [str(a) for a in argv])
    capsys.readouterr()
    start = time.perf_counter()
    with WeightOps() as ops, pytest.raises(SystemExit) as exit_:
        main()
    elapsed = time.perf_counter() - start
    assert exit_.value.code == 1
    line = assert_one_error_line(capsys.readouterr().err)
    assert ops.count == 0, f"{ops.count} operations on weights before the refusal: the check must come first"
    return line, elapsed


# ---- generate.py: prompts ---------------------------------------------------------------------------

# A flag argparse refuses, in every script: (script, argv, words its one line must hold; with an
# unknown flag, argparse may first name a required flag that is missing)
FLAGS_REFUSED = [
    ("generate.py", ["--temperature", "warm"], ["--temperature", "invalid float value: 'warm'"]),
    ("server.py", ["--port", "http"], ["--port", "invalid int value"]),
    ("scripts/convert_gguf.py", ["--gguf", "x.gguf"], ["required: --out"]),
    ("scripts/bench.py", ["--no_such_flag"], ["unrecognized arguments: --no_such_flag"]),
] + [(script, ["--no_such_flag"], []) for script in (
    "quantize.py", "eval.py", "scripts/bench_cpu.py", "scripts/bench_layers.py",
    "scripts/bench_speculative.py", "scripts/convert_hf_checkpoint.py", "scripts/download.py",
    "scripts/load_test.py")]


def test_a_flag_argparse_refuses_is_one_error_line_and_exit_1_in_every_script():
    """An unknown flag, a value of the wrong type, a required flag missing: one `error:` line
    and exit status 1 like any other bad input (checkpoint.ArgumentParser), not argparse's usage
    text and status 2. The scripts run side by side, each its own process."""
    processes = [subprocess.Popen([sys.executable, script, *argv], cwd=ROOT, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for script, argv, _ in FLAGS_REFUSED]
    for (script, _, words), process in zip(FLAGS_REFUSED, processes):
        _, stderr = process.communicate(timeout=FAST_S * 3)
        assert process.returncode == 1, (script, stderr[-2000:])
        assert_one_error_line(stderr, *words, "(see --help)")


def test_number_prompt_is_text_not_random_tokens(tiny, tmp_path):
    succeeds_here("generate.py", "--checkpoint_path", tiny, "--prompt", "2024", *GEN, "--json", tmp_path / "m.json")
    prompt_tokens = json.loads((tmp_path / "m.json").read_text())["samples"][0]["prompt_tokens"]
    assert len(prompt_tokens) == 1 and 0 < prompt_tokens[0] < 10, prompt_tokens


def test_synthetic_prompt_has_its_own_flag(tmp_path):
    succeeds_here("generate.py", "--random_weights", "stories15M", "--prompt_tokens", 7, "--max_new_tokens", 2,
                  "--num_samples", 1, "--device", "cpu", "--json", tmp_path / "m.json")
    sample = json.loads((tmp_path / "m.json").read_text())["samples"][0]
    assert sample["prompt_tokens"] == [7] and len(sample["new_tokens"]) == 1


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
def test_non_utf8_prompt_argument_is_refused(tiny, chat):
    argv = [sys.executable, "generate.py", "--checkpoint_path", str(tiny), "--prompt", b"caf\xe9",
            *(["--chat"] if chat else []), *map(str, GEN)]
    r = subprocess.run(argv, cwd=ROOT, capture_output=True, timeout=FAST_S)
    assert r.returncode == 1
    assert_one_error_line(r.stderr.decode(errors="replace"), "UTF-8")


def test_interactive_non_utf8_line_is_reported_and_the_session_goes_on(tiny):
    r = subprocess.run([sys.executable, "generate.py", "--checkpoint_path", str(tiny), "--interactive", *map(str, GEN)],
                       cwd=ROOT, input=b"caf\xe9\nhello\n", capture_output=True, timeout=120)
    stderr = r.stderr.decode(errors="replace")
    assert r.returncode == 0, stderr
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "UTF-8" in errors[0], stderr  # one for the bad line, none for "hello"


# ---- generate.py: flags -----------------------------------------------------------------------------

@pytest.mark.parametrize("device", ["mps", "meta"])
def test_device_this_machine_cannot_run_is_refused(tiny, device, capsys):
    refused_here("generate.py", "--checkpoint_path", tiny, "--prompt", "hi", *GEN[:-2], "--device", device,
                 words=[device], capsys=capsys)


def test_batch_too_big_for_memory_is_refused_before_allocating(tiny):
    refused("generate.py", "--checkpoint_path", tiny, "--prompt", "hi", *GEN, "--batch_size", 10_000_000,
            words=["KV cache", "memory"], timeout=60)


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_temperature_is_refused(tiny, value, capsys):
    refused_here("generate.py", "--checkpoint_path", tiny, "--prompt", "hi", *GEN[:4], "--temperature", value,
                 words=["--temperature"], capsys=capsys)


def test_a_temperature_below_float32s_range_is_greedy_not_a_division_by_zero():
    from generate import parse_args
    flags = ["--random_weights", "stories15M", "--device", "cpu", "--temperature"]
    assert parse_args(flags + ["1e-50"]).temperature == 0.0
    assert parse_args(flags + ["1e-30"]).temperature > 0


@pytest.mark.parametrize("flag, where", [
    ("--profile", "/proc/nonexistent/trace.json"),
    ("--profile", f"{UNWRITABLE}/trace.json"),
    ("--profile", "FILE/trace.json"),  # a folder that is a regular file
    ("--json", "DIR"),  # an existing directory
    ("--json", f"{UNWRITABLE}/m.json"),
    ("--json", "m" * 245 + ".json"),  # a name that fits, but not with the temp file's tag
    ("--profile", "t" * 300 + ".json"),  # a name longer than any file system takes
])
def test_unwritable_output_is_refused_before_generating(tiny, tmp_path, flag, where, capsys):
    (tmp_path / "FILE").write_text("not a folder")
    (tmp_path / "DIR").mkdir()
    before = snapshot(tmp_path)
    path = where if where.startswith("/") else tmp_path / where
    refused_here("generate.py", "--checkpoint_path", tiny, "--prompt", "hi", *GEN, flag, path, words=[flag],
                 capsys=capsys)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("flags, words", [
    (["--seed", 2**64], ["--seed"]),
    (["--seed", -2**63 - 1], ["--seed"]),
    (["--interactive", "--prompt", "hi"], ["--interactive", "--prompt"]),
    (["--interactive", "--num_samples", 2], ["--interactive", "--num_samples"]),
    (["--interactive", "--json", "m.json"], ["--interactive", "--json"]),
    (["--chat", "--prompt_tokens", 5], ["--chat", "--prompt_tokens"]),
], ids=["seed-2**64", "seed-below-int64", "interactive-prompt", "interactive-samples", "interactive-json",
        "chat-prompt-tokens"])
def test_flags_that_would_overflow_or_be_ignored_are_refused(tiny, flags, words, capsys):
    refused_here("generate.py", "--checkpoint_path", tiny, *flags, "--max_new_tokens", 2, "--device", "cpu",
                 words=words, capsys=capsys)


def test_chat_with_random_weights_is_refused(capsys):
    refused_here("generate.py", "--random_weights", "stories15M", "--chat", "--max_new_tokens", 2, "--device", "cpu",
                 words=["--chat", "--random_weights"], capsys=capsys)


@pytest.mark.parametrize("flag", ["--json", "--profile"])
def test_output_over_a_checkpoint_file_is_refused(tiny, flag, capsys):
    before = snapshot(tiny)
    refused_here("generate.py", "--checkpoint_path", tiny, "--prompt", "hi", *GEN, flag, tiny / "config.json",
                 words=[flag, "checkpoint"], capsys=capsys)
    assert snapshot(tiny) == before


@pytest.mark.parametrize("content", [[1, 2], {1: torch.zeros(1)}, {"x": 3}, "pickled global"],
                         ids=["list", "int-key", "int-value", "pickled-global"])
def test_a_pth_that_is_not_a_state_dict_is_one_error_line(tiny, content, capsys):
    (tiny / "model.safetensors").unlink()
    if content == "pickled global":  # weights_only refuses it, in a message of several lines
        content = {"x": collections.OrderedDict}
    torch.save(content, tiny / "model.pth")
    refused_here("generate.py", "--checkpoint_path", tiny, "--prompt", "hi", *GEN, words=["model.pth"],
                 capsys=capsys)


def test_weights_of_the_wrong_kind_of_dtype_are_refused_naming_the_tensor(tiny, capsys):
    """Float weights may come in any float dtype (they are converted); integers where floats
    belong, or a quantized layer's integer weights stored as floats, would fail inside PyTorch."""
    from safetensors.torch import load_file, save_file
    state = load_file(tiny / "model.safetensors")
    save_file({**state, "norm.weight": state["norm.weight"].to(torch.int8)}, tiny / "model.safetensors")
    refused_here("generate.py", "--checkpoint_path", tiny, "--prompt", "hi", *GEN, words=["norm.weight", "floats"],
                 capsys=capsys)
    save_file(state, tiny / "model.safetensors")
    succeeds_here("quantize.py", "--checkpoint_path", tiny, "--mode", "int8")
    quantized = torch.load(tiny / "model_int8.pth", weights_only=True)
    name = "layers.0.attention.wqkv.weight"
    torch.save({**quantized, name: quantized[name].float()}, tiny / "model_int8.pth")
    refused_here("generate.py", "--checkpoint_path", tiny / "model_int8.pth", "--prompt", "hi", *GEN,
                 words=[name, "torch.int8"], capsys=capsys)


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json"])
def test_a_file_of_the_checkpoint_that_is_not_its_weights_is_refused_as_such(tiny, name, capsys):
    refused_here("generate.py", "--checkpoint_path", tiny / name, "--prompt", "hi", *GEN,
                 words=[name, "not a weights file"], capsys=capsys)


def test_a_tokenizer_beyond_the_models_vocabulary_is_refused(tiny, capsys):
    from safetensors.torch import save_file
    edit_json(tiny / "config.json", vocab_size=100)  # SmolLM2's tokenizer gives ids up to 49151
    save_file(tiny_state({**TINY, "vocab_size": 100}), tiny / "model.safetensors")
    refused_here("generate.py", "--checkpoint_path", tiny, "--prompt", "hello world", *GEN,
                 words=["tokenizer", "100 tokens"], capsys=capsys)


def test_prompt_tokens_beyond_the_context_are_refused_before_drawing_them(tiny, capsys):
    refused_here("generate.py", "--checkpoint_path", tiny, "--prompt_tokens", 10**12, *GEN,
                 words=["1000000000000 tokens", "context is 256 tokens"], capsys=capsys)


def test_a_trace_over_the_metrics_file_is_refused(tiny, tmp_path, capsys):
    refused_here("generate.py", "--checkpoint_path", tiny, "--prompt", "hi", *GEN, "--json", tmp_path / "m.json",
                 "--profile", tmp_path / "m.json", words=["--profile", "another file of this run"], capsys=capsys)


def test_bug_keeps_its_traceback(tiny, monkeypatch):
    """Only bad input becomes an `error:` line; a bug inside the program (here, a ValueError where none is
    expected) must surface with its traceback, not be passed off as the user's mistake."""
    import generate

    def broken(*args, **kwargs):
        raise ValueError("not enough values to unpack")
    monkeypatch.setattr(generate, "encode_prompts", broken)
    with pytest.raises(ValueError, match="not enough values to unpack"):
        generate.main(["--checkpoint_path", str(tiny), "--prompt", "hi", *map(str, GEN)])


# ---- quantize.py: where the output goes -------------------------------------------------------------

def test_quantize_refuses_output_over_base_checkpoint(tiny, capsys):
    before = snapshot(tiny)
    refused_here("quantize.py", "--checkpoint_path", tiny, "--mode", "int8", "--out", tiny / "model.pth",
                 capsys=capsys)
    assert snapshot(tiny) == before
    succeeds_here("generate.py", "--checkpoint_path", tiny, "--prompt", "hi", *GEN)


@pytest.mark.parametrize("weights", ["model.safetensors", "model.pth"])
def test_quantize_refuses_output_over_its_source_weights(tiny, weights):
    if weights == "model.pth":
        from safetensors.torch import load_file
        torch.save(load_file(tiny / "model.safetensors"), tiny / "model.pth")
        (tiny / "model.safetensors").unlink()
    before = snapshot(tiny)
    refused("quantize.py", "--checkpoint_path", tiny, "--mode", "int8", "--out", tiny / weights)
    assert snapshot(tiny) == before


def test_quantize_default_output_leaves_float_checkpoint_loadable(tiny):
    succeeds_here("quantize.py", "--checkpoint_path", tiny, "--mode", "int8")
    assert (tiny / "model_int8.pth").is_file() and (tiny / "model_int8.json").is_file()
    for path in (tiny, tiny / "model_int8.pth"):
        succeeds_here("generate.py", "--checkpoint_path", path, "--prompt", "hi", *GEN)


@pytest.mark.parametrize("where", ["missing/q.pth", f"{UNWRITABLE}/q.pth", "DIR.pth"])
def test_quantize_refuses_unusable_output_before_working(smollm2_checkpoint, tmp_path, monkeypatch, capsys, where):
    """In-process on the real model, so that quantizing before the refusal would show (in_process)."""
    import quantize
    (tmp_path / "DIR.pth").mkdir()
    before, source = snapshot(tmp_path), snapshot(smollm2_checkpoint)
    out = where if where.startswith("/") else tmp_path / where
    _, elapsed = in_process(quantize.main, ["quantize.py", "--checkpoint_path", smollm2_checkpoint, "--mode", "int4",
                                            "--out", out], monkeypatch, capsys)
    assert elapsed < 5, f"refused only after {elapsed:.1f} s"
    assert snapshot(tmp_path) == before and snapshot(smollm2_checkpoint) == source


@pytest.mark.slow
@pytest.mark.parametrize("when", ["at-first-write", "at-random"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_quantize_killed_leaves_complete_output_or_none(smollm2_checkpoint, tmp_path, sig, when):
    # hard links: quantize.py only reads the source files (and writes new ones beside them)
    folder = Path(shutil.copytree(smollm2_checkpoint, tmp_path / "ckpt", copy_function=os.link))
    before = set(os.listdir(folder))
    p = subprocess.Popen([sys.executable, "quantize.py", "--checkpoint_path", folder, "--mode", "int4"], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + (60 if when == "at-first-write" else random.uniform(1.0, 3.0))
    while p.poll() is None and time.monotonic() < deadline:
        if when == "at-first-write" and set(os.listdir(folder)) - before:
            break  # the output is being written (a temp file, or the first finished file)
        time.sleep(0.005)
    if p.poll() is None:
        p.send_signal(sig)
    p.wait(timeout=60)
    new = set(os.listdir(folder)) - before
    assert new in (set(), {"model_int4.g32.pth", "model_int4.g32.json"}), new  # no temp files, no half a pair
    if new:
        json.loads((folder / "model_int4.g32.json").read_text())


# ---- config files: absurd values are refused before anything is built --------------------------------

ABSURD = {"n_layer-1e9": {"n_layer": 1_000_000_000}, "dim-1e9": {"dim": 1_000_000_000},
          "vocab-1e12": {"vocab_size": 1_000_000_000_000}, "n_kv_heads-0": {"n_kv_heads": 0},
          "n_head-negative": {"n_head": -4}, "dim-float": {"dim": 1e9}, "n_layer-string": {"n_layer": "2"},
          "intermediate-bool": {"intermediate_size": True}}


@pytest.mark.parametrize("change", ABSURD.values(), ids=ABSURD.keys())
@pytest.mark.parametrize("script", ["generate.py", "quantize.py"])
def test_absurd_config_is_refused_naming_the_file(tiny, script, change, capsys):
    edit_json(tiny / "config.json", **change)
    before = snapshot(tiny)
    more = ["--prompt", "hi", *GEN] if script == "generate.py" else ["--mode", "int8"]
    refused_here(script, "--checkpoint_path", tiny, *more, words=["config.json"], capsys=capsys)
    assert snapshot(tiny) == before


def test_null_block_size_is_refused_naming_the_file(tiny, capsys):
    config = json.loads((tiny / "config.json").read_text())
    (tiny / "config.json").write_text(json.dumps({**config, "block_size": None}))
    refused_here("generate.py", "--checkpoint_path", tiny, "--prompt", "hi", *GEN, words=["config.json", "block_size"],
                 capsys=capsys)


def test_absurd_quantized_sidecar_is_refused_naming_the_file(tiny, capsys):
    succeeds_here("quantize.py", "--checkpoint_path", tiny, "--mode", "int8")
    good = (tiny / "model_int8.json").read_text()
    for change in ({"n_layer": 1_000_000_000}, {"n_kv_heads": 0}, {"dim": 1e9}):
        (tiny / "model_int8.json").write_text(good)
        edit_json(tiny / "model_int8.json", **change)
        refused_here("generate.py", "--checkpoint_path", tiny / "model_int8.pth", "--prompt", "hi", *GEN,
                     words=["model_int8.json"], capsys=capsys)
    record = json.loads(good)["quantization"]
    for change in ({"mode": ["int8"]}, {"layers": [["layers.0.attention.wqkv"]]}):  # lists can't be keys
        (tiny / "model_int8.json").write_text(good)
        edit_json(tiny / "model_int8.json", quantization={**record, **change})
        refused_here("generate.py", "--checkpoint_path", tiny / "model_int8.pth", "--prompt", "hi", *GEN,
                     words=["model_int8.json"], capsys=capsys)
    (tiny / "model_int8.json").write_text("[" * 100_000 + "]" * 100_000)  # deeper than Python's stack
    refused_here("generate.py", "--checkpoint_path", tiny / "model_int8.pth", "--prompt", "hi", *GEN,
                 words=["model_int8.json", "not valid JSON"], capsys=capsys)


def test_an_int4_sidecar_whose_padding_does_not_fit_the_layers_is_refused(tiny, capsys):
    """K of 64 in groups of 128: quantize.py pads those layers' K to 128 and records it; any other
    record (none, a wrong width, a layer that is not padded) is refused, not met by an assert."""
    succeeds_here("quantize.py", "--checkpoint_path", tiny, "--mode", "int4", "--groupsize", 128)
    sidecar = next(tiny.glob("model_int4*.json"))
    record = json.loads(sidecar.read_text())["quantization"]
    assert record["padded"]["layers.0.attention.wqkv"] == [64, 128]
    for padded in ({}, {**record["padded"], "layers.0.attention.wqkv": [64, 96]},
                   {**record["padded"], "layers.0.feed_forward.w2": [128, 128]}, [1, 2]):
        edit_json(sidecar, quantization={**record, "padded": padded})
        refused_here("generate.py", "--checkpoint_path", sidecar.with_suffix(".pth"), "--prompt",
                     "hi", *GEN, words=[sidecar.name, "padded"], capsys=capsys)


@pytest.mark.parametrize("name, content", [
    ("tokenizer_config.json", ["not", "an", "object"]),
    ("tokenizer_config.json", {"eos_token": 5}),
    ("generation_config.json", {"eos_token_id": "x"}),
], ids=["tokenizer-config-list", "eos-token-int", "generation-eos-string"])
def test_malformed_tokenizer_files_are_refused_naming_the_file(tiny, name, content, capsys):
    (tiny / name).write_text(json.dumps(content))
    refused_here("generate.py", "--checkpoint_path", tiny, "--prompt", "hi", *GEN, words=[name], capsys=capsys)


# ---- converters -------------------------------------------------------------------------------------

def hf_source(tiny_hf, out: Path, **config_changes) -> Path:
    """A copy of the tiny HF model at out/hf (the converter's default source), its config.json edited."""
    hf = Path(shutil.copytree(tiny_hf, out / "hf"))
    edit_json(hf / "config.json", **config_changes)
    return hf


@pytest.mark.parametrize("rope_type", ["yarn", "dynamic", "longrope"])
def test_hf_converter_refuses_unsupported_rope_type(tiny_hf, tmp_path, rope_type, capsys):
    scaling = {"rope_type": rope_type, "factor": 4.0, "original_max_position_embeddings": 64}
    if rope_type == "longrope":
        scaling.update(short_factor=[1.0] * 8, long_factor=[4.0] * 8)
    hf_source(tiny_hf, tmp_path, rope_parameters=None, rope_theta=10000.0, rope_scaling=scaling)
    before = snapshot(tmp_path)
    refused_here("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", tmp_path, words=[rope_type], capsys=capsys)
    assert snapshot(tmp_path) == before


def test_hf_converter_refuses_absurd_config(tiny_hf, tmp_path, capsys):
    hf_source(tiny_hf, tmp_path, num_hidden_layers=1_000_000_000)
    before = snapshot(tmp_path)
    refused_here("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", tmp_path, words=["config.json"],
                 capsys=capsys)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name, shape", [("model.layers.0.self_attn.k_proj.weight", (32, 63)),
                                         ("model.layers.0.self_attn.v_proj.weight", (32,)),
                                         ("model.layers.0.self_attn.q_proj.weight", ())],
                         ids=["columns", "one-dimensional", "scalar"])
def test_hf_converter_refuses_a_tensor_of_the_wrong_shape_naming_it(tiny_hf, tmp_path, name, shape, capsys):
    """Checked before the pieces are reshaped or stacked, which would fail with errors of their own."""
    from safetensors.torch import load_file, save_file
    hf = hf_source(tiny_hf, tmp_path)
    tensors = load_file(hf / "model.safetensors")
    tensors[name] = torch.zeros(shape)
    save_file(tensors, hf / "model.safetensors")
    refused_here("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", tmp_path, words=[name], capsys=capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_hf_converter_refuses_a_pytorch_bin_that_is_not_a_state_dict(tiny_hf, tmp_path, capsys):
    hf = hf_source(tiny_hf, tmp_path)
    (hf / "model.safetensors").unlink()
    torch.save([1, 2], hf / "pytorch_model.bin")
    refused_here("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", tmp_path,
                 words=["pytorch_model.bin", "state dict"], capsys=capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_hf_converter_needs_force_to_overwrite_and_force_leaves_exactly_its_files(tiny_hf, tmp_path, capsys):
    hf = hf_source(tiny_hf, tmp_path)
    source = snapshot(hf)
    succeeds_here("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", tmp_path)
    converted = snapshot(tmp_path)
    refused_here("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", tmp_path, words=["--force"], capsys=capsys)
    assert snapshot(tmp_path) == converted
    (tmp_path / "chat_template.jinja").write_text("{{ stale }}")  # the source has none
    succeeds_here("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", tmp_path, "--force")
    assert set(snapshot(tmp_path)) == set(converted)  # the stale template is gone
    assert snapshot(hf) == source  # the source folder inside the output is left alone


@pytest.mark.slow
def test_gguf_converter_needs_force_to_overwrite_and_force_leaves_exactly_its_files(smollm2_gguf, smollm2_checkpoint,
                                                                                    tmp_path, capsys):
    out = Path(shutil.copytree(smollm2_checkpoint, tmp_path / "out"))  # what converting into out writes
    converted = snapshot(out)
    refused_here("scripts/convert_gguf.py", "--gguf", smollm2_gguf, "--out", out, words=["--force"], capsys=capsys)
    assert snapshot(out) == converted
    (out / "chat_template.jinja").write_text("{{ stale }}")  # the GGUF conversion writes none
    succeeds_here("scripts/convert_gguf.py", "--gguf", smollm2_gguf, "--out", out, "--force")
    assert set(snapshot(out)) == set(converted)


def test_gguf_converter_refuses_output_that_is_a_file_before_working(smollm2_gguf, tmp_path, monkeypatch, capsys):
    """In-process, so that converting before the refusal would show (in_process)."""
    convert_gguf = load_script("convert_gguf")
    (tmp_path / "out").write_text("a file, not a folder")
    _, elapsed = in_process(convert_gguf.main, ["convert_gguf.py", "--gguf", smollm2_gguf, "--out", tmp_path / "out"],
                            monkeypatch, capsys)
    assert elapsed < 5, f"refused only after {elapsed:.1f} s"
    assert (tmp_path / "out").read_text() == "a file, not a folder"


def test_hf_converter_refuses_output_that_is_a_file(tiny_hf, tmp_path):
    (tmp_path / "out").write_text("a file, not a folder")
    refused("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", tmp_path / "out", "--hf_dir", tiny_hf)
    assert (tmp_path / "out").read_text() == "a file, not a folder"
