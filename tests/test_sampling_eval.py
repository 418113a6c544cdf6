"""Sampling and eval against references computed here, independently of the code under test:
the exact distribution top-k + top-p + temperature sample from, stop tokens in a batch, ragged
prompts' logits against each prompt alone, chunked prefill, and `llmlab eval`'s loss."""
from __future__ import annotations

import json
import math

import pytest
import torch

from llmlab import generate
from llmlab.checkpoint import save_checkpoint
from llmlab.cli import main
from llmlab.generation import _cached_logits, _left_pad, sample_next, stream
from llmlab.presets import PRESETS
from llmlab.tokenizer import ByteTokenizer

from conftest import tiny_model


# ---- the distribution sampled from ------------------------------------------------------------
def hand_filtered_probs(logits: list[float], temperature: float, k: int, p: float) -> list[float]:
    """Temperature, then keep the k largest, then the smallest most-likely prefix of those whose
    (renormalised) mass reaches p; renormalise. Plain Python, no torch."""
    scaled = [x / temperature for x in logits]
    top = sorted(range(len(scaled)), key=lambda i: -scaled[i])[:k]
    z = sum(math.exp(scaled[i]) for i in top)
    kept, mass = [], 0.0
    for i in top:  # already most likely first
        kept.append(i)
        mass += math.exp(scaled[i]) / z
        if mass >= p:
            break
    z2 = sum(math.exp(scaled[i]) for i in kept)
    return [math.exp(scaled[i]) / z2 if i in kept else 0.0 for i in range(len(logits))]


@pytest.mark.parametrize("temperature, k, p", [(0.7, 5, 0.8), (1.3, 3, 0.5), (0.5, 8, 0.95), (2.0, 6, 1.0)])
def test_top_k_and_top_p_together_sample_the_hand_filtered_distribution(monkeypatch, temperature, k, p):
    logits = [2.0, -1.0, 0.5, 3.1, 1.7, -0.3, 2.6, 0.0, 1.1, -2.2]
    seen = []
    real = torch.multinomial

    def spy(probs, *a, **kw):
        seen.append(probs.clone())
        return real(probs, *a, **kw)

    monkeypatch.setattr(torch, "multinomial", spy)
    sample_next(torch.tensor([logits]), temperature, top_k=k, top_p=p, generator=torch.Generator().manual_seed(0))
    want = torch.tensor(hand_filtered_probs(logits, temperature, k, p), dtype=torch.float64)
    assert len(seen) == 1
    torch.testing.assert_close(seen[0][0].double(), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("p, kept", [(0.25, 1), (0.5, 2), (0.75, 3), (0.7, 3)])
def test_top_p_keeps_the_smallest_set_reaching_p_exactly(monkeypatch, p, kept):
    """Four equal logits: probabilities 0.25 each, exact in binary, so the mass before the
    (kept+1)-th token equals p exactly. The smallest set whose mass reaches p has `kept` tokens;
    the token whose preceding mass is already p is dropped (a `>` for `>=` keeps it)."""
    seen = []
    real = torch.multinomial
    monkeypatch.setattr(torch, "multinomial", lambda probs, *a, **kw: seen.append(probs.clone()) or real(probs, *a, **kw))
    sample_next(torch.zeros(1, 4), 1.0, top_p=p, generator=torch.Generator().manual_seed(0))
    probs = seen[0][0]
    assert int((probs > 0).sum()) == kept
    torch.testing.assert_close(probs[probs > 0], torch.full((kept,), 1.0 / kept))


# ---- stop tokens in a batch ---------------------------------------------------------------------
def test_stop_tokens_with_a_batch():
    model = tiny_model(preset="kv_cache").eval()
    idx = torch.randint(0, 97, (3, 5), generator=torch.Generator().manual_seed(4))
    free = generate(model, idx, 12, temperature=0)[:, 5:]  # no stop tokens
    stop = int(free[0, 3])  # row 0 stops at its 4th new token; the others whenever (if ever) they emit it
    steps = torch.stack(list(stream(model, idx, 12, temperature=0, stop_tokens=[stop])), 1)
    first = [next((j for j, t in enumerate(row.tolist()) if t == stop), None) for row in free]
    for r in range(3):
        end = first[r] if first[r] is not None else steps.shape[1] - 1
        assert steps[r, : end + 1].tolist() == free[r, : end + 1].tolist()  # unchanged until it stops
        assert (steps[r, end:] == stop).all() if first[r] is not None else True  # then repeats the stop
    # the stream ends once every row has stopped, else after max_new_tokens
    want_len = 12 if None in first else max(first) + 1
    assert steps.shape[1] == want_len


# ---- ragged prompts ---------------------------------------------------------------------------
@pytest.mark.parametrize("position", ["learned", "sinusoidal", "rope", "none"])
def test_ragged_prefill_logits_equal_each_prompt_alone(position):
    """Each row's logits, at prefill and at every decode step, equal that prompt run alone (a
    padding slot seen by a real token, or a position shifted by the padding, changes them)."""
    model = tiny_model(preset="kv_cache", position=position).eval()
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [42], [9, 9, 9, 9, 9, 9]]
    idx, pad = _left_pad(prompts, 97, "cpu")
    steps = _cached_logits(model, idx, pad, 6)
    rows = [torch.tensor([p]) for p in prompts]
    with torch.no_grad():
        logits = next(steps)
        for step in range(6):
            for r, row in enumerate(rows):
                alone = model(row)[0, -1]
                assert (logits[r] - alone).abs().max() <= 1e-5, (position, step, r)
            nxt = torch.tensor([(7 * step + 3 * r) % 97 for r in range(len(prompts))])
            rows = [torch.cat([row, nxt[r:r + 1, None]], 1) for r, row in enumerate(rows)]
            logits = steps.send(nxt)
    steps.close()


@pytest.mark.parametrize("position", ["learned", "sinusoidal"])
def test_ragged_generation_equals_each_alone(position):
    model = tiny_model(preset="kv_cache", position=position).eval()
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [42]]
    batched = generate(model, prompts, 10, temperature=0)
    for p, row in zip(prompts, batched):
        assert torch.equal(row, generate(model, torch.tensor([p]), 10, temperature=0)[0])


# ---- chunked prefill ----------------------------------------------------------------------------
@pytest.mark.parametrize("preset", list(PRESETS))
def test_chunked_prefill_equals_one_full_forward(preset):
    model = tiny_model(preset=preset).eval()
    idx = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    cache = model.new_cache(2, 32)
    out, start = [], 0
    with torch.no_grad():
        full = model(idx)
        for n in (5, 7, 1, 8, 3):  # chunks of several sizes, one of a single token
            out.append(model(idx[:, start:start + n], cache, torch.arange(start, start + n)))
            start += n
    assert start == 24
    assert (torch.cat(out, 1) - full).abs().max() <= 1e-5


# ---- llmlab eval --------------------------------------------------------------------------------
def test_eval_equals_a_loss_computed_here(capsys, tmp_path):
    model = tiny_model(vocab_size=256, block_size=16).eval()
    run = tmp_path / "run"
    save_checkpoint(run / "last", model, ByteTokenizer())
    text = "".join(f"line {i}: the quick brown fox {i * i % 97}\n" for i in range(300))
    (tmp_path / "d.txt").write_text(text)
    assert main(["eval", str(run), "--data", str(tmp_path / "d.txt"), "--max-tokens", "500"]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    ids = list(text.encode("utf-8"))
    val = ids[int(len(ids) * 0.9):]  # the last 10 % validate
    n = min(len(val) - 1, 500) // 16 * 16
    nll = 0.0
    with torch.no_grad():
        for s in range(0, n, 16):  # consecutive non-overlapping windows, each predicting the next byte
            x = torch.tensor([val[s:s + 16]])
            logp = torch.log_softmax(model(x)[0].double(), -1)
            nll -= sum(logp[t, val[s + t + 1]].item() for t in range(16))
    assert rec["tokens"] == n
    assert rec["val_loss"] == pytest.approx(nll / n, abs=1e-4)
    assert rec["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-3)
