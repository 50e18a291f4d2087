"""Opening an artifact with a runtime: the `RUNTIMES` registry, `LoadOptions`, and the choice of runtime.

    load_runtime(artifact, runtime=None, **options)   # what Artifact.load and Reranker.load run

`artifact` is an `ettin_runtime.artifact.Artifact` (opened and verified); the functions here read only
its facts (engine, limits, model, parity summary), so the artifact format does not depend on them
beyond `Artifact.load` handing over to `load_runtime`. A runtime is a class named in `RUNTIMES`
whose `from_artifact(artifact, LoadOptions)` returns a Reranker; its module is imported only when
asked for, so a runtime-only install needs only the runtime it uses.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .checks import whole_number
from .errors import ArtifactError
from .machine import cpu_class, describe, this_machine
from .packing import packed_batches, smallest_max_length_of

# The runtimes, by name: "module:Class" whose `from_artifact(artifact, LoadOptions)` returns a Reranker
# (imported only when asked for, so a runtime-only install needs only the runtime it uses).
RUNTIMES = {
    "onnxruntime": "ettin_runtime.backends.onnxruntime:OnnxRuntimeReranker",
    "openvino": "ettin_runtime.backends.openvino:OpenVinoReranker",
    "tensorrt": "ettin_runtime.backends.tensorrt:TensorRTReranker",
}


@dataclass(frozen=True)
class LoadOptions:
    """How to open an artifact, with one meaning for every runtime.

    device: "auto", "cpu", "cuda" or "cuda:N" (a GPU runtime takes its GPU from it; a CPU runtime
        refuses "cuda" unless it has a CUDA provider).
    threads: CPU threads per run for CPU runtimes; a GPU runtime ignores it.
    max_length: truncate pairs to this many tokens instead of the artifact's max_length.
    max_batch_tokens / max_batch_pairs: at most this much per run (a pair longer than the token budget
        runs alone, within the artifact's limits).
    """

    device: str = "auto"
    threads: int | None = None
    max_length: int | None = None
    max_batch_tokens: int | None = None
    max_batch_pairs: int | None = None


def load_runtime(artifact, runtime: str | None = None, **options):
    """A Reranker for `artifact`: `runtime` (a RUNTIMES key, or "auto") or the one its engine names.
    Options are `LoadOptions` fields (device, threads, max_length, max_batch_tokens, max_batch_pairs)."""
    name = runtime_for_this_cpu(artifact, options) if runtime == "auto" else runtime or artifact.engine.runtime
    if name not in RUNTIMES:
        raise ArtifactError(f"unknown runtime {name!r}; known: {', '.join(RUNTIMES)}.")
    load_options = LoadOptions(**options)
    check_options(artifact, load_options)
    module_name, class_name = RUNTIMES[name].split(":")
    backend = getattr(importlib.import_module(module_name), class_name)
    reranker = backend.from_artifact(artifact, load_options)
    warn_if_judged_elsewhere(artifact, stacklevel=4)  # names the code that called Artifact.load
    return reranker


def check_options(artifact, options: LoadOptions) -> None:
    """LoadOptions against the artifact's facts, before any runtime allocates anything."""
    longest = artifact.model.max_positions or artifact.max_length
    shortest = smallest_max_length_of(artifact.root)  # the pair template's special tokens + one of query, document
    length = artifact.max_length if options.max_length is None else options.max_length
    if not (whole_number(length, minimum=shortest) and length <= longest):
        raise ArtifactError(
            f"max_length {length!r} is outside what {artifact.root} can take: {shortest} to {longest} tokens (the "
            f"pair template's special tokens and one token each of query and document, to the model's "
            f"positions; the artifact was built and checked at {artifact.max_length}). Pass a max_length in that range."
        )
    device = options.device
    if not (whole_number(device, minimum=0) or
            (isinstance(device, str) and re.fullmatch(r"auto|cpu|cuda|gpu|(cuda:)?\d+", device.strip().lower()))):
        raise ArtifactError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N' (a GPU's index); got {device!r}.")
    # max_batch_tokens is a packing budget: a pair longer than it runs alone, within the engine's limit.
    for name in ("max_batch_tokens", "max_batch_pairs", "threads"):
        value = getattr(options, name)
        if value is not None and not whole_number(value):
            raise ArtifactError(f"{name} must be an integer of at least 1; got {value!r}.")


def gate_passed_runtimes(artifact) -> list[str]:
    """The runtimes the build judged and that passed its gate (the engine's own first)."""
    engine = artifact.engine
    gate = (engine.record.get("runtime_choice") or {}).get("gate") or {}
    passed = [name for name, verdict in gate.items() if verdict == "passed" and name in RUNTIMES]
    return sorted(set(passed) | {engine.runtime}, key=lambda name: name != engine.runtime)


def runtime_for_this_cpu(artifact, options: Mapping) -> str:
    """runtime="auto": the manifest's runtime where the gate ran on this CPU class; on another class,
    the fastest here of the runtimes that passed the gate, timed on NQ-like batches (64 pairs of
    ~105 tokens, random token ids: speed does not depend on them), 3 interleaved rounds."""
    judged = artifact.judged_on()
    candidates = [name for name in gate_passed_runtimes(artifact) if importlib.util.find_spec(name) is not None]
    if len(candidates) < 2 or not judged or judged.get("class") == cpu_class():
        return artifact.engine.runtime
    rng = np.random.default_rng(0)
    lengths = np.clip(np.round(rng.lognormal(np.log(105), 0.5, 64)), 8, artifact.max_length).astype(int)
    ids = [rng.integers(1000, artifact.model.vocab_size, n).astype(np.int64) for n in lengths]
    loaded = {name: artifact.load(runtime=name, **options) for name in candidates}
    seconds: dict[str, list[float]] = {name: [] for name in candidates}
    try:
        for round_ in range(4):  # the first round warms up
            for name, reranker in loaded.items():
                batches = packed_batches(ids, reranker.max_batch_tokens, reranker.max_batch_pairs)
                start = time.perf_counter()
                for batch in batches:
                    reranker._score(batch)
                if round_:
                    seconds[name].append(time.perf_counter() - start)
    finally:
        for reranker in loaded.values():
            reranker.close()
    return min(candidates, key=lambda name: sorted(seconds[name])[1])


_WARNED_ELSEWHERE: set[str] = set()


def warn_if_judged_elsewhere(artifact, *, stacklevel: int = 2) -> None:
    """Once per artifact folder and process: a CPU artifact loaded on a CPU of another kernel class
    than its gate's (ettin_runtime.machine.cpu_class) may score beyond what the gate saw."""
    judged = artifact.judged_on()
    if artifact.target != "cpu" or not judged or str(artifact.root) in _WARNED_ELSEWHERE:
        return
    if judged.get("class") != cpu_class():
        _WARNED_ELSEWHERE.add(str(artifact.root))
        warnings.warn(
            f"{artifact.root}: its {artifact.precision} parity gate ran on a CPU of class {judged.get('class')} "
            f"({judged.get('cpu')}); this one is {describe(this_machine())}. Its kernels differ, so its scores may "
            f"differ beyond what the gate saw: re-judge it here with `ettin-export verify {artifact.root}`.",
            RuntimeWarning, stacklevel=stacklevel)
