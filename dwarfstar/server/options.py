"""ServerOptions and the `ds4-server` command line (cli.md §1.2, §1.4, §3).

Contract: `parse_args(argv)` returns a frozen `ServerOptions` or raises
`UsageError(message, exit_code)`; `-h/--help` raises `HelpRequested` carrying
the usage text. Parsing is `dwarfstar.flags` (ds4's rules, as for `ds4`): left
to right, later wins, a value is always the next argv element (no
`--opt=value`), integers are whole decimals > 0 unless the table says >= 0.

The disk KV cache flags (server.md §10.1) configure server/kvdisk.py; the cache
is on only with `--kv-disk-dir`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from dwarfstar import flags
# HelpRequested and UsageError are this module's contract too (server/main.py catches them).
from dwarfstar.flags import Flag, HelpRequested, UsageError  # noqa: F401

PROG = "ds4-server"
DEFAULT_MODEL = "ds4flash.gguf"
DEFAULT_CTX = 32768
# Default output limit when a request omits one (server.md §4, cli.md §3).
DEFAULT_TOKENS = 393216


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
    warmup: bool = True
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
  --no-warmup               cuda: skip the kernel warm-up at load (the first prompt runs slower)
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

FLAGS = [
    Flag(("-m", "--model"), "model", "str"),
    Flag(("-c", "--ctx"), "ctx", "int"),
    Flag(("-t", "--threads"), "threads", "int"),
    Flag(("-n", "--tokens"), "tokens", "int"),
    Flag(("--host",), "host", "str"),
    Flag(("--port",), "port", "int", hi=65535),
    Flag(("--cors",), "cors"),
    Flag(("--trace",), "trace", "str"),
    Flag(("--chdir",), "chdir", "str"),
    Flag(("--backend",), "backend", "choice", choices=("cpu", "cuda", "metal")),
    Flag(("--cpu",), "backend", const="cpu"),
    Flag(("--cuda",), "backend", const="cuda"),
    Flag(("--metal",), "backend", const="metal"),
    Flag(("--no-warmup",), "warmup", const=False),
    Flag(("--mtp",), "mtp", "str"),
    Flag(("--mtp-draft",), "mtp_draft", "int"),
    Flag(("--mtp-margin",), "mtp_margin", "float", lo=0.0, hi=1000.0),
    Flag(("--quality",), "quality"),
    Flag(("--warm-weights",), "warm_weights"),
    Flag(("--dir-steering-file",), "dir_steering_file", "str"),
    Flag(("--dir-steering-ffn",), "dir_steering_ffn", "float", lo=-100.0, hi=100.0),
    Flag(("--dir-steering-attn",), "dir_steering_attn", "float", lo=-100.0, hi=100.0),
    Flag(("--kv-disk-dir",), "kv_disk_dir", "str"),
    Flag(("--kv-disk-space-mb",), "kv_disk_space_mb", "int"),
    Flag(("--kv-cache-min-tokens",), "kv_cache_min_tokens", "int"),
    Flag(("--kv-cache-cold-max-tokens",), "kv_cache_cold_max_tokens", "int0"),
    Flag(("--kv-cache-continued-interval-tokens",), "kv_cache_continued_interval_tokens", "int0"),
    Flag(("--kv-cache-boundary-trim-tokens",), "kv_cache_boundary_trim_tokens", "int0"),
    Flag(("--kv-cache-boundary-align-tokens",), "kv_cache_boundary_align_tokens", "int0"),
    Flag(("--kv-cache-reject-different-quant",), "kv_cache_reject_different_quant"),
    Flag(("--tool-memory-max-ids",), "tool_memory_max_ids", "int"),
    Flag(("--disable-exact-dsml-tool-replay",), "exact_dsml_replay", const=False),
    Flag(("--debug-forced-output",), "debug_forced_output", "str"),
]


def parse_args(argv: list[str]) -> ServerOptions:
    """argv (without the program name) -> ServerOptions; see the module docstring."""
    options = ServerOptions(**flags.parse(PROG, argv, FLAGS, usage=USAGE))
    if options.host == "localhost":
        options = replace(options, host="127.0.0.1")
    cold, low = options.kv_cache_cold_max_tokens, options.kv_cache_min_tokens
    if cold != 0 and cold < low:
        raise UsageError(f"{PROG}: --kv-cache-cold-max-tokens must be 0 or >= --kv-cache-min-tokens")
    if options.backend == "metal":
        raise UsageError(f"{PROG}: the metal backend is not supported by dwarfstar; use --cpu or --cuda")
    return options
