"""`llmlab serve` through the official `openai` client and raw HTTP: completions and chat, streamed
and not, usage, stop strings, every kind of bad input a 4xx with an OpenAI error object (a
hypothesis fuzz of bodies never gets a 500), /v1/models, /metrics, the page, the CLI's checks.
One server (a tiny random llama with the byte tokenizer) serves the whole module."""
from __future__ import annotations

import json

import pytest
import torch

from serving import Server, post, tiny_run

openai = pytest.importorskip("openai", reason="the openai client is in the test extra: pip install -e '.[test]'")
pytest.importorskip("fastapi", reason="llmlab serve needs the serve extra: pip install -e '.[serve]'")

MAX_LEN = 128


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    base = tmp_path_factory.mktemp("serve-api")
    run = tiny_run(base / "tiny", block_size=MAX_LEN)
    server = Server(run, "--max-batch", "4", "--block-size", "16", "--max-body", "20000", log=base / "server.log")
    yield server, run
    assert server.stop() == 0, server.output()
    assert "Traceback" not in server.output()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0].url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(served):
    """Greedy continuations by llmlab.generate in this process (a dense cache, batch 1): the text
    the server must send."""
    import llmlab
    from llmlab.tokenizer import ByteTokenizer

    model = llmlab.load(served[1])
    tok = ByteTokenizer()

    def continuation(prompt: str, n: int) -> str:
        ids = tok.encode(prompt)
        return tok.decode(llmlab.generate(model, [ids], n, temperature=0)[0][len(ids):].tolist())
    return continuation


def test_completion_and_its_stream_are_the_greedy_text_with_usage(client, reference):
    prompt = "The quick brown fox"
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0)
    assert out.object == "text_completion" and out.model == "tiny"
    assert out.choices[0].text == reference(prompt, 24)
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (19, 24, 43)
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == out.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 24 and chunks[-1].usage.prompt_tokens == 19
    assert len([c for c in chunks if c.choices]) > 2  # streamed piece by piece, not in one go


def test_chat_uses_the_default_template_streamed_or_not(client, reference):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    rendered = "System: Be brief.\n\nUser: hi\n\nAssistant:"  # the documented default template
    want = reference(rendered, 12)
    cut = want.find("\nUser:")  # the default template's stop string
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    msg = out.choices[0]
    assert out.object == "chat.completion" and msg.message.role == "assistant"
    assert msg.message.content == (want if cut < 0 else want[:cut])
    assert out.usage.prompt_tokens == len(rendered.encode())
    assert msg.finish_reason == ("length" if cut < 0 else "stop")
    stream = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                                 stream=True))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == msg.message.content
    assert stream[-1].choices[0].finish_reason == msg.finish_reason


def test_stop_strings_cut_the_text_and_say_stop(client, reference, served):
    """The text ends before the stop string; the engine, which goes on meanwhile, is told to drop
    the request: it stops long before max_tokens (a few steps late at most: the server's side saw the
    stop string while the engine stepped on), and its blocks come back."""
    prompt = "Once upon a time"
    text = reference(prompt, 40)
    i = next(i for i in range(8, len(text) - 2) if "\ufffd" not in text[i:i + 2] and text[i:i + 2].strip())
    stop = text[i:i + 2]
    first = text.find(stop)
    budget = 100  # max_tokens: far more than the stop string needs (the engine would decode budget - 1)
    server = served[0]
    for stream in (False, True):
        decoded = server.metrics()["llmlab_decode_batch_size_sum"]
        if stream:
            chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=budget,
                                                    temperature=0, stop=[stop, "never-there"], stream=True))
            got = "".join(c.choices[0].text for c in chunks)
            reason = chunks[-1].choices[0].finish_reason
        else:
            out = client.completions.create(model="tiny", prompt=prompt, max_tokens=budget, temperature=0, stop=stop)
            got, reason = out.choices[0].text, out.choices[0].finish_reason
        assert (got, reason) == (text[:first], "stop"), stream
        m = server.wait_metric("llmlab_requests_running", 0)
        assert m["llmlab_cache_free_blocks"] == m["llmlab_cache_blocks"]
        assert m["llmlab_decode_batch_size_sum"] - decoded < budget - 1  # the engine was told to stop


def test_models_and_metrics(client, served):
    server = served[0]
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    m = server.metrics()
    assert m["llmlab_cache_blocks"] == 4 * MAX_LEN // 16 == m["llmlab_cache_free_blocks"]
    assert m["llmlab_requests_running"] == 0 and m["llmlab_requests_waiting"] == 0
    before = m["llmlab_generation_tokens_total"]
    client.completions.create(model="tiny", prompt="x", max_tokens=5, temperature=0)
    m = server.metrics()
    assert m["llmlab_generation_tokens_total"] == before + 5
    assert m["llmlab_time_to_first_token_seconds_count"] >= 1 and m["llmlab_inter_token_latency_seconds_count"] >= 4


def test_too_long_and_unknown_model_are_4xx(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="a" * MAX_LEN, max_tokens=1)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="at most 28"):
        client.completions.create(model="tiny", prompt="a" * 100, max_tokens=29)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="a", max_tokens=1)


BAD_BODIES = {
    "malformed JSON": b'{"model": "tiny", "prompt": ',
    "not an object": b'[1, 2]',
    "non-UTF-8": b'{"model": "tiny", "prompt": "\xff\xfe"}',
    "NaN": b'{"model": "tiny", "prompt": "a", "temperature": NaN}',
    "string for a number": {"model": "tiny", "prompt": "a", "max_tokens": "5"},
    "bool for a number": {"model": "tiny", "prompt": "a", "max_tokens": True},
    "negative max_tokens": {"model": "tiny", "prompt": "a", "max_tokens": -1},
    "huge max_tokens": {"model": "tiny", "prompt": "a", "max_tokens": 10**30},
    "n=2": {"model": "tiny", "prompt": "a", "n": 2},
    "token id outside the vocabulary": {"model": "tiny", "prompt": [1, 999]},
    "empty id list": {"model": "tiny", "prompt": []},
    "two prompts": {"model": "tiny", "prompt": ["a", "b"]},
    "logprobs": {"model": "tiny", "prompt": "a", "logprobs": 2},
    "missing prompt": {"model": "tiny"},
    "too many stops": {"model": "tiny", "prompt": "a", "stop": ["a", "b", "c", "d", "e"]},
    "top_p 0": {"model": "tiny", "prompt": "a", "top_p": 0},
}
BAD_CHATS = {
    "empty messages": {"model": "tiny", "messages": []},
    "unknown role": {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]},
    "content a number": {"model": "tiny", "messages": [{"role": "user", "content": 5}]},
    "tools": {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
}


@pytest.mark.parametrize("path,name", [("completions", n) for n in BAD_BODIES] + [("chat/completions", n) for n in BAD_CHATS])
def test_bad_input_is_a_4xx_error_object(served, path, name):
    body = (BAD_BODIES if path == "completions" else BAD_CHATS)[name]
    status, out, _ = post(f"{served[0].url}/v1/{path}", body)
    assert 400 <= status < 500, (name, status, out)
    assert set(out["error"]) == {"message", "type", "param", "code"} and out["error"]["message"], out


def test_body_size_is_bounded(served):
    status, out, _ = post(f"{served[0].url}/v1/completions", {"model": "tiny", "prompt": "a" * 30000})
    assert status == 413 and "larger than 20000 bytes" in out["error"]["message"]


def test_fuzzed_bodies_never_get_a_5xx(served):
    """Random JSON bodies, shaped like requests or not, to both endpoints: always an answer below 500."""
    from hypothesis import HealthCheck, given, settings, strategies as st

    url = served[0].url
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                        st.text(max_size=12))
    values = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=6), c, max_size=3)),
                          max_leaves=6)
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "x"]), "content": values})
    fields = {"model": st.one_of(st.just("tiny"), values), "prompt": st.one_of(st.text(max_size=20), values),
              "messages": st.one_of(st.lists(message, max_size=3), values),
              "max_tokens": st.one_of(st.integers(-3, 6), values), "temperature": st.one_of(st.floats(0, 2), values),
              "top_p": values, "top_k": st.one_of(st.integers(-1, 300), values), "seed": values, "stop": values,
              "n": values, "stream": st.one_of(st.booleans(), values), "stream_options": values, "logprobs": values}
    body = st.one_of(st.fixed_dictionaries({}, optional=fields), values)

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(path=st.sampled_from(["completions", "chat/completions"]), body=body)
    def check(path, body):
        if isinstance(body, dict) and body.get("max_tokens") is None:
            body["max_tokens"] = 3  # keep each generation short (a missing max_tokens is tested elsewhere)
        raw = json.dumps(body).encode()
        status, out, _ = post(f"{url}/v1/{path}", raw)
        assert status < 500, (body, status, out)
    check()
    for raw in (b"", b"\x00" * 10, b"{" * 100000):
        assert post(f"{url}/v1/completions", raw)[0] < 500


def test_the_page_is_plain_html_with_no_outside_resource(served):
    import urllib.request

    with urllib.request.urlopen(served[0].url + "/", timeout=10) as r:
        html = r.read().decode()
        assert r.headers["Content-Type"].startswith("text/html")
    for needed in ('id="input"', 'id="send"', 'id="stop"', 'id="new"', 'id="temperature"', 'id="max-tokens"',
                   "/v1/chat/completions"):
        assert needed in html
    assert "http://" not in html and "https://" not in html and "<script src" not in html


def hf_folder(where, vocab_size=256, nan=False):
    """A tiny Llama folder with a byte tokenizer.json (256 ids), its weights NaN if asked."""
    transformers = pytest.importorskip("transformers")
    from llmlab.hf import _save_hf_tokenizer
    from llmlab.tokenizer import ByteTokenizer

    cfg = transformers.LlamaConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
                                   intermediate_size=64, vocab_size=vocab_size, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg)
    if nan:
        with torch.no_grad():
            model.lm_head.weight.fill_(float("nan"))
    model.save_pretrained(where)
    _save_hf_tokenizer(ByteTokenizer(), where)
    return where


def test_cli_refuses_bad_settings_in_one_line(tmp_path, capsys):
    from llmlab.checkpoint import save_checkpoint
    from llmlab.cli import main
    from llmlab.model import Transformer
    from llmlab.presets import preset_config
    from llmlab.tokenizer import ByteTokenizer

    run = tiny_run(tmp_path / "r")
    learned = tmp_path / "learned"  # learned positions end at block_size 32
    save_checkpoint(learned, Transformer(preset_config("kv_cache", vocab_size=256, block_size=32, n_layer=1,
                                                       n_head=2, n_embd=16)), ByteTokenizer())
    small_vocab, nan = hf_folder(tmp_path / "hf", vocab_size=200), hf_folder(tmp_path / "hf-nan", nan=True)
    capsys.readouterr()  # transformers' save progress
    for where, flags, says in ((run, ["--max-batch", "0"], "--max-batch must be at least 1"),
                               (run, ["--block-size", "24"], "power of two"),
                               (run, ["--port", "70000"], "--port must be in [0, 65535]"),
                               (run, ["--api-key", " "], "--api-key is empty"),
                               (learned, ["--max-len", "64"], "exceeds this model's 32 learned positions"),
                               (tmp_path / "missing", [], "no such checkpoint")):
        code = main(["serve", str(where), *flags])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error:") and says in err and err.count("\n") == 1, (flags, err)
    # a Hugging Face folder gets the same checks as a run (after transformers' loading progress)
    for where, says in ((small_vocab, "do not belong together"), (nan, "NaN/inf weights")):
        code = main(["serve", str(where)])
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert code == 2 and last.startswith("error:") and says in last and "Traceback" not in err, err
    # the same tokenizer check where a run starts from that folder or converts it
    for argv in (["convert", "--from-hf", str(small_vocab), "--out", str(tmp_path / "converted")],
                 ["train", "--init-from", str(small_vocab), "--out", str(tmp_path / "tuned"), "--max-iters", "1"]):
        code = main(argv)
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert code == 2 and "256 ids but the model only 200; they do not belong together" in last, (argv, err)
    assert not (tmp_path / "converted").exists() or not any((tmp_path / "converted").iterdir())


def test_the_readme_openai_example_runs_against_the_server(served, capsys):
    """README's `llmlab serve` client example (a ```py block: tests/test_readme.py runs the ```python
    ones without a server) runs as written, pointed at this server and model."""
    import re

    from conftest import REPO

    blocks = [b for b in re.findall(r"```py\n(.*?)```", (REPO / "README.md").read_text(encoding="utf-8"), re.S)
              if "from openai import OpenAI" in b]
    assert len(blocks) == 1
    code = blocks[0].replace("http://127.0.0.1:8000", served[0].url).replace('model="a"', 'model="tiny"')
    exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - our own documentation
    printed = capsys.readouterr().out
    assert "CompletionUsage(completion_tokens=16" in printed and len(printed.split("\n", 1)[1]) > 0


@pytest.mark.slow
def test_a_hugging_face_folder_is_served_with_its_chat_template(tmp_path):
    """`llmlab serve HF_DIR`: a Llama folder with a ChatML template; the chat prompt is the one
    transformers' apply_chat_template tokenizes (usage.prompt_tokens), greedy text equal to
    llmlab.from_hf + generate's, cut at the folder's eos id."""
    transformers = pytest.importorskip("transformers")
    import llmlab
    from llmlab.hf import _save_hf_tokenizer
    from llmlab.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=128, vocab_size=256, max_position_embeddings=256)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    _save_hf_tokenizer(ByteTokenizer(), tmp_path / "hf")
    tc = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    chatml = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({**tc, "chat_template": chatml}))
    messages = [{"role": "user", "content": "Hi there"}]
    ids = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf").apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    free = llmlab.generate(llmlab.from_hf(tmp_path / "hf"), [list(ids)], 20, temperature=0)[0][len(ids):].tolist()
    eos = free[6]  # a token the greedy reply makes: as the folder's eos it ends the reply there
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "eos_token_id": eos}))
    server = Server(tmp_path / "hf", "--max-batch", "2", log=tmp_path / "server.log")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        out = client.chat.completions.create(model="hf", messages=messages, max_tokens=20, temperature=0)
        assert out.usage.prompt_tokens == len(ids)
        assert out.choices[0].finish_reason == "stop" and out.usage.completion_tokens == free.index(eos) + 1
        assert out.choices[0].message.content == ByteTokenizer().decode(free[:free.index(eos)])
    finally:
        assert server.stop() == 0, server.output()
