"""The SDK's directory listing pages like its other lists (both clients over httpx.MockTransport):
``list_files`` sends ``limit`` and ``cursor`` with the path and parses one page (entries, ``has_more``,
``cursor``, the path); ``iter_files`` follows the cursors with the same path and limit through every page."""

from __future__ import annotations

import asyncio

import httpx

import corral
from corral.sdk.models import FileList

URL = "http://corral.test"
KEY = "ck_test_key"
NOW = "2026-02-28T12:00:00Z"
PAGES = {None: (["a", "b"], "c1"), "c1": (["c", "d"], "c2"), "c2": (["e"], None)}


def entry(name: str) -> dict[str, object]:
    return {"name": name, "type": "file", "size": 1, "mode": "0644", "mtime": NOW}


def handler_recording(queries: list[tuple[str, dict[str, str]]]) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        q = dict(request.url.params)
        queries.append((request.url.path, q))
        names, cursor = PAGES[q.get("cursor")]
        body = {"path": q["path"], "data": [entry(n) for n in names], "has_more": cursor is not None}
        return httpx.Response(200, json={**body, "cursor": cursor})

    return httpx.MockTransport(handler)


def test_list_files_sends_limit_and_cursor_and_parses_a_page() -> None:
    queries: list[tuple[str, dict[str, str]]] = []
    with corral.Client(KEY, URL, transport=handler_recording(queries)) as c:
        first = c.vms.list_files("vm_abc", "/root", limit=2)
        second = c.vms.list_files("vm_abc", "/root", limit=2, cursor=first.cursor)
        plain = c.vms.list_files("vm_abc")
    assert isinstance(first, FileList)
    assert (first.path, [e.name for e in first.data], first.has_more, first.cursor) == (
        "/root",
        ["a", "b"],
        True,
        "c1",
    )
    assert ([e.name for e in second.data], second.cursor) == (["c", "d"], "c2")
    assert plain.path == "/"
    assert queries == [
        ("/v1/vms/vm_abc/files", {"path": "/root", "limit": "2"}),
        ("/v1/vms/vm_abc/files", {"path": "/root", "limit": "2", "cursor": "c1"}),
        ("/v1/vms/vm_abc/files", {"path": "/"}),  # nothing sent that was not given: the server's default page
    ]


def test_iter_files_goes_through_every_page_in_both_clients() -> None:
    queries: list[tuple[str, dict[str, str]]] = []
    with corral.Client(KEY, URL, transport=handler_recording(queries)) as c:
        names = [e.name for e in c.vms.iter_files("vm_abc", "/root/many", limit=2)]
    assert names == ["a", "b", "c", "d", "e"]
    assert [q for _, q in queries] == [
        {"path": "/root/many", "limit": "2"},
        {"path": "/root/many", "limit": "2", "cursor": "c1"},
        {"path": "/root/many", "limit": "2", "cursor": "c2"},
    ]

    async def collect() -> list[str]:
        async with corral.AsyncClient(KEY, URL, transport=handler_recording(queries)) as ac:
            first = await ac.vms.list_files("vm_abc", "/root", limit=2)
            assert (first.has_more, first.cursor) == (True, "c1")
            return [e.name async for e in ac.vms.iter_files("vm_abc", "/root")]

    assert asyncio.run(collect()) == ["a", "b", "c", "d", "e"]
    assert [q for _, q in queries[3:]] == [
        {"path": "/root", "limit": "2"},
        {"path": "/root"},
        {"path": "/root", "cursor": "c1"},
        {"path": "/root", "cursor": "c2"},
    ]
