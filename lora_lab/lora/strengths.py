"""Each image of a batch at its own LoRA strength, and from its own LoRA file: how one pipeline
call renders every strength of an epoch (and several epochs) of the X/Y grid."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from lora_lab.errors import LoraLabError
from lora_lab.lora import lycoris_net
from lora_lab.lora.adapters import EVAL_ADAPTER, modules_of


@dataclass
class _Stack:
    """One layer's LoRA files side by side: their down weights stacked on the rank axis (R =
    the sum of the files' ranks), their up weights likewise, and which file and alpha / rank
    each of the R columns belongs to."""

    down: torch.Tensor  # (R, in) or (R, in, kh, kw)
    up: torch.Tensor  # (out, R) or (out, R, 1, 1)
    columns: tuple  # ((file index, rank, alpha / rank), ...): the key of the per-sample scales
    conv: Optional[Tuple] = None  # (stride, padding, dilation, groups) of a conv layer's down weight
    # Every file full rank with an identity up weight (LoHa, LoKr, DoRA read back as their exact
    # weight change): the files' outputs are summed instead of multiplied by a stacked identity.
    blocks: int = 0


def _is_identity(up: torch.Tensor, down: torch.Tensor) -> bool:
    """Whether ``up`` is the identity of a full-rank file (:func:`lora_lab.lora.formats.full_rank`)."""
    n = up.shape[0]
    if up.shape[1] != n or down.shape[0] != n or up.numel() != n * n:
        return False
    flat = up.reshape(n, n)
    return bool(torch.count_nonzero(flat) == n and torch.all(flat.diagonal() == 1))


class SampleStrengths:
    """Each image of a batch at its own LoRA strength, and, with several LoRA files loaded side
    by side (:func:`eval_adapter`), each from its own file::

        with SampleStrengths(unet, te, [eval_adapter(0), eval_adapter(1)]) as s:
            s.set([0, 0.5, 1], [eval_adapter(0), eval_adapter(0), eval_adapter(1)])
            pipe(...)

    Every LoRA layer computes all its files in one batched low-rank product (as Punica's and
    S-LoRA's multi-adapter kernels do): the files' down weights stacked (R = the sum of their
    ranks), a per-sample scale on each of the R columns (the sample's strength x its file's
    alpha / rank on its own file's columns, 0 on the others), then the stacked up weights::

        y_i = W x_i + up(m_i * down(x_i)),   m_i = strength_i * alpha / rank on file_i's columns

    so the cost grows with the stacked rank, not with the number of files, and no batch is cut
    into one sub-batch per file. peft's own forward of those adapters is bypassed while the
    block is open (the layers run their base weights plus this product). With ``files`` (each
    file's weights placed on the layers by :func:`lora_lab.lora.kohya.placed_layers`) no peft
    adapter is needed at all: the hooks go on the model's own layers, and any peft adapter there
    (a training one, mid-training) is bypassed while the block is open. A strength-0 sample
    gets all-zero scales: exactly the base model's output. Text encoders and LoCon's conv
    layers included. A batch under classifier-free guidance runs the UNet on twice the samples
    (the negative prompts' half, then the prompts' half, in the same order); both halves get
    the same strengths and files.
    """

    def __init__(self, unet, text_encoder, adapters=(EVAL_ADAPTER,), files: Optional[List[dict]] = None):
        self.modules = tuple(modules_of(unet, text_encoder))
        self.adapters = list(adapters)
        # Without peft: each file's {layer: (down, up, alpha / rank)} (kohya.placed_layers),
        # named by ``adapters`` in order; None: the peft adapters ``adapters`` name.
        self.files = files
        if files is not None and len(files) != len(self.adapters):
            raise ValueError(f"{len(files)} files but {len(self.adapters)} names for them")
        self._files = torch.zeros(0, dtype=torch.long)
        self._strengths = torch.zeros(0)
        self._scales: Dict[tuple, torch.Tensor] = {}
        self._stacks: Dict[torch.nn.Module, _Stack] = {}
        self._handles: list = []
        self._bypassed: List[torch.nn.Module] = []
        self._paused = None  # LyCORIS training networks unwrapped while the files render

    def set(self, strengths, adapters=None) -> None:
        """Strength (and adapter name; default: the first adapter) of each sample in order."""
        names = list(adapters) if adapters is not None else [self.adapters[0]] * len(strengths)
        unknown = [n for n in names if n not in self.adapters]
        if unknown:
            raise LoraLabError(f"LoRA file {unknown[0]!r} is not among the files loaded side by side "
                               f"({', '.join(self.adapters)})")
        self._files = torch.tensor([self.adapters.index(n) for n in names], dtype=torch.long)
        self._strengths = torch.tensor([float(s) for s in strengths], dtype=torch.float32)
        self._scales.clear()

    @staticmethod
    def _per_sample(values, n: int, what: str):
        k = len(values)
        if n == k:
            return values
        if n == 2 * k:
            return values + values if isinstance(values, list) else torch.cat([values, values])
        raise RuntimeError(f"LoRA {what} for {k} samples, but a layer saw a batch of {n}")

    def _scale(self, stack: _Stack, n: int, device, dtype) -> torch.Tensor:
        """(n, R): each sample's scale on each stacked column; shared by layers of one layout."""
        key = (stack.columns, n, device, dtype)
        found = self._scales.get(key)
        if found is None:
            files = self._per_sample(self._files, n, "strengths")
            strengths = self._per_sample(self._strengths, n, "strengths")
            owner = torch.tensor([f for f, r, _ in stack.columns for _ in range(r)], dtype=torch.long)
            per_rank = torch.tensor([s for _, r, s in stack.columns for _ in range(r)], dtype=torch.float32)
            found = (files[:, None] == owner[None, :]) * strengths[:, None] * per_rank[None, :]
            found = self._scales[key] = found.to(device=device, dtype=dtype)
        return found

    def _hook(self, layer, args, output):
        stack = self._stacks[layer]
        x = args[0].to(stack.down.dtype)
        scale = self._scale(stack, x.shape[0], x.device, x.dtype)
        if stack.conv is None:
            low = F.linear(x, stack.down)
            low = low * scale.view(scale.shape[0], *([1] * (low.dim() - 2)), scale.shape[1])
            if stack.blocks:
                delta = low.unflatten(-1, (stack.blocks, -1)).sum(-2)
            else:
                delta = F.linear(low, stack.up)
        else:
            low = F.conv2d(x, stack.down, None, *stack.conv) * scale.view(*scale.shape, 1, 1)
            delta = low.unflatten(1, (stack.blocks, -1)).sum(1) if stack.blocks else F.conv2d(low, stack.up)
        return output + delta.to(output.dtype)

    def _peft_parts(self, layer, present: List[Tuple[int, str]]) -> Tuple[list, Optional[tuple]]:
        """(index, down, up, alpha / rank) of each peft adapter on ``layer``, and its conv geometry."""
        parts, conv = [], None
        for index, name in present:
            if name in getattr(layer, "lora_variant", {}):
                raise LoraLabError("per-sample strengths apply to plain LoRA layers only")
            down, up = layer.lora_A[name], layer.lora_B[name]
            if not isinstance(down, (torch.nn.Linear, torch.nn.Conv2d)) or getattr(up, "bias", None) is not None:
                raise LoraLabError("per-sample strengths apply to plain LoRA layers only (linear and conv, no bias)")
            if isinstance(down, torch.nn.Conv2d):
                conv = (down.stride, down.padding, down.dilation, down.groups)
            layer.set_scale(name, 1.0)  # scaling = alpha / rank: the strength is the sample's own
            parts.append((index, down.weight, up.weight, float(layer.scaling[name])))
        return parts, conv

    @staticmethod
    def _stack(parts: list, conv: Optional[tuple]) -> _Stack:
        downs = [down for _, down, _, _ in parts]
        ups = [up for _, _, up, _ in parts]
        columns = tuple((index, down.shape[0], scale) for index, down, _, scale in parts)
        # One file: its own weights, no copy (a full-rank file is as big as the layers it touches).
        down = downs[0] if len(downs) == 1 else torch.cat(downs, dim=0)
        identity = all(_is_identity(u, d) for d, u in zip(downs, ups))
        up = ups[0] if len(ups) == 1 or identity else torch.cat(ups, dim=1)
        return _Stack(down, up, columns, conv, blocks=len(parts) if identity else 0)

    def __enter__(self) -> "SampleStrengths":
        from peft.tuners.lora import LoraLayer
        from peft.tuners.tuners_utils import BaseTunerLayer

        try:
            if self.files is not None:
                per_layer: Dict[torch.nn.Module, list] = {}
                for index, placed in enumerate(self.files):
                    for layer, (down, up, scale) in placed.items():
                        per_layer.setdefault(layer, []).append((index, down, up, scale))
                for layer, parts in per_layer.items():
                    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
                    conv = (base.stride, base.padding, 1, 1) if isinstance(base, torch.nn.Conv2d) else None
                    self._stacks[layer] = self._stack(parts, conv)
                    self._handles.append(layer.register_forward_hook(self._hook))
                self._paused = lycoris_net.paused(self.modules)
                self._paused.__enter__()
            for module in self.modules:
                for layer in module.modules():
                    if self.files is not None:  # no peft adapter renders, a training one included
                        if isinstance(layer, BaseTunerLayer) and not layer.disable_adapters:
                            layer.enable_adapters(False)
                            self._bypassed.append(layer)
                        continue
                    if not isinstance(layer, LoraLayer):
                        continue
                    present = [(i, a) for i, a in enumerate(self.adapters) if a in layer.lora_A]
                    if not present:
                        continue
                    self._stacks[layer] = self._stack(*self._peft_parts(layer, present))
                    if not layer.disable_adapters:
                        layer.enable_adapters(False)  # peft's forward runs the base weights only
                        self._bypassed.append(layer)
                    self._handles.append(layer.register_forward_hook(self._hook))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        for layer in self._bypassed:
            layer.enable_adapters(True)
        if self._paused is not None:
            self._paused.__exit__(None, None, None)
            self._paused = None
        self._handles.clear()
        self._bypassed.clear()
        self._stacks.clear()
        self._scales.clear()
