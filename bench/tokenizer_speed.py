"""Tokenizer throughput: encode and decode about 1 MB of mixed text with the real vocabulary.

Prints a human table, then one JSON line (STYLE.md). Not a test; run by hand:
    PYTHONPATH=. python3 bench/tokenizer_speed.py [--mb 1.0]   (or after pip install -e .)
"""

from __future__ import annotations

import argparse
import json
import time

from dwarfstar.text import vocab
from dwarfstar.text.tokenizer import Tokenizer

SAMPLE = (
    "The quick brown fox jumps over the lazy dog. It's 2024, isn't it?\n"
    "Rispondi in italiano con una frase: chi era Ada Lovelace? Perché è così?\n"
    "你好，世界！今天天气很好。日本語のテキスト、カタカナとひらがな。\n"
    "def f(x):\n    return [i * 2 for i in range(x)]  # 12345678\n\n"
    "emoji 😀👍 ✨ «quoted» — ‹tool› <think>reasoning</think><｜User｜>hi<｜Assistant｜>\n"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=1.0, help="megabytes of UTF-8 text to encode")
    args = parser.parse_args()
    t0 = time.perf_counter()
    tokenizer = Tokenizer.from_metadata(vocab.real_vocab_metadata())
    t_load = time.perf_counter() - t0
    n_copies = max(1, int(args.mb * 1e6 / len(SAMPLE.encode())))
    text = SAMPLE * n_copies
    n_bytes = len(text.encode())
    t0 = time.perf_counter()
    ids = tokenizer.encode(text)
    t_encode = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert tokenizer.decode(ids) == text
    t_decode = time.perf_counter() - t0
    print(f"{'step':<8}{'seconds':>10}{'MB/s':>10}")
    print(f"{'load':<8}{t_load:>10.3f}{'':>10}")
    print(f"{'encode':<8}{t_encode:>10.3f}{n_bytes / 1e6 / t_encode:>10.2f}")
    print(f"{'decode':<8}{t_decode:>10.3f}{n_bytes / 1e6 / t_decode:>10.2f}")
    print(json.dumps({"bytes": n_bytes, "tokens": len(ids), "load_s": t_load, "encode_s": t_encode, "decode_s": t_decode}))


if __name__ == "__main__":
    main()
