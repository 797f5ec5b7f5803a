"""Know before launch: exact parameter counts, a per-GPU memory plan, the GPUs present, and what to change."""
