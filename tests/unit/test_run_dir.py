"""output.overwrite replaces a run and nothing else."""

import pytest

from dsft.config import OutputConfig
from dsft.errors import DsftError
from dsft.train.run_dir import CONFIG_FILE, prepare_run_dir


def test_overwrite_replaces_a_run_but_not_the_working_directory_or_other_files(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / CONFIG_FILE).write_text("old", encoding="utf-8")
    assert prepare_run_dir(OutputConfig(dir=str(run), overwrite=True), resume=False) == run
    assert list(run.iterdir()) == []
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("{}\n", encoding="utf-8")
    with pytest.raises(DsftError, match="not a dsft run"):
        prepare_run_dir(OutputConfig(dir=str(data), overwrite=True), resume=False)
    (tmp_path / CONFIG_FILE).write_text("my config", encoding="utf-8")
    monkeypatch.chdir(data)
    for here in (".", ".."):
        with pytest.raises(DsftError, match="working directory"):
            prepare_run_dir(OutputConfig(dir=here, overwrite=True), resume=False)
    assert (data / "train.jsonl").exists() and (tmp_path / CONFIG_FILE).exists()
    with pytest.raises(DsftError, match="is a file"):
        prepare_run_dir(OutputConfig(dir="train.jsonl"), resume=False)
