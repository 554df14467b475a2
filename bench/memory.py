"""What the service holds in memory: the proportional set size (PSS) of every process it runs
(supervisor, fork server, workers, spares), idle after one request, for 1 and 2 workers with and
without a warm spare. Baseline: the model file's size.

PSS splits each shared page among the processes that map it, so the model file that all workers
map once counts once, and the sum is what the service costs the machine. (RSS would count the
model in every worker.) PSS needs Linux; elsewhere the scenario reports nothing."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import psutil

from api.gguf_file import read_metadata
from bench.daemon import StartDaemon
from bench.measure import post_json
from testing.servers import Service

ONE_REQUEST = {"messages": [{"role": "user", "content": "Name a colour."}], "temperature": 0, "max_tokens": 8}
LAYOUTS = ((1, 0), (1, 1), (2, 0), (2, 1))  # (WORKERS, WARM_SPARES)
MIB = 2**20
N_CTX = 2048  # the default context window


def service_pss(service: Service) -> tuple[float, int]:
    """MiB of PSS summed over the supervisor and all its descendants, and how many they are."""
    processes = [psutil.Process(service.pid), *service.process.descendants()]
    total = 0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            total += process.memory_full_info().pss
    return total / MIB, len(processes)


def kv_cache_mib(model: Path, n_ctx: int) -> float:
    """The KV cache llama.cpp allocates (and clears, so it is resident) for a context of n_ctx
    tokens: keys and values, f16, for every layer. Each worker has its own; it is most of what a
    spare costs when the model is small."""
    metadata = read_metadata(model)
    arch = metadata["general.architecture"]
    heads = metadata[f"{arch}.attention.head_count"]
    kv_width = metadata[f"{arch}.embedding_length"] // heads * metadata.get(f"{arch}.attention.head_count_kv", heads)
    return 2 * metadata[f"{arch}.block_count"] * n_ctx * kv_width * 2 / MIB


def run(start: StartDaemon, model: Path) -> dict[str, dict[str, float]]:
    if not hasattr(psutil.Process().memory_full_info(), "pss"):
        return {}
    model_mib = model.stat().st_size / MIB
    results = {}
    for workers, spares in LAYOUTS:
        with start(WORKERS=workers, WARM_SPARES=spares, RESTART_AFTER_REQUESTS=0, N_CTX=N_CTX) as service:
            reply = post_json(service.port, "/v1/chat/completions", ONE_REQUEST)  # a KV cache in use, as in service
            assert reply.status == 200, reply.body
            time.sleep(0.5)
            pss, processes = service_pss(service)
        results[f"{workers} worker(s), {spares} spare(s)"] = {
            "pss_mib": round(pss, 1), "processes": processes, "model_file_mib": round(model_mib, 1),
            "vs_model_file": round(pss / model_mib, 2)}
    spare = results["1 worker(s), 1 spare(s)"]["pss_mib"] - results["1 worker(s), 0 spare(s)"]["pss_mib"]
    results["a warm spare adds"] = {"pss_mib": round(spare, 1), "model_file_mib": round(model_mib, 1),
                                    "vs_model_file": round(spare / model_mib, 2),
                                    "kv_cache_mib": round(kv_cache_mib(model, N_CTX), 1)}
    return results
