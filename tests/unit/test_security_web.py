"""`finetune web` under hostile input: sign-in before exposure, settings a page user may not give, paths that lead
out of the page's outputs folder, secrets in what the page shows, a Chat tab that would hold every model it loaded."""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys
import time
import weakref
from pathlib import Path

import httpx
import pytest

from finetune import config, rundir
from finetune.errors import UserError
from finetune.models import hub
from finetune.runfiles import RunBase
from finetune.web import actions, chat, forms, guard, jobs, runs


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "finetune", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_a_non_loopback_host_without_sign_in_is_refused():
    env = {k: v for k, v in os.environ.items() if k != guard.AUTH_ENV}
    done = subprocess.run([sys.executable, "-m", "finetune", "web", "host=0.0.0.0", "port=1"], capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 2 and "auth_file=PATH" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_sign_in_comes_from_a_file_or_the_environment_never_the_command_line(tmp_path, monkeypatch):
    monkeypatch.delenv(guard.AUTH_ENV, raising=False)
    users = tmp_path / "users"
    users.write_text("# who may sign in\nann:pa:ss\n\nbob:secret\n")
    assert guard.credentials(str(users)) == [("ann", "pa:ss"), ("bob", "secret")]
    monkeypatch.setenv(guard.AUTH_ENV, "carol:pw")
    assert guard.credentials(None) == [("carol", "pw")]
    users.write_text("nobody\n")
    with pytest.raises(UserError, match="line 1: expected user:password"):
        guard.credentials(str(users))
    assert _cli("web", "auth=ann:pw").returncode == 2  # no such option: a password is never an argument


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_page_with_sign_in_answers_nothing_until_signed_in(tmp_path):
    pytest.importorskip("gradio")
    users = tmp_path / "users"
    users.write_text("ann:correct-horse\n")
    port = _free_port()
    log = (tmp_path / "web.log").open("w")
    page = subprocess.Popen([sys.executable, "-m", "finetune", "web", "host=127.0.0.1", f"port={port}",
                             f"auth_file={users}", f"outputs={tmp_path / 'outputs'}"], stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert page.poll() is None and time.monotonic() < deadline, (tmp_path / "web.log").read_text()[-2000:]
            try:
                config = httpx.get(f"{url}/config", timeout=5)
                break
            except httpx.TransportError:
                time.sleep(0.5)
        assert config.status_code == 401
        with httpx.Client(base_url=url, timeout=30) as client:
            assert client.post("/login", data={"username": "ann", "password": "wrong"}).status_code == 400
            assert client.post("/login", data={"username": "ann", "password": "correct-horse"}).status_code == 200
            assert client.get("/config").status_code == 200
    finally:
        page.terminate()
        page.wait(timeout=60)
        log.close()


@pytest.mark.parametrize("extra, fragment", [
    ("reward.fn=os:system", "cannot be set on this page (it runs code"),
    ("overwrite=true", "'overwrite' cannot be set"),
    ("resume=/home/someone/run", "'resume' cannot be set"),
    ("output_dir=/tmp/anywhere", "use the run directory field"),
    ("name=../victim/x", "'name' cannot be set"),
    ("data.path=${oc.env:HF_TOKEN}", "interpolations"),
    ("reward[fn]=os:system", "not a recipe key a page user may set"),
    ("--trust-remote-code", "flag '--trust-remote-code' is not accepted"),
    ("trust_remote_code=true", "trust_remote_code: it is not a recipe key"),
])
def test_the_settings_box_refuses_what_a_page_user_may_not_set(extra, fragment):
    view = forms.estimate("tiny_qwen2_5_demo", {}, extra)
    assert view.error and fragment in view.error and view.chart is None


def test_interpolations_in_a_field_are_refused_too(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_SECRETSECRET")
    view = forms.estimate("tiny_qwen2_5_demo", {"data": "${oc.env:HF_TOKEN}"})
    assert "interpolations" in view.error and "hf_SECRETSECRET" not in view.error + view.yaml


def test_only_listed_recipes_are_read():
    assert "unknown recipe '/etc/passwd.yaml'" in forms.estimate("/etc/passwd.yaml", {}).error


def test_secrets_are_never_rendered(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_SECRETSECRET")
    view = forms.estimate("tiny_qwen2_5_demo", {"data": "/data/hf_SECRETSECRET.jsonl"}, workdir=tmp_path)
    assert view.error is None and "<$HF_TOKEN>" in view.yaml and "<$HF_TOKEN>" in view.command
    assert "hf_SECRETSECRET" not in view.yaml + view.command + view.verdict


def test_file_names_are_safe():
    assert guard.safe_name("../victim/x") == "__victim_x"
    assert guard.safe_name("..") == "_" and guard.safe_name("") == "recipe" and guard.safe_name(".hidden") == "hidden"


def test_a_run_directory_outside_the_outputs_folder_is_refused_and_nothing_starts(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    before = jobs.JOBS.get("train")
    for typed in (str(victim), "../victim", str(tmp_path / "outputs")):
        message, run = actions.start_training(str(tmp_path / "outputs"), "tiny_qwen2_5_demo", {}, None, typed)
        assert message.startswith("error:") and "inside its outputs folder" in message and run is None
    assert jobs.JOBS.get("train") is before and (victim / "keep.txt").read_text() == "mine"


def test_typed_run_paths_are_confined_to_the_outputs_folder(tmp_path):
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "recipe.yaml").write_text("name: x\n")
    (elsewhere / "report.md").write_text("private notes")
    assert "inside its outputs folder" in runs.report_text(str(outputs), str(elsewhere))
    assert "inside its outputs folder" in runs.report_text(str(outputs), "../elsewhere")
    assert "inside its outputs folder" in actions.resume_training(str(outputs), str(elsewhere))[0]
    assert "inside its outputs folder" in actions.start_export(str(outputs), str(elsewhere), "merged", None)
    history, error = chat.reply(str(outputs), str(elsewhere), "hi", [])
    assert history == [] and "inside its outputs folder" in error


def _full_run(path: Path, model: str) -> None:
    """A finished full fine-tuning run whose weights are the tiny model itself (linked: what the test needs is a
    real model to load, not a trained one)."""
    weights = hub.resolve(config.load(None, [f"model={model}"]))
    run = rundir.create(config.load(None, [f"model={model}", "method=full"]), path)
    run.write_base(RunBase(path=str(weights.path), model=model, template=weights.spec.family.template))
    run.model_dir.symlink_to(weights.path, target_is_directory=True)


def test_the_chat_tab_holds_one_model_at_a_time(tmp_path):
    """Clicking through runs must not pile up models in memory: the tab frees the one it held before loading
    another, and nothing else keeps it alive."""
    outputs = tmp_path / "outputs"
    _full_run(outputs / "qwen", "tiny_qwen2_5")
    _full_run(outputs / "llama", "tiny_llama2")
    history, error = chat.reply(str(outputs), "qwen", "hi", [], max_tokens=2)
    assert error == "" and history[-1]["role"] == "assistant"
    first = weakref.ref(chat._LOADED[str((outputs / "qwen").resolve())].backend.model)
    history, error = chat.reply(str(outputs), "llama", "hi", [], max_tokens=2)
    assert error == "" and history[-1]["role"] == "assistant"
    gc.collect()
    assert list(chat._LOADED) == [str((outputs / "llama").resolve())] and first() is None
    chat._LOADED.clear()


def test_inside_resolves_relative_names_under_the_outputs_folder(tmp_path):
    assert guard.inside(tmp_path, "run-1") == (tmp_path / "run-1").resolve()
    (tmp_path / "link").symlink_to("/")
    with pytest.raises(UserError):
        guard.inside(tmp_path, "link/etc")
    assert Path(guard.inside(str(tmp_path), str(tmp_path / "a" / ".." / "b"))).name == "b"
