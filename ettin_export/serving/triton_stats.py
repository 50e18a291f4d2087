"""Triton's statistics extension read as numbers: one model's request, execution and busy-time counters
(GET /v2/models/NAME/stats, which `ServerHandle.model_stats` fetches), and their difference between two
readings. The serving benchmark reads the front's and the engine's cost from them; the deploy tests read
how requests were batched."""

from __future__ import annotations

from dataclasses import dataclass

# The phases of an execution that keep an instance busy (queue time is not the instance's).
BUSY_PHASES = ("compute_input", "compute_infer", "compute_output")


@dataclass(frozen=True)
class ModelStats:
    """One model's counters since the server started or, from `since`, between two readings."""

    inferences: int  # requests answered (inference_count)
    executions: int  # model executions (execution_count): fewer than inferences when requests shared one
    success: int  # successful requests (inference_stats.success.count)
    batches: dict[int, int]  # executions by batch size (batch_stats[].compute_infer.count)
    compute_infer_ns: int  # time in compute_infer, all executions
    busy_ns: int  # compute_input + compute_infer + compute_output, all executions: the instances' busy time

    @classmethod
    def from_json(cls, stats: dict) -> ModelStats:
        """From one entry of the answer's "model_stats" list."""
        batch_stats = stats.get("batch_stats", [])
        return cls(inferences=int(stats["inference_count"]), executions=int(stats["execution_count"]),
                   success=int(stats["inference_stats"]["success"]["count"]),
                   batches={int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in batch_stats},
                   compute_infer_ns=sum(int(b["compute_infer"]["ns"]) for b in batch_stats),
                   busy_ns=sum(int(b[phase]["ns"]) for b in batch_stats for phase in BUSY_PHASES))

    def since(self, before: ModelStats) -> ModelStats:
        """What happened between `before` and this reading; batch sizes that did not occur are left out."""
        batches = {size: count - before.batches.get(size, 0) for size, count in sorted(self.batches.items())}
        return ModelStats(inferences=self.inferences - before.inferences,
                          executions=self.executions - before.executions, success=self.success - before.success,
                          batches={size: count for size, count in batches.items() if count},
                          compute_infer_ns=self.compute_infer_ns - before.compute_infer_ns,
                          busy_ns=self.busy_ns - before.busy_ns)

    @property
    def compute_seconds(self) -> float:
        return self.compute_infer_ns / 1e9

    def to_json(self) -> dict:
        return {"inferences": self.inferences, "executions": self.executions, "success": self.success,
                "compute_seconds": round(self.compute_seconds, 2), "batches": self.batches}
