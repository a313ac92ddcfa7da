"""One training batch split across processes: per-sample random draws and statistics of the global batch.

Every random draw of the models, losses and transport comes from a :class:`SampleRandom` (one path; none of them
takes a ``torch.Generator``): the trainers key it by (seed, step, global position), other callers by what
identifies their samples (e.g. the latent cache by (seed, dataset index)). It depends on nothing in maetok, so it
sits in the base layer. Only sampling (the samplers' noise, ``maetok.diffusion.generator``, the diffusers wrapper)
and evaluation keep a ``torch.Generator``, as the ecosystem passes one.

Under ``torchrun`` each process holds a slice of the global batch (sample ``i`` of rank ``r`` sits at global
position ``r * B_local + i``). Two rules make a run on W processes equal (to float rounding) to a 1-process run
at the same global batch, and make a resumed run draw what the uninterrupted one drew:

* **Per-sample draws.** Every random number a training step draws for a sample (mask ratio and mask order,
  flip, VAE posterior noise, DiffAugment, label dropout, diffusion time and noise) is a pure function of
  ``(seed, step, stream name, the sample's global position, element index)``: :class:`SampleRandom`, a
  counter-based hash (no generator state), vectorised over the batch and drawn on the tensor's device.
* **Global statistics.** Means over a varying number of items (masked tokens, caption tokens), running means
  (LeCAM), gradient norms (the adaptive GAN weight) and the discriminator's gradients are reduced over all
  processes (:func:`global_sum`, :func:`global_weighted_mean`, :func:`average_gradients`). Without an
  initialised process group these are the identity.

The hash is Chris Wellons' ``triple32`` on 32-bit words held in int64 tensors; every product stays below
``2**63`` (no overflow on any device), so the integers drawn are the same on CPU and GPU. Uniforms are
``bits >> 8`` times ``2**-24`` (exact in float32); normals use Box-Muller in float64.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import Tensor

MASK32 = 0xFFFFFFFF
_TRIPLE32 = ((17, 0xED5AD4BB), (11, 0xAC4C1B51), (15, 0x31848BAB))  # (shift before, multiplier); final shift 14


def _mul32_(x: Tensor, constant: int) -> Tensor:
    """In place: ``x * constant mod 2**32`` for ``x`` in ``[0, 2**32)``, every product below ``2**63``."""
    if constant < 2**31:
        return x.mul_(constant).bitwise_and_(MASK32)
    low_bit = (x & 1).bitwise_left_shift_(31)  # (x * 2**31) mod 2**32
    return x.mul_(constant - 2**31).add_(low_bit).bitwise_and_(MASK32)


def hash32(x: Tensor) -> Tensor:
    """``triple32``: a bijection of 32-bit words (int64 tensor, values in ``[0, 2**32)``) with strong avalanche."""
    x = x.clone()
    for shift, constant in _TRIPLE32:
        _mul32_(x.bitwise_xor_(x >> shift), constant)
    return x.bitwise_xor_(x >> 14)


def _words(value: int) -> list[int]:
    """A Python int (any sign, up to 64 bits) as two 32-bit words."""
    value &= 0xFFFFFFFFFFFFFFFF
    return [value & MASK32, value >> 32]


def stream_word(name: str) -> int:
    """The 32-bit word naming a stream of draws (FNV-1a of the characters: plain Python, so that
    ``torch.compile`` folds it into a constant)."""
    word = 0x811C9DC5
    for char in name:
        word = ((word ^ ord(char)) * 0x01000193) & MASK32
    return word


def _fold(keys: Tensor, words: Iterable[int]) -> Tensor:
    for word in words:
        keys = hash32(keys ^ word)
    return keys


class SampleRandom:
    """Random draws for a batch, one independent stream per sample, keyed by ``(seed, step, global index)``.

    ``sample_index``: ``(B,)`` the samples' positions in the global batch. Each draw names its stream
    (``"flip"``, ``"mask_order"``, ...): the same name at the same step gives the same numbers, different names
    independent ones; :meth:`child` derives a namespace (e.g. one per DiffAugment call). Every method returns
    ``(B, *shape)``; ``device``: where the numbers are computed (integers and uniforms are identical on every
    device).
    """

    def __init__(self, seed: int, step: int, sample_index: Union[Tensor, Sequence[int]]):
        index = torch.as_tensor(sample_index, dtype=torch.int64)
        if index.dim() != 1:
            raise ValueError(f"sample_index must be (B,) positions in the global batch, got shape {tuple(index.shape)}")
        if bool((index < 0).any()) or bool((index > MASK32).any()):
            raise ValueError("sample_index must lie in [0, 2**32)")
        self.seed, self.step = int(seed), int(step)
        base = _fold(torch.zeros((), dtype=torch.int64), [0x6D61_6574] + _words(self.seed) + _words(self.step))
        self.keys = hash32(base ^ hash32(index))  # (B,)

    @classmethod
    def for_batch(cls, seed: int, step: int, batch_size: int, offset: int = 0) -> "SampleRandom":
        """Samples at global positions ``offset .. offset + batch_size - 1``."""
        return cls(seed, step, torch.arange(offset, offset + batch_size))

    def __len__(self) -> int:
        return self.keys.shape[0]

    def child(self, name: str) -> "SampleRandom":
        """An independent namespace of streams (same samples)."""
        out = object.__new__(SampleRandom)
        out.seed, out.step = self.seed, self.step
        out.keys = _fold(self.keys, [stream_word(name)])
        return out

    # -- draws -------------------------------------------------------------------------------------------

    def bits(self, stream: str, shape: Sequence[int] = (), device: Optional[torch.device] = None) -> Tensor:
        """Uniform 32-bit integers ``(B, *shape)`` int64 in ``[0, 2**32)``."""
        shape = tuple(shape)
        keys = _fold(self.keys.to(device if device is not None else 'cpu'), [stream_word(stream)])
        numel = math.prod(shape)
        counters = hash32(torch.arange(numel, dtype=torch.int64, device=keys.device))  # (numel,), shared
        return hash32(keys[:, None] ^ counters[None, :]).view(len(self), *shape)

    def uniform(self, stream: str, shape: Sequence[int] = (), device: Optional[torch.device] = None) -> Tensor:
        """Uniform float32 ``(B, *shape)`` in ``[0, 1)`` (24-bit resolution, exact on every device)."""
        return (self.bits(stream, shape, device) >> 8).to(torch.float32) * 2.0**-24

    def integers(
        self, stream: str, low: int, high: int, shape: Sequence[int] = (), device: Optional[torch.device] = None
    ) -> Tensor:
        """Uniform integers ``(B, *shape)`` int64 in ``[low, high)`` (multiply-shift of 32-bit draws)."""
        span = high - low
        if not 0 < span < 2**31:
            raise ValueError(f"need low < high with high - low < 2**31, got [{low}, {high})")
        return ((self.bits(stream, shape, device) * span) >> 32) + low

    def normal(
        self,
        stream: str,
        shape: Sequence[int] = (),
        device: Optional[torch.device] = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Standard normals ``(B, *shape)`` (Box-Muller in float64 on pairs of 32-bit draws, then ``dtype``)."""
        shape = tuple(shape)
        numel = math.prod(shape)
        pairs = (numel + 1) // 2
        words = self.bits(stream, (pairs, 2), device).to(torch.float64)
        radius = torch.sqrt(-2.0 * torch.log((words[..., 0] + 1.0) * 2.0**-32))  # (B, pairs), u in (0, 1]
        angle = words[..., 1] * (2.0 * math.pi * 2.0**-32)
        z = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)[:, :numel]
        return z.to(dtype).reshape(len(self), *shape)


def require_draws(draws: Optional[SampleRandom], batch_size: int, what: str) -> SampleRandom:
    """``draws`` checked against a batch of ``batch_size``: the one check of every function that draws random
    numbers (``what`` names it in the message). None, a ``torch.Generator`` or draws over another batch size
    raise ``ValueError``."""
    if not isinstance(draws, SampleRandom):
        given = "none were given" if draws is None else f"got a {type(draws).__name__}"
        raise ValueError(f"{what} draws random numbers and needs draws=maetok.global_batch.SampleRandom over the "
                         f"batch ({given}), e.g. SampleRandom.for_batch(seed, step, {batch_size})")
    if len(draws) != batch_size:
        raise ValueError(f"SampleRandom holds {len(draws)} samples, the batch has {batch_size}")
    return draws


# ---------------------------------------------------------------------------------------------------------
# Statistics of the global batch
# ---------------------------------------------------------------------------------------------------------


def distributed() -> bool:
    """Whether a process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if distributed() else 1


def global_sum(value: Tensor) -> Tensor:
    """The sum of ``value`` (detached) over all processes; ``value`` itself with one process."""
    if not distributed():
        return value.detach()
    total = value.detach().clone()
    dist.all_reduce(total)
    return total


def all_finite_everywhere(*values: Tensor) -> bool:
    """Whether every value is finite on every process (all processes then skip or step together)."""
    finite = torch.stack([torch.isfinite(v.detach().float()).all() for v in values]).all().float()
    return bool(global_sum(finite).item() == world_size())


def global_mean(value: Tensor) -> Tensor:
    """The mean of ``value`` (detached) over all processes (equal local batches: the global batch mean)."""
    if not distributed():
        return value.detach()
    return global_sum(value) / dist.get_world_size()


def global_weighted_mean(values: Tensor, weights: Tensor, empty: Optional[Tensor] = None) -> Tensor:
    """``sum(values * weights) / sum(weights)`` over the global batch, as this process's share.

    Returns ``W * local_sum / global_weight`` (W processes): its mean over the processes, which is what DDP's
    gradient averaging and the logged mean compute, is the global weighted mean. With no weight anywhere in the
    global batch it returns ``empty`` (default: zero with a graph to ``values``). No host sync."""
    weights = weights.to(values.dtype)
    local_sum = (values * weights).sum()
    total_weight = global_sum(weights.sum())
    share = world_size() * local_sum / total_weight.clamp_min(torch.finfo(values.dtype).tiny)
    fallback = values.sum() * 0.0 if empty is None else empty
    return torch.where(total_weight > 0, share, fallback)


def average_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Average ``.grad`` of ``parameters`` over all processes in one flat all-reduce (what DDP does for a
    module it wraps); a missing gradient counts as zero. No-op with one process."""
    if not distributed():
        return
    params = list(parameters)
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Copy every parameter and buffer of ``module`` from process ``src`` (as DDP does when it wraps one)."""
    if not distributed():
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src)
