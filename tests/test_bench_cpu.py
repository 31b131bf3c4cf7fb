"""scripts/bench_cpu.py's code path on a tiny config: the rows it reports and the JSON it writes."""
import json
from types import SimpleNamespace

import pytest
import torch

from checkpoint import InputError
from conftest import load_script

bench_cpu = load_script("bench_cpu")


class Bar:
    """tqdm's stand-in: counts the runs reported against the total it was given."""
    made = []

    def __init__(self, total, **_):
        self.total, self.n = total, 0
        Bar.made.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *_):
        pass

    def update(self, n):
        self.n += n


def test_rows_compare_each_precision_with_float32_of_the_same_run(tmp_path, capsys, monkeypatch):
    out = tmp_path / "cpu.json"
    threads = torch.get_num_threads()
    monkeypatch.setattr("tqdm.tqdm", Bar)
    Bar.made.clear()
    try:
        bench_cpu.main(["--models", "stories15M", "--precisions", "int8", "int4.g32", "--rounds", "2",
                        "--new_tokens", "3", "--threads", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    result = json.loads(out.read_text())
    rows = {r["precision"]: r for r in result["rows"]}
    assert list(rows) == ["float32", "int8", "int4.g32"] and result["threads"] == 1
    assert rows["float32"]["vs_float32"] == 1.0
    for r in rows.values():
        assert len(r["samples"]) == 2 and r["tok_s"] > 0
        assert r["vs_float32"] == pytest.approx(r["tok_s"] / rows["float32"]["tok_s"])
        assert r["gb_s"] == pytest.approx(r["gb_per_step"] * r["tok_s"])
    # stories15M's untied embedding is not read per step; int8 stores a byte a weight, plus 6 bytes
    # a row (a float32 scale, the CPU kernel's bfloat16 unit scale): 2 % more at 288 columns; int4
    # half a byte (plus a scale and zero per 32) with its output layer in int8.
    gb = {precision: r["gb_per_step"] for precision, r in rows.items()}
    assert gb["int4.g32"] < gb["int8"] < gb["float32"]
    assert rows["int8"]["gb_per_step"] == pytest.approx(rows["float32"]["gb_per_step"] / 4,
                                                        rel=0.03)
    # each row's median, then its slowest and fastest sample
    int8 = rows["int8"]
    spread = f"{min(int8['samples']):.1f}–{max(int8['samples']):.1f}"
    assert f"| stories15M | int8 | {int8['tok_s']:.1f} | {spread} |" in capsys.readouterr().out
    # one run a precision compiles (untimed), then 2 rounds: the bar counts all 9
    assert [(bar.n, bar.total) for bar in Bar.made] == [(9, 9)]


@pytest.mark.parametrize("flags, words", [
    (["--models", "GPT-5"], "unknown model name 'GPT-5'"),
    (["--rounds", "0"], "--rounds must be >= 1"),
    (["--threads", "0"], "--threads and --rounds must be >= 1"),
    (["--new_tokens", "1"], "--new_tokens >= 2"),
    (["--models", "stories15M", "--new_tokens", "300"], "context of 256 tokens"),
    # 70B float32 weights and their int8 copy: ~420 GB, more than the 16 GB the test gives the machine
    (["--models", "stories15M", "Llama-2-70B", "--precisions", "int8"], "more than the .* free memory on cpu"),
])
def test_bad_input_is_refused_before_any_model_is_built(flags, words, monkeypatch):
    # a machine of 16 GB free, whatever this one has
    monkeypatch.setattr(bench_cpu.generate, "host_memory_available", lambda: 16 * 10 ** 9)
    with pytest.raises(InputError, match=words):
        bench_cpu.main(flags)


class Measured(Exception):
    """Raised where the benchmark starts measuring: every check of its input has passed."""


def measured(*args, **kwargs):
    raise Measured


def test_new_tokens_that_fill_the_context_exactly_are_accepted(monkeypatch):
    monkeypatch.setattr(bench_cpu, "copy_bandwidth_gb_s", measured)
    with pytest.raises(Measured):  # stories15M: a 5-token prompt and 251 new tokens fill its 256
        bench_cpu.main(["--models", "stories15M", "--new_tokens", "251", "--threads", str(torch.get_num_threads())])


def test_the_quantized_copies_count_against_free_memory_with_the_float32_weights(monkeypatch):
    """stories15M's float32 weights fit in 120 MB; with their int8 copy (a byte a weight) they do not."""
    monkeypatch.setattr(bench_cpu, "copy_bandwidth_gb_s", measured)
    monkeypatch.setattr(bench_cpu.generate, "host_memory_available", lambda: 120 * 10 ** 6)
    with pytest.raises(InputError, match="free memory on cpu"):
        bench_cpu.main(["--models", "stories15M", "--precisions", "int8"])


def test_copy_bandwidth_counts_the_bytes_read_and_written_over_the_median_copy_time(monkeypatch):
    clock = iter([0.0, 1.0, 10.0, 10.5, 20.0, 24.0])  # copies of 1, 0.5 and 4 s: the median is 1 s
    monkeypatch.setattr(bench_cpu, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    assert bench_cpu.copy_bandwidth_gb_s(n_bytes=4 * 10 ** 6, repeats=3) == pytest.approx(0.008)


def test_table_gives_each_rows_bandwidth_as_a_share_of_the_copy_bandwidth():
    row = dict(model="m", precision="int8", tok_s=100.0, samples=[90.0, 110.0], vs_float32=2.0, gb_per_step=0.05,
               gb_s=5.0)
    table = bench_cpu.markdown(dict(copy_gb_s=20.0, rows=[row]))
    assert table.splitlines()[-1] == "| m | int8 | 100.0 | 90.0–110.0 | 2.00 | 0.050 | 5.0 | 25% |"
