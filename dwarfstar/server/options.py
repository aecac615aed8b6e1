"""ServerOptions and the `ds4-server` command line (cli.md §1.2, §1.4, §3).

Contract: `parse_args(argv)` returns a frozen `ServerOptions` or raises
`UsageError(message, exit_code)`; `-h/--help` raises `HelpRequested` carrying
the usage text. Parsing follows ds4's rules, not argparse's: left to right,
later wins, a value is always the next argv element (no `--opt=value`),
integers must be > 0 unless the table says >= 0.

The disk KV cache flags (server.md §10.1) configure server/kvdisk.py; the cache
is on only with `--kv-disk-dir`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

PROG = "ds4-server"
DEFAULT_MODEL = "ds4flash.gguf"
DEFAULT_CTX = 32768
# Default output limit when a request omits one (server.md §4, cli.md §3).
DEFAULT_TOKENS = 393216


class UsageError(Exception):
    """Bad command line; `exit_code` is what the process must exit with."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


class HelpRequested(Exception):
    """-h/--help: print `str(self)` to stdout and exit 0."""


@dataclass(frozen=True)
class ServerOptions:
    model: str = DEFAULT_MODEL
    ctx: int = DEFAULT_CTX
    tokens: int = DEFAULT_TOKENS
    host: str = "127.0.0.1"
    port: int = 8000
    cors: bool = False
    trace: str | None = None
    chdir: str | None = None
    backend: str | None = None
    threads: int | None = None
    mtp: str | None = None
    mtp_draft: int = 1
    mtp_margin: float = 3.0
    quality: bool = False
    warm_weights: bool = False
    dir_steering_file: str | None = None
    dir_steering_ffn: float | None = None
    dir_steering_attn: float = 0.0
    # Disk KV cache (server.md §10, server/kvdisk.py); off without kv_disk_dir.
    kv_disk_dir: str | None = None
    kv_disk_space_mb: int = 4096
    kv_cache_min_tokens: int = 512
    kv_cache_cold_max_tokens: int = 30000
    kv_cache_continued_interval_tokens: int = 10000
    kv_cache_boundary_trim_tokens: int = 32
    kv_cache_boundary_align_tokens: int = 2048
    kv_cache_reject_different_quant: bool = False
    tool_memory_max_ids: int = 100000
    exact_dsml_replay: bool = True
    # Test/diagnostic only: the worker emits these tokens instead of sampling
    # (still evaluating each one), so live tests can drive DSML tool calls
    # through random tiny weights. Never set in normal use.
    debug_forced_output: str | None = None


USAGE = f"""usage: {PROG} [options]

OpenAI- and Anthropic-compatible HTTP server for DeepSeek V4 Flash GGUF files.

engine:
  -m, --model FILE          GGUF model (default {DEFAULT_MODEL})
  -c, --ctx N               context tokens of the session (default {DEFAULT_CTX})
  -t, --threads N           CPU threads
  --backend NAME            cpu | cuda (metal is not supported)
  --cpu / --cuda / --metal  shorthands for --backend
  --mtp FILE, --mtp-draft N, --mtp-margin F   MTP speculative decoding (accepted; not used yet)
  --quality, --warm-weights, --dir-steering-file FILE,
  --dir-steering-ffn F, --dir-steering-attn F (accepted; not used yet)
server:
  -n, --tokens N            default max output tokens (default {DEFAULT_TOKENS})
  --host HOST               bind address (default 127.0.0.1)
  --port N                  bind port (default 8000)
  --cors                    add Access-Control-Allow-* headers
  --trace FILE              human-readable request trace (truncated at start)
  --chdir DIR               chdir before loading the model
  --tool-memory-max-ids N   exact DSML replay map size (default 100000)
  --disable-exact-dsml-tool-replay   always render tool calls canonically
disk KV cache (session checkpoints on disk, reused across requests and restarts):
  --kv-disk-dir DIR         enable it; checkpoints live in DIR (created, mode 0700)
  --kv-disk-space-mb N      size budget of the checkpoint files (default 4096)
  --kv-cache-min-tokens N   never save or load checkpoints shorter than N (default 512)
  --kv-cache-cold-max-tokens N
                            save first prompts of min..N tokens; 0 = no cold saves; longer
                            checkpoints are deleted once loaded (default 30000; 0 or >= min)
  --kv-cache-continued-interval-tokens N
                            save the live session every N tokens; 0 = off (default 10000)
  --kv-cache-boundary-trim-tokens N
                            tokens trimmed before a cold checkpoint's end (default 32)
  --kv-cache-boundary-align-tokens N
                            alignment of cold ends and continued steps; 0 = off (default 2048)
  --kv-cache-reject-different-quant
                            load only checkpoints of the same routed-expert quant (2/4 bit)
testing only:
  --debug-forced-output TEXT  generate exactly TEXT (tokenized) instead of sampling

Weights: the published files are at https://huggingface.co/antirez/deepseek-v4-gguf
"""

# flag -> (field, kind); kind: str, int (> 0), int0 (>= 0), float ranges, flag.
_VALUED = {
    "-m": ("model", "str"), "--model": ("model", "str"),
    "-c": ("ctx", "int"), "--ctx": ("ctx", "int"),
    "-t": ("threads", "int"), "--threads": ("threads", "int"),
    "-n": ("tokens", "int"), "--tokens": ("tokens", "int"),
    "--host": ("host", "str"), "--port": ("port", "port"),
    "--trace": ("trace", "str"), "--chdir": ("chdir", "str"),
    "--backend": ("backend", "backend"),
    "--mtp": ("mtp", "str"), "--mtp-draft": ("mtp_draft", "int"),
    "--mtp-margin": ("mtp_margin", (0.0, 1000.0)),
    "--dir-steering-file": ("dir_steering_file", "str"),
    "--dir-steering-ffn": ("dir_steering_ffn", (-100.0, 100.0)),
    "--dir-steering-attn": ("dir_steering_attn", (-100.0, 100.0)),
    "--kv-disk-dir": ("kv_disk_dir", "str"),
    "--kv-disk-space-mb": ("kv_disk_space_mb", "int"),
    "--kv-cache-min-tokens": ("kv_cache_min_tokens", "int"),
    "--kv-cache-cold-max-tokens": ("kv_cache_cold_max_tokens", "int0"),
    "--kv-cache-continued-interval-tokens": ("kv_cache_continued_interval_tokens", "int0"),
    "--kv-cache-boundary-trim-tokens": ("kv_cache_boundary_trim_tokens", "int0"),
    "--kv-cache-boundary-align-tokens": ("kv_cache_boundary_align_tokens", "int0"),
    "--tool-memory-max-ids": ("tool_memory_max_ids", "int"),
    "--debug-forced-output": ("debug_forced_output", "str"),
}
_SWITCHES = {
    "--cors": ("cors", True),
    "--quality": ("quality", True),
    "--warm-weights": ("warm_weights", True),
    "--kv-cache-reject-different-quant": ("kv_cache_reject_different_quant", True),
    "--disable-exact-dsml-tool-replay": ("exact_dsml_replay", False),
    "--cpu": ("backend", "cpu"),
    "--cuda": ("backend", "cuda"),
    "--metal": ("backend", "metal"),
}


def _convert(opt: str, text: str, kind):
    """One option value, checked per cli.md §1.2."""
    bad = UsageError(f"{PROG}: invalid value for {opt}: {text}")
    if kind == "str":
        return text
    if kind == "backend":
        if text not in ("cpu", "cuda", "metal"):
            raise bad
        return text
    if kind in ("int", "int0", "port"):
        try:
            value = int(text, 10)
        except ValueError:
            raise bad from None
        low = 0 if kind == "int0" else 1
        if value < low or (kind == "port" and value > 65535):
            raise bad
        return value
    low, high = kind
    try:
        value = float(text)
    except ValueError:
        raise bad from None
    if not math.isfinite(value) or not low <= value <= high:
        raise bad
    return value


def parse_args(argv: list[str]) -> ServerOptions:
    """argv (without the program name) -> ServerOptions; see the module docstring."""
    values: dict = {}
    i = 0
    while i < len(argv):
        opt = argv[i]
        if opt in ("-h", "--help"):
            raise HelpRequested(USAGE)
        if opt in _SWITCHES:
            field, value = _SWITCHES[opt]
            values[field] = value
        elif opt in _VALUED:
            if i + 1 >= len(argv):
                raise UsageError(f"{PROG}: missing value for {opt}")
            field, kind = _VALUED[opt]
            values[field] = _convert(opt, argv[i + 1], kind)
            i += 1
        else:
            raise UsageError(f"{PROG}: unknown option: {opt}\n{USAGE}")
        i += 1
    options = replace(ServerOptions(), **values)
    if options.host == "localhost":
        options = replace(options, host="127.0.0.1")
    cold, low = options.kv_cache_cold_max_tokens, options.kv_cache_min_tokens
    if cold != 0 and cold < low:
        raise UsageError(f"{PROG}: --kv-cache-cold-max-tokens must be 0 or >= --kv-cache-min-tokens")
    if options.backend == "metal":
        raise UsageError(f"{PROG}: the metal backend is not supported by dwarfstar; use --cpu or --cuda")
    return options
