"""Adversarial training on the input embeddings: FGM (one step along the gradient) and PGD (several projected steps).

The perturbation is added to the OUTPUT of the input-embedding module by a forward hook that exists only
for the duration of one training step, so it works when the embedding weights are frozen (LoRA) and no
forward outside a step (evaluation, generation) ever sees it. The norm is taken per sequence (per row of
the batch): the attack on a sample is then the same whatever it is batched or accumulated with.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from dsft.config import AdversarialConfig
from dsft.errors import DsftError

TrainingPass = Callable[[], object]
"""One forward and backward pass of the current batch (gradients accumulate); returns the detached loss."""


def build_adversary(config: AdversarialConfig, model) -> EmbeddingAdversary | None:
    """The adversary train.adversarial asks for, or None for method none (then nothing is hooked at all)."""
    return None if config.method == "none" else EmbeddingAdversary(config, model)


class EmbeddingAdversary:
    """Runs one training step with an attack on the input embeddings; see step."""

    def __init__(self, config: AdversarialConfig, model):
        self.config = config
        self.model = model
        transformer = model if hasattr(model, "get_input_embeddings") else model.backbone  # multitask: heads on a backbone
        self.embeddings = transformer.get_input_embeddings()
        self.delta_BLD = None
        """The perturbation the hook adds to the embedding output (float32); None in the clean pass."""
        self.grad_BLD = None
        """Gradient of the loss with respect to the (perturbed) embedding output of the latest pass."""

    def step(self, clean_pass: TrainingPass, adversarial_pass: TrainingPass):
        """Run clean_pass, then the attack; return the clean pass's loss.

        FGM adds the gradients of one pass at delta = epsilon * g / ||g|| to the clean gradients. PGD takes
        pgd_steps ascent steps of norm pgd_alpha along g / ||g||, each projected into the L2 ball of radius
        epsilon, and adds only the last step's gradients to the clean ones (the earlier passes only find
        the direction). Raises DsftError when the loss has no gradient at the embedding output.
        """
        handle = self.embeddings.register_forward_hook(self._perturb)
        try:
            clean_loss = clean_pass()
            if self.config.method == "fgm":
                self._fgm(adversarial_pass)
            else:
                self._pgd(adversarial_pass)
        finally:
            handle.remove()
            self.delta_BLD = self.grad_BLD = None
        return clean_loss

    def _fgm(self, adversarial_pass: TrainingPass) -> None:
        self.delta_BLD = self.config.epsilon * unit_per_row(self._latest_grad())
        adversarial_pass()

    def _pgd(self, adversarial_pass: TrainingPass) -> None:
        c = self.config
        delta_BLD = 0.0
        for ascent_step in range(c.pgd_steps):
            delta_BLD = project_per_row(delta_BLD + c.pgd_alpha * unit_per_row(self._latest_grad()), c.epsilon)
            self.delta_BLD = delta_BLD
            if ascent_step == c.pgd_steps - 1:
                adversarial_pass()
            else:
                with self._weights_frozen():
                    adversarial_pass()

    def _latest_grad(self):
        if self.grad_BLD is None:
            raise DsftError(f"train.adversarial: the loss of {type(self.model).__name__} has no gradient at the output "
                            "of its input embeddings (get_input_embeddings), so there is nothing to attack along")
        grad_BLD, self.grad_BLD = self.grad_BLD, None
        return grad_BLD

    @contextlib.contextmanager
    def _weights_frozen(self):
        """No weight gets a gradient inside: a PGD ascent pass needs only the embedding gradient, and the clean
        gradients then stay as they are without a copy."""
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        for param in trainable:
            param.requires_grad_(False)
        try:
            yield
        finally:
            for param in trainable:
                param.requires_grad_(True)

    def _perturb(self, module, args, output_BLD):
        import torch

        if not torch.is_grad_enabled():
            return output_BLD  # a pass that does not train (e.g. a reference model's) is neither attacked nor watched
        if self.delta_BLD is not None and self.delta_BLD.shape != output_BLD.shape:
            raise DsftError(f"train.adversarial: the embeddings of one step changed shape, {tuple(self.delta_BLD.shape)} "
                            f"then {tuple(output_BLD.shape)}; this stage runs them more than once per pass")
        if not output_BLD.requires_grad:
            # Frozen embedding weights (LoRA): the output needs a gradient of its own to attack along.
            output_BLD = output_BLD.detach().requires_grad_(True)
        if self.delta_BLD is not None:
            output_BLD = output_BLD + self.delta_BLD.to(output_BLD.dtype)
        output_BLD.register_hook(self._keep_grad)
        return output_BLD

    def _keep_grad(self, grad_BLD) -> None:
        self.grad_BLD = grad_BLD.detach()


def row_norms(x_BLD):
    """L2 norm of each row (everything but the first dimension), shaped to broadcast against x_BLD."""
    return x_BLD.flatten(1).norm(dim=1).view(-1, *[1] * (x_BLD.dim() - 1))


def unit_per_row(grad_BLD):
    """grad / ||grad|| per row, in float32; a row without gradient (all padding) stays zero."""
    grad_BLD = grad_BLD.float()
    return grad_BLD / row_norms(grad_BLD).clamp_min(1e-12)


def project_per_row(delta_BLD, radius: float):
    """Each row scaled back onto the L2 ball of the radius if it lies outside."""
    return delta_BLD * (radius / row_norms(delta_BLD).clamp_min(radius))
