"""End to end on a real model: SmolLM2-135M-Instruct, converted from its GGUF file by scripts/convert_gguf.py."""
import json
import shutil

import pytest
import torch

import generate as G
from conftest import assert_one_error_line, run_script, smollm2_cli_args
from generate import Sampling, generate
from checkpoint import InputError, load_model, read_checkpoint
from tokenizer import load_tokenizer

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def smollm2(smollm2_checkpoint):
    ckpt = read_checkpoint(smollm2_checkpoint)
    return load_model(ckpt, dtype=torch.float32), load_tokenizer(ckpt.folder)


def test_chat_answer_names_paris(smollm2):
    model, tokenizer = smollm2
    prompt = tokenizer.encode_chat([{"role": "user", "content": QUESTION}])
    model.setup_caches(1, len(prompt) + 24)
    answer = tokenizer.decode(generate(model, [prompt], 24, Sampling(temperature=0), tokenizer.eos_ids).tokens[0])
    print(repr(answer))
    assert "Paris" in answer


@pytest.mark.slow
def test_perplexity_on_real_english_text(smollm2_pydoc):
    """transformers gives 12.7 on this text (the first 1024 tokens of pydoc's topics; 11.9 on 2048); a
    broken layer, norm or rotary layout gives hundreds. Computed once for the session (conftest.py's
    smollm2_pydoc): tests/test_quantize.py compares the quantized modes against the same number."""
    _, ids, ppl = smollm2_pydoc
    print(f"perplexity {ppl:.2f} on {ids.shape[1]} tokens")
    assert ppl < 15


@pytest.mark.parametrize("compile_flags", [[], pytest.param(["--compile"], marks=pytest.mark.slow)],
                         ids=["eager", "compiled"])
def test_generate_cli_prints_the_answer_and_metrics(compile_flags, smollm2_checkpoint, tmp_path, request):
    if compile_flags:
        # The very same command line, started in the background when the session began (compiling takes
        # minutes of one core): conftest.py's smollm2_compiled_job.
        metrics, job = request.getfixturevalue("smollm2_compiled_job")
        r = job.wait()
    else:
        metrics = tmp_path / "metrics.json"
        r = run_script(*smollm2_cli_args(smollm2_checkpoint, metrics))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("Paris") == 2, r.stdout  # streamed once per sample
    assert "time to first token" in r.stderr and "tok/s" in r.stderr and "GB/s" in r.stderr
    data = json.loads(metrics.read_text())
    assert len(data["samples"]) == 2
    for sample in data["samples"]:
        assert sample["decode_tok_s"] > 0 and sample["ttft_s"] > 0 and sample["bandwidth_gb_s"] > 0
    assert (data["compile_s"] is not None) == bool(compile_flags)


@pytest.mark.parametrize("args, words", [
    (["--checkpoint_path", "checkpoints/does-not-exist"], ["not found"]),
    (["--random_weights", "Llama-9-1T"], ["unknown model name"]),
    (["--random_weights", "stories15M", "--prompt_tokens", "300"], ["context is 256 tokens"]),
    (["--random_weights", "stories15M", "--top_p", "0"], ["--top_p"]),
    (["--random_weights", "stories15M", "--top_p", "1.5"], ["--top_p"]),
    (["--random_weights", "stories15M", "--temperature", "-1"], ["--temperature"]),
    (["--random_weights", "stories15M", "--temperature", "1e39"], ["--temperature", "float32", "1e+39"]),
    (["--random_weights", "stories15M", "--top_k", "0"], ["--top_k must be >= 1", "got 0"]),
    (["--random_weights", "stories15M", "--speculate_k", "4"], ["--speculate_k needs"]),
    (["--random_weights", "stories15M", "--prompt", "hello"], ["needs a tokenizer"]),
    (["--random_weights", "stories15M", "--prompt_tokens", "0"], ["--prompt_tokens"]),
    (["--random_weights", "stories15M", "--json", "no/such/folder/m.json"], ["--json", "does not exist"]),
    (["--random_weights", "stories15M", "--interactive"], ["--interactive needs --checkpoint_path"]),
    (["--random_weights", "stories15M", "--device", "gpu0"], ["--device"]),
], ids=["missing-checkpoint", "unknown-name", "prompt-too-long", "top-p-zero", "top-p-above-one",
        "negative-temperature", "temperature-past-float32", "top-k-zero", "speculative",
        "text-prompt-without-tokenizer", "zero-prompt-tokens", "json-folder-missing",
        "interactive-without-tokenizer", "unknown-device"])
def test_bad_input_gives_one_error_line(args, words):
    """generate.main in this process: the InputError that generate.py prints as its one error line
    (test_corrupt_weights_give_one_error_line checks that line from the real command line)."""
    assert_input_error(["--device", "cpu", *args], *words)


def test_cuda_without_a_gpu_gives_one_error_line(monkeypatch):
    """checkpoint.check_device, before any model is made; a GPU machine passes for one without (the
    build's answer to torch.cuda.is_available is all the check asks)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert_input_error(["--random_weights", "stories15M", "--device", "cuda"], "--device cuda",
                       "sees no CUDA GPU")


def assert_input_error(argv: list, *words):
    with pytest.raises(InputError) as e:
        G.main([str(a) for a in argv])
    message = str(e.value)
    assert "\n" not in message.strip(), message
    for word in words:
        assert word in message, message


def test_corrupt_weights_give_one_error_line(smollm2_checkpoint, tmp_path):
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_checkpoint / name, tmp_path / name)
    with open(smollm2_checkpoint / "model.safetensors", "rb") as f:
        (tmp_path / "model.safetensors").write_bytes(f.read(1 << 20))  # truncated after 1 MiB
    r = run_script("generate.py", "--checkpoint_path", tmp_path, "--device", "cpu")
    assert r.returncode == 1
    assert_one_error_line(r.stderr, "cannot read weights")


@pytest.mark.parametrize("config, words", [
    ("{}", ["missing"]),
    ("{not json", ["not valid JSON"]),
    ('{"dim": 64, "n_layer": 1, "n_head": 4, "n_kv_heads": 3, "vocab_size": 10, "intermediate_size": 8}', ["n_kv_heads"]),
], ids=["empty", "not-json", "heads-do-not-divide"])
def test_bad_config_gives_one_error_line(config, words, smollm2_checkpoint, tmp_path):
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).symlink_to(smollm2_checkpoint / name)
    (tmp_path / "config.json").write_text(config)
    assert_input_error(["--checkpoint_path", tmp_path, "--device", "cpu"], *words)


@pytest.mark.parametrize("broken, flags, words", [
    ("tokenizer.json", [], ["cannot read", "tokenizer.json"]),
    ("tokenizer_config.json", ["--chat"], ["chat template error"]),
], ids=["corrupt-tokenizer-json", "broken-chat-template"])
def test_broken_tokenizer_files_give_one_error_line(broken, flags, words, smollm2_checkpoint, tmp_path):
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        if name != broken:
            (tmp_path / name).symlink_to(smollm2_checkpoint / name)
    config = json.loads((smollm2_checkpoint / "tokenizer_config.json").read_text())
    (tmp_path / broken).write_text("{ not json" if broken == "tokenizer.json" else
                                   json.dumps({**config, "chat_template": "{% if messages %}{{ messages[0]['content'] }"}))
    assert_input_error(["--checkpoint_path", tmp_path, "--device", "cpu", "--prompt", "Hi", *flags], *words)


@pytest.mark.parametrize("key, value", [("eos_token", "\ud800"), ("bos_token", "\ud800"),
                                        ("chat_template", "{{ messages }}\ud800")])
def test_a_lone_surrogate_in_tokenizer_config_is_one_error_line(key, value, smollm2_checkpoint, tmp_path):
    """JSON's escapes can write "\\ud800", which reads as no text: the config's fault, named."""
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        (tmp_path / name).symlink_to(smollm2_checkpoint / name)
    config = json.loads((smollm2_checkpoint / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, key: value}))  # ascii: "\ud800"
    assert_input_error(["--checkpoint_path", tmp_path, "--device", "cpu", "--prompt", "Hi", "--chat"],
                       "tokenizer_config.json", key)


@pytest.mark.parametrize("template, raised", [
    ("{{ 1 / 0 }}", "ZeroDivisionError"), ("{{ 'a' + 1 }}", "TypeError"),
    ("{{ strftime_now(5) }}", "TypeError"), ("{{ raise_exception('no system role') }}", "no system role"),
    ('{{ "ab"|truncate(-1) }}', "AssertionError"), ('{{ "%c" % 55296 }}', "lone surrogate"),
], ids=["division", "types", "strftime", "raise_exception", "filter-asserts", "lone-surrogate"])
def test_a_chat_template_that_raises_while_rendering_is_the_checkpoints_error(template, raised, smollm2_checkpoint,
                                                                              tmp_path):
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).symlink_to(smollm2_checkpoint / name)
    (tmp_path / "chat_template.jinja").write_text(template)
    assert_input_error(["--checkpoint_path", tmp_path, "--device", "cpu", "--prompt", "Hi", "--chat"],
                       "chat template error", raised)
