"""Per-request tool-map lookup (server.md §10.5) and the public ToolMemory surface.

A checkpoint carrying a tool-id map is written by another DiskCache (standing in
for another server process) *after* the server started; a request that replays
that tool call must then render the exact sampled DSML (`[1,2]`), not the
canonical form (`[1, 2]`). Oracle: the DSML text itself in the rendered prompt
and the trace's replay counts; an id no file knows stays canonical.
"""

from __future__ import annotations

import json

from server_samples import ARGS, CHAT, DSML, TOOLS, USER

from dwarfstar.engine.diskcache import CacheOptions, DiskCache
from dwarfstar.server.convo import ToolMemory, mentioned_tool_ids
from dwarfstar.server.kvdisk import Checkpoints

MODEL = "fake-model"


class Tokens:
    def __init__(self, n: int):
        self.tokens = list(range(n))

    def snapshot(self) -> bytes:
        return b"state"


def attach_disk(server, directory):
    # min_tokens above anything the fake engine holds: no checkpoint of its own.
    options = CacheOptions(directory=str(directory), model_id=MODEL, ctx=4096, min_tokens=100000, cold_max_tokens=0,
                           continued_interval_tokens=0)
    server.worker.disk = Checkpoints(DiskCache(options), server.engine.tokenizer, server.memory, server.options)


def write_elsewhere(directory, tool_ids: list[str]) -> None:
    other = DiskCache(CacheOptions(directory=str(directory), model_id=MODEL, ctx=4096, min_tokens=1))
    text = "an earlier conversation" + DSML
    other.save(Tokens(3), text, "evict", tool_map={tool_id: DSML for tool_id in tool_ids})
    other.close()


def history(tool_id: str) -> list[dict]:
    call = {"id": tool_id, "type": "function", "function": {"name": "get_weather", "arguments": json.dumps(ARGS)}}
    return USER + [{"role": "assistant", "content": "Sure.", "tool_calls": [call]},
                   {"role": "tool", "tool_call_id": tool_id, "content": "sunny"}]


def rendered_prompts(server) -> list[str]:
    trace = open(server.options.trace).read()
    return [block.split("\n\n--- generated text ---")[0] for block in trace.split("--- rendered prompt ---\n")[1:]]


def test_tool_ids_are_looked_up_in_files_written_after_startup(make_server, tmp_path):
    server = make_server()
    attach_disk(server, tmp_path / "kv")
    write_elsewhere(tmp_path / "kv", ["call_disk1"])
    assert "call_disk1" not in server.memory
    for tool_id in ("call_disk1", "call_unknown"):
        response = server.client.post(CHAT, json={"messages": history(tool_id), "tools": TOOLS, "max_tokens": 1})
        assert response.status_code == 200, response.text
    exact, canonical = rendered_prompts(server)
    assert DSML in exact and '"false">[1,2]<' in exact
    assert DSML not in canonical and '"false">[1, 2]<' in canonical
    trace = open(server.options.trace).read()
    assert "tool_replay: mem=1 " in trace and "canonical=1 missing_ids=1" in trace
    assert "call_disk1" in server.memory and "call_unknown" not in server.memory


def test_without_exact_replay_the_files_are_not_read(make_server, tmp_path):
    server = make_server(exact_dsml_replay=False)
    attach_disk(server, tmp_path / "kv")
    write_elsewhere(tmp_path / "kv", ["call_disk1"])
    server.client.post(CHAT, json={"messages": history("call_disk1"), "tools": TOOLS, "max_tokens": 1})
    assert DSML not in rendered_prompts(server)[0] and len(server.memory) == 0


def test_restore_tools_reads_the_disk_only_for_unknown_ids(make_server, tmp_path):
    server = make_server()
    attach_disk(server, tmp_path / "kv")
    write_elsewhere(tmp_path / "kv", ["call_a", "call_b"])
    disk = server.worker.disk
    assert disk.restore_tools({"call_a", "call_zzz"}) == 1
    # Known ids do not touch the directory: even a vanished file changes nothing.
    for path in (tmp_path / "kv").glob("*.kv"):
        path.unlink()
    assert disk.restore_tools({"call_a"}) == 0 and "call_a" in server.memory
    assert disk.restore_tools({"call_b"}) == 0 and "call_b" not in server.memory


def test_tool_memory_public_surface():
    memory = ToolMemory(max_ids=3)
    memory.remember(["a", "b"], "X")
    memory.update({"c": "Y", "d": "Y"})
    # LRU by id count: "a" (oldest) went when "d" arrived.
    assert memory.items() == [("b", "X"), ("c", "Y"), ("d", "Y")]
    assert memory.missing({"a", "b", "e"}) == {"a", "e"}
    assert ToolMemory(3, enabled=False).missing({"a"}) == set()
    messages = history("call_1") + [{"role": "tool", "tool_call_id": "call_2", "content": ""}]
    assert mentioned_tool_ids(messages) == {"call_1", "call_2"}
