"""scripts/bench_cpu.py's code path on a tiny config: the rows it reports and the JSON it writes."""
import json

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
    (["--models", "stories15M", "--new_tokens", "300"], "context of 256 tokens"),
    # 70B float32 weights and their int8 copy: ~420 GB, more than the 16 GB the test gives the machine
    (["--models", "stories15M", "Llama-2-70B", "--precisions", "int8"], "more than the .* free memory on cpu"),
])
def test_bad_input_is_refused_before_any_model_is_built(flags, words, monkeypatch):
    # a machine of 16 GB free, whatever this one has
    monkeypatch.setattr(bench_cpu.generate, "host_memory_available", lambda: 16 * 10 ** 9)
    with pytest.raises(InputError, match=words):
        bench_cpu.main(flags)
