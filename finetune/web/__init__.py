"""`finetune web`: the whole path on one local page — estimate, train, watch, export, chat.

Everything the page does is the CLI's own code: recipes through `finetune.config`, the verdict and chart through
`finetune.estimate.report`, runs read through `finetune.rundir`, training and export as real `python -m finetune`
subprocesses (the page never blocks, and the command it ran is shown so it can be copied), chat through
`finetune.infer`. Gradio is an optional extra, imported only when the page starts, so every module here imports
without it and the callbacks (`forms`, `runs`, `jobs`, `chat`) are plain functions a test can call. `app.serve`
starts the page.
"""
