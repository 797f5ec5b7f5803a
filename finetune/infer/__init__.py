"""Use a trained model: find it (load.py), load it (backends.py), answer in its own chat format (generate.py), in
the terminal (chat.py) or over an OpenAI-compatible HTTP API (server.py).

Loading and answering are shared: evaluation builds an Engine with `backends.load(load.resolve(options), options)`
and asks it `engine.generate(engine.prompt_ids(messages), Sampling())` (greedy), getting exactly what chat and
serve say.
"""
