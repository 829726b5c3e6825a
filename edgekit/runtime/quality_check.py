"""The quality check a device runs on its own kernels: the bundle's graph against the fp32 reference
the build shipped with it.

A build keeps, for a few of its parity prompts, the fp32 reference's top-k token ids and
log-probabilities at every position, and the probability mass of the rest as one tail bucket
(``quality_reference.json``, about 8 KB). The device feeds the same tokens one step at a time
(teacher forcing: the bundle's graph gives last-position logits only) and compares each step's
distribution with the reference's: top-1 agreement, and KL over the top-k ids plus the tail. Lumping
the tail into one bucket can only lower KL, so a device passing the build's gate with this figure
is held to a slightly looser bound than the build was; the top-1 figure is exact.

The prompts are sized for a few seconds on a Raspberry Pi 4 with the 0.8B: the daemon runs this at
start, inside systemd's start timeout.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.profiles import Quality
from edgekit.runtime.agreement import forced_logits, log_softmax
from edgekit.runtime.engine import Engine
from edgekit.runtime.machine import cpu
from edgekit.validation import Fields, read_json

REFERENCE = "quality_reference.json"
TOP_K = 16
# Which parity prompts the device replays, and how many positions of each: English, German and code,
# 24 decode steps in all.
DEVICE_PROMPTS = (0, 2, 4)
DEVICE_POSITIONS = 8
FORMAT = 1


@dataclass(frozen=True)
class ReferenceSequence:
    """One prompt and the tokens forced after it, with the reference's top-k at every position."""

    prompt: tuple[int, ...]
    tokens: tuple[int, ...]
    top_ids: tuple[tuple[int, ...], ...]  # [position][k], most likely first
    top_logprobs: tuple[tuple[float, ...], ...]  # [position][k], natural log


@dataclass(frozen=True)
class Reference:
    """What a device's output is compared with: the fp32 reference, reduced to its top-k."""

    k: int
    sequences: tuple[ReferenceSequence, ...]

    @property
    def positions(self) -> int:
        return sum(len(s.tokens) for s in self.sequences)

    @classmethod
    def from_logits(cls, prompts: Sequence[Sequence[int]], runs: Sequence[tuple[Sequence[int], np.ndarray]],
                    k: int = TOP_K, chosen: Sequence[int] = DEVICE_PROMPTS, positions: int = DEVICE_POSITIONS) -> Reference:
        """The device reference from the build's reference runs: (forced tokens, [n, vocab] logits) per prompt."""
        sequences = []
        for index in chosen:
            tokens, logits = runs[index]
            rows = log_softmax(np.asarray(logits[:positions], dtype=np.float64))
            top = np.argsort(-rows, axis=1, kind="stable")[:, :k]
            sequences.append(ReferenceSequence(
                prompt=tuple(int(t) for t in prompts[index]), tokens=tuple(int(t) for t in tokens[:positions]),
                top_ids=tuple(tuple(int(i) for i in row) for row in top),
                top_logprobs=tuple(tuple(round(float(v), 6) for v in np.take_along_axis(rows[r], top[r], 0))
                                   for r in range(len(top)))))
        return cls(k=k, sequences=tuple(sequences))

    def write(self, folder: Path) -> None:
        data = {"format": FORMAT, "k": self.k, "source": "transformers fp32, top-k log-probabilities",
                "sequences": [asdict(s) for s in self.sequences]}
        (folder / REFERENCE).write_text(json.dumps(data, separators=(",", ":")) + "\n")

    @classmethod
    def read(cls, folder: Path) -> Reference | None:
        """The bundle's reference, or None for a bundle built before references were shipped."""
        path = folder / REFERENCE
        if not path.exists():
            return None
        top = Fields(read_json(path, f"{path}: missing"), str(path))
        if (found := top.get("format", int, "an integer")) != FORMAT:
            raise EdgekitError(f"{path}: format {found} is not one this edgekit reads ({FORMAT})")
        k = top.number("k", 1, 1000, integer=True)
        sequences = []
        for n, item in enumerate(top.get("sequences", list, "a list")):
            fields = Fields(item, str(path), f"sequences[{n}].")
            tokens = tuple(fields.get("tokens", list, "a list of token ids"))
            ids = fields.get("top_ids", list, "a list per position")
            logprobs = fields.get("top_logprobs", list, "a list per position")
            if not (len(ids) == len(logprobs) == len(tokens)) or any(len(r) != k for r in (*ids, *logprobs)):
                raise EdgekitError(f"{path}: sequences[{n}] needs {k} ids and log-probabilities at each of its "
                                   f"{len(tokens)} positions")
            sequences.append(ReferenceSequence(tuple(fields.get("prompt", list, "a list of token ids")), tokens,
                                               tuple(tuple(r) for r in ids), tuple(tuple(r) for r in logprobs)))
        if not sequences:
            raise EdgekitError(f"{path}: no sequences to check against")
        return cls(k=k, sequences=tuple(sequences))


@dataclass(frozen=True)
class DeviceQuality:
    """The check's figures on this device, and what the bundle's gate makes of them."""

    positions: int
    top1_agreement: float
    mean_kl: float  # KL(reference || device) over the top-k ids plus the tail, nats
    max_kl: float
    checked_on: str  # the CPU model
    onnxruntime: str
    seconds: float
    passed: bool
    reason: str
    cached: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeviceQuality:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


def top_k_kl(top_ids: Sequence[int], top_logprobs: Sequence[float], logits: np.ndarray) -> float:
    """KL(reference || candidate) over the reference's top-k ids plus one bucket for everything else."""
    candidate = log_softmax(np.asarray(logits, dtype=np.float64))
    p = np.exp(np.asarray(top_logprobs, dtype=np.float64))
    q = np.exp(candidate[np.asarray(top_ids)])
    p_tail, q_tail = max(1.0 - p.sum(), 0.0), max(1.0 - q.sum(), 1e-300)
    terms = p * (np.asarray(top_logprobs) - np.log(np.maximum(q, 1e-300)))
    return float(terms.sum() + (p_tail * math.log(p_tail / q_tail) if p_tail > 0 else 0.0))


def run(engine: Engine, reference: Reference, gate: Quality, tick: Callable[[], object] | None = None) -> DeviceQuality:
    """Teacher-force ``engine`` along the reference on this machine and judge the figures by ``gate``;
    ``tick`` is called after every step (the daemon feeds systemd's watchdog from it)."""
    import onnxruntime

    started = time.perf_counter()
    agree: list[bool] = []
    kls: list[float] = []
    for sequence in reference.sequences:
        logits = forced_logits(engine, list(sequence.prompt), list(sequence.tokens), tick)
        for row, ids, logprobs in zip(logits, sequence.top_ids, sequence.top_logprobs):
            agree.append(int(np.argmax(row)) == ids[0])
            kls.append(top_k_kl(ids, logprobs, row))
    figures = DeviceQuality(positions=len(agree), top1_agreement=round(float(np.mean(agree)), 4),
                            mean_kl=float(np.mean(kls)), max_kl=float(np.max(kls)), checked_on=str(cpu()["model"]),
                            onnxruntime=onnxruntime.__version__, seconds=round(time.perf_counter() - started, 2),
                            passed=False, reason="")
    return judge(figures, gate)


def judge(figures: DeviceQuality, gate: Quality) -> DeviceQuality:
    """``figures`` with the verdict of ``gate``: the same thresholds as the build's parity gate."""
    failures = gate.failures(figures.top1_agreement, figures.mean_kl)
    reason = "; ".join(failures) or (f"top-1 agreement {figures.top1_agreement:.3f}, mean KL {figures.mean_kl:.4f} "
                                     "within the bundle's gate")
    return replace(figures, passed=not failures, reason=reason)
