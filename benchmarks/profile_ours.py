"""py-spy profile of our server's front-end process under 8 concurrent streams; writes benchmarks/profile.json.

    .venv/bin/pip install py-spy && .venv/bin/python -m benchmarks.profile_ours
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from pathlib import Path

from benchmarks.common import RunningServer, prompts, run_level, server_spec
from superweights.compression.models import load_model
from superweights.compression.pipeline import detect

OUT = Path(__file__).resolve().parent


async def main() -> None:
    checkpoint, _ = detect(None, progress=False)
    _, tokenizer = load_model(checkpoint)
    prompt_set = prompts(tokenizer)
    spec = server_spec(Path(checkpoint.path), "ours")
    server = RunningServer(spec, Path("/tmp"))
    raw = Path("/tmp/superweights-ours.prof")
    try:
        await server.wait_ready()
        client = server.client()
        await client.stream(prompt_set[0], 8)
        spy = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(server.process.pid),
            "--duration", "20", "--format", "raw", "-o", str(raw), "--nonblocking")
        level = await run_level(server, client, prompt_set, 8, 3, 64)
        await spy.wait()
        await client.close()
    finally:
        server.stop()
    own, total = Counter(), 0
    for line in raw.read_text().splitlines():
        stack, n = line.rsplit(" ", 1)
        own[stack.split(";")[-1]] += int(n)
        total += int(n)
    result = {"level": level.summary(), "samples": total,
              "top": [{"frame": f, "share": n / total} for f, n in own.most_common(8)]}
    (OUT / "profile.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
