"""eval.py: perplexity against transformers on the same windows, the lm-eval model's loglikelihoods against
transformers, a small local multiple-choice task end to end through `eval.py --tasks` (lm_eval's own evaluator
and dataset loader), generate_until's stop strings, and one-line errors for bad input. The real model is
SmolLM2-135M-Instruct."""
import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from checkpoint import InputError, load_model, read_checkpoint
from conftest import ROOT, assert_one_error_line, main_error, run_script
from eval import (EvalModel, check_args, default_text, harness_model, load_tasks, main, parse_args, perplexity,
                  rolling_windows)
from generate import Sampling, generate
from tokenizer import load_tokenizer

DATA = ROOT / "tests" / "data"  # capitals.yaml: lm-eval's local `json` dataset config for capitals.jsonl
CAPITALS_CHOICES = 4


@pytest.fixture
def offline_hub(monkeypatch):
    """The Hugging Face libraries offline, as eval.py sets them for itself; restored afterwards."""
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, "1")


@pytest.fixture(scope="module")
def smollm2_eval(smollm2_checkpoint):
    ckpt = read_checkpoint(smollm2_checkpoint)
    model = load_model(ckpt, dtype=torch.float32)
    assert not model.training  # load_model returns the model in eval mode
    return EvalModel(model, load_tokenizer(ckpt.folder), max_seq_length=256, batch_size=4)


@torch.no_grad()
def hf_logprob(hf, tokens: list, n_scored: int) -> tuple[float, bool]:
    """log P(last n_scored tokens | the tokens before them) and whether each is the argmax, by transformers."""
    logits = hf(torch.tensor([tokens])).logits[0, -n_scored - 1:-1]  # (n_scored, vocab)
    logprobs = F.log_softmax(logits, dim=-1)
    targets = torch.tensor(tokens[-n_scored:])
    return logprobs.gather(-1, targets[:, None]).sum().item(), bool((logprobs.argmax(-1) == targets).all())


# ---- 1. perplexity ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_tokens, max_seq_length, stride", [(1, 8, 4), (2, 8, 4), (9, 8, 4), (10, 8, 4),
                                                              (50, 8, 3), (50, 8, 8), (50, 8, 1), (7, 16, 8)])
def test_rolling_windows_score_every_token_once_with_enough_context(n_tokens, max_seq_length, stride):
    windows = rolling_windows(n_tokens, max_seq_length, stride)
    scored = []
    for start, end, n in windows:
        assert 0 <= start and end - 1 - start <= max_seq_length and 1 <= n <= end - start - 1
        for target in range(end - n, end):
            scored.append(target)
            assert target - start >= min(target, max_seq_length - stride + 1)  # context before the target
    assert scored == list(range(1, n_tokens))  # each token but the first, once, in order
    assert len({end - start for start, end, _ in windows}) <= 1  # one shape: batches need no padding


@pytest.mark.slow
def test_perplexity_matches_transformers_on_the_same_windows(smollm2_checkpoint, hf_smollm2, tmp_path, capsys):
    text = default_text()[1][:3000]
    (tmp_path / "text.txt").write_text(text)
    # Windows of 128 (half the CPU of 256 per token) still give a full first window, strided ones and a
    # shorter last one.
    limit, max_seq_length, stride = 352, 128, 48
    eval_main(["--checkpoint_path", smollm2_checkpoint, "--text_file", tmp_path / "text.txt", "--limit", limit,
               "--max_seq_length", max_seq_length, "--stride", stride, "--batch_size", 3, "--device", "cpu",
               "--output", tmp_path / "out.json"])
    stdout = capsys.readouterr().out
    ours = json.loads((tmp_path / "out.json").read_text())["perplexity"]
    assert f"perplexity {ours['perplexity']:.4f}" in stdout and "bits per byte" in stdout

    ids = load_tokenizer(smollm2_checkpoint).encode(text)[:limit]
    windows = rolling_windows(len(ids), max_seq_length, stride)
    assert len(windows) == ours["windows"] == 6  # 128 scored, then 48 at a time, the last 31
    nll = -sum(hf_logprob(hf_smollm2, ids[start:end], n)[0] for start, end, n in windows)
    reference = math.exp(nll / (limit - 1))
    print(f"perplexity: ours {ours['perplexity']:.4f}, transformers {reference:.4f}")
    assert ours["tokens"] == limit and ours["scored_tokens"] == limit - 1
    assert ours["perplexity"] == pytest.approx(reference, rel=5e-3)
    assert 5 < reference < 50  # real English and Python text, not a broken model
    predicted_text = load_tokenizer(smollm2_checkpoint).decode(ids[1:])
    assert ours["bytes"] == len(predicted_text.encode("utf-8"))  # byte-level BPE: pieces decode independently
    assert ours["bits_per_byte"] == pytest.approx(nll / math.log(2) / ours["bytes"], rel=5e-3)


def eval_main(argv: list):
    """eval.py's main() in this process: no interpreter, torch and lm_eval start-up per test (the command line
    itself: test_missing_lm_eval_gives_one_error_line)."""
    main([str(a) for a in argv])


@pytest.mark.slow
def test_perplexity_of_a_quantized_checkpoint_is_close_to_float(smollm2_eval, smollm2_quantized, tmp_path):
    # smollm2_quantized: quantize.py's int8 file of SmolLM2, made once for the session (conftest.py).
    eval_main(["--checkpoint_path", smollm2_quantized / "model_int8.pth", "--limit", 600, "--max_seq_length", 256,
               "--device", "cpu", "--output", tmp_path / "out.json"])
    int8 = json.loads((tmp_path / "out.json").read_text())
    assert int8["quantization"] == "int8"
    ids = smollm2_eval.tokenizer.encode(default_text()[1])[:600]  # the same text, windows and stride (default 128)
    float32 = perplexity(smollm2_eval, ids, stride=128)["perplexity"]
    print(f"perplexity: float32 {float32:.4f}, int8 {int8['perplexity']['perplexity']:.4f}")
    # Measured +0.79 % here (+0.27 % on 2048 tokens in one window); a broken layer or scale gives +100 % and more.
    assert int8["perplexity"]["perplexity"] == pytest.approx(float32, rel=0.02)


# ---- 2. the lm-eval model ---------------------------------------------------------------------------------

PAIRS = [  # (context, continuation): word-boundary spaces belong to the continuation, as lm-eval asks
    ("The capital of France is", " Paris"),
    ("Question: What is the capital of Japan?\nAnswer:", " Tokyo"),
    ("def add(a, b):\n", "    return a + b"),
    ("I like to eat apples and", " bananas because they are sweet and cheap."),
    ("The capital of Italy is ", "Rome"),  # a trailing space moves into the continuation
    ("", "Hello world"),  # no context: the prefix token (BOS) stands in
]


@pytest.mark.slow
def test_loglikelihoods_match_transformers(smollm2_eval, hf_smollm2):
    from lm_eval.api.instance import Instance
    lm = harness_model(smollm2_eval)
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(PAIRS)]
    ours = lm.loglikelihood(requests)  # batches of 4 rows of different lengths: right padding
    tokenizer = smollm2_eval.tokenizer
    for (context, continuation), (logprob, greedy) in zip(PAIRS, ours):
        if context:
            tokens = tokenizer.encode(context + continuation)
            n_scored = len(tokens) - len(tokenizer.encode(context.rstrip()))
        else:
            tokens = [tokenizer.bos_id] + tokenizer.encode(continuation)
            n_scored = len(tokens) - 1
        expected, expected_greedy = hf_logprob(hf_smollm2, tokens, n_scored)
        print(f"{context!r:55} {continuation!r:45} ours {logprob:9.4f} transformers {expected:9.4f}")
        assert logprob == pytest.approx(expected, abs=1e-3)
        assert greedy == expected_greedy
    assert ours[0][1], "' Paris' after 'The capital of France is' is the greedy continuation"


@pytest.mark.slow
def test_capitals_task_runs_through_eval_py_clearly_above_chance(offline_hub, smollm2_checkpoint, tmp_path,
                                                                 monkeypatch, capsys):
    """lm-eval reads the task's questions from tests/data/capitals.jsonl (its own `json` dataset loader, offline),
    asks our model for the loglikelihood of each choice and scores the answers."""
    monkeypatch.chdir(ROOT)  # the task's data_files path is relative to the repository root
    eval_main(["--checkpoint_path", smollm2_checkpoint, "--tasks", "capitals", "--include_path", "tests/data",
               "--batch_size", 16, "--device", "cpu", "--output", tmp_path / "out.json"])
    stdout = capsys.readouterr().out
    assert "capitals" in stdout and "acc" in stdout  # lm-eval's results table
    report = json.loads((tmp_path / "out.json").read_text())
    assert "perplexity" not in report  # with --tasks, perplexity only runs when --text_file asks for it
    capitals = report["tasks"]["results"]["capitals"]
    print(f"capitals: acc {capitals['acc,none']:.3f} acc_norm {capitals['acc_norm,none']:.3f} "
          f"over {capitals['sample_len']} questions, chance {1 / CAPITALS_CHOICES:.2f}")
    assert capitals["sample_len"] == len((DATA / "capitals.jsonl").read_text().splitlines())
    # Measured 0.630 (29 of 46); chance is 0.25. A model that ignored the question would sit near chance.
    assert capitals["acc,none"] >= 1 / CAPITALS_CHOICES + 0.25


@pytest.mark.slow
def test_loglikelihood_rolling_scores_every_token_of_a_long_text(smollm2_eval, hf_smollm2):
    """Longer than max_seq_length (256), so the text is cut into windows; the first token follows the prefix."""
    from lm_eval.api.instance import Instance
    import pydoc_data.topics
    text = pydoc_data.topics.topics["assert"][:1500]
    [ours] = harness_model(smollm2_eval).loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    tokenizer = smollm2_eval.tokenizer
    tokens = [tokenizer.bos_id] + tokenizer.encode(text)
    assert len(tokens) > 256 + 1
    windows = rolling_windows(len(tokens), 256, 256)
    expected = sum(hf_logprob(hf_smollm2, tokens[start:end], n)[0] for start, end, n in windows)
    assert ours == pytest.approx(expected, abs=1e-3 * len(windows))


# ---- 3. generate_until ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_generate_until_stops_at_the_requested_stop_strings(smollm2_eval):
    from lm_eval.api.instance import Instance
    tokenizer = smollm2_eval.tokenizer
    decode_steps = 0
    decode_fn = smollm2_eval.decode_fn

    def counting_decode(*args):
        nonlocal decode_steps
        decode_steps += 1
        return decode_fn(*args)

    def greedy_alone(prompt: str, max_new: int) -> str:
        ids = tokenizer.encode(prompt)
        smollm2_eval.fit_cache(len(ids) + max_new)
        return tokenizer.decode(generate(smollm2_eval.model, [ids], max_new, Sampling(temperature=0),
                                         tokenizer.eos_ids).tokens[0])

    # Greedy, alone: " Paris.\n\nThe answer..." / " a single, unyielding thread.\n..." / " Madrid.\n\nThe Spanish..."
    prompts = ["The capital of France is", "Water is made of", "The capital of Spain is"]
    # "ing thr" starts inside one token and ends inside another: stops are matched on the decoded text.
    # 16 new tokens reach both stop strings (" thread" is the 7th); each one is a decode step of every row.
    stops, max_new = ["\n", "ing thr"], 16
    requests = [Instance("generate_until", {}, (p, {"until": stops, "max_gen_toks": max_new}), i)
                for i, p in enumerate(prompts)]
    requests.append(Instance("generate_until", {}, (prompts[0], {"until": ["never appears"], "max_gen_toks": 6}), 3))
    smollm2_eval.decode_fn = counting_decode
    try:
        outputs = harness_model(smollm2_eval).generate_until(requests)  # one batch per set of kwargs
    finally:
        smollm2_eval.decode_fn = decode_fn
    stopped_by = set()
    for prompt, output in zip(prompts, outputs):
        alone = greedy_alone(prompt, max_new)
        print(f"{prompt!r}: {output!r} (alone: {alone!r})")
        cut = min(alone.index(s) for s in stops if s in alone)
        assert output == alone[:cut] and output.strip()  # cut right before the first stop string
        stopped_by |= {s for s in stops if alone[cut:].startswith(s)}
    assert stopped_by == set(stops) and "Paris" in outputs[0]
    assert outputs[3] == greedy_alone(prompts[0], 6)  # no stop string: all max_gen_toks tokens
    # The first batch ended once every row had a stop string, long before its max_new tokens (the steps of the
    # second batch, 5, are counted too).
    assert decode_steps < max_new - 1


@pytest.mark.slow
def test_generate_until_ignores_empty_stop_strings_and_hugging_faces_top_k_zero(smollm2_eval):
    # Task configs write `until: [""]` or `top_k: 0` (Hugging Face's "no top-k"): neither may end or break generation.
    from lm_eval.api.instance import Instance
    prompt = "The capital of France is"
    with_empty, without = ([Instance("generate_until", {}, (prompt, {"until": until, "max_gen_toks": 8}), 0)]
                           for until in (["", "\n"], ["\n"]))
    sampled = [Instance("generate_until", {}, (prompt, {"until": [], "max_gen_toks": 8, "do_sample": True,
                                                        "temperature": 0.5, "top_k": 0}), 0)]
    model = harness_model(smollm2_eval)
    answer = model.generate_until(without)[0]
    assert len(answer) > len(" Paris") and model.generate_until(with_empty)[0] == answer  # not cut after one token
    assert model.generate_until(sampled)[0].strip()


# ---- 4. bad input -----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_bad_input_gives_one_error_line(offline_hub, smollm2_checkpoint, tmp_path, monkeypatch, capsys):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "text.txt").write_text("The capital of France is Paris. " * 20)
    (tmp_path / "tasks").mkdir()
    # a task of the user's own, its data, and results of an earlier run beside them
    (tmp_path / "tasks" / "my_task.yaml").write_text((DATA / "capitals.yaml").read_text().replace(
        "tests/data/capitals.jsonl", str(tmp_path / "tasks" / "data.jsonl")).replace("task: capitals", "task: my_task"))
    shutil.copy(DATA / "capitals.jsonl", tmp_path / "tasks" / "data.jsonl")
    inputs = {p.name: p.read_text() for p in (tmp_path / "tasks").iterdir()}
    (tmp_path / "tasks" / "results.json").write_text("{}")
    cases = [
        (["--text_file", tmp_path / "nowhere.txt"], ["--text_file", "not found"]),
        (["--text_file", tmp_path / "empty.txt"], ["--text_file", "empty"]),
        (["--text_file", tmp_path / "latin1.txt"], ["not UTF-8"]),
        (["--stride", 600, "--max_seq_length", 512], ["--stride"]),
        (["--max_seq_length", 100000], ["--max_seq_length", "8192"]),
        (["--output", tmp_path / "no/such/out.json"], ["--output", "does not exist"]),
        (["--output", smollm2_checkpoint / "config.json"], ["--output", "checkpoint"]),
        (["--text_file", tmp_path / "text.txt", "--output", tmp_path / "text.txt"],
         ["--output", "another file of this run"]),
        (["--tasks", tmp_path / "tasks" / "my_task.yaml", "--output", tmp_path / "tasks" / "my_task.yaml"],
         ["--output", "another file of this run"]),
        (["--tasks", "my_task", "--include_path", tmp_path / "tasks", "--output", tmp_path / "tasks" / "data.jsonl"],
         ["--output", "is a task file of --include_path", "or data one names"]),
        (["--max_seq_length", 0], ["--max_seq_length"]),  # not the default
        (["--max_seq_length", 8, "--stride", 0], ["--stride"]),
        (["--limit", 1], ["--limit 1"]),  # the text has tokens enough: the limit leaves one
        (["--limit", 20, "--batch_size", 10**8], ["KV cache", "memory"]),
        # tests/data: the folder the capitals test reads, so that lm-eval's index of it is made once
        (["--tasks", "no_such_task_xyz", "--include_path", "tests/data"], ["unknown task", "no_such_task_xyz"]),
        (["--tasks", "capitals_missing", "--include_path", "tests/data"], ["cannot load task capitals_missing"]),
    ]
    monkeypatch.chdir(ROOT)
    for args, words in cases:  # in this process; the command line's own error line: the test below
        main_error(main, ["--checkpoint_path", smollm2_checkpoint, "--device", "cpu", *args], capsys, *words)
    assert {name: (tmp_path / "tasks" / name).read_text() for name in inputs} == inputs


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random model with a word-level tokenizer (tests/test_generate.py's), 32 tokens of context."""
    from test_generate import save_tiny_checkpoint
    return save_tiny_checkpoint(tmp_path_factory.mktemp("eval") / "tiny", block_size=32)


@pytest.mark.parametrize("args, words", [
    (["--num_fewshot", -1], ["--num_fewshot must be >= 0", "got -1"]),
    (["--include_path", "{tmp}/no_such_tasks"], ["--include_path", "no_such_tasks", "does not exist"]),
], ids=["negative-fewshot", "missing-include-path"])
def test_bad_task_flags_give_one_error_line(args, words, tiny_checkpoint, tmp_path, capsys):
    """Refused with the other flags' checks, before the model loads or lm-eval indexes its tasks."""
    argv = ["--checkpoint_path", tiny_checkpoint, "--device", "cpu", "--tasks", "capitals",
            *[str(a).format(tmp=tmp_path) for a in args]]
    main_error(main, argv, capsys, *words)


def test_a_task_that_two_named_groups_or_tasks_both_hold_is_one_error_line(offline_hub, smollm2_checkpoint,
                                                                          tmp_path, monkeypatch, capsys):
    """lm-eval refuses a task reached from two names only once it runs, after the weights load: here
    it is refused with the other task errors."""
    (tmp_path / "capitals_group.yaml").write_text("group: capitals_group\ntask: [capitals]\n")
    monkeypatch.chdir(ROOT)
    argv = ["--checkpoint_path", smollm2_checkpoint, "--device", "cpu", "--include_path", "tests/data",
            "--include_path", tmp_path, "--tasks", "capitals_group", "capitals"]
    main_error(main, argv, capsys, "capitals_group and capitals both hold task capitals", "name it once")


def test_a_byte_order_mark_is_not_text_to_score(tiny_checkpoint, tmp_path, capsys):
    """A UTF-8 file that begins with a byte-order mark scores as the same file without one, and a
    mark alone is an empty file."""
    def measured(text: str) -> dict:
        path = tmp_path / "text.txt"
        path.write_bytes(text.encode("utf-8"))
        main(["--checkpoint_path", str(tiny_checkpoint), "--device", "cpu", "--text_file", str(path),
              "--output", str(tmp_path / "out.json")])
        result = json.loads((tmp_path / "out.json").read_text())["perplexity"]
        return {key: value for key, value in result.items() if key != "seconds"}
    plain = measured("w1 w2 w3 w4 w5")
    assert measured("\ufeffw1 w2 w3 w4 w5") == plain
    (tmp_path / "mark.txt").write_bytes("\ufeff".encode("utf-8"))
    main_error(main, ["--checkpoint_path", tiny_checkpoint, "--device", "cpu", "--text_file", tmp_path / "mark.txt"],
               capsys, "--text_file", "empty")


def test_perplexity_reads_text_from_a_pipe(tiny_checkpoint, tmp_path, capsys):
    """A pipe (`--text_file <(...)`, /dev/stdin) is no regular file, but it reads as one."""
    fifo = tmp_path / "text"
    os.mkfifo(fifo)
    writer = subprocess.Popen(["sh", "-c", f"echo w1 w2 w3 w4 w5 > {fifo}"])
    try:
        main(["--checkpoint_path", str(tiny_checkpoint), "--device", "cpu", "--text_file", str(fifo)])
    finally:  # a writer whose pipe is never opened would wait for ever
        writer.kill()
        writer.wait()
    assert "perplexity" in capsys.readouterr().out


def test_results_of_an_earlier_run_under_include_path_may_be_written_again(tiny_checkpoint, tmp_path):
    """--output among the task files is refused only over a task file or data one names."""
    from eval import check_args, parse_args
    (tmp_path / "my_task.yaml").write_text("task: my_task\ndataset_kwargs: {data_files: {test: data.jsonl}}\n")

    def check(output: str):
        (tmp_path / output).write_text("{}")
        check_args(parse_args(["--checkpoint_path", str(tiny_checkpoint), "--tasks", "my_task", "--include_path",
                               str(tmp_path), "--output", str(tmp_path / output), "--device", "cpu"]), 32)
    check("results.json")  # no InputError
    check("data.json")  # a part of the data's name, not the name
    with pytest.raises(InputError, match="data one names"):
        check("data.jsonl")
    from eval import names_file  # a name whole, alone or at a path's end; not inside a longer one
    assert names_file("{test: data.jsonl}", "data.jsonl") and names_file("test: /x/data.jsonl", "data.jsonl")
    assert not any(names_file(f"test: {other}", "data.jsonl") for other in ("my_data.jsonl", "data.jsonl.gz"))


@pytest.mark.parametrize("args, words", [
    (["--num_fewshot", 3], ["--num_fewshot only sets up --tasks"]),
    (["--include_path", "{tmp}", "--download"], ["--include_path, --download only set up --tasks"]),
    (["--tasks", "capitals", "--stride", 4], ["--stride sets up the perplexity"]),
    (["--tasks", "capitals", "--text_file", "{tmp}/text", "--limit", 2], ["--limit counts", "run them apart"]),
], ids=["fewshot", "include-path-and-download", "stride-without-a-text", "limit-for-a-text-and-tasks"])
def test_flags_the_run_would_ignore_are_refused(args, words, tiny_checkpoint, tmp_path, capsys):
    argv = ["--checkpoint_path", tiny_checkpoint, "--device", "cpu", *[str(a).format(tmp=tmp_path) for a in args]]
    main_error(main, argv, capsys, *words)


def checked(tmp_path, *flags, block_size: int = 32):
    args = parse_args(["--checkpoint_path", str(tmp_path), "--device", "cpu", *map(str, flags)])
    check_args(args, block_size)
    return args


def test_max_seq_length_defaults_to_the_models_context_at_most_2048(tmp_path):
    assert checked(tmp_path, block_size=8192).max_seq_length == 2048
    assert checked(tmp_path, block_size=32).max_seq_length == 32


def test_a_max_seq_length_of_one_is_refused(tmp_path):
    assert checked(tmp_path, "--max_seq_length", 2).max_seq_length == 2
    with pytest.raises(InputError, match="--max_seq_length must be in 2..32"):
        checked(tmp_path, "--max_seq_length", 1)


def test_the_stride_defaults_to_half_the_window(tmp_path):
    assert checked(tmp_path, "--max_seq_length", 32).stride == 16
    assert checked(tmp_path, "--max_seq_length", 3).stride == 1


def test_with_tasks_and_a_text_file_the_perplexity_still_gets_its_default_stride(tmp_path):
    args = checked(tmp_path, "--tasks", "capitals", "--text_file", tmp_path / "text.txt", "--max_seq_length", 32)
    assert args.stride == 16


def test_a_stride_of_the_whole_window_is_allowed(tmp_path):
    assert checked(tmp_path, "--max_seq_length", 32, "--stride", 32).stride == 32
    with pytest.raises(InputError, match="--stride must be in 1..32"):
        checked(tmp_path, "--max_seq_length", 32, "--stride", 33)


@pytest.mark.parametrize("flag", ["--batch_size", "--limit"])
def test_a_batch_size_or_limit_of_zero_is_refused(tmp_path, flag):
    with pytest.raises(InputError, match=f"{flag} must be >= 1, got 0"):
        checked(tmp_path, flag, 0)


def test_a_task_continuation_longer_than_the_window_is_one_input_error(tiny_checkpoint):
    """A continuation is scored whole in one window: one that does not fit --max_seq_length is the task's
    error (one line), not a silently shortened score."""
    ckpt = read_checkpoint(tiny_checkpoint)
    model = EvalModel(load_model(ckpt, dtype=torch.float32), load_tokenizer(ckpt.folder), max_seq_length=8,
                      batch_size=1)
    assert len(model.loglikelihood([("w1 w2", " w3" * 8)], progress=False)) == 1  # 8 tokens fit
    with pytest.raises(InputError) as e:
        model.loglikelihood([("w1 w2", " w3" * 9)], progress=False)
    assert_one_error_line(f"error: {e.value}", "continuation of 9 tokens", "--max_seq_length 8")


@pytest.fixture
def tiny_with_smollm2s_tokenizer(tiny_checkpoint, smollm2_checkpoint, tmp_path) -> Path:
    """The tiny model (a vocabulary of a few dozen words) with SmolLM2's tokenizer, ids up to 49151."""
    folder = Path(shutil.copytree(tiny_checkpoint, tmp_path / "tiny"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_checkpoint / name, folder / name)
    return folder


def test_a_task_whose_text_is_beyond_the_models_vocabulary_is_one_error_line(offline_hub,
                                                                             tiny_with_smollm2s_tokenizer,
                                                                             monkeypatch, capsys):
    """Found once the model is loaded and the task's requests encoded (the loading line comes first)."""
    monkeypatch.chdir(ROOT)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in ["--checkpoint_path", tiny_with_smollm2s_tokenizer, "--device", "cpu",
                               "--tasks", "capitals", "--include_path", "tests/data", "--limit", 2]])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "Traceback" not in err, err
    assert_one_error_line(err.strip().splitlines()[-1], "the tokenizer gives id", "not this model's")


def test_generate_until_refuses_prompts_beyond_the_vocabulary_and_max_gen_toks_below_one(
        tiny_checkpoint, tiny_with_smollm2s_tokenizer):
    from lm_eval.api.instance import Instance

    def generate_until(folder: Path, prompt: str, max_gen_toks: int) -> list:
        ckpt = read_checkpoint(folder)
        em = EvalModel(load_model(ckpt, dtype=torch.float32), load_tokenizer(folder), max_seq_length=16,
                       batch_size=1)
        request = Instance("generate_until", {}, (prompt, {"until": [], "max_gen_toks": max_gen_toks}), 0)
        return harness_model(em).generate_until([request])

    assert len(generate_until(tiny_checkpoint, "w1 w2", 1)) == 1  # the smallest request that runs
    for folder, max_gen_toks, words in [(tiny_checkpoint, 0, ["max_gen_toks 0", "at least 1"]),
                                        (tiny_with_smollm2s_tokenizer, 4, ["the tokenizer gives id"])]:
        with pytest.raises(InputError) as e:
            generate_until(folder, "The capital of France is", max_gen_toks)
        assert_one_error_line(f"error: {e.value}", *words)


def test_missing_lm_eval_gives_one_error_line(smollm2_checkpoint, tmp_path):
    blocked = tmp_path / "lm_eval"  # found first on PYTHONPATH: lm_eval as if it were not installed
    blocked.mkdir()
    (blocked / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'lm_eval'\", name='lm_eval')\n")
    r = run_script("eval.py", "--checkpoint_path", smollm2_checkpoint, "--tasks", "hellaswag",
                   env={"PYTHONPATH": str(tmp_path)})
    assert r.returncode == 1
    assert_one_error_line(r.stderr, "pip install lm_eval")


def capitals_reading(tmp_path, data):
    """lm-eval's index of one task: tests/data/capitals.yaml reading a data file of these bytes (None: no file)."""
    from lm_eval.tasks import TaskManager
    if data is not None:
        (tmp_path / "data.jsonl").write_bytes(data)
    task = (DATA / "capitals.yaml").read_text().replace("tests/data/capitals.jsonl", str(tmp_path / "data.jsonl"))
    (tmp_path / "capitals.yaml").write_text(task)
    return TaskManager(include_path=[str(tmp_path)], include_defaults=False)


@pytest.mark.parametrize("data", [None, b'{"country": "France", "choices": [\n',
                                  '{"country": "caf\xe9"}\n'.encode("latin-1")],
                         ids=["missing", "not-json", "not-utf8"])
def test_task_data_that_is_missing_or_does_not_parse_is_an_input_error(offline_hub, tmp_path, data):
    with pytest.raises(InputError, match="cannot load task capitals") as e:
        load_tasks(capitals_reading(tmp_path, data), ["capitals"])
    assert str(e.value).endswith("(data is read from local files and the Hugging Face cache; "
                                 "--download allows the hub)")


def test_task_data_missing_by_a_relative_path_names_the_folder_it_was_looked_for_in(offline_hub, tmp_path,
                                                                                    monkeypatch):
    """capitals.yaml's data_files is relative (tests/data/capitals.jsonl): run from another folder, the
    error says where such paths start."""
    from lm_eval.tasks import TaskManager
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "capitals.yaml").write_text((DATA / "capitals.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="cannot load task capitals") as e:
        load_tasks(TaskManager(include_path=[str(tmp_path / "tasks")], include_defaults=False), ["capitals"])
    assert str(e.value).endswith(f"; relative data_files paths in a task file start from the folder eval.py "
                                 f"runs in, {tmp_path})")


def test_task_data_missing_with_download_given_does_not_suggest_download(offline_hub, tmp_path):
    with pytest.raises(InputError, match="cannot load task capitals") as e:
        load_tasks(capitals_reading(tmp_path, None), ["capitals"], download=True)
    assert str(e.value).endswith("(data is read from local files, the Hugging Face cache and, with "
                                 "--download, the hub)")


def test_a_task_file_naming_a_split_its_data_lacks_is_an_input_error(tmp_path):
    task_manager = capitals_reading(tmp_path, (DATA / "capitals.jsonl").read_bytes())
    task = (tmp_path / "capitals.yaml").read_text()
    (tmp_path / "capitals.yaml").write_text(task.replace("test_split: test", "test_split: validation"))
    with pytest.raises(InputError, match="cannot load task capitals: its data has no split 'validation'"):
        load_tasks(task_manager, ["capitals"])


def test_a_task_file_that_is_not_yaml_is_named_when_its_task_reads_as_unknown(tmp_path):
    """lm-eval's index passes over a task file that does not parse; the unknown task's error names
    the file and where it breaks, and a file with lm-eval's own !function tag parses."""
    task = (DATA / "capitals.yaml").read_text()
    (tmp_path / "capitals.yaml").write_text(task + "metric_list: [unclosed\n")
    (tmp_path / "fine.yaml").write_text("task: fine\nprocess_docs: !function utils.process\n")
    from lm_eval.tasks import TaskManager
    task_manager = TaskManager(include_path=[str(tmp_path)], include_defaults=False)
    with pytest.raises(InputError) as e:
        load_tasks(task_manager, ["capitals"], [tmp_path])
    lines = len(task.splitlines()) + 2
    assert str(e.value).endswith(f"; {tmp_path / 'capitals.yaml'} does not parse: line {lines}: "
                                 "expected ',' or ']', but got '<stream end>'"), e.value
    assert "fine.yaml" not in str(e.value)


def test_more_few_shot_examples_than_the_task_holds_ends_in_one_error_line(smollm2_checkpoint, monkeypatch,
                                                                            capsys):
    """lm-eval draws the examples once the model is loaded (so its loading line comes first): exit
    status 1 after an `error:` line, no traceback."""
    monkeypatch.chdir(ROOT)  # capitals.yaml's data file is relative to the repository
    n = len((DATA / "capitals.jsonl").read_text().splitlines())
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in ["--checkpoint_path", smollm2_checkpoint, "--tasks", "capitals",
                               "--include_path", "tests/data", "--limit", 1, "--num_fewshot", n + 1]])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == (f"error: --tasks: a task has fewer examples to draw than "
                                            f"--num_fewshot {n + 1} asks for")


def test_a_bug_inside_lm_evals_task_loader_keeps_its_traceback(tmp_path, monkeypatch):
    task_manager = capitals_reading(tmp_path, (DATA / "capitals.jsonl").read_bytes())

    def broken(*args, **kwargs):
        raise TypeError("a bug inside lm_eval")
    monkeypatch.setattr(task_manager, "load", broken)
    with pytest.raises(TypeError, match="a bug inside lm_eval"):
        load_tasks(task_manager, ["capitals"])
