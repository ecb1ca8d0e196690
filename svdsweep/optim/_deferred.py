"""The sync-free step's deferred checks: a step undone on the device, read back later.

On an accelerator ``SVDGradient`` does not wait for the host to learn whether
a gradient was finite or a certificate held. Each step is run as if it were,
with its flags kept as device tensors (:class:`PendingStep`); a non-finite
step is undone with ``torch.where`` right after the base step, and
:class:`DeferredChecks` reads all the flags of the last N steps back in one
transfer. The wrapper then acts on what the read says (counters, cold
restarts, the error).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from svdsweep.optim._gradient_checks import NonFiniteGradientError

#: Steps between host reads of the deferred checks when parameters live on an
#: accelerator (``sync_every=None``); on the CPU a read costs nothing, so every step.
DEFAULT_SYNC_EVERY_ON_ACCELERATORS = 16


class PendingStep:
    """A sync-free step's device-side flags, and how to undo the step on the host side."""

    def __init__(self, finite: Tensor, certificates: dict[int, Tensor]) -> None:
        self.finite = finite
        self.certificates = certificates
        self.host_counters: list[tuple[Tensor, Tensor]] = []
        self.fresh: list[Tensor] = []
        self.base_state: dict[Any, Any] = {}

    def snapshot(
        self, params: list[Tensor], base_state: dict[Any, Any], device: torch.device
    ) -> list[tuple[Tensor, Tensor]]:
        """Copies of the parameters and their device state tensors; host ones kept aside."""
        copies = [(param, param.detach().clone()) for param in params]
        self.fresh = [param for param in params if not base_state.get(param)]
        self.base_state = base_state
        for param in params:
            for value in base_state.get(param, {}).values():
                if not isinstance(value, Tensor):
                    continue
                if value.device == device:
                    copies.append((value, value.clone()))
                else:
                    self.host_counters.append((value, value.clone()))
        return copies

    def restore_unless_finite(self, snapshot: list[tuple[Tensor, Tensor]]) -> None:
        for tensor, before in snapshot:
            if tensor.shape == before.shape:
                tensor.data.copy_(torch.where(self.finite, tensor.data, before))
        # State the step created from nothing goes back to zeros, which every torch
        # optimizer treats like fresh state (Adam: step 0, zero moments).
        for param in self.fresh:
            for value in self.base_state.get(param, {}).values():
                if isinstance(value, Tensor) and value.device == self.finite.device:
                    value.copy_(torch.where(self.finite, value, torch.zeros_like(value)))

    def undo_host_counters(self) -> None:
        for tensor, before in self.host_counters:
            tensor.copy_(before)


def guarded_step(
    step: Callable[[], Any],
    finite: Tensor,
    certificates: dict[int, Tensor],
    params: list[Tensor],
    base_state: dict[Any, Any],
    device: torch.device,
) -> PendingStep:
    """Runs the base ``step`` and undoes it on the device unless ``finite`` holds."""
    pending = PendingStep(finite, certificates)
    snapshot = pending.snapshot(params, base_state, device)
    step()
    pending.restore_unless_finite(snapshot)
    return pending


@dataclass
class DeferredRead:
    """What one read of the deferred flags found.

    ``certified`` and ``uncertified`` count projected matrices of finite steps
    by whether their certificate reached the target; ``restart`` holds the
    ``id`` of each parameter whose basis is to start cold again.
    """

    steps: int = 0
    bad_steps: int = 0
    certified: int = 0
    uncertified: int = 0
    restart: set[int] = field(default_factory=set)

    def nonfinite_error(self, sync_every: int) -> NonFiniteGradientError:
        return NonFiniteGradientError(
            f"non-finite gradient (NaN or inf) in {self.bad_steps} of the last "
            f"{self.steps} steps (sync_every={sync_every}); those steps "
            "changed neither parameters nor optimizer state. Lower the learning "
            "rate, or pass nonfinite='skip' to skip such steps"
        )


class DeferredChecks:
    """The pending steps of the sync-free mode, and their one host read."""

    def __init__(self) -> None:
        self.pending: list[PendingStep] = []

    def __len__(self) -> int:
        return len(self.pending)

    def append(self, step: PendingStep) -> None:
        self.pending.append(step)

    def clear(self) -> None:
        self.pending = []

    def read(self, target: float) -> DeferredRead:
        """Reads every flag and certificate back at once; undoes bad steps' host counters.

        ``target`` is the certified fraction a certificate must reach.
        """
        pending, self.pending = self.pending, []
        if not pending:
            return DeferredRead()
        certified = [(step, param_id) for step in pending for param_id in step.certificates]
        read = torch.cat(
            [
                torch.stack([step.finite.double() for step in pending]),
                torch.stack([step.certificates[param_id].double() for step, param_id in certified])
                if certified
                else torch.zeros(0, dtype=torch.float64, device=pending[0].finite.device),
            ]
        ).tolist()  # the one host read
        finite = dict(
            zip(map(id, pending), (flag == 1.0 for flag in read[: len(pending)]), strict=True)
        )
        result = DeferredRead(steps=len(pending))
        for (step, param_id), value in zip(certified, read[len(pending) :], strict=True):
            if not finite[id(step)]:
                continue  # undone: its certificate certifies nothing
            if value < target:
                result.uncertified += 1
                result.restart.add(param_id)
            else:
                result.certified += 1
        for step in pending:
            if not finite[id(step)]:
                step.undo_host_counters()
                result.bad_steps += 1
        return result


def steps_between_reads(sync_every: int | None, params: Iterable[Tensor]) -> int:
    """``sync_every`` as given, else by where the (first) parameter lives."""
    if sync_every is not None:
        return sync_every
    first = next(iter(params), None)
    on_accelerator = first is not None and first.device.type != "cpu"
    return DEFAULT_SYNC_EVERY_ON_ACCELERATORS if on_accelerator else 1
