"""resolve_inside: paths from configs, CLI or run directories never reach outside their root."""

import pytest

from dsft.errors import DsftError
from dsft.paths import resolve_inside


@pytest.fixture
def root(tmp_path):
    (tmp_path / "run" / "checkpoints" / "checkpoint-6").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    return tmp_path / "run"


@pytest.mark.parametrize("relative", ["checkpoints/checkpoint-6", "adapter_model.safetensors", "checkpoints/../config.yaml", "."])
def test_normal_paths_resolve_inside_the_root(root, relative):
    assert resolve_inside(root, relative, "file") == (root / relative).resolve()


def test_an_absolute_path_inside_the_root_is_accepted(root):
    inside = root.resolve() / "checkpoints" / "checkpoint-6"
    assert resolve_inside(root, inside, "checkpoint") == inside


@pytest.mark.parametrize("relative", ["..", "../outside", "checkpoints/../../outside/x", "/etc/passwd"])
def test_dot_dot_and_absolute_escapes_are_refused(root, relative):
    with pytest.raises(DsftError) as info:
        resolve_inside(root, relative, "checkpoint")
    message = str(info.value)
    assert message.startswith(f"checkpoint {relative!r} resolves to ")
    assert f"outside of {root.resolve()}; refused" in message


def test_a_symlink_that_points_out_of_the_root_is_refused(root):
    (root / "base_model").symlink_to(root.parent / "outside", target_is_directory=True)
    with pytest.raises(DsftError, match="base model 'base_model/model.safetensors' resolves to .*outside"):
        resolve_inside(root, "base_model/model.safetensors", "base model")


def test_a_symlink_within_the_root_is_followed(root):
    (root / "latest").symlink_to(root / "checkpoints" / "checkpoint-6", target_is_directory=True)
    assert resolve_inside(root, "latest", "checkpoint") == (root / "checkpoints" / "checkpoint-6").resolve()


def test_a_root_reached_through_a_symlink_still_contains_its_files(root, tmp_path):
    alias = tmp_path / "alias"
    alias.symlink_to(root, target_is_directory=True)
    assert resolve_inside(alias, "checkpoints", "checkpoint") == (root / "checkpoints").resolve()
