"""The tools this worker can offer right now: every server's listing, indexed by name.

Written by discovery on the MCP loop thread, read by pool threads on every task. Each
change builds new maps and swaps them in whole, so a reader sees the old maps or the
new ones, never a mix, and reads take no lock.

>>> catalog = Catalog()
>>> catalog.tool("search__add") is None
True
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Sequence

from swarm_workers.tools.base import ToolSpec, is_allowed
from swarm_workers.tools.listing import RegisteredTool, ServerTools

__all__ = ["Catalog"]


class Catalog:
    """Listings by server, tools by their `server__tool` name, resources by URI."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # serialises writers; readers never take it
        self._listings: dict[str, ServerTools] = {}
        self._index: dict[str, RegisteredTool] = {}
        self._resource_servers: dict[str, tuple[str, ...]] = {}

    @property
    def version(self) -> str:
        """A digest of every server's listing: equal on workers that see the same tools."""
        listings = self._listings
        digest = hashlib.sha256(
            json.dumps(sorted((s, t.version) for s, t in listings.items())).encode()
        )
        return digest.hexdigest()[:12]

    def tool(self, name: str) -> RegisteredTool | None:
        return self._index.get(name)

    def specs(self, allowed: Sequence[str]) -> list[ToolSpec]:
        index = self._index
        return [index[n].spec for n in sorted(index) if is_allowed(n, allowed)]

    def servers(self) -> list[ServerTools]:
        listings = self._listings
        return [listings[name] for name in sorted(listings)]

    def listing(self, server: str) -> ServerTools | None:
        return self._listings.get(server)

    def resource_servers(self, uri: str) -> tuple[str, ...]:
        """The servers that list `uri`, by name."""
        return self._resource_servers.get(uri, ())

    def install(self, listing: ServerTools) -> None:
        with self._lock:
            self._publish({**self._listings, listing.server: listing})

    def drop(self, server: str) -> None:
        with self._lock:
            self._publish({k: v for k, v in self._listings.items() if k != server})

    def _publish(self, listings: dict[str, ServerTools]) -> None:
        index = {t.name: t for s in listings.values() for t in s.tools}
        owners: dict[str, list[str]] = {}
        for name in sorted(listings):
            for uri in listings[name].resources:
                owners.setdefault(uri, []).append(name)
        self._listings = listings
        self._index = index
        self._resource_servers = {uri: tuple(names) for uri, names in owners.items()}
