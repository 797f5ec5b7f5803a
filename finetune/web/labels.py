"""The page's words in English and 中文: one dict per language, the same keys (a test checks they match)."""

from __future__ import annotations

LANGS = {"English": "en", "中文": "zh"}

LABELS: dict[str, dict[str, str]] = {
    "en": {
        "title": "# finetune — estimate, train, export, chat",
        "tab_estimate": "Estimate", "tab_train": "Train", "tab_export": "Export", "tab_chat": "Chat",
        "recipe": "Shipped recipe (empty: build one from the fields)", "model": "Model", "variant": "Variant",
        "method": "Method", "data": "Data file", "max_length": "max_length (tokens)", "lora_r": "lora.r (rank)",
        "micro_batch": "micro_batch", "gpu_mem": "GPU memory (GiB, empty: the GPU found here)",
        "extra": "More settings (key=value ..., e.g. train.max_steps=2)", "verdict": "Verdict",
        "chart": "Memory per GPU, by moment of the step", "suggestions": "What to change (cheapest first)",
        "yaml": "Resolved recipe (YAML)", "yaml_file": "Download the recipe", "command": "The same on the command line",
        "output_dir": "Run directory (empty: outputs/<recipe>-<time>)", "start": "Start training", "stop": "Stop (saves a checkpoint)",
        "resume": "Resume the selected run", "status": "Status", "loss": "Loss", "log": "Log",
        "runs": "Past runs", "run": "Run", "refresh": "Refresh", "report": "Report (report.md)",
        "target": "Export to", "quant": "GGUF quant", "export": "Export", "ollama": "Ollama",
        "message": "Message", "send": "Send", "reset": "Clear", "chatbot": "Conversation",
        "lang": "Language",
    },
    "zh": {
        "title": "# finetune — 估算、训练、导出、对话",
        "tab_estimate": "显存估算", "tab_train": "训练", "tab_export": "导出", "tab_chat": "对话",
        "recipe": "内置配方（留空：用下面的字段自建）", "model": "模型", "variant": "变体",
        "method": "方法", "data": "数据文件", "max_length": "max_length（token 数）", "lora_r": "lora.r（秩）",
        "micro_batch": "micro_batch", "gpu_mem": "显存（GiB，留空：用本机检测到的 GPU）",
        "extra": "更多设置（key=value ...，如 train.max_steps=2）", "verdict": "结论",
        "chart": "每卡显存，按训练步的各阶段", "suggestions": "建议的修改（代价从小到大）",
        "yaml": "完整配方（YAML）", "yaml_file": "下载配方", "command": "对应的命令行",
        "output_dir": "运行目录（留空：outputs/<配方>-<时间>）", "start": "开始训练", "stop": "停止（保存检查点）",
        "resume": "继续所选的运行", "status": "状态", "loss": "损失", "log": "日志",
        "runs": "历史运行", "run": "运行", "refresh": "刷新", "report": "报告（report.md）",
        "target": "导出为", "quant": "GGUF 量化", "export": "导出", "ollama": "Ollama",
        "message": "消息", "send": "发送", "reset": "清空", "chatbot": "对话记录",
        "lang": "语言",
    },
}


def label(lang: str, key: str) -> str:
    return LABELS.get(lang, LABELS["en"])[key]
