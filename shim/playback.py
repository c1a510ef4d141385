"""Playback tracking: what of the assistant's audio has been sent to Twilio, what the caller has
actually heard (Twilio echoes a `mark` once the audio before it has played), and where to cut
when the caller talks over it. Pure bookkeeping, no I/O; the call decides what to send.

Bytes are μ-law bytes (8 per ms). Every chunk sent is followed by a mark named by a counter; a
mark maps to (item, cumulative bytes of that item), so its echo sets the item's played bytes.
After a `clear`, Twilio still echoes the discarded marks: those echoes are forgotten, not counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MULAW_BYTES_PER_MS = 8


@dataclass(slots=True)
class AssistantItem:
    """One assistant message item's audio on its way to the caller."""

    item_id: str
    response_id: str
    seq: int
    greeting: bool
    started: float = 0.0  # clock() when the caller starts hearing it (estimated)
    sent_bytes: int = 0
    played_bytes: int = 0  # confirmed by Twilio mark echoes
    transcript: list[str] = field(default_factory=list)
    final_transcript: str | None = None
    interrupted: bool = False
    dropped: bool = False  # interrupted: further deltas are not forwarded
    done: bool = False  # its response finished: no more audio will come

    @property
    def fully_heard(self) -> bool:
        return self.played_bytes >= self.sent_bytes


def heard_text(text: str, heard_bytes: int, total_bytes: int) -> str:
    """Best estimate of the words the caller heard: the share of the text proportional to the
    audio played, cut back to a word boundary (a half-heard word is not counted)."""
    if total_bytes <= 0 or heard_bytes <= 0 or not text:
        return ""
    if heard_bytes >= total_bytes:
        return text
    cut = int(len(text) * heard_bytes / total_bytes)
    if cut < len(text) and not text[cut].isspace():
        space = text.rfind(" ", 0, cut)
        cut = space if space >= 0 else 0
    return text[:cut].rstrip()


class Playback:
    __slots__ = ("items", "_marks", "_counter", "free_at")

    def __init__(self) -> None:
        self.items: dict[str, AssistantItem] = {}  # items that may still be interrupted
        self._marks: dict[str, tuple[AssistantItem, int]] = {}
        self._counter = 0
        self.free_at = 0.0  # clock() at which Twilio's buffer should be empty

    @property
    def awaiting_marks(self) -> bool:
        """Audio is queued at Twilio that has not been confirmed played."""
        return bool(self._marks)

    def add(self, item: AssistantItem) -> None:
        self.items[item.item_id] = item

    def sent(self, item: AssistantItem, nbytes: int, now: float) -> str:
        """`nbytes` more of `item` go to Twilio now: the name of the mark to send after them."""
        sent = item.sent_bytes = item.sent_bytes + nbytes
        free_at = self.free_at
        self.free_at = (free_at if free_at > now else now) + nbytes / 8000  # max(), without the call
        counter = self._counter = self._counter + 1
        name = str(counter)
        self._marks[name] = (item, sent)
        return name

    def tones_sent(self, nbytes: int, now: float) -> str:
        """In-band DTMF tones were queued: a mark, so a hang-up waits until they have played."""
        tones = AssistantItem(item_id=f"dtmf-{self._counter + 1}", response_id="", seq=0, greeting=False)
        return self.sent(tones, nbytes, now)

    def on_mark(self, name: str) -> AssistantItem | None:
        """A mark echoed: the audio before it has played. Returns the item if it is now both
        fully generated and fully heard (ready to be recorded for good and forgotten)."""
        entry = self._marks.pop(name, None)
        if entry is None:
            return None  # echoed after a clear: that audio was discarded, not played
        item, cumulative = entry
        if cumulative > item.played_bytes:
            item.played_bytes = cumulative
            if item.done and item.fully_heard:
                return item
        return None

    def playing(self) -> list[AssistantItem]:
        """Items the caller is hearing or about to hear."""
        return [item for item in self.items.values() if not item.dropped and item.played_bytes < item.sent_bytes]

    def clear(self, now: float) -> None:
        """Twilio's queue was cleared: pending marks now mean "discarded", nothing is queued."""
        self._marks.clear()
        self.free_at = now

    def cut(self, generating_response_id: str | None) -> list[tuple[AssistantItem, int]]:
        """The caller talked over the assistant: every item not fully heard, or still being
        generated, is dropped. Returns (item, ms the caller heard) for each, to truncate at."""
        out = []
        for item in self.items.values():
            still_coming = generating_response_id is not None and item.response_id == generating_response_id
            if item.dropped or (item.fully_heard and not still_coming):
                continue
            item.dropped = True
            item.interrupted = True
            out.append((item, item.played_bytes // MULAW_BYTES_PER_MS))
        return out

    def response_done(self, response_id: str) -> list[AssistantItem]:
        """Its response finished: no more audio for these items. Returns those already done with
        (dropped, or fully heard)."""
        finished = []
        for item in self.items.values():
            if item.response_id == response_id:
                item.done = True
                if item.dropped or item.fully_heard:
                    finished.append(item)
        return finished

    def forget(self, item: AssistantItem) -> bool:
        """Drop a finished item (bounded state on long calls); False if it was already gone."""
        if self.items.get(item.item_id) is item:
            del self.items[item.item_id]
            return True
        return False
