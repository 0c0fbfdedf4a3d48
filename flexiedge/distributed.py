"""Where the recovery loop runs: one device (plain PyTorch) or many processes through accelerate + FSDP2.

The loop in recover.py calls the same few methods either way (backward, clip, step, mean, save-gather).
FSDP rule of the method: a base block and every slot that reuses its Parameters form ONE FSDP unit
(`fully_shard([base, *slots])`), so a shared weight is gathered once and its gradient reduced once. The
groups come from the plan's slot map (module names), never from comparing tensor addresses.

    accelerate launch --config_file flexiedge/configs/fsdp.yaml --num_processes N -m flexiedge recover RUN ...
"""

from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist

from .plan import Plan


def share_groups(plan: Plan) -> list[list[int]]:
    """Stack positions grouped into FSDP units: [base, *its slots] per shared base, [p] for every other layer."""
    slots_of: dict[int, list[int]] = {}
    for position in plan.slots:
        slots_of.setdefault(plan.layers[position].shares, []).append(position)
    in_group = {p for base, slots in slots_of.items() for p in (base, *slots)}
    groups = [[base, *slots] for base, slots in sorted(slots_of.items())]
    groups += [[p] for p in range(len(plan.layers)) if p not in in_group]
    return sorted(groups, key=lambda g: min(g))


class Single:
    """One device, a plain PyTorch loop: fp32 on the CPU, autocast (bf16, or fp16 with loss scaling) on a GPU."""
    rank, world_size, is_main = 0, 1, True

    def __init__(self):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.autocast_dtype = None
        self.scaler = None

    def prepare(self, session) -> None:
        from .recover import autocast_dtype

        session.parallel = self
        session.model.to(self.device)  # Module.to keeps shared Parameters shared (it updates .data in place)
        self.autocast_dtype = autocast_dtype(session.config, self.device)
        fp16 = self.autocast_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=fp16) if fp16 else None
        self._optimizer = session.optimizer

    def backward(self, loss) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def clip_grad_norm(self, params, max_norm: float) -> None:
        if self.scaler:
            self.scaler.unscale_(self._optimizer)
        torch.nn.utils.clip_grad_norm_(params, max_norm)

    def optimizer_step(self, optimizer) -> None:
        if self.scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

    def mean(self, value: float) -> float:
        return value

    def full_model(self, session):
        return session.model

    def full_optimizer_state(self, session) -> dict:
        return dict(optimizer=session.optimizer.state_dict(), scaler=self.scaler.state_dict() if self.scaler else None)

    def load_optimizer(self, session, state: dict) -> None:
        session.optimizer.load_state_dict(state["optimizer"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def barrier(self) -> None:
        pass


class Parallel(Single):
    """Many processes: accelerate's Accelerator with its FSDP2 plugin; we only choose the FSDP units."""

    def __init__(self):
        from accelerate import Accelerator

        self.accelerator = Accelerator()
        self.device = self.accelerator.device
        if not dist.is_initialized():  # CPU processes: accelerate's state is single-process, use gloo directly
            dist.init_process_group("gloo")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.autocast_dtype = None  # accelerate's mixed_precision setting (MixedPrecisionPolicy) decides
        self.scaler = None

    @staticmethod
    def from_environment():
        """accelerate + FSDP when launched on several processes (WORLD_SIZE > 1), else one device."""
        return Parallel() if int(os.environ.get("WORLD_SIZE", "1")) > 1 else Single()

    def prepare(self, session) -> None:
        from .recover import make_optimizer

        session.parallel = self
        names = list(session.trainable)
        # The main process keeps an unsharded CPU copy to write the compact checkpoint from.
        self.master = copy.deepcopy(session.model) if self.is_main else None
        fsdp = getattr(self.accelerator.state, "fsdp_plugin", None)
        shard_shared_groups(session.model, session.plan, fsdp)
        if fsdp is None:
            # accelerate has no FSDP on CPU processes (its MULTI_CPU type would wrap DDP): shard the root the
            # same way accelerate does on GPUs, so the gloo test exercises the same FSDP2 units.
            from torch.distributed.fsdp import fully_shard
            fully_shard(session.model)
        # FSDP replaced the Parameters by sharded ones: build the optimizer on those, let accelerate wrap it.
        params = dict(session.model.named_parameters())
        session.trainable = {n: params[n] for n in names}
        optimizer, session.scheduler = make_optimizer(session.trainable, session.config, session.total_steps)
        if fsdp is None:
            session.optimizer = optimizer
        else:
            session.model, session.optimizer = self.accelerator.prepare(session.model, optimizer)
        params = dict(session.model.named_parameters())
        session.trainable = {n: params[n] for n in names}

    def backward(self, loss) -> None:
        self.accelerator.backward(loss)

    def clip_grad_norm(self, params, max_norm: float) -> None:
        if getattr(self.accelerator.state, "fsdp_plugin", None) is None:
            torch.nn.utils.clip_grad_norm_(params, max_norm)  # DTensor-aware: one global norm
        else:
            self.accelerator.clip_grad_norm_(params, max_norm)

    def optimizer_step(self, optimizer) -> None:
        optimizer.step()

    def mean(self, value: float) -> float:
        tensor = torch.tensor(value, device=self.device)
        dist.all_reduce(tensor)
        return float(tensor) / self.world_size

    def full_model(self, session):
        """All processes gather the trained tensors; the main one copies them into its unsharded model."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(session.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.is_main:
            return None
        master = dict(self.master.named_parameters())
        with torch.no_grad():
            for name in session.trainable:
                master[name].copy_(full[name])
        return self.master

    def full_optimizer_state(self, session) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return dict(optimizer=get_optimizer_state_dict(session.model, _unwrap(session.optimizer), options=options))

    def load_optimizer(self, session, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(session.model, _unwrap(session.optimizer), state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))

    def barrier(self) -> None:
        dist.barrier()


def _unwrap(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one


def shard_shared_groups(model, plan: Plan, fsdp=None) -> None:
    """fully_shard each base block together with its slots (one unit), and every other layer alone.

    accelerate then shards only what is left (embeddings, final norm and head, the root) and skips
    modules that are already FSDP units.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = dict(reshard_after_forward=fsdp.reshard_after_forward if fsdp else True,
                  mp_policy=(fsdp.mixed_precision_policy if fsdp else None) or MixedPrecisionPolicy())
    layers = model.model.layers
    for group in share_groups(plan):
        modules = [layers[p] for p in group]
        fully_shard(modules if len(modules) > 1 else modules[0], **kwargs)
