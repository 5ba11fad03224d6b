"""Callbacks that stop a run cleanly: on a non-finite loss or gradient, and on SIGTERM / SIGINT."""

from __future__ import annotations

import signal
import threading

from transformers import TrainerCallback

from dsft.errors import TrainingDiverged


class NonFiniteGuard(TrainerCallback):
    """Checks loss and gradients right before the optimizer step.

    policy "stop" raises TrainingDiverged so the bad update is never applied (and never saved);
    "skip" drops the step's gradients, so the optimizer leaves the weights as they were, and raises
    after max_consecutive non-finite steps in a row. With fp16 the loss scaler already skips steps
    whose gradients overflow, so only the loss is checked there.
    """

    def __init__(self, trainer, policy: str, max_consecutive: int, check_gradients: bool, report):
        self.trainer = trainer
        self.policy = policy
        self.max_consecutive = max_consecutive
        self.check_gradients = check_gradients
        self.report = report
        self.skipped_steps = 0
        self.skipped_step: int | None = None
        """The last step whose update was skipped (its gradients dropped), or None."""
        self._in_a_row = 0

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        what = self._nonfinite(model)
        if what is None:
            self._in_a_row = 0
            return
        step = state.global_step + 1
        self._in_a_row += 1
        if self.policy == "stop" or self._in_a_row >= self.max_consecutive:
            streak = "" if self.policy == "stop" else f" ({self._in_a_row} steps in a row)"
            raise TrainingDiverged(
                f"non-finite {what} at step {step}{streak}; the update was not applied and nothing after "
                f"step {step - 1} was saved. Lower train.learning_rate, keep train.max_grad_norm > 0, "
                "use train.mixed_precision: bf16 instead of fp16, or check the data around this step (samples.jsonl)"
            )
        model.zero_grad(set_to_none=True)  # an optimizer leaves parameters without gradient untouched
        self.skipped_steps += 1
        self.skipped_step = step
        self.report(f"step {step}: non-finite {what}, step skipped ({self.skipped_steps} so far)")

    def _nonfinite(self, model) -> str | None:
        import torch

        if self.trainer.nonfinite_loss_seen:
            self.trainer.nonfinite_loss_seen = False
            return "loss"
        if not self.check_gradients:
            return None
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if grads and not bool(torch.nn.utils.get_total_norm(grads).isfinite()):
            return "gradient norm"
        return None


class StopOnSignal(TrainerCallback):
    """SIGTERM or SIGINT: finish the current step, save a checkpoint, stop. A second signal aborts at once."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signal_name is not None:
            self.restore()
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def on_step_end(self, args, state, control, **kwargs):
        if self.signal_name is not None:
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()

    def restore(self) -> None:
        """Put back the signal handlers that were there before training."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
