"""Training maths against independent references: the LR schedule's formula, which parameters
decay, accumulation equals a larger batch, clipping bounds the update, train() trains on the
train split, and pinned losses of a short run (each test fails on a one-line mutation)."""
import copy
import json
import random

import pytest
import torch

from llmlab.model import Transformer
from llmlab.presets import preset_config
from llmlab.training import TrainArgs, train
from llmlab.training.schedule import LRSchedule, schedule_for
from llmlab.training.step import StepConfig, TrainStep, make_optimizer


def test_lr_schedule_follows_warmup_then_cosine_formula():
    s = LRSchedule(lr=1.0, min_lr=0.1, warmup_iters=10, decay_iters=110)
    # warmup: lr * (step + 1) / (warmup + 1); cosine over the 100 steps from 10 to 110:
    # min + (lr - min) * (1 + cos(pi * (step - 10) / 100)) / 2, written out by hand
    expected = {0: 1 / 11, 9: 10 / 11, 10: 1.0, 35: 0.8681980515339464, 60: 0.55, 85: 0.2318019484660536,
                110: 0.1, 500: 0.1}
    for step, lr in expected.items():
        assert s(step) == pytest.approx(lr, abs=1e-12), step
    a = TrainArgs(lr=2e-3, warmup_iters=5, max_iters=50)  # defaults: min_lr = lr / 10, decay at max_iters
    assert schedule_for(a) == LRSchedule(2e-3, 2e-4, 5, 50)
    assert schedule_for(TrainArgs(lr=2e-3, warmup_iters=5, max_iters=50, lr_decay_iters=30)).decay_iters == 30


@pytest.mark.parametrize("preset", ["flash", "llama"])
def test_weight_decay_only_on_matrices_not_norms_biases_or_embeddings(preset):
    model = Transformer(preset_config(preset, vocab_size=50, n_layer=2, n_head=2, n_embd=16, block_size=8))
    opt = make_optimizer(model, 0.1, (0.9, 0.99), 1e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    matrices = {f"blocks.{i}.{m}" for i in range(2) for m in ("attn.qkv.weight", "attn.proj.weight",
                                                              "mlp.fc.weight", "mlp.proj.weight")}
    if preset == "llama":  # untied: the head is a matrix of its own
        matrices.add("lm_head.weight")
    assert decayed == matrices
    assert all(g["weight_decay"] == 0.1 for g in opt.param_groups if g["weight_decay"] > 0)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def one_sgd_step(model, batches, cfg):
    """Parameters after one TrainStep with plain SGD at lr 1: the update is minus the gradient."""
    model = copy.deepcopy(model)
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=1.0), cfg)
    it = iter(batches)
    loss = step(lambda: next(it), 1.0)
    return loss, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture
def model_and_batch():
    torch.manual_seed(0)
    model = Transformer(preset_config("flash", vocab_size=50, n_layer=1, n_head=2, n_embd=16, block_size=8))
    x, y = torch.randint(50, (8, 8)), torch.randint(50, (8, 8))
    return model, x, y


def test_grad_accum_equals_a_k_times_larger_batch(model_and_batch):
    model, x, y = model_and_batch
    loss_big, big = one_sgd_step(model, [(x, y)], StepConfig(grad_accum=1, grad_clip=0.0))
    chunks = list(zip(x.chunk(4), y.chunk(4)))
    loss_acc, acc = one_sgd_step(model, chunks, StepConfig(grad_accum=4, grad_clip=0.0))
    assert loss_acc == pytest.approx(loss_big, rel=1e-5)
    for n in big:
        torch.testing.assert_close(acc[n], big[n], rtol=1e-5, atol=1e-6, msg=n)


def test_clipping_bounds_the_gradient_norm(model_and_batch):
    model, x, y = model_and_batch
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _, free = one_sgd_step(model, [(x, y)], StepConfig(grad_clip=0.0))
    _, clipped = one_sgd_step(model, [(x, y)], StepConfig(grad_clip=0.05))

    def update_norm(after):
        return torch.cat([(before[n] - after[n]).flatten() for n in before]).norm().item()

    assert update_norm(free) > 0.5  # the gradient is far above the clip...
    assert update_norm(clipped) == pytest.approx(0.05, rel=1e-4)  # ...and is scaled down to it


def test_train_learns_the_train_split_not_the_val_split(tmp_path):
    """The train text cycles 'abcd', the validation tenth 'dcba': trained on the train split, the
    model predicts the train text well and the reversed validation text badly."""
    data = tmp_path / "abcd.txt"
    data.write_text("abcd" * 225 + "dcba" * 25)  # split_ids: the first 90% train, the last 10% validate
    out = tmp_path / "run"
    train(TrainArgs(data=str(data), tokenizer="char", n_layer=1, n_head=2, n_embd=16, block_size=8, batch_size=8,
                    max_iters=40, eval_interval=40, eval_iters=2, lr=1e-2, warmup_iters=0, dropout=0.0,
                    sample_tokens=0, quiet=True, out=str(out)))
    final = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "val_loss" in x][-1]
    assert final["train_loss"] < 0.5 and final["val_loss"] > final["train_loss"] + 2, final


def test_pinned_losses_of_a_short_run(tmp_path):
    """Regression pin: a few steps at a fixed seed on a fixed synthetic text. These numbers change
    only when the training maths change on purpose (init, sampler, schedule, optimizer, loss);
    update them then, and say why in the commit."""
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "home"]
    rng = random.Random(0)
    data = tmp_path / "text.txt"
    data.write_text(" ".join(rng.choice(words) for _ in range(3000)))
    out = tmp_path / "run"
    train(TrainArgs(data=str(data), tokenizer="char", n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=4,
                    grad_accum=2, max_iters=6, eval_interval=6, eval_iters=2, lr=3e-3, warmup_iters=2,
                    dropout=0.1, seed=1337, sample_tokens=0, quiet=True, out=str(out)))
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    got = [r["loss"] for r in recs if "loss" in r] + [r["val_loss"] for r in recs if "val_loss" in r]
    assert got == pytest.approx(PINNED, abs=2e-4), got  # 4 decimals; float summation order may differ a little


# train loss at steps 0-5, then val loss at steps 0 and 6 (torch 2.13 CPU, fp32)
PINNED = [2.8195, 2.7459, 2.6660, 2.6110, 2.5810, 2.5423, 2.8132, 2.5386]
