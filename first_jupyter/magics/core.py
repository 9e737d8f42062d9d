"""``%first`` and ``%%first``: the magic, its settings, and the built-in commands.

Every command is a thin shell over ``first_jupyter.client``; each registers itself with ``parser.register``, as
later features will. Errors are one or two lines naming the next step, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from traitlets import Bool, Enum, Float, Integer, Unicode
from traitlets.config import Configurable

from first_jupyter.magics import display as show
from first_jupyter.magics.parser import COMMANDS, MagicUsageError, help_text, parse, register
from first_jupyter.magics.template import interpolate

if TYPE_CHECKING:
    from IPython.core.interactiveshell import InteractiveShell

    from first_jupyter.client import Conversation


class FirstMagics(Configurable):
    """The ``%first`` magics of one kernel; settings with ``%config FirstMagics.<name> = ...`` or config files."""

    model = Unicode("", config=True, help="Model for this kernel's prompts. Empty: the gateway's default, set "
                                          "with `%first use MODEL` or the sidebar.")
    format = Enum(list(show.FORMATS), "markdown", config=True, help="How answers are shown unless -f says.")
    temperature = Float(None, allow_none=True, config=True, help="Sampling temperature unless -t says; "
                                                                 "None: the engine's default.")
    max_tokens = Integer(None, allow_none=True, config=True, help="Longest answer unless --max-tokens says.")
    history_turns = Integer(10, config=True, help="Earlier turns of this notebook's conversation sent with "
                                                  "each `%%first chat` prompt; 0 sends none.")
    stream = Bool(True, config=True, help="Show answers as they are generated (--no-stream turns it off).")
    refresh_interval = Float(0.1, config=True, help="Seconds between updates of a streaming answer.")

    def __init__(self, shell: InteractiveShell, **kwargs: Any) -> None:
        super().__init__(parent=shell, **kwargs)
        self.shell = shell
        self._conversation: Conversation | None = None

    @property
    def conversation(self) -> Conversation:
        from first_jupyter.client import Conversation

        if self._conversation is None:
            self._conversation = Conversation(self.history_turns)
        self._conversation.max_turns = self.history_turns
        return self._conversation

    def __call__(self, line: str, cell: str | None = None) -> None:
        """The magic: parse, run, and turn every failure into a short message."""
        from first_jupyter.client import GatewayError  # light: no openai import
        from first_jupyter.magics.errors import explain

        try:
            command, options = parse(line, cell is not None)
            command.run(self, options, cell or "")
        except MagicUsageError as exc:
            print(str(exc).strip(), file=sys.stderr)
        except GatewayError as exc:
            print(explain(exc), file=sys.stderr)
        except KeyboardInterrupt:
            print("Stopped. The request was cancelled.", file=sys.stderr)

    def prompt(self, cell: str) -> str:
        text = interpolate(cell, self.shell.user_ns).strip()
        if not text:
            raise MagicUsageError("The cell has no prompt: write it below the `%%first` line.")
        return text

    def pick(self, options: argparse.Namespace, name: str) -> Any:
        """An option as given on the command line, else this kernel's setting."""
        given = getattr(options, name, None)
        return given if given is not None else getattr(self, name)


# -- chat, complete, embed ------------------------------------------------------------------------------------


def _sampling(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-m", "--model", help="model id (default: this kernel's, else the gateway's)")
    parser.add_argument("-t", "--temperature", type=float, help="sampling temperature, 0 to 2")
    parser.add_argument("--max-tokens", dest="max_tokens", type=int, help="longest answer, in tokens")
    parser.add_argument("-f", "--format", choices=show.FORMATS, help="markdown, text, code or json")


def _chat_options(parser: argparse.ArgumentParser) -> None:
    _sampling(parser)
    parser.add_argument("-s", "--system", help="system prompt")
    parser.add_argument("--no-stream", dest="stream", action="store_false", default=None,
                        help="show the answer only once it is complete")
    parser.add_argument("--new", action="store_true", help="start a new conversation")


@register("chat", "Ask a chat model; the answer streams in and the conversation continues from cell to cell.",
          cell=True, options=_chat_options)
def _chat(magics: FirstMagics, options: argparse.Namespace, cell: str) -> None:
    from first_jupyter import client

    prompt = magics.prompt(cell)
    if options.new:
        magics.conversation.reset()
    fmt = magics.pick(options, "format")
    live = show.LiveAnswer(fmt, magics.refresh_interval) if magics.pick(options, "stream") else None
    waiting = show.StartStatus()  # emptied by the first piece of a stream, else once the call returns

    def on_text(piece: str) -> None:
        waiting.clear()
        assert live is not None
        live.add(piece)

    try:
        result = client.chat(prompt, model=options.model or magics.model or None, system=options.system,
                             temperature=magics.pick(options, "temperature"),
                             max_tokens=magics.pick(options, "max_tokens"), stream=live is not None,
                             conversation=magics.conversation, on_text=on_text if live else None,
                             on_progress=waiting.show)
    except KeyboardInterrupt:
        if live is not None:
            live.finish(client.Result("".join(live.parts), options.model or magics.model or "", stopped=True))
        raise
    finally:
        waiting.clear()
    note = live.finish(result) if live is not None else show.show_answer(result, fmt)
    if note:
        print(note, file=sys.stderr)
    if fmt == "code":
        magics.shell.set_next_input(show.extract_code(result.text), replace=False)


@register("complete", "Continue a text with a completion model (no conversation).", cell=True, options=_sampling)
def _complete(magics: FirstMagics, options: argparse.Namespace, cell: str) -> None:
    from first_jupyter import client

    with show.StartStatus() as waiting:
        result = client.complete(magics.prompt(cell), model=options.model or magics.model or None,
                                 temperature=magics.pick(options, "temperature"),
                                 max_tokens=magics.pick(options, "max_tokens"), on_progress=waiting.show)
    note = show.show_answer(result, magics.pick(options, "format"))
    if note:
        print(note, file=sys.stderr)


def _embed_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-m", "--model", help="embedding model id")
    parser.add_argument("--as", dest="name", default="embeddings",
                        help="variable that receives the vectors (default: embeddings)")


@register("embed", "Embed each non-empty line of the cell; the vectors go into a variable.", cell=True,
          options=_embed_options)
def _embed(magics: FirstMagics, options: argparse.Namespace, cell: str) -> None:
    from first_jupyter import client

    if not options.name.isidentifier():
        raise MagicUsageError(f"--as {options.name!r} is not a Python variable name.")
    lines = [line.strip() for line in interpolate(cell, magics.shell.user_ns).splitlines() if line.strip()]
    if not lines:
        raise MagicUsageError("The cell has no text to embed: one input per line below the `%%first` line.")
    with show.StartStatus() as waiting:
        vectors = client.embed(lines, model=options.model or magics.model or None, on_progress=waiting.show)
    magics.shell.user_ns[options.name] = vectors
    print(f"{len(vectors)} embedding(s) of dimension {len(vectors[0]) if vectors else 0} in `{options.name}`.")


# -- catalog and settings -----------------------------------------------------------------------------------


@register("models", "The models you can use, their state (hot, starting, cold, offline) and where they run.")
def _models(magics: FirstMagics, options: argparse.Namespace, cell: str) -> None:
    from first_jupyter import client

    status = client.status()
    default = status["default_model"]
    rows = [[("* " if m["id"] == default else "") + m["id"], m.get("state", ""),
             ", ".join(m["capabilities"]["api_protocols"]),
             ", ".join(f"{s['cluster']}/{s['endpoint']}" for s in m["served_by"])] for m in status["models"]]
    show.show_table(["model", "state", "can", "served by"], rows, caption="* the default model")


@register("status", "Each model's state (hot, starting, queued, cold, offline) where it is served, and each "
                    "endpoint's.")
def _status(magics: FirstMagics, options: argparse.Namespace, cell: str) -> None:
    from first_jupyter import client

    conn = client.connection()
    status = client.status()
    show.show_table(client.STATE_COLUMNS, client.state_rows(status), caption="hot: answers now; starting/queued: a "
                                                                           "start is under way; cold: a request "
                                                                           "starts it (`%first warm` ahead of need)")
    rows = [[e["cluster"], e["endpoint"], e["kind"], e["state"], ", ".join(e["models"]), e.get("error") or ""]
            for e in status["endpoints"]]
    show.show_table(["cluster", "endpoint", "kind", "state", "models", "error"], rows,
                    caption=f"gateway: {conn.url} ({conn.source})")


def _warm_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model id, as `%first models` lists it")
    parser.add_argument("--cluster", help="start it on this cluster (default: where it would be served)")
    parser.add_argument("--wait", action="store_true", help="return only once it answers")


@register("warm", "Start MODEL ahead of need, so the first prompt finds it hot.", options=_warm_options)
def _warm(magics: FirstMagics, options: argparse.Namespace, cell: str) -> None:
    from first_jupyter import client

    with show.StartStatus() as waiting:
        answer = client.warm(options.model, cluster=options.cluster, wait=options.wait, on_progress=waiting.show)
    print(client.describe_warm(answer))


def _use_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model id, as `%first models` lists it")


@register("use", "Make MODEL the default for every notebook and the sidebar of this server.", options=_use_options)
def _use(magics: FirstMagics, options: argparse.Namespace, cell: str) -> None:
    from first_jupyter import client

    chosen = client.set_default_model(options.model)
    print(f"Default model: {chosen}.")
    if magics.model and magics.model != chosen:
        print(f"This kernel still uses {magics.model} (FirstMagics.model); `%config FirstMagics.model = ''` "
              "follows the default.", file=sys.stderr)


@register("history", "This notebook's conversation so far.")
def _history(magics: FirstMagics, options: argparse.Namespace, cell: str) -> None:
    turns = magics.conversation.turns
    if not turns:
        print("No conversation yet: `%%first chat` starts one.")
        return
    text = "\n\n".join(f"**You:** {user}\n\n**Model:** {answer}" for user, answer in turns)
    show.display({"text/markdown": text, "text/plain": text}, raw=True)


@register("reset", "Forget this notebook's conversation.")
def _reset(magics: FirstMagics, options: argparse.Namespace, cell: str) -> None:
    magics.conversation.reset()
    print("Conversation cleared.")


@register("usage", "Requests, tokens and latency by model, as a table and a plot.")
def _usage(magics: FirstMagics, options: argparse.Namespace, cell: str) -> None:
    from first_jupyter import client

    rows = client.usage()
    if not rows:
        print("No requests recorded yet.")
        return
    show.show_table(["model", "requests", "errors", "prompt tokens", "completion tokens", "mean latency ms",
                     "mean TTFT ms"],
                    [[r["model"], r["requests"], r["errors"], r["prompt_tokens"], r["completion_tokens"],
                      _ms(r["mean_latency_ms"]), _ms(r["mean_ttft_ms"])] for r in rows])
    plot = show.bars_svg([
        show.Bars("Tokens by model", {r["model"]: r["prompt_tokens"] + r["completion_tokens"] for r in rows},
                  "tokens"),
        show.Bars("Mean latency by model", {r["model"]: r["mean_latency_ms"] or 0 for r in rows}, "ms")])
    show.display({"image/svg+xml": plot, "text/plain": "(plot of tokens and latency by model)"},
                 raw=True)


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


@register("whoami", "Which Globus identity and token source the gateway uses.")
def _whoami(magics: FirstMagics, options: argparse.Namespace, cell: str) -> None:
    from first_jupyter import client
    from first_jupyter.auth.tokens import describe_sign_in

    print(describe_sign_in(client.whoami()))


@register("login", "Sign in to Globus: open the URL shown, then paste the code it gives you.")
def _login(magics: FirstMagics, options: argparse.Namespace, cell: str) -> None:
    from first_jupyter import client
    from first_jupyter.auth.tokens import describe_sign_in

    print(f"Open this URL, sign in, and paste the code it shows below:\n{client.login_start()}")
    code = input("Authorization code: ").strip()  # the notebook shows an input box
    if not code:
        raise MagicUsageError("No code entered; run `%first login` again when you have it.")
    print(describe_sign_in(client.login_finish(code)))


def _help_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("command", nargs="?", help="a command, for its options")


@register("help", "What each command does; `%first help COMMAND` for its options.", options=_help_options)
def _help(magics: FirstMagics, options: argparse.Namespace, cell: str) -> None:
    if options.command:
        command = COMMANDS.get(options.command)
        if command is None:
            raise MagicUsageError(f"No command '{options.command}'. `%first help` lists them.")
        print(help_text(command))
        return
    heads = {name: f"{'%%' if c.cell else '%'}first {name}" for name, c in COMMANDS.items()}
    width = max(map(len, heads.values())) + 2
    lines = [f"{heads[c.name]:<{width}}{c.summary}" for c in COMMANDS.values()]
    print("\n".join([*lines, "", "`{name}` in a prompt is replaced by that variable; `{{` and `}}` give braces.",
                     "Settings: `%config FirstMagics` lists them (model, format, temperature, history_turns...)."]))
