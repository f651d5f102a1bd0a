"""How much each Linear's output error costs the model's loss (the weights of --allocation global's objective).

A relative calibration loss ‖(W − Ŵ)X‖ / ‖WX‖ says how well a layer is approximated, not what its error does to
the next-token loss: measured on SmolLM2, a split that lowered the mean relative loss raised perplexity. To second
order, with the empirical Fisher and an error spread evenly over a layer's d outputs and over its tokens in
proportion to their output energy, the loss rises by about ½ Σ_t relative_loss² · ‖y_t − b‖² · ‖∂L/∂y_t‖² / d.
One forward and backward pass of the dense model over the calibration tokens measures, per Linear, the weight
Σ_t ‖y_t − b‖² · ‖∂L/∂y_t‖² / d that multiplies relative_loss². Only the ratios between layers matter.
"""
from __future__ import annotations

import torch
from torch import nn


def output_weights(model: nn.Module, linears: dict[str, nn.Linear], tokens: torch.Tensor, batch_size: int) -> dict[str, float]:
    """Per named Linear of `model`, Σ_t ‖y_t − b‖² · ‖∂L/∂y_t‖² / d over `tokens` ([sequences, length]), L the
    next-token cross-entropy; the model's parameters are not trained (no gradient is kept for them)."""
    totals = dict.fromkeys(linears, 0.0)

    def watch(name: str):
        def forward_hook(module: nn.Linear, _inputs, output: torch.Tensor) -> None:
            signal = output if module.bias is None else output - module.bias
            energy = signal.detach().float().square().sum(-1)

            def gradient_hook(grad: torch.Tensor) -> None:
                totals[name] += float((energy * grad.float().square().sum(-1)).sum()) / output.shape[-1]

            output.register_hook(gradient_hook)
        return forward_hook

    # The embeddings' output is the leaf the gradients flow back to: no parameter needs (or gets) a gradient.
    frozen = {parameter: parameter.requires_grad for parameter in model.parameters()}
    for parameter in frozen:
        parameter.requires_grad_(False)
    handles = [model.get_input_embeddings().register_forward_hook(lambda _module, _inputs, output: output.requires_grad_(True))]
    handles += [module.register_forward_hook(watch(name)) for name, module in linears.items()]
    try:
        with torch.enable_grad():
            for start in range(0, tokens.shape[0], batch_size):
                batch = tokens[start : start + batch_size]
                model(batch, labels=batch).loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        for parameter, wanted in frozen.items():
            parameter.requires_grad_(wanted)
    return totals
