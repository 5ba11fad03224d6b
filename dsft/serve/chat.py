"""`dsft generate` and `dsft chat`: a run's model answering prompts rendered as in training."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from dsft.data.formats import Message
from dsft.errors import DsftError
from dsft.models.generate import (
    DecodeSettings,
    generate_batch,
    prompt_ids,
    split_reasoning,
    stream_reply,
)


def _start(run_dir: Path, seed: int, thinking: str | None):
    """(model, tokenizer, template, thinking mode) of a run directory (its own template) or a plain Hugging Face
    model directory (dsft export or compress output: its tokenizer's template); thinking overrides the run's
    data.thinking (auto, on, off)."""
    from transformers import set_seed

    from dsft.config.model import THINKING_MODES
    from dsft.data.chat import check_thinking
    from dsft.eval.targets import load_target

    target = load_target(str(run_dir))
    setting = thinking if thinking is not None else (target.config.data.thinking if target.config else "auto")
    if setting not in THINKING_MODES:
        raise DsftError(f"--thinking: {setting!r} is not one of {', '.join(THINKING_MODES)}")
    check_thinking(target.template, THINKING_MODES[setting])
    set_seed(seed)
    return target.model, target.tokenizer, target.template, THINKING_MODES[setting]


def _opening(system: str | None) -> list[Message]:
    return [Message("system", system)] if system else []


def generate_once(run_dir: Path, prompt: str, system: str | None, settings: DecodeSettings, seed: int,
                  thinking: str | None = None) -> str:
    """Print and return the reply to one prompt (thinking: see _start)."""
    model, tokenizer, template, mode = _start(run_dir, seed, thinking)
    messages = [*_opening(system), Message("user", prompt)]
    reply = generate_batch(model, tokenizer, [prompt_ids(messages, template, tokenizer, mode)], settings)[0]
    print(reply)
    return reply


def chat_loop(
    run_dir: Path,
    system: str | None,
    settings: DecodeSettings,
    seed: int,
    read_line: Callable[[], str] | None = None,
    console: Console | None = None,
    thinking: str | None = None,
) -> list[Message]:
    """Interactive chat; returns the conversation. /reset clears the history, /exit (or EOF) ends."""
    console = console or Console()
    read_line = read_line or (lambda: console.input("[bold]you>[/bold] "))
    model, tokenizer, template, mode = _start(run_dir, seed, thinking)
    history = _opening(system)
    console.print(f"[dim]chatting with {run_dir} (/reset clears the history, /exit quits)[/dim]")
    while True:
        try:
            line = read_line().strip()
        except EOFError:
            break
        if line == "/exit":
            break
        if line == "/reset":
            history = _opening(system)
            continue
        if not line:
            continue
        history.append(Message("user", line))
        pieces = []
        for piece in stream_reply(model, tokenizer, prompt_ids(history, template, tokenizer, mode), settings):
            pieces.append(piece)
            console.print(piece, end="", markup=False, highlight=False)
        console.print()
        reasoning, answer = split_reasoning("".join(pieces))
        # Earlier turns' reasoning is stripped by the template, as in training; keep it for the record.
        history.append(Message("assistant", answer, reasoning))
    return history
