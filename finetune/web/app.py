"""The page: the checks before it starts, then its layout, Gradio components wired to the plain callbacks in
forms / actions / runs / chat.

Nothing is computed here; every button or field calls one function that a unit test calls the same way. Gradio
is imported inside `build` only: `finetune web` on an exposed host without sign-in, or without gradio installed,
is refused before it loads.
"""

from __future__ import annotations

import importlib.util
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Optional

from finetune import hosts
from finetune.errors import UserError
from finetune.web import actions, chat, forms, guard, runs
from finetune.web.labels import LANGS, label


@dataclass
class WebOptions:
    host: str = "127.0.0.1"  # local only; any other address needs sign-in (auth_file= or $FINETUNE_WEB_AUTH)
    port: int = 7860
    outputs: str = "outputs"  # where runs are started and listed (the CLI's default output_dir parent)
    auth_file: Optional[str] = None  # lines of user:password; the page then asks to sign in


def serve(options: WebOptions) -> int:
    """Start the page; refused (before gradio loads) on a non-loopback host without sign-in: the page trains,
    writes files and loads models on this machine for whoever reaches it."""
    users = guard.credentials(options.auth_file)
    if not users and not hosts.is_loopback(options.host):
        raise UserError(f"host={options.host} lets other machines reach the page, which trains and writes files "
                        f"here: set sign-in first with auth_file=PATH (lines of user:password) or "
                        f"{guard.AUTH_ENV}=user:password, or keep host=127.0.0.1")
    if importlib.util.find_spec("gradio") is None:
        raise UserError("`finetune web` needs gradio, which is not installed: pip install 'finetune[web]'")
    launch(options, users)
    return 0


def _estimate_outputs(view: forms.EstimateView) -> tuple:
    verdict = f"**{view.verdict.splitlines()[0]}**" + "".join(f"\n\n{line}" for line in view.verdict.splitlines()[1:]
                                                             if line)
    return (verdict, view.chart, view.suggestions, view.yaml, view.yaml_file, view.command)


def _run_choices(outputs: str) -> list[tuple[str, str]]:
    return [(r["run"], r["path"]) for r in runs.list_runs(Path(outputs))]


def _runs_table(outputs: str) -> list[list[Any]]:
    return [[r["run"], r["status"], r["step"], r["loss"], "yes" if r["report"] else ""]
            for r in runs.list_runs(Path(outputs))]


def build(options: WebOptions):
    import gradio as gr  # the optional web extra (and pandas with it): loaded only when the page is built
    import pandas as pd

    workdir = Path(tempfile.mkdtemp(prefix="finetune-web-"))
    L = lambda key: label("en", key)  # noqa: E731  (the first language shown; the switch relabels)
    labelled: list[tuple[Any, str, str]] = []  # (component, label key, attribute the key sets)

    def named(component, key: str, attr: str = "label"):
        labelled.append((component, key, attr))
        return component

    with gr.Blocks(title="finetune") as page:
        with gr.Row():
            named(gr.Markdown(L("title")), "title", "value")
            lang = gr.Radio(list(LANGS), value="English", label="Language / 语言", scale=0, elem_id="lang")
        with gr.Tabs():
            with named(gr.Tab(L("tab_estimate"), id="estimate"), "tab_estimate"):
                with gr.Row():
                    recipe = named(gr.Dropdown([""] + forms.recipe_names(), value="", label=L("recipe"), elem_id="recipe"), "recipe")
                    model = named(gr.Dropdown(forms.model_names(), label=L("model"), allow_custom_value=True),
                                  "model")
                    variant = named(gr.Dropdown([], label=L("variant"), allow_custom_value=True), "variant")
                    method = named(gr.Dropdown(forms.method_names(), label=L("method")), "method")
                with gr.Row():
                    data = named(gr.Textbox(label=L("data")), "data")
                    max_length = named(gr.Number(label=L("max_length"), precision=0), "max_length")
                    lora_r = named(gr.Number(label=L("lora_r"), precision=0), "lora_r")
                    micro_batch = named(gr.Number(label=L("micro_batch"), precision=0), "micro_batch")
                    gpu_mem = named(gr.Number(label=L("gpu_mem")), "gpu_mem")
                extra = named(gr.Textbox(label=L("extra"), elem_id="extra"), "extra")
                verdict = named(gr.Markdown(elem_id="verdict"), "verdict")
                with gr.Row():
                    chart = named(gr.Image(label=L("chart"), type="filepath", elem_id="chart"), "chart")
                    suggestions = named(gr.Dataframe(headers=["change", "new peak", "fits", "cost"],
                                                     label=L("suggestions"), wrap=True,
                                                     column_widths=["34%", "14%", "8%", "44%"]), "suggestions")
                command = named(gr.Textbox(label=L("command"), interactive=False, elem_id="command"), "command")
                with gr.Row():
                    yaml = named(gr.Code(language="yaml", label=L("yaml")), "yaml")
                    yaml_file = named(gr.File(label=L("yaml_file")), "yaml_file")
            with named(gr.Tab(L("tab_train"), id="train"), "tab_train"):
                output_dir = named(gr.Textbox(label=L("output_dir")), "output_dir")
                with gr.Row():
                    start = named(gr.Button(L("start"), variant="primary", elem_id="start"), "start", "value")
                    stop = named(gr.Button(L("stop"), variant="stop", elem_id="stop"), "stop", "value")
                train_status = named(gr.Markdown(elem_id="train-status"), "status")
                with gr.Row():
                    loss = named(gr.LinePlot(x="step", y="loss", label=L("loss")), "loss")
                    train_log = named(gr.Textbox(label=L("log"), lines=12, max_lines=12, elem_id="train-log"), "log")
                gr.Markdown("---")
                with gr.Row():
                    run_pick = named(gr.Dropdown([], label=L("run"), allow_custom_value=True), "run")
                    refresh = named(gr.Button(L("refresh")), "refresh", "value")
                    resume = named(gr.Button(L("resume"), elem_id="resume"), "resume", "value")
                runs_table = named(gr.Dataframe(headers=["run", "status", "step", "loss", "report"],
                                                label=L("runs"), interactive=False, elem_id="runs"), "runs")
                report = named(gr.Markdown(), "report")
            with named(gr.Tab(L("tab_export"), id="export"), "tab_export"):
                with gr.Row():
                    export_run = named(gr.Dropdown([], label=L("run"), allow_custom_value=True, elem_id="export-run"), "run")
                    target = named(gr.Dropdown(["merged", "gguf", "ollama", "awq"], value="ollama",
                                               label=L("target"), elem_id="target"), "target")
                    quant = named(gr.Dropdown(actions.quant_names(), value="q4_k_m", label=L("quant")), "quant")
                export = named(gr.Button(L("export"), variant="primary", elem_id="export"), "export", "value")
                export_status = named(gr.Markdown(elem_id="export-status"), "status")
                ollama = named(gr.Textbox(label=L("ollama"), interactive=False, elem_id="ollama"), "ollama")
                export_log = named(gr.Textbox(label=L("log"), lines=12, max_lines=12), "log")
            with named(gr.Tab(L("tab_chat"), id="chat"), "tab_chat"):
                chat_run = named(gr.Dropdown([], label=L("run"), allow_custom_value=True, elem_id="chat-run"), "run")
                chatbot = named(gr.Chatbot(label=L("chatbot"), elem_id="chatbot"), "chatbot")
                with gr.Row():
                    message = named(gr.Textbox(label=L("message"), elem_id="message", scale=4), "message")
                    send = named(gr.Button(L("send"), variant="primary", elem_id="send", scale=1), "send", "value")
                    clear = named(gr.Button(L("reset"), scale=1), "reset", "value")
                chat_error = gr.Markdown()
        timer = gr.Timer(1.0)
        history = gr.State([])

        fields = [model, variant, method, data, max_length, lora_r, micro_batch, gpu_mem]
        estimate_out = [verdict, chart, suggestions, yaml, yaml_file, command]

        def values(*args) -> dict[str, Any]:
            return dict(zip(forms.FIELDS, args))

        def do_estimate(name, extra_text, *args):
            return _estimate_outputs(forms.estimate(name or None, values(*args), extra_text, workdir))

        def pick_recipe(name):
            found = forms.fields_of(name or None)
            return [gr.update(choices=forms.variant_names(found["model"]), value=found["variant"])
                    if key == "variant" else found[key] for key in forms.FIELDS]

        recipe.change(pick_recipe, recipe, fields).then(do_estimate, [recipe, extra, *fields], estimate_out)
        model.input(lambda m: gr.update(choices=forms.variant_names(m), value=None), model, variant)
        typed = [data, max_length, lora_r, micro_batch, gpu_mem, extra]  # on Enter or leaving the field, not per key
        gr.on([f.input for f in (model, variant, method)] + [e for f in typed for e in (f.submit, f.blur)],
              do_estimate, [recipe, extra, *fields], estimate_out, trigger_mode="always_last")

        def refresh_runs(selected=None):
            choices = _run_choices(options.outputs)
            pick = lambda: gr.update(choices=choices, value=selected) if selected else gr.update(choices=choices)  # noqa: E731
            return pick(), pick(), pick(), _runs_table(options.outputs), runs.report_text(options.outputs, selected)

        run_lists = [run_pick, export_run, chat_run, runs_table, report]

        def do_start(name, extra_text, out_dir, *args):
            message_text, run = actions.start_training(options.outputs, name or None, values(*args), extra_text,
                                                       out_dir or None)
            return (message_text, *refresh_runs(run))

        start.click(do_start, [recipe, extra, output_dir, *fields], [train_status, *run_lists])
        stop.click(actions.stop_training, None, train_status)
        resume.click(lambda run: (actions.resume_training(options.outputs, run)[0]), run_pick, train_status)
        refresh.click(refresh_runs, run_pick, run_lists)
        run_pick.input(partial(runs.report_text, options.outputs), run_pick, report)

        seen = {"state": None}

        def tick(selected):
            text, points, log = actions.watch_training()
            frame = pd.DataFrame(points, columns=["step", "loss"])
            state = text.split("**")[1] if text.startswith("**") else None
            changed, seen["state"] = state != seen["state"], state  # a run started or ended: list the runs again
            listing = (*[gr.update(choices=_run_choices(options.outputs))] * 3, _runs_table(options.outputs),
                       runs.report_text(options.outputs, selected)) if changed else (gr.update(),) * 5
            return (text, frame, log, *actions.watch_export(), *listing)

        timer.tick(tick, run_pick, [train_status, loss, train_log, export_status, export_log, ollama, *run_lists])
        export.click(partial(actions.start_export, options.outputs), [export_run, target, quant], export_status)

        def do_send(run, text, turns):
            turns, error = chat.reply(options.outputs, run, text, turns)
            return turns, turns, "" if not error else text, error

        send.click(do_send, [chat_run, message, history], [chatbot, history, message, chat_error])
        message.submit(do_send, [chat_run, message, history], [chatbot, history, message, chat_error])
        clear.click(lambda: ([], [], ""), None, [chatbot, history, chat_error])

        def relabel(choice):
            lang_code = LANGS.get(choice, "en")
            return [gr.update(**{attr: label(lang_code, key)}) for _, key, attr in labelled]

        lang.change(relabel, lang, [c for c, _, _ in labelled])
        page.load(refresh_runs, None, run_lists)
    return page, workdir


def launch(options: WebOptions, users: list[tuple[str, str]]) -> None:
    """Serve the page; with `users`, Gradio asks to sign in before anything else (its own login form)."""
    page, workdir = build(options)
    page.queue().launch(server_name=options.host, server_port=options.port, allowed_paths=[str(workdir)],
                        inbrowser=False, show_error=True, auth=users or None)
