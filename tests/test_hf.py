"""Hugging Face interop: logits parity both ways (GPT-2, Llama MHA/GQA/MQA, Qwen2), round trips,
greedy generation against HF `generate`, and clear errors for what does not map."""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import llmlab  # noqa: E402
from llmlab.config import ModelConfig  # noqa: E402
from llmlab.errors import LlmlabError  # noqa: E402
from llmlab.hf import convert_from_hf, convert_to_hf, from_hf, to_hf  # noqa: E402

V, T, D, H, L = 96, 64, 64, 4, 2  # vocab, block, width, heads, layers
TOL = 1e-4
THETA, EPS = 500000.0, 3e-5  # non-default on purpose: a dropped field would change the logits


def randomize(module: torch.nn.Module, seed: int, std: float = 0.2) -> None:
    """Default inits are tiny (and biases zero); large random weights make parity meaningful.
    1-D weights (norm gains) stay near 1 so activations keep a sane scale."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():  # a tied head is visited once
            noise = torch.randn(p.shape, generator=g)
            if p.dim() == 1 and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(std * noise)


def ids(seed: int = 0, b: int = 2, t: int = T) -> torch.Tensor:
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def hf_logits(m, x):
    return m(input_ids=x).logits


@torch.no_grad()
def our_logits(m, x):
    return m(x)


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def hf_gpt2(tie=True, act="gelu_new", seed=0):
    cfg = GPT2Config(vocab_size=V, n_positions=T, n_embd=D, n_layer=L, n_head=H, activation_function=act,
                     layer_norm_epsilon=EPS, tie_word_embeddings=tie, bos_token_id=None, eos_token_id=None)
    m = GPT2LMHeadModel(cfg)
    randomize(m, seed)
    return m.eval()


def hf_llama(kv=H, tie=False, qwen=False, seed=0):
    kw = dict(vocab_size=V, hidden_size=D, intermediate_size=96, num_hidden_layers=L, num_attention_heads=H,
              num_key_value_heads=kv, max_position_embeddings=T, rms_norm_eps=EPS, tie_word_embeddings=tie,
              rope_parameters={"rope_type": "default", "rope_theta": THETA},
              bos_token_id=None, eos_token_id=None, pad_token_id=None)
    m = Qwen2ForCausalLM(Qwen2Config(**kw)) if qwen else LlamaForCausalLM(LlamaConfig(**kw))
    randomize(m, seed)
    return m.eval()


def llama_config(kv=H, tie=False, qkv_bias=None, **kw) -> ModelConfig:
    return ModelConfig(vocab_size=V, block_size=T, n_layer=L, n_head=H, n_kv_head=kv, n_embd=D,
                       intermediate_size=96, bias=False, qkv_bias=qkv_bias, tie_embeddings=tie,
                       position="rope", rope_theta=THETA, norm="rmsnorm", norm_eps=EPS, mlp="swiglu", **kw)


def ours(config: ModelConfig, seed=1):
    m = llmlab.Transformer(config)
    randomize(m, seed)
    return m.eval()


def load_hf(path):
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


# ---- GPT-2 ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("tie", [True, False])
def test_gpt2_from_hf_parity(tmp_path, tie):
    hf = hf_gpt2(tie=tie)
    hf.save_pretrained(tmp_path)
    x = ids()
    ref = hf_logits(hf, x)
    for m in (from_hf(tmp_path), from_hf(hf), from_hf(tmp_path, attn_backend="manual")):
        assert not m.training and m.tok_emb.weight.dtype == torch.float32
        c = m.config
        assert (c.position, c.norm, c.mlp, c.bias, c.tie_embeddings, c.norm_eps) == \
               ("learned", "layernorm", "gelu_tanh", True, tie, EPS)
        assert max_diff(our_logits(m, x), ref) <= TOL
    assert (m.lm_head.weight is m.tok_emb.weight) == tie


@pytest.mark.parametrize("preset,mlp", [("flash", "gelu_tanh"), ("basic", "gelu"), ("basic", "gelu_tanh")])
def test_gpt2_to_hf_parity(tmp_path, preset, mlp):
    m = ours(llmlab.preset_config(preset, vocab_size=V, n_layer=L, n_head=H, n_embd=D, block_size=T,
                                  mlp=mlp, norm_eps=EPS))
    out = to_hf(m, tmp_path / "hf")
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    hf = load_hf(out)
    assert hf.config.model_type == "gpt2"
    assert hf.config.activation_function == {"gelu_tanh": "gelu_new", "gelu": "gelu"}[mlp]
    x = ids(1)
    assert max_diff(hf_logits(hf, x), our_logits(m, x)) <= TOL


def test_gpt2_without_biases_exports_with_zero_biases(tmp_path):
    m = ours(llmlab.preset_config("flash", vocab_size=V, n_layer=L, n_head=H, n_embd=D, block_size=T, bias=False))
    hf = load_hf(to_hf(m, tmp_path))
    x = ids(2)
    assert max_diff(hf_logits(hf, x), our_logits(m, x)) <= TOL
    assert hf.transformer.h[0].attn.c_attn.bias.abs().max() == 0


# ---- Llama / Qwen2 --------------------------------------------------------------------------------
LLAMA_CASES = [(H, False), (2, False), (1, False), (H, True), (2, True), (1, True)]  # MHA, GQA, MQA x tie


@pytest.mark.parametrize("kv,tie", LLAMA_CASES)
def test_llama_from_hf_parity(tmp_path, kv, tie):
    hf = hf_llama(kv=kv, tie=tie)
    hf.save_pretrained(tmp_path)
    m = from_hf(tmp_path)
    c = m.config
    assert (c.kv_heads, c.tie_embeddings, c.rope_theta, c.norm_eps, c.ffn_size, c.has_qkv_bias) == \
           (kv, tie, THETA, EPS, 96, False)
    x = ids(3)
    ref = hf_logits(hf, x)
    assert max_diff(our_logits(m, x), ref) <= TOL
    assert max_diff(our_logits(from_hf(hf, attn_backend="manual"), x), ref) <= TOL


@pytest.mark.parametrize("kv,tie", LLAMA_CASES)
def test_llama_to_hf_parity(tmp_path, kv, tie):
    m = ours(llama_config(kv=kv, tie=tie))
    hf = load_hf(to_hf(m, tmp_path))
    assert hf.config.model_type == "llama" and hf.config.num_key_value_heads == kv
    x = ids(4)
    assert max_diff(hf_logits(hf, x), our_logits(m, x)) <= TOL


def test_qwen2_parity_both_ways(tmp_path):
    hf = hf_llama(kv=2, qwen=True)
    hf.save_pretrained(tmp_path / "src")
    m = from_hf(tmp_path / "src")
    assert m.config.has_qkv_bias and not m.config.bias
    x = ids(5)
    assert max_diff(our_logits(m, x), hf_logits(hf, x)) <= TOL

    m2 = ours(llama_config(kv=2, qkv_bias=True), seed=7)
    hf2 = load_hf(to_hf(m2, tmp_path / "out"))
    assert hf2.config.model_type == "qwen2"
    assert max_diff(hf_logits(hf2, x), our_logits(m2, x)) <= TOL


@pytest.mark.parametrize("qkv_bias", [None, True], ids=["llama", "qwen2"])
def test_non_default_head_dim_parity(tmp_path, qkv_bias):
    m = ours(llama_config(kv=2, qkv_bias=qkv_bias, head_dim=24))
    hf = load_hf(to_hf(m, tmp_path))
    assert hf.model.layers[0].self_attn.q_proj.weight.shape == (H * 24, D)
    x = ids(6)
    assert max_diff(hf_logits(hf, x), our_logits(m, x)) <= TOL
    assert from_hf(hf).config.head_size == 24


def test_llama_with_biases_maps_to_llama_attention_and_mlp_bias(tmp_path):
    m = ours(llama_config(kv=2).replace(bias=True))
    hf = load_hf(to_hf(m, tmp_path))
    assert hf.config.model_type == "llama" and hf.config.attention_bias and hf.config.mlp_bias
    x = ids(6)
    assert max_diff(hf_logits(hf, x), our_logits(m, x)) <= TOL


def test_rope_theta_from_legacy_configs():
    """Older configs keep rope_theta (and rope_scaling) at top level; 5.x moves it into rope_parameters."""
    from types import SimpleNamespace

    from llmlab.hf import config_from_hf

    legacy = dict(vocab_size=V, hidden_size=D, intermediate_size=96, num_hidden_layers=L, num_attention_heads=H,
                  num_key_value_heads=2, max_position_embeddings=T, rms_norm_eps=EPS, rope_theta=THETA,
                  rope_scaling=None, tie_word_embeddings=False, hidden_act="silu")
    assert config_from_hf(LlamaConfig.from_dict({**legacy, "model_type": "llama"})).rope_theta == THETA
    old = SimpleNamespace(model_type="llama", head_dim=None, attention_bias=False, mlp_bias=False, **legacy)
    cfg = config_from_hf(old)
    assert (cfg.rope_theta, cfg.kv_heads, cfg.norm_eps) == (THETA, 2, EPS)
    with pytest.raises(LlmlabError, match="dynamic"):
        config_from_hf(SimpleNamespace(**{**vars(old), "rope_scaling": {"type": "dynamic", "factor": 2.0}}))


def test_parity_check_is_sensitive(tmp_path):
    """The tolerance would catch a mapping slip: swapped heads or a lost rope theta / eps."""
    hf = hf_llama(kv=2)
    x = ids(7)
    ref = hf_logits(hf, x)
    m = from_hf(hf)
    assert max_diff(our_logits(m, x), ref) <= TOL
    hd = D // H
    with torch.no_grad():  # swap query heads 0 and 1 inside the fused qkv
        w = m.blocks[0].attn.qkv.weight
        w[: 2 * hd] = torch.cat([w[hd: 2 * hd], w[:hd]]).clone()
    assert max_diff(our_logits(m, x), ref) > 1e-2
    assert max_diff(our_logits(from_hf(hf, rope_theta=10000.0), x), ref) > 1e-2
    assert max_diff(our_logits(from_hf(hf, norm_eps=1e-1), x), ref) > 1e-2


# ---- round trips ----------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [
    llmlab.preset_config("flash", vocab_size=V, n_layer=L, n_head=H, n_embd=D, block_size=T, mlp="gelu_tanh"),
    llmlab.preset_config("basic", vocab_size=V, n_layer=L, n_head=H, n_embd=D, block_size=T, tie_embeddings=False),
    llama_config(kv=2, tie=True),
    llama_config(kv=1, tie=False, qkv_bias=True),
    llama_config(kv=2, head_dim=24).replace(bias=True),
], ids=["gpt2", "gpt2-untied", "llama-gqa-tied", "qwen2-mqa", "llama-bias-headdim"])
def test_round_trip_state_dict_identical(tmp_path, config):
    m = ours(config)
    back = from_hf(to_hf(m, tmp_path))
    a, b = m.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    shape = ("vocab_size", "block_size", "n_layer", "n_head", "kv_heads", "head_size", "ffn_size", "bias",
             "has_qkv_bias", "tie_embeddings", "position", "rope_theta", "norm", "norm_eps", "mlp")
    assert [getattr(back.config, f) for f in shape] == [getattr(m.config, f) for f in shape]


# ---- greedy generation ----------------------------------------------------------------------------
def hf_greedy(hf, idx, n):
    with torch.no_grad():
        return hf.generate(idx, attention_mask=torch.ones_like(idx), do_sample=False, max_new_tokens=n,
                           min_new_tokens=n, eos_token_id=None, pad_token_id=0)


@pytest.mark.parametrize("arch", ["gpt2", "llama-gqa"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_llmlab_generate_greedy_matches_hf(arch, use_cache):
    from llmlab import generate

    hf = hf_gpt2(seed=4) if arch == "gpt2" else hf_llama(kv=2, seed=4)
    prompt = ids(9, b=1, t=8)
    ref = hf_greedy(hf, prompt, 32)
    assert ref.shape == (1, 40)
    assert torch.equal(generate(from_hf(hf), prompt, 32, temperature=0, use_cache=use_cache), ref)


# ---- errors ---------------------------------------------------------------------------------------
def one_line_error(fn, *args, match=None, **kw):
    with pytest.raises(LlmlabError, match=match) as e:
        fn(*args, **kw)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("config,match", [
    (ModelConfig(vocab_size=V, n_layer=1, n_embd=D, position="sinusoidal"), "position='sinusoidal'"),
    (ModelConfig(vocab_size=V, n_layer=1, n_embd=D, norm="rmsnorm"), "norm='rmsnorm'"),
    (ModelConfig(vocab_size=V, n_layer=1, n_embd=D, position="rope", mlp="gelu"), "mlp='gelu'"),
    (ModelConfig(vocab_size=V, n_layer=1, n_embd=D, position="none"), "position='none'"),
    (ModelConfig(vocab_size=V, n_layer=1, n_embd=D, n_kv_head=2), "n_kv_head"),
])
def test_to_hf_unsupported_config(tmp_path, config, match):
    one_line_error(to_hf, llmlab.Transformer(config), tmp_path / "out", match=match)
    assert not (tmp_path / "out").exists()


def test_from_hf_unsupported_models(tmp_path):
    def cfg_dir(name, cfg):
        d = tmp_path / name
        cfg.save_pretrained(d)
        return d

    small = dict(vocab_size=V, hidden_size=D, intermediate_size=96, num_hidden_layers=1, num_attention_heads=H)
    one_line_error(from_hf, cfg_dir("relu", GPT2Config(n_embd=D, n_layer=1, n_head=H, activation_function="relu")),
                   match="activation")
    one_line_error(from_hf, cfg_dir("scaled", LlamaConfig(
        **small, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": THETA})), match="RoPE scaling")
    one_line_error(from_hf, cfg_dir("sliding", Qwen2Config(**small, use_sliding_window=True, sliding_window=16,
                                                           max_window_layers=0)), match="sliding")
    one_line_error(from_hf, cfg_dir("mistral", transformers.MistralConfig(**small)), match="model_type 'mistral'")
    one_line_error(from_hf, cfg_dir("gelu_llama", LlamaConfig(**small, hidden_act="gelu")), match="activation")


def test_from_hf_bad_directories(tmp_path):
    one_line_error(from_hf, tmp_path / "nope", match="not a directory")
    one_line_error(from_hf, tmp_path, match="no config.json")
    pickled = tmp_path / "pickled"
    hf_gpt2().config.save_pretrained(pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    one_line_error(from_hf, pickled, match="safetensors")
    broken = tmp_path / "broken"
    hf_gpt2().save_pretrained(broken)
    (broken / "model.safetensors").write_bytes(b"truncated")
    one_line_error(from_hf, broken)
    run = tmp_path / "run"
    llmlab.checkpoint.save_checkpoint(run / "last", ours(llama_config()))
    one_line_error(from_hf, run / "last", match="llmlab checkpoint")
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    one_line_error(from_hf, tmp_path / "garbage")
    one_line_error(from_hf, object())
    one_line_error(from_hf, transformers.GPT2Model(hf_gpt2().config), match="ForCausalLM")


def test_from_hf_override_that_changes_shapes(tmp_path):
    one_line_error(from_hf, hf_llama(kv=2), n_kv_head=4, match="shape")


# ---- CLI helpers ----------------------------------------------------------------------------------
def test_convert_helpers_round_trip_with_tokenizer(tmp_path):
    from llmlab.tokenizer import BPETokenizer, load_tokenizer

    tok = BPETokenizer.train("the quick brown fox jumps over the lazy dog. " * 20, vocab_size=300)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=tok.vocab_size, n_positions=T, n_embd=D, n_layer=L, n_head=H,
                                    bos_token_id=None, eos_token_id=None))
    randomize(hf, 11)
    hf.eval().save_pretrained(tmp_path / "hf")
    tok.save(tmp_path / "hf")  # a plain HF tokenizers file

    last = convert_from_hf(tmp_path / "hf", tmp_path / "run")
    assert last == tmp_path / "run" / "last"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in last.iterdir()}
    assert load_tokenizer(last).encode("the lazy fox") == tok.encode("the lazy fox")
    m = llmlab.load(tmp_path / "run")
    x = torch.randint(0, tok.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    assert max_diff(our_logits(m, x), hf_logits(hf, x)) <= TOL

    out = convert_to_hf(tmp_path / "run", tmp_path / "back")
    assert max_diff(hf_logits(load_hf(out), x), hf_logits(hf, x)) <= TOL
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert hf_tok("the lazy fox")["input_ids"] == tok.encode("the lazy fox")
