"""The server's parts in-process: the engine against llmlab.generate and against itself batched
and compiled, streamed text against the tokenizer's whole decode, stop strings against str.find,
chat templates against transformers' apply_chat_template, a Hugging Face folder's stop ids."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st

from llmlab import generate
from llmlab.model import Transformer
from llmlab.presets import preset_config
from llmlab.runtime import Runtime
from llmlab.serve.engine import Engine, Sampling, Sequence
from llmlab.textstream import TextStream
from llmlab.tokenizer import ByteTokenizer


def model_for(preset: str = "llama") -> Transformer:
    torch.manual_seed(0)
    config = preset_config(preset, vocab_size=256, block_size=96, n_layer=2, n_head=4, n_embd=32)
    return Transformer(config, Runtime(cache="paged", block_size=16)).eval()


def prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (3 + 9 * i % 40,), generator=g).tolist() for i in range(n)]


def run_engine(engine: Engine, seqs: list[Sequence], join_every: int) -> list[list[int]]:
    """Serve `seqs`, `join_every` newcomers admitted per step, finished ones released."""
    waiting, running = list(seqs), []
    while waiting or running:
        new = [waiting.pop(0) for _ in range(min(join_every, len(waiting), len(engine.free_rows)))]
        for s in new:
            engine.attach(s)
        engine.step(new, running)
        for s in running + new:
            if s.done:
                engine.release(s)
        running = [s for s in running + new if not s.done]
    assert engine.cache.num_free_blocks == engine.total_blocks and len(engine.free_rows) == engine.max_batch
    return [s.tokens for s in seqs]


@pytest.mark.parametrize("preset", ["llama", "rope_mla"])
def test_engine_batched_equals_alone_equals_generate(preset):
    """Greedy: joining and leaving a batch of 3 rows (6 sequences, prompts across blocks) gives each
    sequence the tokens it gets alone, and llmlab.generate's (a dense cache, batch 1). Sampled with a
    seed: the same draws alone and batched."""
    model = model_for(preset)
    ps = prompts(6)
    lengths = [4 + 3 * i for i in range(6)]
    make = lambda sampling: [Sequence(p, n, sampling) for p, n in zip(ps, lengths)]  # noqa: E731
    alone = [run_engine(Engine(model, 3, 96), [s], 1)[0] for s in make(Sampling(0))]
    assert run_engine(Engine(model, 3, 96), make(Sampling(0)), 2) == alone
    assert alone == [generate(model, [p], n, temperature=0)[0][len(p):].tolist() for p, n in zip(ps, lengths)]
    seeded = lambda: [Sequence(p, n, Sampling(1.0, 20, 0.9, seed=i)) for i, (p, n) in enumerate(zip(ps, lengths))]  # noqa: E731
    alone = [run_engine(Engine(model, 3, 96), [s], 1)[0] for s in seeded()]
    assert run_engine(Engine(model, 3, 96), seeded(), 2) == alone


def test_the_engine_decoding_only_running_rows_gives_generates_tokens():
    """batch_invariant=False: each step decodes just the running rows (batches of 1 to 3 here)."""
    model = model_for()
    ps, lengths = prompts(5), [4 + 5 * i for i in range(5)]
    got = run_engine(Engine(model, 3, 96, batch_invariant=False), [Sequence(p, n, Sampling(0)) for p, n in
                                                                    zip(ps, lengths)], 2)
    assert got == [generate(model, [p], n, temperature=0)[0][len(p):].tolist() for p, n in zip(ps, lengths)]


def test_a_stop_id_ends_a_sequence_and_a_small_pool_is_reused():
    model = model_for()
    p = prompts(1)[0]
    free = generate(model, [p], 12, temperature=0)[0][len(p):].tolist()
    seq = Sequence(p, 12, Sampling(0), stop_ids=frozenset({free[4]}))
    engine = Engine(model, 2, 96, num_blocks=4)
    assert run_engine(engine, [seq], 1) == [free[:free.index(free[4]) + 1]] and seq.finish_reason == "stop"
    assert Sequence(p, 3, tokens=[1, 2, 3]).finish_reason == "length"


def test_the_batch_is_sampled_in_one_pass_each_row_as_sample_next_alone():
    """Engine._sample over rows of mixed settings (greedy, temperature, top-k, top-p, both, a tiny
    temperature, filters that keep everything) gives each row exactly the probabilities and the draw
    sample_next gives that row alone with a generator seeded the same (filters batched, draws per row)."""
    from llmlab.generation import sample_next, sampling_probs

    settings_ = [Sampling(0), Sampling(0.7), Sampling(1.0, top_k=5), Sampling(1.3, top_p=0.8),
                 Sampling(0.9, top_k=40, top_p=0.5), Sampling(1e-300), Sampling(1.0, top_k=1000, top_p=1.0),
                 Sampling(2.0, top_k=2), Sampling(1.0, top_p=0.95), Sampling(1.0)]
    engine = Engine(model_for(), 2, 96)
    logits = torch.randn(len(settings_), 256, generator=torch.Generator().manual_seed(3))
    logits[-1] = 0.0
    logits[-1, 7] = 30.0  # one token's float32 probability rounds to 1: the mass before the others is 1
    drawn = [i for i, sp in enumerate(settings_) if sp.temperature]
    batched = sampling_probs(logits[drawn], torch.tensor([settings_[i].temperature for i in drawn], dtype=torch.float64),
                             torch.tensor([settings_[i].top_k or 256 for i in drawn]),
                             torch.tensor([settings_[i].top_p or 1.0 for i in drawn]))
    for j, i in enumerate(drawn):
        sp = settings_[i]
        assert torch.equal(batched[j:j + 1], sampling_probs(logits[i:i + 1], sp.temperature, sp.top_k, sp.top_p)), sp
    for seed in range(20):
        seqs = [Sequence([1], 10, sp) for sp in settings_]
        for i, s in enumerate(seqs):
            s.generator = torch.Generator().manual_seed(seed * 100 + i)
        engine._sample(seqs, logits)
        alone = [int(sample_next(logits[i:i + 1], sp.temperature, sp.top_k, sp.top_p,
                                 torch.Generator().manual_seed(seed * 100 + i))) for i, sp in enumerate(settings_)]
        assert [s.tokens[0] for s in seqs] == alone
        assert seqs[0].tokens[0] == int(logits[0].argmax()) and seqs[5].tokens[0] == int(logits[5].argmax())


def test_per_row_sampling_settings_follow_the_logits_device():
    """The server makes its per-row settings on the host; logits on another device (the meta device
    stands in for a GPU here) still divide by them there."""
    from llmlab.generation import sampling_probs

    probs = sampling_probs(torch.zeros(2, 5, device="meta"), torch.tensor([0.5, 2.0], dtype=torch.float64))
    assert probs.device.type == "meta" and probs.shape == (2, 5)


def drive(sched, ident_seqs, steps=10_000):
    """Run the scheduler `sched` until idle; every emit as (outputs, decoded) in order."""
    emitted = []
    for ident, seq in ident_seqs:
        sched.add(ident, seq)
    while sched.busy and steps:
        sched.step(lambda out, decoded: emitted.append((out, decoded)))
        steps -= 1
    return emitted


def test_the_scheduler_streams_generates_tokens_first_tokens_before_any_decode():
    """Each request's outputs joined are llmlab.generate's tokens; a newcomer's first token is
    emitted by itself, right after its prefill and before the decode of that step (the time to the
    first token holds no decode); the batch's sequences are decoded together."""
    from llmlab.serve.scheduler import Scheduler

    model = model_for()
    ps, lengths = prompts(5), [3, 9, 5, 12, 7]
    sched = Scheduler(Engine(model, 3, 96))
    emitted = drive(sched, [(i, Sequence(p, n, Sampling(0))) for i, (p, n) in enumerate(zip(ps, lengths))])
    got = {i: [] for i in range(5)}
    reasons = {}
    for out, _ in emitted:
        for o in out:
            got[o.ident] += o.tokens
            if o.reason:
                reasons[o.ident] = o.reason
    assert [got[i] for i in range(5)] == [generate(model, [p], n, temperature=0)[0][len(p):].tolist()
                                         for p, n in zip(ps, lengths)]
    assert reasons == {i: "length" for i in range(5)}
    first, first_decode = emitted[0], emitted[1]
    assert first[1] == 0 and [o.ident for o in first[0]] == [0, 1, 2]  # three rows: three prefills
    assert first_decode[1] == 3 and len(first_decode[0]) == 3
    assert sched.engine.cache.num_free_blocks == sched.engine.total_blocks and not sched.running


def test_the_scheduler_admits_by_blocks_and_an_abort_frees_them():
    """A pool of 8 blocks of 16: a request of 100 tokens (7 blocks) runs, a second one waits for
    its blocks although a row is free; aborting the first admits the second at the next step; an
    aborted waiting request never runs; the pool is whole at the end."""
    from llmlab.serve.scheduler import Scheduler

    engine = Engine(model_for(), 2, 96, num_blocks=8)
    sched = Scheduler(engine)
    long = lambda: Sequence(prompts(1)[0][:30], 70, Sampling(0))  # noqa: E731 - 100 tokens: 7 blocks
    emitted = []
    emit = lambda out, decoded: emitted.append(out)  # noqa: E731
    sched.add(0, long())
    sched.add(1, long())
    sched.add(2, long())
    sched.step(emit)
    assert list(sched.running) == [0] and [w[0] for w in sched.waiting] == [1, 2]
    assert engine.cache.num_free_blocks < 8
    sched.abort(2)  # waiting: dropped
    sched.abort(0)  # running: its row and blocks back
    assert engine.cache.num_free_blocks == 8 and sched.committed == 0
    sched.step(emit)
    assert list(sched.running) == [1] and not sched.waiting
    sched.abort(7)  # unknown (finished meanwhile): ignored
    emitted.clear()
    while sched.busy:
        sched.step(emit)
    assert {o.ident for out in emitted for o in out} == {1} and emitted[-1][-1].reason == "length"
    assert engine.cache.num_free_blocks == 8 and len(engine.free_rows) == 2


def test_a_failed_step_ends_its_requests_with_error_and_the_scheduler_goes_on(monkeypatch, caplog):
    from llmlab.serve.scheduler import Scheduler

    engine = Engine(model_for(), 2, 96)
    sched = Scheduler(engine)
    p = prompts(1)[0]
    real = engine.decode
    monkeypatch.setattr(engine, "decode", lambda seqs: (_ for _ in ()).throw(RuntimeError("out of\nmemory")))
    emitted = drive(sched, [(0, Sequence(p, 5, Sampling(0))), (1, Sequence(p, 5, Sampling(0)))])
    assert emitted[-1] == ([(0, [], "error"), (1, [], "error")], 0)
    assert "engine step failed (RuntimeError: out of memory); ending 2 request(s)" in caplog.text
    assert engine.cache.num_free_blocks == engine.total_blocks and len(engine.free_rows) == 2
    monkeypatch.setattr(engine, "decode", real)
    emitted = drive(sched, [(2, Sequence(p, 5, Sampling(0)))])
    assert [t for out, _ in emitted for o in out for t in o.tokens] == \
        generate(engine.model, [p], 5, temperature=0)[0][len(p):].tolist()


def test_the_compiled_engine_is_one_graph_with_the_eager_tokens(monkeypatch):
    """compile=True: the decode step of all rows through torch.compile (dynamo's eager backend:
    tracing is what is checked) gives the eager engine's tokens, without recompiling as sequences
    join and leave (the decode shape never changes)."""
    import torch._dynamo

    from llmlab import compiled

    monkeypatch.setattr(compiled, "COMPILE_OPTIONS", None)
    monkeypatch.setattr(compiled, "_compile_failed", False)  # an earlier failure would decode eagerly, unwarned
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend="eager", fullgraph=True))
    compiled._steps.clear()
    model = model_for()
    seqs = lambda: [Sequence(p, 6 + 3 * i, Sampling(0)) for i, p in enumerate(prompts(5))]  # noqa: E731
    want = run_engine(Engine(model, 3, 96), seqs(), 2)
    torch._dynamo.reset()
    engine = Engine(model, 3, 96, compile=True)
    with torch._dynamo.config.patch(error_on_recompile=True), warnings.catch_warnings():
        warnings.simplefilter("error")  # a compile failure would warn and decode eagerly
        assert run_engine(engine, seqs(), 2) == want
    # decoding only the running rows, the batch size changes: the guards pick the graph each step
    # after the warm-up (what `llmlab serve --compile` runs before answering) nothing compiles again
    from torch._dynamo.utils import counters

    want = run_engine(Engine(model, 3, 96, batch_invariant=False), seqs(), 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine = Engine(model, 3, 96, compile=True, batch_invariant=False)
        engine.warm_up()
        graphs = counters["stats"]["unique_graphs"]
        assert run_engine(engine, seqs(), 2) == want
        assert counters["stats"]["unique_graphs"] == graphs


# ---- text --------------------------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=30), stops=st.lists(st.text(min_size=1, max_size=4), max_size=3), cut=st.integers(1, 4))
def test_streamed_text_is_the_whole_decode_cut_at_the_first_stop(text, stops, cut):
    """Byte tokens fed a few at a time (multi-byte characters split): the pieces join into the
    tokenizer's decode of everything, cut before the stop string generated first (the occurrence
    that ends first; at the same end, the one that starts first); no piece ever holds text past
    that cut (nothing is taken back)."""
    tok = ByteTokenizer()
    ids = tok.encode(text)
    whole = tok.decode(ids)
    hits = [(whole.find(s) + len(s), whole.find(s)) for s in stops if s in whole]
    want = whole[:min(hits)[1]] if hits else whole
    stream = TextStream(tok, stops)
    pieces = []
    for end in range(cut, len(ids) + cut, cut):
        pieces.append(stream.feed(ids[:end], final=end >= len(ids)))
        assert want.startswith("".join(pieces))
        assert "\ufffd" not in "".join(pieces) or "\ufffd" in want
        if stream.stopped:
            break
    assert "".join(pieces) == want and stream.stopped == bool(hits)


# ---- chat templates ----------------------------------------------------------------------------
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
BOS_ONLY_USER = ("{{ bos_token }}{% for m in messages %}{% if m['role'] != 'user' %}"
                 "{{ raise_exception('only user messages') }}{% endif %}[INST] {{ m['content'] }} [/INST]{% endfor %}")


def test_an_hf_folder_chat_template_gives_transformers_ids(tmp_path):
    """A Llama folder with a ChatML template in tokenizer_config.json and eos ids in its configs:
    the served prompt ids equal AutoTokenizer.apply_chat_template's, the stop ids are the folder's,
    and a template that raises refuses the messages with its own message."""
    transformers = pytest.importorskip("transformers")
    from llmlab.hf import _save_hf_tokenizer
    from llmlab.serve.chat import load_template
    from llmlab.serve.loading import load_served

    cfg = transformers.LlamaConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=64, vocab_size=256, max_position_embeddings=64, eos_token_id=7)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    _save_hf_tokenizer(ByteTokenizer(), tmp_path)
    tc = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**tc, "chat_template": CHATML}))
    model, tok, template, stops, _ = load_served(str(tmp_path), "cpu")
    assert model.runtime.cache == "paged" and stops == {7, 9} and template.stop == ()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "héllo"}]
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    want = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert tok.encode(template.render(messages)) == list(want)
    from llmlab.hf import convert_from_hf  # `llmlab convert --from-hf` keeps the template for serving

    run = convert_from_hf(tmp_path, tmp_path.parent / f"{tmp_path.name}-run")
    assert load_served(str(run.parent), "cpu")[2].render(messages) == template.render(messages)
    (tmp_path / "chat_template.jinja").write_text(BOS_ONLY_USER)  # the separate file wins, as in transformers
    strict = load_template(tmp_path)
    assert strict.render([{"role": "user", "content": "x"}]) == "[INST] x [/INST]"
    with pytest.raises(ValueError, match="only user messages"):
        strict.render(messages)


def test_the_default_template_and_a_sandboxed_one():
    from llmlab.errors import LlmlabError
    from llmlab.serve.chat import ChatTemplate

    default = ChatTemplate()
    assert default.render([{"role": "user", "content": "hi"}]) == "User: hi\n\nAssistant:"
    assert default.stop == ("\nUser:",)
    escape = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")  # a template reaching for Python
    with pytest.raises(ValueError, match="refused"):
        escape.render([{"role": "user", "content": "x"}])
    with pytest.raises(LlmlabError, match="does not parse"):
        ChatTemplate("{% for %}")
