"""The inference pieces that need no model: streamed text, stops, tool calls read back from what the templates
render, sampling, what `run=`/`adapters=` resolve to, the GGUF a run serves, and the missing-FastAPI message."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from finetune import config, rundir
from finetune.errors import UserError
from finetune.infer import backends, load, tools
from finetune.infer.backends import gguf_file, pick
from finetune.infer.generate import Engine, Sampling, TextStream
from finetune.infer.protocol import APIError, parse
from finetune.models import chat
from finetune.models.tokenizers import bundled_tokenizer
from finetune.runfiles import RunBase

FAMILIES = ["chatglm3", "baichuan2", "qwen1", "qwen2_5", "llama2"]
ANSWER = "  Paris — 巴黎 🗼, about 2.1 million people.\nThat's all!  "
WEATHER = {"name": "get_weather", "description": "Weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


def answer_ids(family: str, answer: dict, tools_: list | None = None) -> list[int]:
    """The ids a model trained on this answer generates: its trained tokens, the stop token left out."""
    tok = bundled_tokenizer(family)
    conv = [{"role": "user", "content": "Where?"}, answer]
    encoded = chat.get(family).encode_conversation(tok, conv, tools=tools_)
    trained = [i for i, label in zip(encoded.input_ids, encoded.labels) if label != -100]
    stops = set(chat.get(family).stop_token_ids(tok))
    return [i for i in trained if i not in stops]


def streamed(tok, ids: list[int], stops: tuple[str, ...] = ()) -> tuple[list[str], TextStream]:
    stream = TextStream(tok, stops)
    deltas = [stream.push(ids[: n + 1]) for n in range(len(ids))]
    if not stream.stopped:
        deltas.append(stream.finish())
    return [d for d in deltas if d], stream


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_deltas_add_up_to_the_stripped_answer(family):
    tok = bundled_tokenizer(family)
    ids = answer_ids(family, {"role": "assistant", "content": ANSWER})
    deltas, stream = streamed(tok, ids)
    assert "".join(deltas) == stream.text == tok.decode(ids, skip_special_tokens=True).strip()
    assert "巴黎 🗼" in stream.text and all("\ufffd" not in d for d in deltas)  # no half characters sent
    assert len(deltas) > 5


def test_a_stop_string_ends_the_answer_and_is_never_sent():
    tok = bundled_tokenizer("qwen2_5")
    ids = tok("Paris is big. STOP here and more", add_special_tokens=False)["input_ids"]
    deltas, stream = streamed(tok, ids, stops=("STOP", "never"))
    assert stream.stopped and "".join(deltas) == stream.text == "Paris is big."
    assert not any("S" in d for d in deltas)


class Scripted:
    """A backend that generates given ids (the Engine's own logic is what is tested)."""

    context_length = 64

    def __init__(self, ids: list[int]):
        self.ids, self.asked = ids, []

    def tokens(self, prompt, sampling, model):
        self.asked.append((len(prompt), sampling.max_tokens, model))
        yield from self.ids[: sampling.max_tokens]


def test_engine_stops_at_the_family_stop_token_and_counts_it():
    tok = bundled_tokenizer("qwen2_5")
    answer = tok("Hello there", add_special_tokens=False)["input_ids"]
    backend = Scripted(answer + [tok.convert_tokens_to_ids("<|im_end|>"), 11, 12])
    engine = Engine(backend, tok, "qwen2_5", ["m"], system="Be brief.")
    prompt = engine.prompt_ids([{"role": "user", "content": "Hi"}])
    assert tok.decode(prompt).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    sent: list[str] = []
    done = engine.generate(prompt, Sampling(max_tokens=100), on_text=sent.append)
    assert (done.text, done.finish_reason, done.completion_tokens) == ("Hello there", "stop", len(answer) + 1)
    assert "".join(sent) == "Hello there" and backend.asked == [(len(prompt), 64 - len(prompt), "m")]
    assert engine.generate(prompt, Sampling(max_tokens=1)).finish_reason == "length"
    with pytest.raises(ValueError, match="context is 64"):
        engine.generate(list(range(64)))


@pytest.mark.parametrize("family", ["qwen2_5", "chatglm3", "qwen1"])
def test_tool_calls_read_back_what_the_template_renders(family):
    call = {"role": "assistant", "content": None,
            "tool_calls": [{"name": "get_weather", "arguments": {"city": "北京", "days": 2, "hourly": True}}]}
    tok = bundled_tokenizer(family)
    text = streamed(tok, answer_ids(family, call, [WEATHER]), chat.get(family).tool_stops)[1].text
    content, calls = tools.parse(chat.get(family), text)
    assert content is None and len(calls) == 1
    assert calls[0]["function"]["name"] == "get_weather" and calls[0]["type"] == "function"
    assert calls[0]["function"]["arguments"] == '{"city": "北京", "days": 2, "hourly": true}'


def test_qwen1_react_answers_read_back_as_openai_api_parses_them():
    """The model stops at "Observation:" (a stop string while tools are offered); its thought is the content."""
    tok = bundled_tokenizer("qwen1")
    generated = tok.encode('Thought: 查一下。\nAction: get_weather\nAction Input: {"city": "北京"}\nObservation: x')
    text = streamed(tok, generated, chat.get("qwen1").tool_stops)[1].text
    content, calls = tools.parse(chat.get("qwen1"), text)
    assert content == "查一下。" and calls[0]["function"]["arguments"] == '{"city": "北京"}'
    assert tools.parse(chat.get("qwen1"), " I now know the final answer.\nFinal Answer: 22 度。") == ("22 度。", [])
    assert tools.parse(chat.get("qwen1"), "Thought: x\nAction: f\nAction Input: not json") == (
        "Thought: x\nAction: f\nAction Input: not json", [])


def test_text_that_is_not_a_call_stays_content():
    oops = "Sunny. <tool_call>{oops</tool_call>"
    assert tools.parse(chat.get("qwen2_5"), oops) == (oops, [])
    assert tools.parse(chat.get("chatglm3"), "get_weather\n```python\nprint(1)\n```") == (
        "get_weather\n```python\nprint(1)\n```", [])
    assert tools.parse(chat.get("llama2"), "<tool_call>{}</tool_call>") == ("<tool_call>{}</tool_call>", [])


def test_sampling_is_greedy_at_zero_and_stays_in_the_nucleus():
    logits = torch.log(torch.tensor([0.1, 0.4, 0.3, 0.2]))
    assert pick(logits, Sampling(temperature=0), None) == 1
    gen = torch.Generator().manual_seed(0)
    drawn = {pick(logits, Sampling(temperature=1.0, top_p=0.6), gen) for _ in range(200)}
    assert drawn == {1, 2}  # 0.4 + 0.3 reaches 0.6; 0.2 and 0.1 are cut
    everything = {pick(logits, Sampling(temperature=1.0), gen) for _ in range(400)}
    assert everything == {0, 1, 2, 3}
    again = [pick(logits, Sampling(temperature=1.0), torch.Generator().manual_seed(5)) for _ in range(3)]
    assert len(set(again)) == 1


def make_run(path: Path, with_adapter: bool = True) -> rundir.RunDir:
    run = rundir.create(config.load(None, ["model=tiny_qwen2_5"]), path)
    run.write_base(RunBase(path=str(path / "base"), model="tiny_qwen2_5", template="qwen2_5"))
    (path / "base").mkdir()
    (path / "base" / "config.json").write_text("{}")
    if with_adapter:
        run.adapter_dir.mkdir()
        (run.adapter_dir / "adapter_config.json").write_text("{}")
        (run.adapter_dir / "tokenizer_config.json").write_text("{}")
    return run


def test_adapters_option_names_adapters_checkpoints_or_runs(tmp_path):
    run = make_run(tmp_path / "run")
    checkpoint = tmp_path / "checkpoint-8"
    checkpoint.mkdir()
    (checkpoint / "adapter_config.json").write_text("{}")
    assert load.parse_adapters(f"a:{run.path},客服.2:{checkpoint}") == {"a": run.adapter_dir, "客服.2": checkpoint}
    for bad, fragment in [("a", "not name:path"), (f"a:{checkpoint},a:{checkpoint}", "twice"),
                          (f"a:{tmp_path}", "not a PEFT adapter"), (f"-x:{checkpoint}", "not name:path")]:
        with pytest.raises(UserError, match=fragment):
            load.parse_adapters(bad)


def test_a_lora_run_serves_its_adapter_under_its_name(tmp_path):
    run = make_run(tmp_path / "my-run")
    source = load._from_run(load.LoadOptions(run=str(run.path)), {})
    assert source.models == ["my-run"] and source.weights == tmp_path / "my-run" / "base"
    assert source.tokenizer == run.adapter_dir and source.template == "qwen2_5"
    with pytest.raises(UserError, match="run= already names the weights"):
        load._from_run(load.LoadOptions(run=str(run.path), model="x"), {})
    with pytest.raises(UserError, match="unknown backend=ggfu"):
        load.resolve(load.LoadOptions(run=str(run.path), backend="ggfu"))


def test_the_gguf_backend_runs_the_latest_quantized_export(tmp_path):
    run = make_run(tmp_path / "run")
    source = load.Source("run", run.path, run.path, "qwen2_5", run=run)
    with pytest.raises(UserError, match=f"finetune export run={run.path} to=gguf"):
        gguf_file(source, None)
    folder = run.export_dir("gguf")
    folder.mkdir(parents=True)
    for name in ("model-f16.gguf", "model-q8_0.gguf", "adapter-f16.gguf"):
        (folder / name).write_bytes(b"")
    assert gguf_file(source, None).name == "model-q8_0.gguf"
    assert gguf_file(source, "f16").name == "model-f16.gguf"
    with pytest.raises(UserError, match="exported: f16, q8_0"):
        gguf_file(source, "q4_k_m")
    with pytest.raises(UserError, match="pass run="):
        gguf_file(load.Source("m", run.path, run.path, "qwen2_5"), None)


def test_serving_without_fastapi_says_which_extra_to_install(monkeypatch):
    from finetune.infer import server  # importable with the core dependencies alone (check_fresh_install.sh)

    monkeypatch.setitem(sys.modules, "fastapi", None)
    with pytest.raises(UserError, match=r"pip install 'finetune\[serve\]'"):
        server.create_app(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("body, status, fragment", [
    ([], 422, "body: must be a JSON object"),
    ({"messages": [{"role": "user", "content": "hi"}]}, 422, "model: is required"),
    ({"model": "m", "messages": []}, 422, "messages: must be a non-empty list"),
    ({"model": "m", "messages": [{"role": "bot", "content": "hi"}]}, 422, "messages.0.role"),
    ({"model": "m", "messages": [{"role": "user", "content": 3}]}, 422, "messages.0.content"),
    ({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "text content"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 2.5}, 422, "temperature"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 422, "top_p: must be a number in (0"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": True}, 422, "max_tokens"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stop": [1]}, 422, "stop"),
])
def test_a_request_is_checked_field_by_field(body, status, fragment):
    with pytest.raises(APIError) as caught:
        parse(body)
    assert caught.value.status == status and fragment in caught.value.message


def test_a_request_reads_as_openai_means_it():
    req = parse({"model": "m", "messages": [{"role": "developer", "content": [{"type": "text", "text": "Be "},
                                                                              {"type": "text", "text": "brief."}]},
                                           {"role": "user", "content": "hi"}],
                 "max_completion_tokens": 5, "max_tokens": 9, "stop": "END", "tools": [WEATHER], "tool_choice": "none",
                 "stream": True, "stream_options": {"include_usage": True}, "logit_bias": {"1": 2}})
    assert req.messages[0] == {"role": "system", "content": "Be brief."}
    assert (req.max_tokens, req.stop, req.tools, req.include_usage) == (5, ("END",), None, True)
    assert (req.temperature, req.top_p, req.n) == (1.0, 1.0, 1)  # OpenAI's defaults


def test_memory_before_loading_is_weights_adapters_and_a_full_kv_cache(tmp_path):
    from finetune.infer import memory
    from finetune.infer.options import ChatOptions

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"\0" * 1000)
    source = load.Source("q", tmp_path, tmp_path, "qwen2_5", {"a": adapter}, registry_name="qwen2_5_7b")
    terms, where, context = memory.plan(source, ChatOptions(run="x", dtype="bf16", device="cpu"))
    assert (where, context) == ("cpu", 32768)
    assert 0 <= terms["weights"] - 7_615_616_512 * 2 < 1024  # Qwen2.5-7B-Instruct in bf16 (+ small buffers)
    assert terms["adapters"] == 1000
    assert terms["kv_cache"] == 2 * 28 * 4 * 128 * 32768 * 2  # K and V, 28 layers, 4 KV heads of 128
    assert "needs ~15.94 GiB on cpu" in memory.describe(source, ChatOptions(run="x", dtype="bf16", device="cpu"))


@pytest.mark.parametrize("model", ["tiny_chatglm3", "tiny_baichuan2_7b", "tiny_baichuan2_13b", "tiny_qwen1",
                                   "tiny_qwen2_5", "tiny_llama2"])
def test_the_token_loop_generates_what_model_generate_does(model):
    """Every native class (ALiBi included) through our cached loop, greedy, multi-turn with a system prompt."""
    from finetune.infer.options import ChatOptions

    options = ChatOptions(model=model)
    engine = backends.load(load.resolve(options), options)
    prompt = engine.prompt_ids([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好?"},
                                {"role": "assistant", "content": "I am fine."}, {"role": "user", "content": "More."}])
    done = engine.generate(prompt, Sampling(max_tokens=12))
    ids, stops = torch.tensor([prompt]), sorted(engine.stop_ids)
    out = engine.backend.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                        do_sample=False, eos_token_id=stops, pad_token_id=stops[0])[0, len(prompt):]
    assert done.token_ids == [t for t in out.tolist() if t not in stops]
    assert done.text == engine.tokenizer.decode(out, skip_special_tokens=True).strip()
