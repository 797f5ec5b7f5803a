"""Deploying a run: merged 16-bit checkpoint, GGUF files (llama.cpp), an Ollama directory, AWQ for vLLM.

`pipeline.export(run_dir, to)` is the entry point (`finetune export run=... to=...`); each module does one step.
"""
