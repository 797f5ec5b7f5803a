"""The export's decisions, as pure rules: when a GGUF route fails verification, what verify.md tells people, which
route the Modelfile runs (and what the notes say when verification was skipped), and the context an Ollama model
gets (the figures themselves are measured on the real model: tests/real)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from finetune.errors import UserError
from finetune.export import ollama, pipeline, verify


def check(**changes) -> verify.Check:
    fields = dict(file="model-q4_k_m.gguf", route="model-q4_k_m.gguf", quant="q4_k_m", positions=400,
                  top1_agreement=0.95, top1_ties=0, kld_mean=0.02, ppl_merged=10.0, ppl_gguf=10.5, prompts=8,
                  changed=8, kept=8, retained=0.9, greedy_equal=6, greedy_ties=0, max_abs_logit_diff=1.0,
                  failures=[])
    fields.update(changes)
    c = verify.Check(**fields)
    c.failures.extend(verify._failures(c, exact=c.quant in verify.EXACT_TYPES))
    return c


def test_a_file_that_answers_like_the_base_fails_however_good_its_perplexity():
    lost = check(kept=0, ppl_gguf=9.0, kld_mean=0.001, top1_agreement=0.99)
    assert lost.lost_finetune and not lost.passed
    assert lost.failures == ["lost the fine-tune: answers like the base model on 8 of the 8 prompts the fine-tune "
                             "changed"]


def test_a_quantized_file_passes_only_within_the_stated_thresholds():
    assert check().passed
    assert check(kept=7).passed  # 7/8 ≥ KEPT_MIN
    assert not check(kept=6).passed
    assert "perplexity 1.30×" in check(ppl_gguf=13.0).failures[0]
    assert "KL divergence 0.200" in check(kld_mean=0.2).failures[0]
    assert "top-1 agreement 70.0%" in check(top1_agreement=0.7).failures[0]
    assert check(changed=0, kept=0).passed  # nothing changed by the fine-tune: nothing it could lose


def test_a_16bit_file_must_agree_everywhere_but_ties():
    assert check(quant="f16", top1_agreement=0.99, top1_ties=4, greedy_equal=8).passed
    assert not check(quant="f16", top1_agreement=0.99, top1_ties=3, greedy_equal=8).passed
    assert not check(quant="f16", top1_agreement=1.0, greedy_equal=7).passed


def reference(prompts: int = 8) -> verify.Reference:
    """A reference whose fine-tune changed every prompt's answer decisively (token 5 over the base's 6 by 2 logits)."""
    steps = np.zeros(8, dtype=np.float32)
    steps[5] = 2.0
    return verify.Reference(text=[list(range(50))], prompts=[verify.Prompt([1, 2])] * prompts, text_logp=[],
                            tuned=[[5]] * prompts, tuned_steps=[[steps]] * prompts, base=[[6]] * prompts,
                            answer_nll_tuned=[], answer_nll_base=[], stop_ids=[0], dtype=torch.float32)


PAIR = "base-q4_k_m.gguf + adapter-f16.gguf"


def test_verify_md_says_how_to_keep_a_finetune_a_route_lost(tmp_path):
    checks = [check(file="model-f16.gguf", route="model-f16.gguf", quant="f16", top1_agreement=1.0, greedy_equal=8),
              check(kept=2),  # the merged quant rounded the delta away
              check(file="adapter-f16.gguf", route=PAIR, kept=3),
              check(file="model-q2_k.gguf", route="model-q2_k.gguf", quant="q2_k", ppl_gguf=13.0)]
    text = verify.report(checks, tmp_path, reference()).read_text()
    fixes = dict(re.findall(r"^- \*\*(.+?)\*\*: (.+)$", text.split("To keep the fine-tune where a route lost it:")[1]
                            .split("\n\n")[0], re.M))
    assert set(fixes) == {"model-q4_k_m.gguf", PAIR}  # a file that only costs perplexity lost no fine-tune
    for fix in fixes.values():
        assert "quant=q8_0 or quant=q6_k" in fix and "train.lr, lora.r, more steps" in fix
    assert "base GGUF + f16 adapter route" in fixes["model-q4_k_m.gguf"]
    assert "adapter" not in fixes[PAIR]  # the pair is that route already
    routes = {r["route"]: r for r in json.loads((tmp_path / "verify.json").read_text())}
    assert routes["model-q4_k_m.gguf"]["fix"] == checks[1].fix and routes["model-f16.gguf"]["fix"] is None
    assert "To keep the fine-tune" not in verify.report(checks[:1], tmp_path, reference()).read_text()


def test_every_column_of_verify_md_is_explained_under_the_table(tmp_path):
    text = verify.report([check()], tmp_path, reference()).read_text()
    header = next(line for line in text.splitlines() if line.startswith("| route |"))
    columns = [cell.strip() for cell in header.strip("|").split("|")]
    explained = dict(re.findall(r"^- \*\*(.+?)\*\*: (.+)$", text.split("What each figure means:")[1], re.M))
    assert "greedy equal" in columns and "result" in columns
    assert [c for c in columns if len(explained.get(c, "")) < 40] == []  # a sentence each, not a bare name


def result_with_files(tmp_path: Path, lora: bool = True) -> pipeline.ExportResult:
    result = pipeline.ExportResult(run=tmp_path, target="ollama", report=tmp_path / "verify.md")
    result.files = {"model-f16": tmp_path / "model-f16.gguf", "model": tmp_path / "model-q4_k_m.gguf"}
    if lora:
        result.files.update(base=tmp_path / "base-q4_k_m.gguf", adapter=tmp_path / "adapter-f16.gguf")
    return result


def test_the_modelfile_runs_the_merged_file_when_it_passed_and_offers_the_pair(tmp_path):
    result = result_with_files(tmp_path)
    main, alternative = pipeline._ollama_routes(result, "q4_k_m", {"model-q4_k_m.gguf": True, PAIR: True})
    assert main == (result.files["model"], None)
    assert alternative == (result.files["base"], result.files["adapter"])


def test_the_modelfile_runs_base_plus_adapter_when_the_merged_quant_lost_the_finetune(tmp_path):
    result = result_with_files(tmp_path)
    main, alternative = pipeline._ollama_routes(result, "q4_k_m", {"model-q4_k_m.gguf": False, PAIR: True})
    assert main == (result.files["base"], result.files["adapter"]) and alternative is None
    assert any("failed verification" in n for n in result.notes)


def test_a_failed_pair_is_never_offered(tmp_path):
    result = result_with_files(tmp_path)
    main, alternative = pipeline._ollama_routes(result, "q4_k_m", {"model-q4_k_m.gguf": True, PAIR: False})
    assert main == (result.files["model"], None) and alternative is None


def test_skipped_verification_runs_every_route_and_the_notes_say_it_is_unverified(tmp_path):
    for lora in (True, False):
        result = result_with_files(tmp_path, lora)
        main, alternative = pipeline._ollama_routes(result, "q4_k_m", None)
        assert main == (result.files["model"], None)
        assert alternative == ((result.files["base"], result.files["adapter"]) if lora else None)
        [note] = result.notes
        assert "verify=false" in note and "runs model-q4_k_m.gguf unverified" in note
        assert (f"Modelfile.adapter {PAIR}" in note) == lora


def test_a_verified_modelfile_gets_no_such_note(tmp_path):
    result = result_with_files(tmp_path)
    pipeline._ollama_routes(result, "q4_k_m", {"model-q4_k_m.gguf": True, PAIR: True})
    assert result.notes == []


def test_no_route_passing_is_an_error_naming_what_to_change(tmp_path):
    for lora in (True, False):
        with pytest.raises(UserError, match="no q4_k_m GGUF route passed verification.*quant=q8_0"):
            pipeline._ollama_routes(result_with_files(tmp_path, lora), "q4_k_m",
                                    {"model-q4_k_m.gguf": False, PAIR: False})


def test_num_ctx_is_a_usable_context_never_a_short_training_length(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 32768}))
    assert ollama.context_length(64, tmp_path) == ollama.DEFAULT_CONTEXT == 4096
    assert ollama.context_length(8192, tmp_path) == 8192
    (tmp_path / "config.json").write_text(json.dumps({"seq_length": 2048}))  # the model's own context caps it
    assert ollama.context_length(64, tmp_path) == 2048


def test_modelfile_with_an_adapter_names_both_files():
    text = ollama.modelfile("qwen2_5", "./base-q4_k_m.gguf", num_ctx=4096, adapter="./adapter-f16.gguf")
    assert text.startswith("FROM ./base-q4_k_m.gguf\nADAPTER ./adapter-f16.gguf\n")
    assert "PARAMETER num_ctx 4096" in text
