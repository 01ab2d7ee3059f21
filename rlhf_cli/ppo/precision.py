"""bf16 compute with fp32 master weights (``PPOConfig.precision="bf16"``).

The scheme of DeepSpeed's and Megatron's bf16 optimisers: the language model holds bfloat16 weights,
so every forward and backward pass (generation, the no-gradient scoring passes, the reference,
each mini-batch) runs in bfloat16 with no autocast; the optimiser holds a float32 copy (the
*master*) of every trainable bfloat16 weight and float32 Adam moments. One optimiser step:

1. each bfloat16 gradient is cast to float32 into its master's ``.grad``;
2. the wrapped optimiser (Adam) steps the masters;
3. each master is copied back into its bfloat16 weight, rounded to nearest.

Small updates (lr × Adam direction ≈ 1e-5 of a weight) would round away in bfloat16 (8 bits of
mantissa) and learning would stall; in the masters they accumulate. The value head stays float32
(see :class:`rlhf_cli.models.value_head.ValueHead`): its parameters are their own masters.
Log-probabilities, KL, advantages and losses are computed in float32 from the bfloat16 logits
(:mod:`rlhf_cli.algo.functional` upcasts half-precision inputs).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from rlhf_cli.algo.names import AUTO_PRECISION, PRECISIONS



def cpu_supports_bf16() -> bool:
    """Whether this CPU runs bfloat16 matmuls natively enough for oneDNN's bf16 kernels (AVX-512 or
    AMX); elsewhere PyTorch would emulate bfloat16 far slower than float32."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


# /proc/cpuinfo flags of native bfloat16 arithmetic (AVX-512 BF16, AMX): with either, oneDNN's bf16
# kernels beat float32; plain AVX-512 runs bfloat16 (cpu_supports_bf16) but no faster than float32.
FAST_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(path: str = "/proc/cpuinfo") -> Optional[set[str]]:
    """The CPU's feature flags (Linux), or None where /proc/cpuinfo cannot be read."""
    try:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def bf16_is_fast(device_type: str) -> bool:
    """Whether ``device_type`` computes bfloat16 faster than float32: a CUDA GPU with bfloat16
    (Ampere or newer), a CPU with AVX-512 BF16 or AMX (without /proc/cpuinfo: oneDNN's own check)."""
    if device_type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device_type != "cpu":
        return False
    flags = cpu_flags()
    if flags is None:
        return cpu_supports_bf16()
    return any(flag in flags for flag in FAST_BF16_CPU_FLAGS)


def resolve_precision(requested: str, device_type: str, saved: Optional[str] = None) -> tuple[str, Optional[str]]:
    """``ppo.precision`` as the run will use it, and a one-line notice (None when there is nothing to say).

    ``auto`` becomes ``bf16`` where :func:`bf16_is_fast` and ``fp32`` elsewhere, with a notice. A
    resumed run (``saved``: the precision its checkpoint's config records, already resolved) keeps
    the checkpoint's precision, so a resumed run never silently changes precision with the machine;
    the launch checks then refuse bf16 on a device that cannot run it. Any other value is returned as is.
    """
    if requested != AUTO_PRECISION:
        return requested, None
    machine = "bf16" if bf16_is_fast(device_type) else "fp32"
    if saved is not None and saved != AUTO_PRECISION:
        return saved, None if saved == machine else (
            f"ppo.precision=auto: resuming in {saved}, the precision the checkpoint was trained in (a fresh run "
            f"here would use {machine}).")
    if machine == "bf16":
        return "bf16", None
    what = "CPU has no AVX-512 BF16 or AMX" if device_type == "cpu" else f"{device_type} device has no fast bfloat16"
    return "fp32", (f"ppo.precision=auto: training in fp32, since this {what} (bf16 would be emulated, "
                    "far slower); set ppo.precision=fp32 to silence this.")


class MasterWeightOptimizer(torch.optim.Optimizer):
    """An optimiser whose parameters are float32 masters of the model's bfloat16 weights.

    ``inner`` was built on the model's parameters; :func:`with_master_weights` swaps its parameter
    references for the masters before the model is cast, so any torch optimiser (and an LR
    scheduler built on it) works unchanged. ``param_groups`` and ``state`` are the inner
    optimiser's: learning-rate schedules and Adam moments live there, in float32.

    ``torch.optim.Optimizer.__init__`` is not called on purpose: this object owns no parameter
    groups of its own (it subclasses Optimizer so Accelerate and LR schedulers accept it).
    """

    def __init__(self, inner: torch.optim.Optimizer, pairs: list[tuple[Tensor, Tensor]]) -> None:
        self.inner = inner
        # (bfloat16 model weight, float32 master) for every weight that has a separate master.
        self.pairs = pairs

    # The inner optimiser's groups and state are this optimiser's.
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.inner.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.inner.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.inner.state

    @state.setter
    def state(self, value: Any) -> None:
        self.inner.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.inner.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.inner.defaults = value

    # Step hooks are the inner optimiser's: they run around the masters' update (before the copy back).
    def register_step_pre_hook(self, hook: Callable[..., Any]) -> Any:  # type: ignore[override]
        return self.inner.register_step_pre_hook(hook)

    def register_step_post_hook(self, hook: Callable[..., Any]) -> Any:  # type: ignore[override]
        return self.inner.register_step_post_hook(hook)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:  # type: ignore[override]
        """Steps 1–3 of the module docstring. A weight without a gradient leaves its master's
        gradient unset, so the inner optimiser skips it as it would have skipped the weight."""
        if closure is not None:
            raise ValueError("precision=bf16 does not support optimiser closures (LBFGS-style); use Adam or SGD.")
        for weight, master in self.pairs:
            master.grad = None if weight.grad is None else weight.grad.to(torch.float32)
        self.inner.step()
        for weight, master in self.pairs:
            weight.copy_(master)  # round to nearest bfloat16
            master.grad = None  # the float32 gradient copy is not needed between steps
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the model weights' gradients (the masters' are cleared after each step)."""
        for group in self.inner.param_groups:
            for param in group["params"]:
                param.grad = None
        for weight, _ in self.pairs:
            if set_to_none:
                weight.grad = None
            elif weight.grad is not None:
                weight.grad.zero_()

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The inner optimiser's state (float32 moments) plus the float32 masters: together with the
        step counters, what an exact continuation needs (the bfloat16 weights are the masters rounded)."""
        return {"inner": self.inner.state_dict(), "masters": [master.detach().clone() for _, master in self.pairs]}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        if set(state_dict) != {"inner", "masters"}:
            raise ValueError(
                "This optimiser state was not saved in precision=bf16 (it has no float32 master weights); resume "
                "with the precision the checkpoint was made with."
            )
        masters = state_dict["masters"]
        if len(masters) != len(self.pairs):
            raise ValueError(f"The saved state has {len(masters)} master weights; this model has {len(self.pairs)}.")
        for (weight, master), saved in zip(self.pairs, masters):
            master.copy_(saved)
            weight.copy_(master)
        self.inner.load_state_dict(state_dict["inner"])

    def __repr__(self) -> str:
        return f"MasterWeightOptimizer({self.inner!r}, {len(self.pairs)} bf16 weights with fp32 masters)"


def with_master_weights(optimizer: torch.optim.Optimizer, language_model: nn.Module) -> MasterWeightOptimizer:
    """Cast ``language_model`` to bfloat16 and return ``optimizer`` stepping float32 masters of its weights.

    ``optimizer`` must not have stepped yet (its state would belong to the old parameters). The masters
    are the weights' float32 tensors from *before* the cast, so a float32 checkpoint keeps all its bits.
    Frozen weights (a shared or LoRA base) are cast too: they compute in bfloat16 but never update.
    Parameters outside ``language_model`` (the float32 value head) are optimised directly.
    """
    if any(optimizer.state.values()):
        raise ValueError("precision=bf16 needs an optimiser that has not stepped yet (its state would be lost).")
    in_model = {id(p) for p in language_model.parameters()}
    pairs: list[tuple[Tensor, Tensor]] = []
    for group in optimizer.param_groups:
        for i, param in enumerate(group["params"]):
            if id(param) in in_model:
                # The weight's own float32 storage becomes the master (no copy: a copy would hold the
                # model in float32 twice while it is cast, the peak of the process's memory); `.data`
                # so that Adam's in-place updates of the master do not bump the weight's version.
                master = param.data if param.dtype == torch.float32 else param.detach().to(torch.float32)
                group["params"][i] = master
                pairs.append((param, master))
    language_model.to(torch.bfloat16)  # in place: `param` objects stay the module's parameters, now bf16
    return MasterWeightOptimizer(optimizer, pairs)


def apply_precision(
    precision: str, optimizer: torch.optim.Optimizer, model: nn.Module, ref_model: Optional[nn.Module]
) -> torch.optim.Optimizer:
    """The trainer's one hook: for ``"bf16"``, the policy's language model and the reference's become
    bfloat16 and ``optimizer`` steps float32 masters; for ``"fp32"``, everything is returned unchanged.

    ``model`` and ``ref_model`` are value-head wrappers (their ``pretrained_model`` is cast; the value
    heads stay float32). Called before Accelerate prepares the model, so DDP sees bfloat16 parameters
    and all-reduces bfloat16 gradients.
    """
    if precision == "fp32":
        return optimizer
    if precision != "bf16":
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}.")
    if ref_model is not None:  # first: its float32 weights are freed before the policy's are cast
        ref_model.pretrained_model.to(torch.bfloat16)  # frozen: no masters, bfloat16 forward passes
    return with_master_weights(optimizer, model.pretrained_model)
