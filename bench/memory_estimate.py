"""The memory estimate (llamad.gguf_info) against what the real llama-server takes.

For the demo models, SmolLM2-135M-Instruct and Gemma 3 270M, at several
contexts and slot settings: llama-server is started with the command llamad
would build, then given one prompt that fills 90 % of a slot's context (so the
KV cache and the compute buffers have really been touched), and its RSS and PSS
are read with psutil. The figure is the estimate's error against the RSS
(goal: within 15 %); the note has the PSS and the RSS right after loading.

    .venv/bin/python -m bench.memory_estimate
    (or as one of all the benchmarks: scripts/bench --only memory_estimate)
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from bench.common import ROOT, Figure, Goal, server_binary, shared_demo_models, stop_process
from llamad.gguf_info import MiB, estimate_memory, read_gguf, settings_from_args

REAL = {
    "smol": ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf",
    "gemma": ROOT / "models" / "gemma-3-270m-q4_k_m.gguf",
}


@dataclass(frozen=True)
class Case:
    model: str
    ctx: int
    args: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        extra = f" {' '.join(self.args)}" if self.args else ""
        return f"{self.model} ctx {self.ctx}{extra}"


CASES = [
    Case("demo", 2048),
    Case("demo-b", 8192),
    Case("smol", 2048),
    Case("smol", 8192),
    Case("smol", 4096, ("--parallel", "2")),
    Case("gemma", 2048),
    Case("gemma", 8192),
    Case("gemma", 4096, ("--parallel", "2")),
]


@dataclass
class Measured:
    estimate: int
    rss_loaded: int
    rss: int
    pss: int
    prompt_tokens: int


def _paths() -> dict[str, Path]:
    missing = [str(p) for p in REAL.values() if not p.is_file()]
    if missing:
        raise RuntimeError(f"missing {', '.join(missing)}: run scripts/fetch-models")
    return {**shared_demo_models(), **REAL}


def measure(case: Case, path: Path, work: Path) -> Measured:
    info = read_gguf(path)
    settings = settings_from_args(case.args)
    parallel = settings.get("parallel")
    estimate = estimate_memory(info, ctx_size=case.ctx, parallel=parallel, n_gpu_layers=0)
    sock = work / "estimate.sock"
    sock.unlink(missing_ok=True)
    command = [str(server_binary()), "--model", str(path), "--n-gpu-layers", "0"]
    command += ["--ctx-size", str(case.ctx), "--host", str(sock), *case.args]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with httpx.Client(
            transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://x", timeout=600
        ) as client:
            while True:
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if process.poll() is not None:
                    raise RuntimeError(f"llama-server exited: {command}")
                time.sleep(0.02)
            server = psutil.Process(process.pid)
            rss_loaded = server.memory_info().rss
            per_slot = case.ctx // parallel if parallel else case.ctx
            vocab = info.vocab_size or 1000
            count = int(per_slot * 0.9)
            # Ordinary tokens (past the specials and byte tokens), cycled.
            tokens = [300 + (n * 7) % max(vocab - 400, 50) for n in range(count)]
            answer = client.post(
                "/completion", json={"prompt": tokens, "n_predict": 1, "cache_prompt": False}
            )
            answer.raise_for_status()
            time.sleep(0.2)
            full = server.memory_full_info()
            return Measured(estimate.host, rss_loaded, full.rss, full.pss, count)
    finally:
        stop_process(process)


def figures(cases: list[Case] | None = None) -> list[Figure]:
    import tempfile

    paths = _paths()
    work = Path(tempfile.mkdtemp(prefix="llamad-bench-est-", dir="/tmp"))
    result = []
    for case in cases or CASES:
        got = measure(case, paths[case.model], work)
        error = (got.estimate - got.rss) / got.rss * 100
        pss_error = (got.estimate - got.pss) / got.pss * 100
        result.append(
            Figure(
                f"memory estimate vs RSS, {case.label}",
                "%",
                [abs(error)],
                goal=Goal("value", "<=", 15.0),
                note=f"estimate {got.estimate / MiB:.1f} MiB; RSS {got.rss / MiB:.1f} MiB after a "
                f"{got.prompt_tokens}-token prompt ({error:+.1f} %), "
                f"{got.rss_loaded / MiB:.1f} MiB just loaded; "
                f"PSS {got.pss / MiB:.1f} MiB ({pss_error:+.1f} %)",
            )
        )
    return result


def main() -> None:
    for figure in figures():
        print(f"{figure.name}: {figure.median:.1f} % ({figure.note})")


if __name__ == "__main__":
    main()
