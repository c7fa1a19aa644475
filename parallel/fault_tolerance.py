"""Fault-tolerant replica groups (torchft): the replicate dim of HSDP managed across processes
that may die and come back, while each replica group shards (FSDP2), pipelines and splits
tensors inside itself as usual.

Rule: takes explicit parts (the model chunks, the optimizer, named states with `state_dict()`,
the step as a getter and a setter), never a config or the launcher. Each replica group is its
own torch world (its own torchrun); group rank i of every replica talks to group rank i of the
others through torchft's reconfigurable gloo/NCCL group, the one torchft's Manager rebuilds
whenever the lighthouse forms a new quorum.

torchft 0.2.0's composition with FSDP2 (its fsdp_test.py, TorchTitan's FT): FSDP2 shards over
the group's own 1-D mesh and `set_all_reduce_hook` averages every reduce-scattered gradient
shard across the replicas; the shards line up because every group has the same layout.
"""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

LOAD_TIMEOUT = timedelta(seconds=60)


class LighthouseLost(RuntimeError):
    """The lighthouse (or the quorum) stopped answering: no step can be agreed any more."""


def start_lighthouse(
    bind: str,
    min_replicas: int,
    join_timeout_ms: int = 10_000,
    quorum_tick_ms: int = 10,
    heartbeat_timeout_ms: int = 3000,
) -> Any:
    """Start torchft's lighthouse in this process (a Rust server on its own threads); returns
    it (`.address()`, `.shutdown()`)."""
    from torchft._torchft import LighthouseServer

    return LighthouseServer(
        bind=bind,
        min_replicas=min_replicas,
        join_timeout_ms=join_timeout_ms,
        quorum_tick_ms=quorum_tick_ms,
        heartbeat_timeout_ms=heartbeat_timeout_ms,
    )


def _local(x: Any) -> Any:
    """Tensors as this rank's plain local shards (what a peer with the same layout holds)."""
    if isinstance(x, DTensor):
        return x.to_local().detach().clone()
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _local(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return type(x)(_local(v) for v in x)
    return x


@dataclass
class ReplicaParts:
    """What a replica hands a healing peer, and takes from one."""

    modules: list[torch.nn.Module]
    optimizer: torch.optim.Optimizer
    states: Mapping[str, Stateful]
    get_step: Callable[[], int]
    set_step: Callable[[int], None]

    def params(self) -> list[torch.nn.Parameter]:
        """Every parameter of every chunk, in a fixed order."""
        return [p for m in self.modules for p in m.parameters()]

    def state_dict(self) -> dict[str, Any]:
        """Weights, optimizer moments, states and step, as plain local tensors and numbers."""
        return {
            "params": [_local(p) for p in self.params()],
            "optimizer": _local(self.optimizer.state_dict()),
            "states": {k: _local(s.state_dict()) for k, s in self.states.items()},
            "step": self.get_step(),
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take a peer's state_dict(): copy weights in place, rebuild the moments as DTensors
        laid out like their parameters."""
        params = self.params()
        for p, value in zip(params, state["params"], strict=True):
            (p.to_local() if isinstance(p, DTensor) else p).copy_(value)
        optim = state["optimizer"]
        # the optimizer numbers parameters in its param groups' order, not the modules'
        by_index = [p for group in self.optimizer.param_groups for p in group["params"]]
        for index, moments in optim["state"].items():
            p = by_index[int(index)]
            if not isinstance(p, DTensor):
                continue
            for key, value in moments.items():
                if value.shape == p.to_local().shape and value.dim() > 0:
                    moments[key] = DTensor.from_local(
                        value, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
                    )
        self.optimizer.load_state_dict(optim)
        for key, s in self.states.items():
            s.load_state_dict(state["states"][key])
        self.set_step(int(state["step"]))


def _weights_only_transport(timeout: timedelta) -> Any:
    """torchft's HTTP checkpoint transport, but what a healing rank receives is read with
    torch's weights-only unpickler (tensors, numbers, strings, containers; no code): torchft
    itself reads it with full pickle. ReplicaParts.state_dict() sends nothing else."""
    from torchft.checkpointing._serialization import _streaming_load
    from torchft.checkpointing.http_transport import HTTPTransport

    class WeightsOnlyHTTPTransport(HTTPTransport):
        @classmethod
        def _load_from_address(cls, address: str, timeout: timedelta) -> object:
            with urllib.request.urlopen(address, timeout=timeout.total_seconds()) as f:
                return _streaming_load(f, weights_only=True)

    return WeightsOnlyHTTPTransport(timeout=timeout, num_chunks=0)


class ReplicaGroup:
    """This rank's seat in a fault-tolerant replica group: quorum per step, gradients averaged
    over the live replicas, commit or retry, heal from a peer."""

    def __init__(
        self,
        parts: ReplicaParts,
        replica_id: int,
        min_replicas: int,
        lighthouse: str,
        timeout_s: float,
    ) -> None:
        """Start torchft's Manager for this rank (the group's TCPStore, MASTER_ADDR/PORT, must
        be up: init_process_group started it) and hook every FSDP2 module's gradients."""
        from torchft.manager import Manager
        from torchft.process_group import ProcessGroupGloo

        timeout = timedelta(seconds=timeout_s)
        self.parts = parts
        self.replica_id = replica_id
        self.manager = Manager(
            pg=ProcessGroupGloo(timeout=timeout),
            load_state_dict=parts.load_state_dict,
            state_dict=parts.state_dict,
            min_replica_size=min_replicas,
            # synchronous quorum: a healing group loads the peer's state before it draws its
            # batch, so it trains the same step as the others, not one batch behind
            use_async_quorum=False,
            timeout=timeout,
            quorum_timeout=timeout,
            connect_timeout=timeout,
            lighthouse_addr=lighthouse,
            replica_id=f"replica_{replica_id}",
            init_sync=False,  # every group draws the same initial weights from train.seed
            checkpoint_transport=_weights_only_transport(timeout),
        )
        self._manual: list[torch.nn.Parameter] = []
        for module in parts.modules:
            fsdp = [m for m in module.modules() if isinstance(m, FSDPModule)]
            for m in fsdp:
                m.set_all_reduce_hook(self._average)
            if not fsdp:  # no sharding inside the group: reduce after backward, by hand
                self._manual += [p for p in module.parameters() if p.requires_grad]

    def _average(self, grad: torch.Tensor) -> None:
        # across replicas, after FSDP2's reduce-scatter inside the group; waits so the
        # gradient is final before FSDP2 accumulates it (gloo runs it on this thread anyway)
        self.manager.allreduce(grad).wait()

    def start_step(self) -> None:
        """Join this step's quorum (healing from a peer if behind); LighthouseLost if it fails."""
        try:
            self.manager.start_quorum()
        except Exception as err:  # the Rust client's timeouts and connection errors
            text = str(err).splitlines()[0] if str(err) else type(err).__name__
            grpc = re.search(r'message: "([^"]*)"', text)  # tonic's Status: keep its message
            why = grpc.group(1) if grpc else text
            raise LighthouseLost(
                f"no quorum from the lighthouse within fault_tolerance.timeout_s: {why}"
            ) from err

    def finish_backward(self) -> None:
        """Average gradients FSDP2 did not hook (a group without sharding)."""
        for p in self._manual:
            if p.grad is not None:
                grad = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                self.manager.allreduce(grad).wait()

    def should_commit(self) -> bool:
        """True when enough replicas took part and none failed: apply the update. False: every
        rank of this group drops the step's gradients and runs it again."""
        return self.manager.should_commit()

    def participants(self) -> int:
        """Replica groups averaged in this step."""
        return self.manager.num_participants()

    def sync_step(self, step: int) -> None:
        """After a resume from disk: torchft counts steps as the trainer does."""
        self.manager.load_state_dict(
            {"step": step, "batches_committed": step * self.participants()}
        )

    def shutdown(self) -> None:
        """Stop the manager server and its threads."""
        self.manager.shutdown(wait=False)
