"""scripts/bench_cpu.py's code path on a tiny config: the rows it reports and the JSON it writes."""
import json

import pytest
import torch

from checkpoint import InputError
from conftest import load_script

bench_cpu = load_script("bench_cpu")


def test_rows_compare_each_precision_with_float32_of_the_same_run(tmp_path, capsys):
    out = tmp_path / "cpu.json"
    threads = torch.get_num_threads()
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
    # stories15M's untied embedding is not read per step; int8 stores a byte a weight (plus scales),
    # int4 half a byte (plus a scale and zero per 32) with its output layer in int8.
    gb = {precision: r["gb_per_step"] for precision, r in rows.items()}
    assert gb["int4.g32"] < gb["int8"] < gb["float32"]
    assert rows["int8"]["gb_per_step"] == pytest.approx(rows["float32"]["gb_per_step"] / 4, rel=0.02)
    assert "| stories15M | int8 |" in capsys.readouterr().out


@pytest.mark.parametrize("flags, words", [
    (["--models", "GPT-5"], "unknown model name 'GPT-5'"),
    (["--rounds", "0"], "--rounds must be >= 1"),
    (["--models", "stories15M", "--new_tokens", "300"], "context of 256 tokens"),
])
def test_bad_input_is_refused_before_any_model_is_built(flags, words):
    with pytest.raises(InputError, match=words):
        bench_cpu.main(flags)
