"""Speculative decoding (generate.py): the prompt-lookup proposer, the acceptance rule, the draft's cache kept in
step with the target's, greedy output identical to the target's own on the real SmolLM2-135M (int8 and int4 drafts
of itself, prompt lookup), sampled tokens that follow the target's distribution (a chi-squared test against exact
probabilities), the compiled functions, and the command line with its errors."""
import argparse
import copy
import json

import pytest
import torch

import quantize
from conftest import QUIET, as_run, assert_one_error_line, load_script, main_error, run_script
from checkpoint import InputError, load_model, read_checkpoint, save_checkpoint
from generate import main as generate_main
from generate import (DraftModel, PromptLookup, Sampling, accept_drafts, compile_verify,
                      describe_speculation, draft_one_token, generate, load_proposer, prefill,
                      speculation_metrics, speculative_generate, verify)
from model import ModelArgs, Transformer
from tokenizer import load_tokenizer

GREEDY = Sampling(temperature=0)
RANDOM = Sampling(temperature=1.0, top_k=None)
QUESTION = "What is the capital of France?"


pytestmark = pytest.mark.usefixtures("one_thread")  # many small forwards


def peaked_model(seed: int, vocab_size: int = 16, sharpness: float = 6.0) -> Transformer:
    """A tiny random model whose next-token distributions are far from uniform and depend on the context
    (plain 0.02-std weights give near-uniform ones, under which any draft looks good)."""
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(dim=32, n_layer=2, n_head=4, n_kv_heads=2, vocab_size=vocab_size,
                                  intermediate_size=64, block_size=64))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 1.0 if "norm" in name else 0.1)
        model.output.weight.mul_(sharpness)
    return model.eval()


def noisy_copy(model: Transformer, noise: float, overconfidence: float = 1.0) -> Transformer:
    """A draft that agrees with the target some of the time: its weights plus noise, its logits scaled up."""
    torch.manual_seed(5)
    draft = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in draft.named_parameters():
            if "norm" not in name:
                p.add_(torch.randn_like(p) * noise)
        draft.output.weight.mul_(overconfidence)
    return draft


def greedy(model: Transformer, prompt: list, max_new_tokens: int, eos_ids=()) -> list:
    model.setup_caches(1, len(prompt) + max_new_tokens)
    return generate(model, [prompt], max_new_tokens, GREEDY, eos_ids).tokens[0]


def speculate(target: Transformer, proposer, prompt: list, max_new_tokens: int, sampling=GREEDY, eos_ids=(), **fns):
    """speculative_generate with both caches sized as generate.py sizes them."""
    length = len(prompt) + max_new_tokens + proposer.k - 1
    target.setup_caches(1, length)
    if isinstance(proposer, DraftModel):
        proposer.model.setup_caches(1, length)
    return speculative_generate(target, proposer, [prompt], max_new_tokens, sampling, eos_ids,
                                **fns)


def ended_mid_round(gen) -> bool:
    """Did the last round produce tokens past the end (an end-of-sequence token or max_new_tokens)?"""
    produced = 1 + sum((n + 1) * count for n, count in enumerate(gen.accepted_lengths))  # 1: the prefill's token
    return produced > gen.generated


# ---- the pieces ---------------------------------------------------------------------------------------------

def test_prompt_lookup_copies_what_followed_the_latest_earlier_occurrence():
    lookup = PromptLookup(n=2, k=3, vocab_size=100, device=torch.device("cpu"))
    lookup.prefill()
    history = [1, 2, 3, 4, 9, 2, 3, 5, 6, 7, 8, 2, 3]
    assert lookup.lookup(history) == [5, 6, 7]  # (2, 3) also occurs at 1, followed by 4: the latest wins
    history += [5, 6]
    assert lookup.lookup(history) == [7, 8, 2]  # the index grows with the history
    history += [0, 0, 1]
    assert lookup.lookup(history) == [1, 1, 1]  # (0, 1) never occurred before: the last token, k times
    # A repeat that runs into the end of the history continues with what it has repeated so far.
    lookup.prefill()
    assert lookup.lookup([7, 1, 2, 1, 2]) == [1, 2, 1]
    lookup.prefill()
    assert lookup.lookup([4]) == [4, 4, 4]  # shorter than n
    lookup.prefill()
    assert lookup.lookup([1, 2, 3, 1, 2]) == [3, 1, 2]  # (1, 2) at the history's very start
    # the n-gram that ended the history at one lookup is indexed once a token follows it
    lookup = PromptLookup(n=2, k=2, vocab_size=100, device=torch.device("cpu"))
    lookup.prefill()
    history = [3, 4, 7, 3, 4]
    assert lookup.lookup(history) == [7, 3]
    history += [8, 3, 4]
    assert lookup.lookup(history) == [8, 3]  # (3, 4) at 3, followed by 8: the latest


def test_speculation_refuses_a_cache_without_room_for_a_rounds_k_minus_1_extra_slots():
    target = peaked_model(seed=0, vocab_size=97)
    prompt, new, k = [5, 6, 7], 13, 4
    target.setup_caches(1, len(prompt) + new)  # 16 slots (a multiple of 8): no slack for the drafts
    with pytest.raises(AssertionError, match="a round writes k slots ahead"):
        speculative_generate(target, PromptLookup(2, k, 97, torch.device("cpu")), [prompt], new,
                             Sampling(temperature=0))


def test_accept_drafts_keeps_the_agreeing_prefix_then_takes_the_targets_token():
    vocab = 10
    one_hot = lambda ids: torch.nn.functional.one_hot(torch.tensor(ids), vocab).float()
    drafts = torch.tensor([3, 5, 7])
    n, new = accept_drafts(drafts, one_hot([3, 5, 7]), one_hot([3, 5, 2, 9]))  # greedy target: 3, 5, then 2
    assert n.item() == 2 and new[:3].tolist() == [3, 5, 2]
    n, new = accept_drafts(drafts, one_hot([3, 5, 7]), one_hot([3, 5, 7, 9]))  # all kept: the bonus token 9
    assert n.item() == 3 and new.tolist() == [3, 5, 7, 9]
    n, new = accept_drafts(drafts, one_hot([3, 5, 7]), one_hot([1, 5, 7, 9]))
    assert n.item() == 0 and new[0].item() == 1
    # A token the target gives no probability is never kept, however sure the draft is.
    target = torch.full((4, vocab), 1 / (vocab - 1)).index_fill_(1, torch.tensor([3]), 0.0)
    for _ in range(200):
        n, new = accept_drafts(drafts, one_hot([3, 5, 7]), target)
        assert n.item() == 0 and new[0].item() != 3


def test_a_rejection_with_nothing_left_over_draws_from_the_target(monkeypatch):
    """A target equal to the draft but for rounding (no token more likely under it) rarely rejects a
    draft; when it does, max(0, p - q) is all zeros, and the token comes from the target itself,
    never one the target rules out. The uniform draws are pinned at their largest value, so the draft
    is rejected and the race's noise is the same for every token."""
    monkeypatch.setattr(torch, "rand_like", lambda t: torch.full_like(t, 1 - 2**-24))
    draft = torch.tensor([[0.0, 0.0, 1.0]])  # the draft was sure of token 2
    target = torch.tensor([[0.0, 0.0, 1.0 - 2**-20], [0.0, 1.0, 0.0]])
    n, new = accept_drafts(torch.tensor([2]), draft, target)
    assert n.item() == 0 and new[0].item() == 2


@pytest.mark.parametrize("sampling", [GREEDY, RANDOM], ids=["greedy", "temperature-1"])
def test_a_draft_identical_to_the_target_is_always_accepted(sampling):
    """p = q at every position only if the draft's cache holds exactly the target's tokens: also after the rounds
    that keep all k drafts, whose last draft the draft model has to be fed separately."""
    target = peaked_model(seed=0, vocab_size=97)
    torch.manual_seed(1)
    gen = speculate(target, DraftModel(copy.deepcopy(target), k=4, sampling=sampling), [5, 6, 7], 30, sampling)
    assert len(gen.tokens[0]) == 30
    assert speculation_metrics(gen.accepted_lengths, 29)["acceptance_rate"] == 1.0, gen.accepted_lengths


def test_generation_ends_mid_round_at_max_new_tokens_and_at_an_end_of_sequence_token():
    """A draft identical to the target has every round keep all k = 4 drafts: 5 tokens a round after the prefill's
    one. So 8 tokens end 2 tokens into round 2, and an end-of-sequence token at index 1 to 4 ends round 1 early."""
    target, prompt = peaked_model(seed=0, vocab_size=97), [5, 6, 7]
    plain = greedy(target, prompt, 12)
    gen = speculate(target, DraftModel(copy.deepcopy(target), k=4, sampling=GREEDY), prompt, 8)
    assert gen.tokens[0] == plain[:8] and gen.generated == 8 and gen.accepted_lengths == [0, 0, 0, 0, 2]
    assert ended_mid_round(gen)
    stop = plain.index(plain[3])  # the first index of the token at index 3
    assert 1 <= stop <= 4, f"{plain}: pick another token to end on"
    gen = speculate(target, DraftModel(copy.deepcopy(target), k=4, sampling=GREEDY), prompt, 12, eos_ids=[plain[stop]])
    assert gen.tokens[0] == plain[:stop] and gen.generated == stop + 1 and gen.accepted_lengths == [0, 0, 0, 0, 1]
    assert ended_mid_round(gen)


def test_one_new_token_is_the_prefills_and_none_is_a_callers_error():
    target, prompt = peaked_model(seed=0, vocab_size=97), [5, 6, 7]
    gen = speculate(target, DraftModel(copy.deepcopy(target), k=4, sampling=GREEDY), prompt, 1)
    assert gen.tokens[0] == greedy(target, prompt, 1) and gen.generated == 1
    with pytest.raises(AssertionError, match="max_new_tokens must be at least 1"):
        greedy(target, prompt, 0)
    with pytest.raises(AssertionError, match="max_new_tokens must be at least 1"):
        speculate(target, DraftModel(copy.deepcopy(target), k=4, sampling=GREEDY), prompt, 0)


@pytest.mark.slow
def test_compiled_speculation_matches_eager_and_plain_greedy(tmp_path):
    """generate.py --compile's speculation: the draft step that load_proposer compiles, and
    compile_verify()."""
    target = peaked_model(seed=0, vocab_size=97)
    draft = noisy_copy(target, noise=0.01)
    prompt, k = [5, 6, 7], 3
    save_checkpoint(tmp_path / "draft", draft.args, draft.state_dict(), force=True)
    flags = argparse.Namespace(speculate_ngram=None, speculate_k=k, compile=True,
                               draft_checkpoint_path=tmp_path / "draft", dtype=torch.float32)
    compiled_draft = load_proposer(flags, target.args, torch.device("cpu"), GREEDY, prefill,
                                   cache_length=len(prompt) + 20 + k - 1)
    assert isinstance(compiled_draft, DraftModel) and compiled_draft.k == k
    assert compiled_draft.step_fn is not draft_one_token  # compiled, as --compile asks
    verify_fn = compile_verify()
    assert verify_fn is not verify
    plain = greedy(target, prompt, 20)
    eager = speculate(target, DraftModel(draft, k, GREEDY), prompt, 20)
    compiled = speculate(target, compiled_draft, prompt, 20, verify_fn=verify_fn)
    assert compiled.tokens[0] == eager.tokens[0] == plain
    assert compiled.accepted_lengths == eager.accepted_lengths
    assert 0 < sum(eager.accepted_lengths[1:]) and eager.accepted_lengths[0] > 0  # some rounds kept drafts, some none


# ---- 1. greedy: token for token the target's own output, on the real model --------------------------------

MAX_NEW = 16
PROMPTS = {
    "chat-eos": dict(chat=QUESTION),  # "The capital of France is Paris." and its end-of-sequence token
    "story": dict(text="Once upon a time, in a village by the sea,"),
    "repeat": dict(text="Repeat the following text: the cat sat on the mat, the dog sat on the log, the bird sat "
                        "on the wire. Text: the cat sat on the mat, the dog"),
}


@pytest.fixture(scope="module")
def smollm2(smollm2_checkpoint, tmp_path_factory):
    """The model, its tokenizer, the prompts with the model's own greedy answers, and int8 and int4 drafts of it
    written by quantize.py's command line."""
    folder = tmp_path_factory.mktemp("speculative") / "SmolLM2"  # links to the shared fixture's files
    folder.mkdir()
    for source in smollm2_checkpoint.iterdir():
        (folder / source.name).symlink_to(source)
    quantize.main(["--checkpoint_path", str(folder / "model.safetensors"), "--mode", "int8"])
    quantize.main(["--checkpoint_path", str(folder / "model.safetensors"), "--mode", "int4", "--groupsize", "128"])
    model = load_model(read_checkpoint(folder), dtype=torch.float32)
    tokenizer = load_tokenizer(folder)
    prompts = {name: tokenizer.encode_chat([{"role": "user", "content": p["chat"]}]) if "chat" in p
               else tokenizer.encode(p["text"]) for name, p in PROMPTS.items()}
    answers = {name: greedy(model, ids, MAX_NEW, tokenizer.eos_ids)
               for name, ids in prompts.items()}
    drafts = {mode: load_model(read_checkpoint(folder / f"model_{mode}.pth"), dtype=torch.float32)
              for mode in ("int8", "int4.g128")}
    return dict(model=model, tokenizer=tokenizer, prompts=prompts, answers=answers, drafts=drafts, folder=folder)


# Each proposer meets each prompt once and each k once (all 27 pairs would take minutes on 2 CPU cores); the int4
# draft, slowest on a CPU, gets its k = 8 on the short answer.
RUNS = {
    "int8": [("chat-eos", 1), ("repeat", 4), ("story", 8)],
    "int4.g128": [("story", 1), ("repeat", 4), ("chat-eos", 8)],
    "prompt-lookup": [("story", 1), ("chat-eos", 4), ("repeat", 8)],
}


@pytest.mark.slow
@pytest.mark.parametrize("proposer", list(RUNS))
def test_speculative_greedy_matches_plain_greedy(proposer, smollm2):
    model, eos_ids, answers = smollm2["model"], smollm2["tokenizer"].eos_ids, smollm2["answers"]
    assert len(answers["chat-eos"]) < MAX_NEW == len(answers["story"]), "one answer should end, one should run on"
    gens = {}
    for name, k in RUNS[proposer]:
        if proposer == "prompt-lookup":
            draft = PromptLookup(n=2, k=k, vocab_size=model.args.vocab_size, device=torch.device("cpu"))
        else:
            draft = DraftModel(smollm2["drafts"][proposer], k, GREEDY)
        gens[name] = speculate(model, draft, smollm2["prompts"][name], MAX_NEW, GREEDY, eos_ids)
        assert gens[name].tokens[0] == answers[name], (name, k)
    assert gens["chat-eos"].generated == len(answers["chat-eos"]) + 1  # stopped at its end-of-sequence token
    rejected = sum(sum(gen.accepted_lengths[:-1]) for gen in gens.values())
    if proposer != "int8":  # int8 agrees with the float model nearly always; these drafts are corrected too
        assert rejected > 0, {name: gen.accepted_lengths for name, gen in gens.items()}
    if proposer == "prompt-lookup":  # the answer copies the prompt: whole rounds of guesses are right
        assert gens["repeat"].accepted_lengths[-1] > 0, gens["repeat"].accepted_lengths


# ---- 2. sampling: the target's distribution exactly -------------------------------------------------------

def target_marginals(model: Transformer, prompt: list, steps: int) -> list:
    """The exact distribution of each of the target's next `steps` tokens at temperature 1, by enumerating every
    continuation: [(vocab,)] * steps."""
    vocab = model.args.vocab_size
    seqs, weights, marginals = torch.tensor([prompt]), torch.ones(1), []  # continuations so far and their probabilities
    for _ in range(steps):
        model.setup_caches(len(seqs), seqs.shape[1])
        with torch.no_grad():
            probs = torch.softmax(model(seqs, torch.arange(seqs.shape[1]))[:, -1].double(), dim=-1)  # (S, vocab)
        joint = weights[:, None] * probs  # (S, vocab)
        marginals.append(joint.sum(0))
        seqs = torch.cat([seqs.repeat_interleave(vocab, 0), torch.arange(vocab).repeat(len(seqs))[:, None]], dim=1)
        weights = joint.reshape(-1)
    return marginals


def chi_squared_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test of observed counts against probabilities; cells expecting < 5 draws are pooled into one."""
    expected = probs * counts.sum()
    small = expected < 5
    observed = torch.cat([counts[~small], counts[small].sum()[None]])
    expected = torch.cat([expected[~small], expected[small].sum()[None]])
    if expected[-1] == 0:
        observed, expected = observed[:-1], expected[:-1]
    statistic = ((observed - expected) ** 2 / expected).sum()
    return torch.special.gammaincc(torch.tensor((len(expected) - 1) / 2), statistic / 2).item()


SAMPLES = 1000


@pytest.mark.slow
@pytest.mark.parametrize("proposer", ["bad-draft", "prompt-lookup"])
def test_speculative_sampling_follows_the_target_distribution(proposer):
    """Tokens 2 to 4 of many samples with speculation (token 1 comes from the prefill): with k = 2 they come from kept
    drafts, from the residual after a rejection at either position, from the bonus token after two kept drafts, and
    from the next round. Their frequencies must match the target's exact marginals. Drawing the token after a
    rejection from p instead of max(0, p - q) fails this test (p = 5e-10 with the draft, 3e-12 with lookup)."""
    target, prompt, k = peaked_model(seed=0), [3, 1, 4, 1, 5, 9, 2, 6, 5, 3], 2  # repeats for prompt lookup to copy
    marginals = target_marginals(target, prompt, steps=4)
    if proposer == "bad-draft":  # noisy and overconfident: most of its guesses are rejected
        draft = DraftModel(noisy_copy(target, noise=0.05, overconfidence=2.0), k, RANDOM)
    else:  # deterministic guesses: a draft distribution with all its mass on one token
        draft = PromptLookup(n=1, k=k, vocab_size=16, device=torch.device("cpu"))
    torch.manual_seed(0)
    counts, kept = torch.zeros(3, 16, dtype=torch.float64), torch.zeros(k + 1)
    for _ in range(SAMPLES):
        gen = speculate(target, draft, prompt, 4, RANDOM)
        counts[torch.arange(3), torch.tensor(gen.tokens[0][1:])] += 1
        kept += torch.tensor(gen.accepted_lengths, dtype=kept.dtype)
    assert kept.min() >= SAMPLES / 50, f"every path (rejection at once, after one draft, bonus) should be common: {kept}"
    for position in range(3):
        p_value = chi_squared_p_value(counts[position], marginals[position + 1])
        assert p_value > 1e-3, f"token {position + 2}: p = {p_value:.2e}, counts {counts[position].tolist()}"


# ---- 3. the command line and the GPU benchmark's code path ---------------------------------------------------

def test_bench_speculative_times_each_step_and_prints_the_expected_speedups(tmp_path, capsys):
    """scripts/bench_speculative.py on a CPU, eager (its timings mean nothing here: the GPU run is the measurement)."""
    bench = load_script("bench_speculative")
    # At a = 0.5, k = 2 a round yields (1 - 0.5^3) / 0.5 = 1.75 tokens and costs one verify + 2 + 0.5^2 draft steps.
    assert bench.expected_speedup(0.5, 2, decode_ms=1.0, verify_ms=1.0, draft_ms=0.0) == pytest.approx(1.75)
    assert bench.expected_speedup(0.5, 2, decode_ms=1.0, verify_ms=1.2, draft_ms=0.1) == pytest.approx(1.75 / 1.425)
    out = tmp_path / "bench.json"
    bench.main(["--device", "cpu", "--eager", "--target", "stories15M", "--drafts", "stories15M:int4.g32", "--ks", "1",
                "2", "--repeats", "2", "--position", "8", "--cache_length", "16", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["precision"], r["step"]) for r in rows] == [  # in the order they were measured
        ("stories15M", "bf16", "decode"), ("stories15M", "bf16", "verify k=1"), ("stories15M", "int4.g32", "draft step"),
        ("stories15M", "bf16", "verify k=2")]
    assert all(r["ms"] > 0 for r in rows)
    printed = capsys.readouterr().out
    assert "| stories15M int4.g32 | 2 |" in printed and "| prompt lookup (no GPU draft) | 2 |" in printed
    assert "not a speed result" in printed


def test_bench_speculative_refuses_to_time_a_cpu_as_a_speed_result(tmp_path):
    bench = load_script("bench_speculative")
    with pytest.raises(InputError, match="--device cpu: the step times are speeds on a CUDA GPU only"):
        bench.main(["--device", "cpu", "--target", "stories15M", "--drafts", "stories15M:bf16", "--ks", "1",
                    "--position", "8", "--cache_length", "16", "--out", str(tmp_path / "b.json")])


@pytest.mark.parametrize("budget", ["-1", "0", "nan", "inf"])
def test_bench_speculative_refuses_a_time_budget_that_is_not_a_positive_number(tmp_path, budget):
    """A budget of -1 (or nan) built every model, measured nothing and wrote no result, exit 0."""
    bench = load_script("bench_speculative")
    with pytest.raises(InputError, match=f"--time_budget_s must be a positive number of seconds, got {budget}"):
        bench.main(["--device", "cpu", "--eager", "--target", "stories15M", "--drafts", "stories15M:bf16", "--ks", "1",
                    "--position", "8", "--cache_length", "16", "--time_budget_s", budget,
                    "--out", str(tmp_path / "b.json")])


@pytest.mark.slow
def test_generate_cli_speculates_with_a_quantized_draft(smollm2, tmp_path):
    metrics = tmp_path / "metrics.json"
    r = run_script("generate.py", "--checkpoint_path", smollm2["folder"], "--draft_checkpoint_path",
                   smollm2["folder"] / "model_int8.pth", "--speculate_k", "4", "--chat", "--prompt", QUESTION,
                   "--temperature", "0", "--max_new_tokens", "16", "--num_samples", "1", "--device", "cpu", "--json", metrics,
                   env=QUIET)
    assert r.returncode == 0, r.stderr[-3000:]
    assert smollm2["tokenizer"].decode(smollm2["answers"]["chat-eos"]) in r.stdout
    assert "drafts a round" in r.stderr and "tokens per target forward" in r.stderr
    sample = json.loads(metrics.read_text())["samples"][0]
    assert sample["decode_tok_s"] > 0 and len(sample["accepted_lengths"]) == 5
    assert 0 < sample["acceptance_rate"] <= 1 and 1 < sample["tokens_per_verify"] <= 5


def permuted_tokenizer(source, folder, a: str = "Ġquick", b: str = "Ġbrown"):
    """A copy of a checkpoint whose tokenizer.json has two ids swapped: the same size, other ids for the same text."""
    folder.mkdir()
    for path in source.iterdir():
        if path.name != "tokenizer.json":
            (folder / path.name).symlink_to(path)
    data = json.loads((source / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (folder / "tokenizer.json").write_text(json.dumps(data))


RANDOM_TARGET = ["--random_weights", "stories15M"]  # no weights are made before these errors


@pytest.mark.parametrize("args, words", [
    (RANDOM_TARGET + ["--speculate_ngram", "3", "--speculate_k", "0"], ["--speculate_k must be >= 1"]),
    (RANDOM_TARGET + ["--speculate_ngram", "0"], ["--speculate_ngram must be >= 1"]),
    (RANDOM_TARGET + ["--speculate_ngram", "256"], ["--speculate_ngram 256", "256-token context"]),
    (RANDOM_TARGET + ["--speculate_ngram", "3", "--speculate_k", "300"], ["--speculate_k 300", "256-token context"]),
    # the drafts of a round are written past its last token: the context the text has is less
    (RANDOM_TARGET + ["--speculate_ngram", "2", "--speculate_k", "3", "--prompt_tokens", "254"],
     ["the prompt has 254 tokens", "context is 254 tokens (256 less 2 for speculation's drafts)"]),
    # --speculate_k without a proposer: tests/test_smollm2.py; 0 is given too, not None
    (RANDOM_TARGET + ["--speculate_k", "0"], ["--speculate_k needs"]),
    (RANDOM_TARGET + ["--speculate_ngram", "3", "--draft_checkpoint_path", "SMOLLM2"], ["not both"]),
    (["--checkpoint_path", "SMOLLM2", "--speculate_ngram", "3", "--prompt", "Hi", "--prompt", "Hello"],
     ["one sequence at a time"]),
    (RANDOM_TARGET + ["--draft_checkpoint_path", "SMOLLM2"], ["vocabulary of 49152 tokens", "target 32000"]),
    (["--checkpoint_path", "SMOLLM2", "--draft_checkpoint_path", "PERMUTED"], ["tokenizes text differently"]),
    # refused before the target's weights load (no "Loaded" line before the error)
    (["--checkpoint_path", "SMOLLM2", "--draft_checkpoint_path", "FEWER_LAYERS"],
     ["does not match", "unexpected tensor layers."]),
], ids=["k-zero", "ngram-zero", "ngram-over-context", "k-over-context", "prompt-over-drafts-context",
        "k-zero-without-proposer", "two-proposers", "two-prompts", "other-vocabulary", "other-tokenizer",
        "draft-weights-not-its-config"])
def test_bad_speculation_input_gives_one_error_line(args, words, smollm2_checkpoint, tmp_path, capsys):
    """generate.py's command line run in this process, as its `__main__` runs it (the command line itself:
    test_speculation_for_a_batch_is_refused_in_one_line_by_the_command_line)."""
    paths = {"SMOLLM2": smollm2_checkpoint, "PERMUTED": tmp_path / "permuted", "FEWER_LAYERS": tmp_path / "fewer"}
    if "PERMUTED" in args:
        permuted_tokenizer(smollm2_checkpoint, paths["PERMUTED"])
    if "FEWER_LAYERS" in args:  # the weights of 30 layers under a config of 2
        paths["FEWER_LAYERS"].mkdir()
        (paths["FEWER_LAYERS"] / "model.safetensors").symlink_to(smollm2_checkpoint / "model.safetensors")
        config = json.loads((smollm2_checkpoint / "config.json").read_text())
        (paths["FEWER_LAYERS"] / "config.json").write_text(json.dumps({**config, "n_layer": 2}))
    main_error(as_run(generate_main), ["--device", "cpu", *[str(paths.get(a, a)) for a in args]], capsys,
               *words)


def test_the_memory_check_counts_a_draft_models_kv_cache_too(smollm2_checkpoint, monkeypatch, capsys):
    """A draft model allocates a KV cache as long as the target's: the check before any weights load counts both.
    Prompt lookup, with no draft model, fits in the same memory."""
    config = read_checkpoint(smollm2_checkpoint).args
    # 4 prompt tokens, 4 new ones and the 3 slots a round of k = 4 may write past them: 11, rounded up to 16 slots;
    # keys and values in float32
    target_cache = 2 * config.n_layer * config.n_kv_heads * 16 * config.head_dim * 4
    import generate
    monkeypatch.setattr(generate, "host_memory_available", lambda: target_cache * 3 // 2)
    flags = ["--checkpoint_path", str(smollm2_checkpoint), "--prompt_tokens", "4", "--max_new_tokens", "4",
             "--speculate_k", "4", "--device", "cpu"]
    generate_main([*flags, "--speculate_ngram", "2"])
    # one error line and nothing before it: no weights loaded
    main_error(as_run(generate_main), [*flags, "--draft_checkpoint_path", str(smollm2_checkpoint)], capsys,
               "KV cache", "the draft model's included")


def test_speculative_samples_give_their_rounds_and_the_average_pools_the_rounds_of_all(smollm2_checkpoint,
                                                                                      tmp_path, capsys):
    """Two greedy samples, alike: the average's rounds and tokens are twice a sample's."""
    metrics = tmp_path / "m.json"
    capsys.readouterr()
    generate_main(["--checkpoint_path", str(smollm2_checkpoint), "--prompt", "one two one two one two",
                   "--speculate_ngram", "1", "--speculate_k", "3", "--max_new_tokens", "8", "--num_samples", "2",
                   "--temperature", "0", "--device", "cpu", "--json", str(metrics)])
    data = json.loads(metrics.read_text())
    first, second = data["samples"]
    assert len(first["accepted_lengths"]) == 3 + 1 and first["accepted_lengths"] == second["accepted_lengths"]
    assert first["round_tokens"] == first["new_tokens"][0] - 1  # all but the prefill's token
    average = data["average"]
    assert average["accepted_lengths"] == [2 * n for n in first["accepted_lengths"]]
    assert average["round_tokens"] == 2 * first["round_tokens"]
    assert average["tokens_per_verify"] == pytest.approx(first["tokens_per_verify"])
    assert average["acceptance_rate"] == pytest.approx(first["acceptance_rate"])
    assert f"All 2 samples: {describe_speculation(average)}" in capsys.readouterr().err


def test_a_draft_with_a_shorter_context_than_the_targets_limits_the_generation(smollm2_checkpoint, tmp_path,
                                                                                capsys):
    """SmolLM2's weights as a draft of 16 tokens' context: the text may fill that, less the 2 slots a round
    of 3 drafts writes past it."""
    draft = tmp_path / "short"
    draft.mkdir()
    (draft / "model.safetensors").symlink_to(smollm2_checkpoint / "model.safetensors")
    config = json.loads((smollm2_checkpoint / "config.json").read_text())
    (draft / "config.json").write_text(json.dumps({**config, "block_size": 16}))
    metrics = tmp_path / "m.json"
    capsys.readouterr()
    generate_main(["--checkpoint_path", str(smollm2_checkpoint), "--draft_checkpoint_path", str(draft),
                   "--speculate_k", "3", "--prompt_tokens", "4", "--max_new_tokens", "100", "--temperature", "0",
                   "--device", "cpu", "--json", str(metrics)])
    assert json.loads(metrics.read_text())["samples"][0]["new_tokens"] == [10]
    assert ("note: generating 10 tokens, all that fit the draft model's context of 14 tokens (16 less 2 "
            "for speculation's drafts)") in capsys.readouterr().err
    with pytest.raises(InputError, match=r"the prompt has 14 tokens but the draft model's context is 14 tokens"):
        generate_main(["--checkpoint_path", str(smollm2_checkpoint), "--draft_checkpoint_path", str(draft),
                       "--speculate_k", "3", "--prompt_tokens", "14", "--device", "cpu"])


@pytest.mark.slow
def test_speculation_for_a_batch_is_refused_in_one_line_by_the_command_line():
    r = run_script("generate.py", "--device", "cpu", *RANDOM_TARGET, "--speculate_ngram", "3", "--batch_size", "2",
                   env=QUIET)
    assert r.returncode == 1
    assert_one_error_line(r.stderr, "one sequence at a time")
