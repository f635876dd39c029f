"""Prompts for `fluid sample`: a prompts file (one per line), `-` for stdin, or repeated --prompt.

The file is read as bytes and each line decoded on its own, so one line of invalid UTF-8 costs that
line only. A prompt's index is its line number - 1 (the position for --prompt), whether or not other
lines were skipped, so image names and seeds stay stable when a bad line is fixed. Empty and
undecodable lines are reported on stderr with their line numbers; over-long prompts are truncated
(and reported) when encoded, in sampling/decode.py.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from fluid_cli.errors import FluidError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prompt:
    index: int  # line number - 1 (or --prompt position): part of the image's random key
    text: str
    where: str  # "FILE:LINE", "stdin:LINE" or "--prompt N", for messages


def _decode_lines(data: bytes, name: str) -> tuple[list[Prompt], int]:
    prompts, bad = [], 0
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark is not part of the first prompt
        data = data[3:]
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":  # the file's final newline ends the last line, it is no line
        lines.pop()
    for no, raw in enumerate(lines, start=1):
        where = f"{name}:{no}"
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            log.warning("%s: not valid UTF-8 (byte %d); line skipped", where, e.start)
            bad += 1
            continue
        if not text:
            log.warning("%s: empty prompt; line skipped", where)
            bad += 1
            continue
        prompts.append(Prompt(no - 1, text, where))
    return prompts, bad


def read_prompts(prompts_file: str | None, prompt_args: list[str] | None) -> tuple[list[Prompt], int]:
    """(valid prompts in index order, number of skipped lines). Exactly one source must be given."""
    if prompts_file and prompt_args:
        raise FluidError("give prompts with --prompts FILE or with --prompt TEXT, not both")
    if prompt_args:
        prompts, bad = [], 0
        for i, text in enumerate(prompt_args):
            if not text.strip():
                log.warning("--prompt %d: empty prompt; skipped", i + 1)
                bad += 1
            else:
                prompts.append(Prompt(i, text.strip(), f"--prompt {i + 1}"))
        return _nonempty(prompts, bad, "--prompt")
    if not prompts_file:
        raise FluidError("no prompts: pass --prompts FILE (one prompt a line, - for stdin) or --prompt TEXT")
    if prompts_file == "-":
        return _nonempty(*_decode_lines(sys.stdin.buffer.read(), "stdin"), "stdin")
    path = Path(prompts_file)
    if not path.is_file():
        raise FluidError(f"prompts file {path} does not exist; pass a text file with one prompt a line")
    return _nonempty(*_decode_lines(path.read_bytes(), str(path)), str(path))


def _nonempty(prompts: list[Prompt], bad: int, name: str) -> tuple[list[Prompt], int]:
    if not prompts:
        raise FluidError(f"{name} holds no usable prompt ({bad} empty or undecodable lines)")
    return prompts, bad
