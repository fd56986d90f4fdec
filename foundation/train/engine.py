"""The DeepSpeed engine: the only module of ``foundation`` that imports ``deepspeed``.

Every run goes through DeepSpeed, one process included. Process topology comes from the launcher's
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); a plain
``foundation pretrain`` without a launcher is a 1-process group on 127.0.0.1. Without a GPU the CPU
accelerator and the gloo backend are used; with CUDA, nccl.

Launch on N processes of one machine::

    torchrun --nproc_per_node N -m foundation.cli pretrain recipes/pretrain_small.yaml
    deepspeed --num_gpus N --module foundation.cli pretrain recipes/pretrain_small.yaml

Several nodes: a hostfile listing ``hostname slots=GPUS`` per line and passwordless ssh between the nodes, then
``deepspeed --hostfile hosts --module foundation.cli pretrain RECIPE.yaml`` (or ``torchrun --nnodes M
--node_rank K --rdzv_endpoint HOST:PORT ...`` on each node). The data shards and ``out_dir`` (checkpoints,
logs) must be on storage every node sees at the same path: all ranks write their part of a checkpoint into
the same directory and rank 0 commits it.

Precision (``engine.precision``, resolved by ``resolve_precision``): ``fp64`` trains a float64 model in float64
end to end (weights, gradients, their all-reduce, clipping, optimizer state, EMA, checkpoints; ZeRO 0 only:
DeepSpeed's ZeRO keeps float32 master partitions, and its all-reduce and clipping take float32 only, so this
module all-reduces and clips float64 gradients itself); ``fp32`` trains float32 weights (a float64 model is cast for
training and its export keeps the float64 config); ``bf16`` adds bf16 autocast to fp32 weights (also on CPU,
where it is slow but runs the same code path; tested there); ``auto`` is ``fp64`` for a float64 model and, for a
float32 model, ``bf16`` on GPUs that support it, ``fp32`` otherwise. Energies stay exact at every precision: the
model adds its float64 reference energies (E0) at the output and the labels are float64 (docs/precision.md).

Gradient normalisation: the loop computes each micro-batch's loss as (sum of errors) / (count of labelled
entries over all micro-batches of the step and all ranks) x world size; DeepSpeed averages gradients over
ranks and we disable its division by the accumulation steps, so the update equals that of one process
seeing the whole global batch, whatever the atom counts on each rank.
"""
from __future__ import annotations

import contextlib
import os
import socket

import torch

from .config import TrainConfig

# What a launcher (torchrun, deepspeed) sets and ``init_distributed`` sets for a group of one. A process that
# trained in-process and then starts another one must drop them from the child's environment (or the child joins
# a group whose port is taken): start children with ``env=child_environment()``.
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def child_environment(**extra: str) -> dict[str, str]:
    """This process's environment without ``LAUNCHER_VARIABLES``, plus ``extra``: for a child process that must
    start its own process group (a training subprocess of a benchmark, a test)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _skip_unused_ops() -> None:
    """Never load DeepSpeed's shared-memory all-reduce op (``deepspeed_shm_comm``).

    DeepSpeed's process group JIT-builds it in every process at start-up (1-3 min the first time) under a build
    lock that torch waits on without limit: a process killed during the build left the lock behind and every later
    run hung with no output. Its one use is ``inference_all_reduce`` (DeepSpeed inference); training reduces
    gradients with ``torch.distributed`` (gloo or nccl), and ``inference_all_reduce`` itself falls back to
    ``torch.distributed.all_reduce`` when the op is absent. So the builder returns None for any number of ranks:
    no build, no lock, on every accelerator."""
    import importlib
    ds_torch = importlib.import_module("deepspeed.comm.torch")   # ``deepspeed.comm.torch`` the attribute is torch

    def build_shm_op():
        return None

    ds_torch.build_shm_op = build_shm_op


def init_distributed(backend: str = "auto") -> tuple[int, int]:
    """Initialise the process group (once) and return (rank, world_size)."""
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    if "RANK" not in os.environ:  # not started by a launcher: a group of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))   # every one of LAUNCHER_VARIABLES is now set
    import deepspeed
    _skip_unused_ops()
    from deepspeed.accelerator import get_accelerator
    if backend == "auto":
        backend = "nccl" if get_accelerator().device_name() == "cuda" else "gloo"
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def _optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    o = config.optim
    cls = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}[o.name]
    return cls([p for p in model.parameters() if p.requires_grad], lr=o.lr, betas=tuple(o.betas), eps=o.eps,
               weight_decay=o.weight_decay, amsgrad=o.amsgrad)


def resolve_precision(precision: str, model_dtype: torch.dtype, device: torch.device, zero_stage: int) -> str:
    """What ``engine.precision`` means for a model whose parameters are ``model_dtype`` on ``device``:
    'fp64', 'fp32' or 'bf16' (ValueError naming the recipe keys for a combination that cannot train)."""
    bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "auto":
        precision = "fp64" if model_dtype == torch.float64 else ("bf16" if bf16_ok else "fp32")
    if precision == "fp64":
        if model_dtype != torch.float64:
            raise ValueError(f"engine.precision: fp64 needs a float64 model, but the model's dtype is "
                             f"{str(model_dtype).removeprefix('torch.')}; set the model config key 'dtype' to float64 "
                             "(recipe: model.overrides: {dtype: float64}) or engine.precision to fp32 / auto")
        if zero_stage != 0:
            raise ValueError(f"engine.precision fp64 (also 'auto' with a float64 model) needs engine.zero_stage: 0, "
                             f"got {zero_stage}: DeepSpeed's ZeRO keeps float32 master weights. Set "
                             "engine.zero_stage: 0, or engine.precision: fp32 to train the model in float32")
    # CPU autocast runs bf16 everywhere (fast only with AVX512-BF16/AMX), so 'bf16' is honoured on CPU when
    # asked for explicitly (it exercises the GPU code path here); 'auto' keeps fp32 on CPU.
    if precision == "bf16" and not (bf16_ok or device.type == "cpu"):
        raise ValueError(f"engine.precision: bf16 is not supported on {device.type}; use 'auto' or 'fp32'")
    return precision


def _trainable_precision(model: torch.nn.Module, precision: str, rank: int) -> torch.nn.Module:
    """The model in float32 if it is float64 and trains in fp32/bf16 (DeepSpeed reduces and optimizes
    fp32 gradients then); unchanged for fp64.

    A float64 ``ModelConfig`` keeps its dtype: ``from_pretrained`` loads the exported fp32 weights into a float64
    model, so inference still runs in float64."""
    if precision != "fp64" and any(p.dtype == torch.float64 for p in model.parameters()):
        if rank == 0:
            print(f"foundation: training the float64 model in float32 (engine.precision: {precision}); "
                  "the exported model keeps its float64 config")
        model = model.float()
    return model


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    """float64 if any floating-point parameter is float64, else float32."""
    return torch.float64 if any(p.dtype == torch.float64 for p in model.parameters()) else torch.float32


class Engine:
    """A model wrapped by ``deepspeed.initialize`` with a torch AdamW/Adam optimizer.

    ``forward(batch, **kw)`` runs the model (under bf16 autocast when enabled); ``backward(loss)`` and
    ``step()`` are called once per micro-batch; DeepSpeed all-reduces, clips and steps the optimizer at
    every ``config.engine.gradient_accumulation``-th call.
    """

    def __init__(self, model: torch.nn.Module, config: TrainConfig):
        self.rank, self.world_size = init_distributed(config.engine.backend)
        import deepspeed
        from deepspeed.accelerator import get_accelerator
        accel = get_accelerator()
        self.device = torch.device(accel.device_name(int(os.environ.get("LOCAL_RANK", 0))))
        self.precision = resolve_precision(config.engine.precision, _model_dtype(model), self.device,
                                           config.engine.zero_stage)
        self.bf16, self.dtype = self.precision == "bf16", torch.float64 if self.precision == "fp64" else torch.float32
        self.gas = config.engine.gradient_accumulation
        self.zero_stage, self._grad_norm = config.engine.zero_stage, float("nan")
        # fp64: clip in float64 here (DeepSpeed's clipping computes the norm in float32)
        self._clip = float(config.optim.grad_clip) if self.precision == "fp64" else 0.0
        ds_config = {
            "train_micro_batch_size_per_gpu": 1,        # batches are atom-budgeted: one micro-batch per call
            "gradient_accumulation_steps": self.gas,
            "gradient_clipping": 0.0 if self._clip else float(config.optim.grad_clip),
            "zero_optimization": {"stage": config.engine.zero_stage},
            "bf16": {"enabled": False}, "fp16": {"enabled": False},  # weights stay fp32/fp64; bf16 = autocast
            "steps_per_print": 2**62, "wall_clock_breakdown": False,
        }
        model = _trainable_precision(model, self.precision, self.rank).to(self.device)
        self.ds, _, _, _ = deepspeed.initialize(model=model, optimizer=_optimizer(model, config), config=ds_config)
        if self.precision == "fp64":   # DeepSpeed's all-reduce rejects float64 gradients: ``_allreduce_fp64`` does it
            self.ds.enable_backward_allreduce = False
        self.module = self.ds.module

    # --- training ---------------------------------------------------------------------------------------------
    def autocast(self):
        """bf16 autocast on devices that support it (weights, gradients and optimizer state stay fp32)."""
        if self.bf16:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward(self, batch, **kwargs) -> dict:
        with self.autocast():
            return self.ds(batch, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate gradients of ``loss`` (already normalised for the whole global step, see module doc)."""
        boundary = self.ds.is_gradient_accumulation_boundary()
        self.ds.backward(loss.to(self.dtype), scale_wrt_gas=False)
        if boundary and self.precision == "fp64":
            self._allreduce_fp64()
        if boundary and self.zero_stage == 0:  # gradients are all-reduced now; ZeRO reports its own norm
            grads = [p.grad for p in self.module.parameters() if p.grad is not None]
            norm = torch.stack([g.detach().to(self.dtype).norm() for g in grads]).norm() if grads else None
            self._grad_norm = 0.0 if norm is None else float(norm)
            if self._clip and norm is not None and self._grad_norm > self._clip:   # fp64: clip here, in float64
                for g in grads:
                    g.mul_(self._clip / (norm + 1e-6))

    def _allreduce_fp64(self) -> None:
        """Average the float64 gradients over ranks in float64 (what DeepSpeed does for fp32 ones: sum, then
        divide by the world size), in one flat buffer."""
        if self.world_size == 1:
            return
        params = [p for p in self.module.parameters() if p.requires_grad]
        for p in params:   # a parameter unused on this rank (an element absent from its batch) gets zeros
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        flat.mul_(1.0 / self.world_size)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def step(self) -> None:
        """Advance one micro-step; at an accumulation boundary all-reduce, clip and update the weights."""
        self.ds.step()

    @property
    def optimizer(self):
        return self.ds.optimizer

    def grad_norm(self) -> float:
        """Global gradient L2 norm of the last optimizer step (before clipping), NaN if unknown."""
        if self.zero_stage == 0:
            return self._grad_norm
        norm = self.ds.get_global_grad_norm()
        return float("nan") if norm is None else float(norm)

    # --- collectives ------------------------------------------------------------------------------------------
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of ``tensor`` over ranks (a new tensor on the same device/dtype as the input)."""
        if self.world_size == 1:
            return tensor.clone()
        t = tensor.detach().to(self.device).clone()
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t.to(tensor.device)

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    # --- optimizer state for checkpoints ----------------------------------------------------------------------
    def _base_and_master(self):
        """(torch optimizer, list of fp32 master tensors owned by this rank)."""
        opt = self.ds.optimizer
        if hasattr(opt, "single_partition_of_fp32_groups"):      # ZeRO stage 1/2
            return opt.optimizer, list(opt.single_partition_of_fp32_groups)
        if hasattr(opt, "fp32_groups_flat_partition"):            # bf16 optimizer (stage 0)
            return opt.optimizer, list(opt.fp32_groups_flat_partition)
        return opt, []

    def optimizer_state(self) -> dict:
        """This rank's optimizer state: the torch optimizer's state dict and its fp32 master partitions."""
        base, master = self._base_and_master()
        return {"base": base.state_dict(), "master": [m.detach() for m in master]}

    def load_optimizer_state(self, state: dict) -> None:
        """Restore what ``optimizer_state`` returned (same world size and ZeRO stage)."""
        base, master = self._base_and_master()
        if len(master) != len(state["master"]) or any(m.shape != s.shape for m, s in zip(master, state["master"])):
            raise ValueError("checkpoint optimizer partitions do not match this run; resume with the same number "
                             "of ranks, ZeRO stage and model")
        with torch.no_grad():
            for m, s in zip(master, state["master"]):
                m.copy_(s)
        base.load_state_dict(state["base"])
