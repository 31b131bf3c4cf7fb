"""Triton kernels for quantized weights (int8, fp8, int4), and the quantized linear layers: a
weight-only GEMV (one row of activations), a small matmul (2 to 64 rows: decode batches,
speculative verifies; int4's single rows too, which have no GEMV; one-byte weights up to 256
rows, in blocks: a server's prompt chunks, short prompts) and a dequantized copy of the weights
for longer inputs (prefills).

At batch 1 a linear layer is a matrix-vector product: each weight is read once and used once, so
the kernel's only job is to stream the weights at full memory bandwidth, which torch.compile's
fusion of `F.linear(x, w_int8.to(bf16)) * scales` falls well short of (BENCHMARKS.md has the
measurements). The GEMV reads the one-byte weights as int32 words of four (wide loads), a
(BLOCK_N rows, BLOCK_WORDS words) tile per step, converts each byte in registers, multiplies by the
matching x values and accumulates in float32, reducing over K once at the end. bf16 and fp16 x are
read alike, as int64 words of four values in the weights' tile layout, so that no exchange through
shared memory (with its barriers) comes between a load and its multiplies. One tile for each kind
of weight serves every layer shape (GEMV_TILES). The weights are int8 (Int8Linear) or fp8 e4m3
(Fp8Linear), one scale per output row. On Hopper and later GPUs, in a model whose layers all take
single rows through it, the GEMV starts while the kernel before it ends and loads its first
weights then (PDL below). A dense feed-forward's w13 (bf16 or int8) gives SiLU(gate) * up from the
same GEMV, one launch a layer less (swiglu_linear); an int4 one from int4's kernel alike.

With a few rows, the matmul keeps all of them in one tile, so each weight is still read once,
converts the weights to bf16 in registers (int8 and fp8 exactly; int4, laid out at load as words of
eight nibbles in tiles that each program reads as one run of memory, by bit operations, its groups'
scales and zeros applied to the sums) and multiplies on the tensor cores (`tl.dot`); on Hopper and
later GPUs one-byte weight tiles arrive by asynchronous copies (TMA), a few tiles ahead. It replaces
what torch.compile makes of the PyTorch path for a decode batch, aten._weight_int8pack_mm, whose
CUDA kernel is far slower at a few rows. Longer inputs are compute-bound: one pass writes the
layer's weights in bf16, and cuBLAS multiplies.

A mixture of experts decodes with the same GEMV indexed by expert: each (token, chosen expert)
pair times that expert's weights (bf16, fp16 and float32 too, read as they are), one program per
(row block, part of K, pair), so that even a few small experts (Qwen3-30B-A3B's 768 x 2048) give
every SM weights to stream, and only the chosen experts' rows are read. Prompts and batches of more
(token, expert) pairs than experts take the grouped form: the pairs sorted by expert, one program
per (expert, column block) walks its expert's rows, so each chosen one-byte expert is read once
and converted in registers, where the PyTorch form writes every expert of the layer in bf16 first.

Four kernels are not about weights. The decode attention kernel: a decode token's rotary
embedding, KV cache write and attention over its row's filled slots, one launch a layer where the
compiled PyTorch path makes five (model.Attention uses it on CUDA in bf16 and fp16,
prepare_for_device gives it; prefills keep SDPA), its long rows split and combined by a second. The
chunk attention kernel: a server's prompt chunk riding on a decode step. The router kernel: a
mixture's softmax, top k and rescaling in one launch. The top-k kernel: sampling's top k of the
vocabulary in two launches (generate.py calls top_k).

The layers keep a plain PyTorch path (CPUs, GPUs without Triton), which is also the reference the
kernels are checked against: `check_kernels` on the GPU (scripts/bench.py runs it first),
tests/test_kernels.py in Triton's CPU interpreter. On the CPU, decode goes to PyTorch's own
weight-only int8 and int4 kernels (see "CPU kernels" below; tests/test_cpu_kernels.py).
"""
import copy
import functools
from typing import Optional

import torch
import torch._inductor.config as inductor_config
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from model import (Attention, Experts, FeedForward, KVCache, ModelArgs, MoEFeedForward, Rows,
                   attention_mask, rope_table, route, swiglu)

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the callers then keep their PyTorch path
    triton = None
try:  # host-made tensor descriptors (recent Triton), for the small matmul's weight loads
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None
# griddepcontrol, for programmatic dependent launches (Triton 3.4 and later; see PDL)
GRID_DEPENDENCY_CONTROL = (triton is not None
                           and hasattr(getattr(tl.extra, "cuda", None), "gdc_wait"))


if triton is not None:
    @triton.jit
    def small_int_to_float(i):
        """int32 values i in [-2**22, 2**22) as float32, exactly, by an integer add and a float
        subtract: the bits of 1.5 * 2**23 plus i are the float 1.5 * 2**23 + i (a float of that
        size counts in units of 1). The small matmul converts every int8 weight it reads for the
        tensor cores, and `.to(tl.float32)` compiled there to byte permutes and half-precision
        adds: this form takes 5-6 % less time a pass (BENCHMARKS.md)."""
        return (i + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0

    @triton.jit
    def byte_to_float(words, j: tl.constexpr, FP8: tl.constexpr):
        """Byte j of each loaded int32 word as float32: an fp8 e4m3 bit pattern, or an int8
        value."""
        if FP8:
            value = (((words >> (8 * j)) & 0xFF).to(tl.uint8)
                     .to(tl.float8e4nv, bitcast=True).to(tl.float32))
        else:  # byte j to the top, then an arithmetic shift down: one conversion instruction
            # (small_int_to_float's two instructions gain nothing: the GEMV waits on memory)
            value = ((words << (24 - 8 * j)) >> 24).to(tl.float32)
        return value

    # word_weights' PTX for an int32 word ($4) of four fp8 e4m3 weights: the conversion of two at
    # once to fp16 (compute capability 8.9 and later), then each fp16 to float32 (both exact).
    FP8_PTX = tl.constexpr("""{
        .reg .b16 lo, hi;
        .reg .b32 h;
        mov.b32 {lo, hi}, $4;
        cvt.rn.f16x2.e4m3x2 h, lo;
        mov.b32 {lo, hi}, h;
        cvt.f32.f16 $0, lo;
        cvt.f32.f16 $1, hi;
        mov.b32 {lo, hi}, $4;
        cvt.rn.f16x2.e4m3x2 h, hi;
        mov.b32 {lo, hi}, h;
        cvt.f32.f16 $2, lo;
        cvt.f32.f16 $3, hi;
        }""")

    @triton.jit
    def word_weights(words, PER_WORD: tl.constexpr, FP8: tl.constexpr, PTX: tl.constexpr):
        """The PER_WORD weights of each loaded word as float32, a tuple of tensors shaped like
        words: a float weight itself (PER_WORD 1), or the four bytes of an int32 word (PER_WORD 4)
        by byte_to_float, or fp8's by FP8_PTX (PTX, on Hopper and later GPUs): 237 instructions in
        the GEMV's loop where Triton's form, picking each byte out first, takes 325 (and int8's I2F
        230), and a pass over Llama-2-7B's layers 7 % faster on an H200."""
        if FP8 and PTX:
            return tl.inline_asm_elementwise(
                asm=FP8_PTX, constraints="=r,=r,=r,=r,r", args=[words], dtype=(tl.float32,) * 4,
                is_pure=True, pack=1)
        elif PER_WORD == 1:
            return (words.to(tl.float32),)
        else:
            return (byte_to_float(words, 0, FP8), byte_to_float(words, 1, FP8),
                    byte_to_float(words, 2, FP8), byte_to_float(words, 3, FP8))

    @triton.jit
    def half_to_float(x_words, j: tl.constexpr, X16: tl.constexpr):
        """Value j of each int64 word of four 16-bit activations of type X16 (tl.bfloat16 or
        tl.float16), as float32."""
        return ((x_words >> (16 * j)) & 0xFFFF).to(tl.int16).to(X16, bitcast=True).to(tl.float32)

    @triton.jit
    def weight_words(w_ptr, row_start, c0, last, row_ok, BLOCK_WORDS: tl.constexpr):
        """Word columns [c0, c0 + BLOCK_WORDS) of the rows starting at row_start, those from
        `last` on and rows not row_ok read as 0: weight 0 (int8) or +0.0 (fp8), never an
        undefined NaN pattern. The weights stream through once a step (experts that a batch's
        tokens share aside): first out of the L2 cache, before x and what the next kernels
        read."""
        c = c0 + tl.arange(0, BLOCK_WORDS)  # (BLOCK_WORDS,)
        return tl.load(w_ptr + row_start[:, None] + c[None, :],
                       mask=row_ok[:, None] & (c < last)[None, :], other=0,
                       eviction_policy="evict_first")

    @triton.jit
    def scaled_gemv_kernel(x_ptr, w_ptr, s_ptr, ids_ptr, y_ptr, N, K_WORDS, WORDS_PER_SPLIT,
                           PAIRS_PER_ROW, PER_WORD: tl.constexpr, FP8: tl.constexpr,
                           X16: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_WORDS: tl.constexpr,
                           SWIGLU: tl.constexpr = False, PDL: tl.constexpr = False,
                           LAUNCH_NEXT: tl.constexpr = False, PTX: tl.constexpr = False):
        """y[split, p, n] = scales[e, n] * sum over the split's columns k of x[r, k] * w[e, n, k]
        for BLOCK_N rows n (program_id 0) of pair p (program_id 2): expert e = ids[p] and x row
        r = p // PAIRS_PER_ROW (ids None: a plain GEMV, e = 0; scales None: no scaling).
        w_ptr is (n_experts, N, K_WORDS) row-major words of PER_WORD weights: one-byte weights
        (int8 or fp8) read as int32 words of four (wide loads), or float weights one a word
        (bf16, fp16: 8 to a 128-bit load); K = PER_WORD K_WORDS. Split s (program_id 1) takes
        words [s * WORDS_PER_SPLIT, (s + 1) * WORDS_PER_SPLIT). x_ptr is x's rows as they are, or
        (X16 given, PER_WORD 4) 16-bit activations of type X16 read as int64 words of four, a
        word of x for a word of weights. SWIGLU (one split): N counts the outputs; the 2 N
        weight rows (an expert's, or the plain GEMV's) and their scales are a gate projection
        and then an up projection, and y[0, p, n] = SiLU(gate n) * up n, its two sums scaled
        first: the feed-forward's activation in the GEMV, one launch less a layer; a program
        holds BLOCK_N gate rows and their BLOCK_N up rows. PDL (a plain GEMV launched as a
        programmatic dependent launch): the first weight tile is loaded before waiting for the
        kernel before this one, whose output x is, so that the weights stream while it ends; with
        ids, only where they were written before that kernel started (expert_gemv_partials).
        LAUNCH_NEXT (a plain launch): the next kernel may launch at this one's start. PTX: fp8
        weights converted by FP8_PTX (word_weights)."""
        pair = tl.program_id(2)
        expert = 0
        if ids_ptr is not None:
            expert = tl.load(ids_ptr + pair).to(tl.int64)
        x_per_word: tl.constexpr = 1 if X16 is not None else PER_WORD
        x_row = x_ptr + (pair // PAIRS_PER_ROW).to(tl.int64) * (x_per_word * K_WORDS)
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        row_ok = rows < N
        # int64: N * K passes 2**31 in the largest models
        expert_rows = 2 * N if SWIGLU else N
        row_start = (rows + expert * expert_rows).to(tl.int64) * K_WORDS
        first = tl.program_id(1) * WORDS_PER_SPLIT
        last = tl.minimum(first + WORDS_PER_SPLIT, K_WORDS)
        acc = tl.zeros((BLOCK_N, BLOCK_WORDS), dtype=tl.float32)
        up_acc = tl.zeros((BLOCK_N, BLOCK_WORDS), dtype=tl.float32)  # SWIGLU's up rows
        # a dependent launch lets the next kernel launch only after its own wait
        tl.static_assert(not (PDL and LAUNCH_NEXT))
        if LAUNCH_NEXT:
            tl.extra.cuda.gdc_launch_dependents()
        if PDL:
            words = weight_words(w_ptr, row_start, first, last, row_ok, BLOCK_WORDS)
            tl.extra.cuda.gdc_wait()  # the kernel before has written x
            # Only now may the next kernel launch: inductor's kernels wait for the one before them
            # alone, which holds only if each kernel lets the next launch after its own wait.
            tl.extra.cuda.gdc_launch_dependents()
        for c0 in range(0, WORDS_PER_SPLIT, BLOCK_WORDS):
            c = first + c0 + tl.arange(0, BLOCK_WORDS)  # (BLOCK_WORDS,) word columns
            ok = row_ok[:, None] & (c < last)[None, :]
            if PDL:
                if c0 > 0:
                    words = weight_words(w_ptr, row_start, first + c0, last, row_ok, BLOCK_WORDS)
            else:
                words = weight_words(w_ptr, row_start, first + c0, last, row_ok, BLOCK_WORDS)
            up_words = words
            if SWIGLU:  # the up rows, N rows below the gate rows
                up_start = (rows + expert * expert_rows + N).to(tl.int64) * K_WORDS
                up_words = weight_words(w_ptr, up_start, first + c0, last, row_ok, BLOCK_WORDS)
            if X16 is not None:
                # x's words as a tile shaped like the weights' (each column repeated down the
                # rows; in the int8 tile's SASS for sm_90 a thread loads each of its words once,
                # the repeats merged): loaded as rows, x would reach the weights' layout through
                # shared memory, two barriers a load (int8: 5-10 % slower a pass; float experts
                # keep the row load, which is faster for them: BENCHMARKS.md).
                x_words = tl.load(x_row + c[None, :], mask=ok, other=0)  # (BLOCK_N, BLOCK_WORDS)
            ws = word_weights(words, PER_WORD, FP8, PTX)  # PER_WORD x (BLOCK_N, BLOCK_WORDS)
            up_ws = word_weights(up_words, PER_WORD, FP8, PTX) if SWIGLU else ws
            for j in tl.static_range(PER_WORD):  # weight j of word c is column PER_WORD c + j
                if X16 is not None:
                    x = half_to_float(x_words, j, X16)
                else:
                    x = tl.load(x_row + PER_WORD * c + j, mask=c < last, other=0.0)[None, :]
                acc += ws[j] * x.to(tl.float32)  # one reduction over k at the end
                if SWIGLU:
                    up_acc += up_ws[j] * x.to(tl.float32)
        y = tl.sum(acc, axis=1)  # (BLOCK_N,)
        if s_ptr is not None:
            y *= tl.load(s_ptr + expert * expert_rows + rows, mask=row_ok,
                         other=0.0).to(tl.float32)
        if SWIGLU:
            up = tl.sum(up_acc, axis=1)  # (BLOCK_N,)
            if s_ptr is not None:
                up *= tl.load(s_ptr + expert * expert_rows + N + rows, mask=row_ok,
                              other=0.0).to(tl.float32)
            y = y * tl.sigmoid(y) * up
        out = (tl.program_id(1) * tl.num_programs(2) + pair) * N + rows
        tl.store(y_ptr + out, y.to(y_ptr.dtype.element_ty), mask=row_ok)

    @triton.jit
    def weight_tile(w_ptr, s_ptr, n0, k0, N, K, SCALED: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, dtype: tl.constexpr, TMA: tl.constexpr = False):
        """Columns [k0, k0 + BLOCK_K) of one-byte weight rows [n0, n0 + BLOCK_N) (int8 or fp8,
        (N, K)), (BLOCK_N, BLOCK_K) in dtype, converted exactly, times their row's scale first
        where SCALED (in float32); w_ptr points at the weights, or (TMA) is a tensor descriptor of
        them whose block is that tile. Rows past N and columns past K come back as zeros; through
        a descriptor, those past its own bounds (grouped_mm_kernel's spans every expert's rows: it
        masks the rows past N at its store)."""
        cols = n0 + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        col_ok = cols < N
        if TMA:  # out-of-bounds bytes read as zeros: 0 in int8, +0.0 in fp8
            w = w_ptr.load([n0, k0])
        else:
            k = k0 + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
            ok = col_ok[:, None] & (k[None, :] < K)
            # No `other=` (Triton can't cast one to fp8); masked lanes are undefined, and
            # NaN * 0 is NaN: zero them (below).
            w = tl.load(w_ptr + cols.to(tl.int64)[:, None] * K + k[None, :], mask=ok)
        if w.dtype == tl.int8:
            w = small_int_to_float(w.to(tl.int32))
        else:
            w = w.to(tl.float32)
        if not TMA:
            w = tl.where(ok, w, 0.0)
        if SCALED:
            w *= tl.load(s_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[:, None]
        return w.to(dtype)

    @triton.jit
    def quantized_mm_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, K_PER_SPLIT,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            TMA: tl.constexpr = False, X_TMA: tl.constexpr = False,
                            PDL: tl.constexpr = False):
        """y[s, m, n] = sum over split s's columns k of x[m, k] * w[n, k] * scales[n], for the
        BLOCK_M rows of block program_id(0) and BLOCK_N outputs n (program_id 1); split s
        (program_id 2) takes columns [s K_PER_SPLIT, (s + 1) K_PER_SPLIT). x (M, K) bf16 or fp16,
        or (X_TMA) a tensor descriptor of it with blocks (BLOCK_M, BLOCK_K); w one-byte weights as
        weight_tile reads them, converted to x's dtype in registers for the tensor cores
        (`tl.dot`); the row scales multiply the sums. y float32 partial sums. The row blocks of a
        weight tile are neighbours in the grid, so they run side by side and read it from L2.
        PDL (a programmatic dependent launch): the programs wait for the kernel before this one,
        whose output x is, before any load, and let no kernel launch early (MM_PDL)."""
        if PDL:
            tl.extra.cuda.gdc_wait()
        m0 = tl.program_id(0) * BLOCK_M
        rows = m0 + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
        n0 = tl.program_id(1) * BLOCK_N
        cols = n0 + tl.arange(0, BLOCK_N)  # (BLOCK_N,) output features
        first = tl.program_id(2) * K_PER_SPLIT
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # transposed: y^T = w x^T
        for k0 in range(first, tl.minimum(first + K_PER_SPLIT, K), BLOCK_K):
            if X_TMA:
                x = x_ptr.load([m0, k0])  # (BLOCK_M, BLOCK_K); past M or K: zeros
            else:
                k = k0 + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
                x = tl.load(x_ptr + rows[:, None] * K + k[None, :],
                            mask=(rows[:, None] < M) & (k[None, :] < K), other=0.0)
            w = weight_tile(w_ptr, s_ptr, n0, k0, N, K, False, BLOCK_N, BLOCK_K, x.dtype,
                            TMA)  # (BLOCK_N, BLOCK_K)
            # The converted weights are the left operand, which the tensor cores can take from
            # the registers the conversion left them in; the rows of x go through shared memory
            # (8 rows of int8 on an H200: 41 % of copy, against 36 % the other way round).
            # (BLOCK_N, BLOCK_M) += (BLOCK_N, BLOCK_K) @ (BLOCK_K, BLOCK_M)
            acc = tl.dot(w, tl.trans(x), acc)
        acc *= tl.load(s_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[:, None]
        out = (tl.program_id(2) * M + rows[None, :]) * N + cols[:, None]  # (BLOCK_N, BLOCK_M)
        tl.store(y_ptr + out, acc, mask=(rows[None, :] < M) & (cols[:, None] < N))

    @triton.jit
    def grouped_mm_kernel(x_ptr, ends_ptr, w_ptr, s_ptr, y_ptr, N, K, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TMA: tl.constexpr = False):
        """y[p, n] = sum over k of x[p, k] * w[e, n, k] * scales[e, n] for the rows p of expert
        e = program_id(0), rows ends[e - 1] (0 for the first) to ends[e] of x, and BLOCK_N
        outputs n (program_id 1). x (P, K) bf16 or fp16, the (token, expert) pairs sorted by
        expert; w (n_experts, N, K) one-byte weights as weight_tile reads them, scales
        (n_experts, N); y (P, N) in x's dtype. TMA: x_ptr and w_ptr are tensor descriptors of x
        and of w as (n_experts N, K), blocks (BLOCK_M, BLOCK_K) and (BLOCK_N, BLOCK_K); the rows a
        block reads past the expert's (the next expert's) reach only outputs left unwritten. An
        expert that no pair chose costs its programs nothing; one of more than BLOCK_M rows walks
        them block by block, reading its weight tiles again for each block."""
        e = tl.program_id(0)
        start = tl.load(ends_ptr + e - 1, mask=e > 0, other=0)
        end = tl.load(ends_ptr + e)
        n0 = tl.program_id(1) * BLOCK_N
        cols = n0 + tl.arange(0, BLOCK_N)  # (BLOCK_N,) output features
        scales = tl.load(s_ptr + e * N + cols, mask=cols < N, other=0.0).to(tl.float32)
        for m0 in range(start, end, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # transposed: y^T = w x^T
            for k0 in range(0, K, BLOCK_K):
                if TMA:
                    x = x_ptr.load([m0, k0])  # (BLOCK_M, BLOCK_K)
                    w = weight_tile(w_ptr, s_ptr, e * N + n0, k0, N, K, False, BLOCK_N, BLOCK_K,
                                    x.dtype, True)  # (BLOCK_N, BLOCK_K)
                else:
                    k = k0 + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
                    x = tl.load(x_ptr + rows[:, None] * K + k[None, :],
                                mask=(rows[:, None] < end) & (k[None, :] < K), other=0.0)
                    w = weight_tile(w_ptr + e.to(tl.int64) * N * K, s_ptr, n0, k0, N, K, False,
                                    BLOCK_N, BLOCK_K, x.dtype)
                acc = tl.dot(w, tl.trans(x), acc)  # (BLOCK_N, BLOCK_M)
            acc *= scales[:, None]
            tl.store(y_ptr + rows[None, :] * N + cols[:, None], acc.to(y_ptr.dtype.element_ty),
                     mask=(rows[None, :] < end) & (cols[:, None] < N))

    # nibbles_as_bf16's PTX for a pair of words ($8, $9; int4_words puts the two columns of each
    # bf16 pair side by side in a word): nibble j of each half shifted to bits 0-3 and 16-19,
    # masked and ORed with the bf16 bits of 128 by one lop3 into $j ($8's nibbles for j < 4, $9's
    # after).
    NIBBLES_PTX = tl.constexpr("""{
        .reg .b32 u;
        lop3.b32 $0, $8, 0x000F000F, 0x43004300, 0xEA;
        shr.b32 u, $8, 4;  lop3.b32 $1, u, 0x000F000F, 0x43004300, 0xEA;
        shr.b32 u, $8, 8;  lop3.b32 $2, u, 0x000F000F, 0x43004300, 0xEA;
        shr.b32 u, $8, 12; lop3.b32 $3, u, 0x000F000F, 0x43004300, 0xEA;
        lop3.b32 $4, $9, 0x000F000F, 0x43004300, 0xEA;
        shr.b32 u, $9, 4;  lop3.b32 $5, u, 0x000F000F, 0x43004300, 0xEA;
        shr.b32 u, $9, 8;  lop3.b32 $6, u, 0x000F000F, 0x43004300, 0xEA;
        shr.b32 u, $9, 12; lop3.b32 $7, u, 0x000F000F, 0x43004300, 0xEA;
        }""")

    @triton.jit
    def nibble_as_bf16(words, shift: tl.constexpr):
        return ((words >> shift) & 0xF | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def pair_as_bf16(word, shift: tl.constexpr):
        """The nibbles at `shift` and 16 + shift of words (BLOCK_N, 8), word t holding columns 2t
        and 2t + 1 in its halves (int4_words), as bf16 (BLOCK_N, 16): the pair side by side."""
        pair = tl.join(nibble_as_bf16(word, shift), nibble_as_bf16(word, 16 + shift))
        return pair.reshape(word.shape[0], 16)

    @triton.jit
    def nibbles_as_bf16(words, PTX: tl.constexpr):
        """Columns 16 j + c of a chunk in int4_words' layout, (BLOCK_N, 16) words, as 8 tensors of
        bf16 128 + q (j = 0 to 7), exactly: 0x4300 | q is that bf16's bit pattern. With PTX
        (NIBBLES_PTX) a pair of words at a time (Triton packs a thread's words c and c + 1, c even,
        the pair int4_words lays out together; kernels.check_kernels would catch another pairing),
        each output register the two columns of a bf16 pair the tensor cores take: about one
        instruction a weight, where a conversion through float32 takes four or more. Else the same
        bits by Triton's arithmetic (its CPU interpreter runs no PTX)."""
        if PTX:
            return tl.inline_asm_elementwise(
                asm=NIBBLES_PTX, constraints="=r,=r,=r,=r,=r,=r,=r,=r,r,r", args=[words],
                dtype=(tl.bfloat16,) * 8, is_pure=True, pack=2)
        else:  # words 2t (columns 16 j + 2t and + 1 for j < 4) and 2t + 1 (j >= 4): (BLOCK_N, 8)
            first, second = tl.split(words.reshape(words.shape[0], 8, 2))
            return (pair_as_bf16(first, 0), pair_as_bf16(first, 4), pair_as_bf16(first, 8),
                    pair_as_bf16(first, 12), pair_as_bf16(second, 0), pair_as_bf16(second, 4),
                    pair_as_bf16(second, 8), pair_as_bf16(second, 12))

    @triton.jit
    def int4_word_tile(w_ptr, cols, col_ok, k0, K, EVEN: tl.constexpr = False):
        """The 16 words of int4_words' layout that hold columns [k0, k0 + 128) of the weight rows
        (output features) cols (BLOCK_N,): (BLOCK_N, 16), runs of 8 or 16 rows from a multiple of
        as many, each part or all of a 1 KB tile; k0 a multiple of 128 below K. Rows not col_ok
        read zeros; EVEN: all are (no mask)."""
        c = tl.arange(0, 16)  # (16,) words of a row in a tile
        tile = (cols // 16).to(tl.int64) * tl.cdiv(K, 128) + k0 // 128  # (BLOCK_N,)
        words = w_ptr + (tile * 256 + cols % 16 * 16)[:, None] + c[None, :]
        if EVEN:
            return tl.load(words)
        return tl.load(words, mask=col_ok[:, None], other=0)

    @triton.jit
    def scale_and_zero(s_ptr, group, mask, EVEN: tl.constexpr = False):
        """The scales and zeros of `group` (offsets into (N, n_groups)) as float32, from the 4-byte
        words that hold a group's scale and zero side by side (scale_zero_pairs); s_ptr points at
        the scales, bf16 or fp16. Masked-off groups read 0; EVEN: none is."""
        pairs = s_ptr.to(tl.pointer_type(tl.int32)) + group
        pair = tl.load(pairs) if EVEN else tl.load(pairs, mask=mask, other=0)
        dtype: tl.constexpr = s_ptr.dtype.element_ty
        tl.static_assert(dtype.primitive_bitwidth == 16, "int4 scales and zeros: bf16 or fp16")
        if dtype == tl.bfloat16:  # a bf16 is the top half of its float32: a shift, a mask
            return ((pair << 16).to(tl.float32, bitcast=True),
                    (pair & -65536).to(tl.float32, bitcast=True))
        scale = (pair & 0xFFFF).to(tl.uint16).to(dtype, bitcast=True).to(tl.float32)
        zero = (pair >> 16).to(tl.uint16).to(dtype, bitcast=True).to(tl.float32)
        return scale, zero

    @triton.jit
    def side_by_side(w, first: tl.constexpr, n: tl.constexpr):
        """Tiles w[first] to w[first + n - 1] (each (BLOCK_N, 16)) as one (BLOCK_N, 16 n), tile i
        in columns 16 i to 16 i + 15; n is 2, 4 or 8. A thread holds the same values before and
        after (tl.join and the permute only rename registers)."""
        if n == 2:
            t = tl.permute(tl.join(w[first], w[first + 1]), (0, 2, 1))
        elif n == 4:
            t = tl.permute(tl.join(tl.join(w[first], w[first + 1]),
                                   tl.join(w[first + 2], w[first + 3])), (0, 3, 2, 1))
        else:
            t = tl.permute(tl.join(tl.join(tl.join(w[first], w[first + 1]),
                                           tl.join(w[first + 2], w[first + 3])),
                                   tl.join(tl.join(w[first + 4], w[first + 5]),
                                           tl.join(w[first + 6], w[first + 7]))),
                           (0, 4, 3, 2, 1))
        return t.reshape(w[first].shape[0], 16 * n)

    @triton.jit
    def int4_mm_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, K_PER_SPLIT,
                       GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       PTX: tl.constexpr, PDL: tl.constexpr = False, EVEN: tl.constexpr = False,
                       SWIGLU: tl.constexpr = False):
        """y[s, m, n] = sum over split s's columns k of x[m, k] * w[n, k], as quantized_mm_kernel,
        for int4 weights as int4_words lays them out (tiles of 16 rows by a 128-column chunk, K
        padded to whole chunks) with group scales and zeros (N, K / GROUP), side by side in 4-byte
        words at s_ptr (scale_zero_pairs): w = (q - 8) scale + zero. BLOCK_N is a multiple of 16;
        K_PER_SPLIT is a multiple of 128, and every split holds at least one chunk; EVEN: N is a
        multiple of BLOCK_N and K of 128, so that no load needs a mask. nibbles_as_bf16 makes a
        chunk's words 8 tiles of 16 columns (tile j: columns 16 j to 16 j + 15), so the tiles of
        a group (up to 128 columns) side by side are its columns in order, the left operand of one
        dot. That dot multiplies the bits as they come, 128 + q; one dot of ones gives sum x, and
        scale (sum (128 + q) x - 136 sum x) + zero sum x is the group's sum of w x, in float32 (no
        weight rounded to bf16). PDL (a programmatic dependent launch): the first chunk's words
        are loaded before waiting for the kernel before this one, whose output x is.
        SWIGLU (one row, K whole): the weights are a feed-forward's w13, N gate rows then their N
        up rows, and y (1, N) is model.swiglu of the sums, in y's dtype; a program takes
        BLOCK_N / 2 gate rows and their up rows (EVEN: N a multiple of BLOCK_N / 2)."""
        if SWIGLU:
            HALF: tl.constexpr = BLOCK_N // 2
            features = tl.program_id(0) * HALF + tl.arange(0, BLOCK_N) % HALF  # (BLOCK_N,)
            cols = features + tl.arange(0, BLOCK_N) // HALF * N  # gate rows, then their up rows
            col_ok = features < N
        else:
            cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) weight rows
            col_ok = cols < N
        first = tl.program_id(1) * K_PER_SPLIT
        # The first chunk apart from the loop, so that PDL's wait can come between its load and
        # its sums while the loop's body stays unconditional: Triton stages the loop's loads ahead
        # only so (BENCHMARKS.md).
        words = int4_word_tile(w_ptr, cols, col_ok, first, K, EVEN)  # (BLOCK_N, 16)
        if PDL:
            tl.extra.cuda.gdc_wait()  # the kernel before has written x
            tl.extra.cuda.gdc_launch_dependents()
        # A single row in groups under 128 sums each 16-column block of a chunk apart (int4_chunk)
        ACC_COLS: tl.constexpr = 8 if BLOCK_M == 1 and GROUP < 128 else BLOCK_M
        acc = tl.zeros((BLOCK_N, ACC_COLS), dtype=tl.float32)  # transposed: y^T = w x^T
        acc = int4_chunk(acc, words, x_ptr, s_ptr, first, cols, col_ok, M, K, GROUP, BLOCK_M,
                         BLOCK_N, PTX, EVEN)
        for k0 in range(first + 128, tl.minimum(first + K_PER_SPLIT, K), 128):
            words = int4_word_tile(w_ptr, cols, col_ok, k0, K, EVEN)  # (BLOCK_N, 16)
            acc = int4_chunk(acc, words, x_ptr, s_ptr, k0, cols, col_ok, M, K, GROUP, BLOCK_M,
                             BLOCK_N, PTX, EVEN)
        if SWIGLU:  # x's one row: its sums in acc's first column, zeros in any other
            gate, up = tl.split(tl.trans(tl.reshape(tl.sum(acc, axis=1), (2, HALF))))  # (HALF,)
            out = tl.program_id(0) * HALF + tl.arange(0, HALF)  # (HALF,)
            tl.store(y_ptr + out, (gate * tl.sigmoid(gate) * up).to(y_ptr.dtype.element_ty),
                     mask=out < N)
            return
        if ACC_COLS != BLOCK_M:
            acc = tl.sum(acc, axis=1)[:, None]  # (BLOCK_N, 1)
        rows = tl.arange(0, BLOCK_M)  # (BLOCK_M,)
        out = (tl.program_id(1) * M + rows[None, :]) * N + cols[:, None]  # (BLOCK_N, BLOCK_M)
        tl.store(y_ptr + out, acc, mask=(rows[None, :] < M) & col_ok[:, None])

    @triton.jit
    def int4_chunk(acc, words, x_ptr, s_ptr, k0, cols, col_ok, M, K, GROUP: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PTX: tl.constexpr,
                   EVEN: tl.constexpr):
        """acc (BLOCK_N, BLOCK_M) plus the sums over chunk [k0, k0 + 128) of int4_mm_kernel's
        weight rows cols (BLOCK_N,), from their words (BLOCK_N, 16); a single row in groups under
        128: acc (BLOCK_N, 8) plus each 16-column block's sums, block b in column b."""
        SUB: tl.constexpr = GROUP if GROUP < 128 else 128  # columns of a group within a chunk
        rows = tl.arange(0, BLOCK_M)  # (BLOCK_M,)
        w = nibbles_as_bf16(words, PTX)  # 8 x (BLOCK_N, 16): chunk columns 16 j + c
        if BLOCK_M == 1 and SUB < 128:
            # One dot for the chunk's groups: x's 128 columns as 8 columns of a block diagonal,
            # so that the dot's 8 output columns (the tensor cores' narrowest) are the 16-column
            # blocks' sums, each then scaled by its group's scale and zero, where a dot a group
            # (and another for its sum of x) each filled one column of 8 (Llama-2-7B int4 g32
            # 16 % faster end to end on an H100; BENCHMARKS.md).
            k = k0 + tl.arange(0, 128)  # (128,)
            x_ptrs = x_ptr + k[None, :]  # (1, 128)
            x = tl.load(x_ptrs) if EVEN else tl.load(x_ptrs, mask=k[None, :] < K, other=0.0)
            blocks = tl.arange(0, 8)  # (8,) the chunk's blocks of 16 columns
            # (128, 8): column b holds x in block b's rows, zeros elsewhere
            x_blocks = tl.where((tl.arange(0, 128) // 16)[:, None] == blocks[None, :],
                                tl.trans(x), 0.0)
            a = side_by_side(w, 0, 8)  # (BLOCK_N, 128) bits 128 + q
            wx = tl.dot(a.to(x.dtype), x_blocks.to(x.dtype))  # (BLOCK_N, 8) sum (128 + q) x
            ones = tl.full((BLOCK_N, 16), 1.0, x.dtype)
            x_sum = tl.dot(ones, tl.trans(tl.reshape(x, (8, 16))))  # (BLOCK_N, 8) sum x
            g = (k0 + 16 * blocks) // GROUP  # (8,) each block's group
            scale, zero = scale_and_zero(s_ptr, cols[:, None] * (K // GROUP) + g[None, :],
                                         col_ok[:, None] & (g < K // GROUP)[None, :], EVEN)
            acc += scale * wx
            acc += (zero - 136.0 * scale) * x_sum
            return acc
        for i in tl.static_range(128 // SUB):  # the chunk's groups
            a = side_by_side(w, i * SUB // 16, SUB // 16)  # (BLOCK_N, SUB) bits 128 + q
            k = k0 + i * SUB + tl.arange(0, SUB)  # (SUB,)
            # (BLOCK_M, SUB); columns past K read 0, so their weights' bits count nothing
            x_ptrs = x_ptr + rows[:, None] * K + k[None, :]
            if EVEN and BLOCK_M == 1:
                x = tl.load(x_ptrs)
            else:
                x = tl.load(x_ptrs, mask=(rows[:, None] < M) & (k[None, :] < K), other=0.0)
            wx = tl.dot(a.to(x.dtype), tl.trans(x))  # (BLOCK_N, BLOCK_M) sum (128 + q) x
            # (BLOCK_N, BLOCK_M), each row's sum of x, from a dot of ones: in the accumulator's
            # layout, where a tl.sum of x would need moving into it (slower; BENCHMARKS.md). A
            # single row in groups of 128 or more takes the chunk's x as 8 rows of 16 columns: one
            # 16-deep dot sums each, and a sum over the dot's 8 columns adds them up, where a
            # 128-deep dot is 8 in a chain, each waiting on the one before (Llama-2-7B int4 g128
            # 3.8 % faster end to end on an H100; smaller groups took more instructions so). The 8
            # rows are the loaded x reshaped, not a second load (a pass 3 % shorter on an H100).
            if BLOCK_M == 1 and SUB == 128:
                x16 = tl.reshape(x, (8, 16))
                ones = tl.full((BLOCK_N, 16), 1.0, x.dtype)
                x_sum = tl.sum(tl.dot(ones, tl.trans(x16)), axis=1)[:, None]  # (BLOCK_N, 1)
            else:
                x_sum = tl.dot(tl.full((BLOCK_N, SUB), 1.0, x.dtype), tl.trans(x))
            g = (k0 + i * SUB) // GROUP
            scale, zero = scale_and_zero(s_ptr, cols * (K // GROUP) + g,
                                         col_ok & (g < K // GROUP), EVEN)
            acc += scale[:, None] * wx
            acc += (zero - 136.0 * scale)[:, None] * x_sum
        return acc

    @triton.jit
    def dequantize_kernel(w_ptr, s_ptr, out_ptr, N, K, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr):
        """out (N, K) = one-byte weights as weight_tile gives them, scaled, in out's dtype."""
        n0, k0 = tl.program_id(0) * BLOCK_N, tl.program_id(1) * BLOCK_K
        cols = n0 + tl.arange(0, BLOCK_N)  # (BLOCK_N,) weight rows
        w = weight_tile(w_ptr, s_ptr, n0, k0, N, K, True, BLOCK_N, BLOCK_K,
                        out_ptr.dtype.element_ty)
        k = k0 + tl.arange(0, BLOCK_K)
        tl.store(out_ptr + cols.to(tl.int64)[:, None] * K + k[None, :], w,
                 mask=(cols[:, None] < N) & (k[None, :] < K))

    @triton.jit
    def int4_dequantize_kernel(w_ptr, s_ptr, out_ptr, N, K, GROUP: tl.constexpr,
                               BLOCK_N: tl.constexpr, PTX: tl.constexpr):
        """out (N, K) = int4 weights as int4_words lays them out, (q - 8) scale + zero in float32
        (as int4_weights computes them; scales and zeros as int4_mm_kernel takes them), in out's
        dtype: BLOCK_N rows (program_id 0) of a 128-column chunk (program_id 1)."""
        k0 = tl.program_id(1) * 128
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) weight rows
        col_ok = cols < N
        words = int4_word_tile(w_ptr, cols, col_ok, k0, K)  # (BLOCK_N, 16)
        # (BLOCK_N, 128) bits 128 + q, the chunk's columns in order; q - 8 exactly in float32
        q = side_by_side(nibbles_as_bf16(words, PTX), 0, 8).to(tl.float32) - 136.0
        # the chunk's groups: (BLOCK_N, n) scales and zeros, n = 1 when a group spans the chunk
        n: tl.constexpr = 128 // GROUP if GROUP < 128 else 1
        g = k0 // GROUP + tl.arange(0, n)  # (n,)
        group = cols[:, None] * (K // GROUP) + g[None, :]  # (BLOCK_N, n)
        scale, zero = scale_and_zero(s_ptr, group, col_ok[:, None] & (g[None, :] < K // GROUP))
        w = (q.reshape(BLOCK_N, n, 128 // n) * scale[:, :, None]
             + zero[:, :, None]).reshape(BLOCK_N, 128)
        k = k0 + tl.arange(0, 128)
        tl.store(out_ptr + cols.to(tl.int64)[:, None] * K + k[None, :],
                 w.to(out_ptr.dtype.element_ty), mask=col_ok[:, None] & (k[None, :] < K))

    @triton.jit
    def rotated(ptr, d, mask, cos, sin, norm_ptr, eps, D: tl.constexpr, NORM: tl.constexpr):
        """Values ptr[d] (one head's, or a head a row; mask: which exist), RMS-normalised over
        the head with the weights at norm_ptr where NORM, then turned by the rotary cos and
        signed sin as model.apply_rope turns them (pairs 2i, 2i + 1 rotate together), in float32."""
        x = tl.load(ptr + d, mask=mask, other=0.0)
        partner = tl.load(ptr + (d ^ 1), mask=mask, other=0.0)
        if NORM:  # as model.RMSNorm: normalised in float32, rounded, scaled in x's dtype
            x32 = x.to(tl.float32)
            r = tl.math.rsqrt(tl.sum(x32 * x32, axis=-1, keep_dims=True) / D + eps)
            w = tl.load(norm_ptr + d, mask=d < D, other=0.0)
            w_partner = tl.load(norm_ptr + (d ^ 1), mask=d < D, other=0.0)
            x = w * (x32 * r).to(x.dtype)
            partner = w_partner * (partner.to(tl.float32) * r).to(x.dtype)
        return x.to(tl.float32) * cos + partner.to(tl.float32) * sin

    @triton.jit
    def decode_attention_kernel(qkv_ptr, q_norm_ptr, k_norm_ptr, eps, rope_ptr, pos_ptr, kc_ptr,
                                vc_ptr, y_ptr, m_ptr, l_ptr, qkv_stride, pos_stride, row0,
                                n_kv_heads, S, scale, G: tl.constexpr, D: tl.constexpr,
                                G_PAD: tl.constexpr, D_PAD: tl.constexpr, NORM: tl.constexpr,
                                SPLIT_SLOTS: tl.constexpr, SPLITS: tl.constexpr,
                                BLOCK_S: tl.constexpr, TRIGGER: tl.constexpr = False):
        """One decode token of row b (program_id 0 // n_kv_heads) for kv head h and its G query
        heads: q/k-normalise (NORM) and rotate q and the new k, write k and v at the row's slot pos
        in cache row row0 + b, and attend over slots 0..pos of part program_id 1 of the cache
        (SPLIT_SLOTS slots each). qkv (B, (n_head + 2 n_kv_heads) D) each row's q, k and v heads
        side by side, rope (B, 2, D) cos and signed sin, caches (rows, n_kv_heads, S, D). SPLITS
        1: y (B, n_head, D) is the attention; else the part's unnormalised sums
        (B, n_head, SPLITS, D_PAD), maxima m and sums l (B, n_head, SPLITS) for
        attention_splits_kernel. TRIGGER: a programmatic dependent launch after this one (wo's
        GEMV) may start at once; it waits for this kernel's writes itself, and this kernel, a
        plain launch, started after the kernels before it had ended."""
        if TRIGGER:
            tl.extra.cuda.gdc_launch_dependents()
        b, h = tl.program_id(0) // n_kv_heads, tl.program_id(0) % n_kv_heads
        pos = tl.load(pos_ptr + b * pos_stride)
        first = tl.program_id(1) * SPLIT_SLOTS
        if first > pos:  # a part after the row's slots: attention_splits_kernel skips it
            return
        d = tl.arange(0, D_PAD)  # (D_PAD,)
        g = tl.arange(0, G_PAD)  # (G_PAD,) query heads h G + g
        d_ok, g_ok = d < D, g < G
        cos = tl.load(rope_ptr + b * 2 * D + d, mask=d_ok, other=0.0)
        sin = tl.load(rope_ptr + b * 2 * D + D + d, mask=d_ok, other=0.0)
        q_ok = g_ok[:, None] & d_ok[None, :]
        n_head = n_kv_heads * G
        row = qkv_ptr + b * qkv_stride
        q_rows = row + (h * G + g)[:, None] * D  # (G_PAD, 1)
        k_row, v_row = row + (n_head + h) * D, row + (n_head + n_kv_heads + h) * D
        # (G_PAD, D_PAD) and (D_PAD,), rounded to the cache's dtype as the model's rotary output is
        q = rotated(q_rows, d[None, :], q_ok, cos, sin, q_norm_ptr, eps, D, NORM).to(
            kc_ptr.dtype.element_ty)
        k_new = rotated(k_row, d, d_ok, cos, sin, k_norm_ptr, eps, D, NORM).to(
            kc_ptr.dtype.element_ty)
        v_new = tl.load(v_row + d, mask=d_ok, other=0.0)
        # int64: rows * heads * S * D passes 2**31 in a long, wide cache
        cache = ((row0 + b).to(tl.int64) * n_kv_heads + h) * S * D
        # Online softmax over the part's visible slots (those attention_mask allows: 0..pos).
        m = tl.full((G_PAD,), float("-inf"), tl.float32)
        l = tl.zeros((G_PAD,), tl.float32)
        acc = tl.zeros((G_PAD, D_PAD), tl.float32)
        for s0 in range(first, tl.minimum(first + SPLIT_SLOTS, pos + 1), BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)  # (BLOCK_S,)
            seen = s <= pos
            tile = cache + s[:, None] * D + d[None, :]  # (BLOCK_S, D_PAD)
            tile_ok = seen[:, None] & d_ok[None, :]
            # The new slot's k and v from registers (the cache gets them after the loop).
            is_new = (s == pos)[:, None]
            k = tl.where(is_new, k_new[None, :], tl.load(kc_ptr + tile, mask=tile_ok, other=0.0))
            scores = tl.dot(q, tl.trans(k)) * scale  # (G_PAD, BLOCK_S)
            scores = tl.where(seen[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))  # finite: slot s0 <= pos is seen
            p = tl.exp(scores - m_new[:, None])
            correction = tl.exp(m - m_new)
            l = l * correction + tl.sum(p, axis=1)
            v = tl.where(is_new, v_new[None, :].to(vc_ptr.dtype.element_ty),
                         tl.load(vc_ptr + tile, mask=tile_ok, other=0.0))
            acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v)  # (G_PAD, D_PAD)
            m = m_new
        if pos < first + SPLIT_SLOTS:  # this part holds the new slot
            tl.store(kc_ptr + cache + pos * D + d, k_new, mask=d_ok)
            tl.store(vc_ptr + cache + pos * D + d, v_new.to(vc_ptr.dtype.element_ty), mask=d_ok)
        heads = b * n_head + h * G + g  # (G_PAD,) rows of y
        if SPLITS == 1:
            y = acc / l[:, None]
            tl.store(y_ptr + heads[:, None] * D + d[None, :], y.to(y_ptr.dtype.element_ty),
                     mask=q_ok)
        else:
            part = heads * SPLITS + tl.program_id(1)
            tl.store(y_ptr + part[:, None] * D_PAD + d[None, :], acc, mask=g_ok[:, None])
            tl.store(m_ptr + part, m, mask=g_ok)
            tl.store(l_ptr + part, l, mask=g_ok)

    @triton.jit
    def attention_splits_kernel(part_ptr, m_ptr, l_ptr, y_ptr, pos_ptr, pos_stride, n_head,
                                D: tl.constexpr, SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
                                SPLIT_SLOTS: tl.constexpr, D_PAD: tl.constexpr,
                                TRIGGER: tl.constexpr = False):
        """y[head] (program_id 0, a row of (B, n_head)) from decode_attention_kernel's parts up to
        the one holding the row's slot: each part's sums weighed by exp(its max - the max).
        TRIGGER as decode_attention_kernel's."""
        if TRIGGER:
            tl.extra.cuda.gdc_launch_dependents()
        head = tl.program_id(0)
        pos = tl.load(pos_ptr + (head // n_head) * pos_stride)
        i = tl.arange(0, SPLITS_PAD)
        d = tl.arange(0, D_PAD)
        live = i <= pos // SPLIT_SLOTS  # (SPLITS_PAD,) the parts that ran; never more than SPLITS
        m = tl.load(m_ptr + head * SPLITS + i, mask=live, other=float("-inf"))
        l = tl.load(l_ptr + head * SPLITS + i, mask=live, other=0.0)
        weight = tl.exp(m - tl.max(m, axis=0))  # (SPLITS_PAD,); part 0 always saw slot 0
        acc = tl.load(part_ptr + (head * SPLITS + i)[:, None] * D_PAD + d[None, :],
                      mask=live[:, None], other=0.0)  # (SPLITS_PAD, D_PAD)
        y = tl.sum(acc * weight[:, None], axis=0) / tl.sum(l * weight, axis=0)
        tl.store(y_ptr + head * D + d, y.to(y_ptr.dtype.element_ty), mask=d < D)

    @triton.jit
    def chunk_attention_kernel(q_ptr, kc_ptr, vc_ptr, y_ptr, row_ptr, pos_ptr, C, n_kv_heads, S,
                               scale, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                               D_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                               BLOCK_S: tl.constexpr):
        """The queries of BLOCK_T tokens of a prompt's chunk (block program_id 1) for kv head h
        (program_id 0) and its G query heads, one tile row a (token, head): each attends over
        slots 0..pos[token] of cache row row_ptr[0], which already holds the chunk's keys and
        values. q (C, n_head, D) normalised and rotated, caches (rows, n_kv_heads, S, D), y as q."""
        h = tl.program_id(0)
        i = tl.arange(0, BLOCK_T * G_PAD)  # tile rows
        t = tl.program_id(1) * BLOCK_T + i // G_PAD  # (BLOCK_T * G_PAD,) tokens
        head = h * G + i % G_PAD
        row_ok = (t < C) & (i % G_PAD < G)
        # a padding row attends to slot 0 alone: finite, and never stored
        pos = tl.load(pos_ptr + t, mask=row_ok, other=0)
        d = tl.arange(0, D_PAD)
        d_ok = d < D
        n_head = n_kv_heads * G
        q_tile = (t * n_head + head)[:, None] * D + d[None, :]  # (BLOCK_T * G_PAD, D_PAD)
        q_ok = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_ptr + q_tile, mask=q_ok, other=0.0)
        # int64: rows * heads * S * D passes 2**31 in a long, wide cache
        cache = (tl.load(row_ptr).to(tl.int64) * n_kv_heads + h) * S * D
        m = tl.full((BLOCK_T * G_PAD,), float("-inf"), tl.float32)
        l = tl.zeros((BLOCK_T * G_PAD,), tl.float32)
        acc = tl.zeros((BLOCK_T * G_PAD, D_PAD), tl.float32)
        last = tl.max(pos, axis=0)
        for s0 in range(0, last + 1, BLOCK_S):  # online softmax over the slots the block sees
            s = s0 + tl.arange(0, BLOCK_S)  # (BLOCK_S,)
            tile = cache + s[:, None] * D + d[None, :]  # (BLOCK_S, D_PAD)
            tile_ok = (s <= last)[:, None] & d_ok[None, :]
            k = tl.load(kc_ptr + tile, mask=tile_ok, other=0.0)
            scores = tl.dot(q, tl.trans(k)) * scale  # (BLOCK_T * G_PAD, BLOCK_S)
            scores = tl.where(s[None, :] <= pos[:, None], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))  # finite: every row sees slot 0
            p = tl.exp(scores - m_new[:, None])
            correction = tl.exp(m - m_new)
            l = l * correction + tl.sum(p, axis=1)
            v = tl.load(vc_ptr + tile, mask=tile_ok, other=0.0)
            acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        y = acc / l[:, None]
        tl.store(y_ptr + q_tile, y.to(y_ptr.dtype.element_ty), mask=q_ok)

    @triton.jit
    def router_kernel(logits_ptr, weights_ptr, experts_ptr, N_EXPERTS, K: tl.constexpr,
                      BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, NORM: tl.constexpr):
        """Token program_id(0) of the router's logits (M, N_EXPERTS): the K largest probabilities
        of their softmax, largest first, and their experts, (M, K) each; NORM: rescaled to sum
        to 1. K rounds of max over the row held in registers, each taking its winner out."""
        row = tl.program_id(0).to(tl.int64)
        e = tl.arange(0, BLOCK_E)  # (BLOCK_E,) experts
        z = tl.load(logits_ptr + row * N_EXPERTS + e, mask=e < N_EXPERTS,
                    other=float("-inf")).to(tl.float32)
        p = tl.exp(z - tl.max(z, axis=0))
        p = tl.where(e < N_EXPERTS, p / tl.sum(p, axis=0), -1.0)  # padding never wins
        j = tl.arange(0, BLOCK_K)  # (BLOCK_K,) the choices
        chosen = tl.zeros((BLOCK_K,), dtype=tl.float32)
        ids = tl.zeros((BLOCK_K,), dtype=tl.int64)
        for i in tl.static_range(K):
            best, at = tl.max(p, axis=0), tl.argmax(p, axis=0)
            chosen = tl.where(j == i, best, chosen)
            ids = tl.where(j == i, at.to(tl.int64), ids)
            p = tl.where(e == at, -1.0, p)
        if NORM:
            chosen = chosen / tl.sum(chosen, axis=0)
        tl.store(weights_ptr + row * K + j, chosen, mask=j < K)
        tl.store(experts_ptr + row * K + j, ids, mask=j < K)

    @triton.jit
    def top_k_kernel(values_ptr, ids_ptr, row_length, top_values_ptr, top_ids_ptr,
                     K: tl.constexpr, KEY_BITS: tl.constexpr, TILE: tl.constexpr):
        """Program (row, part) of values (M, row_length): the K largest values of the part's
        columns [part * TILE, (part + 1) * TILE), and their ids, written to top (M, parts, K);
        ties at the K-th value taken first come first. The ids are the values' columns, or
        ids_ptr's entries where given (the second round). A part of fewer than K values fills the
        rest with the lowest key (below -inf), id 0. The part is held in registers: the K-th
        value's key (order_key) is found bit by bit from the top, a bit set where at least K keys
        are at least the key with it set; then the keys above it, and as many equal to it as K
        needs, go to their slots by a prefix sum."""
        row, part = tl.program_id(0).to(tl.int64), tl.program_id(1)
        columns = part * TILE + tl.arange(0, TILE)
        in_row = columns < row_length
        x = tl.load(values_ptr + row * row_length + columns, mask=in_row)
        key = tl.where(in_row, order_key(x, KEY_BITS), 0)
        floor = tl.zeros((), tl.uint32)
        for bit in tl.static_range(KEY_BITS - 1, -1, -1):
            candidate = floor | (1 << bit)
            floor = tl.where(tl.sum((key >= candidate).to(tl.int32), 0) >= K, candidate, floor)
        above, tied = key > floor, key == floor
        # (one prefix sum for both: a tile's counts, TOP_K_MAX_TILE at most, fit in 16 bits each)
        before = tl.cumsum(above.to(tl.int32) + (tied.to(tl.int32) << 16), 0)
        n_above, tied_before = tl.sum(above.to(tl.int32), 0), before >> 16
        slot = tl.where(above, (before & 0xFFFF) - 1, n_above + tied_before - 1)
        if ids_ptr is None:
            ids = columns.to(tl.int64)
        else:
            ids = tl.load(ids_ptr + row * row_length + columns, mask=in_row)
        lowest = tl.full((), -1, tl.int16 if KEY_BITS == 16 else tl.int32)  # key 0's bits
        x = tl.where(in_row, x, lowest.to(x.dtype, bitcast=True))
        top = (row * tl.num_programs(1) + part) * K + slot
        take = above | (tied & (slot < K))
        tl.store(top_values_ptr + top, x, mask=take)
        tl.store(top_ids_ptr + top, tl.where(in_row, ids, 0), mask=take)

    @triton.jit
    def order_key(x, KEY_BITS: tl.constexpr):
        """16- or 32-bit floats -> unsigned keys (uint32) that order as the floats do: a negative
        float's bits flipped whole (a larger magnitude, a smaller key), a positive one's sign bit
        set."""
        bits = x.to(tl.int16 if KEY_BITS == 16 else tl.int32, bitcast=True)
        sign = tl.full((), 1 << (KEY_BITS - 1), tl.uint32)
        unsigned = bits.to(tl.int32).to(tl.uint32, bitcast=True) & (2 * sign - 1)
        return tl.where(bits < 0, unsigned ^ (2 * sign - 1), unsigned | sign)

# The GEMV's tile for each kind of weight: one-byte weights at 4 rows x 512 words, of 32 (1 to 16
# rows x 128 to 1024 words x 4 or 8 warps) the fastest for int8 over Llama-2-7B's block layers on an
# H200, and of 6 for fp8 (with its PTX conversion) on an H100 (a pass 4 % faster than on 8 x 256,
# +0.6 % end to end; BENCHMARKS.md). One tile a kind, not autotuned per shape: timing single
# calls of a kernel this short picked a tile 23 % slower than the best for one layer in one
# process, and a tile that changes from process to process changes the order of the sums, so the
# outputs' last bits. bf16 and fp16 weights (FloatLinear's nn.Linear layers at one row) go through
# the same kernel, a weight a word, on tiles of two rows by 1024 columns, the fastest of 22 (2 to 16
# rows x 256 to 1024 columns x 4 or 8 warps) over the same layers: a pass in 3.24 ms where cuBLAS
# takes 3.56 (94 against 86 % of copy).
FLOAT_GEMV_TILE = dict(BLOCK_N=2, BLOCK_WORDS=1024, num_warps=4, num_stages=1)
ONE_BYTE_GEMV_TILE = dict(BLOCK_N=4, BLOCK_WORDS=512, num_warps=4, num_stages=1)
GEMV_TILES = {torch.int8: ONE_BYTE_GEMV_TILE, torch.float8_e4m3fn: ONE_BYTE_GEMV_TILE,
              torch.bfloat16: FLOAT_GEMV_TILE, torch.float16: FLOAT_GEMV_TILE}
# The GEMV with SwiGLU (swiglu_linear): BLOCK_N gate rows and their BLOCK_N up rows, as many rows as
# the plain tile's. Of 10 bf16 tiles this was the fastest end to end (one faster alone was slower
# end to end), of 9 int8 tiles the fastest alone (BENCHMARKS.md).
SWIGLU_GEMV_TILES = {dtype: dict(tile, BLOCK_N=tile["BLOCK_N"] // 2)
                     for dtype, tile in GEMV_TILES.items()}
# A mixture's expert GEMV: a tile for each kind of weight (float ones a weight a word, one-byte ones
# four) and each of an expert's layers (w13 with SwiGLU, w2). Of 9 (4 to 16 rows x 128 to 512 words
# x 4 or 8 warps), each is the fastest or within 1.6 % of it on both Qwen3-30B-A3B's experts and
# Mixtral-8x7B's, bf16 and int8 (one token; 48 or 32 layers' distinct weights in a CUDA graph; H200,
# BENCHMARKS.md). Autotuned at compile time instead, by timing single calls, a layer took a slower
# tile in 16 of 40 tunings (up to 10 % slower), a different one from process to process, and with
# it the outputs' last bits. fp8 experts take int8's tiles (not timed). At most 16 accumulators a
# thread (32 with SwiGLU's up rows).
EXPERT_TILES = {(1, True): dict(BLOCK_N=8, BLOCK_WORDS=256, num_warps=4, num_stages=3),
                (1, False): dict(BLOCK_N=8, BLOCK_WORDS=128, num_warps=4, num_stages=3),
                (4, True): dict(BLOCK_N=4, BLOCK_WORDS=128, num_warps=4, num_stages=3),
                (4, False): dict(BLOCK_N=8, BLOCK_WORDS=128, num_warps=4, num_stages=3)}
# A layer of one-byte weights with few output rows and a long K (Llama-2-7B's down projection:
# 4096 x 11008) gives too few programs to keep every SM's loads in flight, so its K is split into
# parts of at most SPLIT_COLUMNS, one program each per row block, and the caller adds the partial
# sums: at most MAX_SPLIT terms, which torch.compile fuses into the next kernel. Layers with K up to
# SPLIT_COLUMNS (4096 x 4096) and those of more than SPLIT_MAX_ROWS rows stay whole: split, they
# are faster alone, but their parts slow the next kernel (a residual add and RMSNorm runs in one
# block) or need one of their own, and no split of them was clearly faster end to end. Float
# weights (FloatLinear's) stay whole: twice the bytes a row on half the rows a tile, the down
# projection makes twice int8's programs, and whole, bf16 models decode 0.8-1.4 % faster (int8's
# down projection whole: 2.6 % slower; BENCHMARKS.md has the measurements).
SPLIT_MAX_ROWS, SPLIT_COLUMNS, MAX_SPLIT = 8192, 8192, 8
# The GEMV's parts of a split K are multiples of SPLIT_ALIGN_WORDS int32 words (1024 one-byte
# columns): whole tiles of the expert GEMV's, float experts included. The one-row GEMV's one-byte
# tile (int8 and fp8) is 512 words: a part of an odd number of 256-word blocks ends in half a tile,
# whose other half's loads are masked off (Llama-2-7B's down projection splits at 1536 words, three
# whole tiles).
SPLIT_ALIGN_WORDS = 256
# False: PyTorch's matmul for bf16 and fp16 single rows too (FloatLinear reads it at each call; a
# compiled step traces again when it changes).
FLOAT_GEMV = True


def gemv_input(x: Tensor, per_word: int) -> tuple:
    """(x as the GEMV kernel reads it, its X16): bf16 or fp16 activations of one-byte weights
    (PER_WORD 4) as int64 words of four values, a word for each word of weights; any other x as
    it is (X16 None)."""
    x = x.contiguous().view(-1)  # one run of rows (any stride a row of one had is gone)
    if per_word == 1 or x.dtype not in (torch.bfloat16, torch.float16):
        return x, None
    if x.storage_offset() % 4 or x.data_ptr() % 8:  # a view that starts inside a word
        x = x.clone()
    return x.view(torch.int64), tl.bfloat16 if x.dtype == torch.bfloat16 else tl.float16


def split_k_for(n_rows: int, n_columns: int) -> int:
    return 1 if n_rows > SPLIT_MAX_ROWS else min(MAX_SPLIT, -(-n_columns // SPLIT_COLUMNS))


def gemv_split_k(weight: Tensor) -> int:
    """The parts the one-row GEMV splits this weight's K into: one-byte weights as split_k_for
    says, float weights none."""
    return split_k_for(*weight.shape) if weight.element_size() == 1 else 1


def words_per_split(n_columns: int, split_k: int) -> int:
    words = -(-n_columns // 4 // split_k)
    return words if split_k == 1 else -(-words // SPLIT_ALIGN_WORDS) * SPLIT_ALIGN_WORDS


def added_parts(parts: Tensor) -> Tensor:
    """The split-K partial sums (split_k, ...) added into one (...), in float32. Compiled, one part
    at a time, which torch.compile fuses into the next kernel as pointwise adds: summed over the
    first dimension, 8 parts (the small matmul's split of a long K) would be a reduction kernel of
    its own, as inductor unrolls only shorter ones (3.5 us a layer at 8 rows on an H200). Eager
    (generate.py's prefill), one sum: one launch rather than one a part."""
    if parts.shape[0] > 1 and not torch.compiler.is_compiling():
        return parts.sum(0)
    y = parts[0]
    for i in range(1, parts.shape[0]):
        y = y + parts[i]
    return y


@torch.library.custom_op("blitz::scaled_gemv_partials", mutates_args=())
def scaled_gemv_partials(x: Tensor, weight: Tensor, scales: Optional[Tensor], split_k: int,
                         swiglu_out: bool = False) -> Tensor:
    """x's K values times weights (N, K): one-byte (int8 or float8_e4m3fn, K a multiple of 4)
    scaled per row, or (scales None) bf16 or fp16. (split_k, N) partial sums, in x's dtype when
    split_k is 1, else in float32. swiglu_out (split_k 1): the rows are gate then up projections,
    and the result model.swiglu of the sums, (1, N / 2)."""
    N, K = weight.shape
    n_out = N // 2 if swiglu_out else N
    y = torch.empty(split_k, n_out, dtype=x.dtype if split_k == 1 else torch.float32,
                    device=x.device)
    per_word = 1 if scales is None else 4
    tile = (SWIGLU_GEMV_TILES if swiglu_out else GEMV_TILES)[weight.dtype]
    x, x16 = gemv_input(x, per_word)
    pdl = dependent_launch(x)
    scaled_gemv_kernel[(triton.cdiv(n_out, tile["BLOCK_N"]), split_k)](
        x, weight if per_word == 1 else weight.view(torch.int32), scales, None, y, n_out,
        K // per_word, words_per_split(K, split_k) * 4 // per_word, 1, PER_WORD=per_word,
        FP8=weight.dtype == torch.float8_e4m3fn, X16=x16, SWIGLU=swiglu_out, PDL=pdl,
        PTX=on_hopper(x), **pdl_option(pdl), **tile)
    return y


@scaled_gemv_partials.register_fake
def _(x: Tensor, weight: Tensor, scales: Optional[Tensor], split_k: int,
      swiglu_out: bool = False) -> Tensor:
    n_out = weight.shape[0] // 2 if swiglu_out else weight.shape[0]
    return x.new_empty(split_k, n_out, dtype=x.dtype if split_k == 1 else torch.float32)


def scaled_gemv(x: Tensor, weight: Tensor, scales: Optional[Tensor],
                swiglu_out: bool = False) -> Tensor:
    """x (K,) or (1, ..., K) times int8 or float8_e4m3fn weight (N, K), scaled per output row by
    scales (N,), or (scales None) times bf16 or fp16 weight (N, K): (..., N) in x's dtype.
    swiglu_out (K not split, gemv_takes_swiglu): model.swiglu of that, (..., N / 2)."""
    N, K = weight.shape
    assert x.numel() == K and K % 4 == 0, (
        f"scaled_gemv takes one row of activations of a multiple of 4, got {tuple(x.shape)}")
    split_k = gemv_split_k(weight)
    assert not swiglu_out or gemv_takes_swiglu(weight), "scaled_gemv: SwiGLU takes whole sums"
    y = scaled_gemv_partials(x, weight, scales, split_k, swiglu_out)  # (split_k, N or N / 2)
    y = added_parts(y).to(x.dtype)  # (N or N / 2,)
    return y.view(*x.shape[:-1], -1)


def gemv_takes_swiglu(weight: Tensor) -> bool:
    """Whether a feed-forward's w13 of this weight (N, K) can give SwiGLU's output from the GEMV:
    K whole (not split: SwiGLU needs whole sums)."""
    return weight.shape[0] % 2 == 0 and gemv_split_k(weight) == 1


# Decode batches of 2 to MAX_MM_ROWS rows go to the small matmul, all rows in one block: each
# weight is read once. Up to MAX_WIDE_ROWS rows (a prompt's chunk beside a server's decoding rows,
# a short prompt), one-byte weights go through the same kernel in blocks of WIDE_MM_TILE's rows.
# Longer inputs (prefills) are compute-bound: a dequantized copy of the layer's weights in x's
# dtype (one pass over them) feeds PyTorch's matmul. A layer of few output rows makes few tiles,
# too few to keep every SM streaming weights, so the small matmul splits K into parts of at least
# MM_SPLIT_COLUMNS (whole tiles of both small matmuls); from MM_FILL_ROWS rows until the grid holds
# about MM_PROGRAMS_PER_SM programs an SM instead, so that the wider layers, whose partial sums grow
# with the rows, take fewer parts and the narrower more (Llama-2-7B at 32 rows: int8 +1.4 % tok/s
# and fp8 +4.3 % on an H200, int4 g128 +3.0-3.1 % on an H100; at 8 rows int8 -2.7 to -3.0 % and int4
# -1.2 %, so fewer rows keep the parts; BENCHMARKS.md).
MAX_MM_ROWS = 64
MAX_WIDE_ROWS = 256
MM_DTYPES = (torch.bfloat16, torch.float16)  # the activations the small matmul's tl.dot takes
MM_SPLIT_COLUMNS, MM_SPLIT_ALIGN = 1024, 256
MM_FILL_ROWS, MM_PROGRAMS_PER_SM = 32, 4
# The one-byte small matmul's tile, not autotuned: of 16 (BLOCK_N, the tensor cores' M dimension,
# 16 to 128; 128 or 256 columns deep; 3 or 4 stages; 4 warps), the fastest over Llama-2-7B's four
# layer shapes together for int8 and for fp8 at 8 and at 32 rows on an H200. Autotuned per shape,
# the pick changed from process to process, and with it a batch's speed (int8 at 8 rows: 1963 to
# 2357 tok/s) and the order of the sums (BENCHMARKS.md). With both operands through descriptors
# (MM_TMA) this 128-deep, 3-stage tile, which Triton 3.6 miscompiles for blocks of 128 rows
# (WIDE_MM_TILE's note below), gave the same bits on every call at these rows (5 calls on each
# Llama-2-7B layer shape at 8 and 32 rows, H200; check_kernels asks it on every run of bench.py).
MM_TILE = dict(BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3)
# int4's small matmul: one tile, the fastest of 36 configs (64 rows with 4 warps, 128 with 4 or 8;
# 2, 3, 4 or 6 stages; 1, 2 or 4 times mm_split's parts) on each of Llama-2-7B's layer shapes at 1,
# 8 and 32 rows on an H200 (BENCHMARKS.md); with the words in tiles, 4 stages or K in parts of 2048
# columns took 3-5 % longer at 8 rows on an H100; at 32 rows on an H100 the rows in blocks of 16
# took 20-22 % longer a pass, and at most 96 registers a thread 14 % longer.
INT4_MM_TILE = dict(BLOCK_N=64, num_warps=4, num_stages=3)
# A single row (batch-1 decode; int4_tile) takes 16 weight rows on 1 warp: four times the programs
# of INT4_MM_TILE's 64 rows on 4 warps, each with a quarter of the work. Llama-2-7B in groups of 128
# on an H100: its 128 block layers 2.10-2.13 ms a pass against 2.55-2.57 (words in tiles; the
# fastest of 7: 32 rows on 2 warps 2.19-2.20, 2 or 4 stages 2.17-2.27, K in parts of 512 or 2048
# columns 2.17-2.19; on the untiled words, the fastest of 14, 16 to 128 rows, 1 to 8 warps, 2 to 6
# stages, parts of 512 columns to the whole K); end to end +4.2 % from 64 rows on 4 warps to 32 on
# 2, and +2.3 % from there (BENCHMARKS.md: the sweeps, and 13 forms on the kernel as it is).
INT4_ROW_TILE = dict(BLOCK_N=16, num_warps=1, num_stages=3)
# A dense feed-forward's w13 with SwiGLU in its kernel (int4_swiglu_row) walks the whole K, twice
# the chunks of the parts above, and keeps one more in flight: Llama-2-7B int4 g128 on an H100
# decodes 0.7-1.5 % faster so than with SiLU(gate) * up apart; on 3 stages it was no faster (5 as
# fast as 4, 6 slower; BENCHMARKS.md).
INT4_SWIGLU_STAGES = 4
# Wider inputs of one-byte weights: blocks of 128 rows side by side, x through a tensor descriptor
# as well, in whole blocks (x padded with zero rows). x by plain loads, a part-filled last block,
# or K split in mm_split's parts were up to 1.6x slower (BENCHMARKS.md). 64 columns deep: with both
# operands through descriptors, Triton 3.6 compiles the 128-deep tile in 3 stages to a kernel whose
# results change from call to call once a grid outlasts one wave of programs (fp8 on every call,
# int8 now and then, a NaN; 4 stages or 64 deep gave the same bits on every call), and of those
# this is the fastest (H200: 2-5 % slower than the faulty tile, K split alike, at 65-256 rows).
WIDE_MM_TILE = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)
# Such a tile holds an SM (its shared memory) while it walks K, so a layer of few tiles leaves SMs
# idle: Llama-2-7B's 4096-row layers make 64 tiles a block of rows for 132 SMs. Their K is split
# until the grid holds about two programs an SM, in at most WIDE_MAX_SPLIT parts (H200: a pass of
# Llama-2-7B's layers at 128 rows 7.35 -> 5.14 ms; BENCHMARKS.md); the wider layers stay whole,
# where parts cost more in partial sums than they gain.
WIDE_MAX_SPLIT = 4


def whole_parts(n_columns: int, split_k: int, align: int) -> tuple[int, int]:
    """(number of parts, columns per part) of K in about split_k (at least 1) parts of whole
    `align` columns; no part is empty."""
    per_split = -(-n_columns // max(1, split_k) // align) * align
    return -(-n_columns // per_split), per_split


def mm_split(n_columns: int, part_columns: Optional[int] = None) -> tuple[int, int]:
    """(number of K splits, columns per split) of the small matmul in at most MAX_SPLIT parts of at
    least part_columns (MM_SPLIT_COLUMNS where not given)."""
    part_columns = part_columns or MM_SPLIT_COLUMNS
    return whole_parts(n_columns, min(MAX_SPLIT, n_columns // part_columns), MM_SPLIT_ALIGN)


# int4's single row in a layer of more than SPLIT_MAX_ROWS rows takes K in parts of
# INT4_WIDE_COLUMNS: such a layer's 16-row tiles fill the GPU with half the parts, each program's
# run of K twice as long, and Llama-2-7B's w13 then fits on an H100 at once, where twice the
# programs ran in 1.5 waves (its layers alone: 24.3-24.4 us a layer against 25.1-25.2; wqkv's
# 15.9-16.2 against 15.8-16.7; end to end +1.0 %; BENCHMARKS.md). A w13 that gives SwiGLU from its
# kernel (int4_swiglu_row) walks K whole instead; wqkv with K whole was 2.6 % slower end to end.
INT4_WIDE_COLUMNS = 2048


def filling_split(n_out: int, n_columns: int, n_sms: int, block_n: int,
                  align: int) -> tuple[int, int]:
    """(number of K splits, columns per split: whole `align` columns) that give one block of rows
    about MM_PROGRAMS_PER_SM programs an SM of n_sms, the weights (n_out, n_columns) in tiles of
    block_n rows."""
    tiles = -(-n_out // block_n)
    return whole_parts(n_columns, min(MAX_SPLIT, MM_PROGRAMS_PER_SM * n_sms // tiles), align)


def int4_split(n_rows: int, n_out: int, n_columns: int, n_sms: int) -> tuple[int, int]:
    """(number of K splits, columns per split) of int4's small matmul, n_rows rows of x by weights
    (n_out, n_columns) on a GPU of n_sms SMs: mm_split's, but a single row of a layer of more than
    SPLIT_MAX_ROWS rows in parts of INT4_WIDE_COLUMNS, and filling_split's from MM_FILL_ROWS
    rows."""
    if n_rows >= MM_FILL_ROWS:
        return filling_split(n_out, n_columns, n_sms, INT4_MM_TILE["BLOCK_N"], 128)  # chunks
    wide_row = n_rows == 1 and n_out > SPLIT_MAX_ROWS
    return mm_split(n_columns, INT4_WIDE_COLUMNS if wide_row else None)


def one_byte_split(n_rows: int, n_out: int, n_columns: int, n_sms: int) -> tuple[int, int]:
    """(number of K splits, columns per split) of the one-byte small matmul, n_rows rows of x (in
    whole blocks past MAX_MM_ROWS) by weights (n_out, n_columns), on a GPU of n_sms SMs."""
    if n_rows < MM_FILL_ROWS:
        return mm_split(n_columns)
    if n_rows <= MAX_MM_ROWS:  # one block of rows
        return filling_split(n_out, n_columns, n_sms, MM_TILE["BLOCK_N"], MM_SPLIT_ALIGN)
    tiles = -(-n_rows // WIDE_MM_TILE["BLOCK_M"]) * -(-n_out // WIDE_MM_TILE["BLOCK_N"])
    return whole_parts(n_columns, min(WIDE_MAX_SPLIT, 2 * n_sms // tiles), WIDE_MM_TILE["BLOCK_K"])


@torch.compiler.assume_constant_result  # a number for torch.compile, not a graph break
def sm_count(cuda_index: Optional[int]) -> int:
    """The GPU's multiprocessor count; 1 off a GPU (Triton's interpreter)."""
    if cuda_index is None:
        return 1
    return torch.cuda.get_device_properties(cuda_index).multi_processor_count


def mm_block_rows(n_rows: int) -> int:
    """The rows of x in a small matmul's tile: all of them, a power of two, at least 16. Triton 3.5
    and later take fewer (DOT_MIN_ROWS), but batches of 4 and 8 rows in tiles of 4 and 8 were slower
    on an H100 (a pass of Llama-2-7B's block layers: int4 +30 % and +5 %, fp8 at 8 rows +3 %; int8
    -2 % at 4 rows, +2 % at 8; BENCHMARKS.md)."""
    return max(16, triton.next_power_of_2(n_rows))


def int4_tile(n_rows: int) -> dict:
    """int4's small matmul tile for n_rows rows of x: INT4_ROW_TILE for a single row, in a tile
    of one row where Triton allows it (tl.dot then compiles to the mma.sync form, not a 16-row
    wgmma: Llama-2-7B int4 g128 4.5 % faster end to end on an H100; BENCHMARKS.md), else
    INT4_MM_TILE with every row in one block."""
    if n_rows == 1:
        return dict(INT4_ROW_TILE, BLOCK_M=DOT_MIN_ROWS)
    return dict(INT4_MM_TILE, BLOCK_M=mm_block_rows(n_rows))


# On Hopper and later GPUs the one-byte small matmul takes its weight tiles through a tensor
# descriptor: the tensor memory accelerator (TMA) copies each tile into shared memory
# asynchronously, a few tiles ahead of the tensor cores (num_stages), which plain loads, issued by
# the threads themselves, do not (Llama-2-7B at 8 and 32 rows on an H200: int8 9-15 % less time a
# pass, fp8 16-27 %; BENCHMARKS.md). It takes the rows of x so too, whatever their number, and its
# threads then issue no loads for them (Llama-2-7B int8 and fp8 at 32 rows on an H200: 3 % faster
# end to end). int4's small matmul reads by plain loads: its words, in 1 KB tiles that follow each
# other along a program's part of K (int4_words), came faster so than through a descriptor (a pass
# of Llama-2-7B's block layers on an H100: 2.11 against 2.17 ms at one row; at 8 rows, with the
# scales in tiles too, 2.74 against 2.89), and x (through one, 11 % slower at one row; Llama-2-7B
# int4 g128 on an H100 3 % slower at batch 8, 1 % faster at 32). A descriptor needs 16-byte
# aligned rows. False: plain loads.
MM_TMA = True


def on_nvidia(t: Tensor) -> bool:
    """Whether t is on an NVIDIA GPU, where the kernels may run inline PTX (not on ROCm, nor in
    Triton's CPU interpreter)."""
    return t.is_cuda and torch.version.hip is None


def on_hopper(t: Tensor) -> bool:
    """Whether t is on an NVIDIA GPU of compute capability 9 or later (ROCm numbers its GPUs'
    capabilities otherwise)."""
    return on_nvidia(t) and torch.cuda.get_device_capability(t.device)[0] >= 9


def tma_loads(t: Tensor) -> bool:
    """Whether the kernels read the 2-D tensor t (weights, or rows of x) through a descriptor."""
    return (MM_TMA and TensorDescriptor is not None and on_hopper(t)
            and t.data_ptr() % 16 == 0 and t.stride(0) * t.element_size() % 16 == 0)


# Programmatic dependent launch on Hopper and later GPUs: the one-row GEMV may start while the
# kernel before it ends, its programs loading their first weight tile before they wait for that
# kernel's output (x), so that memory stays busy across the boundary. The kernels before it let it
# start early: the decode attention kernels and a mixture's w13 expert GEMV at once, inductor's once
# they have loaded their inputs.
# prepare_for_device turns inductor's option on where it pays (dependent_launches_pay), and the
# GEMV launches so only then: the two pay together only. A pass of Llama-2-7B's int8 layers back
# to back on an H200 took 9 % less time; decode: int8 +6 %, fp8 +4 %, bf16 +1 % (BENCHMARKS.md).
# int4's small matmul launches so too (int4_mm_kernel). False: plain launches.
PDL = True
# The one-byte small matmul launches so from MM_FILL_ROWS rows, where one_byte_split splits K to
# fill the GPU: its programs wait for x before any load and let no kernel launch early
# (Llama-2-7B at 32 rows on an H100: int8 +2.2 to +2.6 %, fp8 +2.5 %). Fewer rows keep plain
# launches: there a dependent launch is slower (int8 at 8 and 16 rows: 5 %; BENCHMARKS.md). False:
# plain launches.
MM_PDL = True
# A mixture's w2 GEMV launched so too, right after w13's (expert_gemv_partials). False: plainly.
EXPERT_PDL = True


def dependent_launch(x: Tensor) -> bool:
    """Whether the kernels on x launch as programmatic dependent launches: PDL, a GPU of compute
    capability 9 or later, a Triton with grid dependency control, and inductor's kernels launched
    so too (prepare_for_device decides that for the model: the two pay together only)."""
    return (PDL and GRID_DEPENDENCY_CONTROL and on_hopper(x)
            and getattr(inductor_config.triton, "enable_pdl", False))


def pdl_option(pdl: bool) -> dict:
    """Triton's launch option for a programmatic dependent launch, given only for one: Tritons
    without grid dependency control (before 3.4) know no such option."""
    return dict(launch_pdl=True) if pdl else {}


@torch.library.custom_op("blitz::quantized_mm_partials", mutates_args=())
def quantized_mm_partials(x: Tensor, weight: Tensor, scales: Tensor, zeros: Optional[Tensor],
                          groupsize: int, split_k: int, columns_per_split: int) -> Tensor:
    """x (M, K) bf16 or fp16 times weight (N, K) int8 or float8_e4m3fn with scales (N,), M up to
    MAX_WIDE_ROWS, or (zeros given) int4 words as int4_words lays them out with group scales and
    zeros (N, K / groupsize), side by side where scale_zero_pairs put them (else paired here, a
    copy a call), M up to MAX_MM_ROWS: (split_k, M, N) float32 partial sums."""
    M, K, N = *x.shape, scales.shape[0]
    assert M <= (MAX_MM_ROWS if zeros is not None else MAX_WIDE_ROWS), "quantized_mm: too many rows"
    assert weight.is_contiguous(), "quantized_mm: row-major weights"
    x = x.contiguous()
    y = torch.empty(split_k, M, N, dtype=torch.float32, device=x.device)
    if zeros is not None:
        return int4_mm(x, weight, scales, zeros, groupsize, y, columns_per_split)
    assert scales.is_contiguous(), "quantized_mm: row-major weights"
    tma = tma_loads(weight)
    pdl = MM_PDL and MM_FILL_ROWS <= M <= MAX_MM_ROWS and dependent_launch(x)
    wide = M > MAX_MM_ROWS
    tile = WIDE_MM_TILE if wide else dict(MM_TILE, BLOCK_M=mm_block_rows(M))
    w = (TensorDescriptor.from_tensor(weight, [tile["BLOCK_N"], tile["BLOCK_K"]]) if tma
         else weight)
    x_tma = tma and tma_loads(x)
    if x_tma:
        x = TensorDescriptor.from_tensor(x, [tile["BLOCK_M"], tile["BLOCK_K"]])
    grid = (triton.cdiv(M, tile["BLOCK_M"]), triton.cdiv(N, tile["BLOCK_N"]), split_k)
    quantized_mm_kernel[grid](x, w, scales, y, M, N, K, columns_per_split, TMA=tma,
                              X_TMA=x_tma, PDL=pdl, **pdl_option(pdl), **tile)
    return y


@quantized_mm_partials.register_fake
def _(x: Tensor, weight: Tensor, scales: Tensor, zeros: Optional[Tensor], groupsize: int,
      split_k: int, columns_per_split: int) -> Tensor:
    return x.new_empty(split_k, x.shape[0], scales.shape[0], dtype=torch.float32)


def int4_mm(x: Tensor, words: Tensor, scales: Tensor, zeros: Tensor, groupsize: int, y: Tensor,
            columns_per_split: int, swiglu_out: bool = False) -> Tensor:
    """y (split_k, M, N) = int4_mm_kernel's partial sums of x (M, K) times the words, or
    (swiglu_out) y (1, N) its SwiGLU of a single row's whole sums."""
    M, K = x.shape
    N = y.shape[-1]
    tile = dict(int4_tile(M), **(dict(num_stages=INT4_SWIGLU_STAGES) if swiglu_out else {}))
    pdl = dependent_launch(x)
    scales, _ = scale_zero_pairs(scales, zeros)  # the kernel reads both through scales
    outputs = tile["BLOCK_N"] // 2 if swiglu_out else tile["BLOCK_N"]  # a program's
    # No masks where no tile reaches past N or K (EVEN): with the pairs, Llama-2-7B int4 g128 2.3 %
    # faster at batch 1 on an H100, where the pairs alone gave 1.2 % (BENCHMARKS.md).
    even = N % outputs == 0 and K % 128 == 0
    int4_mm_kernel[(triton.cdiv(N, outputs), y.shape[0])](
        x, words, scales, y, M, N, K, columns_per_split, groupsize, PTX=on_nvidia(x), PDL=pdl,
        EVEN=even, SWIGLU=swiglu_out, **pdl_option(pdl), **tile)
    return y


@torch.library.custom_op("blitz::int4_swiglu_row", mutates_args=())
def int4_swiglu_row(x: Tensor, words: Tensor, scales: Tensor, zeros: Tensor,
                    groupsize: int) -> Tensor:
    """model.swiglu of x (1, K) bf16 or fp16 times a feed-forward's w13 (2 F, K) as
    quantized_mm_partials takes int4 weights: (1, F) in x's dtype, from one kernel (K whole)."""
    y = torch.empty(1, scales.shape[0] // 2, dtype=x.dtype, device=x.device)
    return int4_mm(x.contiguous(), words, scales, zeros, groupsize, y,
                   -(-x.shape[1] // 128) * 128, swiglu_out=True)


@int4_swiglu_row.register_fake
def _(x: Tensor, words: Tensor, scales: Tensor, zeros: Tensor, groupsize: int) -> Tensor:
    return x.new_empty(1, scales.shape[0] // 2)


def quantized_mm(x: Tensor, weight: Tensor, scales: Tensor, zeros: Optional[Tensor] = None,
                 groupsize: int = 1) -> Tensor:
    """x (..., K) (bf16 or fp16) times quantized weights as quantized_mm_partials takes them:
    (..., N) in x's dtype. The split-K partial sums are added here, which torch.compile fuses into
    the next operation."""
    K, N = x.shape[-1], scales.shape[0]
    rows = x.reshape(-1, K)
    M = rows.shape[0]
    if M > MAX_MM_ROWS and M % WIDE_MM_TILE["BLOCK_M"]:
        # zero rows to whole blocks: a part-filled one ran slower
        rows = F.pad(rows, (0, 0, 0, -M % WIDE_MM_TILE["BLOCK_M"]))
    n_sms = sm_count(x.device.index)
    split = (int4_split(rows.shape[0], N, K, n_sms) if zeros is not None
             else one_byte_split(rows.shape[0], N, K, n_sms))
    y = quantized_mm_partials(rows, weight, scales, zeros, groupsize, *split)[:, :M]
    return added_parts(y).to(x.dtype).view(*x.shape[:-1], N)


@torch.library.custom_op("blitz::dequantized_copy", mutates_args=())
def dequantized_copy(weight: Tensor, scales: Tensor, zeros: Optional[Tensor], groupsize: int,
                     dtype: torch.dtype) -> Tensor:
    """The weights, as quantized_mm_partials takes them, dequantized to dtype: (N, K); int4's K
    is its groups' columns."""
    N = scales.shape[0]
    K = scales.shape[1] * groupsize if zeros is not None else weight.shape[1]
    out = torch.empty(N, K, dtype=dtype, device=weight.device)
    if zeros is not None:
        scales, _ = scale_zero_pairs(scales, zeros)  # the kernel reads both through scales
        int4_dequantize_kernel[(triton.cdiv(N, 32), triton.cdiv(K, 128))](
            weight, scales, out, N, K, groupsize, BLOCK_N=32, PTX=on_nvidia(weight))
    else:
        dequantize_kernel[(triton.cdiv(N, 32), triton.cdiv(K, 128))](
            weight, scales, out, N, K, BLOCK_N=32, BLOCK_K=128)
    return out


@dequantized_copy.register_fake
def _(weight: Tensor, scales: Tensor, zeros: Optional[Tensor], groupsize: int,
      dtype: torch.dtype) -> Tensor:
    K = scales.shape[1] * groupsize if zeros is not None else weight.shape[1]
    return weight.new_empty(scales.shape[0], K, dtype=dtype)


def kernel_route(x: Tensor, mm_rows: int = MAX_MM_ROWS) -> Optional[str]:
    """Which Triton kernel serves a quantized layer's input x (..., K), on a CUDA device with
    Triton installed and K a multiple of 4: "gemv" (one row), "mm" (up to mm_rows rows of bf16 or
    fp16: MAX_MM_ROWS, or MAX_WIDE_ROWS for one-byte weights), "dequantize" (more than
    MAX_MM_ROWS rows that "mm" does not take); None: PyTorch's path (off CUDA, or up to
    MAX_MM_ROWS rows of another dtype)."""
    if triton is None or not x.is_cuda or x.shape[-1] % 4:
        return None
    rows = x.numel() // x.shape[-1]
    if rows == 1:
        return "gemv"
    if rows <= mm_rows and x.dtype in MM_DTYPES:
        return "mm"
    return None if rows <= MAX_MM_ROWS else "dequantize"


@torch.library.custom_op("blitz::expert_gemv_partials", mutates_args=())
def expert_gemv_partials(x: Tensor, experts: Tensor, weight: Tensor, scales: Optional[Tensor],
                         split_k: int, swiglu_out: bool = False, ids_final: bool = False) -> Tensor:
    """Rows x (R, K) through experts (P,) (ids, P a multiple of R: pair p takes row p // (P / R)),
    weight (n_experts, N, K) bf16, fp16, float32, or int8 / float8_e4m3fn (K a multiple of 4) with
    scales (n_experts, N): (split_k, P, N) float32 partial sums. swiglu_out (split_k 1): the
    weight's rows are gate then up projections, and the result model.swiglu of the sums,
    (1, P, N / 2) in x's dtype. ids_final: the ids were written before the kernel just before
    this one started (a mixture's w2, right after w13's launch)."""
    P, (_, N, K) = experts.numel(), weight.shape
    assert weight.is_contiguous(), "expert_gemv_partials: row-major weights"
    assert P % x.shape[0] == 0, "expert_gemv_partials: the same number of experts for every row"
    assert not swiglu_out or (split_k == 1 and N % 2 == 0), (
        "expert_gemv_partials: SwiGLU takes whole sums")
    per_word = 4 if weight.element_size() == 1 else 1
    n_out = N // 2 if swiglu_out else N
    y = torch.empty(split_k, P, n_out, dtype=x.dtype if swiglu_out else torch.float32,
                    device=x.device)
    tile, pairs_per_row = EXPERT_TILES[per_word, swiglu_out], P // x.shape[0]
    # w13's GEMV, a plain launch (it reads the router's ids before anything else), lets w2's start
    # at once; w2's ids were final before w13 started, so it loads them and its first weights
    # before its wait (PDL), while w13 ends.
    assert not (swiglu_out and ids_final), (
        "expert_gemv_partials: w13's ids are the router's latest output")
    pdl = EXPERT_PDL and dependent_launch(x)
    early = pdl and ids_final
    x, x16 = gemv_input(x, per_word)
    scaled_gemv_kernel[(triton.cdiv(n_out, tile["BLOCK_N"]), split_k, P)](
        x, weight.view(torch.int32) if per_word == 4 else weight, scales, experts.contiguous(), y,
        n_out, K // per_word, words_per_split(K, split_k) * 4 // per_word, pairs_per_row,
        PER_WORD=per_word, FP8=weight.dtype == torch.float8_e4m3fn, X16=x16, SWIGLU=swiglu_out,
        PDL=early, LAUNCH_NEXT=pdl and swiglu_out, PTX=on_hopper(x),
        **pdl_option(early), **tile)
    return y


@expert_gemv_partials.register_fake
def _(x: Tensor, experts: Tensor, weight: Tensor, scales: Optional[Tensor],
      split_k: int, swiglu_out: bool = False, ids_final: bool = False) -> Tensor:
    N = weight.shape[1] // 2 if swiglu_out else weight.shape[1]
    dtype = x.dtype if swiglu_out else torch.float32
    return x.new_empty(split_k, experts.numel(), N, dtype=dtype)


def expert_matmul(x: Tensor, experts: Tensor, weight: Tensor,
                  scales: Optional[Tensor] = None, swiglu_out: bool = False,
                  ids_final: bool = False) -> Tensor:
    """x (M, 1 or k, K) through the experts (M, k) chosen for each row: weight (n_experts, N, K),
    float or one-byte with scales (n_experts, N). (M, k, N) in float32; the split-K partial sums
    are added here, which torch.compile fuses into the next operation. swiglu_out: model.swiglu
    of that, (M, k, N / 2) in x's dtype, from the one launch (K whole). ids_final: as
    expert_gemv_partials takes it (a mixture's w2, whose kernel prepare_for_device makes so)."""
    N, K = weight.shape[1:]
    if swiglu_out:
        y = expert_gemv_partials(x.reshape(-1, K), experts.flatten(), weight, scales, 1, True)
        return y.view(*experts.shape, N // 2)
    # (ids copied to be contiguous would be written just before the kernel: then it waits first)
    y = expert_gemv_partials(x.reshape(-1, K), experts.flatten(), weight, scales, split_k_for(N, K),
                             ids_final=ids_final and experts.is_contiguous())  # (split_k, M * k, N)
    return added_parts(y).view(*experts.shape, N)


# The grouped form of one-byte experts (prefills, decode batches of more pairs than experts), where
# the PyTorch form dequantizes every expert of the layer into a bf16 copy for torch._grouped_mm.
# Past MAX_WIDE_ROWS rows an expert on average (long prompts) the copy stays: the dense layers'
# bound, where cuBLAS takes over, not measured for experts (at 128 rows an expert the kernel took a
# fifth of the copy's time or less, BENCHMARKS.md). GROUPED_TILE as MM_TILE; 64 columns deep past
# 64 rows, as WIDE_MM_TILE.
GROUPED_TILE = dict(BLOCK_N=64, num_warps=4, num_stages=3)


@torch.library.custom_op("blitz::grouped_expert_mm", mutates_args=())
def grouped_expert_mm(xs: Tensor, ends: Tensor, weight: Tensor, scales: Tensor) -> Tensor:
    """Rows xs (P, K) bf16 or fp16, the (token, expert) pairs sorted by expert, through their
    experts: ends (n_experts,) int32, where each expert's rows end; weight (n_experts, N, K) int8 or
    float8_e4m3fn with scales (n_experts, N). (P, N) in xs's dtype: model.Experts.grouped's
    product, each chosen expert's weights read once and converted in registers."""
    (P, K), (n_experts, N, _) = xs.shape, weight.shape
    assert (weight.is_contiguous() and scales.is_contiguous()
            and ends.dtype == torch.int32), "grouped_expert_mm: layout"
    xs = xs.contiguous()
    y = torch.empty(P, N, dtype=xs.dtype, device=xs.device)
    block_m = min(128, mm_block_rows(-(-P // n_experts)))  # the rows of an expert on average
    tile = dict(GROUPED_TILE, BLOCK_M=block_m, BLOCK_K=128 if block_m <= MAX_MM_ROWS else 64)
    w, tma = weight.view(n_experts * N, K), False
    if tma_loads(w) and tma_loads(xs):
        xs = TensorDescriptor.from_tensor(xs, [tile["BLOCK_M"], tile["BLOCK_K"]])
        w, tma = TensorDescriptor.from_tensor(w, [tile["BLOCK_N"], tile["BLOCK_K"]]), True
    grid = (n_experts, triton.cdiv(N, tile["BLOCK_N"]))
    grouped_mm_kernel[grid](xs, ends, w, scales, y, N, K, TMA=tma, **tile)
    return y


@grouped_expert_mm.register_fake
def _(xs: Tensor, ends: Tensor, weight: Tensor, scales: Tensor) -> Tensor:
    return xs.new_empty(xs.shape[0], weight.shape[1])


def grouped_expert_mm_reference(xs: Tensor, ends: Tensor, weight: Tensor,
                                scales: Tensor) -> Tensor:
    """The same product in float64 with PyTorch, expert by expert."""
    starts = [0] + ends[:-1].tolist()
    w = weight.float().double() * scales.double()[..., None]  # (n_experts, N, K)
    return torch.cat([xs[a:b].double() @ w[e].T
                      for e, (a, b) in enumerate(zip(starts, ends.tolist()))])


def expert_matmul_reference(x: Tensor, experts: Tensor, weight: Tensor,
                            scales: Optional[Tensor] = None, swiglu_out: bool = False) -> Tensor:
    """The same product in float64 with PyTorch."""
    w = weight.float()[experts].double()  # (M, k, N, K); float() first: fp8 converts to float
    if scales is not None:
        w = w * scales[experts].double()[..., None]
    y = (w @ x.double()[..., None])[..., 0]  # (M, k, N)
    return swiglu(y) if swiglu_out else y


# The router's softmax, top k and rescaling in one launch, where compiled PyTorch makes two or three
# (top k of 128 experts alone is torch.topk's 5 us kernel). H200, batch 1: Qwen3-30B-A3B bf16 +17 %
# tok/s, int8 +11 %; Mixtral-8x7B int8 +1 % (BENCHMARKS.md).
@torch.library.custom_op("blitz::router_top_k", mutates_args=())
def router_top_k(logits: Tensor, k: int, normalize: bool) -> tuple[Tensor, Tensor]:
    """logits (M, n_experts) -> the k largest softmax probabilities of each row, largest first,
    rescaled to sum to 1 where `normalize` says so, (M, k) float32, and their experts (M, k)
    int64: model.route's choice, sorted largest first."""
    M, n_experts = logits.shape
    weights = torch.empty(M, k, dtype=torch.float32, device=logits.device)
    experts = torch.empty(M, k, dtype=torch.int64, device=logits.device)
    router_kernel[(M,)](logits.contiguous(), weights, experts, n_experts, K=k,
                        BLOCK_E=triton.next_power_of_2(n_experts),
                        BLOCK_K=triton.next_power_of_2(k), NORM=normalize, num_warps=1)
    return weights, experts


@router_top_k.register_fake
def _(logits: Tensor, k: int, normalize: bool) -> tuple[Tensor, Tensor]:
    M = logits.shape[0]
    return (logits.new_empty(M, k, dtype=torch.float32),
            logits.new_empty(M, k, dtype=torch.int64))


# Sampling's top k in two launches, where torch.topk makes ~20 (a radix select of several passes,
# each a few kernels).
TOP_K_TILE, TOP_K_MAX_TILE = 4096, 16384
TOP_K_KERNEL = True  # False keeps torch.topk


def top_k_tiles(vocab: int, k: int) -> tuple[int, int]:
    """The first round's tile (the values of a row a program takes) and the second's (the first
    round's winners of a row, k a tile), or (0, 0) where a tile would be past TOP_K_MAX_TILE."""
    tile = max(TOP_K_TILE, triton.next_power_of_2(k))
    if vocab <= tile:
        tile, tile2 = triton.next_power_of_2(vocab), 0
    else:
        tile2 = triton.next_power_of_2(triton.cdiv(vocab, tile) * k)
    return (tile, tile2) if max(tile, tile2) <= TOP_K_MAX_TILE else (0, 0)


def top_k_warps(tile: int) -> int:
    return min(16, max(4, tile // 512))


@torch.library.custom_op("blitz::top_k", mutates_args=())
def top_k_op(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """logits (M, vocab), k <= vocab -> the k largest values of each row (M, k), in the logits'
    dtype, and their ids (M, k) int64, in no particular order: torch.topk(sorted=False)'s. Two
    rounds where a row takes more than one tile: the top k of each tile (programs across the GPU),
    then of their winners (top_k_tiles)."""
    M, vocab = logits.shape
    tile, tile2 = top_k_tiles(vocab, k)
    parts = triton.cdiv(vocab, tile)
    key_bits = logits.element_size() * 8
    values = logits.new_empty(M, parts * k)  # (M, parts, k) as rows of the second round
    ids = torch.empty(M, parts * k, dtype=torch.int64, device=logits.device)
    top_k_kernel[(M, parts)](logits.contiguous(), None, vocab, values, ids, K=k,
                             KEY_BITS=key_bits, TILE=tile, num_warps=top_k_warps(tile))
    if parts == 1:
        return values, ids
    top_values, top_ids = values.new_empty(M, k), ids.new_empty(M, k)
    top_k_kernel[(M, 1)](values, ids, parts * k, top_values, top_ids, K=k,
                         KEY_BITS=key_bits, TILE=tile2, num_warps=top_k_warps(tile2))
    return top_values, top_ids


@top_k_op.register_fake
def _(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    M = logits.shape[0]
    return logits.new_empty(M, k), logits.new_empty(M, k, dtype=torch.int64)


def top_k(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """torch.topk(logits, k, sorted=False)'s values and ids for logits (M, vocab), by the kernel
    on CUDA (where TOP_K_KERNEL)."""
    if (TOP_K_KERNEL and triton is not None and logits.is_cuda and k <= logits.size(-1)
            and top_k_tiles(logits.size(-1), k)[0]):
        return top_k_op(logits, k)
    return torch.topk(logits, k, sorted=False)


# A decode token's attention, its rotary embedding and cache write in one kernel (inductor makes
# five launches of them: RoPE of q, of k with k's cache write, v's cache write, the mask, cuDNN's
# attention). Programs are (row, kv head, part of SPLIT_SLOTS slots), each reading only the slots
# its row has filled; a second kernel combines the parts. The parts depend on the cache's length
# only, never on the batch; the tile (below) on how many programs there are, so a row decoded alone
# and in a batch may differ in the last bits of its sums.
SPLIT_SLOTS, ATTENTION_BLOCK_S = 256, 32
# The decode kernel's tile. Where its programs (row, kv head, part) are no more than the GPU's SMs
# (one row over a short cache), each has an SM to itself and takes 64 slots a loop step on 8 warps;
# more programs (long caches, batches) share SMs, where 32 slots on 4 warps pack better. Between
# the projections in a CUDA graph (H200), a layer took 0.5-1.7 us less on each of seven shapes of
# few programs, and 19 and 34 % longer on the two past the SMs (BENCHMARKS.md).
FEW_PROGRAMS_ATTENTION_TILE = dict(BLOCK_S=64, num_warps=8, num_stages=3)
ATTENTION_TILE = dict(BLOCK_S=ATTENTION_BLOCK_S, num_warps=4, num_stages=3)
# tl.dot takes fewer than 16 rows (a kv head's few query heads) from Triton 3.5 on; before, 16.
DOT_MIN_ROWS = 16 if triton is None or tuple(
    int(part) for part in triton.__version__.split(".")[:2]) < (3, 5) else 1
# False keeps the compiled PyTorch path (SDPA) for decode steps and a server's prompt chunks too.
DECODE_ATTENTION = True


@torch.library.custom_op("blitz::decode_attention", mutates_args=("k_cache", "v_cache"))
def decode_attention_op(qkv: Tensor, q_norm: Optional[Tensor], k_norm: Optional[Tensor],
                        eps: float, rope: Tensor, input_pos: Tensor, k_cache: Tensor,
                        v_cache: Tensor, row: int) -> Tensor:
    """qkv (B, (n_head + 2 n_kv_heads) D): one token a row at slots input_pos (B,), its q, k and
    v heads side by side as wqkv gives them; q_norm and k_norm the weights (D,) of the RMSNorms
    of q and k heads (eps theirs), or None; rope (B, 2, D) cos and signed sin; caches
    (rows, n_kv_heads, S, D), row b in cache row row + b. Writes the new k and v (normalised,
    rotated) into the caches; returns the attention (B, n_head * D)."""
    (rows, n_kv_heads, S, D), B = k_cache.shape, qkv.shape[0]
    n_head = qkv.shape[1] // D - 2 * n_kv_heads
    # The kernel writes where these say: a mismatch would land outside the cache, unreported.
    assert qkv.shape == (B, (n_head + 2 * n_kv_heads) * D) and k_cache.shape == v_cache.shape, (
        qkv.shape, k_cache.shape, v_cache.shape)
    assert 0 <= row and row + B <= rows and n_head % n_kv_heads == 0, (row, B, rows, n_head)
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and input_pos.shape == (B,)
    assert rope.shape == (B, 2, D) and (q_norm is None) == (k_norm is None), rope.shape
    qkv = qkv if qkv.stride(1) == 1 else qkv.contiguous()
    y = qkv.new_empty(B, n_head * D)
    # tl.dot's inner dimension is at least 16 on NVIDIA GPUs (the padding is masked off)
    splits, D_PAD = triton.cdiv(S, SPLIT_SLOTS), max(16, triton.next_power_of_2(D))
    parts = m = l = None
    if splits > 1:
        parts = torch.empty(B, n_head, splits, D_PAD, dtype=torch.float32, device=qkv.device)
        m, l = torch.empty(2, B, n_head, splits, dtype=torch.float32, device=qkv.device)
    G, pdl = n_head // n_kv_heads, dependent_launch(qkv)
    few = B * n_kv_heads * splits <= sm_count(qkv.device.index)
    tile = FEW_PROGRAMS_ATTENTION_TILE if few else ATTENTION_TILE
    decode_attention_kernel[(B * n_kv_heads, splits)](
        qkv, q_norm, k_norm, eps, rope.contiguous(), input_pos, k_cache, v_cache,
        y if splits == 1 else parts, m, l, qkv.stride(0), input_pos.stride(0), row, n_kv_heads,
        S, D ** -0.5, G=G, D=D, G_PAD=max(DOT_MIN_ROWS, triton.next_power_of_2(G)), D_PAD=D_PAD,
        NORM=q_norm is not None, SPLIT_SLOTS=SPLIT_SLOTS, SPLITS=splits,
        TRIGGER=splits == 1 and pdl, **tile)
    if splits > 1:
        attention_splits_kernel[(B * n_head,)](
            parts, m, l, y, input_pos, input_pos.stride(0), n_head, D=D, SPLITS=splits,
            SPLITS_PAD=triton.next_power_of_2(splits), SPLIT_SLOTS=SPLIT_SLOTS, D_PAD=D_PAD,
            TRIGGER=pdl)
    return y


@decode_attention_op.register_fake
def _(qkv: Tensor, q_norm: Optional[Tensor], k_norm: Optional[Tensor], eps: float, rope: Tensor,
      input_pos: Tensor, k_cache: Tensor, v_cache: Tensor, row: int) -> Tensor:
    n_kv_heads, D = k_cache.shape[1], k_cache.shape[3]
    return qkv.new_empty(qkv.shape[0], qkv.shape[1] - 2 * n_kv_heads * D)


def decode_attention(attention: Attention, qkv: Tensor, rows: Rows) -> Tensor:
    """model.Attention's decode step in one kernel: qkv (B, qkv_dim), wqkv's output for rows' one
    slot each, taken whole (passed as q, k and v apart, a compiled step would give each a copy of
    its own): (B, n_head * head_dim)."""
    B, cache = qkv.shape[0], attention.kv_cache
    norms = ((attention.q_norm.weight, attention.k_norm.weight, attention.q_norm.eps)
             if attention.qk_norm else (None, None, 0.0))
    return decode_attention_op(qkv, *norms, rows.rope.view(B, 2, -1), rows.input_pos.view(B),
                               cache.k, cache.v, rows.row)


@torch.library.custom_op("blitz::chunk_attention", mutates_args=())
def chunk_attention_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, row: Tensor,
                       input_pos: Tensor) -> Tensor:
    """q (C, n_head, D), a prompt chunk's queries (normalised, rotated) at slots input_pos (C,) of
    cache row row (1,), whose caches (rows, n_kv_heads, S, D) already hold the chunk's keys and
    values: the attention (C, n_head, D), each query over slots 0..its own."""
    (C, n_head, D), (_, n_kv_heads, S, _) = q.shape, k_cache.shape
    assert k_cache.shape == v_cache.shape and k_cache.shape[3] == D and n_head % n_kv_heads == 0
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and input_pos.shape == (C,)
    q = q.contiguous()
    y = torch.empty_like(q)
    G = n_head // n_kv_heads
    G_PAD = triton.next_power_of_2(G)
    # a tile of at least 64 (token, head) rows (more than tl.dot's smallest)
    BLOCK_T = max(1, 64 // G_PAD)
    chunk_attention_kernel[(n_kv_heads, triton.cdiv(C, BLOCK_T))](
        q, k_cache, v_cache, y, row, input_pos.contiguous(), C, n_kv_heads, S, D ** -0.5, G=G,
        G_PAD=G_PAD, D=D, D_PAD=max(16, triton.next_power_of_2(D)), BLOCK_T=BLOCK_T,
        BLOCK_S=ATTENTION_BLOCK_S, num_warps=4, num_stages=3)
    return y


@chunk_attention_op.register_fake
def _(q: Tensor, k_cache: Tensor, v_cache: Tensor, row: Tensor, input_pos: Tensor) -> Tensor:
    return q.new_empty(q.shape)  # contiguous, as the kernel writes it


def relative_error(y: Tensor, reference: Tensor) -> float:
    """|y - reference| / |reference| over all elements, in float64."""
    return ((y.double() - reference.double()).norm() / reference.double().norm()).item()


def scaled_gemv_reference(x: Tensor, weight: Tensor, scales: Tensor) -> Tensor:
    """The same product in float64 with PyTorch."""
    return (x.double() @ weight.double().T) * scales.double()


def random_one_byte(shape: tuple, device) -> tuple[Tensor, Tensor]:
    """Random one-byte weights of `shape` for the checks: int8 in [-127, 127], and fp8 over most of
    e4m3's range."""
    int8 = torch.randint(-127, 128, shape, dtype=torch.int8, device=device)
    fp8 = (torch.randn(shape, device=device) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    return int8, fp8


def quantized_cases(N: int, K: int, device) -> list:
    """(name, weights as the layer's forward takes them, the same weights as float64 (N, K)) for
    random int8, fp8 and int4 (groups of 32 and 128, where they divide K) weights."""
    int8, fp8 = random_one_byte((N, K), device)
    int8_scales = (torch.rand(N, device=device) / 127).to(torch.bfloat16)
    fp8_scales = torch.rand(N, device=device) / 448
    cases = [("int8", (int8, int8_scales), int8.double() * int8_scales.double()[:, None]),
             ("fp8", (fp8, fp8_scales), fp8.double() * fp8_scales.double()[:, None])]
    packed = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device=device)
    for groupsize in (32, 128):
        if K % groupsize == 0:
            scales, zeros = (torch.rand(2, N, K // groupsize, device=device) / 8).to(torch.bfloat16)
            weights = int4_weights(packed, scales, zeros, groupsize, K).double()
            cases.append((f"int4 g{groupsize}", (packed, scales, zeros, groupsize), weights))
    return cases


def check_kernels(device="cuda") -> list:
    """The kernels against their float64 reference on Llama-2-7B's layer shapes and a ragged
    one, for bf16 weights at 1 row (the GEMV, FloatLinear's; and with SwiGLU, as a bf16, int8 or
    int4 w13 of the shape would take it), for int8, fp8 and int4 weights at 1 row (the GEMV;
    int4: the small matmul), 3, 8 and 33 rows (the small matmul), 200 (one-byte weights: the
    small matmul in blocks of rows; int4: a dequantized copy into PyTorch's matmul) and 300 (a
    dequantized copy), then the expert GEMV, the grouped expert kernel, the router, the decode
    and chunk attention kernels and sampling's top k: a list of {name, rows, shape, rel_err, ok}
    (the expert GEMV's also tokens and k); a layer's ok also needs the same bits from a second
    call. scripts/bench.py runs this before timing anything."""
    torch.manual_seed(0)
    results = []
    for N, K in ((12288, 4096), (4096, 11008), (32000, 4096), (37, 320)):
        weight = torch.randn(N, K, device=device, dtype=torch.bfloat16)
        x = torch.randn(1, 1, K, device=device, dtype=torch.bfloat16)
        y = scaled_gemv(x, weight, None)  # (1, 1, N)
        rel = relative_error(y, x.double() @ weight.double().T)
        ok = y.shape == (1, 1, N) and rel < 1e-2 and torch.equal(scaled_gemv(x, weight, None), y)
        results.append(dict(name="bf16", rows=1, shape=[N, K], rel_err=rel, ok=ok))
        one_row = x
        results += check_gemv_swiglu("bf16", one_row, (weight, None), weight.double())
        for name, weights, reference_weights in quantized_cases(N, K, device):
            if name.startswith("int4"):
                packed, *group = weights
                weights = (int4_words(packed), *group)
            if name == "int8" or name.startswith("int4"):
                results += check_gemv_swiglu(name, one_row, weights, reference_weights)
            for rows in (1, 3, 8, 33, 200, 300):
                x = torch.randn(rows, 1, K, device=device, dtype=torch.bfloat16)  # (rows, T, K)
                linear = int4_triton_linear if name.startswith("int4") else one_byte_linear
                y = linear(x, *weights)  # (rows, 1, N)
                reference = x.double() @ reference_weights.T
                rel = relative_error(y, reference)
                # bf16 rounding of the output, and of int4's and the copy's weights: ~4e-3; and
                # the same bits again (a race between a kernel's stages can stay under that)
                ok = y.shape == (rows, 1, N) and rel < 1e-2 and torch.equal(linear(x, *weights), y)
                results.append(dict(name=name, rows=rows, shape=[N, K], rel_err=rel, ok=ok))
    return (results + check_expert_kernel(device) + check_grouped_experts(device)
            + check_router(device) + check_decode_attention(device)
            + check_chunk_attention(device) + check_top_k(device))


def check_gemv_swiglu(name: str, x: Tensor, weights: tuple, reference_weights: Tensor) -> list:
    """The single-row kernel with SwiGLU (a dense bf16, int8 or int4 w13's: the GEMV's or
    int4_swiglu_row) against model.swiglu of the float64 product, where the layer takes it: a list
    of one result, or none."""
    N = reference_weights.shape[0]
    if name.startswith("int4") and N % 2 == 0:
        def with_swiglu():  # (1, 1, N / 2)
            return int4_swiglu_row(x.view(1, -1), *weights).view(1, 1, -1)
    elif not name.startswith("int4") and gemv_takes_swiglu(weights[0]):
        def with_swiglu():  # (1, 1, N / 2)
            return scaled_gemv(x, *weights, swiglu_out=True)
    else:
        return []
    y = with_swiglu()
    rel = relative_error(y, swiglu(x.double() @ reference_weights.T))
    # bf16's rounding of the output: at most half a unit in the last place of each value
    ok = y.shape == (1, 1, N // 2) and rel < 1e-2 and torch.equal(with_swiglu(), y)
    return [dict(name=name + " swiglu", rows=1, shape=[N, x.shape[-1]], rel_err=rel, ok=ok)]


# (experts, N, K): Qwen3-30B-A3B's w13 and w2, Mixtral-8x7B's w2 (split K) and a ragged one
EXPERT_CHECK_SHAPES = ((16, 1536, 2048), (16, 2048, 768), (4, 4096, 14336), (5, 37, 300))


def check_expert_kernel(device="cuda", shapes=EXPERT_CHECK_SHAPES) -> list:
    """The expert GEMV against its float64 reference on `shapes`, for bf16, int8 and fp8 weights,
    a token's pairs (x one row; with SwiGLU too, N even) and their hidden rows (x a row per pair),
    1 and 4 tokens. Each case is described apart (x's rows, tokens, experts a token): results
    merged from several GPUs keep every case."""
    torch.manual_seed(0)
    results = []
    for E, N, K in shapes:
        bf16 = torch.randn(E, N, K, device=device, dtype=torch.bfloat16)
        int8, fp8 = random_one_byte((E, N, K), device)
        for M, k in ((1, 2), (4, 2), (1, 8)):
            experts = torch.randint(0, E, (M, k), device=device)
            for name, weight, scales in (
                    ("experts bf16", bf16, None),
                    ("experts int8", int8, torch.rand(E, N, device=device) / 127),
                    ("experts fp8", fp8, torch.rand(E, N, device=device) / 448)):
                # w13's input: the token (and w13 with its activation, SwiGLU); w2's: a hidden
                # row per pair
                for rows, swiglu_out in [(1, False), (k, False)] + [(1, True)] * (N % 2 == 0):
                    x = torch.randn(M, rows, K, device=device, dtype=torch.bfloat16)
                    y = expert_matmul(x, experts, weight, scales, swiglu_out)  # (M, k, N or N/2)
                    reference = expert_matmul_reference(x, experts, weight, scales, swiglu_out)
                    rel = relative_error(y, reference)
                    # float32 sums; SwiGLU's output rounded to bf16: at most half a unit in the
                    # last place (2**-9 to 2**-8 of a value), well under that over a whole output
                    ok = (y.shape == reference.shape == (M, k, N // (1 + swiglu_out))
                          and rel < (3e-3 if swiglu_out else 1e-4))
                    results.append(dict(name=name + " swiglu" * swiglu_out, rows=M * rows,
                                        shape=[E, N, K], tokens=M, k=k, rel_err=rel, ok=ok))
    return results


def check_grouped_experts(device="cuda") -> list:
    """The grouped expert kernel against its float64 reference, int8 and fp8 experts, on
    Qwen3-30B-A3B's w13 and w2 (128 experts) and Mixtral-8x7B's w2 (8), for a 5-token prompt, a
    batch of 32 and a 32-row step with a 96-token chunk (blocks of 16 to 64 rows; an expert of more
    rows than a block walks several), Mixtral's also for a 512-token prompt (blocks of 128 rows),
    and a ragged shape; the same bits from a second call."""
    torch.manual_seed(0)
    results = []
    for E, N, K, k in ((128, 1536, 2048, 8), (128, 2048, 768, 8), (8, 4096, 14336, 2),
                       (5, 37, 300, 2)):
        int8, fp8 = random_one_byte((E, N, K), device)
        for tokens in (5, 32, 128, 512) if E == 8 else (5, 32, 128):
            experts = torch.rand(tokens, E, device=device).topk(k).indices.flatten().sort().values
            ends = torch.searchsorted(experts, torch.arange(E, device=device), right=True).int()
            xs = torch.randn(experts.numel(), K, device=device, dtype=torch.bfloat16)
            for name, weight, scales in (("int8", int8, torch.rand(E, N, device=device) / 127),
                                         ("fp8", fp8, torch.rand(E, N, device=device) / 448)):
                y = grouped_expert_mm(xs, ends, weight, scales)  # (P, N)
                rel = relative_error(y, grouped_expert_mm_reference(xs, ends, weight, scales))
                ok = (y.shape == (experts.numel(), N) and rel < 1e-2  # bf16 output rounding
                      and torch.equal(grouped_expert_mm(xs, ends, weight, scales), y))
                results.append(dict(name=f"grouped experts {name}", rows=experts.numel(),
                                    shape=[E, N, K], tokens=tokens, k=k, rel_err=rel, ok=ok))
    return results


def distinct_logits(M: int, n_experts: int, device) -> Tensor:
    """Router logits (M, n_experts) in bf16, a row's values all different (no ties to break)."""
    return torch.stack([(torch.randperm(n_experts) - n_experts / 2) / 8
                        for _ in range(M)]).to(device, torch.bfloat16)


def check_router(device="cuda", tokens=(1, 5, 300)) -> list:
    """The router kernel against model.route, its reference, on Mixtral's top 2 of 8, Qwen3-MoE's
    8 of 128 and a ragged 6 of 60, rescaled and not, for each number of tokens: the same experts
    in the same order (route's result sorted largest first here), and their weights."""
    torch.manual_seed(0)
    results = []
    for n_experts, k in ((8, 2), (128, 8), (60, 6)):
        for M in tokens:
            for normalize in (True, False):
                logits = distinct_logits(M, n_experts, device)
                weights, experts = router_top_k(logits, k, normalize)
                reference, reference_experts = route(logits, k, normalize)
                reference, order = reference.sort(dim=-1, descending=True)
                reference_experts = reference_experts.gather(-1, order)
                rel = relative_error(weights, reference)
                ok = torch.equal(experts, reference_experts) and rel < 1e-6
                results.append(dict(name="router" + " rescaled" * normalize, rows=M,
                                    shape=[n_experts, k], rel_err=rel, ok=ok))
    return results


def check_top_k(device="cuda", cases=((32000, 200, 1), (32000, 200, 8), (151936, 200, 1),
                                         (128256, 50, 1), (4100, 300, 3))) -> list:
    """Sampling's top-k kernel against torch.topk on (vocab, k, rows) cases, in bf16 and float32,
    with ties across the k-th value (a row's first 50 values set to its (k - k // 10)-th largest):
    each case's ok is top_k_agrees."""
    torch.manual_seed(0)
    results = []
    for vocab, k, M in cases:
        for dtype in (torch.bfloat16, torch.float32):
            logits = (torch.randn(M, vocab, device=device) * 3).to(dtype)
            logits[:, :50] = logits.topk(k - k // 10).values[:, -1:]
            results.append(dict(name="top-k " + str(dtype).split(".")[-1], rows=M,
                                shape=[vocab, k], rel_err=0.0, ok=top_k_agrees(logits, k)))
    return results


def top_k_agrees(logits: Tensor, k: int) -> bool:
    """Whether top_k_op gives torch.topk's values (sorted, as the kernel does not), (M, k) in the
    logits' dtype, and int64 ids that hold them, no id twice."""
    values, ids = top_k_op(logits, k)
    return (values.shape == ids.shape == (logits.size(0), k) and values.dtype == logits.dtype
            and ids.dtype == torch.int64
            and torch.equal(values.sort(-1).values, torch.topk(logits, k).values.sort(-1).values)
            and torch.equal(logits.gather(-1, ids), values)
            and all(len(set(row.tolist())) == k for row in ids))


def random_attention(H: int, KV: int, D: int, S: int, qk_norm: bool, cache_rows: int, device,
                     dtype) -> tuple:
    """For the attention kernels' checks: an attention layer of H query and KV kv heads of D
    dimensions (q/k norm weights other than RMSNorm's ones, each its own, where qk_norm), its
    rotary table of S slots, and a cache of cache_rows rows of random keys and values (earlier
    tokens, and garbage past them)."""
    args = ModelArgs(dim=H * D, n_layer=1, n_head=H, n_kv_heads=KV, head_dim=D, vocab_size=1,
                     intermediate_size=1, qk_norm=qk_norm)
    attention = Attention(args).to(device, dtype)
    if qk_norm:
        attention.q_norm.weight.data.uniform_(0.5, 1.5), attention.k_norm.weight.data.normal_()
    cache = KVCache(cache_rows, KV, S, D, dtype, device)
    cache.k.normal_(), cache.v.normal_()
    return attention, rope_table(args, S).to(device), cache


def check_decode_attention(device="cuda", dtype=torch.bfloat16) -> list:
    """The decode attention kernel against model.Attention's own path (rotary, cache write, SDPA
    under attention_mask) from the same cache: 4 rows (cache rows 1 to 4) at the first slot, the
    last, and either side of a part boundary; plain multi-head attention, 2, 4 and 7 query heads a
    kv head, head_dim 8 (below tl.dot's 16), 32, 64 and 80, q/k norm, one part and several. A list
    of {name, rows, shape, rel_err, ok}: the output, and each cache after the write."""
    torch.manual_seed(0)
    results = []
    for H, KV, D, S, qk_norm in ((4, 4, 64, 40, False), (4, 2, 8, 24, False),
                                 (8, 2, 32, 300, True), (14, 2, 80, 520, False)):
        pos = torch.tensor([0, SPLIT_SLOTS - 1, SPLIT_SLOTS, S - 1], device=device).clamp(max=S - 1)
        pos = pos[:, None]  # (B, 1)
        B = pos.shape[0]
        attention, rope, cache = random_attention(H, KV, D, S, qk_norm, B + 1, device, dtype)
        rows = Rows(pos, rope[pos], attention_mask(pos, S, dtype), row=1)
        x = torch.randn(B, 1, H * D, device=device, dtype=dtype)
        outputs = []
        for kernel in (None, decode_attention):
            attention.kv_cache, attention.decode_kernel = copy.deepcopy(cache), kernel
            y = attention(x, [rows])  # (B, 1, dim)
            outputs.append((y, attention.kv_cache.k, attention.kv_cache.v))
        for name, reference, y in zip(("output", "k cache", "v cache"), *outputs):
            rel = relative_error(y, reference)
            ok = rel < (1e-5 if dtype == torch.float32 else 1e-2)  # bf16: the rounding of p
            results.append(dict(name=f"decode attention {name}", rows=B, shape=[H, KV, D, S],
                                rel_err=rel, ok=ok))
    return results


def check_chunk_attention(device="cuda", dtype=torch.bfloat16) -> list:
    """The chunk attention kernel against model.Attention's own path (SDPA under attention_mask
    over the row) from the same cache: a prompt's chunk in cache row 1 of 3, its first or a later
    piece, one whose last slot ends a block of slots, and pieces padded past the prompt to the
    cache's last slot as the server pads them (the tokens that share that slot are left out: which
    one's keys it keeps is up to the GPU); 1, 2 and 7 query heads a kv head, head_dim 8 (below
    tl.dot's 16), 64 and 80, q/k norm. A list of {name, rows, shape, rel_err, ok}."""
    torch.manual_seed(0)
    results = []
    for H, KV, D, S, qk_norm, start, C in ((4, 4, 64, 40, False, 0, 24),
                                            (4, 2, 64, 80, False, 33, 32),
                                            (4, 2, 8, 24, False, 9, 16),
                                            (8, 4, 64, 300, True, 150, 96),
                                            (14, 2, 80, 136, False, 100, 70)):
        attention, rope, cache = random_attention(H, KV, D, S, qk_norm, 3, device, dtype)
        pos = torch.arange(start, start + C, device=device).clamp(max=S - 1)[None]  # (1, C)
        rows = Rows(pos, rope[pos], attention_mask(pos, S, dtype),
                    row=torch.tensor([1], device=device))
        x = torch.randn(1, C, H * D, device=device, dtype=dtype)
        outputs = []
        for kernel in (None, chunk_attention_op):
            attention.kv_cache, attention.chunk_kernel = copy.deepcopy(cache), kernel
            outputs.append(attention(x, [rows])[0, :S - 1 - start])  # (tokens, dim)
        rel = relative_error(outputs[1], outputs[0])
        ok = rel < (1e-5 if dtype == torch.float32 else 1e-2)  # bf16: the rounding of p
        results.append(dict(name="chunk attention", rows=C, shape=[H, KV, D, S], rel_err=rel,
                            ok=ok))
    return results


# ---- quantized linear layers ---------------------------------------------------------------------
#
# What quantize.py writes and checkpoint.py loads (N output features, K input features; each weight
# row is one output channel). Integer storage keeps `model.to(dtype)` from ever casting quantized
# values; only float layers and the int8/int4 scales follow the model's dtype. Layouts that depend
# on the device (tinygemm's) are made at load time, so a file quantized on one device loads on any.
#   int8  weight int8 (N, K), scales (N,) in the checkpoint's float dtype: w = weight * scales
#   int4  weight uint8 (N, K_pad / 2) nibble pairs (column 2i in the high nibble, 2i + 1 in
#         the low), scales and zeros bfloat16 (N, K_pad / groupsize):
#         w = (q - 8) * scale + zero, the convention of PyTorch's int4 kernels; K_pad is K rounded
#         up to whole groups, the extra columns are zeros and the input is zero-padded to meet
#         them ("padded" in the record)
#   fp8   weight uint8 (N, K) (e4m3 bit patterns), scale_bits int32 (N,) (float32 bit patterns)
# A mixture's stacked experts (model.Experts) are quantized expert by expert: the same tensors with
# a leading n_experts dim, read by the model's gathered and grouped forms (int8 and fp8 experts
# decode with the expert GEMV on CUDA).
# A quantized file's sidecar config records {format, mode, groupsize, output_mode, layers, padded,
# ...}, so nothing is ever guessed from a file name: the listed layers are of `mode`, but for the
# output layer, of output_mode (int8 by default).

FORMAT = 1  # version of the layout above; checkpoint.py refuses versions it does not know
INT4_MODES = ("int4", "int4-gptq")  # one file format, one layer
GROUPSIZES = (32, 64, 128, 256)  # the group sizes tinygemm supports


def int4_padded_k(in_features: int, groupsize: int) -> int:
    """K rounded up to a whole number of groups (which also meets tinygemm's K % (16 *
    inner_k_tiles))."""
    return -(-in_features // groupsize) * groupsize


def record_padding(padded: dict, layer: str, k: int, groupsize: int):
    """Note in `padded` (the sidecar's record) an int4 layer whose K is no whole number of
    groups."""
    if int4_padded_k(k, groupsize) != k:
        padded[layer] = [k, int4_padded_k(k, groupsize)]


def padding_record(record: dict, model: nn.Module) -> dict:
    """The `padded` record quantize.py writes for the layers a quantization record lists, those
    of `model` (the meta device will do): each int4 layer whose K is no whole number of groups."""
    padded = {}
    for name in record["layers"]:
        if layer_mode(record, name) in INT4_MODES:
            record_padding(padded, name, model.get_submodule(name).in_features,
                           record["groupsize"])
    return padded


FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
# fp8 on CUDA (compute capability >= 9.0): True quantizes activations per token and calls
# torch._scaled_mm (one fp8 tensor-core matmul); False (the default) takes one_byte_linear as int8
# does: on a GPU the Triton GEMV and small matmul. _scaled_mm measured slower at decode than
# weight-only conversion (BENCHMARKS.md).
FP8_SCALED_MM = False


def frozen(t: Tensor) -> nn.Parameter:
    # Parameters rather than buffers: a layer's parameters are what generate.py counts as the
    # bytes it reads, where the layer names nothing else (weights_read).
    return nn.Parameter(t, requires_grad=False)


def one_byte_linear(x: Tensor, weight: Tensor, scales: Tensor) -> Tensor:
    """x (..., K) times one-byte weights (N, K), int8 or float8_e4m3fn, scaled per output row:
    (..., N) in x's dtype. On a GPU the Triton kernels above (kernel_route); otherwise PyTorch,
    scaling in float32, which also keeps torch.compile from matching inductor's weight-only int8
    pattern (`F.linear(x, w.to(bf16)) * bf16 scales` -> aten._weight_int8pack_mm, whose CUDA
    kernel is slow at a few rows: BENCHMARKS.md)."""
    route = kernel_route(x, MAX_WIDE_ROWS)
    if route == "gemv":
        return scaled_gemv(x, weight, scales)
    if route == "mm":
        return quantized_mm(x, weight, scales)
    if route == "dequantize":
        return F.linear(x, dequantized_copy(weight, scales, None, 1, x.dtype))
    # float16 sums of the raw codes (up to 127, or 448 for fp8, times x) overflow long before the
    # scaled output would: they are summed in float32
    compute = torch.float32 if x.dtype == torch.float16 else x.dtype
    return (F.linear(x.to(compute), weight.to(compute)).float() * scales).to(x.dtype)


class Int8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, **_):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = frozen(torch.empty(out_features, in_features, dtype=torch.int8))
        self.scales = frozen(torch.empty(out_features))
        self.bias = frozen(torch.empty(out_features)) if bias else None
        self.cpu_kernel = False  # set by use_cpu_kernel (prepare_for_device)

    def forward(self, x: Tensor) -> Tensor:
        if self.cpu_kernel and cpu_kernel_serves(x, CPU_INT8_MAX_ROWS):
            y = int8_cpu_linear(x, self.weight, self.unit_scales, self.scales)
        else:
            y = one_byte_linear(x, self.weight, self.scales)  # (..., N)
        return y if self.bias is None else y + self.bias

    def gemv_operands(self, x: Tensor) -> Optional[tuple]:
        """(weight, scales) as the GEMV takes them where x takes it (see swiglu_linear), else
        None."""
        return (self.weight, self.scales) if kernel_route(x) == "gemv" else None

    def weights_read(self, rows: int) -> list:
        """The tensors a forward of `rows` rows reads (a decode step's bytes, generate.py)."""
        unit_scales = [self.unit_scales] if self.cpu_kernel and rows <= CPU_INT8_MAX_ROWS else []
        return [*self.parameters(recurse=False), *unit_scales]

    def use_cpu_kernel(self):
        """Route inputs of up to CPU_INT8_MAX_ROWS rows to aten._weight_int8pack_mm (CPU tensors,
        K a multiple of 16: see int8_cpu_kernel_fits)."""
        assert int8_cpu_kernel_fits(self.in_features), "the int8 CPU kernel needs K % 16 == 0"
        if self.weight.data_ptr() % CPU_ALIGNMENT:  # e.g. a tensor inside a memory-mapped file
            self.weight = frozen(self.weight.clone())  # at the allocator's alignment
        # The op scales by ones (exact in bfloat16); the float scales follow in x's dtype. A buffer
        # outside the state_dict, so that it follows the module's moves.
        self.register_buffer("unit_scales", torch.ones(self.out_features, dtype=torch.bfloat16,
                                                       device=self.weight.device),
                             persistent=False)
        self.cpu_kernel = True

    def dequantize(self) -> Tensor:
        return self.weight.float() * self.scales.float()[:, None]  # (N, K)


def int4_dequantize(q: Tensor, scales: Tensor, zeros: Tensor) -> Tensor:
    """(q - 8) * scale + zero, in float32: the convention tinygemm and the CPU int4 op share."""
    return (q.float() - 8) * scales + zeros


def unpack_int4(packed: Tensor) -> Tensor:
    """(..., N, K / 2) uint8 -> (..., N, K) nibbles."""
    return torch.stack([packed >> 4, packed & 0xF], dim=-1).flatten(-2)


def int4_words(packed: Tensor) -> Tensor:
    """Nibble pairs (N, K / 2) as int4_mm_kernel reads them: int32 words (N_16 / 16, K_128 / 128,
    16, 16), N padded with zero rows to N_16, whole tiles of 16 rows, and K with zero nibbles to
    K_128, whole chunks of 128 columns. A tile's chunk is 16 rows of 16 words, one run of 1 KB, and
    a tile's chunks follow each other in K's order, so a program streams its rows' part of K as
    one run of memory. In a chunk, a row's 16 words hold its 128 columns by pairs: column 16 j + 2t
    + e (j and t 0 to 7, e 0 or 1) in bits 16 e + 4 (j % 4) of word 2t + j // 4. Words 2t and 2t +
    1 hold columns 2t and 2t + 1 of each run of 16, the two of a pair in the halves of one word,
    so that one lop3 makes the bf16 pair the tensor cores take, with no byte permute in the kernel.
    Made once, on the device, when a model is prepared for it."""
    padded = F.pad(packed, (0, -packed.shape[1] % 64, 0, -packed.shape[0] % 16))
    q = unpack_int4(padded).int()  # (N_16, K_128)
    # (tiles, row, chunks, h, i, t, e): column 16 (4 h + i) + 2 t + e of a chunk
    q = q.view(q.shape[0] // 16, 16, -1, 2, 4, 8, 2)
    # (tiles, row, chunks, h, t); i = 3, e = 1 wraps
    words = sum(q[..., i, :, e] << (16 * e + 4 * i) for i in range(4) for e in range(2))
    words = words.transpose(-1, -2).flatten(-2)  # (tiles, row, chunks, 2 t + h)
    return words.transpose(1, 2).contiguous()  # (tiles, chunks, row, 2 t + h)


def int4_pairs(words: Tensor, n_rows: int, k_pad: int) -> Tensor:
    """int4_words' layout back to the file's nibble pairs (n_rows, k_pad / 2)."""
    w = words.unflatten(-1, (8, 2)).transpose(-1, -2)  # (tiles, chunks, row, h, t)
    q = torch.stack([torch.stack([w >> (16 * e + 4 * i) & 0xF for e in range(2)], dim=-1)
                     for i in range(4)], dim=4)  # (tiles, chunks, row, h, i, t, e)
    q = q.transpose(1, 2).reshape(-1, words.shape[1] * 128)[:n_rows, :k_pad]  # (n_rows, k_pad)
    return (q[:, 0::2] << 4 | q[:, 1::2]).to(torch.uint8)


def scale_zero_words(scales: Tensor, zeros: Tensor) -> Tensor:
    """int4 group scales and zeros (N, n_groups) side by side, (N, n_groups, 2) in the scales'
    dtype: each group's two in the 4-byte word the Triton kernels read."""
    return torch.stack([scales, zeros.to(scales.dtype)], dim=-1)


def scale_zero_pairs(scales: Tensor, zeros: Tensor) -> tuple[Tensor, Tensor]:
    """int4 group scales and zeros (N, n_groups) as the two halves of one (N, n_groups, 2) tensor,
    views, so that the Triton kernels read a group's scale and zero as one 4-byte word, one load
    where two were (Llama-2-7B int4 g128 on an H100: +1.2 % at batch 1 and 8; BENCHMARKS.md). They
    come back as they are where they are halves so already, as the views of Int4Linear's
    scale_zero (made once, on the device, when a model is prepared for it)."""
    G = scales.shape[-1]
    if (scales.dtype == zeros.dtype and scales.shape == zeros.shape == (scales.shape[0], G)
            and scales.stride() == zeros.stride() == (2 * G, 2) and scales.data_ptr() % 4 == 0
            and zeros.data_ptr() == scales.data_ptr() + scales.element_size()):
        return scales, zeros
    pairs = scale_zero_words(scales, zeros)  # (N, n_groups, 2)
    return pairs[..., 0], pairs[..., 1]


def int4_weights(packed: Tensor, scales: Tensor, zeros: Tensor, groupsize: int,
                 in_features: int) -> Tensor:
    """Packed int4 weights (..., N, K_pad / 2) with their group scales and zeros (..., N, n_groups)
    as float32 (..., N, in_features), the padding dropped."""
    q = unpack_int4(packed).unflatten(-1, (-1, groupsize))  # (..., N, n_groups, G)
    w = int4_dequantize(q, scales.float()[..., None], zeros.float()[..., None])
    return w.flatten(-2)[..., :in_features]


# On CUDA the Triton kernels take int4 inputs from the weights as int4_words lays them out (in place
# of the file's), and in groups of 32 and 64 tinygemm (aten._weight_int4pack_mm, on its own packed
# copy of the weights made at load time) takes those of up to TINYGEMM_MAX_ROWS[groupsize] rows: two
# copies of the weights in memory. Groups of 128 and 256 keep one: there a single row through the
# Triton kernel, launched as a programmatic dependent launch, decodes Llama-2-7B on an H200 1-2 %
# faster than through tinygemm (an H100: 3 % with both launched plainly), in 4.0 GB at peak where
# it takes 7.5 with tinygemm's copy; groups of 32 and 64 decode 12 % and 15 % slower through it on
# an H100 (a single row's chunk scales its eight 16-column blocks' sums apart, a scale and zero
# loaded for each, where groups of 128 scale one sum; BENCHMARKS.md). None: tinygemm for every
# input, one copy (a long prompt ~10x slower), what happens without Triton.
TINYGEMM_MAX_ROWS = {32: 1, 64: 1}
# tinygemm's packing by group size: how many tiles of 16 columns of K it interleaves (8, 4 or 2; the
# CPU op ignores it), 8 where not listed. One row on an H200, Llama-2-7B's block layers: groups of
# 32 take 7-9 % less time on 2 tiles than on 8; 64, 128 and 256 are fastest on 8, or within 1 %
# (BENCHMARKS.md). K must be a multiple of 16 times the tiles.
TINYGEMM_INNER_K_TILES = {32: 2}
# Per device type: (convert the stored (N, K / 2) nibble pairs to the op's layout, the matmul op).
# tinygemm on CUDA; the CPU op shares its (q - 8) * scale + zero convention.
INT4_KERNELS = {
    "cuda": (lambda packed, tiles: torch.ops.aten._convert_weight_to_int4pack(
                packed.contiguous(), tiles),
             torch.ops.aten._weight_int4pack_mm),
    "cpu": (lambda packed, tiles: torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                unpack_int4(packed).int(), tiles),
            torch.ops.aten._weight_int4pack_mm_for_cpu),
}


def int4_triton_linear(x: Tensor, words: Tensor, scales: Tensor, zeros: Tensor,
                       groupsize: int) -> Tensor:
    """x (..., K_pad) bf16 or fp16 on a GPU times int4 weights as int4_words lays them out, with
    their group scales and zeros (N, K_pad / groupsize): the small matmul up to MAX_MM_ROWS rows,
    else a dequantized copy into PyTorch's matmul, as kernel_route chooses (one row included:
    int4 has no GEMV of its own). (..., N) in x's dtype."""
    if kernel_route(x) == "dequantize":
        return F.linear(x, dequantized_copy(words, scales, zeros, groupsize, x.dtype))
    return quantized_mm(x, words, scales, zeros, groupsize)


class Int4Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, groupsize: int,
                 padded_in_features: Optional[int] = None, **_):
        super().__init__()
        k_pad = padded_in_features or in_features
        assert k_pad % groupsize == 0 and k_pad >= in_features, (
            f"K {in_features} padded to {k_pad}: not whole groups of {groupsize}")
        self.in_features, self.out_features = in_features, out_features
        self.groupsize, self.padded_in_features = groupsize, k_pad
        self.weight = frozen(torch.empty(out_features, k_pad // 2, dtype=torch.uint8))
        self.scales = frozen(torch.empty(out_features, k_pad // groupsize, dtype=torch.bfloat16))
        self.zeros = frozen(torch.empty(out_features, k_pad // groupsize, dtype=torch.bfloat16))
        self.bias = frozen(torch.empty(out_features)) if bias else None
        # on a GPU with Triton, the weights as int4_words lays them out in place of `weight`
        self.register_parameter("words", None)
        self.kernel = None  # the int4 matmul op, once use_kernel() has repacked the weights for it
        self.kernel_dtype = None  # the dtype the kernel computes in, when not x's
        self.kernel_max_rows = None  # inputs of more rows take the other path
        self.register_load_state_dict_post_hook(Int4Linear.repack_loaded_tensors)

    def forward(self, x: Tensor) -> Tensor:
        if self.kernel_serves(x.numel() // x.shape[-1]):
            y = self.kernel_forward(x)
        elif self.words is not None and x.is_cuda and x.dtype in MM_DTYPES:
            if self.padded_in_features != self.in_features:
                # (..., K_pad): zeros meet the zero weight columns
                x = F.pad(x, (0, self.padded_in_features - self.in_features))
            y = int4_triton_linear(x, self.words, *self.group_scales_and_zeros(), self.groupsize)
        else:
            y = F.linear(x, self.dequantize().to(x.dtype))
        return y if self.bias is None else y + self.bias

    def swiglu_operands(self, x: Tensor) -> Optional[tuple]:
        """(words, scales, zeros, groupsize) as int4_swiglu_row takes them where x is a single row
        that takes the Triton kernel (see swiglu_linear) with K as the file has it, else None."""
        takes = (self.words is not None and not self.kernel_serves(1)
                 and kernel_route(x) == "gemv" and x.dtype in MM_DTYPES
                 and self.padded_in_features == self.in_features)
        return (self.words, *self.group_scales_and_zeros(), self.groupsize) if takes else None

    def kernel_serves(self, rows: int) -> bool:
        """Inputs of this many rows go to the op use_kernel() packed the weights for."""
        return self.kernel is not None and (self.kernel_max_rows is None
                                            or rows <= self.kernel_max_rows)

    def weights_read(self, rows: int) -> list:
        """The tensors a forward of `rows` rows reads (a decode step's bytes, generate.py): the
        kernel's packed copy where it serves them, else the parameters."""
        if self.kernel_serves(rows):
            bias = [] if self.bias is None else [self.bias]
            return [self.packed, self.scales_and_zeros, *bias]
        return list(self.parameters(recurse=False))

    def dequantize(self) -> Tensor:
        """The weights as float32 (N, K), padding dropped: the reference for the kernels."""
        if self.kernel is not None and self.kernel_max_rows is None:
            return self.kernel_weights()  # the packed copy replaced the file's tensors
        return int4_weights(self.nibble_pairs(), *self.group_scales_and_zeros(), self.groupsize,
                            self.in_features)

    def nibble_pairs(self) -> Tensor:
        """The file's nibble pairs (N, K_pad / 2), from wherever the layer holds them."""
        return (self.weight if self.words is None
                else int4_pairs(self.words, self.out_features, self.padded_in_features))

    def group_scales_and_zeros(self) -> tuple[Tensor, Tensor]:
        """The file's group scales and zeros (N, K_pad / groupsize) each, from wherever the layer
        holds them."""
        return (self.scales, self.zeros) if self.words is None else self.scale_zero.unbind(-1)

    def kernel_weights(self) -> Tensor:
        """dequantize() from the kernel's packed copy, whose layout is the op's own: the kernel
        times the identity, with each group's scale 1 and zero 8, gives every nibble q exactly
        (integers up to 15 in bfloat16); then (q - 8) * scale + zero as int4_weights computes it.
        The identity (K, K) in bfloat16 and its product are transient copies."""
        K, N = self.kernel_in_features, self.out_features
        scales, zeros = self.scales_and_zeros.float().unbind(-1)  # (n_groups, N_pad) each
        # (n_groups, N_pad, 2)
        unit = torch.stack([torch.ones_like(scales), torch.full_like(scales, 8)], dim=-1)
        eye = torch.eye(K, dtype=torch.bfloat16, device=self.packed.device)  # (K, K)
        q = self.kernel(eye, self.packed, self.kernel_groupsize, unit.bfloat16())  # (K, N_pad)
        q = q.t()[:N].unflatten(1, (-1, self.kernel_groupsize))  # (N, n_groups, G)
        w = int4_dequantize(q, scales.t()[:N, :, None], zeros.t()[:N, :, None])
        return w.flatten(1)[:, :self.in_features]

    def use_triton(self):
        """Lay the weights out for the Triton kernels (int4_words, once, on the device), and the
        scales and zeros side by side, scale_zero (N, K_pad / groupsize, 2; scale_zero_words).
        They replace the file's tensors, so the module's state_dict is no longer a checkpoint."""
        self.words = frozen(int4_words(self.weight))
        # One parameter, not two that view it: the zeros' view would start 2 bytes in, and
        # torch.compile copies a GPU input that is not 16-byte aligned on every call, its CUDA
        # graphs on every replay (Llama-2-7B int4 g128 on an H100: 287 tok/s so, 474 with the
        # file's scales and zeros; BENCHMARKS.md).
        self.scale_zero = frozen(scale_zero_words(self.scales, self.zeros))
        del self.weight, self.scales, self.zeros

    def use_kernel(self, device_type: str, dtype: Optional[torch.dtype] = None,
                   max_rows: Optional[int] = None):
        """Repack the weights for the device's int4 matmul (once, after the move to the device).
        The kernel takes x, scales and zeros in one dtype: `dtype` (x is converted to it and the
        result back), else x's (bfloat16 for tinygemm). The packed layout is device-specific.
        Without max_rows the packed copy replaces the file's tensors (no second copy in memory)
        and the module's state_dict is no longer a checkpoint. With max_rows they stay, the
        packed copy is a buffer outside the state_dict, and inputs of more rows (prefills, and
        batches on a GPU) take the other path: the Triton kernels (use_triton), or PyTorch's;
        a later load_state_dict into the layer repacks the loaded tensors."""
        convert, kernel = INT4_KERNELS[device_type]
        weight, (scales, zeros) = self.nibble_pairs(), self.group_scales_and_zeros()
        groupsize, k = self.groupsize, self.padded_in_features
        # K padded to whole groups costs the kernel the padded columns (SmolLM2's 576 in groups of
        # 128: 640) and x a copy a call. Where half or a quarter of a group ends at K (the ops take
        # groups of 32 and more), the group's scale and zero serve each part: the same weights.
        parts = next((p for p in (2, 4) if k != self.in_features and self.groupsize // p >= 32
                      and self.in_features % (self.groupsize // p) == 0), 1)
        if parts > 1:
            groupsize, k = self.groupsize // parts, self.in_features
            weight = weight[:, :k // 2]  # (N, K / 2)
            scales, zeros = (t.repeat_interleave(parts, dim=1) for t in (scales, zeros))
            scales, zeros = scales[:, :k // groupsize], zeros[:, :k // groupsize]
        n_pad = -self.out_features % 16  # the CPU op needs N % 16 == 0, tinygemm N % 8 == 0
        tiles = TINYGEMM_INNER_K_TILES.get(groupsize, 8)
        inner_k_tiles = next(t for t in (tiles, 4, 2) if k % (16 * t) == 0)
        weight = F.pad(weight, (0, 0, 0, n_pad))  # (N_pad, K / 2)
        scales_and_zeros = torch.stack([scales, zeros], dim=-1)  # (N, n_groups, 2)
        scales_and_zeros = (F.pad(scales_and_zeros, (0, 0, 0, 0, 0, n_pad))
                            .transpose(0, 1).contiguous())  # (n_groups, N_pad, 2)
        if dtype is not None:
            # Exact for bfloat16: the file stores bfloat16 scales and zeros.
            scales_and_zeros = scales_and_zeros.to(dtype)
        packed = convert(weight, inner_k_tiles)
        if max_rows is None:
            self.packed = frozen(packed)
            self.scales_and_zeros = frozen(scales_and_zeros)
            del self.weight, self.scales, self.zeros
        else:
            self.register_buffer("packed", packed, persistent=False)
            self.register_buffer("scales_and_zeros", scales_and_zeros, persistent=False)
        self.kernel, self.kernel_dtype, self.kernel_max_rows = kernel, dtype, max_rows
        self.kernel_groupsize, self.kernel_in_features = groupsize, k
        self.kernel_device_type = device_type

    def repack_loaded_tensors(self, incompatible_keys):
        """load_state_dict's post hook: a packed copy beside the file's tensors (use_kernel with
        max_rows) is made anew from the loaded ones, or the kernel would compute with the old.
        Without max_rows the packed copy is the state_dict, and loads itself."""
        if self.kernel is not None and self.kernel_max_rows is not None:
            self.use_kernel(self.kernel_device_type, self.kernel_dtype, self.kernel_max_rows)

    def kernel_forward(self, x: Tensor) -> Tensor:
        K, N = self.in_features, self.out_features
        x2 = x.reshape(-1, K)  # (M, K)
        if self.kernel_dtype is not None:
            x2 = x2.to(self.kernel_dtype)
        if self.kernel_in_features != K:
            # (M, K_pad): zeros meet the zero weight columns
            x2 = F.pad(x2, (0, self.kernel_in_features - K))
        # (M, N_pad)
        # (the buffer follows a later module.to(dtype); the kernel takes x's)
        y = self.kernel(x2.contiguous(), self.packed, self.kernel_groupsize,
                        self.scales_and_zeros.to(x2.dtype))
        if y.shape[1] != N:
            y = y[:, :N]
        return y.to(x.dtype).reshape(*x.shape[:-1], N)


def fp8_scaled_mm(x: Tensor, w8: Tensor, w_scales: Tensor) -> Tensor:
    """x (..., K) -> (..., N) with one fp8 matmul: x is quantized to e4m3 per token (row) on the
    fly and torch._scaled_mm applies both scales in its epilogue. w8 (N, K) e4m3, w_scales (N,)
    float32."""
    x2 = x.reshape(-1, x.shape[-1])  # (M, K)
    # (M, 1); all-zero rows stay zero
    x_scales = (x2.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)
    x8 = (x2.float() / x_scales).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)  # (M, K)
    # w8.t() is column-major (K, N), the layout _scaled_mm wants for its second operand.
    y = torch._scaled_mm(x8, w8.t(), scale_a=x_scales, scale_b=w_scales[None, :],
                         out_dtype=x.dtype)  # (M, N)
    return y.reshape(*x.shape[:-1], w8.shape[0])


class Fp8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, **_):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = frozen(torch.empty(out_features, in_features,
                                         dtype=torch.uint8))  # e4m3 bit patterns
        # float32 bit patterns: model.to(dtype) leaves integer tensors alone, and _scaled_mm takes
        # float32 scales.
        self.scale_bits = frozen(torch.empty(out_features, dtype=torch.int32))
        self.bias = frozen(torch.empty(out_features)) if bias else None
        self.scaled_mm = False  # set by prepare_for_device

    def forward(self, x: Tensor) -> Tensor:
        w8, scales = self.one_byte()  # (N, K), (N,)
        y = (fp8_scaled_mm(x, w8, scales) if self.scaled_mm
             else one_byte_linear(x, w8, scales))  # (..., N)
        return y if self.bias is None else y + self.bias

    def one_byte(self) -> tuple[Tensor, Tensor]:
        """The stored bit patterns as what they are: e4m3 weights and float32 scales."""
        return self.weight.view(torch.float8_e4m3fn), self.scale_bits.view(torch.float32)

    def dequantize(self) -> Tensor:
        w8, scales = self.one_byte()
        return w8.float() * scales[:, None]


class FloatLinear(nn.Linear):
    """nn.Linear whose single rows on a GPU go through the GEMV (GEMV_TILES), faster there
    than PyTorch's matmul; more rows (prompts, batches) keep PyTorch's. prepare_for_device puts
    one in place of each nn.Linear of a bf16 or fp16 model on CUDA, over the same
    parameters. The kernel reads a row-major weight in x's dtype; anything else (a transposed
    weight, mixed dtypes) takes PyTorch's matmul, as F.linear takes any strides."""

    def forward(self, x: Tensor) -> Tensor:
        operands = self.gemv_operands(x)
        if operands is None:
            return super().forward(x)
        y = scaled_gemv(x, *operands)  # (..., N)
        return y if self.bias is None else y + self.bias

    def gemv_operands(self, x: Tensor) -> Optional[tuple]:
        """(weight, None) where x takes the GEMV, else None."""
        w = self.weight
        takes = (FLOAT_GEMV and kernel_route(x) == "gemv" and x.dtype == w.dtype
                 and w.dtype in MM_DTYPES and w.is_contiguous())
        return (w, None) if takes else None


# False: a dense feed-forward's SiLU(gate) * up as a kernel of its own after w13's.
GEMV_SWIGLU = True


def swiglu_linear(w13: nn.Module, x: Tensor) -> Tensor:
    """model.swiglu(w13(x)), a dense feed-forward's activation: a single row that takes the GEMV
    (or int4's Triton kernel) gets it from w13's kernel itself (one launch less a layer), other
    inputs as the model computes them. prepare_for_device gives it to feed-forwards whose w13
    takes it (w13_takes_swiglu)."""
    int4 = isinstance(w13, Int4Linear)
    operands = w13.swiglu_operands(x) if int4 else w13.gemv_operands(x)
    if operands is None:
        return swiglu(w13(x))
    if int4:
        return int4_swiglu_row(x.reshape(1, -1), *operands).view(*x.shape[:-1], -1)
    return scaled_gemv(x, *operands, swiglu_out=True)


def w13_takes_swiglu(w13: nn.Module) -> bool:
    """Whether a dense feed-forward's w13 on a GPU can give SwiGLU's output from its single-row
    kernel (swiglu_linear): a FloatLinear or Int8Linear of whole sums (gemv_takes_swiglu), or an
    Int4Linear (whose kernel then keeps K whole); no bias."""
    if isinstance(w13, Int4Linear):
        return (w13.bias is None and w13.out_features % 2 == 0
                and next(w13.parameters()).is_cuda)
    return (isinstance(w13, (FloatLinear, Int8Linear)) and w13.bias is None
            and w13.weight.is_cuda and gemv_takes_swiglu(w13.weight))


def dependent_launches_pay(model: nn.Module) -> bool:
    """Whether the model's kernels gain from launching as programmatic dependent launches (PDL):
    a dense model whose blocks' linear layers all take a single row through the GEMV (int8, fp8
    weight-only, and bf16 and fp16 ones once they are FloatLinear; int4 ones whose single rows take
    the Triton kernel, which launches so too), or a mixture of experts with float or int8 layers
    (w13's expert GEMV launches plainly, w2's as a dependent launch). Not int4 whose single rows
    tinygemm takes."""
    linears = [m for m in model.layers.modules()
               if isinstance(m, (nn.Linear, Int8Linear, Int4Linear, Fp8Linear))]
    if model.args.n_experts:
        return all(type(m) in (nn.Linear, FloatLinear, Int8Linear) for m in linears)
    return bool(linears) and all(isinstance(m, (FloatLinear, Int8Linear)) or
                                 (isinstance(m, Fp8Linear) and not m.scaled_mm) or
                                 (isinstance(m, Int4Linear) and m.kernel is None
                                  and m.words is not None) for m in linears)


def use_float_gemv(model: nn.Module):
    """Each nn.Linear of the model as a FloatLinear holding the same parameters (a tied output
    layer stays tied)."""
    for name, linear in list(model.named_modules()):
        if type(linear) is nn.Linear:
            layer = FloatLinear(linear.in_features, linear.out_features, linear.bias is not None,
                                device="meta")
            layer.weight, layer.bias = linear.weight, linear.bias
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)


# ---- CPU kernels ---------------------------------------------------------------------------------
#
# aten._weight_int8pack_mm (int8 weights (N, K), one scale per row) and
# aten._weight_int4pack_mm_for_cpu (int4 in the layout of _convert_weight_to_int4pack_for_cpu, made
# at load time by Int4Linear.use_kernel) convert the weights in registers, so a decode step reads
# the one-byte or half-byte weights once instead of writing a float copy of them first. On x86 their
# vectorized code (AVX2, AVX-512) takes bfloat16 activations only: float32 ones run a scalar loop,
# several times slower than reading float32 weights. So these layers round x to bfloat16 for the
# op, which sums in float32 and rounds its output to bfloat16, and convert back to x's dtype: about
# 2e-3 of relative error next to the plain path, far below the quantization's own (int8's scales
# are applied afterwards, in x's dtype: exact). What the vectorized code does not check, and the
# routing does:
#   int8: K a multiple of 16. It steps over K 8 (AVX2) or 16 (AVX-512) columns at a time with no
#         remainder and reads rows of x (AVX-512: also of the weight) with aligned loads: another
#         K gives wrong sums or a segmentation fault. x is copied to a fresh (aligned) tensor, and
#         a weight off the allocator's alignment is copied at load time.
#   int4: N padded to a multiple of 16 and K to whole groups (use_kernel does both).
# Prefills of more rows than CPU_INT8_MAX_ROWS / CPU_INT4_MAX_ROWS are faster on the plain path
# (MKL's matmul on dequantized weights), exact in float32; the int4 layers keep the
# file's tensors for it. Other CPUs (aarch64, x86 without AVX2) keep the plain path: untested there.
# False keeps every CPU model on the plain path: float32-exact, and slower at decode than float32.
CPU_KERNELS = True
CPU_KERNEL_CAPABILITIES = ("AVX2", "AVX512")
CPU_KERNEL_DTYPES = (torch.float32, torch.bfloat16)
CPU_INT8_MAX_ROWS, CPU_INT4_MAX_ROWS = 32, 128
CPU_ALIGNMENT = 64  # bytes: PyTorch's CPU allocator's, enough for any vector load


def cpu_kernels_usable(dtype: torch.dtype) -> bool:
    """PyTorch's vectorized int8 and int4 CPU kernels serve a model in dtype on this CPU."""
    return (CPU_KERNELS and dtype in CPU_KERNEL_DTYPES
            and torch.backends.cpu.get_cpu_capability() in CPU_KERNEL_CAPABILITIES)


def int8_cpu_kernel_fits(in_features: int) -> bool:
    return in_features % 16 == 0


def cpu_kernel_serves(x: Tensor, max_rows: int) -> bool:
    return x.dtype in CPU_KERNEL_DTYPES and x.numel() <= max_rows * x.shape[-1]


def int8_cpu_linear(x: Tensor, weight: Tensor, unit_scales: Tensor, scales: Tensor) -> Tensor:
    """x (..., K) float32 or bfloat16 times int8 weight (N, K) (K a multiple of 16), scaled per
    output row: (..., N) in x's dtype, by aten._weight_int8pack_mm in bfloat16."""
    N, K = weight.shape
    # (M, K), fresh and row-major (a copy keeps a transposed x's strides otherwise): aligned rows
    x16 = x.reshape(-1, K).to(torch.bfloat16, memory_format=torch.contiguous_format, copy=True)
    # (unit_scales follows a later module.to(dtype); the op takes bfloat16 ones)
    y = torch.ops.aten._weight_int8pack_mm(x16, weight, unit_scales.to(torch.bfloat16))  # (M, N)
    return (y * scales).to(x.dtype).view(*x.shape[:-1], N)


# GPTQ writes int4's format: the same layer reads both.
LINEARS = {"int8": Int8Linear, "int4": Int4Linear, "int4-gptq": Int4Linear, "fp8": Fp8Linear}


# ---- quantized experts ---------------------------------------------------------------------------
# Each gives weights(idx, dtype) as model.Experts does: the dequantized weights of experts idx,
# written as plain tensor operations so that inductor fuses them into the model's reductions; and
# gathered(x, experts) as model.Experts does, by the expert GEMV where prepare_for_device set
# `kernel` (int8 and fp8 on CUDA; int4 keeps the PyTorch form); and grouped(xs, ends), one-byte
# experts by the grouped expert kernel where it set `grouped_kernel`, the others (and the longest
# prompts) through their dequantized weights into torch._grouped_mm.

class QuantizedExperts(nn.Module):
    def __init__(self, n_experts: int, in_features: int, out_features: int):
        super().__init__()
        self.n_experts, self.in_features, self.out_features = n_experts, in_features, out_features
        self.kernel = self.grouped_kernel = None

    gathered, grouped = Experts.gathered, Experts.grouped


class OneByteExperts(QuantizedExperts):
    """int8 or fp8 experts, one scale per row: one_byte() gives (weight, scales) as the kernels
    take them."""

    def weights(self, idx, dtype) -> Tensor:
        weight, scales = self.one_byte()  # (n_experts, N, K), (n_experts, N)
        return (weight[idx].float() * scales[idx].float()[..., None]).to(dtype)

    def gathered(self, x: Tensor, experts: Tensor, swiglu_out: bool = False) -> Tensor:
        if self.kernel is not None:
            return self.kernel(x, experts, *self.one_byte(), swiglu_out=swiglu_out)
        return super().gathered(x, experts, swiglu_out)

    def grouped(self, xs: Tensor, ends: Tensor) -> Tensor:
        if self.grouped_kernel is not None and xs.shape[0] <= MAX_WIDE_ROWS * self.n_experts:
            return self.grouped_kernel(xs, ends, *self.one_byte())
        return super().grouped(xs, ends)  # every expert dequantized, for torch._grouped_mm


class Int8Experts(OneByteExperts):
    def __init__(self, n_experts: int, in_features: int, out_features: int, **_):
        super().__init__(n_experts, in_features, out_features)
        self.weight = frozen(torch.empty(n_experts, out_features, in_features, dtype=torch.int8))
        self.scales = frozen(torch.empty(n_experts, out_features))

    def one_byte(self) -> tuple[Tensor, Tensor]:
        return self.weight, self.scales


class Int4Experts(QuantizedExperts):
    def __init__(self, n_experts: int, in_features: int, out_features: int, groupsize: int,
                 padded_in_features: Optional[int] = None, **_):
        super().__init__(n_experts, in_features, out_features)
        k_pad = padded_in_features or in_features
        self.groupsize = groupsize
        shape = (n_experts, out_features)
        self.weight = frozen(torch.empty(*shape, k_pad // 2, dtype=torch.uint8))
        self.scales = frozen(torch.empty(*shape, k_pad // groupsize, dtype=torch.bfloat16))
        self.zeros = frozen(torch.empty(*shape, k_pad // groupsize, dtype=torch.bfloat16))

    def weights(self, idx, dtype) -> Tensor:
        return int4_weights(self.weight[idx], self.scales[idx], self.zeros[idx], self.groupsize,
                            self.in_features).to(dtype)


class Fp8Experts(OneByteExperts):
    def __init__(self, n_experts: int, in_features: int, out_features: int, **_):
        super().__init__(n_experts, in_features, out_features)
        self.weight = frozen(torch.empty(n_experts, out_features, in_features, dtype=torch.uint8))
        self.scale_bits = frozen(torch.empty(n_experts, out_features, dtype=torch.int32))

    one_byte = Fp8Linear.one_byte


EXPERTS = {"int8": Int8Experts, "int4": Int4Experts, "int4-gptq": Int4Experts, "fp8": Fp8Experts}


def layer_mode(quantization: dict, layer: str) -> str:
    """The mode of a layer the record lists: the output layer's own where the record gives one,
    else (it is quantized like the others) the record's mode."""
    if layer == "output" and quantization.get("output_mode"):
        return quantization["output_mode"]
    return quantization["mode"]


def swap_linears(model: nn.Module, quantization: dict):
    """Replace the nn.Linear layers (and stacked experts) that a (checked) quantization record lists
    by empty quantized ones of the same shapes: call it on the meta device;
    load_state_dict(assign=True) then brings the weights."""
    padded = quantization.get("padded", {})
    for name in quantization["layers"]:
        linear = model.get_submodule(name)
        parent, _, child = name.rpartition(".")
        shape = dict(groupsize=quantization["groupsize"],
                     padded_in_features=padded.get(name, (None, None))[1])
        if isinstance(linear, Experts):
            layer = EXPERTS[quantization["mode"]](linear.n_experts, linear.in_features,
                                                  linear.out_features, **shape)
        else:
            layer = LINEARS[layer_mode(quantization, name)](linear.in_features,
                                                            linear.out_features,
                                                            linear.bias is not None, **shape)
        setattr(model.get_submodule(parent), child, layer)


def prepare_for_device(model: nn.Module):
    """After the model reached its device and dtype: pack int4 weights for tinygemm (CUDA, bfloat16,
    see TINYGEMM_MAX_ROWS) and lay them out for the Triton kernels (Int4Linear.use_triton), choose
    the fp8 matmul, give float, int8 and fp8 experts on CUDA the expert GEMV (int8 and fp8 also the
    grouped expert kernel, in bf16 models), their routers the router kernel, bf16 and fp16 attention
    the decode and chunk attention kernels, bf16 and fp16 linear layers the GEMV (FloatLinear),
    dense feed-forwards SwiGLU in w13's kernel (swiglu_linear), and on the CPU route
    decode-sized inputs of the int8 and int4 layers to PyTorch's CPU kernels (where
    cpu_kernels_usable). On a GPU, it also sets inductor's dependent launches for the process
    (below)."""
    dtype = model.tok_embeddings.weight.dtype  # the activations' dtype
    cpu_kernels = cpu_kernels_usable(dtype)
    triton_16_bit = (triton is not None and model.tok_embeddings.weight.is_cuda
                     and dtype in MM_DTYPES)
    attention_kernel = DECODE_ATTENTION and triton_16_bit
    if FLOAT_GEMV and triton_16_bit:
        use_float_gemv(model)
    # a mixture's w2 runs right after its w13 (expert_gemv_partials' ids_final)
    second_layers = {id(m.w2) for m in model.modules() if isinstance(m, MoEFeedForward)}
    for module in model.modules():
        if isinstance(module, Attention) and attention_kernel:
            module.decode_kernel, module.chunk_kernel = decode_attention, chunk_attention_op
        if isinstance(module, MoEFeedForward) and module.gate.weight.is_cuda and triton is not None:
            module.router_kernel = router_top_k
        # (w13 is FloatLinear already, above; fp8 layers keep SiLU(gate) * up apart: with it in the
        # GEMV they decode 0.8 % slower on an H100, bf16 and int8 1.7 and 2.2 % faster, int4 in its
        # kernel 0.7-1.5 %; BENCHMARKS.md)
        if (isinstance(module, FeedForward) and GEMV_SWIGLU and triton is not None
                and w13_takes_swiglu(module.w13)):
            module.swiglu_kernel = swiglu_linear
        if (isinstance(module, (Experts, OneByteExperts)) and module.weight.is_cuda
                and triton is not None and module.in_features % 4 == 0):  # int32 words
            module.kernel = (functools.partial(expert_matmul, ids_final=True)
                             if id(module) in second_layers else expert_matmul)
            # bf16: the grouped form's dtype (model.MoEFeedForward.grouped loops over the experts
            # in others)
            if isinstance(module, OneByteExperts) and dtype == torch.bfloat16:
                module.grouped_kernel = grouped_expert_mm
        # (an int4 layer's `weight` gives way to the words or tinygemm's copy: ask any parameter)
        on_gpu = (isinstance(module, (Int4Linear, Fp8Linear))
                  and next(module.parameters()).is_cuda)
        on_cpu = (cpu_kernels and isinstance(module, (Int8Linear, Int4Linear))
                  and next(module.parameters()).device.type == "cpu")
        if (isinstance(module, Int8Linear) and on_cpu and not module.cpu_kernel
                and int8_cpu_kernel_fits(module.in_features)):
            module.use_cpu_kernel()
        elif isinstance(module, Int4Linear) and on_cpu and module.kernel is None:
            module.use_kernel("cpu", torch.bfloat16, CPU_INT4_MAX_ROWS)
        elif isinstance(module, Int4Linear) and on_gpu and module.words is None:
            # without Triton, tinygemm takes every input (None)
            tinygemm_rows = TINYGEMM_MAX_ROWS.get(module.groupsize, 0) if triton else None
            if module.kernel is None and dtype == torch.bfloat16 and tinygemm_rows != 0:
                module.use_kernel("cuda", max_rows=tinygemm_rows)
            if (triton is not None and dtype in MM_DTYPES
                    and (module.kernel is None or module.kernel_max_rows is not None)):
                module.use_triton()
        elif isinstance(module, Fp8Linear) and on_gpu:
            # _scaled_mm: both matrix dims of the weight % 16, row-wise scales on 9.0+, bf16 output.
            capability = torch.cuda.get_device_capability(module.weight.device)
            module.scaled_mm = (FP8_SCALED_MM and capability >= (9, 0) and dtype == torch.bfloat16
                                and module.in_features % 16 == 0 and module.out_features % 16 == 0)
    # Inductor's kernels as programmatic dependent launches too (Hopper and later GPUs; elsewhere
    # the option changes nothing) where the GEMV or int4's small matmul (PDL) takes the dense
    # layers' single rows: each lets the next kernel launch once it has loaded its inputs, so that
    # the GEMV after it streams weights while it ends. H200 at batch 1: Llama-2-7B int8 +6 % with
    # both; in one process 416.0 tok/s with both, 394.4 with the GEMV's alone, 384.9 with inductor's
    # alone; int4 g128 with tinygemm's single rows (as groups of 32 and 64 keep them) -2 % with
    # inductor's, with its own kernel's +4 % at batch 8, -1.5 % at 32; Qwen3-30B-A3B bf16 +1.3 %,
    # int8 +1.9 %, Mixtral-8x7B int8 +1.5 % (BENCHMARKS.md). The option is the process's: the model
    # prepared last sets it.
    if (triton is not None and model.tok_embeddings.weight.is_cuda
            and hasattr(inductor_config.triton, "enable_pdl")):  # (torch 2.9 and later)
        inductor_config.triton.enable_pdl = PDL and dependent_launches_pay(model)
