"""The mixture-of-experts feed-forward on tiny random models (transformers parity is in
test_hf_parity.py, decoding and batching in test_generate.py): its forms agree, it traces as one
graph, speculative decoding and eval.py take it unchanged, and the named configs have their
published sizes."""
import copy
from dataclasses import asdict

import pytest
import torch

from generate import (DraftModel, Sampling, generate, speculative_generate,
                      unchosen_expert_bytes)
from checkpoint import CONFIGS, parse_config
from model import ModelArgs, MoEFeedForward, Transformer, route

TINY = dict(dim=64, n_layer=2, n_head=4, n_kv_heads=2, vocab_size=97, intermediate_size=48,
            block_size=128, n_experts=8, n_active_experts=2)


pytestmark = pytest.mark.usefixtures("one_thread")  # many small forwards


def tiny_model(seed=0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**{**TINY, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.2 if "norm" in name else 0.1)
    return model.eval()


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm_topk_prob, widths", [(True, {}), (False, {}),
                                                    (True, dict(dim=36, n_head=2, n_kv_heads=1)),
                                                    (True, dict(intermediate_size=20))],
                         ids=["norm_topk", "no-norm_topk", "dim-36", "intermediate-20"])
def test_gathered_grouped_and_looped_forms_agree(norm_topk_prob, widths, dtype):
    """bfloat16 prefills take torch._grouped_mm, other dtypes the loop over experts, and so do
    widths whose bf16 rows are not whole 16 bytes (which torch._grouped_mm refuses)."""
    moe = tiny_model(norm_topk_prob=norm_topk_prob, **widths).layers[0].feed_forward.to(dtype)
    assert isinstance(moe, MoEFeedForward)
    dim = moe.w2.out_features
    x = torch.randn(3, 5, dim, dtype=dtype)  # 15 tokens: more pairs than experts, grouped
    experts = moe.gate(x.view(15, -1)).topk(2).indices  # (15, 2)
    gathered = moe.gathered(x.view(15, -1), experts)  # (15, 2, dim)
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(moe.grouped(x.view(15, -1), experts), gathered, **tol)
    torch.testing.assert_close(moe.looped(x.view(15, -1), experts), gathered, **tol)
    # ...and forward, which takes the gathered form token by token, the grouped one for all
    one_by_one = torch.cat([moe(x[:, t:t + 1]) for t in range(5)], dim=1)
    torch.testing.assert_close(moe(x), one_by_one, **tol)


@pytest.mark.parametrize("normalize", [True, False])
def test_the_router_weighs_bfloat16_logits_in_float32(normalize):
    logits = (3 * torch.randn(6, TINY["n_experts"], generator=torch.Generator().manual_seed(0))).bfloat16()
    weights, experts = route(logits, TINY["n_active_experts"], normalize)
    expected = torch.softmax(logits.float(), dim=-1).gather(1, experts)
    if normalize:
        expected = expected / expected.sum(dim=-1, keepdim=True)
    assert weights.dtype == torch.float32 and torch.equal(weights, expected)


@torch.no_grad()
@pytest.mark.parametrize("tokens", [1, 15], ids=["gathered", "grouped"])
def test_a_bfloat16_mixture_hands_back_bfloat16(tokens):
    moe = tiny_model().layers[0].feed_forward.to(torch.bfloat16)
    x = torch.randn(1, tokens, TINY["dim"], dtype=torch.bfloat16)
    assert moe(x).dtype == torch.bfloat16


@torch.no_grad()
@pytest.mark.parametrize("widths", [dict(dim=36, n_head=2, n_kv_heads=1), dict(intermediate_size=20)],
                         ids=["dim-36", "intermediate-20"])
def test_bfloat16_experts_whose_rows_are_not_whole_16_bytes_take_the_loop(widths, monkeypatch):
    """torch._grouped_mm takes rows of whole 16 bytes only: w13's (dim) and w2's (intermediate)."""
    moe = tiny_model(**widths).layers[0].feed_forward.to(torch.bfloat16)
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: pytest.fail("torch._grouped_mm"))
    x = torch.randn(15, moe.w13.in_features, dtype=torch.bfloat16)
    experts = moe.gate(x).topk(2).indices  # (15, 2)
    torch.testing.assert_close(moe.grouped(x, experts), moe.looped(x, experts))


def moe_with_experts(mode: str) -> MoEFeedForward:
    """tiny_model's first feed-forward, its experts quantized as mode says ("float": kept)."""
    from kernels import EXPERTS
    from quantize import quantize_weight
    moe = tiny_model().layers[0].feed_forward
    for name in ("w13", "w2") if mode != "float" else ():
        experts = getattr(moe, name)
        quantized = EXPERTS[mode](experts.n_experts, experts.in_features, experts.out_features)
        with torch.no_grad():
            quantized.load_state_dict(quantize_weight(mode, experts.weight, None), assign=True)
        setattr(moe, name, quantized)
    return moe


@torch.no_grad()
@pytest.mark.parametrize("mode", ["float", "int8", "fp8"])
def test_gathered_form_through_an_expert_kernel_matches_the_pytorch_form(mode):
    """On CUDA the experts' `kernel` (kernels.expert_matmul) computes the gathered form; here its
    float64 reference stands in for it, which checks what each kind of experts hands a kernel."""
    from kernels import expert_matmul_reference
    moe = moe_with_experts(mode)
    x = torch.randn(3, TINY["dim"])
    experts = moe.gate(x).topk(2).indices  # (3, 2)
    pytorch_form = moe.gathered(x, experts)  # (3, 2, dim)
    moe.w13.kernel = moe.w2.kernel = expert_matmul_reference
    torch.testing.assert_close(moe.gathered(x, experts).float(), pytorch_form, atol=1e-5,
                               rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_grouped_form_through_the_grouped_expert_kernel_matches_the_pytorch_form(mode):
    """On CUDA one-byte experts' `grouped_kernel` (kernels.grouped_expert_mm) computes the grouped
    form up to MAX_WIDE_ROWS pairs an expert on average, the dequantized copy's torch._grouped_mm
    past that; here its float64 reference stands in for it, counted."""
    from kernels import MAX_WIDE_ROWS, grouped_expert_mm_reference
    moe = moe_with_experts(mode).to(torch.bfloat16)
    calls = []

    def kernel(xs, ends, weight, scales):
        calls.append(xs.shape[0])
        return grouped_expert_mm_reference(xs, ends, weight, scales).to(xs.dtype)

    # 8 experts, top 2: up to MAX_WIDE_ROWS pairs an expert on average through the kernel
    for tokens, kernel_calls in ((15, [30, 30]), (MAX_WIDE_ROWS * 4, [MAX_WIDE_ROWS * 8] * 2),
                                 (MAX_WIDE_ROWS * 4 + 1, [])):
        x = torch.randn(tokens, TINY["dim"], dtype=torch.bfloat16)
        experts = moe.gate(x).topk(2).indices  # (tokens, 2)
        moe.w13.grouped_kernel = moe.w2.grouped_kernel = None
        pytorch_form = moe.grouped(x, experts)  # (tokens, 2, dim): every expert dequantized
        moe.w13.grouped_kernel = moe.w2.grouped_kernel = kernel
        calls.clear()
        torch.testing.assert_close(moe.grouped(x, experts), pytorch_form, atol=2e-2, rtol=2e-2)
        assert calls == kernel_calls


def test_speculative_greedy_matches_plain_greedy():
    """The target verifies k + 1 = 5 tokens per round (10 pairs: the grouped form) and decodes one
    (the gathered form); a noisy copy drafts."""
    target = tiny_model()
    draft = copy.deepcopy(target)
    with torch.no_grad():
        for name, p in draft.named_parameters():
            if "norm" not in name:
                p.add_(torch.randn_like(p) * 0.05)
    prompt, n, k = [5, 6, 7], 24, 4
    target.setup_caches(1, len(prompt) + n)
    plain = generate(target, [prompt], n, Sampling(temperature=0)).tokens[0]
    for model in (target, draft):
        model.setup_caches(1, len(prompt) + n + k - 1)
    gen = speculative_generate(target, DraftModel(draft, k, Sampling(temperature=0)), [prompt], n,
                               Sampling(temperature=0))
    assert gen.tokens[0] == plain
    assert max(gen.accepted_lengths) > 1 and min(gen.accepted_lengths) < k + 1


class IdTokenizer:
    """Token ids as text, enough for eval.EvalModel's scoring."""
    bos_id, eos_ids = 1, [2]

    def encode(self, text: str) -> list:
        return [self.bos_id] + [int(t) for t in text.split()]


def test_eval_scores_are_the_models_own_log_probabilities():
    """eval.py's batched scoring (left-padded rows of different lengths) on a mixture of experts."""
    from eval import EvalModel
    model = tiny_model()
    em = EvalModel(model, IdTokenizer(), max_seq_length=32, batch_size=2)
    requests = [([1, 5, 9, 14, 3, 7], 2), ([1, 8, 2], 1), ([1, 4, 4, 60, 11, 30, 5, 9, 3], 4)]
    scores = em.score(requests, progress=False)
    for (tokens, n), (logprob, _) in zip(requests, scores):
        model.setup_caches(1, len(tokens))
        with torch.no_grad():
            logits = model(torch.tensor([tokens[:-1]]), torch.arange(len(tokens) - 1))[0]
        expected = logits.log_softmax(-1)[torch.arange(len(tokens) - 1), torch.tensor(tokens[1:])]
        assert logprob == pytest.approx(expected[-n:].sum().item(), abs=1e-4)


def test_decode_step_and_prefill_trace_as_one_graph_each():
    """No data-dependent control flow or host sync: the decode step compiles fullgraph (one CUDA
    graph on a GPU) once for every position, and so does a prefill once for any length that takes
    the grouped form (more (token, expert) pairs than experts: 5 tokens and up here; fewer take the
    gathered form, as a decode step does; torch._grouped_mm traces in bfloat16): two graphs in all,
    no recompile."""
    from torch._dynamo.utils import counters
    model = tiny_model().to(torch.bfloat16)
    model.setup_caches(1, 32)

    def step(idx, input_pos):
        return model(idx, input_pos)
    torch._dynamo.reset()
    graphs = counters["stats"]["unique_graphs"]  # counted over the whole process
    decode = torch.compile(step, backend="eager", fullgraph=True)
    prefill = torch.compile(step, backend="eager", fullgraph=True, dynamic=True)
    try:
        with torch.no_grad():
            for T in (9, 13, 5):
                prefill(torch.randint(0, 97, (1, T)), torch.arange(T))
            for position in (13, 14, 20):
                decode(torch.randint(0, 97, (1, 1)), torch.tensor([position]))
        assert counters["stats"]["unique_graphs"] == graphs + 2
    finally:
        torch._dynamo.reset()


# published sizes (model cards): total parameters, and those a token uses (its experts only)
PUBLISHED = {"Mixtral-8x7B": (46.7e9, 12.9e9), "Mixtral-8x22B": (141e9, 39e9),
             "Qwen3-30B-A3B": (30.5e9, 3.3e9), "Qwen3-235B-A22B": (235e9, 22e9),
             "Qwen3-0.6B": (0.6e9, 0.6e9), "Qwen3-1.7B": (1.7e9, 1.7e9),
             "Qwen3-4B": (4.0e9, 4.0e9), "Qwen3-8B": (8.2e9, 8.2e9), "Qwen3-14B": (14.8e9, 14.8e9),
             "Qwen3-32B": (32.8e9, 32.8e9)}


@pytest.mark.parametrize("name", PUBLISHED)
def test_named_configs_have_their_published_sizes(name):
    args = ModelArgs(**CONFIGS[name])
    with torch.device("meta"):
        model = Transformer(args)
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".feed_forward.w" in n)
    active = total - (experts * (1 - args.n_active_experts / args.n_experts) if args.n_experts
                      else 0)
    published_total, published_active = PUBLISHED[name]
    assert abs(total / published_total - 1) < 0.02, f"{total / 1e9:.2f}B parameters"
    assert abs(active / published_active - 1) < 0.05, f"{active / 1e9:.2f}B active"


@pytest.mark.parametrize("name", ["Mixtral-8x7B", "Mixtral-8x22B", "Qwen3-30B-A3B", "Qwen3-235B-A22B"])
def test_named_mixtures_renormalize_the_chosen_experts_weights_as_the_published_models_do(name):
    """Mixtral's router always does; Qwen3-MoE's config.json files say norm_topk_prob true. A named
    config sets no field for it: the default (and a config.json without the field) must."""
    assert ModelArgs(**CONFIGS[name]).norm_topk_prob is True
    fields = {k: v for k, v in asdict(ModelArgs(**CONFIGS[name])).items() if k != "norm_topk_prob"}
    assert parse_config(fields, "config.json").norm_topk_prob is True


def test_a_decode_step_reads_the_chosen_experts_only_and_a_prompt_each_expert_once(monkeypatch):
    """What a forward reads, by the experts' weights() it asks for in every layer (w13 and w2): a
    decode step the rows of its token's k experts, by index (the gathered form); a prompt of more
    (token, expert) pairs than experts all the experts, once (the grouped form)."""
    from model import Experts
    model = tiny_model().to(torch.bfloat16)  # torch._grouped_mm takes bfloat16
    model.setup_caches(1, 16)
    asked, weights = [], Experts.weights

    def spy(self, idx, dtype):
        asked.append(idx)
        return weights(self, idx, dtype)
    monkeypatch.setattr(Experts, "weights", spy)
    with torch.no_grad():
        model(torch.randint(0, 97, (1, 9)), torch.arange(9))  # 18 pairs for 8 experts
        assert len(asked) == 2 * TINY["n_layer"] and all(idx is Ellipsis for idx in asked)
        asked.clear()
        model(torch.randint(0, 97, (1, 1)), torch.tensor([9]))
    assert len(asked) == 2 * TINY["n_layer"]
    k = TINY["n_active_experts"]
    for idx in asked:  # the same k distinct experts for w13 and w2 of a layer
        assert idx.shape == (1, k) and len(set(idx.tolist()[0])) == k
    assert all(torch.equal(asked[i], asked[i + 1]) for i in range(0, len(asked), 2))


def test_the_bytes_a_decode_step_reads_leave_out_the_unchosen_experts():
    model = tiny_model()  # float32: 8 experts of which 2 per token
    a = model.args
    expert_bytes = 4 * 3 * a.intermediate_size * a.dim  # one expert's w1, w2 and w3
    assert unchosen_expert_bytes(model, 1) == a.n_layer * 6 * expert_bytes
    # 3 tokens choose on average 8 (1 - (6/8)^3) = 4.625 distinct experts, far fewer than 3 x 2
    assert unchosen_expert_bytes(model, 3) == pytest.approx(a.n_layer * 3.375 * expert_bytes)


def test_random_prompts_give_each_row_its_own_so_a_batchs_rows_choose_experts_as_counted(
        monkeypatch):
    """generate.py's random prompts (bench.py's alike): one of its own a row, as a server's batch
    holds different requests. Rows of one prompt choose alike (8.5 distinct experts a step here,
    where 8 rows choosing 2 of 64 independently choose 14.4), and bytes_read_per_step would count
    experts no row read; rows of their own come within 15 % of that count."""
    import argparse
    import generate
    import model as M
    model, B, route, chosen = tiny_model(n_experts=64, n_layer=4), 8, M.route, []

    def spy(logits, k, normalize):
        weights, experts = route(logits, k, normalize)
        chosen.append(experts)
        return weights, experts
    monkeypatch.setattr(M, "route", spy)
    torch.manual_seed(1)
    args = argparse.Namespace(prompt=None, prompt_tokens=5, batch_size=B)
    prompts = generate.encode_prompts(args, None, TINY["vocab_size"])
    assert len(prompts) == B and len({tuple(p) for p in prompts}) == B
    model.setup_caches(B, 64)
    generate.generate(model, prompts, 40, Sampling())
    steps = [experts for experts in chosen if experts.shape[0] == B]  # (B, k) each: decode steps
    distinct = sum(experts.unique().numel() for experts in steps) / len(steps)
    counted = 64 * (1 - (1 - 2 / 64) ** B)
    assert 0.85 * counted <= distinct <= 1.05 * counted, (distinct, counted)


@pytest.mark.parametrize("fields, word", [
    (dict(n_experts=4, n_active_experts=0), "n_active_experts 0 must be between 1 and n_experts 4"),
    (dict(n_experts=4, n_active_experts=5), "n_active_experts 5 must be between 1"),
    (dict(n_experts=0, n_active_experts=2), "n_active_experts 2 must be between 1 and n_experts 0"),
    (dict(n_experts=-1), "n_experts must be an integer >= 0"),
    (dict(n_experts=4.0, n_active_experts=2), "n_experts must be an integer >= 0"),
    (dict(norm_topk_prob="yes"), "norm_topk_prob must be true or false"),
    (dict(qk_norm=1), "qk_norm must be true or false"),
])
def test_bad_expert_and_qk_norm_fields_are_refused_in_one_sentence(fields, word):
    from checkpoint import InputError, parse_config
    with pytest.raises(InputError, match=f"^config.json: {word}"):
        parse_config({**TINY, **fields}, "config.json")
