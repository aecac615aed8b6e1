"""Shared by the disk cache tests: a fake session and small cache options."""

from __future__ import annotations

import json

from dwarfstar.engine.diskcache import CacheOptions

MODEL = "model-under-test"


class FakeSession:
    """Token list + a deterministic 'state' derived from it; counts snapshots.
    `pad` zero bytes make the snapshot as large as a test needs."""

    def __init__(self, tokens=(), pad: int = 0):
        self.state = list(tokens)
        self.pad = pad
        self.n_snapshots = 0

    @property
    def tokens(self):
        return list(self.state)

    def snapshot(self) -> bytes:
        self.n_snapshots += 1
        return json.dumps(self.state).encode() + b"\0" * self.pad

    def restore(self, blob: bytes) -> None:
        self.state = json.loads(blob.rstrip(b"\0"))

    def reset(self) -> None:
        self.state = []


def opts(tmp_path, **kw) -> CacheOptions:
    base = dict(directory=str(tmp_path / "kv"), model_id=MODEL, ctx=4096, min_tokens=4, cold_max_tokens=100,
                space_mb=1)
    base.update(kw)
    return CacheOptions(**base)
