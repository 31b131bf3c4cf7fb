"""The model's cache and the generation loop, on tiny random models (no files needed); then
generate.py's command line in this process, on such a model saved with a word-level tokenizer."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import generate as G
from generate import Sampling, generate, probabilities, sample
from checkpoint import InputError, save_checkpoint
from conftest import ROOT
from model import ModelArgs, Transformer

TINY = dict(dim=64, n_layer=2, n_head=4, n_kv_heads=2, vocab_size=97, intermediate_size=96, block_size=128)
# the feed-forward: dense, or a mixture of 8 experts of which 2 per token (with Qwen3's q/k norm)
FFN = {"dense": {}, "moe": dict(n_experts=8, n_active_experts=2, qk_norm=True)}


def tiny_model(seed=0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**{**TINY, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.02 if "norm" not in name else 1.0)  # random, not ones, so norm scaling is exercised
    return model.eval()


@torch.no_grad()
@pytest.mark.parametrize("ffn", FFN)
def test_cached_decode_matches_full_forward(ffn):
    model = tiny_model(**FFN[ffn])
    idx = torch.randint(0, TINY["vocab_size"], (2, 40))
    model.setup_caches(2, 64)
    full = model(idx, torch.arange(40))  # (2, 40, vocab)
    model.setup_caches(2, 48)  # fresh cache
    steps = [model(idx[:, :25], torch.arange(25))]
    steps += [model(idx[:, t:t + 1], torch.tensor([t])) for t in range(25, 40)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def llama3_frequency(freq: float, factor: float, low_freq_factor: float, high_freq_factor: float,
                     original_max_position_embeddings: int) -> float:
    """Llama-3.1's scaled rotary frequency (Meta's apply_scaling, transformers' "llama3" rope type):
    wavelengths shorter than original / high_freq_factor kept, longer than original / low_freq_factor
    divided by factor, and between them a blend, linear in original / wavelength."""
    wavelength = 2 * math.pi / freq
    if wavelength < original_max_position_embeddings / high_freq_factor:
        return freq
    if wavelength > original_max_position_embeddings / low_freq_factor:
        return freq / factor
    smooth = ((original_max_position_embeddings / wavelength - low_freq_factor)
              / (high_freq_factor - low_freq_factor))
    return (1 - smooth) * freq / factor + smooth * freq


@torch.no_grad()
def test_rope_scaling_changes_only_long_wavelengths():
    # head_dim 16: 8 frequencies, wavelengths 6.3, 20, 63, 199, 628, ... tokens; thresholds 100 / 8 =
    # 12.5 and 100 tokens: the first kept, two blended, five slowed 8 times
    scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=8.0,
                   original_max_position_embeddings=100)
    from model import rope_table
    args = ModelArgs(**TINY, rope_scaling=scaling)
    half = args.head_dim // 2
    freqs = [args.rope_base ** (-i / half) for i in range(half)]
    scaled = [llama3_frequency(f, **scaling) for f in freqs]
    kinds = ["kept" if s == f else "slowed" if s == f / 8 else "blended" for f, s in zip(freqs, scaled)]
    assert kinds == ["kept"] + ["blended"] * 2 + ["slowed"] * 5
    positions = torch.arange(300, dtype=torch.float64)[:, None]
    angles = positions * torch.tensor(scaled, dtype=torch.float64).repeat_interleave(2)  # (300, 16)
    sign = torch.tensor([-1.0, 1.0], dtype=torch.float64).repeat(half)  # (-s0, s0, -s1, s1, ...)
    expected = torch.stack([angles.cos(), sign * angles.sin()], dim=1)[:, :, None].float()
    table = rope_table(args, 300)  # (positions, cos and sin, 1, head_dim): a pair of columns a frequency
    # (float32 angles, as transformers': their rounding, up to ~3e-5 here, is not the rule's)
    torch.testing.assert_close(table, expected, atol=1e-4, rtol=0)
    # and the table without scaling: the plain frequencies, which only the kept column shares
    plain = rope_table(ModelArgs(**TINY), 300)
    torch.testing.assert_close(plain[..., :2], table[..., :2])
    assert all(not torch.allclose(plain[..., 2 * i:2 * i + 2], table[..., 2 * i:2 * i + 2])
               for i in range(1, half))


def greedy_alone(model, prompt, n):
    model.setup_caches(1, len(prompt) + n)
    return generate(model, [prompt], n, Sampling(temperature=0)).tokens[0]


@pytest.mark.parametrize("ffn", FFN)
def test_batch_of_different_lengths_matches_each_prompt_alone(ffn):
    model = tiny_model(attention_bias=True, **FFN[ffn])
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (3, 11, 7, 1)]
    alone = [greedy_alone(model, p, 20) for p in prompts]
    model.setup_caches(len(prompts), 11 + 20)
    batched = generate(model, prompts, 20, Sampling(temperature=0)).tokens
    assert batched == alone


def test_generation_stops_at_any_end_of_sequence_id_per_row():
    model = tiny_model()
    prompts = [[5, 6, 7], [9]]
    model.setup_caches(2, 3 + 30)
    free = generate(model, prompts, 30, Sampling(temperature=0)).tokens
    stop = {free[0][4], free[1][2]}  # two different ids, each the 5th / 3rd token of its row
    gen = generate(model, prompts, 30, Sampling(temperature=0), eos_ids=stop)
    for row_free, row_stopped in zip(free, gen.tokens):
        first_stop = next(i for i, t in enumerate(row_free) if t in stop)
        assert row_stopped == row_free[:first_stop]
    # Throughput counts each row's tokens up to and including its end token, nothing sampled after it.
    assert gen.generated == sum(len(row) + 1 for row in gen.tokens)


def test_max_new_tokens_is_exact():
    model = tiny_model()
    model.setup_caches(1, 20)
    for n in (1, 2, 5):
        gen = generate(model, [[1, 2, 3]], n, Sampling(temperature=0))
        assert len(gen.tokens[0]) == n
        assert gen.decode_steps == n - 1


def test_sampling_draws_from_the_filtered_distribution():
    # the likeliest tokens are not ids 0 and 1: a draw must come back as an id, not as a rank
    logits = torch.log(torch.tensor([[0.15, 0.5, 0.1, 0.25]]))
    torch.manual_seed(0)
    n = 20000
    draws = lambda s: sample(logits.expand(n, -1), s).view(-1)  # n independent rows
    freq = torch.bincount(draws(Sampling(temperature=1.0, top_k=None)), minlength=4) / n
    torch.testing.assert_close(freq, torch.tensor([0.15, 0.5, 0.1, 0.25]), atol=0.015, rtol=0)
    two = torch.tensor([0, 2 / 3, 0, 1 / 3])
    freq = torch.bincount(draws(Sampling(temperature=1.0, top_k=2)), minlength=4) / n
    torch.testing.assert_close(freq, two, atol=0.015, rtol=0)
    # the distribution speculative decoding weighs drafts by is the one `sample` draws from
    torch.testing.assert_close(probabilities(logits, Sampling(temperature=1.0, top_k=2)), two[None])
    # top_p 0.7: 0.5 alone is short of 0.7, 0.5 + 0.25 reaches it, so two tokens stay.
    freq = torch.bincount(draws(Sampling(temperature=1.0, top_k=None, top_p=0.7)), minlength=4) / n
    torch.testing.assert_close(freq, two, atol=0.015, rtol=0)
    # both filters: the top 3 (0.5, 0.25, 0.15 renormalised), of which top_p 0.7 keeps two
    freq = torch.bincount(draws(Sampling(temperature=1.0, top_k=3, top_p=0.7)), minlength=4) / n
    torch.testing.assert_close(freq, two, atol=0.015, rtol=0)
    assert sample(logits, Sampling(temperature=0)).item() == 1


def test_top_k_of_16_bit_logits_keeps_them_and_weighs_them_in_float32(monkeypatch):
    """A bf16 or fp16 model's logits go to top-k as they are (faster on a GPU than float32's); the
    tokens kept and their probabilities are those of the logits in float32."""
    torch.manual_seed(0)
    topk, dtypes_seen = torch.topk, []

    def recording_topk(x, *args, **kwargs):
        dtypes_seen.append(x.dtype)
        return topk(x, *args, **kwargs)

    monkeypatch.setattr(torch, "topk", recording_topk)
    for dtype in (torch.bfloat16, torch.float16):
        logits = (torch.randn(3, 500) * 4).to(dtype)
        s = Sampling(temperature=0.7, top_k=50)
        probs = probabilities(logits, s)
        assert dtypes_seen[-1] == dtype
        assert probs.dtype == torch.float32
        torch.testing.assert_close(probs, probabilities(logits.float(), s), atol=1e-6, rtol=0)
        assert torch.equal(probs > 0, probabilities(logits.float(), s) > 0)


@pytest.mark.parametrize("top_k", [None, 200])
def test_a_tiny_temperature_samples_the_argmax_not_noise(top_k):
    """Logits divided by 1e-40 overflow to ±inf; the sampler must still put the mass on the argmax."""
    torch.manual_seed(0)
    logits = torch.randn(4, 1000) * 5
    probs = probabilities(logits, Sampling(temperature=1e-40, top_k=top_k))
    assert torch.equal(probs, torch.nn.functional.one_hot(logits.argmax(-1), 1000).float())


@pytest.mark.parametrize("top_k", [None, 3])
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_divides_the_logits_before_the_softmax(temperature, top_k):
    """A temperature above 1 flattens the distribution and one below 1 sharpens it: the probabilities
    are softmax(logits / temperature), over the top k where there is one."""
    logits = torch.log(torch.tensor([[0.15, 0.5, 0.1, 0.25]]))
    expected = torch.softmax(logits / temperature, dim=-1)
    if top_k is not None:  # the likeliest 3, renormalised: id 2 (0.1) is dropped
        expected = expected.index_fill(-1, torch.tensor([2]), 0.0)
        expected = expected / expected.sum()
    torch.testing.assert_close(probabilities(logits, Sampling(temperature, top_k)), expected)


@pytest.mark.parametrize("top_k", [None, 3])
def test_nucleus_probabilities_are_the_kept_tokens_renormalised(top_k):
    """Speculative decoding weighs target against draft by these probabilities, so they must be the
    distribution `sample` draws from: the nucleus's tokens renormalised to sum to 1, not their share of
    the whole."""
    logits = torch.log(torch.tensor([[0.15, 0.5, 0.1, 0.25], [0.8, 0.1, 0.05, 0.05]]))
    probs = probabilities(logits, Sampling(temperature=1.0, top_k=top_k, top_p=0.7))
    # row 0: 0.5 + 0.25 reach 0.7; row 1: 0.8 alone does
    expected = torch.tensor([[0, 2 / 3, 0, 1 / 3], [1.0, 0, 0, 0]])
    torch.testing.assert_close(probs, expected)


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, None, 0.25), (1.0, None, 0.5), (1.0, None, 0.75), (1.0, None, 0.9), (1.0, None, 1.0),
    (0.7, 50, 0.9), (1.3, 200, None), (0.5, 3, 0.5)])
def test_the_distribution_is_the_one_transformers_samples_from(temperature, top_k, top_p):
    """What `sample` draws from is what transformers' warpers leave (the temperature, then the top
    k, then the nucleus: the fewest most likely tokens whose mass reaches top_p), token for token:
    also where a prefix holds top_p exactly ([0.5, 0.25, 0.25] keeps one token at 0.5, two at 0.75),
    and at top_p 1 over a 32000-token vocabulary, whose mass summed from the most likely token
    reaches 1 before its least likely tokens (all kept)."""
    from transformers.generation.logits_process import (TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)
    torch.manual_seed(0)
    boundary = torch.log(torch.tensor([0.5, 0.25, 0.25] + [0.0] * 31997))  # -inf past three
    logits = torch.cat([boundary[None], torch.randn(3, 32000) * 3])  # (4, 32000)
    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k is not None:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p is not None:
        scores = TopPLogitsWarper(top_p)(None, scores)
    expected = torch.softmax(scores, dim=-1)
    probs = probabilities(logits, Sampling(temperature, top_k, top_p))
    assert torch.equal(probs > 0, expected > 0)
    torch.testing.assert_close(probs, expected, atol=1e-6, rtol=1e-5)


def test_the_race_noise_is_exponential_and_fine_near_zero_where_rare_tokens_win():
    """sample_from's Exp(1) noise is positive and finite, has mean 1, and is fine near 0, where a
    rare token's chance is decided: 2**25 draws put about 33 below 1e-6, each a value of its own,
    where from one float32 rand (24 bits) there are only 16 values there (multiples of 6e-8), so
    that a token under ~1e-7 of the mass would almost never be drawn."""
    torch.manual_seed(0)
    noise = G.exponential_noise(torch.empty(2**25))
    assert bool((noise > 0).all() and noise.isfinite().all())
    assert abs(noise.mean().item() - 1) < 1e-3  # 6 standard errors
    assert noise[noise < 1e-6].unique().numel() > 16


def test_a_uniform_draw_of_exactly_zero_changes_no_choice(monkeypatch):
    """torch.rand returns 0 with probability 2 ** -24 (for some id of a 128k vocabulary, about one
    draw in 130). Then a one-hot distribution still gives its id (not id 0), and a draft the target
    gives no probability is still rejected."""
    from generate import accept_drafts, sample_from
    monkeypatch.setattr(torch, "rand_like", lambda t, **kw: torch.zeros_like(t, **kw))
    one_hot = torch.nn.functional.one_hot(torch.tensor([5, 2]), 8).float()
    assert sample_from(one_hot).view(-1).tolist() == [5, 2]
    draft = torch.nn.functional.one_hot(torch.tensor([3]), 8).float()  # (k = 1, vocab)
    target = torch.full((2, 8), 1 / 7).index_fill_(1, torch.tensor([3]), 0.0)  # never 3
    n, new = accept_drafts(torch.tensor([3]), draft, target)
    assert n.item() == 0 and new[0].item() != 3


def test_the_cache_rounds_its_slots_up_to_a_multiple_of_8_but_never_past_block_size():
    model = tiny_model(block_size=60)
    model.setup_caches(2, 13)
    assert model.max_seq_length == 16 and model.rope.shape[0] == 16
    assert model.layers[0].attention.kv_cache.k.shape == (2, TINY["n_kv_heads"], 16, model.args.head_dim)
    model.setup_caches(1, 59)
    assert model.max_seq_length == 60 and model.rope.shape[0] == 60
    assert model.layers[0].attention.kv_cache.v.shape[2] == 60


@torch.no_grad()
def test_last_logits_are_each_rows_column_of_the_full_forward():
    model = tiny_model()
    idx = torch.randint(0, TINY["vocab_size"], (2, 12))
    model.setup_caches(2, 12)
    full = model(idx, torch.arange(12))  # (2, 12, vocab)
    model.setup_caches(2, 12)
    last = model(idx, torch.arange(12), last=torch.tensor([11, 4]))  # (2, 1, vocab)
    torch.testing.assert_close(last, torch.stack([full[0, 11:], full[1, 4:5]]))


@torch.no_grad()
def test_a_prompt_chunk_riding_a_decode_step_leaves_each_row_its_alone_logits():
    """Per-row cache slots: row 0 decodes at slot 9 while row 1's prompt rides along in the same
    forward (`chunk`, into cache row 1); then row 0 decodes at slot 10 and row 1 at slot 4. Each
    gets the logits of its sequence alone."""
    model = tiny_model()
    seqs = torch.randint(0, TINY["vocab_size"], (2, 11))
    model.setup_caches(1, 16)
    alone = [model(seqs[b:b + 1], torch.arange(11))[0] for b in range(2)]  # each (11, vocab)
    model.setup_caches(2, 16)
    model(seqs[:1, :9], torch.arange(9))  # row 0's prompt, cache row 0
    # row 0's step, with row 1's prompt into cache row 1: (1, 1, vocab), row 0's logits only
    chunk = (seqs[1:, :4], torch.arange(4)[None], 1)
    first = model(seqs[:1, 9:10], torch.tensor([[9]]), chunk=chunk)
    torch.testing.assert_close(first[0, 0], alone[0][9], atol=1e-5, rtol=1e-5)
    step = model(torch.stack([seqs[0, 10:], seqs[1, 4:5]]), torch.tensor([[10], [4]]))  # (2, 1, V)
    torch.testing.assert_close(step[0, 0], alone[0][10], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step[1, 0], alone[1][4], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_compiled_prefill_fills_the_cache_as_eager_for_every_prompt_length():
    """--compile_prefill: one dynamic compile serves prompts of several lengths, writing the cache and
    choosing the first token as the eager prefill does."""
    from torch._dynamo.utils import counters
    from generate import compile_functions, prefill
    model = tiny_model()
    torch._dynamo.reset()
    graphs = counters["stats"]["unique_graphs"]  # counted over the whole process
    compiled, _ = compile_functions(False, True)
    for T in (3, 11):
        idx = torch.randint(0, TINY["vocab_size"], (2, T))
        last = torch.tensor([T - 1, T - 2])  # each row's last real token
        results = []
        for fn in (prefill, compiled):
            model.setup_caches(2, 16)
            token = fn(model, idx, torch.arange(T), last, Sampling(temperature=0))  # (2, 1)
            caches = [c.clone() for layer in model.layers
                      for c in (layer.attention.kv_cache.k, layer.attention.kv_cache.v)]
            results.append((token, caches))
        torch.testing.assert_close(results[1], results[0], atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == graphs + 1
    torch._dynamo.reset()


# ---- before a model runs: the memory check, the prompts' rows, the flags, a step's bytes ----------

def kv_bytes(config: ModelArgs, rows: int, slots: int) -> int:
    """float32 K and V for rows x slots."""
    return 2 * config.n_layer * rows * config.n_kv_heads * slots * config.head_dim * 4


def test_the_memory_check_counts_every_rows_kv_cache_and_random_weights_with_it(monkeypatch):
    config, cpu = ModelArgs(**TINY), torch.device("cpu")
    monkeypatch.setattr(G, "host_memory_available", lambda: kv_bytes(config, 3, 16))
    G.check_cache_fits(config, 3, 16, torch.float32, cpu)  # 3 rows fit
    with pytest.raises(InputError, match="KV cache for 4 rows of 16 tokens"):
        G.check_cache_fits(config, 4, 16, torch.float32, cpu)
    monkeypatch.setattr(G, "host_memory_available", lambda: kv_bytes(config, 1, 16) + 1000)
    G.check_cache_fits(config, 1, 16, torch.float32, cpu, weight_bytes=1000)  # exactly fits
    with pytest.raises(InputError, match="random weights and the KV cache"):
        G.check_cache_fits(config, 1, 16, torch.float32, cpu, weight_bytes=1001)


def test_the_memory_check_counts_the_slots_the_cache_will_have(monkeypatch):
    """Rounded up to a multiple of 8 as setup_caches rounds them, but no more than block_size."""
    config, cpu = ModelArgs(**{**TINY, "block_size": 60}), torch.device("cpu")
    monkeypatch.setattr(G, "host_memory_available", lambda: kv_bytes(config, 1, 20))
    G.check_cache_fits(config, 1, 9, torch.float32, cpu)  # 16 slots
    with pytest.raises(InputError, match="KV cache for 1 row of 17 tokens"):
        G.check_cache_fits(config, 1, 17, torch.float32, cpu)  # 24 slots: 17 would fit
    monkeypatch.setattr(G, "host_memory_available", lambda: kv_bytes(config, 1, 60))
    G.check_cache_fits(config, 1, 59, torch.float32, cpu)  # 60 slots, not 64


def test_a_chat_prompt_is_the_users_turn_in_the_template(tmp_path):
    from argparse import Namespace
    from tokenizer import load_tokenizer
    word_tokenizer().save(str(tmp_path / "tokenizer.json"))
    template = ("{% for m in messages %}{% if m['role'] == 'user' %}w7 {% else %}w8 {% endif %}"
                "{{ m['content'] }} {% endfor %}w9")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    args = Namespace(prompt=["w1 w2"], prompt_tokens=None, batch_size=2, chat=True)
    assert G.encode_prompts(args, load_tokenizer(tmp_path), TINY["vocab_size"]) == [[7, 1, 2, 9]] * 2


def test_a_prompt_of_no_tokens_is_refused_in_one_sentence(tmp_path):
    from argparse import Namespace
    from tokenizer import load_tokenizer
    word_tokenizer().save(str(tmp_path / "tokenizer.json"))
    args = Namespace(prompt=[""], prompt_tokens=None, batch_size=1, chat=False)
    with pytest.raises(InputError, match="^prompt '' has no tokens"):
        G.encode_prompts(args, load_tokenizer(tmp_path), TINY["vocab_size"])


def test_a_checkpoint_and_random_weights_together_are_refused(tmp_path):
    with pytest.raises(InputError, match="exactly one of --checkpoint_path and --random_weights"):
        G.parse_args(["--checkpoint_path", str(tmp_path), "--random_weights", "stories15M", "--device", "cpu"])


def test_a_mixtures_step_of_one_token_reads_only_its_active_experts():
    from model import MoEFeedForward
    model = tiny_model(n_experts=8, n_active_experts=2)
    experts = sum(p.nbytes for m in model.modules() if isinstance(m, MoEFeedForward)
                  for p in [*m.w13.parameters(), *m.w2.parameters()])
    rest = sum(p.nbytes for p in model.parameters()) - model.tok_embeddings.weight.nbytes - experts
    assert G.bytes_read_per_step(model, 1) == pytest.approx(rest + experts * 2 / 8)


# ---- generate.py's command line: main() in this process, on a tiny checkpoint -------------------

def word_tokenizer(vocab_size: int = TINY["vocab_size"]):
    """A tokenizer.json of words w0 .. w{vocab_size - 1}, split at spaces (w0 for unknown words),
    without a chat template or special tokens (so no generation stops early)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tokenizer


def save_tiny_checkpoint(folder: Path, **overrides) -> Path:
    """tiny_model's weights as a checkpoint, with word_tokenizer's tokenizer.json."""
    model = tiny_model(**overrides)
    tokenizer = word_tokenizer(model.args.vocab_size)
    save_checkpoint(folder, model.args, model.state_dict(),
                    others={"tokenizer.json": lambda tmp: tokenizer.save(str(tmp))})
    return folder


CONTEXT = 32  # the tiny checkpoint's context, in tokens


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("generate") / "tiny", block_size=CONTEXT)


PROMPT = "w1 w2 w3"  # 3 tokens


def generate_here(capsys, checkpoint: Path, *flags) -> tuple[str, str]:
    """generate.py --checkpoint_path checkpoint --prompt PROMPT on the CPU with flags, through its
    main() in this process: (stdout, stderr)."""
    capsys.readouterr()
    G.main([str(a) for a in ("--checkpoint_path", checkpoint, "--prompt", PROMPT, "--device", "cpu",
                             *flags)])
    out = capsys.readouterr()
    return out.out, out.err


def test_a_reader_that_leaves_early_ends_generation_quietly(tiny_checkpoint):
    """`generate.py ... | head -c 3`: the pipe closes while samples are still being written."""
    argv = [sys.executable, "generate.py", "--checkpoint_path", tiny_checkpoint, "--prompt", PROMPT,
            "--device", "cpu", "--num_samples", 50, "--max_new_tokens", 8]
    with subprocess.Popen([str(a) for a in argv], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as run:
        assert len(run.stdout.read(3)) == 3
        run.stdout.close()
        stderr = run.stderr.read().decode()
    assert run.returncode == 1 and "Traceback" not in stderr, stderr


def test_no_prompt_flag_prints_and_answers_the_default_prompt(smollm2_checkpoint, capsys):
    """Without --prompt the run is that of --prompt DEFAULT_PROMPT: the prompt, then its answer."""
    flags = ["--checkpoint_path", str(smollm2_checkpoint), "--device", "cpu", "--max_new_tokens",
             "4", "--temperature", "0"]
    outputs = []
    for prompt in ([], ["--prompt", G.DEFAULT_PROMPT]):
        capsys.readouterr()
        G.main(flags + prompt)
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]
    assert outputs[0].startswith(G.DEFAULT_PROMPT) and len(outputs[0]) > len(G.DEFAULT_PROMPT) + 1

def test_new_tokens_past_the_context_are_cut_to_what_fits_with_a_note(tiny_checkpoint, tmp_path,
                                                                       capsys):
    context = CONTEXT
    for asked, cut in ((context - 3 + 50, True), (context - 3, False)):  # 3 prompt tokens
        metrics = tmp_path / f"{asked}.json"
        _, err = generate_here(capsys, tiny_checkpoint, "--max_new_tokens", asked, "--temperature", 0,
                               "--json", metrics)
        sample = json.loads(metrics.read_text())["samples"][0]
        assert sample["prompt_tokens"] == [3] and sample["new_tokens"] == [context - 3]
        note = (f"note: generating {context - 3} tokens, all that fit the model's context of "
                f"{context} tokens")
        assert (note in err.splitlines()) == cut, err


@pytest.mark.parametrize("context, cache", [(8192, 4096), (CONTEXT, CONTEXT)])
def test_interactive_answers_are_cut_to_the_conversation_cache_with_a_note(tmp_path, monkeypatch,
                                                                          capsys, context, cache):
    """An interactive conversation's cache holds the context up to 4096 tokens, and an answer the
    cache less its one-token question at most: that, not the whole context, is what the note
    names."""
    checkpoint = save_tiny_checkpoint(tmp_path / "long", block_size=context)

    def end_of_input(prompt=""):
        raise EOFError
    monkeypatch.setattr("builtins.input", end_of_input)
    capsys.readouterr()
    G.main(["--checkpoint_path", str(checkpoint), "--interactive", "--device", "cpu",
            "--max_new_tokens", "100000"])
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert notes == [f"note: answers of at most {cache - 1} tokens, all that fit the {cache}-token cache"]


def test_new_tokens_of_a_batch_are_cut_to_what_fits_after_its_longest_prompt(tiny_checkpoint, tmp_path, capsys):
    metrics = tmp_path / "m.json"
    _, err = generate_here(capsys, tiny_checkpoint, "--prompt", "w4", "--max_new_tokens", 100, "--temperature", 0,
                           "--json", metrics)
    sample = json.loads(metrics.read_text())["samples"][0]
    assert sample["prompt_tokens"] == [3, 1] and sample["new_tokens"] == [CONTEXT - 3] * 2
    assert f"note: generating {CONTEXT - 3} tokens, all that fit the model's context of {CONTEXT} tokens" in err


def test_the_json_holds_the_run_every_sample_and_their_mean(tiny_checkpoint, tmp_path, capsys):
    metrics = tmp_path / "m.json"
    _, err = generate_here(capsys, tiny_checkpoint, "--max_new_tokens", 4, "--num_samples", 3, "--json", metrics)
    data = json.loads(metrics.read_text())
    assert (data["device"], data["torch"], data["tensor_parallel"]) == ("cpu", torch.__version__, 1)
    assert data["compile_s"] is None and data["model_bytes"] > 0 and len(data["samples"]) == 3
    for key in ("ttft_s", "decode_tok_s", "bandwidth_gb_s"):
        assert data["average"][key] == pytest.approx(sum(s[key] for s in data["samples"]) / 3), key
    average = data["average"]
    assert (f"Average over 3 samples: decode {average['decode_tok_s']:.2f} tok/s, weights read "
            f"{average['bandwidth_gb_s']:.1f} GB/s") in err


def test_a_compiled_run_compiles_in_an_untimed_run_before_the_samples(tiny_checkpoint, tmp_path, capsys,
                                                                      monkeypatch):
    """--compile (eager functions standing in for the compiled ones): one more run than the samples, first,
    that prints nothing and whose seconds the JSON gives apart as compile_s."""
    runs, generate_fn = [], G.generate

    def counted(*args, **kwargs):
        runs.append(kwargs.get("on_tokens"))
        return generate_fn(*args, **kwargs)
    monkeypatch.setattr(G, "compile_functions", lambda *args, **kwargs: (G.prefill, G.decode_one_token))
    monkeypatch.setattr(G, "generate", counted)
    metrics = tmp_path / "m.json"
    out, err = generate_here(capsys, tiny_checkpoint, "--compile", "--max_new_tokens", 2, "--num_samples", 2,
                             "--json", metrics)
    data = json.loads(metrics.read_text())
    assert len(runs) == 3 and runs[0] is None and len(data["samples"]) == 2
    assert data["compile_s"] > 0 and f"Compilation time: {data['compile_s']:.2f} s" in err
    assert out.count(PROMPT) == 2


def test_the_same_seed_samples_the_same_tokens_and_another_seed_others(tiny_checkpoint, capsys):
    """Sampled at temperature 1 from a near-uniform distribution over 97 tokens: two seeds giving the
    same 20 tokens would be a chance of 97 ** -20."""
    def sampled(seed: int) -> str:
        out, _ = generate_here(capsys, tiny_checkpoint, "--max_new_tokens", 20, "--temperature", 1,
                               "--seed", seed)
        assert len(out.split()) >= 20, out  # the prompt, then 20 words
        return out
    first = sampled(7)
    assert sampled(7) == first
    assert sampled(8) != first


def test_a_batch_prints_each_row_once_and_greedy_rows_equal_the_single_rows_answer(tiny_checkpoint,
                                                                                  capsys):
    flags = ("--max_new_tokens", 12, "--temperature", 0)
    single, _ = generate_here(capsys, tiny_checkpoint, *flags)
    assert single.startswith(PROMPT)  # the prompt, then the answer streamed
    answer = single.removeprefix(PROMPT).strip()
    assert len(answer.split()) == 12, single
    batch, _ = generate_here(capsys, tiny_checkpoint, *flags, "--batch_size", 3)
    assert batch.splitlines() == [f"[{b}] {single.rstrip()}" for b in range(3)]  # each its prompt, then the answer


def test_a_batch_of_prompts_prints_each_row_after_its_own_prompt(tiny_checkpoint, capsys):
    out, _ = generate_here(capsys, tiny_checkpoint, "--prompt", "w4 w5", "--max_new_tokens", 2, "--temperature", 0)
    rows = out.splitlines()
    assert [row.split()[:-2] for row in rows] == [["[0]", *PROMPT.split()], ["[1]", "w4", "w5"]], out


def test_a_chat_answer_is_printed_without_its_prompt(smollm2_checkpoint, capsys):
    """The prompt is echoed where the answer continues its text, not where the answer is the assistant's turn."""
    question = "What is the capital of France?"
    capsys.readouterr()
    G.main(["--checkpoint_path", str(smollm2_checkpoint), "--chat", "--prompt", question, "--max_new_tokens", "3",
            "--temperature", "0", "--device", "cpu"])
    out = capsys.readouterr().out
    assert question not in out and out.strip(), out


def test_a_sentencepiece_models_answer_keeps_the_space_after_the_prompt(tmp_path, capsys, monkeypatch):
    """sentencepiece drops the leading space of a decode's first piece; the answer printed after its prompt
    keeps it, alone and in a batch. Every token sampled is "▁there"."""
    import importlib.util
    import shutil
    from tokenizer import load_tokenizer
    data = Path(importlib.util.find_spec("mistral_common").submodule_search_locations[0]) / "data"
    model = tiny_model(vocab_size=32000)
    save_checkpoint(tmp_path / "sp", model.args, model.state_dict(),
                    others={"tokenizer.model": lambda tmp: shutil.copy(data / "tokenizer.model.v1", tmp)})
    there = load_tokenizer(tmp_path / "sp").encode("a there")[-1]
    monkeypatch.setattr(G, "sample", lambda logits, s: torch.full((logits.shape[0], 1), there))
    flags = ["--checkpoint_path", tmp_path / "sp", "--prompt", "Once upon a time", "--device", "cpu",
             "--max_new_tokens", 3, "--num_samples", 1]
    capsys.readouterr()
    G.main([str(f) for f in flags])
    assert capsys.readouterr().out.splitlines()[0] == "Once upon a time there there there"
    G.main([str(f) for f in [*flags, "--batch_size", 2]])
    assert capsys.readouterr().out.splitlines() == [f"[{b}] Once upon a time there there there" for b in range(2)]


def test_bfloat16_weights_generate_and_a_step_reads_half_the_bytes_of_float32(tiny_checkpoint,
                                                                             tmp_path, capsys):
    results = {}
    for dtype in ("float32", "bfloat16"):
        out, _ = generate_here(capsys, tiny_checkpoint, "--max_new_tokens", 8, "--temperature", 0,
                               "--dtype", dtype, "--json", tmp_path / f"{dtype}.json")
        assert len(out.removeprefix(PROMPT).split()) == 8, out
        results[dtype] = json.loads((tmp_path / f"{dtype}.json").read_text())
    args = results["bfloat16"]["args"]  # the flags with JSON's types, paths and dtypes as text
    assert args["dtype"] == "torch.bfloat16" and args["checkpoint_path"] == str(tiny_checkpoint)
    assert (args["max_new_tokens"], args["temperature"], args["prompt"]) == (8, 0.0, [PROMPT])
    assert results["bfloat16"]["samples"][0]["new_tokens"] == [8]
    assert 2 * results["bfloat16"]["model_bytes"] == results["float32"]["model_bytes"]


def test_chat_with_a_tokenizer_without_a_chat_template_is_one_error_line(tiny_checkpoint, capsys):
    """The word-level tokenizer.json has no template (and the HF backend no built-in chat format): refused
    before the model loads."""
    with pytest.raises(InputError) as e:
        generate_here(capsys, tiny_checkpoint, "--chat", "--max_new_tokens", 2)
    message = str(e.value)
    assert "\n" not in message and "no chat template" in message, message
    assert "Loaded" not in capsys.readouterr().err


@pytest.mark.parametrize("top_k", [None, 3])
def test_a_nucleus_smaller_than_the_most_likely_token_keeps_that_token_alone(top_k):
    logits = torch.log(torch.tensor([[0.15, 0.5, 0.1, 0.25]]))
    assert torch.equal(probabilities(logits, Sampling(1.0, top_k, 1e-9)), torch.tensor([[0.0, 1.0, 0.0, 0.0]]))


def test_the_streamed_row_0_leaves_its_end_of_sequence_token_out(smollm2_checkpoint, capsys):
    """generate.py's stream of a single row (and of --interactive's answers): the text of its tokens, not
    the text of the token that ends it (<|im_end|>); a finished row (None) prints nothing."""
    from tokenizer import TextStreamer, load_tokenizer
    tokenizer = load_tokenizer(smollm2_checkpoint)
    streamer = TextStreamer(tokenizer)
    for token in [*tokenizer.encode("Hello there"), tokenizer.eos_ids[0], None]:
        G.print_row0(streamer, tokenizer.eos_ids, [token, 7])
    assert capsys.readouterr().out == "Hello there"
