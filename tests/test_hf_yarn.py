"""YaRN RoPE (llmlab.model.yarn), as real DeepSeek-V2/V3 checkpoints ship it: logits equal
transformers' (Llama and DeepSeek-V3 with MoE, with and without mscale), at positions past the
pretraining context where the stretch shows, both conversion directions."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_hf import ids, max_diff, randomize  # noqa: E402
from test_hf_deepseek_moe import hf_moe, logits  # noqa: E402

from llmlab.hf import from_hf, to_hf  # noqa: E402

TOL = 1e-4
YARN = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32, beta_fast=32.0, beta_slow=1.0)


def hf_llama(params: dict):
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   rope_parameters={"rope_theta": 10000.0, **params},
                                   bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = transformers.LlamaForCausalLM(cfg).eval()
    randomize(model, 0, std=0.1)
    return model


CASES = {
    "llama": lambda: hf_llama(YARN),
    "llama-mscale": lambda: hf_llama(YARN | dict(mscale=0.707, mscale_all_dim=1.0)),
    "deepseek-v3-mscale": lambda: hf_moe(rope_parameters={"rope_theta": 50000.0, **YARN, "mscale": 1.0,
                                                          "mscale_all_dim": 1.0}),
    "deepseek-v3-no-mscale": lambda: hf_moe(rope_parameters={"rope_theta": 50000.0, **YARN}),
    "deepseek-v2-mscale": lambda: hf_moe(arch="deepseek_v2", rope_parameters={"rope_theta": 50000.0, **YARN,
                                                                              "mscale": 0.707, "mscale_all_dim": 0.707}),
}


@pytest.mark.parametrize("case", CASES)
def test_yarn_logits_equal_transformers_both_ways(case, tmp_path):
    hf = CASES[case]()
    x = ids(1, b=1, t=100)  # past the 32-token pretraining context: the stretched frequencies matter
    ref = logits(hf, x)
    m = from_hf(hf)
    assert m.config.rope_scaling == "yarn" and m.config.rope_factor == 4.0
    assert max_diff(logits(m, x), ref) <= TOL * ref.abs().max()
    back = transformers.AutoModelForCausalLM.from_pretrained(str(to_hf(m, tmp_path / "hf")), dtype=torch.float32)
    assert max_diff(logits(back.eval(), x), ref) <= TOL * ref.abs().max()


def test_yarn_is_what_makes_them_equal():
    """The same weights read as plain RoPE give other logits past the pretraining context."""
    hf = CASES["deepseek-v3-mscale"]()
    x = ids(1, b=1, t=100)
    plain = from_hf(hf, rope_scaling=None, rope_factor=None, rope_original_positions=None, rope_mscale=0.0,
                    rope_mscale_all_dim=0.0)
    assert max_diff(logits(plain, x), logits(hf, x)) > 1e-2


@pytest.mark.parametrize("cache", ["dense", "paged"])
def test_yarn_greedy_tokens_equal_transformers_through_the_caches(cache):
    """The cached (absorbed) MLA step carries YaRN's extra score factor too."""
    from test_hf import hf_greedy

    import llmlab

    hf = CASES["deepseek-v3-mscale"]()
    prompt = ids(2, b=1, t=40)
    ref = hf_greedy(hf, prompt, 24)
    got = llmlab.generate(from_hf(hf), prompt, 24, temperature=0, cache=cache)
    assert torch.equal(got, ref)
