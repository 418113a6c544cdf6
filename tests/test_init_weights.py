"""Transformer.init_weights(): a model built on the meta device (no memory), to_empty()'d and
initialised equals an ordinarily built one at the same seed, for every rung (what FSDP relies on)."""
import pytest
import torch

from llmlab.model import Transformer
from llmlab.presets import PRESETS, preset_config


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_meta_build_then_init_weights_equals_plain_build(preset):
    config = preset_config(preset, vocab_size=50, n_layer=2, n_head=2, n_embd=16, block_size=8)
    torch.manual_seed(7)
    plain = Transformer(config)
    after_plain = torch.rand(3)  # the RNG continues from the same state too (dropout draws next)
    torch.manual_seed(7)
    with torch.device("meta"):
        meta = Transformer(config)
    assert all(p.is_meta for p in meta.parameters())
    meta.to_empty(device="cpu")
    meta.init_weights()
    assert torch.equal(torch.rand(3), after_plain)
    ref, got = plain.state_dict(), meta.state_dict()
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    for (name, a), (_, b) in zip(plain.named_buffers(), meta.named_buffers()):  # rope / sinusoidal tables
        assert torch.equal(a, b), name
    if config.tie_embeddings:  # to_empty() unties; init_weights() ties again
        assert meta.lm_head.weight is meta.tok_emb.weight
    x = torch.randint(50, (2, 8))
    assert torch.equal(plain(x), meta(x))


def test_plain_build_weights_are_the_pre_init_weights_ones():
    """Construction draws the same numbers as before init_weights() existed: nn defaults, then
    GPT-2's N(0, 0.02) (a reference rebuilt by hand from torch's RNG for the learned positions)."""
    config = preset_config("flash", vocab_size=50, n_layer=1, n_head=2, n_embd=16, block_size=8)
    torch.manual_seed(3)
    model = Transformer(config)
    torch.manual_seed(3)
    torch.nn.Embedding(50, 16)  # the token table's default init is drawn first (and redrawn later)
    pos = torch.randn(8, 16) * 0.02
    assert torch.equal(model.pos.weight, pos)
