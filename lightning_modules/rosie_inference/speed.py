"""Speed settings of a :class:`PatchPredictor` for a GPU run: precision, memory layout, compilation.

Kept apart from the predictor so the defaults (bf16 autocast on CUDA, channels-last, eager) stay
where they are and a command or benchmark can change them in one call. None of these change what
is computed beyond float rounding: bf16 autocast keeps weights and the output in fp32,
channels-last only reorders memory, ``torch.compile`` fuses kernels of the same graph.
"""

from __future__ import annotations

import torch

from lightning_modules.rosie_inference.predictor import PatchPredictor

PRECISIONS = ("bf16", "fp32")


def configure_for_speed(predictor: PatchPredictor, precision: str = "bf16", channels_last: bool = True,
                        compile: bool = False) -> PatchPredictor:
    """Set autocast precision, memory format and (optionally) ``torch.compile`` on ``predictor``; returns it.

    ``precision='bf16'`` autocasts on any device (CPU too: slower there, but the same numbers a GPU
    gives); ``'fp32'`` turns autocast off. ``compile`` compiles the network for fixed shapes
    (``dynamic=False``): the first batch of each new shape pays the compilation. Dense mode reads
    the network's ``adapter``/``backbone`` through the compiled wrapper, which forwards attributes.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    predictor.amp = precision == "bf16"
    predictor.memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = getattr(predictor.model, "_orig_mod", predictor.model)
    model.to(memory_format=predictor.memory_format)
    predictor.model = torch.compile(model, dynamic=False) if compile else model
    return predictor
