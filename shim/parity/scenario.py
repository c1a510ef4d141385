"""Scenario files: the caller's side of a conversation, in YAML or JSON.

    name: book-cleaning
    assistant: receptionist            # optional: the assistant it targets (Vapi assistant id)
    turns:
      - say: "Hi, I'd like to book a cleaning."   # rendered once with OpenAI's speech endpoint, cached
      - wait: 1.5                                  # seconds of line silence
      - audio: clips/tuesday.wav                   # relative to this file; 8/16 kHz mono PCM16 or mu-law WAV
      - dtmf: "42#"
    expect:                              # optional
      tools: [check_availability, book_appointment]
      ended_reason: customer-ended-call

`load_scenario` validates everything and reports every problem in one message, naming the turn.
Audio turns are read into 8 kHz mu-law when loaded (`prepare_audio`), so a bad file fails
before any call is placed.
"""

from __future__ import annotations

import json
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop


class ScenarioError(ValueError):
    pass


@dataclass(frozen=True)
class Turn:
    kind: str  # say | audio | dtmf | wait
    value: Any  # text, Path, digits, seconds


@dataclass(frozen=True)
class Scenario:
    name: str
    turns: tuple[Turn, ...]
    assistant: str | None = None
    expect_tools: tuple[str, ...] | None = None
    expect_ended_reason: str | None = None
    path: Path | None = field(default=None, compare=False)


KINDS = ("say", "audio", "dtmf", "wait")


def parse_scenario(data: Any, base_dir: Path, origin: str = "scenario") -> Scenario:
    problems: list[str] = []
    if not isinstance(data, dict):
        raise ScenarioError(f"{origin}: expected a mapping with name and turns, got {type(data).__name__}")
    unknown = set(data) - {"name", "assistant", "turns", "expect"}
    if unknown:
        problems.append(f"unknown keys {sorted(unknown)}; expected name, assistant, turns, expect")
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        problems.append(f"name: got {name!r}, expected a non-empty string")
    assistant = data.get("assistant")
    if assistant is not None and not isinstance(assistant, str):
        problems.append(f"assistant: got {assistant!r}, expected a string (assistant id)")
    turns: list[Turn] = []
    raw_turns = data.get("turns")
    if not isinstance(raw_turns, list) or not raw_turns:
        problems.append(f"turns: got {raw_turns!r}, expected a non-empty list")
        raw_turns = []
    for i, turn in enumerate(raw_turns):
        where = f"turns[{i}]"
        if not isinstance(turn, dict) or len(turn) != 1 or next(iter(turn)) not in KINDS:
            problems.append(f"{where}: got {turn!r}, expected exactly one of {{say: TEXT}}, {{audio: WAV_PATH}}, "
                            "{dtmf: DIGITS}, {wait: SECONDS}")
            continue
        kind, value = next(iter(turn.items()))
        if kind == "say":
            if not isinstance(value, str) or not value.strip():
                problems.append(f"{where}.say: got {value!r}, expected text")
                continue
        elif kind == "audio":
            if not isinstance(value, str):
                problems.append(f"{where}.audio: got {value!r}, expected a WAV path")
                continue
            value = (base_dir / value).resolve()
            if not value.is_file():
                problems.append(f"{where}.audio: no file {value}")
                continue
        elif kind == "dtmf":
            # YAML reads `dtmf: 0123` as the octal int 83: the digits as written come with the int.
            value = getattr(value, "yaml_text", str(value)) if isinstance(value, int) and not isinstance(value, bool) else value
            if not isinstance(value, str) or not value or any(c not in "0123456789*#ABCDw" for c in value):
                problems.append(f"{where}.dtmf: got {value!r}, expected digits 0-9 * # (w = 0.5 s pause)")
                continue
        elif kind == "wait":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 600:
                problems.append(f"{where}.wait: got {value!r}, expected seconds between 0 and 600")
                continue
            value = float(value)
        turns.append(Turn(kind, value))
    expect = data.get("expect")
    expect = {} if expect is None else expect
    tools = None
    ended_reason = None
    if not isinstance(expect, dict) or set(expect) - {"tools", "ended_reason"}:
        problems.append(f"expect: got {expect!r}, expected {{tools: [NAME...], ended_reason: REASON}}")
    else:
        if "tools" in expect:
            tools = expect["tools"]
            if not isinstance(tools, list) or not all(isinstance(t, str) for t in tools):
                problems.append(f"expect.tools: got {tools!r}, expected a list of tool names")
                tools = None
        ended_reason = expect.get("ended_reason")
        if ended_reason is not None and not isinstance(ended_reason, str):
            problems.append(f"expect.ended_reason: got {ended_reason!r}, expected a string")
    if problems:
        raise ScenarioError(f"{origin}: " + "; ".join(problems))
    return Scenario(name.strip(), tuple(turns), assistant, tuple(tools) if tools is not None else None, ended_reason)


def load_scenario(path: str | Path) -> Scenario:
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot read it ({exc.strerror})") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ScenarioError(f"{path}: not JSON ({exc})") from None
    else:
        try:
            data = yaml.load(raw, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass
        except yaml.YAMLError as exc:
            raise ScenarioError(f"{path}: not YAML ({exc})") from None
    scenario = parse_scenario(data, path.parent, str(path))
    problems = []
    for i, turn in enumerate(scenario.turns):
        if turn.kind == "audio":
            try:
                read_wav_ulaw8k(turn.value)
            except ScenarioError as exc:
                problems.append(f"turns[{i}].audio: {exc}")
    if problems:
        raise ScenarioError(f"{path}: " + "; ".join(problems))
    return Scenario(scenario.name, scenario.turns, scenario.assistant, scenario.expect_tools,
                    scenario.expect_ended_reason, path)


class _YamlInt(int):
    yaml_text: str


class _YamlLoader(yaml.SafeLoader):
    def construct_yaml_int(self, node):  # keeps the text as written: `dtmf: 0123` means the digits 0123
        value = _YamlInt(super().construct_yaml_int(node))
        value.yaml_text = node.value
        return value


_YamlLoader.add_constructor("tag:yaml.org,2002:int", _YamlLoader.construct_yaml_int)


def read_wav_ulaw8k(path: Path) -> bytes:
    """A mono WAV (PCM 16-bit or G.711 mu-law, 8 or 16 kHz) as 8 kHz mu-law. The stdlib `wave`
    module reads PCM only, so the RIFF chunks are walked here."""
    data = Path(path).read_bytes()
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ScenarioError(f"{path}: not a RIFF/WAVE file")
    pos, fmt, audio = 12, None, None
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        body = data[pos + 8:pos + 8 + size]
        if cid == b"fmt ":
            if len(body) < 16:
                raise ScenarioError(f"{path}: fmt chunk of {len(body)} bytes; expected at least 16")
            fmt = struct.unpack("<HHIIHH", body[:16])
        elif cid == b"data":
            audio = body
        pos += 8 + size + (size & 1)
    if fmt is None or audio is None:
        raise ScenarioError(f"{path}: no fmt or data chunk")
    code, channels, rate, _, _, bits = fmt
    if channels != 1 or rate not in (8000, 16000) or (code, bits) not in ((1, 16), (7, 8)):
        raise ScenarioError(f"{path}: {channels} channel(s), {rate} Hz, format {code}/{bits}-bit; "
                            "expected mono 8 or 16 kHz, PCM 16-bit or mu-law")
    if code == 1:
        audio = audio[: len(audio) - len(audio) % 2]  # a file cut mid-sample: drop the half sample
    if not audio:
        raise ScenarioError(f"{path}: the data chunk holds no audio; expected at least one sample")
    pcm = audioop.ulaw2lin(audio, 2) if code == 7 else audio
    if rate != 8000:
        pcm, _ = audioop.ratecv(pcm, 2, 1, rate, 8000, None)
    return audioop.lin2ulaw(pcm, 2)
