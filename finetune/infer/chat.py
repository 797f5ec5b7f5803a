"""`finetune chat`: talk to a run (or a model) in the terminal, in the exact chat format it was trained with.

Answers stream to stdout as they are generated and join the history, so follow-up questions see the whole
conversation; everything else (memory line, banner, command replies, errors) goes to stderr, so
`finetune chat run=... prompt="..." > answer.txt` holds just the answer. Greedy by default (temperature=0): the
same question gets the same answer, the one `finetune eval` scores. Ctrl-C during an answer stops that answer
(the turn is dropped); at the prompt it leaves.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Optional

from rich.markup import escape

from finetune.errors import UserError
from finetune.infer import load, memory
from finetune.infer.generate import Engine, Sampling
from finetune.infer.options import ChatOptions

if TYPE_CHECKING:
    from rich.console import Console

HELP = "/reset clears the history · /system TEXT sets the system prompt (and resets) · /system alone restores " \
       "the default · /exit leaves (or Ctrl-D)"


class Chat:
    """A conversation: the system prompt, the turns so far, and the commands that change them."""

    def __init__(self, engine: Engine, sampling: Sampling, system: Optional[str] = None):
        """`system` None: the engine's default (the run's data.system_prompt, else the family's)."""
        self.engine, self.sampling, self.system = engine, sampling, system
        self.history: list[dict[str, str]] = []

    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system is not None else []
        return head + self.history

    def ask(self, text: str) -> str:
        """Stream the answer to `text` onto stdout and keep the turn; the turn is dropped if it fails."""
        prompt = self.engine.prompt_ids(self.messages() + [{"role": "user", "content": text}])
        done = self.engine.generate(prompt, self.sampling, on_text=_write)
        _write("\n")
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": done.text}]
        return done.text

    def command(self, line: str, err: "Console") -> bool:
        """Run a /command; False when it asks to leave."""
        name, _, arg = line.partition(" ")
        if name in ("/exit", "/quit"):
            return False
        if name == "/reset":
            self.history = []
            err.print("(history cleared)")
        elif name == "/system":
            self.system, self.history = (arg.strip() or None), []
            err.print(f"(system prompt {'set' if arg.strip() else 'restored'}; history cleared)")
        else:
            err.print(f"unknown command {name}; {HELP}", markup=False)
        return True


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _read(interactive: bool) -> Optional[str]:
    """The next line typed (None at end of input); a terminal gets line editing and a prompt."""
    if interactive:
        try:
            return input("you> ")
        except EOFError:
            return None
    line = sys.stdin.readline()
    return line.rstrip("\n") if line else None


def run(options: ChatOptions, err: "Console") -> int:
    source = load.resolve(options)
    err.print(memory.describe(source, options), markup=False)
    from finetune.infer import backends  # (torch: only after the checks above, which need none)

    engine = backends.load(source, options)
    sampling = Sampling(options.temperature, options.top_p, options.max_tokens, seed=options.seed)
    chat = Chat(engine, sampling, options.system)
    if options.prompt is not None:
        try:
            chat.ask(options.prompt)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())
    err.print(f"chatting with {source.models[0]} ({source.template} format, {options.backend}); {HELP}",
              markup=False)
    while (line := _read(interactive)) is not None:
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not chat.command(line, err):
                break
            continue
        try:
            chat.ask(line)
        except ValueError as exc:  # the format refuses the message, or the context is full
            err.print(f"[red]error:[/] {escape(str(exc))}")
        except KeyboardInterrupt:
            _write("\n")
            err.print("(answer interrupted; that turn is dropped)")
    return 0
