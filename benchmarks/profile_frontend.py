"""Where our server's front-end process spends its CPU under load: a py-spy profile of it at 8 concurrent streams
of 64 tokens on the default model; the frames that hold the most samples, and the front end's CPU seconds per
thousand streamed tokens.

    .venv/bin/pip install py-spy && .venv/bin/python -m benchmarks.profile_frontend   # writes benchmarks/profile.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections import Counter
from pathlib import Path

from benchmarks.load import prompts, run_level
from benchmarks.servers import RunningServer, ours_spec

OUT = Path(__file__).resolve().parent / "profile.json"
RAW = Path("/tmp/superweights-ours.prof")
STREAMS, REQUESTS_PER_STREAM, TOKENS, SECONDS, TOP = 8, 3, 64, 20, 8


def own_time(raw: Path) -> tuple[Counter, int]:
    """Samples per innermost frame of py-spy's raw output ("frame;frame;... count" lines), and their total."""
    own, total = Counter(), 0
    for line in raw.read_text().splitlines():
        stack, n = line.rsplit(" ", 1)
        own[stack.split(";")[-1]] += int(n)
        total += int(n)
    return own, total


async def profile() -> dict:
    from superweights.compression.models import load_model, resolve_checkpoint

    _, tokenizer = load_model(resolve_checkpoint())
    prompt_set = prompts(tokenizer)
    spec = ours_spec("ours", [], {}, metrics=False)  # the default model, our server's own options
    server = RunningServer(spec, Path("/tmp"))
    try:
        await asyncio.to_thread(server.wait_ready)
        client = server.client()
        await client.stream(prompt_set[0], 8)
        spy = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(server.process.pid),
            "--duration", str(SECONDS), "--format", "raw", "-o", str(RAW), "--nonblocking")
        level = await run_level(server, client, prompt_set, STREAMS, REQUESTS_PER_STREAM, TOKENS)
        await spy.wait()
        await client.close()
    finally:
        server.stop()
    own, total = own_time(RAW)
    return {"level": level.summary(), "samples": total,
            "top": [{"frame": f, "share": n / total} for f, n in own.most_common(TOP)]}


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    result = asyncio.run(profile())
    OUT.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
