"""Run directories and data under careless or hostile input: one writer per run, a replaced run kept until the new
one has started, registry entries that stay in their folder, JSON that would crash the parsers, remote code only
from the command line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from finetune import config, rundir
from finetune.data import files, formats, load, registry, turns
from finetune.errors import UserError
from finetune.infer import tools
from finetune.models import chat


def _recipe(path: Path, *extra: str) -> config.Recipe:
    return config.load(None, ["model=tiny_qwen2_5", f"output_dir={path}", *extra])


def test_a_second_writer_is_told_which_pid_holds_the_run(tmp_path):
    run = rundir.create(_recipe(tmp_path / "run"))
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from finetune import rundir
        lock = rundir.RunLock(rundir.Path({str(run.path)!r}), "export")
        print("held", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=rf"in use by pid {holder.pid} \(export\)"):
            rundir.RunLock(run.path, "train")
        from finetune.export import pipeline

        with pytest.raises(UserError, match=rf"in use by pid {holder.pid}"):
            pipeline.export(run.path, "merged")
    finally:
        holder.kill()
        holder.wait()
    with rundir.RunLock(run.path, "train"):  # the kernel dropped the dead process's lock
        with pytest.raises(UserError, match="in use by pid"):
            rundir.RunLock(run.path, "export")


def test_overwrite_moves_the_old_run_aside_and_puts_it_back_when_the_new_one_fails(tmp_path):
    old = rundir.create(_recipe(tmp_path / "run"))
    (old.path / "adapter").mkdir()
    (old.path / "adapter" / "weights").write_text("finished run")
    claimed = rundir.claim(_recipe(tmp_path / "run", "overwrite=true", "seed=7"))
    assert claimed.replaced is not None and claimed.replaced.name.startswith(".replaced-run-")
    assert (claimed.replaced / "adapter" / "weights").read_text() == "finished run"
    with pytest.raises(UserError, match="in use by pid"):  # the new run is locked while it is set up
        rundir.claim(_recipe(tmp_path / "run", "overwrite=true"))
    claimed.failed()
    assert (tmp_path / "run" / "adapter" / "weights").read_text() == "finished run"
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_overwrite_removes_the_old_run_once_the_new_one_has_started(tmp_path):
    rundir.create(_recipe(tmp_path / "run"))
    claimed = rundir.claim(_recipe(tmp_path / "run", "overwrite=true", "seed=7"))
    claimed.started()
    claimed.lock.release()
    assert [p.name for p in tmp_path.iterdir()] == ["run"] and "seed: 7" in claimed.run.recipe_file.read_text()


def test_a_run_locked_by_someone_else_is_not_replaced(tmp_path):
    old = rundir.create(_recipe(tmp_path / "run"))
    with rundir.RunLock(old.path, "train"):
        with pytest.raises(UserError, match="in use by pid"):
            rundir.claim(_recipe(tmp_path / "run", "overwrite=true"))
    assert old.recipe_file.is_file() and [p.name for p in tmp_path.iterdir()] == ["run"]


def test_a_checkpoint_cut_short_while_saving_is_not_resumed_from(tmp_path):
    """kill -9 while the Trainer writes trainer_state.json (in place, last) leaves it empty: resume takes the one
    before it."""
    run = rundir.RunDir(tmp_path)
    for step, state in ((2, '{"global_step": 2}'), (4, ""), (6, '{"global_st')):
        (run.checkpoints_dir / f"checkpoint-{step}").mkdir(parents=True)
        (run.checkpoints_dir / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    assert run.last_checkpoint() == run.checkpoints_dir / "checkpoint-2"


@pytest.mark.parametrize("entry, fragment", [
    ({"file_name": "../secret.jsonl"}, "leads outside"),
    ({"file_name": "/etc/passwd"}, "leads outside"),
    ({"file_name": "."}, "leads outside"),
    ({"file_name": "link/secret.jsonl"}, "leads outside"),
    ({"hf_hub_url": "/"}, "not a hub dataset id"),
    ({"hf_hub_url": "../outside"}, "not a hub dataset id"),
])
def test_registry_entries_stay_inside_their_folder(tmp_path, entry, fragment):
    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "secret.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    (tmp_path / "outside").mkdir()
    (data / "link").symlink_to(tmp_path)
    (data / registry.INFO).write_text(json.dumps({"x": entry}))
    with pytest.raises(UserError, match=fragment):
        registry.entry(str(data), "x")


def test_a_hub_id_that_is_also_a_local_directory_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / registry.INFO).write_text(json.dumps({"x": {"hf_hub_url": "org/name"}}))
    with pytest.raises(UserError, match="not a hub dataset id"):
        registry.entry("data", "x")
    (tmp_path / "data" / registry.INFO).write_text(json.dumps({"x": {"hf_hub_url": "org/other"}}))
    assert registry.entry("data", "x").path == "org/other"


def test_deep_nesting_is_one_clear_error_naming_the_line_never_a_crash(tmp_path):
    """Run in a subprocess: before the check, pyarrow killed the process (SIGSEGV) on the JSON Lines file."""
    deep = 100_000
    (tmp_path / "deep.jsonl").write_text('{"instruction": "a", "output": "b"}\n'
                                         f'{{"instruction": "a", "output": {"[" * deep}{"]" * deep}}}\n')
    (tmp_path / "deep.json").write_text('[\n{"instruction": "a", "output": "b"},\n'
                                        f'{{"instruction": "a", "output": {"[" * 5000}{"]" * 5000}}}\n]\n')
    script = textwrap.dedent(f"""
        import os
        os.environ["FINETUNE_CACHE"] = {str(tmp_path / "cache")!r}
        from pathlib import Path
        from finetune.data import files
        from finetune.errors import UserError
        for name in ("deep.jsonl", "deep.json"):
            try:
                files.read_file(Path({str(tmp_path)!r}) / name)
            except UserError as exc:
                print(exc)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == [
        f"{tmp_path / 'deep.jsonl'} line 2: nested more than 100 levels deep; no chat or instruction record needs "
        "that (is it the right file?)",
        f"{tmp_path / 'deep.json'} line 3: nested more than 100 levels deep; no chat or instruction record needs "
        "that (is it the right file?)"]


def test_a_huge_json_lines_record_is_refused_by_line(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "MAX_LINE_BYTES", 1000)
    path = tmp_path / "big.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n' + json.dumps({"instruction": "x" * 5000}) + "\n")
    with pytest.raises(UserError, match=r"big.jsonl line 2: longer than"):
        files.check_json_shape(path)


def test_brackets_inside_strings_are_not_nesting(tmp_path):
    path = tmp_path / "ok.jsonl"
    path.write_text(json.dumps({"instruction": "[" * 500 + "{" * 500, "output": "]"}) + "\n")
    files.check_json_shape(path)


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def _call_turns(arguments: str) -> list[dict]:
    return [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": None,
             "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": arguments}}]},
            {"role": "tool", "content": "r"}, {"role": "assistant", "content": "yo"}]


def test_deep_json_inside_a_text_field_is_a_bad_record_of_its_line(tmp_path):
    """`tools`, a call's arguments and a function_call turn hold JSON as text, which the file's own check cannot
    see into: Python's parser ran out of stack on them (a RecursionError traceback), and a value just under that
    would have broken later, where training dumps it again."""
    pair = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    bad = [{"messages": pair, "tools": _nested(100_000)},
           {"messages": pair, "tools": json.dumps([{"name": "f", "parameters": json.loads(_nested(99))}])},
           {"messages": _call_turns(json.dumps({"a": json.loads(_nested(200))}))},
           {"messages": [pair[0], {"role": "function_call", "content": _nested(100_000)},
                         {"role": "tool", "content": "r"}, pair[1]]}]
    out = formats.convert_batch({"messages": [r["messages"] for r in bad], "tools": [r.get("tools") for r in bad]},
                                list(range(4)), fmt="messages", columns={}, roles={}, src="x")
    assert out["_why"] == ["'tools' is nested more than 100 levels deep"] * 2 + [
        "messages[1].tool_calls[0]: arguments are nested more than 100 levels deep",
        "messages[1]: the tool call is nested more than 100 levels deep"]
    path = tmp_path / "deep.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in [{"messages": pair}, *bad]))
    with pytest.raises(UserError, match=re.escape(f"{path}: 4 of 5 records are malformed (lines 2, 3, 4, 5): line 2: "
                                                  "'tools' is nested more than 100 levels deep")):
        load.load_splits(config.load(None, ["model=tiny_qwen2_5", f"data.path={path}"]))
    data, dropped, _ = load.load_splits(config.load(None, ["model=tiny_qwen2_5", f"data.path={path}",
                                                           "data.on_bad_record=skip"]))
    assert dropped == {"bad_tools": 2, "bad_tool_call": 2} and len(data["train"]) == 1


def test_json_text_may_nest_up_to_the_limit():
    schema = json.dumps([{"name": "f", "parameters": json.loads(_nested(turns.MAX_DEPTH - 2))}])
    assert turns.tools_of(schema, "tools") == schema
    with pytest.raises(turns.BadRecord, match="'tools' is nested more than 100 levels deep"):
        turns.tools_of(json.dumps([{"name": "f", "parameters": json.loads(_nested(turns.MAX_DEPTH - 1))}]), "tools")
    with pytest.raises(turns.BadRecord, match="arguments are not valid JSON \\(a number with too many digits\\)"):
        turns.calls_of([{"name": "f", "arguments": '{"a": ' + "1" * 5000 + "}"}], "messages[1]")


def test_a_deep_registry_is_one_clear_error_naming_it(tmp_path):
    for depth in (100_000, 200):  # past the parser's stack; under it, but past anything a registry holds
        (tmp_path / registry.INFO).write_text(json.dumps({"x": {"file_name": "a.jsonl"}})[:-1]
                                              + f', "y": {{"columns": {_nested(depth)}}}}}')
        with pytest.raises(UserError, match=rf"^{tmp_path / registry.INFO}: nested more than 100 levels deep"):
            registry.entry(str(tmp_path), "x")


def test_trust_remote_code_is_not_a_recipe_key_but_old_runs_still_load(tmp_path):
    with pytest.raises(UserError, match="pass --trust-remote-code on the training command line"):
        config.load("tiny_qwen2_5_demo", ["trust_remote_code=true"])
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(config.to_yaml(config.load("tiny_qwen2_5_demo")) + "trust_remote_code: false\n")
    assert config.from_yaml_file(recipe_file) == config.load("tiny_qwen2_5_demo")
    (tmp_path / "mine.yaml").write_text("extends: tiny_qwen2_5_demo\ntrust_remote_code: true\n")
    with pytest.raises(UserError, match="mine.yaml: trust_remote_code"):
        config.load(str(tmp_path / "mine.yaml"))


def test_the_flag_reaches_training_only_from_the_command_line(capsys):
    from finetune import cli

    with pytest.raises(SystemExit):
        cli.cmd_train(["--help"])
    assert "--trust-remote-code" in capsys.readouterr().out


def test_a_chatglm3_call_with_an_unhashable_key_stays_text():
    text = "get_weather\n```python\ntool_call(city={['a']: 1})\n```"
    assert tools.parse(chat.get("chatglm3"), text) == (text, [])
    deep = "get_weather\n```python\ntool_call(city=" + "[" * 100_000 + "]" * 100_000 + ")\n```"
    assert tools.parse(chat.get("chatglm3"), deep)[1] == []
