"""Stored responses of the Responses API: `store` (default true, as OpenAI's), chained with
`previous_response_id`, read back with GET /v1/responses/{id}, removed with DELETE.

Each entry keeps the response object as it was returned and the conversation it ends (every
earlier turn's messages, this request's input, the reply), so a chained request is the whole
conversation again: its prompt starts with the previous one, which the prefix cache holds. The
store is bounded by count (least recently used out first) and by age; instructions are not
carried into the next turn, as OpenAI's are not.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any


@dataclass
class StoredResponse:
    response: dict[str, Any]  # the response object as returned (JSON)
    messages: list[dict[str, Any]]  # the conversation through this reply (chat messages)
    model: str
    stored_at: float


class ResponseStore:
    def __init__(self, max_entries: int = 512, max_age_seconds: float = 3600.0):
        self.max_entries = max_entries
        self.max_age_seconds = max_age_seconds
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, id: str, response: dict, messages: list[dict], model: str) -> None:
        if self.max_entries <= 0:
            return
        with self._lock:
            self._entries[id] = StoredResponse(response, messages, model, time.monotonic())
            self._entries.move_to_end(id)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def get(self, id: str) -> StoredResponse | None:
        with self._lock:
            entry = self._entries.get(id)
            if entry is None:
                return None
            if time.monotonic() - entry.stored_at > self.max_age_seconds:
                del self._entries[id]
                return None
            self._entries.move_to_end(id)
            return entry

    def delete(self, id: str) -> bool:
        with self._lock:
            return self._entries.pop(id, None) is not None

    def __len__(self) -> int:
        return len(self._entries)
