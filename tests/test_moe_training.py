"""Training MoE models: the selection bias moves by +-gamma from the step's summed load and evens the
load out, the balance loss enters the gradient with weight alpha, expert loads reach the log and
metrics.jsonl (and `llmlab plot`), and a resumed run continues exactly, bias included."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmlab import LlmlabError, Transformer, preset_config
from llmlab.model.moe import MoE
from llmlab.training import TrainArgs, train
from llmlab.training.balance import ExpertBalance
from llmlab.training.step import StepConfig, TrainStep

TINY = dict(preset="moe", n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=4, eval_iters=2, lr=3e-3,
            warmup_iters=2, sample_tokens=0, quiet=True, dropout=0.0)


def tiny_model(preset="moe", seed=0, **kw):
    torch.manual_seed(seed)
    return Transformer(preset_config(preset, vocab_size=40, n_layer=2, n_head=2, n_embd=32, block_size=16, **kw))


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(40, (4, 16), generator=g), torch.randint(40, (4, 16), generator=g)) for _ in range(n)]


def routed_counts(model, data):
    """Per MoE layer, the assignments per expert over `data`, recomputed by hand from the router."""
    counts = []

    def count(moe, args, c):
        chosen = moe.router(args[0].reshape(-1, 32))[1]
        c.add_(torch.bincount(chosen.reshape(-1), minlength=8))

    for block in model.blocks:
        if isinstance(block.mlp, MoE):
            counts.append(torch.zeros(8))
            block.mlp.register_forward_pre_hook(lambda m, args, c=counts[-1]: count(m, args, c))
    with torch.no_grad():
        for x, _ in data:
            model(x)
    return counts


def test_bias_moves_by_gamma_against_the_load_summed_over_micro_batches():
    model, gamma = tiny_model(), 0.01
    data = batches(3)
    want = routed_counts(copy.deepcopy(model), data)  # the pre-step weights route these micro-batches
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.0),
                     StepConfig(grad_accum=3, moe_bias_rate=gamma))
    it = iter(data)
    step(lambda: next(it), 0.0)
    for block, counts in zip([b for b in model.blocks if isinstance(b.mlp, MoE)], want):
        expected = gamma * torch.sign(counts.mean() - counts)
        assert torch.equal(block.mlp.router.bias, expected)  # from zero: exactly +-gamma (or 0 when even)
    assert step.stats["expert_load"] == [round((c.max() / c.mean()).item(), 4) for c in want]
    assert all(not b.mlp.load_log for b in model.blocks if isinstance(b.mlp, MoE))  # consumed


def test_bias_balancing_evens_out_a_skewed_router():
    """A router that sends nearly every token to expert 0: the bias alone (no optimizer) brings
    max/mean load from nearly 4 (expert 0 in almost all of the 64 tokens' top 2) to near 1."""
    layer = tiny_model().blocks[0].mlp.train()
    g = torch.Generator().manual_seed(0)
    u = torch.ones(32) / 32 ** 0.5
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.3, generator=g)  # tokens' scores spread over the other experts
        layer.router.weight[0] += 2 * u  # every token below has a large component along u
    x = torch.randn(4, 16, 32, generator=g) + 3 * u
    balance = ExpertBalance(layer, bias_rate=0.01)
    loads = []
    for _ in range(100):
        layer(x)
        loads.append(balance.step()["expert_load"][0])
    assert loads[0] > 3.5
    assert max(loads[-20:]) < 1.3, loads[-20:]


class GradRecorder(torch.optim.SGD):
    """SGD that keeps the gradients it was stepped with (and does not move the weights)."""

    def step(self, closure=None):
        self.grads = [p.grad.clone() for g in self.param_groups for p in g["params"]]


def test_balance_loss_enters_the_gradient_with_weight_alpha():
    model, alpha = tiny_model(), 0.5
    (x, y), = batches(1)
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, MoE):
            m.record_balance_loss = True  # the reference computes the same L_bal by hand
    opt = GradRecorder(model.parameters(), lr=0.0)
    loss = TrainStep(model, opt, StepConfig(grad_clip=0.0, moe_aux_weight=alpha))(lambda: (x, y), 0.0)
    ce = ref.loss(x, y)
    aux = sum(b.mlp.balance_loss for b in ref.blocks if isinstance(b.mlp, MoE))
    assert loss == pytest.approx(ce.item())  # logged: the cross-entropy alone
    want = torch.autograd.grad(ce + alpha * aux, list(ref.parameters()), retain_graph=True)
    for (name, _), got, w in zip(model.named_parameters(), opt.grads, want):
        torch.testing.assert_close(got, w, msg=name)
    router = [n for n, _ in ref.named_parameters()].index("blocks.0.mlp.router.weight")
    without = torch.autograd.grad(ce, [list(ref.parameters())[router]])[0]
    assert not torch.allclose(opt.grads[router], without)  # alpha changed the router's gradient


def records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_train_logs_expert_load_and_resumes_exactly(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    kw = dict(TINY, max_iters=6, eval_interval=3, lr_decay_iters=6, moe_bias_rate=0.01)
    train(TrainArgs(out=str(straight), **kw))
    train(TrainArgs(out=str(resumed), **{**kw, "max_iters": 3}))
    train(TrainArgs(out=str(resumed), **{**kw, "resume": True}))
    a, b = records(straight), records(resumed)
    for key in ("loss", "val_loss", "expert_load"):  # (the resumed log also marks where it resumed)
        assert [(r["step"], r[key]) for r in a if key in r] == [(r["step"], r[key]) for r in b if key in r]
    lines = [r for r in a if "loss" in r]
    assert len(lines) == 6 and all(len(r["expert_load"]) == 2 and min(r["expert_load"]) >= 1.0 for r in lines)
    bias = "blocks.0.mlp.router.bias"
    saved = [load_file(str(run / "last" / "model.safetensors"))[bias] for run in (straight, resumed)]
    assert torch.equal(saved[0], saved[1]) and saved[0].abs().sum() > 0  # the bias trained and was restored


def test_log_line_shows_expert_load_and_dropped_tokens(tmp_path, capsys):
    from llmlab.cli import main as cli

    out = tmp_path / "run"
    code = cli(["train", "--preset", "deepseek", "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size",
                "16", "--batch-size", "4", "--max-iters", "2", "--eval-interval", "2", "--eval-iters", "1",
                "--sample-tokens", "0", "--out", str(out)])
    assert code == 0
    err = capsys.readouterr().err
    assert "step 2: train loss" in err and "expert load max/mean" in err
    assert len(records(out)[1]["expert_load"]) == 1  # deepseek: layer 0 dense, layer 1 MoE


def test_capacity_reports_dropped_fraction():
    model = tiny_model(moe_capacity_factor=0.5)
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.0), StepConfig())
    data = iter(batches(1))
    step(lambda: next(data), 0.0)
    dropped = step.stats["expert_dropped"]
    assert len(dropped) == 2 and all(0.5 <= d < 1 for d in dropped)  # capacity 0.5: at least half dropped


def test_batch_threads_run_moe_repeatably_but_refuse_the_balance_loss(tmp_path):
    kw = dict(TINY, max_iters=3, eval_interval=3, batch_threads=2)
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        train(TrainArgs(out=str(run), **kw))
    same = [[{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records(run)] for run in runs]
    assert same[0] == same[1] and "expert_load" in same[0][1]
    with pytest.raises(LlmlabError, match="--moe-aux-weight needs --batch-threads 1"):
        train(TrainArgs(out=str(tmp_path / "c"), **kw, moe_aux_weight=0.01))


@pytest.mark.parametrize("flag, value", [("moe_bias_rate", -0.1), ("moe_aux_weight", float("inf"))])
def test_bad_balance_settings_are_one_line(flag, value):
    with pytest.raises(LlmlabError, match=f"--{flag.replace('_', '-')} must be a finite number >= 0"):
        TrainArgs(**{flag: value}).validate()


def test_plot_draws_expert_load(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from llmlab.plot import plot_run

    run = tmp_path / "run"
    run.mkdir()
    lines = [{"step": s, "loss": 3.0 - s / 10, "lr": 1e-3, "tokens_per_s": 1.0, "expert_load": [2.0 - s / 10, 1.5]}
             for s in range(5)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    made, real = [], plt.subplots
    monkeypatch.setattr(plt, "subplots", lambda *a, **kw: made.append(real(*a, **kw)) or made[-1])
    out = plot_run(run)
    assert out.is_file() and out.read_bytes()[:4] == b"\x89PNG"
    _, axes = made[0]
    curves = [list(line.get_ydata()) for line in axes[1][0].get_lines()]  # second panel: a line per MoE layer
    assert curves[:2] == [[2.0, 1.9, 1.8, 1.7, 1.6], [1.5] * 5]
