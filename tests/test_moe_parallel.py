"""MoE presets under torch.distributed (gloo, 2 ranks under torchrun): DDP and FSDP train like one
process with the same global batch, and every rank ends with one process's balancing biases (the
expert loads are summed over the ranks before each update)."""
import pytest
import torch
from safetensors.torch import load_file
from test_parallel import TINY, assert_same_losses, losses, one_process, torchrun

MOE = dict(TINY, moe_bias_rate=0.01)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    base = tmp_path_factory.mktemp("one")
    return {(p, a): one_process(base / f"{p}-{a}", **{**MOE, "preset": p, "moe_aux_weight": a})
            for p, a in (("moe", 0.0), ("deepseek", 0.01))}


@pytest.mark.parametrize("parallel, preset, aux", [
    ("ddp", "moe", 0.0), ("fsdp", "moe", 0.0),
    pytest.param("ddp", "deepseek", 0.01, marks=pytest.mark.slow), ("fsdp", "deepseek", 0.01),
])
def test_two_ranks_train_moe_like_one_process(tmp_path, references, parallel, preset, aux):
    out = tmp_path / "run"
    r = torchrun({"train": {**MOE, "preset": preset, "moe_aux_weight": aux, "batch_size": 4, "parallel": parallel,
                            "out": str(out)}})
    assert r.returncode == 0, r.stderr[-3000:]
    ref = references[(preset, aux)]
    assert_same_losses(ref, out)
    assert losses(out, "expert_load") == losses(ref, "expert_load")  # loads summed over both ranks' rows
    got, want = (load_file(str(run / "best" / "model.safetensors")) for run in (out, ref))
    biases = [k for k in want if k.endswith("router.bias")]
    assert biases and any(want[k].abs().sum() > 0 for k in biases)
    for k in biases:  # the update is +-gamma: equal loads give exactly equal biases
        assert torch.equal(got[k], want[k]), k


def test_activation_checkpointing_counts_every_layer_twice_and_changes_nothing(tmp_path, references):
    """Recomputing blocks in backward reruns each MoE forward, so every load is recorded twice: a
    uniform factor, which leaves the bias update (a sign) and max/mean as they were."""
    from llmlab.training import TrainArgs, train

    run = tmp_path / "run"
    train(TrainArgs(**{**MOE, "preset": "moe", "batch_size": 8, "parallel": "fsdp", "activation_checkpointing": True,
                       "out": str(run)}))
    ref = references[("moe", 0.0)]
    assert_same_losses(ref, run)
    assert losses(run, "expert_load") == losses(ref, "expert_load")
    got, want = (load_file(str(r / "best" / "model.safetensors")) for r in (run, ref))
    assert all(torch.equal(got[k], want[k]) for k in want if k.endswith("router.bias"))


def test_sharded_checkpoint_restores_the_bias(tmp_path, references):
    """A --parallel run stopped at step 3 and resumed from its sharded last/ (the bias is a buffer in
    the DCP state) follows the uninterrupted one-process run."""
    from llmlab.training import TrainArgs, train

    run = tmp_path / "run"
    kw = {**MOE, "preset": "moe", "batch_size": 8, "parallel": "fsdp", "out": str(run), "lr_decay_iters": 6}
    train(TrainArgs(**{**kw, "max_iters": 3}))
    train(TrainArgs(**{**kw, "resume": True}))
    ref = references[("moe", 0.0)]
    assert_same_losses(ref, run)
    got, want = (load_file(str(r / "best" / "model.safetensors")) for r in (run, ref))
    assert all(torch.equal(got[k], want[k]) for k in want if k.endswith("router.bias"))
