"""The model side of batching: one batch of jobs through one `model.generate` call, every token handed to its job
as it is generated.

Prompts are left-padded (generate.pad_left) as `dsft generate` pads them, so a greedy reply in a batch is the reply
the same prompt gets alone. Jobs in a batch may ask for different max_tokens: the batch runs to the largest, and a
stopping criterion finishes each row at its own budget, at a stop string the server found, or when its client left,
so generate stops as soon as every row is done.
"""

from __future__ import annotations

from dsft.models.generate import DecodeSettings, pad_left
from dsft.serve.batcher import Job


class StaticEngine:
    """run_batch for the Batcher: generate for jobs of one group (served model, sampling)."""

    def __init__(self, served):
        self._served = served

    def __call__(self, jobs: list[Job]) -> int:
        """Generate for jobs and deliver their tokens and ends; returns the decoding steps run."""
        import torch
        from transformers import StoppingCriteriaList

        model, tokenizer = self._served.model, self._served.tokenizer
        input_ids, attention_mask = pad_left([job.prompt_ids for job in jobs], tokenizer.pad_token_id)
        device = next(model.parameters()).device
        sink = _BatchSink(jobs, _eos_ids(tokenizer))
        sampling = jobs[0].sampling
        settings = DecodeSettings(max_new_tokens=max(job.max_new_tokens for job in jobs), do_sample=not sampling.greedy,
                                  temperature=sampling.temperature or 1.0, top_p=sampling.top_p, top_k=0)
        with torch.no_grad(), self._served.activate(jobs[0].model):
            model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, streamer=sink,
                           stopping_criteria=StoppingCriteriaList([_RowsDone(sink)]), **settings.generate_kwargs())
        return sink.steps


def _eos_ids(tokenizer) -> set[int]:
    return {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()


class _BatchSink:
    """A generate streamer for a whole batch: each step's tokens [batch] go to their jobs.

    A row ends at the end-of-sequence token (stop), at its job's max_new_tokens (length) or when its job is
    cancelled; generate pads finished rows, and those pads are never delivered.
    """

    def __init__(self, jobs: list[Job], eos_ids: set[int]):
        self._jobs, self._eos_ids = jobs, eos_ids
        self.done = [False] * len(jobs)
        self._counts = [0] * len(jobs)
        self._held: list[list[int]] = [[] for _ in jobs]  # tokens of jobs that are not per_token
        self._prompt_seen = False
        self.steps = 0

    def put(self, value) -> None:
        if not self._prompt_seen:  # generate streams the prompt first
            self._prompt_seen = True
            return
        self.steps += 1
        for row, token_id in enumerate(value.reshape(-1).tolist()):
            if not self.done[row]:
                self._take(row, token_id)

    def _take(self, row: int, token_id: int) -> None:
        job = self._jobs[row]
        if job.cancelled.is_set():
            self._end(row, "cancelled")
        elif token_id in self._eos_ids:
            self._end(row, "stop")
        else:
            if job.per_token or self._counts[row] == 0:  # the first token always goes at once: time to first token
                job.deliver(("token", token_id))
            else:
                self._held[row].append(token_id)
            self._counts[row] += 1
            if self._counts[row] >= job.max_new_tokens:
                self._end(row, "length")

    def _end(self, row: int, reason: str) -> None:
        self.done[row] = True
        if self._held[row]:
            self._jobs[row].deliver(("tokens", self._held[row]))
        self._jobs[row].deliver(("end", reason))

    def end(self) -> None:
        for row, done in enumerate(self.done):
            if not done:
                self._end(row, "cancelled" if self._jobs[row].cancelled.is_set() else "length")

    def cancelled_rows(self) -> list[bool]:
        return [done or job.cancelled.is_set() for done, job in zip(self.done, self._jobs)]


class _RowsDone:
    """Stopping criterion: a row is finished once the sink ended it or its job was cancelled (generate checks this
    before it streams the step's tokens, so a row ended by the sink is caught on the next step)."""

    def __init__(self, sink: _BatchSink):
        self._sink = sink

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.tensor(self._sink.cancelled_rows(), dtype=torch.bool, device=input_ids.device)
