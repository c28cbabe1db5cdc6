"""Each image of a batch at its own LoRA strength, and from its own LoRA file: how one pipeline
call renders every strength of an epoch (and several epochs) of the X/Y grid."""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

from lora_lab.errors import LoraLabError
from lora_lab.lora.adapters import EVAL_ADAPTER, activate, modules_of


class SampleStrengths:
    """Each image of a batch at its own LoRA strength, and, with several LoRA files loaded side
    by side (:func:`eval_adapter`), each from its own file::

        with SampleStrengths(unet, te, [eval_adapter(0), eval_adapter(1)]) as s:
            s.set([0, 0.5, 1], [eval_adapter(0), eval_adapter(0), eval_adapter(1)])
            pipe(...)

    A forward hook on every LoRA layer's up projection multiplies its output by the strength
    of the sample it belongs to (the layer's own alpha / rank stays in peft's scale), so sample
    i gets ``W x + strengths[i] * (alpha / rank) * up(down(x))`` on every layer, text encoder
    included. Several files share a batch through peft's mixed-adapter batches (each layer
    runs each adapter on its own samples only); a strength-0 sample then runs no adapter at all
    (peft's ``__base__``), and one adapter alone adds exactly zero: either way the base model's
    image. A batch under classifier-free guidance runs the UNet on twice the samples (the
    negative prompts' half, then the prompts' half, in the same order); both halves get the
    same strengths and files.
    """

    def __init__(self, unet, text_encoder, adapters=(EVAL_ADAPTER,)):
        self.modules = tuple(modules_of(unet, text_encoder))
        self.adapters = list(adapters)
        self._values: Dict[str, torch.Tensor] = {}
        self._names: Optional[List[str]] = None  # per sample, when several adapters share a batch
        self._handles: list = []

    def set(self, strengths, adapters=None) -> None:
        """Strength (and adapter name; default: the first adapter) of each sample in order."""
        strengths = [float(s) for s in strengths]
        names = list(adapters) if adapters is not None else [self.adapters[0]] * len(strengths)
        if len(self.adapters) > 1:
            names = ["__base__" if s == 0 else n for s, n in zip(strengths, names)]
            self._names = names
        else:
            self._names = None
        self._values = {a: torch.tensor([s for s, n in zip(strengths, names) if n == a], dtype=torch.float32)
                        for a in set(names)}

    @staticmethod
    def _per_sample(values, n: int, what: str):
        k = len(values)
        if n == k:
            return values
        if n == 2 * k:
            return values + values if isinstance(values, list) else torch.cat([values, values])
        raise RuntimeError(f"LoRA {what} for {k} samples, but a layer saw a batch of {n}")

    def _pre_hook(self, module, args, kwargs):
        if self._names is None:
            return None
        names = self._per_sample(self._names, args[0].shape[0], "files")
        return args, {**kwargs, "adapter_names": names}

    def _hook_for(self, adapter: str):
        def hook(module, args, output):
            scale = self._per_sample(self._values[adapter], output.shape[0], "strengths")
            return output * scale.to(output.device, output.dtype).view(-1, *([1] * (output.dim() - 1)))

        return hook

    def __enter__(self) -> "SampleStrengths":
        from peft.tuners.lora import LoraLayer

        for module in self.modules:
            if len(self.adapters) == 1:
                activate(module, self.adapters[0])
            for layer in module.modules():
                if not isinstance(layer, LoraLayer):
                    continue
                present = [a for a in self.adapters if a in layer.lora_B]
                for adapter in present:
                    if adapter in getattr(layer, "lora_variant", {}):
                        raise LoraLabError("per-sample strengths apply to plain LoRA layers only")
                    layer.set_scale(adapter, 1.0)
                    self._handles.append(layer.lora_B[adapter].register_forward_hook(self._hook_for(adapter)))
                if present and len(self.adapters) > 1:
                    self._handles.append(layer.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
