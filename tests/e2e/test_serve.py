"""`finetune serve` for real: the server started as a subprocess on 127.0.0.1, driven by the official `openai`
client (and raw HTTP for what a client library would refuse to send). One run trained through the CLI is served
with a second adapter (its step-8 checkpoint), so choosing the model by name is checked against each adapter's
own greedy answer in plain transformers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

openai = pytest.importorskip("openai")

KEY = "sk-test-finetune"
ASK = "你是谁？"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(chat_run):
    """(base url, process): `finetune serve` with the run and its step-8 adapter, alive until the module ends."""
    port = _free_port()
    early = chat_run.checkpoints_dir / "checkpoint-8"
    log = open(chat_run.path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "finetune", "serve", f"run={chat_run.path}",
                             f"adapters=early:{early}", f"port={port}", f"api_key={KEY}"],
                            stdout=subprocess.DEVNULL, stderr=log,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert proc.poll() is None, (chat_run.path / "serve.log").read_text()[-3000:]
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.5)
    else:
        pytest.fail("the server did not come up in 300 s")
    yield url, proc
    proc.terminate()  # uvicorn shuts down gracefully, then exits by the signal it caught (status -15)
    assert proc.wait(timeout=60) in (0, -15)
    log.close()
    assert "Traceback" not in (chat_run.path / "serve.log").read_text()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=0, timeout=120)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def test_models_are_the_run_and_each_adapter(client, chat_run):
    assert [m.id for m in client.models.list().data] == [chat_run.path.name, "early"]


def test_answer_is_the_greedy_answer_with_usage_counts(client, chat_run, reference):
    out = client.chat.completions.create(model=chat_run.path.name, messages=[user(ASK)], temperature=0)
    want, ids = reference.generate([user(ASK)])
    assert out.choices[0].message.content == want and out.choices[0].finish_reason == "stop"
    assert out.usage.prompt_tokens == len(reference.prompt([user(ASK)]))
    assert out.usage.completion_tokens == len(ids)  # the stop token included: it was generated
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_streamed_deltas_add_up_to_the_same_answer(client, chat_run, reference):
    chunks = list(client.chat.completions.create(model=chat_run.path.name, messages=[user(ASK)], temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference.generate([user(ASK)])[0]
    assert sum(bool(c.choices and c.choices[0].delta.content) for c in chunks) > 3  # token by token, not at once
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens > 0


def test_model_name_chooses_the_adapter(client, chat_run, reference):
    early = chat_run.checkpoints_dir / "checkpoint-8"
    for name, adapter in (("early", early), (chat_run.path.name, chat_run.adapter_dir), ("early", early)):
        out = client.chat.completions.create(model=name, messages=[user("Who are you?")], temperature=0,
                                             max_tokens=24)
        assert out.choices[0].message.content == reference.generate([user("Who are you?")], adapter, 24)[0], name


def test_multi_turn_history_and_system_reach_the_prompt(client, chat_run, reference):
    turns = [{"role": "system", "content": "You are a pirate."}, user("Who are you?"),
             {"role": "assistant", "content": "Arr."}, user(ASK)]
    out = client.chat.completions.create(model=chat_run.path.name, messages=turns, temperature=0, max_tokens=24)
    assert out.usage.prompt_tokens == len(reference.prompt(turns[1:], system="You are a pirate."))
    assert out.choices[0].message.content == reference.generate(turns[1:], None, 24, system="You are a pirate.")[0]


def test_max_tokens_and_stop_strings_end_the_answer(client, chat_run, reference):
    name, want = chat_run.path.name, reference.generate([user(ASK)])[0]
    short = client.chat.completions.create(model=name, messages=[user(ASK)], temperature=0, max_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    assert want.startswith(short.choices[0].message.content)
    stop = want[4:6]
    cut = client.chat.completions.create(model=name, messages=[user(ASK)], temperature=0, stop=[stop])
    assert cut.choices[0].message.content == want[: want.index(stop)].strip()
    assert cut.choices[0].finish_reason == "stop"


def test_sampling_with_a_seed_is_repeatable(client, chat_run):
    ask = dict(model=chat_run.path.name, messages=[user("Who are you?")], temperature=1.0, top_p=0.9, seed=7,
               max_tokens=12)
    first, second = (client.chat.completions.create(**ask).choices[0].message.content for _ in range(2))
    assert first == second


def test_tools_go_into_the_qwen2_5_prompt(client, chat_run):
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                             "parameters": {"type": "object", "properties": {
                                                 "city": {"type": "string"}}, "required": ["city"]}}}
    ask = dict(model=chat_run.path.name, messages=[user("北京天气怎么样？")], temperature=0, max_tokens=8)
    plain, with_tools = client.chat.completions.create(**ask), client.chat.completions.create(**ask, tools=[tool])
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens + 50  # the # Tools block
    assert with_tools.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_a_wrong_or_missing_key_is_401(server, chat_run):
    bad = openai.OpenAI(base_url=f"{server[0]}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        bad.models.list()
    assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
    raw = httpx.post(f"{server[0]}/v1/chat/completions", json={"model": chat_run.path.name,
                                                               "messages": [user(ASK)]})
    assert raw.status_code == 401 and raw.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server[0]}/health").json()["status"] == "ok"  # probes need no key


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4", messages=[user(ASK)])
    assert caught.value.code == "model_not_found" and "early" in caught.value.message


@pytest.mark.parametrize("body, status, fragment", [
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n > 1"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "expected role 'user'"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400, "no name"),
    ({"messages": "hi"}, 422, "messages"),
    ({"messages": []}, 422, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 5}, 422, "temperature"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 422, "role"),
    ("{not json", 400, "not valid JSON"),
])
def test_bad_requests_get_openai_shaped_errors(server, chat_run, body, status, fragment):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    content = body if isinstance(body, str) else json.dumps({"model": chat_run.path.name, **body})
    answer = httpx.post(f"{server[0]}/v1/chat/completions", content=content, headers=headers, timeout=60)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert fragment in error["message"] and set(error) == {"message", "type", "param", "code"}


def test_a_client_that_leaves_mid_stream_is_cancelled_and_frees_the_queue(client, server, chat_run):
    health = lambda: httpx.get(f"{server[0]}/health", timeout=10).json()  # noqa: E731
    before = health()["cancelled"]
    stream = client.chat.completions.create(model=chat_run.path.name, messages=[user("Tell me a story")],
                                            temperature=1.0, seed=1, max_tokens=2000, stream=True)
    for _, _ in zip(range(3), stream):
        pass
    stream.close()
    deadline = time.monotonic() + 30
    while health()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert health() | {"models": None} == {"status": "ok", "in_flight": 0, "queued": 0, "cancelled": before + 1,
                                           "refused": 0, "models": None}
    out = client.chat.completions.create(model=chat_run.path.name, messages=[user(ASK)], temperature=0)
    assert out.choices[0].message.content


def test_50_requests_8_at_a_time_all_answered_and_the_server_stays_up(client, server, chat_run):
    questions = [ASK, "Who are you?", "你好", "What can you do?", "1+1=?"]

    def ask(i: int) -> str:
        kw = dict(model=("early", chat_run.path.name)[i % 2], messages=[user(questions[i % 5])],
                  temperature=0.7, seed=i, max_tokens=8)
        if i % 3 == 0:
            chunks = list(client.chat.completions.create(**kw, stream=True))
            assert chunks[-1].choices[0].finish_reason in ("stop", "length")
            return "".join(c.choices[0].delta.content or "" for c in chunks)
        out = client.chat.completions.create(**kw)
        assert out.choices[0].finish_reason in ("stop", "length")
        return out.choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        pending = [pool.submit(ask, i) for i in range(50)]
        health = [httpx.get(f"{server[0]}/health", timeout=10).json()["status"] for _ in range(5)]
        answers = [job.result(timeout=600) for job in pending]
    assert len(answers) == 50 and all(isinstance(a, str) for a in answers)
    assert health == ["ok"] * 5 and server[1].poll() is None
    after = httpx.get(f"{server[0]}/health").json()
    assert (after["status"], after["in_flight"], after["models"]) == ("ok", 0, [chat_run.path.name, "early"])
