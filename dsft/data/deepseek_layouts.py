"""The text around each turn of dsft's built-in DeepSeek templates (dsft/data/chat.py renders with them).

Each is the layout of the model's own jinja template (copies in tests/golden/chat_templates):
  deepseek_v3, deepseek_r1  <｜User｜>q <｜Assistant｜>a<eos>; calls <｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
                            then a json code block of the arguments, joined by newlines; results in
                            <｜tool▁outputs▁begin｜> ... <｜tool▁outputs▁end｜>, the answer right after it
  deepseek_r1_0528          the same calls and results; the user turn ends with <｜Assistant｜>
  deepseek_v31              <｜Assistant｜></think>a<eos>; calls NAME<｜tool▁sep｜>ARGUMENTS, joined by nothing;
                            each result in <｜tool▁output▁begin｜> ... <｜tool▁output▁end｜>, no outer markers

Where the public templates are broken, dsft renders what their fixed successors do, and says so: DeepSeek-V3's
original template closes the calls (<｜tool▁calls▁end｜>) only after a second call and drops the calls of a turn
that also has text; V3 and R1 open the results block (<｜tool▁outputs▁begin｜>) only once per conversation and
never close it before a second round of calls. dsft closes every call list, keeps text and calls, and opens and
closes the results of every round, as V3-0324 and R1-0528 do. R1's updated template joins results without the
newline its R1-Distill and V3 siblings put between them; dsft keeps the newline.

The declared tools are described in the system prompt (tool_system_prompt): the DeepSeek templates ignore a
tools argument, so this wording is dsft's; it shows the call format of its template.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import NamedTuple

from dsft.data.tokenizer import (
    ASSISTANT,
    CALL_BEGIN,
    CALL_END,
    CALLS_BEGIN,
    CALLS_END,
    OUTPUT_BEGIN,
    OUTPUTS_BEGIN,
    OUTPUTS_END,
    THINK_CLOSE,
    THINK_OPEN,
    TOOL_SEP,
)


class ToolLayout(NamedTuple):
    """How a template writes calls and their results."""

    call: str
    """One call, with {name} and {arguments}."""
    separator: str
    """Between two calls of one turn."""
    first_output: str
    """Opens the first result after a turn's calls."""
    next_output: str
    """Opens each further result."""
    outputs_end: str
    """Closes a round of results (before the answer or the next calls)."""


class Layout(NamedTuple):
    after_user: str
    """Closes a user turn (R1-0528 opens the assistant's turn there)."""
    before_answer: str
    """Opens an assistant turn that follows a user turn."""
    prompts: dict[bool, str]
    """The generation prompt after a user turn, by thinking."""
    tools: ToolLayout


_FENCED = ToolLayout(f"{CALL_BEGIN}function{TOOL_SEP}{{name}}\n```json\n{{arguments}}\n```{CALL_END}", "\n",
                     OUTPUTS_BEGIN + OUTPUT_BEGIN, "\n" + OUTPUT_BEGIN, OUTPUTS_END)
_PLAIN = ToolLayout(f"{CALL_BEGIN}{{name}}{TOOL_SEP}{{arguments}}{CALL_END}", "", OUTPUT_BEGIN, OUTPUT_BEGIN, "")

LAYOUTS = {
    "deepseek_v3": Layout("", ASSISTANT, {False: ASSISTANT}, _FENCED),
    "deepseek_r1": Layout("", ASSISTANT, {True: f"{ASSISTANT}{THINK_OPEN}\n"}, _FENCED),
    "deepseek_r1_0528": Layout(ASSISTANT, "", {True: ""}, _FENCED),
    "deepseek_v31": Layout("", ASSISTANT + THINK_CLOSE, {False: ASSISTANT + THINK_CLOSE, True: ASSISTANT + THINK_OPEN},
                           _PLAIN),
}


def calls_text(calls: Sequence, tools: ToolLayout) -> str:
    """A turn's calls (ToolCall: name, arguments) as the template writes them, closed; "" without calls."""
    if not calls:
        return ""
    body = tools.separator.join(tools.call.format(name=c.name, arguments=c.arguments) for c in calls)
    return f"{CALLS_BEGIN}{body}{CALLS_END}"


def tool_system_prompt(system: str, tools: Sequence, template: str) -> str:
    """system followed by a description of the declared tools (Tool: name, schema) and the template's call
    format; system unchanged without tools."""
    if not tools:
        return system
    layout = LAYOUTS[template].tools
    example = CALLS_BEGIN + layout.call.format(name="NAME", arguments="ARGUMENTS") + CALLS_END
    joined = "one after another" + (" on new lines" if layout.separator else ", with nothing between them")
    rule = (f"with NAME one of the tools and ARGUMENTS a JSON object that follows its parameters; write several "
            f"calls {joined}. Each result comes back in a tool output.")
    lines = ["## Tools", "", "You may call the tools below. Write a call exactly as", example, rule, ""]
    for tool in tools:
        lines += [f"### {tool.name}"]
        if tool.schema.get("description"):
            lines.append(f"Description: {tool.schema['description']}")
        lines += [f"Parameters: {json.dumps(tool.schema.get('parameters', {}), ensure_ascii=False)}", ""]
    description = "\n".join(lines).rstrip("\n")
    return f"{system}\n\n{description}" if system else description


def read_calls(text: str, template: str) -> tuple[str, list[tuple[str, str]]] | None:
    """(text before the calls, [(name, arguments text)]) of a reply in template's tool format, as written (not
    checked: see arguments_object); None when it has no calls marker, the template is not a built-in one, or
    what follows the marker is not calls in that format. A missing closing marker is accepted: a model may stop
    at its end of sequence first."""
    if template not in LAYOUTS or CALLS_BEGIN not in text:
        return None
    content, _, rest = text.partition(CALLS_BEGIN)
    call = re.escape(LAYOUTS[template].tools.call)
    pattern = call.replace(re.escape("{name}"), "(?P<name>.+?)").replace(re.escape("{arguments}"), "(?P<arguments>.*?)")
    rest = rest.strip().removesuffix(CALLS_END).rstrip()
    rest = rest if rest.endswith(CALL_END) else rest + CALL_END
    calls, position = [], 0
    for match in re.finditer(pattern, rest, re.DOTALL):
        if rest[position:match.start()].strip():  # text between calls: not this format
            return None
        calls.append((match.group("name").strip(), match.group("arguments").strip()))
        position = match.end()
    if not calls or rest[position:].strip():
        return None
    return content.rstrip(), calls


def arguments_object(arguments: str) -> dict | None:
    """A call's arguments parsed, or None when they are not a JSON object."""
    try:
        parsed = json.loads(arguments)
    except json.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None
