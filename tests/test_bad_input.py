"""The scripts driven as a hostile user would: every bad input ends in exactly one `error: ...` line, exit
status 1 and no traceback, found before any real work (no gigabytes allocated, no model run, nothing written),
and the disk is left as it was. Most cases use a tiny random checkpoint with SmolLM2's real tokenizer."""
import collections
import hashlib
import importlib.util
import json
import math
import os
import runpy
import shlex
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

import checkpoint
from checkpoint import read_checkpoint, read_weights
from conftest import (ROOT, as_run, assert_fails_with_one_line, assert_one_error_line, load_script, main_error,
                      run_script)

TINY = dict(dim=64, n_layer=2, n_head=4, n_kv_heads=2, vocab_size=49152, intermediate_size=128, block_size=256)
GEN = ("--max_new_tokens", 2, "--num_samples", 1, "--temperature", 0, "--device", "cpu")
HANG_S = 600  # a command still running then hangs (one waiting for input or a lock would, for hours); no run nears it
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


def refused(*args, words=()) -> str:
    """A refusal from the real command line: exit status 1 after one `error:` line."""
    return assert_fails_with_one_line(run_script(*args, timeout=HANG_S), *words)


def run_as_main(script: str, argv, monkeypatch, capsys) -> tuple[int, str]:
    """`python SCRIPT ARGV` in this process, without an interpreter and torch start-up: the script
    run as `__main__` (runpy), its `if __name__ == "__main__":` block included. Returns the exit
    status and stderr that the interpreter gives: SystemExit's status, or 1 after printing its
    message (sys.exit("error: ...")); 0 if it returns. Any other exception propagates, as it
    reaches the interpreter, which prints its traceback."""
    monkeypatch.setattr(sys, "argv", [script, *map(str, argv)])
    monkeypatch.setattr(sys, "path", list(sys.path))  # the scripts in scripts/ add their folders
    capsys.readouterr()
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    if code is None:
        code = 0
    elif not isinstance(code, int):
        err, code = f"{err}{code}\n", 1
    return code, err


def refused_here(script: str, *args, words=(), capsys) -> str:
    """A refusal run in this process (no interpreter and torch start-up per case), for cases about what is
    refused rather than about the command line: the one error line the script prints. generate.py's
    `__main__` prints the InputError its main() raises; quantize.py's and the converters' main() print it
    and exit 1. The real command lines give the same line: the subprocess cases of each script here."""
    main = main_of(script)
    return main_error(as_run(main) if script == "generate.py" else main, args, capsys, *words)


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


def in_process(main, argv: list, monkeypatch, capsys) -> str:
    """Run a script's main() in this process, where the work it does is visible: it must exit with status 1
    in one error line without touching any weights. Returns the error line."""
    monkeypatch.setattr(sys, "argv", [str(a) for a in argv])
    capsys.readouterr()
    with WeightOps() as ops, pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 1
    line = assert_one_error_line(capsys.readouterr().err)
    assert ops.count == 0, f"{ops.count} operations on weights before the refusal: the check must come first"
    return line


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


@pytest.mark.parametrize("script, argv, words", FLAGS_REFUSED, ids=[case[0] for case in FLAGS_REFUSED])
def test_a_flag_argparse_refuses_is_one_error_line_and_exit_1_in_every_script(script, argv, words, monkeypatch,
                                                                             capsys):
    """An unknown flag, a value of the wrong type, a required flag missing: one `error:` line
    and exit status 1 like any other bad input (checkpoint.ArgumentParser), not argparse's usage
    text and status 2. Each script runs as `__main__` in this process (run_as_main); the command
    lines below give the same."""
    code, stderr = run_as_main(script, argv, monkeypatch, capsys)
    assert code == 1, stderr[-2000:]
    assert_one_error_line(stderr, *words, "(see --help)")


SCRIPTS = ["generate.py", "quantize.py", "eval.py", "server.py", "scripts/convert_gguf.py",
           "scripts/convert_hf_checkpoint.py", "scripts/download.py", "scripts/bench.py", "scripts/bench_cpu.py",
           "scripts/bench_layers.py", "scripts/bench_speculative.py", "scripts/load_test.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_ctrl_c_stops_every_script_with_status_130_and_no_traceback(script, monkeypatch, capsys):
    """Ctrl-C as a script reads its flags (once it runs, it can be stopped no earlier) ends it through
    checkpoint.script_exits: status 130 and nothing printed, where a KeyboardInterrupt reaching the interpreter
    prints its traceback."""
    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(checkpoint.ArgumentParser, "parse_known_args", ctrl_c)
    try:
        assert run_as_main(script, [], monkeypatch, capsys) == (130, "")
    except KeyboardInterrupt:  # caught: left to propagate, it would stop the test session
        pytest.fail(f"{script}: the KeyboardInterrupt reached the interpreter, which prints its traceback")


def test_a_flag_argparse_refuses_is_one_error_line_and_exit_1_on_the_command_line():
    """Two real command lines, side by side, one of each way a script ends on bad input:
    generate.py's rank-aware tp.exit_with_error, and bench_cpu.py's plain script_exits."""
    cases = [case for case in FLAGS_REFUSED if case[0] in ("generate.py", "scripts/bench_cpu.py")]
    processes = [subprocess.Popen([sys.executable, script, *argv], cwd=ROOT, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for script, argv, _ in cases]
    for (script, _, words), process in zip(cases, processes):
        _, stderr = process.communicate(timeout=HANG_S)
        assert process.returncode == 1, (script, stderr[-2000:])
        assert_one_error_line(stderr, *words, "(see --help)")


def test_number_prompt_is_text_not_random_tokens(tiny, tmp_path):
    succeeds_here("generate.py", "--checkpoint_path", tiny, "--prompt", "2024", *GEN, "--json", tmp_path / "m.json")
    prompt_tokens = json.loads((tmp_path / "m.json").read_text())["samples"][0]["prompt_tokens"]
    assert len(prompt_tokens) == 1 and 0 < prompt_tokens[0] < 10, prompt_tokens


@pytest.mark.parametrize("flag", ["--prompt_tokens", "--prompt"])
def test_synthetic_prompt_is_its_flag_or_a_number_prompt_with_random_weights(tmp_path, flag):
    succeeds_here("generate.py", "--random_weights", "stories15M", flag, 7, "--max_new_tokens", 2,
                  "--num_samples", 1, "--device", "cpu", "--json", tmp_path / "m.json")
    sample = json.loads((tmp_path / "m.json").read_text())["samples"][0]
    assert sample["prompt_tokens"] == [7] and len(sample["new_tokens"]) == 1


def test_text_prompt_with_random_weights_is_refused(capsys):
    refused_here("generate.py", "--random_weights", "stories15M", "--prompt", "7 days", "--device", "cpu",
                 words=["needs a tokenizer", "--prompt_tokens"], capsys=capsys)
    refused_here("generate.py", "--random_weights", "stories15M", "--prompt", "7", "--prompt", "8", "--device",
                 "cpu", words=["random weights take one prompt of N random tokens"], capsys=capsys)


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
def test_non_utf8_prompt_argument_is_refused(tiny, chat):
    argv = [sys.executable, "generate.py", "--checkpoint_path", str(tiny), "--prompt", b"caf\xe9",
            *(["--chat"] if chat else []), *map(str, GEN)]
    r = subprocess.run(argv, cwd=ROOT, capture_output=True, timeout=HANG_S)
    assert r.returncode == 1
    assert_one_error_line(r.stderr.decode(errors="replace"), "UTF-8", r"b'caf\xe9'")  # the byte as it came


@pytest.mark.parametrize("encoding", [None, "utf-8"])
def test_interactive_non_utf8_line_is_reported_and_the_lines_around_it_are_answered(tiny, encoding):
    """Under the C locale Python reads standard input leniently; PYTHONIOENCODING=utf-8 reads it
    strictly, as a UTF-8 locale (en_US.UTF-8) does, where one bad byte failed the whole read."""
    env = dict(os.environ, **({"PYTHONIOENCODING": encoding} if encoding else {}))
    r = subprocess.run([sys.executable, "generate.py", "--checkpoint_path", str(tiny), "--interactive", "--metrics",
                        *map(str, GEN)], cwd=ROOT, env=env, input=b"hi\ncaf\xe9\nhello\n", capture_output=True,
                       timeout=HANG_S)
    stderr = r.stderr.decode(errors="replace")
    assert r.returncode == 0, stderr
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "UTF-8" in errors[0], stderr  # one for the bad line
    assert stderr.count("new tokens, time to first token") == 2, stderr  # "hi" and "hello" answered


def test_interactive_with_standard_input_closed_is_refused():
    r = subprocess.run(f"exec {shlex.quote(sys.executable)} generate.py --checkpoint_path checkpoints/none "
                       "--interactive <&-", shell=True, cwd=ROOT, capture_output=True, timeout=HANG_S)
    assert r.returncode == 1
    assert_one_error_line(r.stderr.decode(errors="replace"), "standard input", "closed")


def test_interactive_turn_the_chat_template_refuses_is_reported_and_the_session_goes_on(tiny):
    """A template that takes one question only: the second is refused in one line, /clear still
    starts over, and the question after it is answered."""
    edit_json(tiny / "tokenizer_config.json", chat_template=(
        "{% if messages|length > 1 %}{{ raise_exception('one question at a time') }}{% endif %}"
        "{% for m in messages %}{{ m.content }}{% endfor %}"))
    r = subprocess.run([sys.executable, "generate.py", "--checkpoint_path", str(tiny), "--interactive", "--chat",
                        *map(str, GEN)], cwd=ROOT, input=b"hi\nagain\n/clear\nthird\n", capture_output=True,
                       timeout=HANG_S)
    stderr = r.stderr.decode(errors="replace")
    assert r.returncode == 0 and "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "one question at a time" in errors[0], stderr
    assert "(conversation cleared)" in stderr


def test_interactive_chat_without_a_chat_template_is_refused_before_the_first_turn(tiny, capsys):
    edit_json(tiny / "tokenizer_config.json", chat_template=None)
    refused_here("generate.py", "--checkpoint_path", tiny, "--interactive", "--chat", *GEN,
                 words=["no chat template"], capsys=capsys)


@pytest.mark.parametrize("weights", ["model.safetensors", "model.pth"])
def test_a_checkpoint_folder_named_in_another_encoding_than_utf8_is_refused(tiny, weights, capsys):
    """A folder named in Latin-1 (the byte 0xff): torch.load, safetensors and tokenizers take UTF-8 names
    only, and a .pth or the tokenizer ended in their UnicodeEncodeError's traceback."""
    if weights == "model.pth":
        torch.save(checkpoint.read_weights(tiny / "model.safetensors"), tiny / weights)
        (tiny / "model.safetensors").unlink()
    latin1 = tiny.rename(tiny.parent / os.fsdecode(b"tiny-\xff"))
    refused_here("generate.py", "--checkpoint_path", latin1 / weights, "--prompt", "hi", *GEN,
                 words=["tiny-\\xff", "not UTF-8", "rename it"], capsys=capsys)


# ---- generate.py: flags -----------------------------------------------------------------------------

@pytest.mark.parametrize("device", ["mps", "meta", "hpu", "privateuseone"])
def test_device_this_machine_cannot_run_is_refused(tiny, device, capsys):
    refused_here("generate.py", "--checkpoint_path", tiny, "--prompt", "hi", *GEN[:-2], "--device", device,
                 words=[device], capsys=capsys)


def test_batch_too_big_for_memory_is_refused_before_allocating(tiny):
    refused("generate.py", "--checkpoint_path", tiny, "--prompt", "hi", *GEN, "--batch_size", 10_000_000,
            words=["KV cache for 10000000 rows of", "memory"])


@pytest.mark.parametrize("quantization", [[], ["--random_quantization", "int8"]])
def test_random_weights_too_big_for_memory_are_refused_before_allocating(capsys, quantization):
    """A named config made at random on the device whole (0.8 TB in bf16, 0.4 TB in int8: more than
    this machine's memory): refused with the KV cache's check, where making it would end the
    process."""
    error = refused_here("generate.py", "--random_weights", "Llama-3.1-405B", "--dtype", "bfloat16", *quantization,
                         "--prompt_tokens", 4, *GEN, capsys=capsys,
                         words=["GB of random weights and the KV cache for 1 row of 6 tokens need", "free memory"])
    gb = float(error.split("error: ")[1].split(" GB")[0])
    assert 400 < gb < 450 if quantization else 800 < gb < 850, error


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_temperature_is_refused(tiny, value, capsys):
    refused_here("generate.py", "--checkpoint_path", tiny, "--prompt", "hi", *GEN[:4], "--temperature", value,
                 words=["--temperature"], capsys=capsys)


def test_a_temperature_whose_reciprocal_float32_cannot_hold_is_greedy_not_nan():
    """Below float32's range it would divide by 0; below ~3e-39 a compiled step on a GPU, which
    multiplies by the reciprocal, would take 0 * inf for the likeliest logit."""
    from generate import parse_args
    flags = ["--random_weights", "stories15M", "--device", "cpu", "--temperature"]
    assert parse_args(flags + ["1e-50"]).temperature == 0.0
    assert parse_args(flags + ["1e-40"]).temperature == 0.0
    kept = parse_args(flags + ["3e-39"]).temperature  # its reciprocal ~3.3e38 fits
    assert kept > 0 and torch.isfinite(torch.tensor(kept).reciprocal())
    assert parse_args(flags + ["1e-30"]).temperature > 0


@pytest.mark.parametrize("flag, where", [
    ("--profile", "/proc/nonexistent/trace.json"),
    ("--profile", f"{UNWRITABLE}/trace.json"),
    ("--profile", "FILE/trace.json"),  # a folder that is a regular file
    ("--json", "DIR"),  # an existing directory
    ("--json", f"{UNWRITABLE}/m.json"),
    ("--json", "m" * 245 + ".json"),  # a name that fits, but not with the temp file's tag
    ("--profile", "t" * 300 + ".json"),  # a name longer than any file system takes
    ("--json", "PIPE"),  # not a regular file: the rename would replace it (as /dev/null)
    ("--json", "LINK"),  # a link to a file: likewise the link
    ("--profile", os.fsdecode(b"trace-\xfe.json")),  # not UTF-8: torch writes traces by UTF-8 names
    ("--json", ".checkpoint-write.json"),  # the write journal's name: carried out, then removed
])
def test_unwritable_output_is_refused_before_generating(tiny, tmp_path, flag, where, capsys):
    (tmp_path / "FILE").write_text("not a folder")
    (tmp_path / "DIR").mkdir()
    os.mkfifo(tmp_path / "PIPE")
    (tmp_path / "LINK").symlink_to(tmp_path / "FILE")
    before = snapshot(tmp_path)
    path = where if where.startswith("/") else tmp_path / where
    refused_here("generate.py", "--checkpoint_path", tiny, "--prompt", "hi", *GEN, flag, path, words=[flag],
                 capsys=capsys)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("left", ["model.safetensors.index.json", "hf"])
def test_an_unconverted_hugging_face_snapshot_is_refused_naming_the_converter(tmp_path, left, capsys):
    """A snapshot's sharded weights, or download.py's hf/ folder, where a checkpoint was expected."""
    (tmp_path / left).mkdir() if left == "hf" else (tmp_path / left).write_text("{}")
    refused_here("generate.py", "--checkpoint_path", tmp_path, "--prompt", "hi", *GEN,
                 words=["no weights", "convert_hf_checkpoint.py"], capsys=capsys)


@pytest.mark.parametrize("given", [".", "model_int4.pth"], ids=["folder", "guessed-name"])
def test_weights_not_found_names_the_weights_files_the_folder_holds(tmp_path, given, capsys):
    """quantize.py's files have names of their own: a folder of them alone, or a guessed name beside them,
    is refused naming them (no other files)."""
    (tmp_path / "model_int8.pth").write_bytes(b"")
    (tmp_path / "model_int4.g32.pth").write_bytes(b"")
    (tmp_path / "model_int4.g32.json").write_text("{}")
    line = refused_here("generate.py", "--checkpoint_path", tmp_path / given, "--prompt", "hi", *GEN,
                        words=["it holds model_int4.g32.pth, model_int8.pth: give one of them"], capsys=capsys)
    assert ".json" not in line


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
@pytest.mark.parametrize("weights", ["model.safetensors", "weights.safetensors"])
def test_output_over_a_checkpoint_file_is_refused(tiny, flag, weights, capsys):
    """config.json, and weights of another name read with their config beside them (weights.json)."""
    if weights != "model.safetensors":
        (tiny / "model.safetensors").rename(tiny / weights)
        (tiny / "config.json").rename(tiny / "weights.json")
    before = snapshot(tiny)
    for target in (tiny / weights, tiny / weights.replace(".safetensors", ".json").replace("model", "config")):
        refused_here("generate.py", "--checkpoint_path", tiny / weights, "--prompt", "hi", *GEN, flag, target,
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


@pytest.mark.parametrize("script, flag, more", [
    ("generate.py", "--checkpoint_path", ["--prompt", "hi"]), ("quantize.py", "--out", ["--mode", "int8"]),
    ("scripts/convert_gguf.py", "--gguf", ["--out", "x"]), ("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", [])])
def test_a_path_with_a_name_longer_than_the_file_system_takes_is_one_error_line(tiny, tmp_path, script, flag, more,
                                                                                capsys):
    """Python's Path.is_file raises (ENAMETOOLONG) where a name is over 255 bytes, rather than finding
    nothing: every path flag is checked as the command line is read."""
    long = tmp_path / ("y" * 300) / "x"
    if script == "quantize.py":
        more = ["--checkpoint_path", tiny, *more]
    refused_here(script, flag, long, *more, words=[flag, "longer than 255 bytes"], capsys=capsys)


@pytest.mark.parametrize("script", ["generate.py", "quantize.py"])
@pytest.mark.parametrize("kind", ["meta", "sparse"])
def test_a_pth_of_tensors_without_dense_data_is_refused_naming_the_tensor(tiny, kind, script, capsys):
    """torch.save keeps a tensor's device and layout: weights saved from the meta device, or sparse, load
    as such and would make an empty quantized file or fail inside PyTorch."""
    from safetensors.torch import load_file
    tensors = load_file(tiny / "model.safetensors")
    name = "layers.0.attention.wo.weight"
    tensors[name] = torch.empty(tensors[name].shape, device="meta") if kind == "meta" else tensors[name].to_sparse()
    (tiny / "model.safetensors").unlink()
    torch.save(tensors, tiny / "model.pth")
    before = snapshot(tiny)
    more = ["--prompt", "hi", *GEN] if script == "generate.py" else ["--mode", "int8"]
    refused_here(script, "--checkpoint_path", tiny, *more, words=["model.pth", name, "no dense data"],
                 capsys=capsys)
    assert snapshot(tiny) == before


@pytest.mark.parametrize("where", ["checkpoint", "out"])
def test_a_tokenizer_file_quantize_cannot_read_is_refused_before_any_work(tiny, tmp_path, where, monkeypatch,
                                                                       capsys):
    """quantize.py copies the tokenizer files beside an --out in another folder, or compares them with
    those already there, after quantizing: one it may not read is refused first (no permission: os.access,
    which root passes, so the test denies it)."""
    out = tmp_path / "elsewhere" / "q.pth"
    out.parent.mkdir()
    closed = (tiny if where == "checkpoint" else out.parent) / "tokenizer_config.json"
    if where == "out":
        shutil.copy(tiny / closed.name, closed)
    monkeypatch.setattr(checkpoint.os, "access", lambda path, mode: Path(path) != closed)
    before = snapshot(tmp_path)
    refused_here("quantize.py", "--checkpoint_path", tiny, "--mode", "int8", "--out", out,
                 words=[str(closed), "permission denied"], capsys=capsys)
    assert snapshot(tmp_path) == before


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


def test_a_gguf_file_given_as_the_checkpoint_is_refused_with_the_converter_named(tiny, capsys):
    (tiny / "model.gguf").write_bytes(b"GGUF")
    refused_here("generate.py", "--checkpoint_path", tiny / "model.gguf", "--prompt", "hi", *GEN,
                 words=["not a weights file", "scripts/convert_gguf.py"], capsys=capsys)


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


def a_bug(*args, **kwargs):
    raise ValueError("not enough values to unpack")


def test_a_bug_in_generate_py_keeps_its_traceback(tiny, monkeypatch, capsys):
    """Only bad input becomes an `error:` line; a bug inside the program (here, a ValueError where none is
    expected, in the tokenizer's loading once the checkpoint has been read) must surface with its traceback,
    not be passed off as the user's mistake: it escapes main() and the script's `__main__` block, and the
    interpreter prints its traceback."""
    import tokenizer
    monkeypatch.setattr(tokenizer, "load_tokenizer", a_bug)  # generate.py imports it when run (runpy)
    with pytest.raises(ValueError, match="not enough values to unpack"):
        run_as_main("generate.py", ["--checkpoint_path", tiny, "--prompt", "hi", *GEN], monkeypatch, capsys)
    assert "error:" not in capsys.readouterr().err


@pytest.mark.parametrize("script", ["quantize.py", "eval.py", "server.py", "scripts/bench.py", "scripts/bench_cpu.py",
                                    "scripts/bench_layers.py", "scripts/bench_speculative.py",
                                    "scripts/convert_gguf.py", "scripts/convert_hf_checkpoint.py",
                                    "scripts/load_test.py"])
def test_a_bug_keeps_its_traceback_in_every_script(script, monkeypatch, capsys):
    """The other scripts end on InputError alone too, in main() or in their `__main__` block: a bug (a
    ValueError raised while each parses its command line, checkpoint.ArgumentParser; parse_args calls
    parse_known_args) escapes both. (Not scripts/download.py: its parse is inside the `try` that turns the
    Hub's failures into one line, and such a bug ends in a traceback of another exception, raised while
    handling it.)"""
    monkeypatch.setattr(checkpoint.ArgumentParser, "parse_known_args", a_bug)
    with pytest.raises(ValueError, match="not enough values to unpack"):
        run_as_main(script, [], monkeypatch, capsys)
    assert "error:" not in capsys.readouterr().err


# ---- quantize.py: where the output goes -------------------------------------------------------------

def test_quantize_refuses_output_over_base_checkpoint(tiny, capsys):
    before = snapshot(tiny)
    refused_here("quantize.py", "--checkpoint_path", tiny, "--mode", "int8", "--out", tiny / "model.pth",
                 words=["is named as a folder's float weights"], capsys=capsys)
    assert snapshot(tiny) == before
    succeeds_here("generate.py", "--checkpoint_path", tiny, "--prompt", "hi", *GEN)


def test_quantize_refuses_output_over_its_source_weights(tiny):
    """The real command line (tests/test_quantize.py checks the other names over the source in-process)."""
    from safetensors.torch import load_file
    torch.save(load_file(tiny / "model.safetensors"), tiny / "model.pth")
    (tiny / "model.safetensors").unlink()
    before = snapshot(tiny)
    refused("quantize.py", "--checkpoint_path", tiny, "--mode", "int8", "--out", tiny / "model.pth",
            words=["is the source checkpoint's weights"])
    assert snapshot(tiny) == before


def test_quantize_refuses_output_over_its_calibration_file(tiny, tmp_path, capsys):
    calibration = tmp_path / "calibration.json"  # a text that --out's sidecar would replace
    calibration.write_text("The capital of France is Paris. " * 40)
    before = calibration.read_text()
    refused_here("quantize.py", "--checkpoint_path", tiny, "--mode", "int4-gptq", "--calibration_file", calibration,
                 "--calibration_seq_len", 32, "--calibration_samples", 2, "--out", tmp_path / "calibration.pth",
                 words=["would write over the calibration file"], capsys=capsys)
    assert calibration.read_text() == before and not (tmp_path / "calibration.pth").exists()


@pytest.mark.parametrize("mine", ["results.json", "results.pth"])
def test_quantize_refuses_output_over_files_that_are_not_a_quantized_checkpoint(tiny, tmp_path, mine, capsys):
    """--out results.pth writes results.json beside it: a user's own file of either name stays; a
    quantized file and its config from an earlier run are replaced."""
    (tmp_path / mine).write_text('{"my": "results"}')
    before = snapshot(tmp_path)
    refused_here("quantize.py", "--checkpoint_path", tiny, "--mode", "int8", "--out", tmp_path / "results.pth",
                 words=["not a quantized checkpoint's", "choose another name, e.g. the default"], capsys=capsys)
    assert snapshot(tmp_path) == before
    for _ in range(2):
        succeeds_here("quantize.py", "--checkpoint_path", tiny, "--mode", "int8", "--out", tmp_path / "q.pth")


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
    in_process(quantize.main, ["quantize.py", "--checkpoint_path", smollm2_checkpoint, "--mode", "int4", "--out", out],
               monkeypatch, capsys)
    assert snapshot(tmp_path) == before and snapshot(smollm2_checkpoint) == source


def interruptible(argv: list, stdout, stderr=subprocess.PIPE) -> subprocess.Popen:
    """A script started as from a terminal, which Ctrl-C (SIGINT) reaches: a shell's background job (this
    pytest, maybe) ignores SIGINT and so would its children; a handler of this process is reset to the default
    in the child."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen([sys.executable, *map(str, argv)], cwd=ROOT, stdout=stdout, stderr=stderr,
                                text=True)
    finally:
        signal.signal(signal.SIGINT, previous)


def has_mapped(p: subprocess.Popen, path) -> bool:
    """Whether process p has the file at path mapped into its memory (it is reading it); False once p has
    exited."""
    try:
        with open(f"/proc/{p.pid}/maps") as maps:
            return str(path) in maps.read()
    except OSError:  # it has exited
        return False


@pytest.mark.slow
def test_ctrl_c_while_generating_exits_130_without_a_traceback(smollm2_checkpoint):
    p = interruptible(["generate.py", "--checkpoint_path", smollm2_checkpoint, "--prompt", "Once upon a time",
                       "--max_new_tokens", "2000"], subprocess.PIPE)
    assert p.stdout.read(1), "generate.py printed nothing"  # it is generating
    p.send_signal(signal.SIGINT)
    stderr = p.communicate(timeout=HANG_S)[1]
    assert p.returncode == 130 and "Traceback" not in stderr, (p.returncode, stderr[-2000:])


@pytest.mark.slow
def test_ctrl_c_while_converting_exits_130_and_leaves_no_checkpoint(smollm2_gguf, tmp_path):
    out = tmp_path / "ckpt"
    p = interruptible(["scripts/convert_gguf.py", "--gguf", smollm2_gguf, "--out", out], subprocess.DEVNULL)
    while p.poll() is None and not has_mapped(p, smollm2_gguf):
        time.sleep(0.005)
    assert p.poll() is None, "convert_gguf.py finished before it could be stopped"
    p.send_signal(signal.SIGINT)
    stderr = p.communicate(timeout=HANG_S)[1]
    assert p.returncode == 130 and "Traceback" not in stderr, (p.returncode, stderr[-2000:])
    assert not out.exists() or checkpoint.checkpoint_files(out) == [], os.listdir(out)


@pytest.mark.slow
@pytest.mark.parametrize("when", ["quantizing", "writing"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_quantize_killed_leaves_complete_output_or_none(smollm2_checkpoint, tmp_path, sig, when):
    """quantize.py stopped (kill, Ctrl-C) on the real model while it quantizes (once it has mapped the source
    weights, before any output exists) or while it writes (once its first temp file appears; int8: a second
    or two of writing here): it dies of the signal, and the folder as its next reader sees it (read_checkpoint
    carries out a write journal, checkpoint.write_files) holds the whole output pair or nothing of it, no temp
    files. SIGTERM kills it (status -15), or in the middle of the write makes it exit with 128 + 15 after
    removing its temp files (checkpoint.exit_on_sigterm); SIGINT ends it as a shell reports a program that
    Ctrl-C stopped, status 130, without a traceback (its KeyboardInterrupt unwinds the write first)."""
    for attempt in range(3):  # on a loaded machine the write can end before the signal lands: again
        # hard links: quantize.py only reads the source files (and writes new ones beside them)
        folder = Path(shutil.copytree(smollm2_checkpoint, tmp_path / f"ckpt{attempt}", copy_function=os.link))
        before, source = set(os.listdir(folder)), str(folder / "model.safetensors")
        with open(tmp_path / "stderr", "w") as stderr:  # a file: a pipe left unread could fill and stop it
            p = interruptible(["quantize.py", "--checkpoint_path", folder, "--mode", "int8"], subprocess.DEVNULL,
                              stderr)

        def output_begun() -> bool:
            return bool(set(os.listdir(folder)) - before)

        while p.poll() is None and not (has_mapped(p, source) if when == "quantizing" else output_begun()):
            time.sleep(0.005)
        assert p.poll() is None, f"quantize.py finished (status {p.returncode}) before it could be stopped {when}"
        assert output_begun() == (when == "writing")
        p.send_signal(sig)
        p.wait(timeout=HANG_S)
        if p.returncode != 0:  # 0: it finished first; a quantize.py that ignored the signal does so every time
            break
    stderr = (tmp_path / "stderr").read_text()
    if sig == signal.SIGINT:
        assert p.returncode == 130 and "Traceback" not in stderr, (p.returncode, stderr[-2000:])
    else:
        handled = (128 + sig,) if when == "writing" else ()
        assert p.returncode in (-sig, *handled), (p.returncode, stderr[-2000:])
    read_checkpoint(folder)  # as the next reader: carries out a journal written before the signal
    new = set(os.listdir(folder)) - before
    pair = {"model_int8.pth", "model_int8.json"}
    assert new in ((set(), pair) if when == "writing" else (set(),)), new  # no temp files, no half a pair
    if new:
        assert read_checkpoint(folder / "model_int8.pth").quantization["mode"] == "int8"
        read_weights(folder / "model_int8.pth")  # whole: a truncated file is an InputError


def test_ctrl_c_while_a_model_is_built_on_meta_is_raised_once_it_is_built():
    """Ctrl-C that lands while torch takes its device mode off the stack and puts it back (each parameter's
    init does) loses the mode, and torch's RuntimeError on leaving `with torch.device("meta")` replaces the
    KeyboardInterrupt (a traceback and status 1 where Ctrl-C's 130 belongs): checkpoint.on_meta holds it
    until the block ends, raises it then, and leaves no mode on the stack nor its own handler behind."""
    handler, built = signal.getsignal(signal.SIGINT), []
    with pytest.raises(KeyboardInterrupt):
        with checkpoint.on_meta():
            signal.raise_signal(signal.SIGINT)
            built.append(torch.nn.Linear(8, 8))
    assert built and built[0].weight.is_meta
    assert torch._C._len_torch_function_stack() == 0 and signal.getsignal(signal.SIGINT) is handler


# ---- config files: absurd values are refused before anything is built --------------------------------

# id: (the change to config.json, words of the error line besides the file's name). A model of 10^9 layers
# would take days to build even on the meta device: the sizes are refused before anything is built.
BEYOND = "beyond any model"
ABSURD = {"n_layer-1e9": ({"n_layer": 1_000_000_000}, [BEYOND]), "dim-1e9": ({"dim": 1_000_000_000}, [BEYOND]),
          "vocab-1e12": ({"vocab_size": 1_000_000_000_000}, [BEYOND]), "n_kv_heads-0": ({"n_kv_heads": 0}, []),
          "n_head-negative": ({"n_head": -4}, []), "dim-float": ({"dim": 1e9}, []),
          "n_layer-string": ({"n_layer": "2"}, []), "intermediate-bool": ({"intermediate_size": True}, [])}


@pytest.mark.parametrize("change, words", ABSURD.values(), ids=ABSURD.keys())
@pytest.mark.parametrize("script", ["generate.py", "quantize.py"])
def test_absurd_config_is_refused_naming_the_file(tiny, script, change, words, capsys):
    edit_json(tiny / "config.json", **change)
    before = snapshot(tiny)
    more = ["--prompt", "hi", *GEN] if script == "generate.py" else ["--mode", "int8"]
    refused_here(script, "--checkpoint_path", tiny, *more, words=[f"{tiny / 'config.json'}: ", *words], capsys=capsys)
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
    (tiny / "model_int8.json").write_text(good)
    assert "output" in record["layers"]  # quantize.py quantizes it, untied
    edit_json(tiny / "model_int8.json", tie_embeddings=True)
    refused_here("generate.py", "--checkpoint_path", tiny / "model_int8.pth", "--prompt", "hi", *GEN,
                 words=["model_int8.json", "tie_embeddings"], capsys=capsys)
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
    edit_json(sidecar, quantization={**record, "groupsize": 128.0})  # equal to 128, not an int
    refused_here("generate.py", "--checkpoint_path", sidecar.with_suffix(".pth"), "--prompt", "hi",
                 *GEN, words=[sidecar.name, "groupsize 128.0"], capsys=capsys)


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


def test_hf_converter_refuses_an_unsupported_rope_type_given_as_transformers_4_writes_it(tiny_hf, tmp_path, capsys):
    """rope_scaling holding "rope_type" (transformers 4); tests/test_hf_parity.py checks the other ways a config
    gives it (rope_scaling's older "type", transformers 5's rope_parameters) and the other types."""
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    hf_source(tiny_hf, tmp_path, rope_parameters=None, rope_theta=10000.0, rope_scaling=scaling)
    before = snapshot(tmp_path)
    refused_here("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", tmp_path, words=["'yarn'", "rope_scaling"],
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


@pytest.mark.parametrize("shard", ["s" * 300 + ".safetensors", "../model.safetensors", "/etc/hostname", "",
                                   "a\0b.safetensors", "\ud800.safetensors"],
                         ids=["name-too-long", "parent-folder", "absolute", "empty", "nul", "lone-surrogate"])
def test_hf_converter_refuses_an_index_naming_a_shard_that_is_no_file_name_in_the_folder(tiny_hf, tmp_path,
                                                                                       shard, capsys):
    """An index's weight_map maps tensor names to shard files beside it; a longer name than a file system
    takes (which Python's is_file raises on), a path leading elsewhere, a NUL byte or a lone surrogate (a
    traceback on encoding) is refused naming the index."""
    hf = hf_source(tiny_hf, tmp_path)
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"model.norm.weight": shard}}))
    before = snapshot(tmp_path)
    refused_here("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", tmp_path,
                 words=["model.safetensors.index.json", "not the name of a file"], capsys=capsys)
    assert snapshot(tmp_path) == before


def with_dtype(path: Path, name: str, dtype: str, bits: int):
    """Rewrite the safetensors file at path with tensor `name` declared as `dtype` of `bits` a value (zeros),
    a type the safetensors library may have no tensor for: the header written by hand."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    data, blobs = raw[8 + size:], {}
    for key, info in header.items():
        if key != "__metadata__":
            begin, end = info["data_offsets"]
            blobs[key] = data[begin:end]
    header[name]["dtype"] = dtype
    blobs[name] = bytes(math.prod(header[name]["shape"]) * bits // 8)
    offset = 0
    for key in blobs:
        header[key]["data_offsets"] = [offset, offset + len(blobs[key])]
        offset += len(blobs[key])
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs.values()))


@pytest.mark.parametrize("case, words", [
    ("fp8-with-float", ["pieces of layers.0.attention.wqkv.weight", "different dtypes"]),
    ("int8", ["model.layers.0.self_attn.q_proj.weight is int8", "float weights"]),
    ("F6_E2M3", ["cannot read model.norm.weight", "F6_E2M3"]),
])
def test_hf_converter_refuses_weights_of_a_dtype_it_cannot_convert(tiny_hf, tmp_path, case, words, capsys):
    """Pieces of one fused weight that torch.cat cannot join, integer weights, and a dtype the safetensors
    library reads in its header but makes no tensor of."""
    from safetensors.torch import load_file, save_file
    hf = hf_source(tiny_hf, tmp_path)
    if case == "F6_E2M3":
        with_dtype(hf / "model.safetensors", "model.norm.weight", "F6_E2M3", 6)
    else:
        tensors = load_file(hf / "model.safetensors")
        q = "model.layers.0.self_attn.q_proj.weight"
        tensors[q] = tensors[q].to(torch.float8_e4m3fn if case == "fp8-with-float" else torch.int8)
        save_file(tensors, hf / "model.safetensors")
    refused_here("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", tmp_path, words=words, capsys=capsys)
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


def test_hf_converter_names_the_files_it_wrote_and_notes_a_missing_tokenizer(tiny_hf, smollm2_checkpoint,
                                                                            tmp_path, capsys):
    hf = hf_source(tiny_hf, tmp_path)  # as save_pretrained writes a model: no tokenizer
    capsys.readouterr()
    succeeds_here("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", tmp_path)
    out = capsys.readouterr()
    assert out.out.rstrip().endswith("and config.json, generation_config.json"), out.out
    assert out.err.strip() == ("note: the snapshot has no tokenizer.json or tokenizer.model; text prompts "
                               f"need one of them in {tmp_path}")
    shutil.copy(smollm2_checkpoint / "tokenizer.json", hf / "tokenizer.json")
    succeeds_here("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", tmp_path, "--force")
    out = capsys.readouterr()
    assert out.out.rstrip().endswith("and config.json, tokenizer.json, generation_config.json"), out.out
    assert not out.err
    (hf / "tokenizer.json").unlink()  # a sentencepiece model alone is a tokenizer too
    spm = Path(importlib.util.find_spec("mistral_common").submodule_search_locations[0]) / "data/tokenizer.model.v1"
    shutil.copy(spm, hf / "tokenizer.model")
    succeeds_here("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", tmp_path, "--force")
    out = capsys.readouterr()
    assert out.out.rstrip().endswith("and config.json, tokenizer.model, generation_config.json"), out.out
    assert not out.err


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


def test_hf_converter_refuses_output_that_is_a_file_or_under_a_link_to_nothing(tiny_hf, tmp_path):
    (tmp_path / "out").write_text("a file, not a folder")
    refused("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", tmp_path / "out", "--hf_dir", tiny_hf,
            words=["is a file, not a folder"])
    assert (tmp_path / "out").read_text() == "a file, not a folder"
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    refused("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", tmp_path / "dangling", "--hf_dir",
            tiny_hf, words=["is a link to nothing, not a folder"])
    refused("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", tmp_path / "dangling" / "sub", "--hf_dir",
            tiny_hf, words=["cannot create it", "dangling is a link to nothing"])
    assert not (tmp_path / "gone").exists()
