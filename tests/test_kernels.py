"""kernels.py's Triton kernels against their PyTorch reference, run by Triton's CPU interpreter
(the same kernel source the GPU compiles; fp8 weights go through the expert GEMV here, and through
every kernel on the GPU in kernels.check_kernels, which scripts/bench.py runs first; speeds:
BENCHMARKS.md).

Each check runs as `TRITON_INTERPRET=1 python tests/test_kernels.py NAME` (the variable must be set
before Triton is imported); conftest.py's interpreter_jobs starts them in the background when the
session begins, and the tests below check their results."""
import sys
from pathlib import Path

import numpy
import pytest
import torch
import triton  # requirements-test.txt: the interpreter below, and kernels.py's helpers

# Triton 3.6's interpreter passes scalar arguments as 1-element arrays, and NumPy 2.4 refuses int()
# of those, so no kernel looping up to an argument runs in it there (requirements-test.txt's
# mistral-common keeps NumPy < 2.4). The checks run in the interpreter only.
in_the_interpreter = pytest.mark.skipif(
    tuple(map(int, numpy.__version__.split(".")[:2])) >= (2, 4),
    reason="Triton's interpreter fails on NumPy >= 2.4 (int() of a 1-element array)")


# x in float32 as it is, and in bf16 and fp16 as int64 words of four values (kernels.gemv_input).
X_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_scaled_gemv():
    from kernels import (GEMV_TILES, gemv_input, relative_error,
                         scaled_gemv_kernel, scaled_gemv_reference, words_per_split)
    torch.manual_seed(0)
    checked = dict.fromkeys(X_DTYPES, 0)
    # Whole tiles, ragged rows and columns.
    for N, K in ((64, 1024), (100, 1000), (8, 4096), (37, 300), (16, 8192)):
        # -128 too: every byte pattern is converted exactly.
        w = torch.randint(-128, 128, (N, K), dtype=torch.int8)
        scales = torch.rand(N) / 127
        # the project's int8 and fp8 tiles, launched as kernels.scaled_gemv launches them (int8's
        # 512 words end a part of 768 in half a tile), and a narrow one
        tiles = [GEMV_TILES[torch.int8], GEMV_TILES[torch.float8_e4m3fn],
                 dict(BLOCK_N=4, BLOCK_WORDS=64)]
        for c, tile in enumerate(tiles):
            # K split over 3 programs (or fewer, then some add nothing): each word counted once.
            for split_k in (1, 3):
                # every other x a view one value into its buffer (gemv_input copies a 16-bit
                # one to whole words); int8's tile split gets 16-bit x, read by the weights' mask
                x = torch.randn(K + 1, dtype=X_DTYPES[(c + split_k + 1) % 3])[c % 2:][:K]
                reference = scaled_gemv_reference(x, w, scales)  # (N,)
                y = torch.full((split_k, N), float("nan"))  # poisoned: every element must be written
                grid = (triton.cdiv(N, tile["BLOCK_N"]), split_k)
                x_read, x16 = gemv_input(x, 4)
                scaled_gemv_kernel[grid](x_read, w.view(torch.int32), scales, None, y, N, K // 4,
                                         words_per_split(K, split_k), 1, PER_WORD=4, FP8=False,
                                         X16=x16, **tile)
                error = relative_error(y.sum(0), reference)
                assert error < 1e-6, (N, K, tile, split_k, x.dtype, error)
                checked[x.dtype] += 1
    assert min(checked.values()) >= 3, checked
    # bf16 and fp16 weights, a weight a word, on the tile kernels.scaled_gemv_partials gives them:
    # K ragged against it and shorter than it, an odd N (a last tile of one row), K split in parts
    # of whole tiles (3 parts of 2048 columns, the last one short)
    for (N, K), dtype, split_k in (((37, 1000), torch.bfloat16, 1), ((8, 300), torch.float16, 1),
                                   ((5, 5000), torch.bfloat16, 3)):
        w = torch.randn(N, K, dtype=dtype)
        x = torch.randn(K, dtype=dtype)
        reference = x.double() @ w.double().T  # (N,)
        y = torch.full((split_k, N), float("nan"))
        tile = GEMV_TILES[dtype]
        scaled_gemv_kernel[(triton.cdiv(N, tile["BLOCK_N"]), split_k)](
            x, w, None, None, y, N, K, words_per_split(K, split_k) * 4, 1, PER_WORD=1, FP8=False,
            X16=None, **tile)
        error = relative_error(y.sum(0), reference)
        assert error < 1e-6, (N, K, dtype, split_k, error)
    check_swiglu_in_the_gemv()


# A dense feed-forward's w13 through kernels.swiglu_linear, as a GPU decode step takes it (the route
# told it is one: a CPU has none): int8, bf16 and int4 layers of 2 n rows (gate, then up), n ragged
# against the tiles (int4: 8 gate rows a program) and not; int4 in groups of 32 and 128, K whole
# chunks and not; SiLU(gate) * up of the float64 product, within the output's rounding (x fp16 for
# int4: the interpreter's tl.dot takes no bf16). Gate and up swapped, or paired with another
# output's row, would be off by far more.
def check_swiglu_in_the_gemv():
    import kernels
    from model import swiglu
    torch.manual_seed(0)
    kernels.kernel_route = lambda x, *_: "gemv"  # (this process checks nothing else)
    for n, K, groupsize in ((37, 320, 32), (64, 1024, 128)):
        int8 = kernels.Int8Linear(K, 2 * n, bias=False)
        int8.weight.copy_(torch.randint(-128, 128, (2 * n, K), dtype=torch.int8))
        int8.scales.copy_(torch.rand(2 * n) / 127)
        bf16 = kernels.FloatLinear(K, 2 * n, bias=False).to(torch.bfloat16)
        int4 = kernels.Int4Linear(K, 2 * n, bias=False, groupsize=groupsize)
        int4.weight.copy_(torch.randint(0, 256, int4.weight.shape, dtype=torch.uint8))
        int4.scales.copy_(torch.rand(2 * n, K // groupsize) / 8)
        int4.zeros.copy_(torch.randn(2 * n, K // groupsize) / 8)
        int4_weight = int4.dequantize()
        int4.use_triton()
        for layer, weight, dtype in ((int8, int8.dequantize(), torch.bfloat16),
                                     (bf16, bf16.weight, torch.bfloat16),
                                     (int4, int4_weight, torch.float16)):
            x = torch.randn(1, 1, K, dtype=dtype)
            # int4: its kernel's SwiGLU, not the model's after it
            assert layer is not int4 or int4.swiglu_operands(x) is not None
            y = kernels.swiglu_linear(layer, x)  # (1, 1, n)
            reference = swiglu(x.double() @ weight.double().T)  # (1, 1, n)
            error = kernels.relative_error(y, reference)
            assert y.shape == (1, 1, n) and error < 1e-2, (type(layer), n, K, error)


# The interpreter's tl.dot mishandles bfloat16 (NumPy has no such type), so x is float32 here;
# kernels.check_kernels checks the bf16 path on the GPU.
def check_quantized_mm():
    from kernels import (MM_TILE, WIDE_MM_TILE, TensorDescriptor, mm_block_rows, quantized_mm,
                         quantized_mm_kernel, relative_error)
    torch.manual_seed(0)
    checked = {"plain": 0, "TMA": 0, "blocks": 0, "x TMA": 0, "one block, x TMA": 0}
    # A decode batch of M rows in one block, padded to 16, 64 and exactly 64 rows, with the
    # project's tile and two others (narrow and deep, wide); and wider inputs in blocks of rows,
    # the last one part-filled, with the wide tile's shape and a smaller block. int8 weights, K
    # whole or split over 3 programs (each column counted once); weights and x read by plain
    # loads or through a tensor descriptor (TMA: a tile past N, K or M reads zeros).
    small = [MM_TILE, dict(BLOCK_N=16, BLOCK_K=256), dict(BLOCK_N=128, BLOCK_K=128)]
    wide = [WIDE_MM_TILE, dict(BLOCK_N=32, BLOCK_K=64, BLOCK_M=32)]
    for M, tiles in [(M, small) for M in (1, 2, 33, 64)] + [(M, wide) for M in (65, 130)]:
        # whole tiles; ragged outputs; K ragged against 256-column tiles, and against 128 (SmolLM2's)
        for N, K in ((64, 1024), (100, 768), (37, 384), (37, 576)):
            w = torch.randint(-128, 128, (N, K), dtype=torch.int8)
            scales = torch.rand(N) / 127
            x = torch.randn(M, K)
            reference = x.double() @ (w.double() * scales.double()[:, None]).T  # (M, N)
            for c, tile in enumerate(tiles):
                tile = {"BLOCK_M": mm_block_rows(M), **tile}  # a small tile: all rows in one block
                for split_k, tma in ((1, c % 2 == 1), (3, c % 2 == 0)):
                    x_tma = tma and (M > 64 or c > 0)  # small blocks take both forms of x
                    w_arg = (TensorDescriptor.from_tensor(w, [tile["BLOCK_N"], tile["BLOCK_K"]])
                             if tma else w)
                    x_arg = (TensorDescriptor.from_tensor(x, [tile["BLOCK_M"], tile["BLOCK_K"]])
                             if x_tma else x)
                    y = torch.full((split_k, M, N), float("nan"))  # poisoned: all written
                    grid = (triton.cdiv(M, tile["BLOCK_M"]), triton.cdiv(N, tile["BLOCK_N"]),
                            split_k)
                    quantized_mm_kernel[grid](x_arg, w_arg, scales, y, M, N, K,
                                              -(-K // split_k // 256) * 256, TMA=tma,
                                              X_TMA=x_tma, **tile)
                    error = relative_error(y.sum(0), reference)
                    assert error < 1e-6, (M, N, K, tile, split_k, tma, error)
                    checked["TMA" if tma else "plain"] += 1
                    checked["blocks"] += grid[0] > 1
                    checked["x TMA"] += x_tma
                    checked["one block, x TMA"] += x_tma and grid[0] == 1
    assert min(checked.values()) >= 8, checked
    # As the layers call it (kernels.quantized_mm): past MAX_MM_ROWS rows, x padded to whole
    # blocks, the padding's rows dropped from the result; K whole (one SM, as off a GPU) or, for
    # a GPU of 4 SMs, split for this layer of 2 tiles a block: 4 parts at 1 block, 2 at 2; and
    # decode batches in one block, K whole below 32 rows (768 columns: under two parts of 1024)
    # or, from 32 rows, in 2 parts (512 + 256 columns) on 1 SM and 3 on 4.
    import kernels
    sm_count = kernels.sm_count
    try:
        for M, sms in ((65, 1), (128, 1), (130, 1), (65, 4), (130, 4), (2, 4), (33, 1), (33, 4)):
            kernels.sm_count = lambda index: sms
            w = torch.randint(-128, 128, (100, 768), dtype=torch.int8)
            scales = torch.rand(100) / 127
            x = torch.randn(M, 1, 768)  # (rows, T, K)
            reference = x.double() @ (w.double() * scales.double()[:, None]).T  # (M, 1, N)
            y = quantized_mm(x, w, scales)
            assert y.shape == (M, 1, 100) and relative_error(y, reference) < 1e-6, (M, y.shape)
    finally:
        kernels.sm_count = sm_count


# int4 in int4_words' layout, 1 to 64 rows (MAX_MM_ROWS: two shapes), groups of 32 to 256 (several
# groups in a 128-column chunk, one, part of one), K whole chunks or not, N whole tiles of 16 rows
# or not, blocks of 16 to 64 rows, split over 3 programs or not, loads masked and (where the tiles
# and chunks are whole) not; each group's scale and zero side by side; the bits by Triton's arithmetic
# (the interpreter runs no PTX, which kernels.check_kernels checks on the GPU). The kernel sums
# (128 + q) x and x in float32 and subtracts 136 times the second: a relative error of a few 1e-6
# against float64.
def check_int4_mm():
    from kernels import (INT4_MM_TILE, int4_tile, int4_mm_kernel, int4_weights, int4_words,
                         relative_error, scale_zero_pairs)
    torch.manual_seed(0)
    checked = dict.fromkeys([(g, even) for g in (32, 64, 128, 256) for even in (False, True)], 0)
    shapes = ((64, 1024), (100, 768), (37, 576))
    for M, mine in ((1, shapes), (2, shapes), (33, shapes), (64, shapes[::2])):
        for N, K in mine:
            packed = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8)
            words = int4_words(packed)
            x = torch.randn(M, K)
            for g in (32, 64, 128, 256):
                if K % g:
                    continue
                s, z = scale_zero_pairs(*(torch.rand(2, N, K // g) / 8).to(torch.bfloat16))
                reference = x.double() @ int4_weights(packed, s, z, g, K).double().T  # (M, N)
                for block_n, split_k in ((32, 1), (64, 3), (16, 3)):
                    # without masks where the shape allows (what quantized_mm_partials chooses)
                    for even in {False, N % block_n == 0 and K % 128 == 0}:
                        y = torch.full((split_k, M, N), float("nan"))  # poisoned: all written
                        grid = (triton.cdiv(N, block_n), split_k)
                        int4_mm_kernel[grid](x, words, s, y, M, N, K, -(-K // split_k // 128) * 128,
                                             g, BLOCK_M=int4_tile(M)["BLOCK_M"], BLOCK_N=block_n,
                                             PTX=False, EVEN=even,
                                             num_warps=INT4_MM_TILE["num_warps"])
                        error = relative_error(y.sum(0), reference)
                        assert error < 1e-5, (M, N, K, g, block_n, split_k, even, error)
                        checked[g, even] += 1
    assert min(checked.values()) >= 6, checked


# The copy a prefill multiplies by: scaled one-byte weights and dequantized int4 ones (from
# int4_words' layout), in float32 (exact) and float16 (rounded once; the interpreter's bfloat16
# truncates, so kernels.check_kernels checks bfloat16 on the GPU).
def check_dequantize():
    from kernels import (dequantize_kernel, int4_dequantize_kernel, int4_weights, int4_words,
                         scale_zero_pairs)
    torch.manual_seed(0)
    # Tiles narrower and wider than a group, and wider than K.
    for N, K in ((64, 512), (37, 96)):
        int8 = torch.randint(-128, 128, (N, K), dtype=torch.int8)
        scales = torch.rand(N) / 127
        for block_k in (32, 128):
            for dtype in (torch.float32, torch.float16):
                out = torch.full((N, K), float("nan"), dtype=dtype)
                grid = (triton.cdiv(N, 16), triton.cdiv(K, block_k))
                dequantize_kernel[grid](int8, scales, out, N, K, BLOCK_N=16, BLOCK_K=block_k)
                reference = int8.float() * scales[:, None]
                assert torch.equal(out, reference.to(dtype)), (N, K, block_k, dtype)
        packed = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8)
        for g in (32, 64, 128, 256):
            if K % g:
                continue
            s, z = scale_zero_pairs(*(torch.rand(2, N, K // g) / 8).to(torch.bfloat16))
            reference = int4_weights(packed, s, z, g, K)
            for dtype in (torch.float32, torch.float16):
                out = torch.full((N, K), float("nan"), dtype=dtype)
                int4_dequantize_kernel[(triton.cdiv(N, 16), triton.cdiv(K, 128))](
                    int4_words(packed), s, out, N, K, g, BLOCK_N=16, PTX=False)
                assert torch.equal(out, reference.to(dtype)), (N, K, g, dtype)
    check_int4_kernels_read_float16_scales_and_zeros()


# A float16 model's int4 layers keep their group scales and zeros in float16 (a group's scale in
# the low half of its 4-byte word, its zero in the high half; scale_and_zero reads bfloat16 ones
# otherwise): the dequantized copy and the small matmul, one row and several, against int4_weights,
# scales and zeros unlike each other. K of 320: two chunks and a half, in groups of 32 and 64.
def check_int4_kernels_read_float16_scales_and_zeros():
    from kernels import (int4_dequantize_kernel, int4_mm_kernel, int4_tile, int4_weights,
                         int4_words, relative_error, scale_zero_pairs)
    torch.manual_seed(0)
    N, K = 21, 320
    packed = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8)
    for g in (32, 64):
        s, z = scale_zero_pairs(torch.rand(N, K // g, dtype=torch.float16) / 8 + 0.01,
                                torch.randn(N, K // g, dtype=torch.float16) / 8)
        reference = int4_weights(packed, s, z, g, K)  # (N, K)
        out = torch.full((N, K), float("nan"))
        int4_dequantize_kernel[(triton.cdiv(N, 16), triton.cdiv(K, 128))](
            int4_words(packed), s, out, N, K, g, BLOCK_N=16, PTX=False)
        assert torch.equal(out, reference), g
        for M in (1, 3):
            x = torch.randn(M, K)
            y = torch.full((1, M, N), float("nan"))
            int4_mm_kernel[(triton.cdiv(N, 16), 1)](x, int4_words(packed), s, y, M, N, K, 384, g,
                                                   BLOCK_M=int4_tile(M)["BLOCK_M"], BLOCK_N=16,
                                                   PTX=False)
            error = relative_error(y[0], x.double() @ reference.double().T)
            assert error < 1e-5, (g, M, error)


# A long prompt's rows (a dequantized copy into PyTorch's matmul, as kernels.kernel_route sends
# more rows than the small matmuls take) and the same rows decoded (one row through the GEMV or
# int4's small matmul, a batch of three through the small matmul) agree within the rounding of
# the activations' dtype: the copy rounds each weight to it, the decode kernels sum in float32. In
# float16 here: the interpreter rounds bfloat16 by truncation (kernels.check_kernels checks each
# path in bfloat16 on the GPU). K of 1280: ten chunks of 128, not whole parts of 1024.
def check_prefill_matches_decode():
    import torch.nn.functional as F
    from kernels import (MAX_WIDE_ROWS, dequantized_copy, int4_words, quantized_cases,
                         quantized_mm, relative_error, scaled_gemv)
    torch.manual_seed(0)
    dtype, K = torch.float16, 1280
    cases = quantized_cases(40, K, "cpu")
    assert [name for name, _, _ in cases] == ["int8", "fp8", "int4 g32", "int4 g128"]
    x = torch.randn(MAX_WIDE_ROWS + 1, K, dtype=dtype)  # more rows than any small matmul takes
    for name, weights, _ in cases:
        if name.startswith("int4"):  # as a layer holds them for the kernels (use_triton)
            packed, scales, zeros, groupsize = weights
            weights = (int4_words(packed), scales.to(dtype), zeros.to(dtype), groupsize)
            decoded = [quantized_mm(rows, *weights) for rows in (x[:1], x[-1:], x[1:4])]
        else:
            w, scales = weights
            decoded = [scaled_gemv(x[:1], w, scales), scaled_gemv(x[-1:], w, scales),
                       quantized_mm(x[1:4], w, scales)]
            weights = (w, scales, None, 1)
        prefill = F.linear(x, dequantized_copy(*weights, dtype))  # (rows, N)
        error = relative_error(torch.cat(decoded), prefill[[0, -1, 1, 2, 3]])
        assert error <= torch.finfo(dtype).eps, (name, error)


def one_byte_experts(E: int, N: int, K: int) -> list:
    """(weight, scales) of int8 (-128 too: every byte pattern) and fp8 experts (E, N, K)."""
    fp8 = (torch.randn(E, N, K) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    return [(torch.randint(-128, 128, (E, N, K), dtype=torch.int8), torch.rand(E, N) / 127),
            (fp8, torch.rand(E, N) / 448)]


# The GEMV indexed by expert, each of kernels.EXPERT_TILES on two kinds of weights: float weights
# (PER_WORD 1; the interpreter has bf16 loads), int8 and fp8 words with scales, x a row per token or
# per pair, K whole or split; then through the op (kernels.expert_matmul) on the tiles it takes.
def check_expert_gemv():
    from kernels import (EXPERT_TILES, expert_matmul, expert_matmul_reference, gemv_input,
                         relative_error, scaled_gemv_kernel, words_per_split)
    from model import swiglu
    tiles = list(EXPERT_TILES.values())

    def launch(x, weight, scales, experts, y, split_k, tile, swiglu_out=False):
        """scaled_gemv_kernel into y (split_k, pairs, outputs), launched as
        kernels.expert_gemv_partials launches it."""
        K, P, n_out = x.shape[-1], experts.numel(), y.shape[-1]
        per_word = 4 if scales is not None else 1
        x_read, x16 = gemv_input(x, per_word)
        grid = (triton.cdiv(n_out, tile["BLOCK_N"]), split_k, P)
        scaled_gemv_kernel[grid](x_read, weight.view(torch.int32) if per_word == 4 else weight,
                                 scales, experts, y, n_out, K // per_word,
                                 words_per_split(K, split_k) * 4 // per_word, P * K // x.numel(),
                                 PER_WORD=per_word, FP8=weight.dtype == torch.float8_e4m3fn,
                                 X16=x16, SWIGLU=swiglu_out, **tile)

    torch.manual_seed(0)
    # whole tiles (some tiles); ragged ones; a K whose split in 3 leaves no part empty (parts are
    # whole blocks of 1024 weights: SPLIT_ALIGN_WORDS words of one-byte weights)
    for E, N, K in ((4, 32, 512), (5, 37, 300), (3, 20, 2100)):
        kinds = [(torch.randn(E, N, K, dtype=dtype), None) for dtype in (torch.bfloat16, torch.float16)]
        kinds += one_byte_experts(E, N, K)
        experts = torch.tensor([[3, 1], [1, 1]]) % E  # 2 tokens, top-2, one expert twice
        for c in range(2 * len(kinds)):
            # each kind on two tiles, once with each input and each split
            (weight, scales), tile = kinds[c % 4], tiles[(c + c // 4) % 4]
            # rows 1: w13's input, 2: w2's; split 3: K over 3 programs, each column counted once
            rows, split_k = 1 + (c + c // 4) % 2, 1 + 2 * (c // 4)
            x = torch.randn(2, rows, K, dtype=X_DTYPES[c % 3])
            reference = expert_matmul_reference(x, experts, weight, scales)  # (2, 2, N)
            y = torch.full((split_k, 4, N), float("nan"))  # poisoned: every element must be written
            launch(x, weight, scales, experts, y, split_k, tile)
            error = relative_error(y.sum(0).view(2, 2, N), reference)
            assert error < 1e-6, (weight.dtype, x.dtype, N, K, rows, tile, split_k, error)
    # SWIGLU: each expert's rows are gate then up; SiLU(gate) * up stored in x's dtype. Against the
    # same tile's float32 sums (SWIGLU off, the same order of adds) through model.swiglu: within
    # one unit in the last place of a 16-bit output (the interpreter truncates where a GPU rounds)
    for E, N, K in ((4, 64, 512), (5, 74, 300)):  # 32 and 37 outputs a pair
        kinds = [(torch.randn(E, N, K, dtype=torch.bfloat16), None), *one_byte_experts(E, N, K)]
        experts = torch.tensor([[3, 1], [1, 1]]) % E
        for c, tile in enumerate((EXPERT_TILES[1, True], EXPERT_TILES[4, True]) * 3):
            (weight, scales), dtype = kinds[c % 3], X_DTYPES[c // 2]
            x = torch.randn(2, 1, K, dtype=dtype)  # a token for both its experts
            sums = torch.full((1, 4, N), float("nan"))
            launch(x, weight, scales, experts, sums, 1, tile)
            y = torch.full((1, 4, N // 2), float("nan"), dtype=dtype)
            launch(x, weight, scales, experts, y, 1, tile, swiglu_out=True)
            sums, y = sums[0], y[0]
            reference = expert_matmul_reference(x, experts, weight, scales, swiglu_out=True)
            if dtype == torch.float32:
                assert relative_error(y.view(2, 2, -1), reference) < 1e-6, (weight.dtype, N, K, tile)
                continue
            unfused = swiglu(sums).to(dtype)  # (4, N / 2)
            ulp = torch.finfo(dtype).eps * torch.exp2(torch.log2(unfused.float().abs()).floor())
            assert ((y.float() - unfused.float()).abs() <= ulp).all(), (weight.dtype, dtype, N, K, tile)
    # The op itself, on the tile it takes for each kind and layer: w13's shape and input (SwiGLU, a
    # bf16 output), w2's (float32 sums)
    for N, swiglu_out, rows, bound in ((74, True, 1, 1e-2), (37, False, 2, 1e-6)):
        for weight, scales in ((torch.randn(5, N, 300, dtype=torch.bfloat16), None),
                               *one_byte_experts(5, N, 300)):
            x = torch.randn(2, rows, 300, dtype=torch.bfloat16)
            y = expert_matmul(x, experts, weight, scales, swiglu_out=swiglu_out)
            reference = expert_matmul_reference(x, experts, weight, scales, swiglu_out=swiglu_out)
            assert y.shape == (2, 2, 37), y.shape
            assert relative_error(y, reference) < bound, (weight.dtype, swiglu_out)


# The grouped expert kernel, as kernels.grouped_expert_mm launches it and with smaller blocks, on
# pairs sorted by expert: experts chosen by none (the first, a middle one, the last), one of a
# single row, one of more rows than a block (walked block by block), ragged N and K; plain loads,
# or x and the weights through tensor descriptors (K a multiple of 16), whose blocks read the next
# expert's rows past an expert's own. int8 weights; x in float32 (the interpreter's tl.dot and
# bf16, above). Every output row written (y starts as NaNs), and by its own expert only: the
# experts up to e alone leave the rows after theirs as they were.
def check_grouped_experts():
    from kernels import (GROUPED_TILE, TensorDescriptor, grouped_expert_mm_reference,
                         grouped_mm_kernel, relative_error)
    torch.manual_seed(0)
    checked = {"plain": 0, "TMA": 0}
    # blocks of fewer rows than an expert's, and grouped_expert_mm's own blocks of 64 and 128 rows
    small = (dict(GROUPED_TILE, BLOCK_M=16, BLOCK_K=128), dict(BLOCK_N=16, BLOCK_M=32, BLOCK_K=64))
    wide = (dict(GROUPED_TILE, BLOCK_M=64, BLOCK_K=128), dict(GROUPED_TILE, BLOCK_M=128, BLOCK_K=64))
    for E, N, K, counts, tiles in (
            (4, 64, 256, [3, 0, 17, 1], small), (6, 37, 300, [0, 3, 0, 17, 1, 0], small),
            (6, 37, 256, [0, 3, 0, 17, 1, 0], small), (3, 64, 384, [70, 0, 130], wide)):
        weight = torch.randint(-128, 128, (E, N, K), dtype=torch.int8)
        scales = torch.rand(E, N) / 127
        ends = torch.tensor(counts).cumsum(0).int()  # (E,)
        P = int(ends[-1])
        x = torch.randn(P, K)
        reference = grouped_expert_mm_reference(x, ends, weight, scales)  # (P, N)
        for tile in tiles:
            for tma in (False, True) if K % 16 == 0 else (False,):
                x_arg, w_arg = x, weight
                if tma:
                    x_arg = TensorDescriptor.from_tensor(x, [tile["BLOCK_M"], tile["BLOCK_K"]])
                    w_arg = TensorDescriptor.from_tensor(weight.view(E * N, K),
                                                         [tile["BLOCK_N"], tile["BLOCK_K"]])
                for last in range(E):  # experts 0..last, then all of them
                    y = torch.full((P, N), float("nan"))
                    grid = (last + 1, triton.cdiv(N, tile["BLOCK_N"]))
                    grouped_mm_kernel[grid](x_arg, ends, w_arg, scales, y, N, K, TMA=tma, **tile)
                    assert y[int(ends[last]):].isnan().all(), (E, N, K, tile, tma, last)
                error = relative_error(y, reference)
                assert error < 1e-6, (E, N, K, tile, tma, error)
                checked["TMA" if tma else "plain"] += 1
    assert checked == {"plain": 8, "TMA": 6}, checked


# The router kernel against its reference (kernels.check_router's cases); on rows of ties at the
# edge of the top k, where any of the tied experts is right; then in the layer it serves: an MoE
# feed-forward gives the same output with the kernel as with its PyTorch routing, Mixtral's way
# (top 2 of 8, rescaled) and Qwen3-MoE's without norm_topk_prob (top 4 of 16).
def check_router():
    import kernels
    from model import ModelArgs, MoEFeedForward
    checks = kernels.check_router("cpu", tokens=(1, 5))
    assert len(checks) == 12  # 3 shapes x 2 token counts x rescaled or not
    for check in checks:
        assert check["ok"], check
    torch.manual_seed(0)
    for n_experts, k in ((2, 2), (16, 4), (128, 8)):
        logits = torch.randint(0, 3, (8, n_experts)).to(torch.bfloat16)  # ties everywhere
        weights, experts = kernels.router_top_k(logits, k, False)
        probs = torch.softmax(logits.float(), dim=-1)
        torch.testing.assert_close(weights, probs.topk(k).values)  # largest first
        torch.testing.assert_close(probs.gather(-1, experts), weights)  # the experts hold them
        assert all(len(set(row.tolist())) == k for row in experts), experts  # none twice
    for n_experts, k, normalize in ((8, 2, True), (16, 4, False)):
        args = ModelArgs(dim=64, n_layer=1, n_head=4, vocab_size=32, intermediate_size=48,
                         n_experts=n_experts, n_active_experts=k, norm_topk_prob=normalize)
        ffn = MoEFeedForward(args)
        for experts in (ffn.w13, ffn.w2):
            torch.nn.init.normal_(experts.weight, std=0.1)
        x = torch.randn(3, 2, 64)  # (B, T, dim): 6 tokens
        routed_by_pytorch = ffn(x)
        ffn.router_kernel = kernels.router_top_k
        assert torch.allclose(ffn(x), routed_by_pytorch, rtol=1e-5, atol=1e-6), (n_experts, k)


# Sampling's top-k kernel against torch.topk (kernels.check_top_k's cases, shrunk), then on edges: a
# row of one value, k equal to the row, every value tied, -inf everywhere but a few; on tiles small
# enough that rows take both rounds, a last tile shorter than k included (its slots filled with the
# lowest key, never chosen), float16 too.
def check_top_k():
    import kernels
    checks = kernels.check_top_k("cpu", cases=((3000, 200, 1), (1000, 7, 3)))
    assert len(checks) == 4 and all(check["ok"] for check in checks), checks

    def agrees(logits: torch.Tensor, k: int):
        assert kernels.top_k_agrees(logits, k), (logits.dtype, logits.shape, k)

    torch.manual_seed(0)
    for tile in (64, kernels.TOP_K_TILE):
        kernels.TOP_K_TILE = tile
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            agrees(torch.randn(2, 1).to(dtype), 1)
            agrees(torch.randn(2, 100).to(dtype), 100)
            agrees(torch.zeros(2, 300, dtype=dtype), 20)
            masked = torch.full((2, 300), float("-inf"), dtype=dtype)
            masked[:, [3, 150, 299]] = torch.tensor([1.0, -2.0, 0.5], dtype=dtype)
            agrees(masked, 10)
            agrees(torch.randn(5, 64 * 4 + 9).to(dtype), 30)  # a last tile of 9 values
            agrees(-torch.rand(5, 64 * 4 + 9).to(dtype) - 1, 30)  # its filling below them all
    # (the project's tile last:) Llama-2's vocabulary in 8 tiles, then their 1600 winners in one; a
    # row of one tile takes one round; rows whose tiles would pass TOP_K_MAX_TILE (where a tile's
    # counts no longer fit the kernel's 16 bits) are left to torch.topk
    assert kernels.TOP_K_TILE == 4096 and kernels.TOP_K_MAX_TILE == 16384
    assert kernels.top_k_tiles(32000, 200) == (4096, 2048)
    assert kernels.top_k_tiles(1000, 1000) == (1024, 0)
    assert kernels.top_k_tiles(151936, 1000) == (0, 0) == kernels.top_k_tiles(32000, 5000)
    # and rows of one tile past it (the top k of a whole vocabulary)
    assert kernels.top_k_tiles(16384, 16384) == (16384, 0)
    assert kernels.top_k_tiles(32000, 32000) == (0, 0) == kernels.top_k_tiles(151936, 151936)


# The decode attention kernel in float32 (the interpreter's tl.dot, above) against the model's
# own attention path, with a kv head's query heads padded to 16 rows (Triton before 3.5) and not,
# on the tile of many programs and on that of few (the interpreter counts one SM: always many);
# kernels.check_kernels runs the same comparison in bf16 on the GPU. Then each row of a batch
# against the same row decoded alone, bit for bit.
def check_decode_attention():
    import kernels
    many_programs = kernels.ATTENTION_TILE
    # this Triton's own settings last
    for min_rows, tile in ((16, many_programs),
                           (kernels.DOT_MIN_ROWS, kernels.FEW_PROGRAMS_ATTENTION_TILE),
                           (kernels.DOT_MIN_ROWS, many_programs)):
        kernels.DOT_MIN_ROWS, kernels.ATTENTION_TILE = min_rows, tile
        results = kernels.check_decode_attention("cpu", torch.float32)
        assert len(results) == 12 and all(r["ok"] for r in results), (min_rows, tile, results)
    check_decode_attention_rows_are_independent(kernels.decode_attention_op)
    check_decode_attention_normalises_q_and_k_over_the_heads_own_width()


# q/k norm on heads whose width the kernel pads (8 to tl.dot's 16, 24 to a power of two): the
# RMS over the head's own D values, as model.RMSNorm takes it; the output and the new k and v in
# the caches against the model's own path, a row at the first slot, a middle one and the last.
def check_decode_attention_normalises_q_and_k_over_the_heads_own_width():
    import copy
    import kernels
    from model import Rows, attention_mask
    torch.manual_seed(0)
    S = 24
    pos = torch.tensor([[0], [9], [S - 1]])  # (B, 1)
    for D in (8, 24):
        attention, rope, cache = kernels.random_attention(4, 2, D, S, True, 4, "cpu", torch.float32)
        rows = Rows(pos, rope[pos], attention_mask(pos, S, torch.float32), row=1)
        x = torch.randn(3, 1, 4 * D)
        outputs = []
        for kernel in (None, kernels.decode_attention):
            attention.kv_cache, attention.decode_kernel = copy.deepcopy(cache), kernel
            outputs.append((attention(x, [rows]), attention.kv_cache.k, attention.kv_cache.v))
        for name, reference, y in zip(("output", "k cache", "v cache"), *outputs):
            assert kernels.relative_error(y, reference) < 1e-5, (D, name)


# The chunk attention kernel in float32 against the model's own attention path over the request's
# cache row (kernels.check_chunk_attention); then in the server's steps, prompts prefilled in
# chunks through it while other rows decode.
def check_chunk_attention():
    import kernels
    from test_server import check_prompts_prefilled_inside_decode_steps
    results = kernels.check_chunk_attention("cpu", torch.float32)
    assert len(results) == 5 and all(r["ok"] for r in results), results
    for static_chunks in (False, True):
        check_prompts_prefilled_inside_decode_steps(static_chunks, kernels.chunk_attention_op)


def check_decode_attention_rows_are_independent(attention):
    torch.manual_seed(0)
    B, H, KV, D, S = 4, 6, 2, 16, 600  # three parts of 256 slots
    qkv, norms = torch.randn(B, (H + 2 * KV) * D), torch.randn(2, D)  # q/k norm on
    rope = torch.randn(B, 2, D)
    pos = torch.tensor([0, 255, 256, 599])  # each row in another part, or at its edge
    caches = torch.randn(2, B + 1, KV, S, D)  # rows 1..B used, row 0 another request's
    batch = caches.clone()
    y = attention(qkv, *norms, 1e-6, rope, pos, batch[0], batch[1], 1)  # (B, H * D)
    for b in range(B):
        alone = caches.clone()
        one = slice(b, b + 1)
        y_b = attention(qkv[one], *norms, 1e-6, rope[one], pos[one], alone[0], alone[1], 1 + b)
        assert torch.equal(y_b[0], y[b]), b
        assert torch.equal(alone[:, 1 + b], batch[:, 1 + b]), b


def test_int4_words_put_each_column_pair_of_a_16_row_tile_in_two_words_and_give_the_pairs_back():
    from kernels import int4_pairs, int4_words, unpack_int4
    torch.manual_seed(0)
    packed = torch.randint(0, 256, (21, 288), dtype=torch.uint8)  # K = 576: 4.5 chunks of 128
    words = int4_words(packed)  # 21 rows: 1.3 tiles of 16
    assert words.dtype == torch.int32 and words.shape == (2, 5, 16, 16)
    q = unpack_int4(packed).int()  # (21, 576) the columns in order
    for row in (0, 5, 15, 16, 20):
        for column in (0, 1, 17, 66, 127, 128, 200, 575):
            chunk, j, c = column // 128, column % 128 // 16, column % 16
            # columns 16 j + 2t and 16 j + 2t + 1 side by side: the two halves of word 2t + j // 4
            word = words[row // 16, chunk, row % 16, c - c % 2 + j // 4]
            assert word >> (16 * (c % 2) + 4 * (j % 4)) & 0xF == q[row, column], (row, column)
    # a tile's chunk is one run of 16 x 16 words, its chunks one after the other
    assert words.flatten()[256 + 3] == words[0, 1, 0, 3]
    # padding is zeros: the last chunk's columns 64 to 127 (the odd words), the rows past 21
    assert torch.equal(words[:, 4, :, 1::2], torch.zeros(2, 16, 8, dtype=torch.int32))
    assert torch.equal(words[1, :, 5:], torch.zeros(5, 11, 16, dtype=torch.int32))
    assert torch.equal(int4_pairs(words, 21, 576), packed)


# Each state prepare_for_device leaves an int4 layer in: the Triton layout in place of the file's
# nibble pairs (a GPU's float16 model), a kernel's packed copy beside them (the CPU), then the
# Triton layout too (a GPU's bfloat16 model: tinygemm and the Triton kernels), or the packed copy
# alone (a GPU without Triton). The CPU op stands in for tinygemm, whose layout differs.
INT4_PREPARED_STATES = {
    "triton": lambda layer: layer.use_triton(),
    "kernel-beside-the-file-layout": lambda layer: layer.use_kernel("cpu", torch.bfloat16, 128),
    "kernel-and-triton": lambda layer: (layer.use_kernel("cpu", torch.bfloat16, 1),
                                        layer.use_triton()),
    "kernel-alone": lambda layer: layer.use_kernel("cpu"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("state", INT4_PREPARED_STATES)
def test_int4_layer_dequantizes_to_the_same_weights_in_every_prepared_state(state, dtype):
    """dequantize(), the kernels' reference, gives the file's weights bit for bit whichever copy
    of them the layer keeps: K of 300 padded to 320 (10 groups), N of 7 padded to 16 for the op."""
    from kernels import Int4Linear, scale_zero_pairs
    layer = Int4Linear(300, 7, False, groupsize=32, padded_in_features=320)
    layer.weight.random_(0, 256)
    layer.scales.uniform_(0.01, 0.1)
    layer.zeros.uniform_(-0.1, 0.1)
    before = layer.dequantize()
    layer.to(dtype)
    INT4_PREPARED_STATES[state](layer)
    if state != "kernel-beside-the-file-layout":  # the file's nibble pairs gave way
        assert not hasattr(layer, "weight")
    if "triton" in state:
        assert layer.words.shape == (1, 3, 16, 16)  # 7 rows in a tile of 16, K in 3 chunks
        # a group's scale and zero side by side, as the kernels read them: no copy a call
        scales, zeros = layer.scale_zero.unbind(-1)  # (7, 10) each
        assert all(t is given for t, given in zip(scale_zero_pairs(scales, zeros), (scales, zeros)))
        # and no parameter a view that starts past a 16-byte boundary: torch.compile copies such
        # a GPU input on every call (two parameters, the zeros' view 2 bytes in, did so)
        assert all(t.data_ptr() % 16 == 0 for t in layer.parameters())
    assert torch.equal(layer.dequantize(), before)


def test_int4_layers_laid_out_for_the_kernels_compile_to_their_eager_result():
    """use_triton leaves a layer's scales and zeros side by side in one tensor, which the forward
    splits into two views: torch.compile takes them so, and gives what the eager layers give
    (here the path off the GPU, a matmul by the dequantized weights), which the file's layout gave
    before, within bfloat16's rounding (inductor may fuse the dequantization's multiply and add)."""
    from kernels import Int4Linear, relative_error
    torch.manual_seed(0)
    layers = torch.nn.Sequential(*[Int4Linear(256, 256, False, groupsize=32) for _ in range(2)])
    for layer in layers:
        layer.weight.random_(0, 256)
        layer.scales.uniform_(0.01, 0.1)
        layer.zeros.uniform_(-0.1, 0.1)
    layers.to(torch.bfloat16)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    before = layers(x)
    for layer in layers:
        layer.use_triton()
    assert torch.equal(layers(x), before)
    assert relative_error(torch.compile(layers)(x), before) < 1e-2


def covers_k_in_whole_tiles(split: tuple, n_columns: int, align: int) -> bool:
    """(parts, columns a part) covers K once in parts of whole `align` columns, none of them empty."""
    parts, size = split
    return parts >= 1 and size % align == 0 and (parts - 1) * size < n_columns <= parts * size


def test_gemv_splits_long_rows_of_one_byte_weights_and_keeps_float_weights_whole():
    """The one-row GEMV's parts of K (the comment above SPLIT_MAX_ROWS): a one-byte layer of few
    rows and a long K (a down projection) in parts of at most SPLIT_COLUMNS, but never more than
    MAX_SPLIT parts; K up to SPLIT_COLUMNS, more than SPLIT_MAX_ROWS rows, and float weights of any
    shape whole; SwiGLU in w13's GEMV only where its sums are whole."""
    from kernels import (MAX_SPLIT, SPLIT_COLUMNS, SPLIT_MAX_ROWS, gemv_split_k,
                         gemv_takes_swiglu)
    for n, k in ((4096, 11008), (4096, 14336), (5120, 13824), (8192, 28672), (64, 100000)):
        for dtype in (torch.int8, torch.float8_e4m3fn):
            parts = gemv_split_k(torch.empty(n, k, dtype=dtype, device="meta"))
            assert 1 < parts <= MAX_SPLIT, (n, k, parts)
            assert -(-k // parts) <= SPLIT_COLUMNS or parts == MAX_SPLIT, (n, k, parts)
        for dtype in (torch.bfloat16, torch.float16):
            assert gemv_split_k(torch.empty(n, k, dtype=dtype, device="meta")) == 1, (n, k)
    for n, k in ((4096, 4096), (4096, SPLIT_COLUMNS), (SPLIT_MAX_ROWS + 1, 11008), (22016, 4096)):
        assert gemv_split_k(torch.empty(n, k, dtype=torch.int8, device="meta")) == 1, (n, k)
    assert gemv_takes_swiglu(torch.empty(22016, 4096, dtype=torch.int8, device="meta"))
    assert gemv_takes_swiglu(torch.empty(2 * 4096, 11008, dtype=torch.bfloat16, device="meta"))
    assert not gemv_takes_swiglu(torch.empty(2 * 4096, 11008, dtype=torch.int8, device="meta"))


def test_gemv_parts_of_k_cover_every_word_of_a_long_row_once():
    """The one-row GEMV's split of a one-byte layer's long K (gemv_split_k, words_per_split): parts
    of whole SPLIT_ALIGN_WORDS words, none empty, that reach K's last word, K a whole number of
    aligned parts and not (four columns past one, a word short of one)."""
    from kernels import SPLIT_ALIGN_WORDS, gemv_split_k, words_per_split
    align = 4 * SPLIT_ALIGN_WORDS
    for k in (8196, 11008, 3 * 8192 + 4, 4 * 8192 - 4, 14336, 28672, 7 * 8192 + 2 * align + 4):
        parts = gemv_split_k(torch.empty(4096, k, dtype=torch.int8, device="meta"))
        assert parts > 1, k
        split = (parts, 4 * words_per_split(k, parts))
        assert covers_k_in_whole_tiles(split, k, align), (k, split)


def test_small_matmul_splits_k_until_the_grid_fills_the_gpu_and_wide_layers_stay_whole():
    """kernels.py's promises for the split of K (the comments above MAX_MM_ROWS and WIDE_MAX_SPLIT),
    over layer shapes, row counts and GPUs of 1 to 132 SMs: K covered once in parts of whole tiles;
    below MM_FILL_ROWS rows (mm_split) in at most MAX_SPLIT parts of at least MM_SPLIT_COLUMNS
    columns, as many as fit, but int4's single row of a layer of more than SPLIT_MAX_ROWS rows in
    parts of INT4_WIDE_COLUMNS (half as many where K holds them whole); from there, int4 (in whole
    chunks of 128 columns) and one-byte weights alike, about MM_PROGRAMS_PER_SM programs an SM (one
    block of rows) or, one-byte weights past MAX_MM_ROWS, 2 (blocks of WIDE_MM_TILE's rows, at most
    WIDE_MAX_SPLIT parts): never more than that, at least one an SM unless the split is near its
    most parts; and a wider layer, or more rows, takes no more parts."""
    from kernels import (INT4_MM_TILE, INT4_WIDE_COLUMNS, MAX_MM_ROWS, MAX_SPLIT, MM_FILL_ROWS,
                         MM_PROGRAMS_PER_SM, MM_SPLIT_ALIGN, MM_SPLIT_COLUMNS, MM_TILE,
                         SPLIT_MAX_ROWS, WIDE_MAX_SPLIT, WIDE_MM_TILE, int4_split, mm_split,
                         one_byte_split)
    ks = (300, 768, 1000, 2048, 4096, 8448, 11008, 14336)
    for k in ks:
        parts, size = mm_split(k)
        assert covers_k_in_whole_tiles((parts, size), k, MM_SPLIT_ALIGN), k
        assert parts <= MAX_SPLIT and (parts == 1 or size >= MM_SPLIT_COLUMNS), k
        assert parts > 1 or k < 2 * MM_SPLIT_COLUMNS, k  # split wherever two parts fit
        for rows, n in ((1, SPLIT_MAX_ROWS), (2, 22016), (8, 22016)):
            assert int4_split(rows, n, k, 132) == (parts, size), (rows, n, k)
        wide = int4_split(1, SPLIT_MAX_ROWS + 1, k, 132)
        assert covers_k_in_whole_tiles(wide, k, MM_SPLIT_ALIGN) and wide[0] <= MAX_SPLIT, k
        assert wide[0] == 1 or wide[1] >= INT4_WIDE_COLUMNS, (k, wide)
        assert wide[0] > 1 or k < 2 * INT4_WIDE_COLUMNS, (k, wide)
        assert wide[0] == (parts + 1) // 2 or parts == MAX_SPLIT, (k, parts, wide)
    widths = (64, 100, 1024, 4096, 11008, 12288, 14336, 22016, 28672)
    for sms in (1, 8, 78, 132):
        for k in ks:
            for rows in (2, 8, MM_FILL_ROWS - 1):  # fewer rows keep mm_split's parts
                assert all(one_byte_split(rows, n, k, sms) == int4_split(rows, n, k, sms)
                           == mm_split(k) for n in widths)
            for rows in (MM_FILL_ROWS, 48, MAX_MM_ROWS, MAX_MM_ROWS + 1, 128, 129, 256):
                one_block = rows <= MAX_MM_ROWS
                align, most, per_sm = ((MM_SPLIT_ALIGN, MAX_SPLIT, MM_PROGRAMS_PER_SM) if one_block
                                       else (WIDE_MM_TILE["BLOCK_K"], WIDE_MAX_SPLIT, 2))
                kinds = [(one_byte_split, MM_TILE["BLOCK_N"], align)]
                kinds += [(int4_split, INT4_MM_TILE["BLOCK_N"], 128)] if one_block else []
                for split_of, block_n, align in kinds:
                    splits = [split_of(rows, n, k, sms) for n in widths]
                    for n, split in zip(widths, splits):
                        case = (split_of.__name__, rows, n, k, sms, split)
                        tiles = (-(-n // block_n) if one_block else
                                 -(-rows // WIDE_MM_TILE["BLOCK_M"])
                                 * -(-n // WIDE_MM_TILE["BLOCK_N"]))
                        programs = tiles * split[0]
                        assert covers_k_in_whole_tiles(split, k, align) and split[0] <= most, case
                        assert programs <= max(tiles, per_sm * sms), case  # a wide layer: whole
                        assert programs >= sms or 2 * split[0] > min(most, k // align), case
                    parts = [p for p, _ in splits]
                    # a wider layer takes no more parts
                    assert parts == sorted(parts, reverse=True), (rows, k, sms, splits)
            wide = [one_byte_split(rows, 4096, k, sms)[0] for rows in (65, 128, 129, 256)]
            assert wide == sorted(wide, reverse=True), (k, sms, wide)  # more blocks: fewer parts
    # Llama-2-7B's layers at 32 rows on an H200's 132 SMs: the narrow ones split, the widest whole.
    for split_of in (one_byte_split, int4_split):
        llama = [split_of(32, n, k, 132)[0] for n, k in ((4096, 4096), (4096, 11008),
                                                          (12288, 4096), (22016, 4096))]
        assert min(llama[:2]) > 1 and llama[-1] == 1, (split_of.__name__, llama)


def test_gemv_input_gives_aligned_words_of_any_one_row_view():
    from kernels import gemv_input
    for dtype in (torch.bfloat16, torch.float16):
        for start in (0, 1):  # 1: the row starts inside a word of its buffer
            x = torch.randn(1, 1, 321, dtype=dtype)[..., start:start + 320]  # row stride 321
            words, _ = gemv_input(x, 4)
            assert words.dtype == torch.int64 and words.data_ptr() % 8 == 0
            assert torch.equal(words.view(dtype), x.reshape(-1))


def test_float_linears_become_gemv_layers_over_the_same_parameters():
    """use_float_gemv (prepare_for_device, for bf16 and fp16 models on CUDA) puts a
    FloatLinear in place of each nn.Linear: the same Parameter objects (a tied output layer stays
    tied, the state_dict's keys are the file's), and off a GPU the same outputs."""
    import torch.nn as nn
    from kernels import FloatLinear, use_float_gemv
    from test_generate import tiny_model
    model = tiny_model(tie_embeddings=True, attention_bias=True)
    before = dict(model.named_parameters())
    idx = torch.randint(0, 97, (2, 9))
    model.setup_caches(2, 16)
    with torch.no_grad():
        expected = model(idx, torch.arange(9))
        use_float_gemv(model)
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        assert len(linears) == 9 and all(type(m) is FloatLinear for m in linears)
        assert model.output.weight is model.tok_embeddings.weight
        after = dict(model.named_parameters())
        assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
        assert torch.equal(model(idx, torch.arange(9)), expected)


def test_float_linear_takes_the_gemv_for_one_row_in_its_own_dtype_and_a_row_major_weight(
        monkeypatch):
    """FloatLinear's routing, with the GPU's route and GEMV stood in for (a CPU has neither): the
    GEMV for one row of the weight's dtype (bf16, fp16) against a row-major weight while
    kernels.FLOAT_GEMV is on, its output plus the bias; PyTorch's matmul for more rows, float32, a
    transposed weight or the flag off."""
    import torch.nn.functional as F
    import kernels
    calls = []
    monkeypatch.setattr(kernels, "kernel_route", lambda x, *_: "gemv" if x.numel() == x.shape[-1]
                        else None)

    def gemv(x, w, scales):  # a result no matmul of these inputs gives
        calls.append((w, scales))
        return torch.full((*x.shape[:-1], w.shape[0]), 7.0, dtype=x.dtype)
    monkeypatch.setattr(kernels, "scaled_gemv", gemv)

    def took_gemv(dtype=torch.bfloat16, rows=1, transposed=False, flag=True) -> bool:
        monkeypatch.setattr(kernels, "FLOAT_GEMV", flag)
        layer = kernels.FloatLinear(16, 8, bias=True).to(dtype)
        if transposed:
            layer.weight = torch.nn.Parameter(layer.weight.detach().t().contiguous().t())
        calls.clear()
        x = torch.randn(rows, 16, dtype=dtype)
        with torch.no_grad():
            y = layer(x)
            if not calls:  # PyTorch's matmul, as nn.Linear computes it
                assert torch.equal(y, F.linear(x, layer.weight, layer.bias))
                return False
            # the layer's own weight, no scales; the GEMV's output with the bias added once
            assert len(calls) == 1 and calls[0][0] is layer.weight and calls[0][1] is None
            assert torch.equal(y, torch.full((rows, 8), 7.0, dtype=dtype) + layer.bias)
            return True
    assert took_gemv() and took_gemv(torch.float16)
    assert not took_gemv(rows=2)
    assert not took_gemv(torch.float32)
    assert not took_gemv(transposed=True)
    assert not took_gemv(flag=False)


INTERPRETER_CHECKS = {"scaled_gemv": check_scaled_gemv, "quantized_mm": check_quantized_mm,
                      "int4_mm": check_int4_mm, "dequantize": check_dequantize,
                      "prefill_decode": check_prefill_matches_decode,
                      "expert_gemv": check_expert_gemv, "grouped_experts": check_grouped_experts,
                      "router": check_router, "top_k": check_top_k,
                      "decode_attention": check_decode_attention,
                      "chunk_attention": check_chunk_attention}


def passed(interpreter_jobs, name: str):
    r = interpreter_jobs[name].wait()
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


@pytest.mark.slow
@in_the_interpreter
def test_scaled_gemv_kernel_matches_reference_for_every_config(interpreter_jobs):
    passed(interpreter_jobs, "scaled_gemv")


@pytest.mark.slow
@in_the_interpreter
def test_quantized_mm_kernel_matches_reference_for_decode_batches_of_int8(interpreter_jobs):
    passed(interpreter_jobs, "quantized_mm")


@pytest.mark.slow
@in_the_interpreter
def test_int4_mm_kernel_matches_reference_for_every_group_size(interpreter_jobs):
    passed(interpreter_jobs, "int4_mm")


@pytest.mark.slow
@in_the_interpreter
def test_dequantized_weights_equal_the_reference_dequantization(interpreter_jobs):
    passed(interpreter_jobs, "dequantize")


@pytest.mark.slow
@in_the_interpreter
def test_quantized_prefill_rows_equal_their_decode_within_activation_rounding(interpreter_jobs):
    passed(interpreter_jobs, "prefill_decode")


@pytest.mark.slow
@in_the_interpreter
def test_expert_gemv_kernel_matches_reference_for_each_weight_kind(interpreter_jobs):
    passed(interpreter_jobs, "expert_gemv")


@pytest.mark.slow
@in_the_interpreter
def test_grouped_expert_kernel_matches_reference_with_empty_and_many_row_experts(interpreter_jobs):
    passed(interpreter_jobs, "grouped_experts")


@pytest.mark.slow
@in_the_interpreter
def test_router_kernel_chooses_the_experts_and_weights_of_the_pytorch_routing(interpreter_jobs):
    passed(interpreter_jobs, "router")


@pytest.mark.slow
@in_the_interpreter
def test_top_k_kernel_gives_torch_topks_values_and_their_ids(interpreter_jobs):
    passed(interpreter_jobs, "top_k")


@pytest.mark.slow
@in_the_interpreter
def test_decode_attention_kernel_equals_the_models_attention_and_each_row_its_alone_result(
        interpreter_jobs):
    passed(interpreter_jobs, "decode_attention")


@pytest.mark.slow
@in_the_interpreter
def test_chunk_attention_kernel_equals_the_models_attention_and_prompts_their_alone_tokens(
        interpreter_jobs):
    passed(interpreter_jobs, "chunk_attention")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # kernels.py's folder
    assert sys.argv[1] in INTERPRETER_CHECKS, sys.argv[1]
    INTERPRETER_CHECKS[sys.argv[1]]()
    print("ok")
