"""Learning checks: the assertions that training moved a number (loss down, accuracy, margin or reward up), each
written down with the CPU path it ran on, so that `tests/cpu_paths.sh` can print how far every path lands from its
bound, and each checked against a run that did not learn.

A recipe test builds its claims as a list of `Claim`s from a run's outputs and passes them to `assert_learned`.
The same list, built from a run whose learning rate is effectively zero (`NOT_LEARNING`), goes to
`assert_not_learned`: every claim must fail there, so a claim that a model which did not learn also meets is a
defect the suite reports. The floating-point path is whatever torch picked (`ATEN_CPU_CAPABILITY`, the thread
count): a claim's bound must leave a clear margin on every path, and the recorded values show how clear.
"""

import json
import operator
import os
from dataclasses import asdict, dataclass

import pytest
import torch

LOG_ENV = "DSFT_LEARNING_LOG"
"""Environment variable naming a JSONL file that each checked claim is appended to (unset: nothing written)."""

NOT_LEARNING = {"learning_rate": 1e-12}
"""Train settings of a run that does not learn: the config refuses a learning rate of 0, and AdamW's step is about
the learning rate per weight, so 1e-12 leaves every weight where it started to within float32 rounding."""

learning = pytest.mark.learning
"""The marker of tests whose assertions say that training moved a number (run on every path by cpu_paths.sh)."""

_RELATIONS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}


@dataclass(frozen=True)
class Claim:
    """`value relation bound`, for example Claim("validation accuracy", 0.97, ">=", 0.8)."""

    quantity: str
    value: float
    relation: str
    bound: float

    def holds(self) -> bool:
        return _RELATIONS[self.relation](self.value, self.bound)

    def __str__(self) -> str:
        return f"{self.quantity}: {self.value:.4g} {self.relation} {self.bound:.4g}"


def cpu_path() -> dict:
    """The floating-point path of this process: torch's SIMD capability, thread count and MKL's summation order
    (MKL_CBWR=COMPATIBLE makes MKL's GEMMs sum as on another CPU would, where its own code path does not follow
    ATEN_CPU_CAPABILITY)."""
    return {"capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "default"),
            "mkl_cbwr": os.environ.get("MKL_CBWR", "auto")}


def _record(claims: list[Claim], expect: str) -> None:
    path = os.environ.get(LOG_ENV)
    if not path:
        return
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" (", 1)[0]
    with open(path, "a", encoding="utf-8") as log:
        log.writelines(json.dumps({"test": test, **asdict(claim), "holds": claim.holds(), "expect": expect,
                                   **cpu_path()}) + "\n" for claim in claims)


def assert_learned(claims: list[Claim]) -> None:
    """Every claim holds; all are recorded first, so a failing run still shows each value against its bound."""
    if not claims:
        raise ValueError("a learning test needs at least one claim")
    _record(claims, "holds")
    failed = [str(claim) for claim in claims if not claim.holds()]
    assert not failed, f"training did not move these as claimed on {cpu_path()}: {failed}"


def assert_not_learned(claims: list[Claim]) -> None:
    """Every claim fails on a run that did not learn: a claim it meets does not measure learning."""
    if not claims:
        raise ValueError("a learning test needs at least one claim")
    _record(claims, "fails")
    held = [str(claim) for claim in claims if claim.holds()]
    assert not held, f"these claims hold on a run that did not learn, so they cannot tell learning: {held}"


def mean(values: list[float]) -> float:
    return sum(values) / len(values)
