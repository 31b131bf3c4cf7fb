"""scripts/bench.py's code paths on the CPU: every precision builds, quantizes in memory, decodes and
prefills; rows get their bandwidth columns; results merge into one table and plot; bad input is one line.
Speed is measured on GPUs only, into BENCHMARKS.md: nothing here asserts a speed. Decoding here is eager
(compiling stories15M on 2 CPU cores would take minutes and prove nothing new), and the copy bandwidth,
which only CUDA events measure, is a stand-in value."""
import json
import os
import subprocess
import sys

import pytest
import torch

import generate
from model import Transformer
from conftest import ROOT, assert_one_error_line, load_script, run_script

# stories15M in bf16 from its shape (dim 288, 6 layers, feed-forward 768, vocabulary 32000): per layer
# q, k, v, o (4 x 288 x 288), w1, w2, w3 (3 x 288 x 768) and two norms; the last norm and the output
# layer; its untied embedding table not counted (a step reads only the looked-up rows)
STORIES_BF16_BYTES = 2 * (6 * (4 * 288 * 288 + 3 * 288 * 768 + 2 * 288) + 288 + 32000 * 288)


def cpu_bench(monkeypatch, copy_gb_s: float = 50.0):
    bench = load_script("bench")
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(generate, "compile_functions", lambda *_: (generate.prefill, generate.decode_one_token))
    monkeypatch.setattr(bench, "copy_bandwidth_gb_s", lambda: copy_gb_s)
    return bench


@pytest.fixture
def bench(monkeypatch):
    return cpu_bench(monkeypatch)


def run_main(bench, argv, capsys) -> tuple[int, str, str]:
    """bench.main in this process: (exit code, stdout, stderr), as the interpreter would end it:
    sys.exit("message") prints the message to stderr and exits with status 1."""
    try:
        bench.main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
        if isinstance(code, str):
            print(code, file=sys.stderr)
            code = 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("precision", ["bf16", "int8", "int4.g32", "int4.g128", "fp8"])
def test_bench_cell_runs_every_precision(precision, bench):
    cell = bench.Cell("stories15M", precision, batch_size=2, new_tokens=8)
    row = bench.bench_cell(bench.build(cell.model, precision), cell, samples=2, prefill_tokens=16)
    assert row["precision"] == precision and row["tok_s"] > 0 and row["gb_s"] > 0 and len(row["tok_s_samples"]) == 2
    assert row["prefill_tokens"] == 16 and row["prefill_tok_s"] > 0 and row["compile_s"] > 0
    weights = row["weights_gb"] * 1e9
    assert weights == STORIES_BF16_BYTES if precision == "bf16" else weights < STORIES_BF16_BYTES


def test_kv_bytes_are_the_filled_cache_averaged_over_the_generation(bench):
    model = bench.build("stories15M", "bf16")
    args = model.args
    per_position_per_row = 2 * args.n_layer * args.n_kv_heads * args.head_dim * 2  # keys and values, bf16
    prompt, new, batch = 5, 9, 2
    # Decode step i writes slot prompt + i and attends over slots 0 .. prompt + i; the prefill made token 1.
    positions = [prompt + i + 1 for i in range(new - 1)]
    expected = per_position_per_row * batch * sum(positions) / len(positions)
    assert bench.kv_bytes_per_step(model, batch, prompt, new) == pytest.approx(expected)


def test_decode_prompt_length_sets_the_prompt_decoded_and_the_cache_read(bench, tmp_path, capsys, monkeypatch):
    decoded, caches = [], []
    generate_ = generate.generate

    def generate_recorded(model, prompts, *args):
        decoded.append([len(p) for p in prompts])
        return generate_(model, prompts, *args)

    monkeypatch.setattr(generate, "generate", generate_recorded)
    setup = Transformer.setup_caches
    monkeypatch.setattr(Transformer, "setup_caches",
                        lambda self, batch, length: caches.append((batch, length)) or setup(self, batch, length))
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    code, _, err = run_main(bench, ["--cells", "stories15M:bf16:2:6", "--prompt_tokens", "40", "--samples", "1",
                                    "--prefill_tokens", "0", "--out", out, "--markdown", md], capsys)
    assert code == 0, err
    assert decoded and all(lengths == [40, 40] for lengths in decoded)  # every run, every row
    assert caches and all(c == (2, 40 + 6) for c in caches)
    row = json.loads(out.read_text())["rows"][0]
    kv_bytes = bench.kv_bytes_per_step(bench.build("stories15M", "bf16"), 2, 40, 6)
    assert row["prompt_tokens"] == 40 and row["kv_gb"] * 1e9 == pytest.approx(kv_bytes)
    assert "| stories15M | bf16 | 2 | 40 | 6 |" in md.read_text()


def test_prefill_prompt_is_capped_to_the_context(bench):
    cell = bench.Cell("stories15M", "bf16", 1, 4)
    row = bench.bench_cell(bench.build(cell.model, "bf16"), cell, samples=1, prefill_tokens=2048)
    assert row["prefill_tokens"] == bench.ModelArgs(**bench.CONFIGS["stories15M"]).block_size - 1


def test_benchmark_writes_a_row_per_cell_with_bandwidth_columns(bench, tmp_path, capsys, monkeypatch):
    built = []
    build = bench.build
    monkeypatch.setattr(bench, "build", lambda name, precision: built.append((name, precision)) or build(name, precision))
    cells = ["stories15M:bf16:1:6", "stories15M:bf16:2:4", "stories15M:int8:2:6", "stories15M:bf16:1:3"]
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    code, stdout, err = run_main(bench, ["--cells", *cells, "--samples", "1", "--prefill_tokens", "8", "--out", out, "--markdown", md], capsys)
    assert code == 0, err
    assert built == [("stories15M", "bf16"), ("stories15M", "int8"), ("stories15M", "bf16")]  # consecutive cells share one
    result = json.loads(out.read_text())
    assert result["card"] == "cpu" and result["torch"] == torch.__version__ and result["copy_gb_s"] == 50.0
    assert [bench.Cell(r["model"], r["precision"], r["batch_size"], r["new_tokens"]).spec for r in result["rows"]] == cells
    for r in result["rows"]:
        assert r["copy_gb_s"] == 50.0 and r["mbu"] == pytest.approx(r["gb_s"] / 50.0)
        assert r["limit_tok_s"] == pytest.approx(50.0 / (r["weights_gb"] + r["kv_gb"]) * r["batch_size"])
        assert r["second_compile_s"] is None and r["prefill_tokens"] == 8
    table = md.read_text()
    assert table in stdout
    assert sum(line.startswith("| stories15M |") for line in table.splitlines()) == len(cells)
    assert "copy bandwidth 50 GB/s" in table and "8 tokens (eager)" in table


def test_second_compile_reruns_the_first_cell_in_a_fresh_process_sharing_the_caches(bench, tmp_path, capsys, monkeypatch):
    children = []

    def run_child_here(command, **_):
        """The child process's own code path, run in this process (eager, on the CPU)."""
        assert command[:2] == [sys.executable, bench.__file__]
        argv = command[2:]
        children.append(dict(cells=argv[argv.index("--cells") + 1], cache=argv[argv.index("--cache_dir") + 1],
                             parent_cache=bench.os.environ["TORCHINDUCTOR_CACHE_DIR"]))
        bench.main(argv)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(bench.subprocess, "run", run_child_here)
    out = tmp_path / "r.json"
    code, _, err = run_main(bench, ["--cells", "stories15M:int8:1:4", "stories15M:bf16:1:4", "--second_compile",
                                 "--samples", "1", "--prefill_tokens", "0", "--out", out], capsys)
    assert code == 0, err
    rows = json.loads(out.read_text())["rows"]
    assert [c["cells"] for c in children] == ["stories15M:int8:1:4"]  # the first cell only
    assert children[0]["cache"] == children[0]["parent_cache"]
    assert rows[0]["second_compile_s"] > 0 and rows[1]["second_compile_s"] is None
    assert not bench.Path(children[0]["cache"]).exists()  # the fresh cache folder is gone afterwards


def test_failed_second_compile_is_a_warning_not_a_failed_benchmark(bench, capsys, monkeypatch):
    monkeypatch.setattr(bench.subprocess, "run", lambda command, **_: subprocess.CompletedProcess(command, 1, "", "error: out of memory\n"))
    assert bench.second_compile_s(bench.Cell("stories15M", "bf16"), "/nonexistent") is None
    assert "warning: the second-compile run of stories15M:bf16:1:200 failed: error: out of memory" in capsys.readouterr().err


def test_failed_kernel_check_stops_before_measuring_and_is_recorded(bench, tmp_path, capsys, monkeypatch):
    checks = [dict(name="int8", shape=[4096, 4096], rows=1, rel_err=1e-3, ok=True),
              dict(name="int4.g128", shape=[11008, 4096], rows=1, rel_err=0.9, ok=False)]
    monkeypatch.setattr(bench, "kernel_checks", lambda: checks)
    monkeypatch.setattr(bench, "build", lambda *_: pytest.fail("built a model after a failed kernel check"))
    out = tmp_path / "r.json"
    # a kernel that disagrees with its reference is a bug, which keeps its traceback
    with pytest.raises(RuntimeError, match=r"kernel check failed \(1 of 2\).*name=int4.g128 shape=\[11008, 4096\] rows=1 "
                                           "rel_err=0.9"):
        run_main(bench, ["--cells", "stories15M:bf16", "--out", out], capsys)
    result = json.loads(out.read_text())
    assert result["kernel_checks"] == checks and result["rows"] == []


def test_merging_keeps_every_kernel_check_case_apart(bench, monkeypatch):
    """kernels.check_expert_kernel describes each case apart (weights, shape, x's rows, tokens, experts a token):
    merging two GPUs' checks keeps every case, and a case that failed on one GPU fails alone."""
    import kernels
    shapes = ((5, 37, 300), (3, 16, 64))

    def checks(broken: bool) -> list:
        """The expert GEMV's cases on the CPU, its float64 reference standing in for the Triton kernel; broken: 1 %
        off in one case (int8 weights, 4 tokens of 2 experts, a hidden row per pair, shape (3, 16, 64))."""
        def expert_matmul(x, experts, weight, scales, swiglu_out):
            y = kernels.expert_matmul_reference(x, experts, weight, scales, swiglu_out).float()
            off = broken and weight.dtype == torch.int8 and weight.shape[0] == 3 and x.shape[:2] == (4, 2)
            return y * 1.01 if off else y
        monkeypatch.setattr(kernels, "expert_matmul", expert_matmul)
        return kernels.check_expert_kernel("cpu", shapes=shapes)

    good, bad = checks(broken=False), checks(broken=True)
    # shapes, (tokens, k), dtypes, x; and SwiGLU's cases where N is even
    assert len(good) == len(bad) == 2 * 3 * 3 * 2 + 3 * 3 and all(c["ok"] for c in good)
    failed = [c for c in bad if not c["ok"]]
    assert [(c["name"], c["shape"], c["tokens"], c["rows"]) for c in failed] == [("experts int8", [3, 16, 64], 4, 8)]
    assert bench.merge_checks(good) == good  # one GPU's checks: no case taken for another

    def case(check: dict) -> dict:
        return {key: value for key, value in check.items() if key not in ("ok", "rel_err")}
    merged = bench.merge_checks(good + bad)  # the same cases from two GPUs
    assert [case(c) for c in merged] == [case(c) for c in good]
    assert [c for c in merged if not c["ok"]] == failed  # with the failing GPU's (larger) error
    # a case whose errors another version of the checks names otherwise: each error kept, the largest
    other = [{**case(c), "max_abs_err": 1.0, "ok": c["ok"]} for c in good]  # no rel_err
    merged = bench.merge_checks(other + good)
    assert len(merged) == len(good)
    assert all(c["max_abs_err"] == 1.0 and "rel_err" in c for c in merged)


def test_kernel_checks_are_plain_json_values(bench):
    check = bench.plain_check(dict(name="fp8", shape=torch.Size([32, 64]), rows=5, max_abs_err=torch.tensor(0.5),
                                   rel_err=torch.tensor(0.25, dtype=torch.float64), ok=torch.tensor(True)))
    assert json.loads(json.dumps(check)) == dict(name="fp8", shape=[32, 64], rows=5, max_abs_err=0.5, rel_err=0.25, ok=True)


def test_no_gpu_is_one_error_line(tmp_path, capsys, monkeypatch):
    bench = load_script("bench")  # DEVICE stays "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run_main(bench, ["--cells", "stories15M:bf16", "--out", tmp_path / "r.json"], capsys)
    assert code == 1
    assert_one_error_line(err, "needs a CUDA GPU", "--merge")


# a measured cell as bench.py writes it (what --merge reads of one)
CELL = dict(model="stories15M", precision="bf16", batch_size=1, new_tokens=200, tok_s=1.0, gb_s=1.0, weights_gb=0.1,
            kv_gb=0.0, mbu=0.5, limit_tok_s=2.0, copy_gb_s=2.0, ttft_ms=1.0, compile_s=1.0, second_compile_s=None,
            prefill_tokens=None, prefill_tok_s=None, prefill_compiled=False, peak_memory_gb=0.1)


@pytest.mark.parametrize("argv, words", [
    (["--cells", "stories15M:int5"], ["unknown precision 'int5'"]),
    (["--cells", "stories15M:int4.g48"], ["unknown precision 'int4.g48'"]),
    (["--cells", "NoSuchModel:bf16"], ["unknown model name 'NoSuchModel'"]),
    (["--cells", "stories15M:bf16:one"], ["not MODEL:PRECISION[:BATCH[:NEW_TOKENS]]"]),
    (["--cells", "stories15M:bf16:1:²"], ["not MODEL:PRECISION[:BATCH[:NEW_TOKENS]]"]),  # no int()
    (["--cells", "stories15M:bf16:1:300"], ["256-token context"]),
    (["--cells", "stories15M:bf16:1:200", "--prompt_tokens", "60"], ["60 + 200 tokens", "256-token context"]),
    (["--prompt_tokens", "0"], ["--prompt_tokens must be >= 1"]),
    (["--cells", "stories15M:bf16:0"], ["must be >= 1"]),
    (["--models", "stories15M", "--batch_sizes", "-1"], ["stories15M:bf16:-1:200", "must be >= 1"]),
    (["--models", "stories15M", "--cells", "stories15M:bf16"], ["one way"]),
    (["--suite", "all", "--part", "4"], ["--part must be in 0..3"]),
    (["--samples", "0"], ["--samples"]),
    (["--merge", "{tmp}/missing.json"], ["missing.json"]),
    (["--merge", "{tmp}/other.json"], ["not a bench.py result", "kernel_checks"]),
    (["--merge", "{tmp}/cut.json"], ["cut.json: row 1 is not a measured cell"]),
    (["--merge", "{tmp}/one.json", "{tmp}/one.json"],
     ["a row of", "one.json is in the inputs twice", "stories15M:bf16:1:200"]),
    (["--merge", "{tmp}/other.json", "--cells", "stories15M:bf16"], ["give it no cells"]),
    (["--merge", "{tmp}/other.json", "--part", "1"], ["give it no cells"]),
    (["--merge", "{tmp}/other.json", "--samples", "3", "--skip_kernel_checks"],
     ["measures nothing", "--samples, --skip_kernel_checks"]),
    (["--merge", "{tmp}/other.json", "--prefill_tokens", "0"], ["measures nothing", "--prefill_tokens"]),
    (["--markdown", "{tmp}/no/such/folder/r.md"], ["--markdown", "folder", "does not exist"]),
    (["--merge", "{tmp}/r.json"], ["--out", "another file of this run"]),  # --out r.json: its input
    (["--markdown", "{tmp}/r.json"], ["--markdown", "another file of this run"]),  # and --out's
])
def test_bad_input_is_one_error_line(argv, words, bench, tmp_path, capsys):
    (tmp_path / "other.json").write_text(json.dumps(dict(card="x", rows=[])))
    (tmp_path / "cut.json").write_text(json.dumps(dict(  # a result whose second row lost its numbers
        card="x", torch="2", date="2026-01-01", copy_gb_s=None, kernel_checks=[],
        rows=[CELL, {**CELL, "tok_s": "fast"}])))
    (tmp_path / "one.json").write_text(json.dumps(dict(
        card="x", torch="2", date="2026-01-01", copy_gb_s=None, kernel_checks=[], rows=[CELL])))
    code, _, err = run_main(bench, [a.format(tmp=tmp_path) for a in argv] + ["--out", tmp_path / "r.json"], capsys)
    assert code == 1
    assert_one_error_line(err, *words)


@pytest.mark.parametrize("edit, words", [
    (dict(card=["H100"]), ["not a bench.py result", "card"]),
    (dict(date=20260101), ["not a bench.py result", "date"]),
    (dict(copy_gb_s="3000"), ["not a bench.py result", "copy_gb_s"]),
    (dict(rows={"0": CELL}), ["not a bench.py result", "rows"]),
    (dict(kernel_checks=3), ["not a bench.py result", "kernel_checks"]),
    (dict(kernel_checks=["ok"]), ["kernel check 0 is not a check"]),
    (dict(kernel_checks=[{"name": "int8", "rel_err": 1e-3}]), ["kernel check 0 is not a check"]),
    (dict(kernel_checks=[{"name": "int8", "rel_err": "small", "ok": True}]), ["kernel check 0 is not a check"]),
    (dict(rows=[{**CELL, "copy_gb_s": None}]), ["row 0 is not a measured cell", "copy_gb_s"]),
    (dict(rows=[{**CELL, "model": ["x"]}]), ["row 0 is not a measured cell", "model"]),
    (dict(rows=[{**CELL, "batch_size": "1"}]), ["row 0 is not a measured cell", "batch_size"]),
    (dict(rows=[{**CELL, "batch_size": True}]), ["row 0 is not a measured cell", "batch_size"]),
    (dict(rows=[{k: v for k, v in CELL.items() if k != "weights_gb"}]), ["row 0 is not a measured cell", "weights_gb"]),
    (dict(rows=[{**CELL, "prompt_tokens": 5.5}]), ["row 0 is not a measured cell", "prompt_tokens"]),
], ids=["card-list", "date-int", "copy-string", "rows-object", "checks-int", "check-string", "check-without-ok",
        "check-error-string", "row-copy-null", "row-model-list", "row-batch-string", "row-batch-bool",
        "row-without-weights", "row-prompt-float"])
def test_merge_of_a_hand_edited_result_is_one_error_line_and_writes_nothing(edit, words, bench, tmp_path, capsys):
    good = dict(card="x", torch="2", date="2026-01-01", copy_gb_s=2.0, kernel_checks=[], rows=[CELL])
    (tmp_path / "good.json").write_text(json.dumps(good))
    (tmp_path / "edited.json").write_text(json.dumps({**good, **edit}))
    code, _, err = run_main(bench, ["--merge", tmp_path / "good.json", tmp_path / "edited.json",
                                    "--out", tmp_path / "o.json", "--markdown", tmp_path / "o.md"], capsys)
    assert code == 1
    assert_one_error_line(err, "edited.json", *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited.json", "good.json"]


def test_merge_of_a_complete_result_makes_its_table(bench, tmp_path, capsys):
    """The control of the test above: the two files, unedited (one cell measured in two processes), merge."""
    good = dict(card="x", torch="2", date="2026-01-01", copy_gb_s=2.0, kernel_checks=[], rows=[CELL])
    for name, tok_s in (("good.json", 1.0), ("edited.json", 1.1)):
        (tmp_path / name).write_text(json.dumps({**good, "rows": [{**CELL, "tok_s": tok_s}]}))
    code, out, _ = run_main(bench, ["--merge", tmp_path / "good.json", tmp_path / "edited.json",
                                    "--out", tmp_path / "o.json", "--markdown", tmp_path / "o.md"], capsys)
    assert code == 0 and len(json.loads((tmp_path / "o.json").read_text())["rows"]) == 2
    assert "| stories15M | bf16 |" in (tmp_path / "o.md").read_text()


@pytest.fixture
def unmeasured(bench, monkeypatch):
    """The CPU benchmark, failing the test if it measures or builds anything."""
    monkeypatch.setattr(bench, "copy_bandwidth_gb_s", lambda: pytest.fail("measured, then refused"))
    monkeypatch.setattr(bench, "build", lambda *_: pytest.fail("built a model, then refused"))
    return bench


@pytest.mark.parametrize("argv, words", [
    (["--cells", "stories15M:bf16:2:4", "--plot", "{tmp}/p.png"], ["--plot", "batch size 1"]),
    (["--cells", "stories15M:bf16:1:4", "--part", "1"], ["--part", "--suite"]),
    (["--cells", "stories15M:bf16:1:4", "--cache_dir", "{tmp}/file"], ["--cache_dir", "is a file"]),
])
def test_bad_flags_are_refused_before_anything_is_measured(argv, words, unmeasured, tmp_path,
                                                            capsys):
    (tmp_path / "file").write_text("")
    out = tmp_path / "r.json"
    argv = [a.format(tmp=tmp_path) for a in argv] + ["--out", out]
    code, _, err = run_main(unmeasured, argv, capsys)
    assert code == 1
    assert_one_error_line(err, *words)
    assert not out.exists()


def test_plot_without_matplotlib_is_refused_before_anything_is_measured(unmeasured, tmp_path,
                                                                        capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    argv = ["--cells", "stories15M:bf16:1:4", "--plot", tmp_path / "p.png"]
    code, _, err = run_main(unmeasured, argv + ["--out", tmp_path / "r.json"], capsys)
    assert code == 1
    assert_one_error_line(err, "--plot needs matplotlib", "pip install matplotlib")


# ---- merging several processes' results ----------------------------------------------------------------

@pytest.fixture(scope="module")
def two_results(tmp_path_factory):
    """Two processes' results, as two GPUs of different copy bandwidths write them, each with the same
    kernel check (worse on the second GPU)."""
    folder = tmp_path_factory.mktemp("bench")
    runs = (("a", 40.0, ["stories15M:int8:1:4", "stories15M:bf16:1:4"], dict(max_abs_err=1e-3, rel_err=1e-3, ok=True)),
            ("b", 60.0, ["stories15M:bf16:2:4", "stories15M:fp8:1:4"], dict(max_abs_err=2.0, rel_err=0.5, ok=False)))
    for name, copy_gb_s, cells, errors in runs:
        with pytest.MonkeyPatch.context() as mp:
            bench = cpu_bench(mp, copy_gb_s)
            out = folder / f"{name}.json"
            bench.main(["--cells", *cells, "--samples", "1", "--prefill_tokens", "8", "--out", str(out)])
        result = json.loads(out.read_text())
        result["kernel_checks"] = [dict(name="int8", shape=[4096, 4096], rows=1, **errors),
                                   dict(name="int8", shape=[4096, 4096], rows=5, max_abs_err=1e-3, rel_err=1e-3, ok=True)]
        out.write_text(json.dumps(result))
    return folder / "a.json", folder / "b.json"


def merge(argv, capsys) -> str:
    """scripts/bench.py --merge ... through its main() in this process, as it is (no CPU stand-ins: merging
    runs nothing); returns what it printed. The command line itself: test_plot_is_a_png_made_from_json_alone."""
    code, stdout, err = run_main(load_script("bench"), argv, capsys)
    assert code == 0, err
    return stdout


def test_merge_makes_one_sorted_table_of_every_process(two_results, tmp_path, capsys):
    out, md = tmp_path / "all.json", tmp_path / "all.md"
    stdout = merge(["--merge", *two_results, "--out", out, "--markdown", md], capsys)
    merged = json.loads(out.read_text())
    inputs = [json.loads(p.read_text()) for p in two_results]
    assert sorted(map(json.dumps, merged["rows"])) == sorted(json.dumps(row) for i in inputs for row in i["rows"])
    # Batch 1 first, precisions in the table's order; each row keeps its own GPU's copy bandwidth.
    assert [(row["precision"], row["batch_size"], row["copy_gb_s"]) for row in merged["rows"]] == [
        ("bf16", 1, 40.0), ("int8", 1, 40.0), ("fp8", 1, 60.0), ("bf16", 2, 60.0)]
    assert merged["copy_gb_s"] == 50.0 and merged["card"] == "cpu"
    # Per case (kernel, shape, rows): the largest errors of any GPU, failed if it failed on one.
    assert merged["kernel_checks"] == [dict(name="int8", shape=[4096, 4096], rows=1, max_abs_err=2.0, rel_err=0.5, ok=False),
                                       dict(name="int8", shape=[4096, 4096], rows=5, max_abs_err=1e-3, rel_err=1e-3, ok=True)]
    table = md.read_text()
    assert table in stdout and "copy bandwidth 40–60 GB/s (per GPU)" in table and "**NO**" in table
    assert [line.split(" | ")[1] for line in table.splitlines() if line.startswith("| stories15M |")] == ["bf16", "int8", "fp8", "bf16"]


def test_merging_a_merged_result_again_changes_nothing(two_results, tmp_path, capsys):
    once, twice = tmp_path / "once.json", tmp_path / "twice.json"
    merge(["--merge", *two_results, "--out", once], capsys)
    merge(["--merge", once, "--out", twice], capsys)
    assert json.loads(twice.read_text()) == json.loads(once.read_text())


def test_plot_is_a_png_made_from_json_alone(two_results, tmp_path):
    """The optional plot (matplotlib: a bench-only extra at run time, installed with requirements-test.txt)."""
    png = tmp_path / "all.png"
    r = run_script("scripts/bench.py", "--merge", *two_results, "--plot", png)
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_is_one_error_line(two_results, bench, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    code, _, err = run_main(bench, ["--merge", two_results[0], "--plot", tmp_path / "p.png"], capsys)
    assert code == 1
    assert_one_error_line(err, "--plot needs matplotlib", "pip install matplotlib")
    assert not (tmp_path / "p.png").exists()


def test_merge_refuses_a_plot_without_batch_1_rows_before_writing_anything(two_results, tmp_path,
                                                                           capsys):
    result = json.loads(two_results[1].read_text())
    batch_2 = tmp_path / "batch2.json"
    rows = [r for r in result["rows"] if r["batch_size"] == 2]
    batch_2.write_text(json.dumps(dict(result, rows=rows)))
    out = tmp_path / "all.json"
    argv = ["--merge", batch_2, "--out", out, "--plot", tmp_path / "p.png"]
    code, _, err = run_main(load_script("bench"), argv, capsys)
    assert code == 1
    assert_one_error_line(err, "--plot", "batch size 1")
    assert not out.exists()


# ---- the whole matrix (scripts/bench_all.sh) ----------------------------------------------------------

def test_suite_all_is_the_benchmark_matrix_in_four_parts(bench):
    parts = bench.SUITES["all"]
    specs = [spec for part in parts for spec in part]
    cells = {bench.Cell.parse(s) for s in specs}
    L2, L3, Cell = "Llama-2-7B", "Llama-3-8B", bench.Cell
    every_precision = ("bf16", "int8", "int4.g128", "int4.g32", "fp8")
    wanted = ({Cell(m, p, 1, 200) for m in (L2, L3) for p in every_precision}
              | {Cell(L2, p, b, 200) for p in ("bf16", "int8") for b in (8, 32)}
              | {Cell(L2, p, 1, 4000) for p in ("bf16", "int4.g128")})
    assert len(parts) == 4 and len(specs) == len(cells) and cells == wanted
    for spec in (spec for suite in bench.SUITES.values() for part in suite for spec in part):
        bench.check_cell(bench.Cell.parse(spec))  # every suite's cells can run (bench_all.sh --quick's too)
    # the second compile (bench_all.sh, part 0) times the headline bf16 cell
    assert parts[0][0] == f"{L2}:bf16:1:200"


def test_bench_all_without_four_gpus_is_one_error_line(tmp_path):
    # CUDA_VISIBLE_DEVICES="": no GPU even on a GPU machine, so this never starts the real benchmark.
    r = subprocess.run(["bash", "scripts/bench_all.sh", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 1
    assert_one_error_line(r.stderr, "4 GPUs", "--quick")


@pytest.mark.parametrize("args", [["--help"], ["out", "more"]])
def test_bench_all_refuses_a_flag_or_a_second_folder_in_one_line(args):
    r = subprocess.run(["bash", "scripts/bench_all.sh", *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=60, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 1
    assert_one_error_line(r.stderr, "usage: bash scripts/bench_all.sh [--quick] [OUT_DIR]")
    assert not (ROOT / args[0]).exists()


def test_layer_benchmark_times_bf16_single_rows_by_cublas_and_by_the_gemv(monkeypatch):
    import torch.nn as nn
    import kernels
    monkeypatch.setattr(kernels, "FLOAT_GEMV", True)  # restored after the test, whatever happens
    bench_layers = load_script("bench_layers")
    layers = [kernels.FloatLinear(8, 4, bias=False)]
    seen = []
    for name, set_up in bench_layers.paths(layers, 1):
        set_up()
        seen.append((name, kernels.FLOAT_GEMV))
    assert seen == [("cublas", False), ("gemv", True)]  # the GEMV last: the flag left as it was
    assert [name for name, _ in bench_layers.paths(layers, 8)] == [""]  # batches: cuBLAS alone
    assert [name for name, _ in bench_layers.paths([nn.Linear(8, 4)], 1)] == [""]


@pytest.mark.parametrize("argv, words", [
    (["--precisions", "bf16", "int5"], ["unknown precision 'int5'"]),
    (["--rows", "1", "0"], ["--rows", ">= 1"]),
    ([], ["needs a CUDA GPU"]),
])
def test_layer_benchmark_bad_input_is_one_error_line(argv, words, capsys, monkeypatch):
    bench_layers = load_script("bench_layers")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run_main(bench_layers, argv, capsys)
    assert code == 1
    assert_one_error_line(err, *words)
