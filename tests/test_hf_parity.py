"""scripts/convert_hf_checkpoint.py + model.py against transformers as the independent reference.

Tiny random Llama / Mistral / Mixtral / Qwen2 / Qwen3 / Qwen3-MoE models are saved the way the HF
hub ships them, converted, loaded with checkpoint.read_checkpoint + load_model and must give the
same float32 logits. The other tests check that every input format (sharded safetensors,
pytorch_model.bin, Meta's consolidated.pth) converts to identical tensors, that an existing
checkpoint is replaced only with --force, and that bad inputs end in one `error:` line.
"""
import json
import math
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from checkpoint import CONFIGS, InputError, load_model, read_checkpoint
from conftest import ROOT, assert_one_error_line, load_script, run_script

SCRIPT = ROOT / "scripts" / "convert_hf_checkpoint.py"
convert_hf = load_script("convert_hf_checkpoint")

TOL = 1e-4
B, T = 2, 128  # T > 100 so the llama3 case runs far past its original_max_position_embeddings of 32
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=256)
# head_dim 16 gives wavelengths 6.3, 20, 63, ... tokens: with original_max_position_embeddings 32
# (low/high thresholds 32 and 8 tokens) llama3 scaling keeps the first, blends the second and slows
# the rest.
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=32)
HF_CONFIG = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 vocab_size=256, intermediate_size=128, max_position_embeddings=256)  # config.json
FAMILIES = {  # id -> (transformers config class, overrides of TINY)
    "llama-mha": ("LlamaConfig", dict(num_key_value_heads=4)),
    "llama-gqa": ("LlamaConfig", dict(num_key_value_heads=2)),
    "llama3.1-rope-scaling": ("LlamaConfig",
                              dict(num_key_value_heads=2, rope_parameters=LLAMA3_ROPE)),
    "mistral-gqa": ("MistralConfig", dict(num_key_value_heads=1, sliding_window=None)),
    "qwen2-bias": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "llama-tied": ("LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2-tied": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    # head_dim 32, not hidden_size / heads = 16: q/k/o are wider than the model
    "qwen3": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=32, tie_word_embeddings=False)),
    "qwen3-tied": ("Qwen3Config", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "mixtral": ("MixtralConfig", dict(num_key_value_heads=2, num_local_experts=4,
                                      num_experts_per_tok=2, sliding_window=None)),
    # Qwen3-MoE: the experts' width is moe_intermediate_size; the dense intermediate_size is unused
    "qwen3-moe": ("Qwen3MoeConfig", dict(num_key_value_heads=2, head_dim=16, num_experts=8,
                                         num_experts_per_tok=3, moe_intermediate_size=48,
                                         norm_topk_prob=True)),
    "qwen3-moe-unnormed": ("Qwen3MoeConfig", dict(num_key_value_heads=2, head_dim=16,
                                                  num_experts=8, num_experts_per_tok=3,
                                                  moe_intermediate_size=48,
                                                  norm_topk_prob=False)),
}


def make_hf_model(family: str):
    cls_name, overrides = FAMILIES[family]
    config = getattr(transformers, cls_name)(**{**TINY, **overrides})
    torch.manual_seed(0)
    # eager attention: a reference that shares no attention code with model.py's SDPA path.
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model = model.float().eval()
    # HF's init (std 0.02, unit norms, zero biases) gives near-uniform attention, under which a
    # wrong rotary layout or a lost bias barely moves the logits; larger random values make every
    # weight matter.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0.0, 0.5)
            else:
                p.normal_(0.0, 0.15)
    return model


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """family -> (HF model, folder it was saved to); built once per family."""
    cache = {}

    def get(family):
        if family not in cache:
            model = make_hf_model(family)
            folder = tmp_path_factory.mktemp(family) / "hf"
            model.save_pretrained(folder)
            cache[family] = model, folder
        return cache[family]
    return get


def run_converter(hf_dir: Path, out: Path, *flags) -> Path:
    convert_hf.main(["--checkpoint_dir", str(out), "--hf_dir", str(hf_dir), *flags])
    return out


def load(checkpoint: Path, dtype=None):
    return load_model(read_checkpoint(checkpoint), "cpu", dtype)


def our_logits(checkpoint: Path, idx: torch.Tensor) -> torch.Tensor:
    model = load(checkpoint, torch.float32)
    with torch.no_grad():
        model.setup_caches(idx.shape[0], idx.shape[1])
        return model(idx, torch.arange(idx.shape[1]))  # (B, T, vocab_size)


def hf_logits(model, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx).logits  # (B, T, vocab_size)


def assert_same_checkpoint(a: Path, b: Path):
    ca, cb = (json.loads((folder / "config.json").read_text()) for folder in (a, b))
    assert ca == cb
    sa, sb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


# ---- logits parity -------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(family, hf_models, tmp_path):
    hf, hf_dir = hf_models(family)
    out = run_converter(hf_dir, tmp_path / "ckpt")
    idx = torch.randint(0, TINY["vocab_size"], (B, T), generator=torch.Generator().manual_seed(1))
    ours, ref = our_logits(out, idx), hf_logits(hf, idx)
    delta = (ours - ref).abs().max().item()
    print(f"{family}: max |delta| = {delta:.2e} (logits up to {ref.abs().max().item():.1f})")
    assert delta <= TOL, f"{family}: max |delta| {delta:.2e}"


@pytest.mark.parametrize("scaling", [None, "Llama-3.2-1B"], ids=["plain", "llama3-scaled"])
def test_the_rotary_table_is_transformers_at_every_position_of_a_long_context(scaling):
    """cos and sin equal transformers' to the bit over 32k positions, where an angle computed in
    another precision differs by ~1e-3: the logits' parity at the tests' short lengths holds at any
    length."""
    from model import ModelArgs, rope_table
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    c = dict(CONFIGS["Llama-3.2-1B"], rope_scaling=None if scaling is None else
             CONFIGS[scaling]["rope_scaling"])
    T = 32768
    rope = {"rope_type": "default"} if scaling is None else {"rope_type": "llama3",
                                                             **c["rope_scaling"]}
    hf = LlamaRotaryEmbedding(transformers.LlamaConfig(
        hidden_size=c["dim"], num_attention_heads=c["n_head"], max_position_embeddings=T,
        rope_parameters={**rope, "rope_theta": c["rope_base"]}))
    cos, sin = hf(torch.zeros(1, T, 1), torch.arange(T)[None])  # (1, T, head_dim): halves
    table = rope_table(ModelArgs(**c), T)  # (T, 2, 1, head_dim): pairs (c0, c0, ...), (-s0, s0, ...)
    half = table.shape[-1] // 2
    assert torch.equal(table[:, 0, 0, 0::2], cos[0, :, :half])
    assert torch.equal(table[:, 1, 0, 1::2], sin[0, :, :half])


def test_rms_norm_of_bfloat16_activations_is_transformers_to_the_bit():
    """Normalised in float32, then rounded to bfloat16 before the bfloat16 weight scales it."""
    from model import RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    torch.manual_seed(0)
    ours, ref = RMSNorm(64, eps=1e-6).bfloat16(), LlamaRMSNorm(64, eps=1e-6).bfloat16()
    with torch.no_grad():
        ours.weight.copy_(1 + 0.5 * torch.randn(64))
        ref.weight.copy_(ours.weight)
        x = (10 * torch.randn(4, 7, 64)).bfloat16()
        y = ours(x)
        assert y.dtype == torch.bfloat16 and torch.equal(y, ref(x))


def test_parity_check_would_catch_rotate_half_rows(hf_models, tmp_path):
    """Guard on the test itself: loading HF's q/k rows without un-permuting them must fail the
    tolerance."""
    hf, hf_dir = hf_models("llama-gqa")
    out = run_converter(hf_dir, tmp_path / "ckpt")
    sd = load_file(out / "model.safetensors")
    q_dim, kv_dim = 4 * 16, 2 * 16
    for i in range(TINY["num_hidden_layers"]):
        attn = hf.model.layers[i].self_attn
        rows = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
        sd[f"layers.{i}.attention.wqkv.weight"] = torch.cat(rows).detach()
        assert sd[f"layers.{i}.attention.wqkv.weight"].shape[0] == q_dim + 2 * kv_dim
    save_file(sd, out / "model.safetensors")
    idx = torch.randint(0, TINY["vocab_size"], (B, 32), generator=torch.Generator().manual_seed(1))
    assert (our_logits(out, idx) - hf_logits(hf, idx)).abs().max() > 1e-2


def test_parity_check_would_catch_qk_norm_weights_in_hf_order(hf_models, tmp_path):
    """Guard on the test itself: Qwen3's per-head q/k norm weights scale each dimension before the
    rotation, so they must follow the q/k rows into the interleaved order; left in HF's order the
    logits must fail the tolerance."""
    hf, hf_dir = hf_models("qwen3")
    out = run_converter(hf_dir, tmp_path / "ckpt")
    sd = load_file(out / "model.safetensors")
    for i in range(TINY["num_hidden_layers"]):
        attn = hf.model.layers[i].self_attn
        sd[f"layers.{i}.attention.q_norm.weight"] = attn.q_norm.weight.detach().clone()
        sd[f"layers.{i}.attention.k_norm.weight"] = attn.k_norm.weight.detach().clone()
    save_file(sd, out / "model.safetensors")
    idx = torch.randint(0, TINY["vocab_size"], (B, 32), generator=torch.Generator().manual_seed(1))
    assert (our_logits(out, idx) - hf_logits(hf, idx)).abs().max() > 1e-2


def test_parity_check_would_catch_qk_norm_after_rotary(hf_models, tmp_path, monkeypatch):
    """Guard on the test itself: Qwen3 normalises q and k before the rotation; normalising after
    it (the norm weights scale the dimensions that the rotation mixes) must fail the tolerance."""
    import model as model_py
    hf, hf_dir = hf_models("qwen3")
    model = load(run_converter(hf_dir, tmp_path / "ckpt"), torch.float32)
    rotary, current = model_py.apply_rope, {}
    monkeypatch.setattr(model_py, "apply_rope", lambda x, rope: x)  # rotated inside the norms
    for layer in model.layers:
        attention = layer.attention
        # one group of rows (model.Rows): its rotary angles
        attention.register_forward_pre_hook(lambda m, args: current.update(rope=args[1][0].rope))
        for name in ("q_norm", "k_norm"):
            norm = getattr(attention, name)
            delattr(attention, name)
            setattr(attention, name, lambda x, norm=norm: norm(rotary(x, current["rope"])))
    idx = torch.randint(0, TINY["vocab_size"], (B, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.setup_caches(B, 32)
        mutated = model(idx, torch.arange(32))
    assert (mutated - hf_logits(hf, idx)).abs().max() > 1e-2


def test_parity_check_would_catch_a_wrong_router_normalisation(hf_models, tmp_path):
    """Guard on the test itself: the same Qwen3-MoE weights with the chosen experts' probabilities
    renormalised (norm_topk_prob ignored) must fail the tolerance."""
    hf, hf_dir = hf_models("qwen3-moe-unnormed")
    out = run_converter(hf_dir, tmp_path / "ckpt")
    config = json.loads((out / "config.json").read_text())
    assert config["norm_topk_prob"] is False
    (out / "config.json").write_text(json.dumps({**config, "norm_topk_prob": True}))
    idx = torch.randint(0, TINY["vocab_size"], (B, 32), generator=torch.Generator().manual_seed(1))
    assert (our_logits(out, idx) - hf_logits(hf, idx)).abs().max() > 1e-2


# ---- input formats convert identically -----------------------------------------------------------

@pytest.mark.parametrize("family", ["llama-gqa", "qwen2-bias"])
def test_sharded_safetensors_convert_to_the_same_checkpoint(family, hf_models, tmp_path):
    hf, hf_dir = hf_models(family)
    sharded = tmp_path / "hf_sharded"
    hf.save_pretrained(sharded, max_shard_size="20KB")
    weight_map = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    qkv = {weight_map[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"}
    assert len(qkv) > 1, "q/k/v of layer 0 should be split across shards"
    assert_same_checkpoint(run_converter(hf_dir, tmp_path / "a"),
                           run_converter(sharded, tmp_path / "b"))


def test_a_tied_models_files_that_also_hold_lm_head_convert_to_the_same_checkpoint(hf_models, tmp_path):
    _, hf_dir = hf_models("qwen2-tied")
    with_head = Path(shutil.copytree(hf_dir, tmp_path / "hf_with_head"))
    state_dict = load_file(hf_dir / "model.safetensors")
    assert "lm_head.weight" not in state_dict
    state_dict["lm_head.weight"] = state_dict["model.embed_tokens.weight"].clone()
    save_file(state_dict, with_head / "model.safetensors", metadata={"format": "pt"})
    assert_same_checkpoint(run_converter(hf_dir, tmp_path / "a"),
                           run_converter(with_head, tmp_path / "b"))


@pytest.mark.parametrize("family", ["mixtral", "qwen3-moe"])
def test_experts_stacked_as_transformers_5_holds_them(family, hf_models, tmp_path):
    """The same weights named as transformers 5's modules hold them (mlp.experts.gate_up_proj
    (n_experts, 2 * inter, dim), mlp.experts.down_proj, mlp.gate) rather than per expert."""
    hf, hf_dir = hf_models(family)
    fused = tmp_path / "hf_fused"
    fused.mkdir()
    shutil.copy(hf_dir / "config.json", fused / "config.json")
    state_dict = {name: t.detach().contiguous() for name, t in hf.state_dict().items()}
    assert any(name.endswith("mlp.experts.gate_up_proj") for name in state_dict)
    save_file(state_dict, fused / "model.safetensors")
    assert_same_checkpoint(run_converter(hf_dir, tmp_path / "a"),
                           run_converter(fused, tmp_path / "b"))


@pytest.mark.parametrize("n_files", [1, 2], ids=["single-bin", "sharded-bin"])
def test_pytorch_model_bin_files_convert_to_the_same_checkpoint(n_files, hf_models, tmp_path):
    hf, hf_dir = hf_models("llama-gqa")
    bin_dir = tmp_path / "hf_bin"
    hf.config.save_pretrained(bin_dir)
    state_dict = dict(hf.state_dict())
    # Older checkpoints carry precomputed rotary tables; the converter must skip them.
    state_dict["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.rand(8)
    if n_files == 1:
        torch.save(state_dict, bin_dir / "pytorch_model.bin")
    else:  # alternate tensors between two files so a layer's q, k and v are split
        names = list(state_dict)
        shards = {f"pytorch_model-0000{j + 1}-of-00002.bin": names[j::2] for j in range(2)}
        for file, keys in shards.items():
            torch.save({k: state_dict[k] for k in keys}, bin_dir / file)
        weight_map = {k: file for file, keys in shards.items() for k in keys}
        index = json.dumps({"weight_map": weight_map})
        (bin_dir / "pytorch_model.bin.index.json").write_text(index)
    assert_same_checkpoint(run_converter(hf_dir, tmp_path / "a"),
                           run_converter(bin_dir, tmp_path / "b"))


def hf_rows_to_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo HF's rotate-half permutation by explicit indices: Meta row 2i + r of a head is HF row
    r * half + i."""
    head_dim = w.shape[0] // n_heads
    half = head_dim // 2
    order = [h * head_dim + r * half + i
             for h in range(n_heads) for i in range(half) for r in range(2)]
    return w[order]


def write_meta_checkpoint(hf, folder: Path):
    """Meta's original/ layout (consolidated.00.pth, params.json, tokenizer.model) from the HF
    model's weights."""
    cfg = hf.config
    original = folder / "original"
    original.mkdir(parents=True)
    sd = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    meta = {"tok_embeddings.weight": sd["model.embed_tokens.weight"],
            "norm.weight": sd["model.norm.weight"], "output.weight": sd["lm_head.weight"],
            "rope.freqs": torch.rand(8)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        q, k = sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"]
        meta.update({
            f"layers.{i}.attention.wq.weight": hf_rows_to_meta(q, cfg.num_attention_heads),
            f"layers.{i}.attention.wk.weight": hf_rows_to_meta(k, cfg.num_key_value_heads),
            f"layers.{i}.attention.wv.weight": sd[p + "self_attn.v_proj.weight"],
            f"layers.{i}.attention.wo.weight": sd[p + "self_attn.o_proj.weight"],
            f"layers.{i}.feed_forward.w1.weight": sd[p + "mlp.gate_proj.weight"],
            f"layers.{i}.feed_forward.w2.weight": sd[p + "mlp.down_proj.weight"],
            f"layers.{i}.feed_forward.w3.weight": sd[p + "mlp.up_proj.weight"],
            f"layers.{i}.attention_norm.weight": sd[p + "input_layernorm.weight"],
            f"layers.{i}.ffn_norm.weight": sd[p + "post_attention_layernorm.weight"],
        })
    torch.save(meta, original / "consolidated.00.pth")
    params = dict(dim=cfg.hidden_size, n_layers=cfg.num_hidden_layers,
                  n_heads=cfg.num_attention_heads, n_kv_heads=cfg.num_key_value_heads,
                  vocab_size=cfg.vocab_size, multiple_of=32, norm_eps=cfg.rms_norm_eps,
                  rope_theta=10000.0)
    (original / "params.json").write_text(json.dumps(params))
    (original / "tokenizer.model").write_text("IQ== 0\n")


@pytest.mark.parametrize("with_hf_config", [True, False],
                         ids=["with-config.json", "params.json-only"])
def test_meta_consolidated_weights_convert_to_the_same_checkpoint(with_hf_config, hf_models, tmp_path):
    hf, hf_dir = hf_models("llama-gqa")
    meta_dir = tmp_path / "hf_meta"
    write_meta_checkpoint(hf, meta_dir)
    if with_hf_config:
        shutil.copy(hf_dir / "config.json", meta_dir / "config.json")
    a, b = run_converter(hf_dir, tmp_path / "a"), run_converter(meta_dir, tmp_path / "b")
    assert (b / "tokenizer.model").read_text() == "IQ== 0\n"
    if with_hf_config:
        assert_same_checkpoint(a, b)
        return
    sa, sb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ca, cb = (json.loads((c / "config.json").read_text()) for c in (a, b))
    for key in ("dim", "n_layer", "n_head", "n_kv_heads", "head_dim", "vocab_size",
                "intermediate_size", "rope_base", "rope_scaling", "norm_eps", "tie_embeddings"):
        assert ca[key] == cb[key], key


def test_meta_params_of_llama_3_2_take_its_rope_scaling_factor_32_and_3_1_its_8(capsys):
    """Meta's params.json says use_scaled_rope and no factor: Llama 3.2's 1B and 3B take 32 (their
    HF configs, and the project's named configs), Llama 3.1 8 (its 8B here)."""
    for name in ("Llama-3.2-1B", "Llama-3.2-3B", "Llama-3.1-8B"):
        c = CONFIGS[name]
        params = dict(dim=c["dim"], n_layers=c["n_layer"], n_heads=c["n_head"], n_kv_heads=8,
                      rope_theta=5e5, use_scaled_rope=True, max_seq_len=131072)
        shapes = {"tok_embeddings.weight": (128256, c["dim"]),
                  "layers.0.feed_forward.w1.weight": (c["intermediate_size"], c["dim"])}
        args = convert_hf.meta_params_to_args(params, shapes, "params.json")
        assert args.rope_scaling == c["rope_scaling"], name
        assert f"assuming {c['rope_scaling']['factor']:g}" in capsys.readouterr().out
    args = convert_hf.meta_params_to_args({**params, "rope_scaling_factor": 16}, shapes, "p")
    assert args.rope_scaling["factor"] == 16  # one that params.json gives is taken


def test_meta_params_without_context_or_epsilon_take_llama_3s_and_metas_defaults(capsys):
    """No max_seq_len: Llama 3's context, or Llama 3.1's when the rope is scaled; no norm_eps: 1e-5,
    the default of Meta's reference ModelArgs."""
    shapes = {"tok_embeddings.weight": (256, 64), "layers.0.feed_forward.w1.weight": (128, 64)}
    params = dict(dim=64, n_layers=2, n_heads=4)
    plain = convert_hf.meta_params_to_args(params, shapes, "params.json")
    scaled = convert_hf.meta_params_to_args({**params, "use_scaled_rope": True}, shapes, "params.json")
    assert plain.block_size == CONFIGS["Llama-3-8B"]["block_size"] == 8192
    assert scaled.block_size == CONFIGS["Llama-3.1-8B"]["block_size"] == 131072
    assert plain.norm_eps == scaled.norm_eps == 1e-5


def test_consolidated_weights_directly_in_the_snapshot_folder_convert_as_in_original(hf_models, tmp_path):
    hf, _ = hf_models("llama-gqa")
    write_meta_checkpoint(hf, tmp_path / "nested")
    flat = Path(shutil.copytree(tmp_path / "nested" / "original", tmp_path / "flat"))
    assert_same_checkpoint(run_converter(tmp_path / "nested", tmp_path / "a"),
                           run_converter(flat, tmp_path / "b"))


# ---- config reading ------------------------------------------------------------------------------

def test_old_and_new_rope_config_styles_agree():
    scaling = {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}
    old = convert_hf.hf_config_to_args({**HF_CONFIG, "rope_theta": 5e5,
                                        "rope_scaling": {**scaling, "type": "llama3"}})
    new = convert_hf.hf_config_to_args({**HF_CONFIG,
                                        "rope_parameters": {**scaling, "rope_theta": 5e5}})
    assert old == new and old.rope_base == 5e5
    assert old.rope_scaling["original_max_position_embeddings"] == 32
    with pytest.raises(InputError, match="yarn"):
        convert_hf.hf_config_to_args({**HF_CONFIG, "rope_scaling": {"rope_type": "yarn"}})


def test_sliding_window_caps_block_size(capsys):
    base = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                vocab_size=256, intermediate_size=128, max_position_embeddings=32768,
                sliding_window=4096)
    assert convert_hf.hf_config_to_args({**base, "model_type": "mistral"}).block_size == 4096
    assert "sliding-window" in capsys.readouterr().out
    qwen = convert_hf.hf_config_to_args({**base, "model_type": "qwen2",
                                         "use_sliding_window": False})
    assert qwen.block_size == 32768 and qwen.attention_bias
    with pytest.raises(InputError, match="max_window_layers must be an integer"):
        convert_hf.hf_config_to_args({**base, "model_type": "qwen2", "use_sliding_window": True,
                                      "max_window_layers": None})


@pytest.mark.parametrize("layer_types, max_window_layers", [
    (["full_attention", "sliding_attention"], 28), (["full_attention", "full_attention"], 0)],
    ids=["sliding-though-max_window_layers-says-none", "full-though-max_window_layers-says-all"])
def test_layer_types_a_file_gives_decide_whether_its_window_caps_the_context(layer_types, max_window_layers):
    """max_window_layers only derives the layer types a file leaves null, as transformers reads it."""
    fields = {k: v for k, v in HF_CONFIG.items() if k != "model_type"}
    fields.update(num_key_value_heads=4, use_sliding_window=True, sliding_window=64,
                  max_window_layers=max_window_layers, layer_types=layer_types)
    hf = transformers.Qwen2Config(**fields)
    args = convert_hf.hf_config_to_args({**fields, "model_type": "qwen2"})
    window = hf.sliding_window if "sliding_attention" in hf.layer_types else math.inf
    assert args.block_size == min(hf.max_position_embeddings, window)


@pytest.mark.parametrize("family", convert_hf.SUPPORTED)
def test_without_a_window_the_context_is_the_familys_default_one_as_transformers_reads_it(family):
    required = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=32, vocab_size=256,
                    intermediate_size=128, sliding_window=None)
    hf = transformers.AutoConfig.for_model(family, **required)
    assert convert_hf.hf_config_to_args({**required, "model_type": family}).block_size \
        == hf.max_position_embeddings


@pytest.mark.parametrize("layer_types", [5, "sliding_attention"], ids=["number", "string"])
def test_layer_types_that_are_not_a_list_are_refused_naming_the_key(layer_types, tmp_path, capsys):
    source = config_only_source(tmp_path / "hf", model_type="mistral", num_key_value_heads=4,
                                sliding_window=64, layer_types=layer_types)
    assert "layer_types must be a list" in run_main_expect_error(capsys, source, tmp_path / "out")


@pytest.mark.parametrize("sliding", [0, 1, 2, "unsaid"],
                         ids=["off", "from-layer-1", "from-layer-2", "from-the-default"])
@pytest.mark.parametrize("family", convert_hf.SUPPORTED)
def test_keys_a_config_leaves_out_read_as_transformers_fills_them(family, sliding):
    """A config.json of the required keys alone: the rotary base, the norm's epsilon, the context
    (a sliding window caps it), the key/value heads and head size, whether the output layer is tied,
    and a mixture's experts as transformers' own config class of the family gives them. With sliding, the file turns the
    window on (Qwen's is off by default) and gives no size for it, and its layer_types are null:
    transformers then takes its default window in the layers it derives as sliding (Qwen2's and
    Qwen3's from max_window_layers: here one of two, none, or, the file silent, from its default 28 on: none),
    so the context is capped there."""
    required = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=32, vocab_size=256,
                    intermediate_size=128)
    if sliding:
        required.update(use_sliding_window=True, layer_types=None)
    if sliding in (1, 2):
        required.update(max_window_layers=sliding)
    hf = transformers.AutoConfig.for_model(family, **required)
    args = convert_hf.hf_config_to_args({**required, "model_type": family})
    assert args.n_kv_heads == hf.num_key_value_heads
    assert args.head_dim == (getattr(hf, "head_dim", None) or 256 // 32)
    assert args.rope_base == hf.rope_parameters["rope_theta"]
    assert args.norm_eps == hf.rms_norm_eps
    assert args.tie_embeddings == hf.tie_word_embeddings
    window = getattr(hf, "sliding_window", None)
    if (not getattr(hf, "use_sliding_window", True)
            or "sliding_attention" not in (getattr(hf, "layer_types", None) or ["sliding_attention"])):
        window = None
    assert args.block_size == min(hf.max_position_embeddings, window or math.inf)
    experts = getattr(hf, "num_local_experts", getattr(hf, "num_experts", 0))
    assert (args.n_experts, args.n_active_experts) == (
        experts, getattr(hf, "num_experts_per_tok", 0) if experts else 0)
    if family == "qwen3_moe":
        assert args.intermediate_size == hf.moe_intermediate_size
        assert args.norm_topk_prob == hf.norm_topk_prob
    if experts:  # older files name the count num_experts, and the file's count wins
        older = {**required, "model_type": family, "num_experts": 16}
        assert convert_hf.hf_config_to_args(older).n_experts == 16


# ---- bad inputs ----------------------------------------------------------------------------------

def test_missing_dir_fails_cleanly(tmp_path, capsys):
    line = converter_error(capsys, "--checkpoint_dir", tmp_path / "nope")
    assert "no HF checkpoint folder" in line


def test_an_hf_folder_named_in_another_encoding_than_utf8_is_refused(hf_models, tmp_path, capsys):
    """A snapshot folder named in Latin-1 (the byte 0xff): torch.load opens files by UTF-8 names
    only, and a pytorch_model.bin in it ended in its UnicodeEncodeError's traceback."""
    hf, hf_dir = hf_models("llama-gqa")
    latin1 = tmp_path / os.fsdecode(b"hf-\xff")
    latin1.mkdir()
    shutil.copy(hf_dir / "config.json", latin1 / "config.json")
    torch.save(hf.state_dict(), latin1 / "pytorch_model.bin")
    line = run_main_expect_error(capsys, latin1, tmp_path / "out")
    assert "--hf_dir" in line and "hf-\\xff" in line and "not UTF-8" in line


def test_a_snapshot_downloaded_into_the_checkpoint_dir_is_pointed_to_hf_dir(hf_models, tmp_path,
                                                                           capsys):
    """HF's files in --checkpoint_dir itself (no hf/ beneath): the converter names --hf_dir, not
    --force (which the output folder's check would ask for) and leaves the folder as it was."""
    _, hf_dir = hf_models("llama-gqa")
    snapshot = tmp_path / "snapshot"
    shutil.copytree(hf_dir, snapshot)
    before = sorted(p.name for p in snapshot.iterdir())
    line = converter_error(capsys, "--checkpoint_dir", snapshot)
    assert "no HF checkpoint folder" in line and "--hf_dir" in line and "--force" not in line
    assert sorted(p.name for p in snapshot.iterdir()) == before


def test_unsupported_model_type_fails_cleanly(hf_models, tmp_path, capsys):
    _, hf_dir = hf_models("llama-gqa")
    bad = tmp_path / "hf"  # the default --hf_dir, inside --checkpoint_dir
    shutil.copytree(hf_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    line = converter_error(capsys, "--checkpoint_dir", tmp_path)
    assert "unsupported model_type" in line and "gpt2" in line
    assert not (tmp_path / "model.safetensors").exists()


def converter_error(capsys, *argv) -> str:
    """The converter's main(argv) in this process on bad input: exit status 1 after one `error:` line,
    which it returns (the command line itself: test_absurd_config_is_refused_before_any_tensor)."""
    capsys.readouterr()  # earlier output, such as a fixture saving an HF model
    with pytest.raises(SystemExit) as exit_info:
        convert_hf.main([str(a) for a in argv])
    assert exit_info.value.code == 1
    return assert_one_error_line(capsys.readouterr().err)


def run_main_expect_error(capsys, hf_dir: Path, out: Path) -> str:
    line = converter_error(capsys, "--checkpoint_dir", out, "--hf_dir", hf_dir)
    assert not (out / "model.safetensors").exists()
    return line


def test_missing_tensor_fails_cleanly(hf_models, tmp_path, capsys):
    _, hf_dir = hf_models("qwen2-bias")
    bad = tmp_path / "hf"
    shutil.copytree(hf_dir, bad)
    sd = load_file(bad / "model.safetensors")
    del sd["model.layers.1.self_attn.v_proj.bias"]
    save_file(sd, bad / "model.safetensors")
    line = run_main_expect_error(capsys, bad, tmp_path / "out")
    assert "model.layers.1.self_attn.v_proj.bias" in line


@pytest.mark.parametrize("family, name, shape", [
    ("llama-gqa", "self_attn.v_proj", (2, -1, 64)), ("llama-gqa", "self_attn.q_proj", (-1, 1, 64)),
    ("mixtral", "block_sparse_moe.experts.0.w1", (1, -1, 64))],
    ids=["v-in-two-blocks", "q-with-a-unit-axis", "an-experts-w1-as-a-stack-of-one"])
def test_a_projection_of_three_dimensions_is_one_error_line(family, name, shape, hf_models,
                                                            tmp_path, capsys):
    """A q, k or v piece, or one expert's matrix, is a matrix: one of 3 dimensions is refused by
    its shape, not left to fail where the pieces are joined."""
    _, hf_dir = hf_models(family)
    bad = tmp_path / "hf"
    shutil.copytree(hf_dir, bad)
    sd = load_file(bad / "model.safetensors")
    key = f"model.layers.0.{name}.weight"
    sd[key] = sd[key].reshape(shape).contiguous()
    save_file(sd, bad / "model.safetensors")
    line = run_main_expect_error(capsys, bad, tmp_path / "out")
    assert key in line and "cannot be part of" in line


def test_no_weights_fails_cleanly(hf_models, tmp_path, capsys):
    _, hf_dir = hf_models("llama-gqa")
    bad = tmp_path / "hf"
    bad.mkdir()
    shutil.copy(hf_dir / "config.json", bad / "config.json")
    assert "no weights" in run_main_expect_error(capsys, bad, tmp_path / "out")


def test_model_parallel_consolidated_shards_refused(hf_models, tmp_path, capsys):
    hf, _ = hf_models("llama-gqa")
    write_meta_checkpoint(hf, tmp_path / "hf")
    original = tmp_path / "hf/original"
    shutil.copy(original / "consolidated.00.pth", original / "consolidated.01.pth")
    assert "model-parallel" in run_main_expect_error(capsys, tmp_path / "hf", tmp_path / "out")


def test_a_converted_folder_or_the_output_itself_as_the_hf_folder_is_refused_as_such(
        smollm2_checkpoint, tmp_path, capsys):
    """A gpt-blitz checkpoint given as --hf_dir is named as converted already; --hf_dir equal to
    --checkpoint_dir is refused as that, even where the folder holds a checkpoint (which --force
    would allow replacing)."""
    line = run_main_expect_error(capsys, smollm2_checkpoint, tmp_path / "out")
    assert "gpt-blitz config" in line and "converted already" in line
    out = shutil.copytree(smollm2_checkpoint, tmp_path / "ckpt",
                          ignore=shutil.ignore_patterns("*.safetensors"))
    for flags in ((), ("--force",)):
        capsys.readouterr()
        with pytest.raises(SystemExit):
            run_converter(out, out, *flags)
        assert_one_error_line(capsys.readouterr().err, "--hf_dir must differ")


def config_only_source(folder: Path, **changes) -> Path:
    """An HF snapshot with the tiny config.json, changed, and a junk weights file: a refusal of the
    config must come before any tensor is read, or the junk would give another error."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({**HF_CONFIG, **changes}))
    (folder / "model.safetensors").write_bytes(b"not weights")
    return folder


@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
@pytest.mark.parametrize("rope_type", ["yarn", "dynamic", "longrope"])
def test_unsupported_rope_type_is_refused(key, rope_type, tmp_path, capsys):
    # transformers < 5 writes rope_scaling, older files with "type"; transformers 5 rope_parameters
    rope = {"type" if key == "rope_scaling" else "rope_type": rope_type, "factor": 4.0,
            "original_max_position_embeddings": 64}
    if rope_type == "longrope":
        rope.update(short_factor=[1.0] * 8, long_factor=[4.0] * 8)
    source = config_only_source(tmp_path / "hf", **{key: rope})
    line = run_main_expect_error(capsys, source, tmp_path / "out")
    assert f"{rope_type!r}" in line and "config.json" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("changes, words", [
    (dict(attention_bias=True), "attention_bias / mlp_bias on a llama model"),
    (dict(mlp_bias=True), "attention_bias / mlp_bias on a llama model"),
    (dict(model_type="qwen3", attention_bias=True), "attention_bias / mlp_bias on a qwen3 model"),
    (dict(model_type="qwen2", mlp_bias=True), "attention_bias / mlp_bias on a qwen2 model"),
    (dict(model_type="qwen3_moe", mlp_only_layers=[1]), "dense layers among the experts'"),
    (dict(model_type="qwen3_moe", decoder_sparse_step=2), "dense layers among the experts'"),
], ids=["llama-attention-bias", "llama-mlp-bias", "qwen3-attention-bias", "qwen2-mlp-bias",
        "qwen3-moe-mlp-only-layers", "qwen3-moe-sparse-step"])
def test_weights_model_py_has_no_place_for_are_refused_from_the_config(changes, words, tmp_path,
                                                                       capsys):
    """A bias on o_proj or the feed-forward (Llama's and Qwen3's attention_bias, any mlp_bias), or
    a Qwen3-MoE that keeps some layers dense: refused from config.json, before any tensor."""
    source = config_only_source(tmp_path / "hf", **changes)
    line = run_main_expect_error(capsys, source, tmp_path / "out")
    assert words in line and "config.json" in line
    assert not (tmp_path / "out").exists()


def test_absurd_config_is_refused_before_any_tensor(tmp_path):
    """The real command line (the other refusals run the converter's main() in this process), in a
    process of its own: a billion layers built before the check would not end soon."""
    source = config_only_source(tmp_path / "hf", num_hidden_layers=1_000_000_000)
    start = time.perf_counter()
    result = run_script(SCRIPT, "--checkpoint_dir", tmp_path / "out", "--hf_dir", source,
                        timeout=60)
    assert result.returncode == 1
    assert_one_error_line(result.stderr, str(source / "config.json"))
    print(f"refused in {time.perf_counter() - start:.1f} s, interpreter start included")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("weights", [b"not weights", b""], ids=["text", "empty"])
def test_a_damaged_safetensors_shard_is_one_error_line(weights, tmp_path, capsys):
    source = config_only_source(tmp_path / "hf")  # a good config: the weights are read
    (source / "model.safetensors").write_bytes(weights)
    line = run_main_expect_error(capsys, source, tmp_path / "out")
    assert "cannot read weights" in line and "model.safetensors" in line


def test_a_bug_inside_the_safetensors_shard_reader_keeps_its_traceback(tmp_path, monkeypatch):
    save_file({"w": torch.ones(2)}, tmp_path / "model.safetensors")

    def broken(*args, **kwargs):
        raise TypeError("a bug inside safe_open")
    monkeypatch.setattr("safetensors.safe_open", broken)
    with pytest.raises(TypeError, match="a bug inside safe_open"):
        convert_hf.open_shard(tmp_path / "model.safetensors")


@pytest.mark.parametrize("config, word", [
    (dict(num_attention_heads=0), "num_attention_heads"),
    (dict(hidden_size="64"), "hidden_size"),
    (dict(tie_word_embeddings="yes"), "tie_embeddings"),
    (dict(rope_scaling="llama3"), "rope_scaling"),
    (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0}), "low_freq_factor"),
], ids=["zero-heads", "string-size", "string-bool", "rope-not-object", "llama3-incomplete"])
def test_bad_config_values_are_one_line(config, word, tmp_path, capsys):
    source = config_only_source(tmp_path / "hf", **config)
    line = run_main_expect_error(capsys, source, tmp_path / "out")
    assert word in line and "config.json" in line


def test_converting_again_needs_force_and_replaces_the_whole_set(hf_models, tmp_path, capsys):
    _, hf_dir = hf_models("llama-tied")
    out = tmp_path / "ckpt"
    source = Path(shutil.copytree(hf_dir, out / "hf"))  # the default --hf_dir, inside the output

    def contents(folder: Path) -> dict:
        return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}

    source_files = contents(source)
    convert_hf.main(["--checkpoint_dir", str(out)])
    converted = contents(out)
    assert {"config.json", "model.safetensors"} <= set(converted)

    capsys.readouterr()  # what saving the HF model printed
    with pytest.raises(SystemExit) as exit_info:
        convert_hf.main(["--checkpoint_dir", str(out)])
    assert exit_info.value.code == 1
    assert_one_error_line(capsys.readouterr().err, "--force")
    assert contents(out) == converted

    (out / "chat_template.jinja").write_text("{{ stale }}")  # the source has none
    (out / "model_int8.pth").write_bytes(b"a quantized copy of the old weights")
    (out / "model_int8.json").write_text("{}")  # its sidecar: quantize.py's output, part of the set
    (out / "draft.pth").write_bytes(b"the user's own file, which no sidecar describes")
    convert_hf.main(["--checkpoint_dir", str(out), "--force"])
    assert sorted(p.name for p in out.iterdir()) == sorted([*converted, "hf", "draft.pth"])
    (out / "draft.pth").unlink()
    assert contents(out) == converted and contents(source) == source_files
    load(out)


@pytest.mark.parametrize("family", ["qwen2-bias", "mixtral", "qwen3-moe"])
def test_prefill_then_decode_matches_transformers(family, hf_models, tmp_path):
    """The KV-cache path generation uses: prefill part of the sequence, then one token per
    forward (for a mixture of experts: the grouped form, then the gathered one)."""
    hf, hf_dir = hf_models(family)
    model = load(run_converter(hf_dir, tmp_path / "ckpt"))
    idx = torch.randint(0, TINY["vocab_size"], (B, T), generator=torch.Generator().manual_seed(2))
    prefill = 100
    with torch.no_grad():
        model.setup_caches(B, T)
        steps = [model(idx[:, :prefill], torch.arange(prefill))]
        steps += [model(idx[:, t:t + 1], torch.tensor([t])) for t in range(prefill, T)]
    delta = (torch.cat(steps, dim=1) - hf_logits(hf, idx)).abs().max().item()
    assert delta <= TOL, f"max |delta| {delta:.2e}"


@pytest.mark.parametrize("family", ["llama-gqa", "qwen2-bias", "llama3.1-rope-scaling", "qwen3",
                                    "mixtral", "qwen3-moe"])
def test_greedy_generation_matches_transformers_generate(family, hf_models, tmp_path):
    from generate import Sampling, generate
    hf, hf_dir = hf_models(family)
    model = load(run_converter(hf_dir, tmp_path / "ckpt"), torch.float32)
    generator = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, TINY["vocab_size"], (1, 9), generator=generator)
    # No end-of-sequence id on either side: both must run all 32 steps (min_new_tokens would instead
    # make HF suppress its EOS id, changing its argmax wherever that id wins).
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32,
                          do_sample=False, pad_token_id=0)[0, 9:].tolist()
    model.setup_caches(1, 9 + 32)
    ours = generate(model, [prompt[0].tolist()], 32, Sampling(temperature=0)).tokens[0]
    assert len(ref) == 32
    assert ours == ref


def test_experts_that_the_config_does_not_describe_are_refused(hf_models, tmp_path, capsys):
    """A Mixtral checkpoint whose config.json says llama: its experts are not a dense FFN."""
    _, hf_dir = hf_models("mixtral")
    bad = tmp_path / "hf"
    shutil.copytree(hf_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    line = run_main_expect_error(capsys, bad, tmp_path / "out")
    assert "unexpected tensor model.layers.0." in line and "no such weight" in line
