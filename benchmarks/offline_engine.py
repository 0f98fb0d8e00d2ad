"""vLLM's offline `LLM` as a benchmark arm: no client and no server, N prompts handed to the engine at once (the
ceiling for a front end). A level is `rounds` such batches, greedy, end of sequence ignored; the engine's own
latencies come from its in-process Prometheus registry (benchmarks.engine_metrics)."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.engine_metrics import LevelProbe, registry_reader
from benchmarks.served_model import Model, model_prompts


@dataclass
class OfflineEngine:
    llm: object  # vllm.LLM
    params: object  # vllm.SamplingParams: greedy, `tokens` long, end of sequence ignored
    prompts: list[list[int]]
    startup_seconds: float

    @classmethod
    def start(cls, model: Model, options: dict, tokens: int, warm_up: int = 4) -> OfflineEngine:
        """vLLM's LLM on `model` with `options`, warmed up with `warm_up` prompts at once."""
        from vllm import LLM, SamplingParams

        t0 = time.perf_counter()
        llm = LLM(model=str(model.path), disable_log_stats=False, **options)
        engine = cls(llm, SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True), model_prompts(model),
                     time.perf_counter() - t0)
        llm.generate([{"prompt_token_ids": p} for p in engine.prompts[:warm_up]], engine.params, use_tqdm=False)
        return engine

    def level(self, n: int, rounds: int, lora=None) -> dict:
        """tok/s over `rounds` batches of n prompts, and the engine's own latencies; lora: one LoRARequest (or None)
        per prompt, or one for all."""
        batch = [{"prompt_token_ids": self.prompts[i % len(self.prompts)]} for i in range(n)]
        walls, tokens = [], 0
        with LevelProbe(registry_reader()) as probe:
            for _ in range(rounds):
                t0 = time.perf_counter()
                outs = self.llm.generate(batch, self.params, use_tqdm=False, lora_request=lora)
                walls.append(time.perf_counter() - t0)
                tokens += sum(len(o.outputs[0].token_ids) for o in outs)
        return {"concurrency": n, "requests": n * rounds, "tokens": tokens, "seconds": sum(walls),
                "tokens_per_s": tokens / sum(walls), "batch_seconds_median": statistics.median(walls),
                "server_side": probe.summary()}

    def profile(self, steps: int) -> dict:
        """`steps` decode steps of one prompt under the torch profiler (the engine's profiler_config), and what it
        found: the per-kernel table vLLM writes (rank 0's), and whether the steps replayed CUDA graphs."""
        from vllm import SamplingParams

        directory = self.llm.llm_engine.vllm_config.profiler_config.torch_profiler_dir
        params = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True)
        self.llm.start_profile()
        self.llm.generate([{"prompt_token_ids": self.prompts[0]}], params, use_tqdm=False)
        self.llm.stop_profile()
        table_file = Path(directory) / "profiler_out_0.txt"
        table = table_file.read_text() if table_file.is_file() else ""
        return {"steps": steps, "directory": directory, "table": table.splitlines()[:60],
                "cuda_graph_launches": sum(int(line.split()[-1]) for line in table.splitlines()
                                           if line.strip().startswith("cudaGraphLaunch") and line.split()[-1].isdigit())}

    def probe(self, report) -> list[float | None]:
        """The report's super weights as the engine computes with them (the SuperWeightProbe worker extension in
        the options), every worker's answer combined."""
        from superweights.compression.vllm_plugin import combine_probe_values

        entries = [(w.module, w.row, w.col) for w in report.super_weights]
        return combine_probe_values(self.llm.collective_rpc("probe_super_weights", args=(entries,)))
