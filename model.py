"""A plain decoder-only Transformer with a static KV cache: Llama, Mistral, Qwen2, Qwen3, SmolLM2,
and with a mixture-of-experts feed-forward Mixtral and Qwen3-MoE.

One forward serves prefill (many positions) and decode (one position): both write their keys and
values into the preallocated cache at `input_pos` and attend over it with a mask. Everything here is
ordinary PyTorch so that `torch.compile` can fuse it; on a CUDA GPU kernels.prepare_for_device
sets the attributes that hand a step's attention, SwiGLU, router and experts to kernels.py
(decode_kernel, chunk_kernel, swiglu_kernel, router_kernel, Experts.kernel). checkpoint.py owns
files.
"""
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


@dataclass
class ModelArgs:
    dim: int
    n_layer: int
    n_head: int
    vocab_size: int
    intermediate_size: int
    n_kv_heads: Optional[int] = None  # None: same as n_head (plain multi-head attention)
    head_dim: Optional[int] = None  # None: dim // n_head
    block_size: int = 2048  # longest sequence (prompt + generated) the model supports
    rope_base: float = 10000.0
    # Llama-3.1's "llama3" scaling: factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings. None: plain rotary embeddings.
    rope_scaling: Optional[dict] = None
    norm_eps: float = 1e-5
    attention_bias: bool = False  # bias on the q/k/v projection (Qwen2)
    qk_norm: bool = False  # RMSNorm on each head's q and k before rotary (Qwen3)
    tie_embeddings: bool = False  # output layer shares the token embedding matrix
    # Mixture of experts (Mixtral, Qwen3-MoE): n_experts SwiGLU FFNs of intermediate_size each, of
    # which a router picks n_active_experts per token. 0: one dense FFN.
    n_experts: int = 0
    n_active_experts: int = 0
    norm_topk_prob: bool = True  # the chosen experts' probabilities rescaled to sum to 1

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_head
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_head


class KVCache(nn.Module):
    """Keys and values for every position up to max_seq_length, allocated once; written in place."""

    def __init__(self, batch_size: int, n_kv_heads: int, max_seq_length: int, head_dim: int, dtype,
                 device):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_length, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor,
               row: int | Tensor = 0) -> tuple[Tensor, Tensor]:
        # k, v: (B, n_kv_heads, T, head_dim) for cache rows row..row + B - 1, or the one row a
        # tensor (1,) names; input_pos (B, T): each row's own slots. Written into the whole cache,
        # not into a slice of its rows: inductor copies a slice that is written through and copies
        # it back (the whole cache, every step).
        B = k.shape[0]
        rows = row if isinstance(row, Tensor) else torch.arange(row, row + B, device=k.device)
        b = rows[:, None]  # (B, 1)
        # Index tensors at dims 0 and 2 put their (B, T) first: values (B, T, heads, head_dim).
        self.k[b, :, input_pos] = k.transpose(1, 2)
        self.v[b, :, input_pos] = v.transpose(1, 2)
        if isinstance(row, Tensor):
            return self.k[row], self.v[row]  # (1, n_kv_heads, S, head_dim), a copy
        return self.k[row:row + B], self.v[row:row + B]  # (B, n_kv_heads, S, head_dim), views


class Rows(NamedTuple):
    """A group of B rows of T tokens as attention sees them: token t of row b writes cache row
    `row + b` at slot input_pos[b, t] (B, T) and reads that row through its mask (B, 1, T, S); its
    rotary cos and sin rope (B, T, 2, 1, head_dim). Made once per forward, shared by the layers.
    A tensor row (1,) holds a server's prompt chunk (B = 1): a cache row chosen at run time."""
    input_pos: Tensor
    rope: Tensor
    mask: Tensor
    row: int | Tensor = 0


class RMSNorm(nn.RMSNorm):
    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32 (bf16 squares lose too much), then scale in the model's dtype as HF's
        # Llama does (nn.RMSNorm scales in float32: other bf16 numerics, a slower compiled decode).
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_head, self.n_kv_heads, self.head_dim = args.n_head, args.n_kv_heads, args.head_dim
        qkv_dim = (args.n_head + 2 * args.n_kv_heads) * args.head_dim
        # q, k and v in one matmul
        self.wqkv = nn.Linear(args.dim, qkv_dim, bias=args.attention_bias)
        self.wo = nn.Linear(args.n_head * args.head_dim, args.dim, bias=False)
        if args.qk_norm:
            self.q_norm = RMSNorm(args.head_dim, args.norm_eps)
            self.k_norm = RMSNorm(args.head_dim, args.norm_eps)
        self.qk_norm = args.qk_norm
        self.kv_cache: Optional[KVCache] = None
        self.decode_kernel = None  # kernels.decode_attention, where prepare_for_device gives one
        self.chunk_kernel = None  # kernels.chunk_attention_op, likewise

    def forward(self, x: Tensor, groups: list) -> Tensor:
        """x (..., dim): the tokens of every group of rows in `groups`, in order. They share each
        matmul (one read of the weights); each group attends in its own cache rows."""
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_kv_heads * self.head_dim
        qkv = self.wqkv(x).flatten(0, -2)  # (N, qkv_dim), N tokens
        ys = []
        for part, g in zip(qkv.split([g.input_pos.numel() for g in groups]), groups):
            B, T = g.input_pos.shape
            # (a prompt's piece of one token, in a cache row chosen at run time, is no decode step)
            if T == 1 and self.decode_kernel is not None and not isinstance(g.row, Tensor):
                # q/k norm, rotary, cache write and attention in one kernel, reading qkv whole
                ys.append(self.decode_kernel(self, part, g))  # (B, n_head * head_dim)
                continue
            q, k, v = part.view(B, T, -1).split([q_dim, kv_dim, kv_dim], dim=-1)
            q = q.view(B, T, self.n_head, self.head_dim)  # (B, T, n_head, head_dim)
            k = k.view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, n_kv_heads, head_dim)
            v = v.view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, n_kv_heads, head_dim)
            if self.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = apply_rope(q, g.rope), apply_rope(k, g.rope)
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, head_dim)
            k, v = self.kv_cache.update(g.input_pos, k, v, g.row)  # (B, n_kv_heads, S, head_dim)
            if isinstance(g.row, Tensor) and self.chunk_kernel is not None:
                # a prompt's chunk attends in its request's cache row where it lies; the copy of
                # the row update returns goes unused (compiled, it is never made)
                y = self.chunk_kernel(q[0].transpose(0, 1), self.kv_cache.k, self.kv_cache.v,
                                      g.row, g.input_pos[0])  # (T, n_head, head_dim)
                ys.append(y.reshape(T, q_dim))
                continue
            # enable_gqa: query head h reads kv head h // (n_head // n_kv_heads), without copying
            # (repeat_interleave over dim 1 would copy k and v into that order).
            gqa = self.n_head != self.n_kv_heads
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=g.mask, enable_gqa=gqa)
            y = y.transpose(1, 2)  # (B, T, n_head, head_dim)
            ys.append(y.reshape(B * T, q_dim))  # (B * T, n_head * head_dim)
        y = ys[0] if len(ys) == 1 else torch.cat(ys)  # (N, n_head * head_dim)
        return self.wo(y.view(*x.shape[:-1], -1))  # (..., dim)


def swiglu(gate_up: Tensor) -> Tensor:
    """SiLU(gate) * up of a w13 output (..., 2 * inter), its two halves: (..., inter)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        # gate (w1) and up (w3) fused into one matmul
        self.w13 = nn.Linear(args.dim, 2 * args.intermediate_size, bias=False)
        self.w2 = nn.Linear(args.intermediate_size, args.dim, bias=False)
        self.swiglu_kernel = None  # kernels.swiglu_linear, where prepare_for_device gives one

    def forward(self, x: Tensor) -> Tensor:
        if self.swiglu_kernel is not None:  # SiLU(gate) * up inside w13's kernel
            return self.w2(self.swiglu_kernel(self.w13, x))
        return self.w2(swiglu(self.w13(x)))


class Experts(nn.Module):
    """n_experts linear layers of one shape, stacked: weight (n_experts, out_features, in_features),
    so that a decode step can read the rows of the experts it chose, by index. kernels.py has the
    quantized kinds, which give weights(), gathered() and grouped() alike."""

    def __init__(self, n_experts: int, in_features: int, out_features: int):
        super().__init__()
        self.n_experts, self.in_features, self.out_features = n_experts, in_features, out_features
        self.weight = nn.Parameter(torch.empty(n_experts, out_features, in_features))
        self.kernel = None  # kernels.expert_matmul, where kernels.prepare_for_device gives one

    def weights(self, idx, dtype) -> Tensor:
        """The weights of experts idx (an expert id, a tensor of ids, or ... for all) in dtype:
        idx's shape, then (out_features, in_features)."""
        return self.weight[idx].to(dtype)

    def gathered(self, x: Tensor, experts: Tensor, swiglu_out: bool = False) -> Tensor:
        """x (M, 1 or k, in_features) through the experts (M, k) chosen for each token:
        (M, k, out_features), reading only their weights; swiglu_out: swiglu of that in x's dtype
        (M, k, out_features / 2), which the kernel applies to its sums before storing them (one
        launch less). Without a kernel, multiply and sum, which inductor compiles into one
        reduction reading the chosen rows where they lie (`w[experts] @ x` would copy them)."""
        if self.kernel is not None:  # its sums come back in float32 (swiglu_out's in x's dtype)
            return self.kernel(x, experts, self.weight, swiglu_out=swiglu_out)
        y = (self.weights(experts, x.dtype) * x[..., None, :]).sum(dim=-1)
        return swiglu(y) if swiglu_out else y

    def grouped(self, xs: Tensor, ends: Tensor) -> Tensor:
        """Rows xs (P, in_features) bf16, the (token, expert) pairs sorted by expert, through
        their experts, ends (n_experts,) int32 where each expert's rows end: (P, out_features),
        each expert's weights read once."""
        return torch._grouped_mm(xs, self.weights(..., xs.dtype).transpose(1, 2), offs=ends)


class MoEFeedForward(nn.Module):
    """A router picks n_active_experts of n_experts SwiGLU FFNs for each token; the token's output
    is theirs, weighted by the router's probabilities. Mixtral renormalises the chosen experts'
    probabilities (a softmax over their logits), Qwen3-MoE where norm_topk_prob says so."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate = nn.Linear(args.dim, args.n_experts, bias=False)  # the router
        # gate (w1) and up (w3) fused, per expert
        self.w13 = Experts(args.n_experts, args.dim, 2 * args.intermediate_size)
        self.w2 = Experts(args.n_experts, args.intermediate_size, args.dim)
        self.n_active, self.norm_topk_prob = args.n_active_experts, args.norm_topk_prob
        self.router_kernel = None  # kernels.router_top_k, where prepare_for_device gives one

    def forward(self, x: Tensor) -> Tensor:
        B, T, dim = x.shape
        x = x.view(B * T, dim)  # (M, dim): tokens
        router = route if self.router_kernel is None else self.router_kernel  # one launch on a GPU
        weights, experts = router(self.gate(x), self.n_active, self.norm_topk_prob)  # (M, k)
        # Static shapes decide (no host sync): a few tokens (decode) read only the experts they
        # chose, more (prefill, large batches) every expert once.
        few = experts.numel() <= self.w13.n_experts
        y = self.gathered(x, experts) if few else self.grouped(x, experts)  # (M, k, dim)
        # Weighted in float32, as the router's probabilities are, and added term by term: compiled,
        # the k terms fuse into the next kernel (the residual add and RMSNorm), where a sum over
        # dim 1 would be a reduction kernel of its own, a launch a layer.
        out = y[:, 0] * weights[:, :1]  # (M, dim)
        for i in range(1, self.n_active):
            out = out + y[:, i] * weights[:, i:i + 1]
        return out.to(x.dtype).view(B, T, dim)

    def gathered(self, x: Tensor, experts: Tensor) -> Tensor:
        """Each token through its chosen experts, their weights read by index: (M, k, dim)."""
        h = self.w13.gathered(x[:, None, :], experts, swiglu_out=True)  # (M, k, inter)
        return self.w2.gathered(h, experts)  # (M, k, dim)

    def grouped(self, x: Tensor, experts: Tensor) -> Tensor:
        """The (token, expert) pairs sorted by expert, then one grouped matmul per weight: each
        expert's weights are read once and multiply only its own tokens. (M, k, dim)"""
        # torch._grouped_mm takes bf16 only (on CUDA, and compiled), in rows of whole 16 bytes
        if x.dtype != torch.bfloat16 or self.w13.in_features % 8 or self.w2.in_features % 8:
            return self.looped(x, experts)
        M, k = experts.shape
        order = experts.flatten().argsort(stable=True)  # (M * k,): pairs, expert by expert
        ids = torch.arange(self.w13.n_experts, device=x.device)
        # where each expert's pairs end, (n_experts,)
        ends = torch.searchsorted(experts.flatten()[order], ids, right=True).int()
        xs = x[order // k]  # (M * k, dim)
        h = swiglu(self.w13.grouped(xs, ends))  # (M * k, inter)
        ys = self.w2.grouped(h, ends)  # (M * k, dim), sorted
        return torch.empty_like(ys).index_copy_(0, order, ys).view(M, k, -1)

    def looped(self, x: Tensor, experts: Tensor) -> Tensor:
        """grouped's result, one expert at a time over every token, kept where it was chosen: each
        expert read once, n_experts / k times the arithmetic. (M, k, dim)"""
        y = x.new_zeros(*experts.shape, x.shape[-1])  # (M, k, dim)
        for e in range(self.w13.n_experts):
            h = F.linear(swiglu(F.linear(x, self.w13.weights(e, x.dtype))),
                         self.w2.weights(e, x.dtype))  # (M, dim)
            y = torch.where((experts == e)[..., None], h[:, None, :], y)
        return y


def route(logits: Tensor, k: int, normalize: bool) -> tuple[Tensor, Tensor]:
    """The router's choice for logits (M, n_experts): each token's k largest softmax probabilities
    in float32, rescaled to sum to 1 where `normalize` says so, and their experts; (M, k) each,
    unordered."""
    weights, experts = F.softmax(logits.float(), dim=-1).topk(k, dim=-1, sorted=False)
    return (weights / weights.sum(dim=-1, keepdim=True) if normalize else weights), experts


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = MoEFeedForward(args) if args.n_experts else FeedForward(args)

    def forward(self, x: Tensor, groups: list) -> Tensor:
        h = x + self.attention(self.attention_norm(x), groups)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layer))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.max_batch_size = self.max_seq_length = -1

    def setup_caches(self, max_batch_size: int, max_seq_length: int):
        """Allocate the KV cache and rotary table once; later forwards write into them in place.
        The slots are rounded up to a multiple of 8 (at most block_size): inductor's attention
        lowering aligns the mask's rows to 8, and an unaligned cache costs a mask copy in every
        layer. No real token's query sees the extra slots (a server's padded chunk may write the
        last one)."""
        max_seq_length = min(-(-max_seq_length // 8) * 8, self.args.block_size)
        self.max_batch_size, self.max_seq_length = max_batch_size, max_seq_length
        dtype, device = self.tok_embeddings.weight.dtype, self.tok_embeddings.weight.device
        for layer in self.layers:
            a = layer.attention
            a.kv_cache = KVCache(max_batch_size, a.n_kv_heads, max_seq_length, a.head_dim, dtype,
                                 device)
        rope = rope_table(self.args, max_seq_length).to(device)  # (S, 2, 1, head_dim), float32
        self.register_buffer("rope", rope, persistent=False)

    def forward(self, idx: Tensor, input_pos: Tensor, last: Optional[Tensor] = None,
                chunk: Optional[tuple] = None) -> Tensor:
        """idx (B, T) token ids at cache slots input_pos: (B, T), each row its own slots, or (T,)
        shared by every row. Row b writes cache row b. A row's rotary positions are its
        slots, so every row starts at slot 0: prompts of different lengths share a batch padded on
        the right, and a padding key is never visible to the row's real tokens (it sits after them)
        and is overwritten by its decode steps. Returns logits (B, T, vocab_size), or with `last`
        (B,) only those at column last[b] of each row (B, 1, vocab_size): all a prefill needs (a
        128k vocabulary times a long prompt is gigabytes of logits).

        chunk: (ids (1, C), slots (1, C), cache row (1,)), a piece of a prompt riding along (the
        server's decode steps): its tokens share every matmul with idx's, one read of the weights
        for both, attend in their request's cache row, and give no logits."""
        B, T = idx.shape
        x = self.tok_embeddings(idx)  # (B, T, dim)
        places = [(input_pos.expand(B, T), 0)]  # each group's slots (B, T) and first cache row
        if chunk is not None:
            chunk_idx, chunk_pos, chunk_row = chunk
            # (1, B * T + C, dim)
            x = torch.cat([x.view(1, B * T, -1), self.tok_embeddings(chunk_idx)], dim=1)
            places.append((chunk_pos, chunk_row))
        dtype = self.tok_embeddings.weight.dtype
        # rope (B, T, 2, 1, head_dim), mask (B, 1, T, S)
        groups = [Rows(pos, self.rope[pos], attention_mask(pos, self.max_seq_length, dtype), row)
                  for pos, row in places]
        for layer in self.layers:
            x = layer(x, groups)
        if chunk is not None:
            x = x[0, :B * T].view(B, T, -1)  # (B, T, dim)
        if last is not None:
            x = x.gather(1, last.view(B, 1, 1).expand(B, 1, x.size(-1)))  # (B, 1, dim)
        return self.output(self.norm(x))  # (B, T or 1, vocab_size)


def attention_mask(input_pos: Tensor, n_slots: int, dtype) -> Tensor:
    """Which cache slots a query sees: an additive mask (B, 1, T, S) in the activations' dtype, 0
    where it sees the slot and -inf where not (the 1 broadcasts over heads), made once per forward
    rather than converted in every layer. Causal per row: the query at slot input_pos[b, t] sees
    that row's slots 0..input_pos[b, t], its own among them, so no row of the softmax is all -inf.
    The attention kernels of CUDA steps (kernels.decode_attention, kernels.chunk_attention_op)
    apply the same rule themselves."""
    slots = torch.arange(n_slots, device=input_pos.device)  # (S,)
    allowed = slots <= input_pos[:, :, None]  # (B, T, S)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill(~allowed, float("-inf"))[:, None]  # (B, 1, T, S)


def rope_table(args: ModelArgs, seq_len: int) -> Tensor:
    """Each position's cos and signed sin per query/key column, float32 (seq_len, 2, 1, head_dim):
    pair i (columns 2i, 2i + 1) turns by angle position * freq_i, so [p, 0] = (c0, c0, c1, c1, ...)
    and [p, 1] = (-s0, s0, -s1, s1, ...); the 1 broadcasts over heads. In float32 throughout, as
    Meta's and transformers' models compute it: an angle's rounding grows with the position (1e-3
    at 32k), and a model is run best with the angles it was trained with."""
    exponents = torch.arange(0, args.head_dim, 2, dtype=torch.float32) / args.head_dim
    freqs = 1.0 / (args.rope_base ** exponents)  # (head_dim // 2,)
    if args.rope_scaling is not None:
        freqs = llama3_scale(freqs, **args.rope_scaling)
    positions = torch.arange(seq_len, dtype=torch.float32)
    angles = torch.outer(positions, freqs)  # (seq_len, head_dim // 2)
    cos = angles.cos().repeat_interleave(2, dim=-1)  # (seq_len, head_dim)
    sin = torch.stack([-angles.sin(), angles.sin()], dim=-1).flatten(1)  # (seq_len, head_dim)
    return torch.stack([cos, sin], dim=1)[:, :, None]


def llama3_scale(freqs: Tensor, factor: float, low_freq_factor: float, high_freq_factor: float,
                 original_max_position_embeddings: int) -> Tensor:
    """Llama-3.1's rope scaling: long wavelengths slowed by `factor`, short ones kept, a blend
    between."""
    wavelen = 2 * math.pi / freqs
    context = original_max_position_embeddings
    smooth = (context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * freqs / factor + smooth * freqs
    scaled = torch.where(wavelen > context / low_freq_factor, freqs / factor, blended)
    return torch.where(wavelen < context / high_freq_factor, freqs, scaled)


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    """Rotate adjacent pairs (a, b) = (x[2i], x[2i+1]) by position-dependent angles (Meta's
    interleaved layout) to (a cos - b sin, b cos + a sin), as x * cos + (b, a) * signed sin: the
    same float32 products and sums, and half the operations of rotating the pairs apart (eager
    decode on a CPU pays per operation). x (B, T, heads, head_dim), rope (B, T, 2, 1, head_dim)."""
    cos, sin = rope.unbind(2)  # (B, T, 1, head_dim) each
    x32 = x.float()
    swapped = x32.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x1, x0, x3, x2, ...)
    return (x32 * cos + swapped * sin).type_as(x)
