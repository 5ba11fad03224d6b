"""A resumed run's TensorBoard curves: purge_tensorboard_after hides what the interrupted run wrote after the
checkpoint, so TensorBoard (read here with its own EventAccumulator) shows each step once, the resumed run's value."""

import time

from torch.utils.tensorboard import SummaryWriter

from dsft.train.loop import purge_tensorboard_after


def write_losses(log_dir, steps, offset: float) -> None:
    writer = SummaryWriter(log_dir=str(log_dir))
    for step in steps:
        writer.add_scalar("train/loss", step + offset, step)
    writer.close()
    time.sleep(1.1)  # event file names carry the second they were opened: TensorBoard reads them in that order


def curve(log_dir) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    return [(event.step, event.value) for event in accumulator.Scalars("train/loss")]


def test_resumed_steps_replace_the_interrupted_runs_later_points(tmp_path):
    log_dir = tmp_path / "tensorboard"
    write_losses(log_dir, range(1, 7), offset=0.5)  # interrupted after step 6, last checkpoint at step 4
    files_before = {path.name: path.read_bytes() for path in log_dir.iterdir()}
    purge_tensorboard_after(log_dir, 4)
    write_losses(log_dir, range(5, 9), offset=0.25)  # the resumed run
    assert curve(log_dir) == [(1, 1.5), (2, 2.5), (3, 3.5), (4, 4.5), (5, 5.25), (6, 6.25), (7, 7.25), (8, 8.25)]
    assert all((log_dir / name).read_bytes() == data for name, data in files_before.items())  # nothing edited


def test_a_run_without_tensorboard_gets_no_directory(tmp_path):
    purge_tensorboard_after(tmp_path / "tensorboard", 4)
    assert not (tmp_path / "tensorboard").exists()
