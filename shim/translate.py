"""Exported Vapi assistant -> Realtime session + the shim's call policy + findings. Pure.

Every field the shim reads is listed in FIELDS with what becomes of it (`mapped`,
`approximated`, `unsupported`); the README's field table is checked against this list. A field
present in an assistant produces a Finding naming its JSON path; a field the shim does not know
produces an `unsupported` finding too: nothing is silently ignored. Vapi's defaults apply to
absent fields as Vapi applies them (https://docs.vapi.ai/api-reference/assistants/create).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from . import tool_kinds
from .assistant import AssistantError, CallContext, render
from .tool_schema import Finding, ToolBinding, ToolSchemaError, convert_tools

REALTIME_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar")
DEFAULT_VOICE = "marin"

# Vapi voice -> Realtime voice, overridable per deployment (SHIM_VOICE_MAP). Vapi's voices are
# other vendors' TTS voices, so no mapping is exact: this keeps the speaker's apparent gender and
# otherwise falls back to DEFAULT_VOICE. OpenAI's fable/onyx/nova are not Realtime voices.
VOICE_MAP: dict[str, str] = {
    "nova": "shimmer", "fable": "ballad", "onyx": "ash",
    "sarah": "marin", "rachel": "marin", "bella": "coral", "elli": "shimmer", "domi": "coral",
    "jennifer": "marin", "paige": "marin", "hana": "coral", "lily": "shimmer", "kylie": "coral",
    "savannah": "marin", "neha": "marin", "emma": "coral", "jenny": "marin", "aria": "marin", "clara": "marin",
    "adam": "cedar", "josh": "ash", "arnold": "ash", "sam": "echo", "antoni": "verse",
    "elliot": "cedar", "rohan": "cedar", "cole": "ash", "harry": "cedar", "spencer": "verse",
    "guy": "cedar", "davis": "ash", "andrew": "cedar", "brian": "echo",
}

FIRST_MESSAGE_MODES = (
    "assistant-speaks-first",
    "assistant-speaks-first-with-model-generated-message",
    "assistant-waits-for-user",
)
DEFAULT_SERVER_MESSAGES = (
    "conversation-update", "end-of-call-report", "function-call", "hang", "speech-update", "status-update",
    "tool-calls", "transfer-destination-request", "handoff-destination-request", "user-interrupted",
    "assistant.started",
)
KNOWN_TOOL_TYPES = tool_kinds.KNOWN_TYPES
# server_vad refuses to end a turn on less silence than this; Vapi allows waitSeconds=0.
MIN_SILENCE_MS = 200
# stopSpeakingPlan.numWords has no transcript to count before the cut-off decision: speech
# runs at about 2.5 words per second, so N words are approximated as N x 0.4 s of voice.
SECONDS_PER_WORD = 0.4


@dataclass(frozen=True)
class FieldRule:
    path: str
    status: str  # mapped | approximated | unsupported
    summary: str


# What the shim does with each Vapi field (the README's table is checked against this list).
FIELDS: tuple[FieldRule, ...] = (
    FieldRule("name", "mapped", "stored on the call row (assistant_name) and in logs"),
    FieldRule("metadata", "mapped", "stored on the call row (calls.metadata)"),
    FieldRule("model.messages[system]", "mapped", "Liquid-rendered into session.instructions (several are joined)"),
    FieldRule("model.messages[user|assistant]", "approximated", "added as conversation items before the first response (assistant text, not audio)"),
    FieldRule("model.systemPrompt", "mapped", "legacy: used as the instructions when there is no system message"),
    FieldRule("model.provider", "approximated", "the Realtime model from OPENAI_REALTIME_MODEL runs the call, whatever the provider"),
    FieldRule("model.model", "approximated", "the Realtime model from OPENAI_REALTIME_MODEL runs the call"),
    FieldRule("model.temperature", "unsupported", "the Realtime GA session has no temperature"),
    FieldRule("model.maxTokens", "approximated", "max_output_tokens = 8 x maxTokens (audio tokens count too); absent: no limit"),
    FieldRule("model.tools", "mapped", "Realtime function tools (names made valid, JSON Schema simplified, findings per change)"),
    FieldRule("model.toolIds", "mapped", "saved tools from SHIM_ASSISTANTS_DIR/tools/<id>.json, merged after model.tools"),
    FieldRule("voice.provider", "approximated", "a Realtime voice is chosen through VOICE_MAP (overridable: SHIM_VOICE_MAP)"),
    FieldRule("voice.voiceId", "approximated", "mapped to a Realtime voice through VOICE_MAP (overridable: SHIM_VOICE_MAP)"),
    FieldRule("voice.speed", "approximated", "audio.output.speed, clamped to 0.25-1.5"),
    FieldRule("transcriber.language", "mapped", "audio.input.transcription.language (first subtag; 'multi' omitted)"),
    FieldRule("transcriber.keywords", "approximated", "joined into the transcription prompt"),
    FieldRule("transcriber.keyterm", "approximated", "joined into the transcription prompt"),
    FieldRule("transcriber.model", "approximated", "used when it is an OpenAI transcription model, else SHIM_TRANSCRIPTION_MODEL"),
    FieldRule("transcriber.provider", "approximated", "OpenAI transcribes the caller for the stored transcript; the model hears the raw audio"),
    FieldRule("firstMessage", "mapped", "Liquid-rendered and asked of the model word for word"),
    FieldRule("firstMessageMode", "mapped", "all three modes"),
    FieldRule("firstMessageInterruptionsEnabled", "mapped", "default false: the greeting is not cut off"),
    FieldRule("startSpeakingPlan.waitSeconds", "mapped", "server_vad silence_duration_ms (at least 200 ms)"),
    FieldRule("startSpeakingPlan.smartEndpointingPlan", "approximated", "semantic_vad; eagerness from the plan's maximum wait"),
    FieldRule("startSpeakingPlan.smartEndpointingEnabled", "approximated", "legacy switch: semantic_vad"),
    FieldRule("startSpeakingPlan.transcriptionEndpointingPlan", "unsupported", "server VAD has no punctuation-aware endpointing"),
    FieldRule("startSpeakingPlan.customEndpointingRules", "unsupported", "per-phrase endpointing is not applied"),
    FieldRule("stopSpeakingPlan.voiceSeconds", "mapped", "the shim's barge-in gate: that much voiced caller audio before the assistant is cut off"),
    FieldRule("stopSpeakingPlan.numWords", "approximated", "the gate requires numWords x 0.4 s of voice (no transcript exists yet at that moment)"),
    FieldRule("stopSpeakingPlan.backoffSeconds", "approximated", "not enforced: the caller's speech plus the silence window already delays the reply"),
    FieldRule("stopSpeakingPlan.acknowledgementPhrases", "approximated", "short acknowledgements stay under the voice gate and do not interrupt"),
    FieldRule("stopSpeakingPlan.interruptionPhrases", "unsupported", "phrases cannot be matched before the transcript exists"),
    FieldRule("endCallFunctionEnabled", "mapped", "legacy: adds the endCall tool"),
    FieldRule("endCallMessage", "mapped", "spoken word for word before an endCall hang-up"),
    FieldRule("endCallPhrases", "mapped", "case-insensitive match in the assistant's transcript; hang-up once that utterance was heard"),
    FieldRule("silenceTimeoutSeconds", "mapped", "default 30: the call ends (silence-timed-out) after that long with nobody speaking"),
    FieldRule("maxDurationSeconds", "mapped", "default 600: the call ends (exceeded-max-duration)"),
    FieldRule("backgroundSound", "approximated", "default office: a self-made office loop (or a WAV URL) mixed under the assistant's voice"),
    FieldRule("backgroundSpeechDenoisingPlan", "approximated", "Realtime near-field noise reduction (on by default, as Vapi's smart denoising)"),
    FieldRule("backgroundDenoisingEnabled", "approximated", "legacy: Realtime near-field noise reduction"),
    FieldRule("hipaaEnabled", "mapped", "legacy: no transcript text stored"),
    FieldRule("compliancePlan.hipaaEnabled", "mapped", "no transcript text stored"),
    FieldRule("compliancePlan.pciEnabled", "unsupported", "no PCI-specific redaction"),
    FieldRule("recordingEnabled", "mapped", "legacy: Twilio dual-channel recording of the live call"),
    FieldRule("artifactPlan.recordingEnabled", "mapped", "default true: Twilio dual-channel recording started on the live call, URL on the call row"),
    FieldRule("voicemailDetection", "unsupported", "inbound calls only: nothing to detect"),
    FieldRule("voicemailMessage", "unsupported", "inbound calls only"),
    FieldRule("server", "mapped", "server messages and tool webhooks go to server.url with X-Vapi-Secret and server.headers (secrets: SHIM_SECRETS_FILE)"),
    FieldRule("serverUrl", "mapped", "legacy server URL, used when there is no server.url"),
    FieldRule("serverUrlSecret", "mapped", "legacy secret, sent as X-Vapi-Secret"),
    FieldRule("serverMessages", "approximated", "status-update, transcript (final), hang, tool-calls, transfer-destination-request, end-of-call-report are sent; the other types are not"),
    FieldRule("analysisPlan", "mapped", "summary, structured data and success evaluation after the call (OpenAI chat model), in the end-of-call-report"),
    FieldRule("hooks", "unsupported", "hooks are not run"),
    FieldRule("messagePlan", "unsupported", "legacy idle messages are not spoken"),
    FieldRule("keypadInputPlan", "mapped", "caller keypresses reach the model as 'User's Keypad Entry: …' (delimiters, timeout), as on Vapi"),
    FieldRule("monitorPlan", "unsupported", "no listen/control URLs"),
    FieldRule("clientMessages", "unsupported", "no Vapi client SDK on phone calls (harmless)"),
    FieldRule("modelOutputInMessagesEnabled", "unsupported", "history always holds what the model said (harmless)"),
    FieldRule("transportConfigurations", "unsupported", "outbound dialing is not part of the shim yet"),
    FieldRule("observabilityPlan", "unsupported", "Langfuse export is not supported"),
    FieldRule("credentialIds", "unsupported", "provider credentials stay in Vapi (harmless)"),
    FieldRule("credentials", "unsupported", "provider credentials stay in Vapi (harmless)"),
    FieldRule("artifactPlan.transcriptPlan", "unsupported", "transcripts live in the utterances table"),
    FieldRule("assistantOverrides.variableValues", "mapped", "template variables"),
)
FIELD_STATUS = {rule.path: rule for rule in FIELDS}
# Read-only keys of an export (GET /assistant) that carry no behaviour.
EXPORT_KEYS = {"id", "orgId", "createdAt", "updatedAt", "isServerUrlSecretSet", "latestVersion", "assistantOverrides"}


@dataclass(frozen=True)
class Greeting:
    mode: str
    text: str = ""
    interruptible: bool = False


@dataclass(frozen=True)
class CallPolicy:
    max_duration_s: float = 600.0
    silence_timeout_s: float = 30.0
    silence_duration_ms: int = 400  # 0 with semantic_vad
    prefix_padding_ms: int = 300
    barge_in_voice_ms: int = 200  # voiced caller audio needed to cut the assistant off
    end_call_phrases: tuple[str, ...] = ()
    end_call_message: str = ""
    background_sound: str = "office"  # off | office | a URL
    hipaa: bool = False
    recording: bool = True
    few_shot: tuple[tuple[str, str], ...] = ()  # (role, text) items created before the first response
    server_messages: tuple[str, ...] = DEFAULT_SERVER_MESSAGES  # what the assistant's server is sent
    keypad_plan: dict[str, Any] | None = None
    analysis_plan: dict[str, Any] | None = None
    variable_values: dict[str, Any] = field(default_factory=dict)  # assistantOverrides.variableValues


@dataclass(frozen=True)
class CallSetup:
    assistant_id: str
    assistant_name: str
    session: dict[str, Any]  # exactly what goes into session.update's `session`
    greeting: Greeting
    policy: CallPolicy
    voice: str
    model: str
    tools: tuple[ToolBinding, ...] = ()
    findings: tuple[Finding, ...] = ()
    metadata: dict[str, Any] | None = None
    assistant: dict[str, Any] = field(default_factory=dict)  # the export, for Vapi's webhook envelopes
    variables: dict[str, Any] = field(default_factory=dict)  # template variables of this call


class _Reader:
    """Typed access to the assistant JSON that records which paths were read and raises
    AssistantError naming the path, the value and the expected type."""

    def __init__(self, data: dict[str, Any]):
        self.data = data
        self.findings: list[Finding] = []

    def get(self, path: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        cur: Any = self.data
        for part in path.split("."):
            if not isinstance(cur, dict) or cur.get(part) is None:
                return default
            cur = cur[part]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(cur, kinds) or (isinstance(cur, bool) and bool not in kinds):
            raise AssistantError(path, cur, " or ".join(k.__name__ for k in kinds))
        return cur

    def has(self, path: str) -> bool:
        cur: Any = self.data
        for part in path.split("."):
            if not isinstance(cur, dict) or cur.get(part) is None:
                return False
            cur = cur[part]
        return True

    def note(self, path: str, detail: str | None = None, status: str | None = None) -> None:
        rule = FIELD_STATUS.get(path)
        self.findings.append(
            Finding(path, status or (rule.status if rule else "unsupported"), detail or (rule.summary if rule else ""))
        )


def map_voice(voice: dict[str, Any] | None, overrides: dict[str, str] | None = None) -> str:
    if not voice:
        return DEFAULT_VOICE
    voice_id = str(voice.get("voiceId") or "").strip().lower()
    table = {**VOICE_MAP, **{k.lower(): v for k, v in (overrides or {}).items()}}
    if voice_id in table:
        return table[voice_id]
    if voice_id in REALTIME_VOICES:
        return voice_id
    return DEFAULT_VOICE


def _eagerness(plan: dict[str, Any]) -> tuple[str, str]:
    """semantic_vad eagerness for a Vapi smart-endpointing plan: the eagerness whose maximum
    wait (low 8 s, medium 4 s, high 2 s) is closest to the plan's maximum wait."""
    provider = plan.get("provider")
    wait = plan.get("waitFunction")
    if provider == "livekit" and isinstance(wait, str):
        numbers = [float(n) for n in re.findall(r"\d+(?:\.\d+)?", wait)]
        if len(numbers) >= 2:
            max_ms = numbers[0] + numbers[1]  # "A + B * x" at x = 1
            eagerness = min((("low", 8000), ("medium", 4000), ("high", 2000)), key=lambda e: abs(e[1] - max_ms))[0]
            return eagerness, f"livekit waitFunction {wait!r} waits up to {max_ms:.0f} ms: eagerness {eagerness}"
    if provider == "livekit":
        return "low", "livekit's default waitFunction (200 + 8000x) waits up to 8.2 s: eagerness low"
    return "auto", f"{provider or 'smart'} endpointing: eagerness auto (medium, up to 4 s)"


def translate(
    assistant_id: str,
    assistant: dict[str, Any],
    ctx: CallContext,
    *,
    model: str,
    saved_tools: dict[str, dict[str, Any]] | None = None,
    transcription_model: str = "gpt-4o-mini-transcribe",
    voice_overrides: dict[str, str] | None = None,
) -> CallSetup:
    """Translate one exported assistant for one call. Raises AssistantError on invalid input."""
    if not isinstance(assistant, dict):
        raise AssistantError("$", assistant, "a JSON object (an exported Vapi assistant)")
    r = _Reader(assistant)
    variables = ctx.template_variables(assistant)
    if r.has("assistantOverrides.variableValues"):
        r.get("assistantOverrides.variableValues", dict)
        r.note("assistantOverrides.variableValues")

    # --- prompt and few-shot messages -------------------------------------------------
    messages = r.get("model.messages", list, [])
    system_parts: list[str] = []
    few_shot: list[tuple[str, str]] = []
    for i, msg in enumerate(messages):
        path = f"model.messages[{i}]"
        if not isinstance(msg, dict):
            raise AssistantError(path, msg, "an object with role and content")
        role, content = msg.get("role"), msg.get("content")
        if role not in ("system", "user", "assistant", "tool", "function"):
            raise AssistantError(f"{path}.role", role, "system | user | assistant | tool | function")
        if content is not None and not isinstance(content, str):
            raise AssistantError(f"{path}.content", content, "a string")
        if role == "system":
            system_parts.append(render(content or "", variables, f"{path}.content", ctx.now))
        elif role in ("user", "assistant") and content:
            few_shot.append((role, render(content, variables, f"{path}.content", ctx.now)))
        else:
            r.findings.append(Finding(f"{path}", "unsupported", f"a {role} message in the prompt is not replayed"))
    if system_parts:
        r.note("model.messages[system]")
    legacy_prompt = r.get("model.systemPrompt", str)
    if legacy_prompt is not None:
        if not system_parts:
            system_parts.append(render(legacy_prompt, variables, "model.systemPrompt", ctx.now))
        r.note("model.systemPrompt")
    if few_shot:
        r.note("model.messages[user|assistant]")
    instructions = "\n\n".join(system_parts)

    provider = r.get("model.provider", str)
    if provider is not None:
        r.note("model.provider", f"{provider!r}: the Realtime model {model} runs the call")
    if r.has("model.model"):
        r.note("model.model", f"{r.get('model.model', str)!r} -> {model}")
    if r.has("model.temperature"):
        r.get("model.temperature", (int, float))
        r.note("model.temperature")
    max_tokens = r.get("model.maxTokens", (int, float))
    if max_tokens is not None:
        r.note("model.maxTokens", f"maxTokens {max_tokens} -> max_output_tokens {min(4096, int(max_tokens) * 8)}")

    # --- tools ------------------------------------------------------------------------
    tool_inputs: list[tuple[str, dict[str, Any]]] = []
    for i, tool in enumerate(r.get("model.tools", list, [])):
        tool_inputs.append((f"model.tools[{i}]", tool))
    for i, tool_id in enumerate(r.get("model.toolIds", list, [])):
        path = f"model.toolIds[{i}]"
        if not isinstance(tool_id, str):
            raise AssistantError(path, tool_id, "a tool id (string)")
        tool = (saved_tools or {}).get(tool_id)
        if tool is None:
            raise AssistantError(path, tool_id, "a saved tool (tools/<id>.json, or --tools FILE): Vapi fails the call too")
        tool_inputs.append((f"{path}<{tool_id}>", tool))
    if r.get("endCallFunctionEnabled", bool, False):
        r.note("endCallFunctionEnabled")
        if not any(isinstance(t, dict) and t.get("type") == "endCall" for _, t in tool_inputs):
            tool_inputs.append(("endCallFunctionEnabled", {"type": "endCall"}))
    elif r.has("endCallFunctionEnabled"):
        r.note("endCallFunctionEnabled")
    for path, tool in tool_inputs:
        if isinstance(tool, dict) and isinstance(tool.get("type"), str) and tool["type"] not in KNOWN_TOOL_TYPES:
            raise AssistantError(f"{path}.type", tool["type"], "a Vapi tool type (" + ", ".join(sorted(KNOWN_TOOL_TYPES)) + ")")
    try:
        realtime_tools, bindings, tool_findings = convert_tools(tool_inputs)
    except ToolSchemaError as exc:
        raise AssistantError(getattr(exc, "path", "model.tools"), getattr(exc, "value", None), str(exc)) from None
    r.findings.extend(tool_findings)
    # Requests go to http(s) URLs only (tools/egress.py refuses the rest when the call makes them):
    # say so when the assistant is read, not first in the middle of a call.
    urls = [(f"{path}.server.url", t.get("server", {}).get("url")) for path, t in tool_inputs
            if isinstance(t, dict) and isinstance(t.get("server"), dict)]
    urls += [(f"{path}.url", t.get("url")) for path, t in tool_inputs if isinstance(t, dict) and t.get("type") == "apiRequest"]
    urls += [("server.url", r.get("server.url", str, None)), ("serverUrl", r.get("serverUrl", str, None))]
    for path, url in urls:
        if isinstance(url, str) and url and not re.match(r"^https?://", url, re.IGNORECASE):
            r.findings.append(Finding(path, "unsupported", f"{url.split(':', 1)[0]!r}: only http(s) URLs are called; "
                                                           "requests to this one are refused"))
    if r.has("model.tools"):
        r.note("model.tools")
    if r.has("model.toolIds"):
        r.note("model.toolIds")
    for key in ("knowledgeBase", "knowledgeBaseId", "functions", "toolRefs", "fallbackModels", "emotionRecognitionEnabled", "numFastTurns"):
        if r.has(f"model.{key}"):
            r.findings.append(Finding(f"model.{key}", "unsupported", "not available outside Vapi"))

    # --- voice ------------------------------------------------------------------------
    voice_cfg = r.get("voice", dict)
    voice = map_voice(voice_cfg, voice_overrides)
    output: dict[str, Any] = {"format": {"type": "audio/pcmu"}, "voice": voice}
    if voice_cfg is not None:
        r.note("voice.voiceId", f"{voice_cfg.get('provider')}/{voice_cfg.get('voiceId')} -> {voice}")
        speed = r.get("voice.speed", (int, float))
        if speed is not None:
            output["speed"] = min(1.5, max(0.25, float(speed)))
            r.note("voice.speed", f"{speed} -> {output['speed']}")
        for key in sorted(set(voice_cfg) - {"provider", "voiceId", "speed"}):
            r.findings.append(Finding(f"voice.{key}", "unsupported", "the Realtime voice has no such setting"))

    # --- transcription ----------------------------------------------------------------
    transcription: dict[str, Any] = {"model": transcription_model}
    tmodel = r.get("transcriber.model", str)
    if tmodel and tmodel in ("gpt-4o-transcribe", "gpt-4o-mini-transcribe", "whisper-1", "gpt-transcribe"):
        transcription["model"] = tmodel
    language = r.get("transcriber.language", str)
    if language:
        sub = language.split("-")[0].lower()
        if re.fullmatch(r"[a-z]{2}", sub):
            transcription["language"] = sub
        r.note("transcriber.language", f"{language!r} -> {transcription.get('language', 'detected')}")
    words: list[str] = []
    for key in ("keywords", "keyterm"):
        values = r.get(f"transcriber.{key}", list, [])
        if values:
            words += [str(v).split(":")[0] for v in values]
            r.note(f"transcriber.{key}")
    if words:
        transcription["prompt"] = ", ".join(words)
    if r.has("transcriber.provider"):
        r.note("transcriber.provider", f"{r.get('transcriber.provider', str)} -> {transcription['model']}")
    if tmodel:
        r.note("transcriber.model", f"{tmodel} -> {transcription['model']}")

    # --- greeting ---------------------------------------------------------------------
    mode = r.get("firstMessageMode", str, "assistant-speaks-first")
    if mode not in FIRST_MESSAGE_MODES:
        raise AssistantError("firstMessageMode", mode, " | ".join(FIRST_MESSAGE_MODES))
    first_message = render(r.get("firstMessage", str, ""), variables, "firstMessage", ctx.now)
    if r.has("firstMessage"):
        r.note("firstMessage")
        if re.match(r"https?://\S+\.(mp3|wav)$", first_message.strip()):
            r.findings.append(Finding("firstMessage", "unsupported", "an audio-file greeting is read out as its URL"))
    if r.has("firstMessageMode"):
        r.note("firstMessageMode")
    if mode == "assistant-speaks-first" and not first_message.strip():
        mode = "assistant-waits-for-user"  # Vapi: no firstMessage, the assistant waits
    interruptible = r.get("firstMessageInterruptionsEnabled", bool, False)
    if r.has("firstMessageInterruptionsEnabled"):
        r.note("firstMessageInterruptionsEnabled")
    greeting = Greeting(mode=mode, text=first_message, interruptible=interruptible)

    # --- turn taking ------------------------------------------------------------------
    wait_s = r.get("startSpeakingPlan.waitSeconds", (int, float), 0.4)
    if not 0 <= wait_s <= 5:
        raise AssistantError("startSpeakingPlan.waitSeconds", wait_s, "a number from 0 to 5")
    smart_plan = r.get("startSpeakingPlan.smartEndpointingPlan", dict)
    smart_flag = r.get("startSpeakingPlan.smartEndpointingEnabled", (bool, str), False)
    silence_ms = max(MIN_SILENCE_MS, int(round(wait_s * 1000)))
    if smart_plan is not None or smart_flag:
        eagerness, why = _eagerness(smart_plan or {"provider": "livekit" if smart_flag == "livekit" else "vapi"})
        turn_detection: dict[str, Any] = {
            "type": "semantic_vad", "eagerness": eagerness, "create_response": True, "interrupt_response": False,
        }
        r.note("startSpeakingPlan.smartEndpointingPlan" if smart_plan is not None else "startSpeakingPlan.smartEndpointingEnabled", why)
        policy_silence = 0
    else:
        turn_detection = {
            "type": "server_vad",
            "prefix_padding_ms": 300,
            "silence_duration_ms": silence_ms,
            "create_response": True,
            # The shim decides barge-in (it alone knows what Twilio has played): see call.py.
            "interrupt_response": False,
        }
        policy_silence = silence_ms
    if r.has("startSpeakingPlan.waitSeconds"):
        r.note("startSpeakingPlan.waitSeconds", f"{wait_s} s -> silence_duration_ms {silence_ms}")
    for key in ("transcriptionEndpointingPlan", "customEndpointingRules"):
        if r.has(f"startSpeakingPlan.{key}"):
            r.note(f"startSpeakingPlan.{key}")

    voice_seconds = r.get("stopSpeakingPlan.voiceSeconds", (int, float), 0.2)
    num_words = r.get("stopSpeakingPlan.numWords", (int, float), 0)
    barge_in_ms = int(round(1000 * (num_words * SECONDS_PER_WORD if num_words else voice_seconds)))
    for key in ("voiceSeconds", "numWords", "backoffSeconds", "acknowledgementPhrases", "interruptionPhrases"):
        if r.has(f"stopSpeakingPlan.{key}"):
            r.note(f"stopSpeakingPlan.{key}")

    # --- hang-up rules and timeouts -----------------------------------------------------
    phrases = r.get("endCallPhrases", list, [])
    for i, phrase in enumerate(phrases):
        if not isinstance(phrase, str):
            raise AssistantError(f"endCallPhrases[{i}]", phrase, "a string")
    if phrases:
        r.note("endCallPhrases")
    end_call_message = render(r.get("endCallMessage", str, ""), variables, "endCallMessage", ctx.now)
    if r.has("endCallMessage"):
        r.note("endCallMessage")
    max_duration = r.get("maxDurationSeconds", (int, float), 600)
    silence_timeout = r.get("silenceTimeoutSeconds", (int, float), 30)
    if not 10 <= max_duration <= 43200:
        raise AssistantError("maxDurationSeconds", max_duration, "a number from 10 to 43200")
    if not 5 <= silence_timeout <= 3600:
        raise AssistantError("silenceTimeoutSeconds", silence_timeout, "a number from 5 to 3600")
    if max_duration > 3600:
        # OpenAI closes a Realtime session after 60 minutes; the call then ends with an apology.
        r.findings.append(Finding("maxDurationSeconds", "approximated",
                                  f"{max_duration} s: a Realtime session lasts at most 60 minutes, so calls end there"))
    for key in ("maxDurationSeconds", "silenceTimeoutSeconds"):
        r.note(key) if r.has(key) else r.note(key, f"absent: Vapi's default ({max_duration if key[0] == 'm' else silence_timeout} s) applies")

    # --- audio around the voice -----------------------------------------------------------
    background = r.get("backgroundSound", str, "office")
    if background not in ("off", "office") and not re.match(r"https?://", background):
        raise AssistantError("backgroundSound", background, '"off", "office" or an http(s) URL')
    r.note("backgroundSound", None if r.has("backgroundSound") else "absent: Vapi plays office ambience on phone calls; so does the shim")
    denoise = True
    if r.has("backgroundSpeechDenoisingPlan"):
        denoise = bool(r.get("backgroundSpeechDenoisingPlan.smartDenoisingPlan.enabled", bool, True))
        r.note("backgroundSpeechDenoisingPlan", f"noise_reduction {'near_field' if denoise else 'off'}")
    elif r.has("backgroundDenoisingEnabled"):
        denoise = r.get("backgroundDenoisingEnabled", bool)
        r.note("backgroundDenoisingEnabled")

    # --- compliance, artifacts --------------------------------------------------------------
    hipaa = bool(r.get("compliancePlan.hipaaEnabled", bool, False) or r.get("hipaaEnabled", bool, False))
    for key in ("compliancePlan.hipaaEnabled", "hipaaEnabled", "compliancePlan.pciEnabled"):
        if r.has(key):
            r.note(key)
    recording = r.get("artifactPlan.recordingEnabled", bool, r.get("recordingEnabled", bool, True))
    for key in ("artifactPlan.recordingEnabled", "recordingEnabled"):
        if r.has(key):
            r.note(key)
    if r.has("artifactPlan.transcriptPlan"):
        r.note("artifactPlan.transcriptPlan")

    metadata = r.get("metadata", dict)
    listed = r.get("serverMessages", list)
    server_messages = DEFAULT_SERVER_MESSAGES if listed is None else tuple(
        # 'transcript[transcriptType="final"]' subscribes to final transcripts, which is all the shim sends
        "transcript" if str(m).startswith("transcript") else str(m) for m in listed)
    for key in ("name", "metadata", "voicemailDetection", "voicemailMessage", "server", "serverUrl", "serverUrlSecret",
                "serverMessages", "analysisPlan", "hooks", "messagePlan", "keypadInputPlan", "monitorPlan", "clientMessages",
                "modelOutputInMessagesEnabled", "transportConfigurations", "observabilityPlan", "credentialIds", "credentials"):
        if r.has(key):
            r.note(key)

    known_top = {path.split(".")[0].split("[")[0] for path in FIELD_STATUS} | EXPORT_KEYS | {
        "model", "voice", "transcriber", "startSpeakingPlan", "stopSpeakingPlan", "artifactPlan", "compliancePlan",
    }
    for key in sorted(set(assistant) - known_top):
        r.findings.append(Finding(key, "unsupported", "not read by the shim"))

    audio_input: dict[str, Any] = {
        "format": {"type": "audio/pcmu"},
        "transcription": transcription,
        "turn_detection": turn_detection,
        "noise_reduction": {"type": "near_field"} if denoise else None,
    }
    session: dict[str, Any] = {
        "type": "realtime",
        "model": model,
        "instructions": instructions,
        "output_modalities": ["audio"],
        "audio": {"input": audio_input, "output": output},
    }
    if realtime_tools:
        session["tools"] = realtime_tools
        session["tool_choice"] = "auto"
    if max_tokens is not None:
        session["max_output_tokens"] = min(4096, max(1, int(max_tokens) * 8))

    policy = CallPolicy(
        max_duration_s=float(max_duration),
        silence_timeout_s=float(silence_timeout),
        silence_duration_ms=policy_silence,
        prefix_padding_ms=300 if turn_detection["type"] == "server_vad" else 0,
        barge_in_voice_ms=barge_in_ms,
        end_call_phrases=tuple(p.lower() for p in phrases if p.strip()),
        end_call_message=end_call_message,
        background_sound=background,
        hipaa=hipaa,
        recording=bool(recording),
        few_shot=tuple(few_shot),
        server_messages=server_messages,
        keypad_plan=r.get("keypadInputPlan", dict),
        analysis_plan=r.get("analysisPlan", dict),
        variable_values=dict(r.get("assistantOverrides.variableValues", dict, {})),
    )
    return CallSetup(
        assistant_id=assistant_id,
        assistant_name=str(assistant.get("name") or ""),
        session=session,
        greeting=greeting,
        policy=policy,
        voice=voice,
        model=model,
        tools=tuple(bindings),
        findings=tuple(r.findings),
        metadata=metadata,
        assistant=assistant,
        variables=variables,
    )
