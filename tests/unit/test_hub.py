"""Getting a model as users do: registry ids per hub, local dirs in either layout, and every way a download fails.

Downloads run the real huggingface_hub client against tests/unit/hub_server.py on 127.0.0.1 (HF_ENDPOINT): there
is no network here, and nothing of ours is mocked.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from huggingface_hub import constants as hf_constants
from transformers import AutoModelForCausalLM

from finetune import config
from finetune.errors import UserError
from finetune.models import registry
from finetune.models.convert import cache_root
from finetune.models.hub import hub_id, missing_parts, resolve
from finetune.models.tiny import cached_tiny

from hub_server import FakeRepo, HubServer, closed_port, serve

# What each shipped model downloads, per hub. The ModelScope ids were checked against the publishers' own READMEs
# (THUDM/ChatGLM3, QwenLM/Qwen, ymcui/Chinese-LLaMA-Alpaca-2) and LLaMA-Factory / ms-swift model tables.
IDS = {
    ("chatglm3_6b", "chat"): ("THUDM/chatglm3-6b", "ZhipuAI/chatglm3-6b"),
    ("chatglm3_6b", "base"): ("THUDM/chatglm3-6b-base", "ZhipuAI/chatglm3-6b-base"),
    ("chatglm3_6b", "32k"): ("THUDM/chatglm3-6b-32k", "ZhipuAI/chatglm3-6b-32k"),
    ("baichuan2_7b", "chat"): ("baichuan-inc/Baichuan2-7B-Chat", "baichuan-inc/Baichuan2-7B-Chat"),
    ("baichuan2_7b", "base"): ("baichuan-inc/Baichuan2-7B-Base", "baichuan-inc/Baichuan2-7B-Base"),
    ("baichuan2_13b", "chat"): ("baichuan-inc/Baichuan2-13B-Chat", "baichuan-inc/Baichuan2-13B-Chat"),
    ("baichuan2_13b", "base"): ("baichuan-inc/Baichuan2-13B-Base", "baichuan-inc/Baichuan2-13B-Base"),
    ("qwen1_7b", "chat"): ("Qwen/Qwen-7B-Chat", "qwen/Qwen-7B-Chat"),
    ("qwen1_7b", "base"): ("Qwen/Qwen-7B", "qwen/Qwen-7B"),
    **{(f"qwen2_5_{size.lower().replace('.', '_')}", variant): (f"Qwen/Qwen2.5-{size}{suffix}",) * 2
       for size in ("7B", "3B", "1.5B", "0.5B") for variant, suffix in (("instruct", "-Instruct"), ("base", ""))},
    # the 0.5B instruct models as their ModelScope pages spell them (lower-case org)
    ("qwen2_5_0_5b", "instruct"): ("Qwen/Qwen2.5-0.5B-Instruct", "qwen/Qwen2.5-0.5B-Instruct"),
    ("qwen2_5_0_5b", "coder_instruct"): ("Qwen/Qwen2.5-Coder-0.5B-Instruct", "qwen/Qwen2.5-Coder-0.5B-Instruct"),
    ("llama2_7b", "chat"): ("meta-llama/Llama-2-7b-chat-hf", "modelscope/Llama-2-7b-chat-ms"),
    ("llama2_7b", "base"): ("meta-llama/Llama-2-7b-hf", "modelscope/Llama-2-7b-ms"),
    ("llama2_7b", "zh"): ("hfl/chinese-llama-2-7b", "ChineseAlpacaGroup/chinese-llama-2-7b"),
    ("llama2_13b", "chat"): ("meta-llama/Llama-2-13b-chat-hf", "modelscope/Llama-2-13b-chat-ms"),
    ("llama2_13b", "base"): ("meta-llama/Llama-2-13b-hf", "modelscope/Llama-2-13b-ms"),
}
SHIPPED = [(name, v.name) for name, (_, m) in sorted(registry.models().items()) if not m.tiny for v in m.variants]


def recipe(model: str, *overrides: str) -> config.Recipe:
    return config.load(None, [f"model={model}", *overrides])


@pytest.fixture
def online(monkeypatch, tmp_path):
    """The hub on 127.0.0.1 only (each test sets HF_ENDPOINT): a fresh HF cache, no token, offline mode off."""
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return monkeypatch


def repo_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


def fetched(hub: HubServer, since: int = 0) -> set[str]:
    """The files the client downloaded (GET) from `hub`, from request number `since` on."""
    return {path.rsplit("/", 1)[1] for method, path, _ in hub.log[since:] if method == "GET" and "/resolve/" in path}


def test_every_shipped_model_and_variant_has_its_ids_listed_here():
    assert sorted(IDS) == sorted(SHIPPED)


@pytest.mark.parametrize("name,variant", SHIPPED)
@pytest.mark.parametrize("hub", ["hf", "modelscope"])
def test_hub_id_is_the_variant_id_on_that_hub(name, variant, hub):
    spec = registry.spec(name, variant)
    chosen = hub_id(spec, hub)
    assert chosen == IDS[name, variant][hub == "modelscope"]
    back = registry.spec_for_hub_id(chosen)  # a hub id given as model= finds the same registry entry
    assert (back.name, back.variant.name) == (name, variant)


def test_tiny_models_have_no_hub_id():
    with pytest.raises(UserError, match="built locally"):
        hub_id(registry.spec("tiny_qwen2_5"), "hf")


def test_tiny_registry_model_is_built_locally_without_any_hub(online):
    with closed_port() as url:
        online.setenv("HF_ENDPOINT", url)
        got = resolve(recipe("tiny_qwen2_5"), progress=False)
    assert got.path == cached_tiny("tiny_qwen2_5", layout="native")
    assert got.spec.name == "tiny_qwen2_5" and got.source == "tiny model built locally"


def test_modelscope_without_its_client_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "modelscope", None)  # not installed, even where it is: never reach modelscope.cn
    with pytest.raises(UserError) as err:
        resolve(recipe("chatglm3_6b", "variant=base", "hub=modelscope"))
    assert "pip install modelscope" in str(err.value)


def test_local_native_dir_is_used_as_is():
    local = cached_tiny("tiny_llama2", layout="native")
    got = resolve(recipe(str(local)))
    assert got.path == local and got.source == f"local dir {local}"
    assert got.spec.name == "tiny_llama2"


def test_local_original_layout_dir_is_converted_to_a_native_checkpoint():
    local = cached_tiny("tiny_baichuan2_7b", layout="original")
    got = resolve(recipe(str(local)), progress=False)
    assert got.path.is_relative_to(cache_root() / "converted")
    assert got.spec.name == "tiny_baichuan2_7b" and "converted" in got.source
    model = AutoModelForCausalLM.from_pretrained(got.path)  # no trust_remote_code
    assert type(model).__name__ == registry.family("baichuan2").native_class
    again = resolve(recipe(str(got.path)))  # the converted directory given as model=: used as is, still known
    assert again.path == got.path and again.spec.name == "tiny_baichuan2_7b"


def fake_checkpoint(directory: Path, config: dict) -> Path:
    """config.json plus a stand-in weights file: enough for resolve, which reads configs and never loads weights."""
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "model.safetensors").write_bytes(b"weights")
    return directory


def test_local_dir_is_identified_by_its_config_and_variant_picks_among_identical_ones(tmp_path):
    llama = fake_checkpoint(tmp_path / "llama", registry.spec("llama2_7b").original_config)
    assert resolve(recipe(str(llama))).spec.variant.name == "chat"
    assert resolve(recipe(str(llama), "variant=base")).spec.variant.name == "base"
    assert resolve(recipe(str(llama), "variant=instruct")).spec.variant.name == "chat"  # not a Llama-2 variant
    chinese = fake_checkpoint(tmp_path / "zh", registry.spec("llama2_7b", "zh").original_config)
    assert resolve(recipe(str(chinese))).spec.variant.name == "zh"  # told apart by its enlarged vocabulary
    qwen_base = fake_checkpoint(tmp_path / "qb", registry.spec("qwen2_5_7b", "base").original_config)
    assert resolve(recipe(str(qwen_base))).spec.variant.name == "base"
    unknown = fake_checkpoint(tmp_path / "other", {**registry.spec("llama2_7b").original_config, "hidden_size": 8})
    assert resolve(recipe(str(unknown))).spec is None


def test_local_dir_without_config_names_what_is_missing(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(UserError, match=r"local dir .*: no config.json"):
        resolve(recipe(str(tmp_path)))


def test_local_dir_missing_a_listed_shard_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"x")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(UserError, match=r"1 of 2 weight files .* missing \(model-00002-of-00002.safetensors\)"):
        resolve(recipe(str(tmp_path)))


def test_unknown_name_and_missing_path_are_one_clear_line():
    with pytest.raises(UserError, match="did you mean: qwen2_5_7b"):
        resolve(recipe("qwen2_5_7"))
    with pytest.raises(UserError, match="local directory .*does not exist"):
        resolve(recipe("./models/nowhere"))


def test_offline_mode_without_a_cached_copy_says_so(monkeypatch, tmp_path):
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(UserError, match="HF_HUB_OFFLINE is set and Qwen/Qwen2.5-0.5B-Instruct is not in the cache"):
        resolve(recipe("qwen2_5_0_5b"))


def test_unreachable_hub_names_model_hub_and_what_to_do(online):
    with closed_port() as url:
        online.setenv("HF_ENDPOINT", url)
        with pytest.raises(UserError) as err:
            resolve(recipe("qwen2_5_7b"), progress=False)
    message = str(err.value)
    assert "\n" not in message
    for part in ("Qwen/Qwen2.5-7B-Instruct", f"Hugging Face (mirror {url})", "Connection refused",
                 "hub=modelscope (Qwen/Qwen2.5-7B-Instruct)", "HF_ENDPOINT=https://hf-mirror.com", "local directory"):
        assert part in message


@pytest.mark.parametrize("token,why", [(None, "you are not logged in"), ("hf_x", "not been granted access")])
def test_gated_model_asks_to_accept_the_license_and_log_in(online, token, why):
    if token:
        online.setenv("HF_TOKEN", token)
    hub = HubServer({"meta-llama/Llama-2-7b-chat-hf": FakeRepo({"config.json": b"{}"}, gated=True)})
    with serve(hub) as url:
        online.setenv("HF_ENDPOINT", url)
        with pytest.raises(UserError) as err:
            resolve(recipe("llama2_7b"), progress=False)
    message = str(err.value)
    assert "\n" not in message and why in message
    for part in ("meta-llama/Llama-2-7b-chat-hf is gated", "accept its license on "
                 "https://huggingface.co/meta-llama/Llama-2-7b-chat-hf", "hf auth login", "HF_TOKEN",
                 "hub=modelscope (modelscope/Llama-2-7b-chat-ms)"):
        assert part in message


def test_missing_repo_suggests_the_closest_ids(online):
    with serve(HubServer({})) as url:
        online.setenv("HF_ENDPOINT", url)
        with pytest.raises(UserError, match=r"has no model Qwen/Qwen2.5-7B-Instruc .*did you mean: "
                                            r"Qwen/Qwen2.5-7B-Instruct"):
            resolve(recipe("Qwen/Qwen2.5-7B-Instruc"), progress=False)


def test_download_fetches_only_what_a_model_needs_and_loads_natively(online):
    files = repo_files(cached_tiny("tiny_llama2", layout="native"))
    hub = HubServer({"someone/tiny-llama": FakeRepo({**files, "modeling_llama.py": b"import os",
                                                    "pytorch_model.bin": b"duplicate weights", "README.md": b"#"})})
    with serve(hub) as url:
        online.setenv("HF_ENDPOINT", url)
        got = resolve(recipe("someone/tiny-llama"), progress=False)
    assert got.source == f"Hugging Face (mirror {url}) someone/tiny-llama"
    assert got.path.is_relative_to(Path(os.environ["HF_HOME"]) / "hub")
    assert sorted(p.name for p in got.path.iterdir()) == sorted(files)
    assert fetched(hub) == set(files)  # never the .py, the duplicate .bin or the README
    assert got.spec.name == "tiny_llama2"
    assert type(AutoModelForCausalLM.from_pretrained(got.path)).__name__ == "LlamaForCausalLM"


def test_bin_weights_are_fetched_only_when_there_are_no_safetensors(online):
    hub = HubServer({"old/model": FakeRepo({"config.json": b"{}", "pytorch_model.bin": b"w" * 10})})
    with serve(hub) as url:
        online.setenv("HF_ENDPOINT", url)
        got = resolve(recipe("old/model"), progress=False)
    assert (got.path / "pytorch_model.bin").read_bytes() == b"w" * 10
    assert got.spec is None


def test_connection_dropped_mid_file_resumes_from_where_it_stopped(online):
    weights = bytes(range(256)) * (11 * 4096)  # 11 MiB: past huggingface_hub's 10 MiB write chunk
    hub = HubServer({"org/big": FakeRepo({"config.json": b"{}", "model.safetensors": weights})},
                    drop={"model.safetensors": 10 * 2**20 + 12345})
    with serve(hub) as url:
        online.setenv("HF_ENDPOINT", url)
        got = resolve(recipe("org/big"), progress=False)
    assert (got.path / "model.safetensors").read_bytes() == weights
    assert hub.gets("model.safetensors") == [None, f"bytes={10 * 2**20}-"]


def test_interrupted_download_leaves_nothing_that_looks_complete_and_reruns_resume(online):
    files = {"config.json": b"{}", "tokenizer.json": b'{"version": "1.0"}', "model.safetensors": b"\x01" * 50_000}
    hub = HubServer({"org/flaky": FakeRepo(files)}, drop={"model.safetensors": 20_000}, down=True)
    with serve(hub) as url:
        online.setenv("HF_ENDPOINT", url)
        with pytest.raises(UserError, match="download of org/flaky .* was interrupted .*run the same command "
                                            "again to resume"):
            resolve(recipe("org/flaky"), progress=False)
        snapshot = next((Path(os.environ["HF_HOME"]) / "hub" / "models--org--flaky" / "snapshots").iterdir())
        assert not (snapshot / "model.safetensors").exists() and missing_parts(snapshot)
        assert not list(snapshot.parent.parent.rglob("*.incomplete"))
        with closed_port() as down_url:  # offline now: the partial copy must not pass for a model
            online.setenv("HF_ENDPOINT", down_url)
            with pytest.raises(UserError, match="cached copy of org/flaky .* is incomplete"):
                resolve(recipe("org/flaky"), progress=False)
        online.setenv("HF_ENDPOINT", url)
        hub.down = False
        missing, before = {name for name in files if not (snapshot / name).exists()}, len(hub.log)
        got = resolve(recipe("org/flaky"), progress=False)
    assert got.path == snapshot and missing_parts(snapshot) is None
    assert repo_files(snapshot) == files
    assert fetched(hub, before) == missing  # the rerun fetched only what the interrupted run had not finished


def test_downloaded_original_checkpoint_is_converted_and_ids_follow_the_hub(online, tmp_path):
    original = cached_tiny("tiny_chatglm3", layout="original")
    online.setenv("FINETUNE_CACHE", str(tmp_path))  # a fresh conversion, not one cached by an earlier run
    hub = HubServer({"THUDM/chatglm3-6b": FakeRepo(repo_files(original))})
    with serve(hub) as url:
        online.setenv("HF_ENDPOINT", url)
        got = resolve(recipe("ZhipuAI/chatglm3-6b"), progress=False)  # its ModelScope id, with hub=hf
    assert got.source.startswith(f"Hugging Face (mirror {url}) THUDM/chatglm3-6b, converted")
    assert got.spec.name == "chatglm3_6b"
    assert got.path.is_relative_to(tmp_path / "converted")
    model = AutoModelForCausalLM.from_pretrained(got.path)  # no trust_remote_code
    assert type(model).__name__ == registry.family("chatglm3").native_class
