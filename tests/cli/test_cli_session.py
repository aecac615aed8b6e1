"""REPL session files: /save FILE, /load FILE (issue 7 item 4; server.md §10.3) on the fake session.

Oracles: a chat that never stopped (same scripted engine) for the transcript and
the answers; the fake session's prefill counts for "only the new suffix"; the KVC
byte offsets of server.md §10.3 read with `struct`, and the server's own DiskCache
loading a file /save wrote (and /load reading one DiskCache wrote): one format.
"""

import hashlib
import io
import struct

import pytest

from dwarfstar import cliprompt, shape
from dwarfstar.cli import CliOptions, parse_args
from dwarfstar.engine.diskcache import CacheOptions, DiskCache
from dwarfstar.engine.diskcache_session import Identity
from dwarfstar.engine.sampling import SamplingParams
from dwarfstar.flags import UsageError
from dwarfstar.repl import Chat, SessionFiles, handle_line

from .fakes import FakeEngine, answer_script

MODEL = Identity("fake-model-a", 2)


def make_chat(tok, answers, identity=MODEL, **opts):
    engine = FakeEngine(tok, answer_script(tok, answers))
    opts.setdefault("system", "Be nice.")
    chat = Chat(engine, CliOptions(**opts), SamplingParams(temperature=0), out=io.StringIO(), err=io.StringIO())
    chat.files = SessionFiles(engine, identity)
    return engine, chat


def answers_of(tok):
    bpe = lambda s: cliprompt.plain_bpe(tok, s)
    close = tok.id_of(shape.THINK_CLOSE)
    return [bpe("hmm") + [close] + bpe(" one"), bpe("ok") + [close] + bpe(" two"), bpe("so") + [close]]


def turn_len(tok, text):
    return len(cliprompt.turn_tokens(tok, text, "high"))


def test_save_then_load_continues_like_a_chat_that_never_stopped(tok, tmp_path):
    path = str(tmp_path / "s.kv")
    _, steady = make_chat(tok, answers_of(tok))
    _, first = make_chat(tok, answers_of(tok))
    for chat in (steady, first):
        handle_line(chat, "hello")
        handle_line(chat, "and then")
    assert handle_line(first, f"/save {path}") is None
    assert f"ds4: session saved to {path} ({len(first.transcript) - 1} tokens" in first.err.getvalue()
    # A new REPL (new engine, other system prompt) picks the conversation up.
    engine, second = make_chat(tok, answers_of(tok), system="Other.")
    assert handle_line(second, f"/load {path}") is None
    assert second.transcript == steady.transcript, "the pending EOS of the last answer is restored"
    handle_line(steady, "bye")
    handle_line(second, "bye")
    assert second.transcript == steady.transcript
    # One session, restored, and only EOS + the new turn prefilled.
    assert len(engine.sessions) == 1 and engine.sessions[0].syncs == [1 + turn_len(tok, "bye")]
    assert second.out.getvalue().endswith("so\n") and steady.out.getvalue().endswith("so\n")


def test_file_is_a_kvc_checkpoint_the_server_cache_can_load(tok, tmp_path):
    _, chat = make_chat(tok, answers_of(tok))
    handle_line(chat, "hello")
    path = tmp_path / "s.kv"
    chat.save(str(path))
    blob = path.read_bytes()
    held = chat.transcript[:-1]
    text = b"".join(tok.token_bytes(t) for t in held)
    assert blob[:3] == b"KVC" and blob[3] == 1 and blob[4] == MODEL.quant_bits and blob[5] == 6 and blob[6] == 0
    n_tokens, _, ctx = struct.unpack_from("<III", blob, 8)
    assert (n_tokens, ctx) == (len(held), 32768)
    assert struct.unpack_from("<I", blob, 48)[0] == len(text) and blob[52:52 + len(text)] == text
    # Under its SHA-1 name the file is a checkpoint ds4-server's disk cache loads.
    kv = tmp_path / "kv"
    kv.mkdir()
    (kv / f"{hashlib.sha1(text).hexdigest()}.kv").write_bytes(blob)
    cache = DiskCache(CacheOptions(directory=str(kv), model_id=MODEL.model_id, ctx=32768, min_tokens=1))
    engine = FakeEngine(tok, answer_script(tok, [[]]))
    session = engine.new_session(32768)
    hit = cache.load(text.decode() + "<｜User｜>more", session)
    assert hit is not None and hit.n_tokens == len(held) and session.tokens == held


def test_load_reads_a_server_checkpoint(tok, tmp_path):
    _, steady = make_chat(tok, answers_of(tok))
    handle_line(steady, "hello")
    held = steady.transcript[:-1]
    server_session = FakeEngine(tok, None).new_session(4096)
    server_session.tokens = list(held)
    cache = DiskCache(CacheOptions(directory=str(tmp_path / "kv"), model_id=MODEL.model_id, ctx=4096, min_tokens=1))
    saved = cache.save(server_session, tok.decode(held), "evict")
    engine, chat = make_chat(tok, answers_of(tok))
    assert chat.load(str(saved)) and chat.transcript == steady.transcript
    handle_line(steady, "and then")
    handle_line(chat, "and then")
    assert chat.transcript == steady.transcript and engine.sessions[0].syncs == [1 + turn_len(tok, "and then")]


def _damaged(blob: bytes) -> dict[str, bytes]:
    n_text = struct.unpack_from("<I", blob, 48)[0]
    header, payload = bytearray(blob), bytearray(blob)
    header[8] ^= 1
    payload[52 + n_text + 20] ^= 0x40
    return {"truncated": blob[:-3], "header checksum": bytes(header), "payload checksum": bytes(payload),
            "not a KVC": b"hello world" * 10}


def test_refused_files_leave_the_repl_as_it_was(tok, tmp_path):
    _, source = make_chat(tok, answers_of(tok))
    handle_line(source, "hello")
    good = tmp_path / "good.kv"
    source.save(str(good))
    cases = _damaged(good.read_bytes())
    engine, chat = make_chat(tok, [[305], [306]], identity=Identity("fake-model-b", 2))
    handle_line(chat, "first")
    before, session = list(chat.transcript), chat.session
    expect = {"truncated": "truncated", "header checksum": "header checksum", "payload checksum": "payload checksum",
              "not a KVC": "bad magic", "other model": "another model", "missing": "cannot read"}
    for name in expect:
        path = tmp_path / f"{name}.kv"
        if name == "other model":
            path = good
        elif name != "missing":
            path.write_bytes(cases[name])
        assert handle_line(chat, f"/load {path}") is None
        assert expect[name] in chat.err.getvalue().splitlines()[-1], name
        assert chat.transcript == before and chat.session is session, name
    handle_line(chat, "second")
    assert chat.transcript[-2:] == [306, tok.eos_id]
    assert engine.sessions[0].syncs[-1] == 1 + len(cliprompt.turn_tokens(tok, "second", "high"))


def test_load_refuses_a_session_longer_than_the_context(tok, tmp_path):
    _, source = make_chat(tok, answers_of(tok))
    handle_line(source, "hello")
    path = str(tmp_path / "s.kv")
    source.save(path)
    _, small = make_chat(tok, [[305]], ctx=len(source.transcript) - 1)
    assert not small.load(path)
    assert "the context of" in small.err.getvalue()
    assert small.transcript == [tok.bos_id] + cliprompt.plain_bpe(tok, "Be nice.") and small.session is None


def test_save_before_any_turn_and_after_ctx_syncs_first(tok, tmp_path):
    engine, chat = make_chat(tok, answers_of(tok))
    path = str(tmp_path / "s.kv")
    assert chat.save(path) and engine.sessions[0].syncs == [len(chat.transcript)]
    _, loaded = make_chat(tok, answers_of(tok), system="")
    assert loaded.load(path)
    assert loaded.transcript == chat.transcript, "no EOS after a header without an answer"
    handle_line(chat, "hello")
    handle_line(chat, "/ctx 4096")
    assert chat.session is None and chat.save(path)
    assert engine.sessions[-1].syncs == [len(chat.transcript) - 1] and engine.sessions[-1].ctx == 4096
    assert struct.unpack_from("<I", open(path, "rb").read(), 16) == (4096,)


def test_think_max_prefix_of_a_loaded_transcript_is_recognised(tok, tmp_path):
    _, chat = make_chat(tok, [[305]], ctx=393216, mode="max")
    handle_line(chat, "one")
    path = str(tmp_path / "s.kv")
    chat.save(path)
    _, other = make_chat(tok, [[305]], ctx=393216, mode="none")
    assert other.load(path) and other.transcript == chat.transcript
    # Switching to no-thinking removes the loaded prefix (and drops the session).
    handle_line(other, "/nothink")
    assert len(other.transcript) == len(chat.transcript) - len(cliprompt.max_prefix_tokens(tok))
    assert other.session is None


def test_commands_need_a_path_and_save_errors_are_one_line(tok, tmp_path):
    _, chat = make_chat(tok, [[305]])
    handle_line(chat, "/save")
    handle_line(chat, "/load  ")
    assert chat.err.getvalue() == "ds4: /save needs a file path\nds4: /load needs a file path\n"
    handle_line(chat, f"/save {tmp_path / 'no' / 'such' / 'dir.kv'}")
    assert chat.err.getvalue().splitlines()[-1].startswith("ds4: failed to save the session to ")
    handle_line(chat, "hi")
    assert chat.transcript[-2:] == [305, tok.eos_id]


def test_session_flags_parse_and_refuse_diagnostics():
    opts = parse_args(["--load-session", "a.kv", "--save-session", "b.kv", "-p", "hi"])
    assert (opts.load_session, opts.save_session) == ("a.kv", "b.kv")
    for extra in (["--dump-tokens"], ["--dump-logprobs", "x.json"], ["--inspect"]):
        with pytest.raises(UsageError, match="apply to chat"):
            parse_args(["-p", "hi", "--save-session", "b.kv", *extra])
