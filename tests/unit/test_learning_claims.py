"""The learning checks themselves (tests/learning.py) and the table of tests/cpu_paths.sh: a claim holds or fails
exactly by its relation, a run that did not learn must fail every claim, and each checked claim is written down
with its CPU path."""

import json

import pytest

from tests.cpu_paths_table import read_records, table
from tests.learning import LOG_ENV, Claim, assert_learned, assert_not_learned


@pytest.mark.parametrize(("relation", "value", "expected"),
                         [(">", 1.0, False), (">", 1.5, True), (">=", 1.0, True), ("<", 1.0, False), ("<=", 1.0, True),
                          ("<", 0.5, True)])
def test_a_claim_holds_exactly_by_its_relation(relation, value, expected):
    assert Claim("x", value, relation, 1.0).holds() is expected


def test_learned_needs_every_claim_and_not_learned_needs_every_claim_to_fail(monkeypatch):
    monkeypatch.delenv(LOG_ENV, raising=False)
    up, flat = Claim("accuracy", 0.97, ">=", 0.8), Claim("margin", 0.1, ">", 1.0)
    assert_learned([up])
    assert_not_learned([flat])
    with pytest.raises(AssertionError, match=r"margin: 0.1 > 1"):
        assert_learned([up, flat])
    with pytest.raises(AssertionError, match=r"hold on a run that did not learn.*accuracy: 0.97 >= 0.8"):
        assert_not_learned([flat, up])
    with pytest.raises(ValueError, match="at least one claim"):
        assert_learned([])


def test_claims_are_recorded_with_their_path_and_tabled(tmp_path, monkeypatch):
    log = tmp_path / "claims.jsonl"
    monkeypatch.setenv(LOG_ENV, str(log))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    with pytest.raises(AssertionError):
        assert_learned([Claim("accuracy", 0.97, ">=", 0.8), Claim("margin", 0.1, ">", 1.0)])  # recorded first
    records = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]
    assert [(r["quantity"], r["holds"], r["expect"]) for r in records] == [("accuracy", True, "holds"),
                                                                           ("margin", False, "holds")]
    assert records[0]["omp_num_threads"] == "1" and records[0]["mkl_cbwr"] == "COMPATIBLE"
    assert records[0]["test"].startswith("tests/unit/test_learning_claims.py::test_claims_are_recorded")
    text = table(read_records([str(log)]))
    capability = records[0]["capability"].lower()
    assert f"| {capability} t1 mkl:compatible | nearest | bound |" in text
    assert "| accuracy | holds | 0.97 | 0.97 | >= 0.8 |" in text and "| margin | holds | 0.1 ! | 0.1 | > 1 |" in text
    assert text.endswith("2 claims on 1 paths; 1 did not do what they had to (marked !).")
