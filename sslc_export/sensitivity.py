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


def output_weights(model: nn.Module, linears: dict[str, nn.Linear], tokens: torch.Tensor) -> dict[str, float]:
    """Per named Linear of `model`, Σ_t ‖y_t − b‖² · ‖∂L/∂y_t‖² / d over `tokens` ([sequences, length]), L the
    next-token cross-entropy; the model's parameters are not trained (no gradient is kept for them). One sequence
    per backward pass: the memory of one sequence's graph, for about the time of larger batches."""
    totals = dict.fromkeys(linears, 0.0)

    def watch(name: str):
        def forward_hook(module: nn.Linear, _inputs, output: torch.Tensor) -> None:
            signal = output if module.bias is None else output - module.bias
            energy, width = signal.detach().float().square().sum(-1), output.shape[-1]

            # Refers to no tensor of the graph: a hook that held `output` would be a reference cycle keeping every
            # batch's whole autograd graph alive until the garbage collector ran.
            def gradient_hook(grad: torch.Tensor) -> None:
                totals[name] += float((energy * grad.float().square().sum(-1)).sum()) / width

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
            for sequence in tokens.split(1):
                model(sequence, labels=sequence).loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        for parameter, wanted in frozen.items():
            parameter.requires_grad_(wanted)
    return totals
