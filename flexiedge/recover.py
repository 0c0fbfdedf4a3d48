"""Recovery fine-tune (METHOD.md section 5): train what the method makes new, keep every base weight frozen.

Trained: each slot's LoRA adapters (lora_A, lora_B), output-norm gammas and own RMSNorm weights; with
`--kept-lora R` also a rank-R LoRA over each kept block's own weights (the ShortGPT+LoRA baseline).
Everything else, in particular the base weights that slots share, gets no gradient.

Recipes (`--recipe`): `flexiedge` (default) first warm-starts every slot block-locally against the unpruned
model (flexiedge/warmstart.py) and trains on KL to the unpruned model's cached top-k next-token distribution
(flexiedge/distill.py); `slots_kept` does the same after moving half of every slot's adapter rank to LoRA on the
kept blocks (`--kept-share 0.5`, same trainable parameters); `paper` is METHOD.md section 5 as published (slots
start near identity, next-token loss).

One device (a plain PyTorch loop; fp32 on CPU, bf16/fp16 autocast on a GPU):

    flexiedge recover runs/smollm2-30 --tokens 20000 --out runs/smollm2-30-rec
    flexiedge recover runs/smollm2-30-shortgpt --kept-lora 14 --tokens 20000 --out runs/smollm2-30-shortgpt-lora
    flexiedge recover runs/smollm2-30 --tokens 20000 --out runs/smollm2-30-rec --resume   # after Ctrl-C / a crash
    flexiedge recover runs/smollm2-30 --recipe paper --tokens 20000 --out runs/smollm2-30-paper
    flexiedge recover runs/smollm2-30 --recipe slots_kept --tokens 20000 --out runs/smollm2-30-slots-kept

Many GPUs (the same code, handed to accelerate + FSDP2; each base block shares one FSDP unit with its slots):

    accelerate launch --config_file flexiedge/configs/fsdp.yaml --num_processes 4 \\
        -m flexiedge recover runs/llama2-30 --tokens 1000000000 --batch-size 8 --grad-accum 15 --out runs/llama2-30-rec

Settings live in one `TrainConfig` (flexiedge/train_config.py); `--config FILE.yaml` sets any of them.
OUT is always a loadable checkpoint: it is written atomically every `save_every` steps, on Ctrl-C and at
the end, with `trainer_state.pt` (optimizer, scheduler, RNG, step) and `train_log.jsonl` beside the weights.
The data order is a pure function of (seed, step), so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .build import add_own_lora
from .cache import atomic_dir
from .checkpoint import load_checkpoint, save_checkpoint
from .data import text_provenance, token_windows, tokenize_texts
from .errors import FlexiEdgeError
from .plan import PROJECTIONS, Plan
from .train_config import RECIPES, TrainConfig, coerce_value, config_from

TRAINER_STATE = "trainer_state.pt"
LOG = "train_log.jsonl"
SLOT_NORMS = ("input_layernorm.", "post_attention_layernorm.")
OUTPUT_NORMS = ("attn_output_norm.", "mlp_output_norm.")


# ---- what trains ---------------------------------------------------------------------------------------

def trainable_names(model, plan: Plan, slot_norms: bool = True, slots: bool = True) -> list[str]:
    """Names of the parameters recovery trains: adapters everywhere, norms of slots only (`slots`=False: no slot part)."""
    names = []
    for position, layer in enumerate(model.model.layers):
        is_slot = plan.layers[position].is_slot
        if is_slot and not slots:
            continue
        for name, _ in layer.named_parameters():
            adapter = name.endswith(("lora_A", "lora_B"))
            norm = is_slot and (name.startswith(OUTPUT_NORMS) or slot_norms and name.startswith(SLOT_NORMS))
            if adapter or norm:
                names.append(f"model.layers.{position}.{name}")
    return names


def freeze_all_but(model, names: list[str]) -> dict[str, nn.Parameter]:
    """requires_grad only on `names` (shared base Parameters are frozen once, wherever they are used)."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = dict(model.named_parameters(remove_duplicate=False))
    trainable = {name: params[name] for name in names}
    for p in trainable.values():
        p.requires_grad_(True)
    return trainable


def add_kept_lora(model, plan: Plan, rank: int) -> None:
    """ShortGPT+LoRA: every kept block gets a rank-`rank` LoRA over its own weights; the plan records it."""
    for position, spec in enumerate(plan.layers):
        if not spec.is_slot and not spec.rank:
            add_own_lora(model.model.layers[position], rank)
            spec.rank = rank


def move_slot_rank_to_kept(model, plan: Plan, share: float) -> int:
    """Cut every slot adapter to its leading round((1 - share) x rank) directions; return the kept-block LoRA rank
    the freed adapter parameters pay for (a kept projection costs the same per rank as its slot counterpart)."""
    freed = 0
    for position in plan.slots:
        spec = plan.layers[position]
        rank = round(spec.rank * (1 - share))
        for name in PROJECTIONS:
            linear = model.model.layers[position].get_submodule(name)
            # SVD init orders the columns of lora_B by singular value: the first `rank` are the best rank-r part.
            linear.lora_A = nn.Parameter(linear.lora_A.detach()[:rank].clone())
            linear.lora_B = nn.Parameter(linear.lora_B.detach()[:, :rank].clone())
        freed, spec.rank = freed + spec.rank - rank, rank
    kept = [spec for spec in plan.layers if not spec.is_slot]
    if not kept or not freed:
        raise FlexiEdgeError(f"--kept-share {share} frees no adapter rank for kept blocks: choose a larger share")
    return max(1, round(freed / len(kept)))


# ---- data ----------------------------------------------------------------------------------------------

@dataclass
class TrainData:
    train: torch.Tensor    # (n, seq_len) packed sequences
    heldout: torch.Tensor  # (m, seq_len) the last sequences, never trained on


def load_data(tokenizer, config: TrainConfig) -> TrainData:
    windows = token_windows(tokenize_texts(tokenizer, config.data), config.seq_len)
    n_heldout = max(1, round(len(windows) * config.eval_fraction))
    if len(windows) - n_heldout < 1:
        raise FlexiEdgeError(f"the training text packs into only {len(windows)} sequences of {config.seq_len} "
                             "tokens: give more text (--data) or a shorter --seq-len")
    return TrainData(train=windows[:-n_heldout], heldout=windows[-n_heldout:])


def batch_at(data: TrainData, config: TrainConfig, step: int, micro: int, rank: int = 0, world: int = 1):
    """The micro-batch for (step, micro, rank): sample k of an endless stream of seeded epoch shuffles."""
    n = len(data.train)
    first = ((step * config.grad_accum + micro) * world + rank) * config.batch_size
    rows = []
    for k in range(first, first + config.batch_size):
        epoch, position = divmod(k, n)
        rows.append(int(_epoch_order(n, config.seed, epoch)[position]))
    return data.train[rows]


_ORDERS: dict = {}


def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    key = (n, seed, epoch)
    if key not in _ORDERS:
        _ORDERS.clear()  # one epoch at a time is enough
        _ORDERS[key] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return _ORDERS[key]


# ---- schedule and optimizer ----------------------------------------------------------------------------

def lr_factor(step: int, config: TrainConfig, total: int) -> float:
    """Linear warmup, then cosine decay from lr to min_lr over the remaining steps."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
    floor = config.min_lr / config.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(trainable: dict[str, nn.Parameter], config: TrainConfig, total: int):
    decay = [p for p in trainable.values() if p.dim() >= 2]       # adapter matrices
    no_decay = [p for p in trainable.values() if p.dim() < 2]     # norm gammas
    optimizer = torch.optim.AdamW([dict(params=decay, weight_decay=config.weight_decay),
                                   dict(params=no_decay, weight_decay=0.0, lr=config.lr * config.norm_lr_scale)],
                                  lr=config.lr, betas=config.betas, foreach=False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config, total))
    return optimizer, scheduler


# ---- precision -----------------------------------------------------------------------------------------

def autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """None means plain fp32. On the CPU `auto` is fp32 (bf16 matmuls are slow on this kind of host)."""
    precision = config.precision
    if precision == "auto":
        if device.type != "cuda":
            return None
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


# ---- evaluation ----------------------------------------------------------------------------------------

@torch.no_grad()
def heldout_loss(model, data: TrainData, config: TrainConfig, device, dtype) -> float:
    """Mean next-token loss on the held-out sequences (equal lengths, so the mean of means is exact)."""
    seqs = data.heldout[: config.eval_sequences or None]
    model.eval()
    total = 0.0
    for i in range(0, len(seqs), config.batch_size):
        batch = seqs[i:i + config.batch_size].to(device)
        with autocast(device, dtype):
            total += float(model(input_ids=batch, labels=batch, use_cache=False).loss) * len(batch)
    model.train()
    return total / len(seqs)


# ---- the loop ------------------------------------------------------------------------------------------

class StopRequest:
    """First Ctrl-C: finish the current step, save, stop. Second Ctrl-C: stop at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        with contextlib.suppress(ValueError):  # not the main thread: no handler, Ctrl-C is not ours to catch
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write("flexiedge: stopping after this step and saving a checkpoint (Ctrl-C again to abort)")

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


@dataclass
class Session:
    """Everything the loop needs; `step` counts finished optimizer steps."""
    model: nn.Module
    tokenizer: object
    plan: Plan
    config: TrainConfig
    trainable: dict[str, nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: object
    data: TrainData
    total_steps: int
    provenance: dict
    log: list
    step: int = 0
    parallel: object = None   # a flexiedge.distributed.Parallel when launched on many processes
    teacher: object = None    # a flexiedge.distill.Teacher when config.distill > 0


def recover(run_dir: Path, out: Path, config: TrainConfig, resume: bool = False, overwrite: bool = False,
            stop_after: int | None = None, progress: bool = True) -> Path:
    """Train `run_dir`'s new parameters on `config.tokens` tokens; write (and keep updating) checkpoint `out`.

    `stop_after` ends this session after that many steps with a checkpoint, as Ctrl-C does.
    """
    from .distributed import Parallel

    out, parallel = Path(out), Parallel.from_environment()
    if resume and (out / TRAINER_STATE).is_file():
        session = resume_session(out, parallel)
    else:
        if out.exists() and not overwrite:
            raise FlexiEdgeError(f"{out} already exists and has no {TRAINER_STATE} to resume from: choose another "
                                 "--out or pass --force to replace it")
        session = new_session(Path(run_dir), config, parallel)
    if session.step >= session.total_steps:
        if parallel.is_main:
            print(f"flexiedge: {out} is already trained for {session.total_steps} steps", flush=True)
        return out
    with StopRequest() as stop:
        train(session, out, stop, stop_after, progress)
    return out


def new_session(run_dir: Path, config: TrainConfig, parallel, state: dict | None = None) -> Session:
    ckpt = load_checkpoint(run_dir)
    model, plan = ckpt.model, ckpt.plan
    if plan.method == "extend" and (config.warm_start_tokens or config.distill or config.kept_share):
        # Warm starts fit a slot to the block it replaced, and the teacher is the model itself: neither
        # means anything for repeats that add depth, so extension always trains on next-token loss, and
        # its repeats keep their whole adapter rank (their adapters are what makes them unique).
        config = dataclasses.replace(config, warm_start_tokens=0, distill=0.0, kept_share=0.0)
    source = ckpt.metadata.get("provenance", {})
    needs_teacher = config.distill > 0 or (config.warm_start_tokens and plan.slots and state is None)
    source_model = load_source(source, run_dir) if needs_teacher else None
    kept_rank = config.kept_lora
    if config.kept_share and plan.slots and state is None:  # before the warm start: it fits what slots keep
        kept_rank = move_slot_rank_to_kept(model, plan, config.kept_share)
    warm = None
    if config.warm_start_tokens and plan.slots and state is None:
        warm = run_warm_start(model, plan, source_model, ckpt.tokenizer, config, parallel)
    torch.manual_seed(config.seed)  # new kept-LoRA adapters start the same way in every run
    if kept_rank and state is None:
        add_kept_lora(model, plan, kept_rank)
    names = trainable_names(model, plan, config.train_slot_norms, config.train_slots)
    if not names:
        raise FlexiEdgeError(f"{run_dir} has nothing to train: it has no slots; pass --kept-lora RANK to add "
                             "LoRA on the kept blocks (the ShortGPT+LoRA baseline)")
    model.config.use_cache = False
    trainable = freeze_all_but(model, names)
    total = config.total_steps(parallel.world_size)
    optimizer, scheduler = make_optimizer(trainable, config, total)
    provenance = dict(source, recovery=dict(source_run=str(run_dir), config=config.to_json(),
                                            data=text_provenance(config.data), total_steps=total,
                                            world_size=parallel.world_size, trainable_parameters=
                                            sum(p.numel() for p in trainable.values()), warm_start=warm))
    session = Session(model, ckpt.tokenizer, plan, config, trainable, optimizer, scheduler,
                      load_data(ckpt.tokenizer, config), total, provenance, log=[])
    parallel.prepare(session)
    if config.distill > 0:
        session.teacher = make_teacher(source_model, source, config, parallel.device)
    return session


def load_source(provenance: dict, run_dir: Path):
    """The unpruned model the run was pruned from (teacher of the warm start and of distillation)."""
    from .models import load_model

    folder = provenance.get("source_folder")
    if not folder or not Path(folder).exists():
        raise FlexiEdgeError(f"{run_dir} names no readable source model ({folder}): the warm start and "
                             "distillation need the unpruned model; use --recipe paper to train without it")
    model, _ = load_model(folder)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def run_warm_start(model, plan: Plan, source_model, tokenizer, config: TrainConfig, parallel) -> dict:
    """Block-local warm start of every slot (flexiedge/warmstart.py) on the calibration texts."""
    from .warmstart import warm_start

    windows = token_windows(tokenize_texts(tokenizer, config.warm_start_data), config.seq_len,
                            config.warm_start_tokens)
    t0 = time.perf_counter()
    report = warm_start(model, plan, source_model, windows, config.warm_start_steps, config.warm_start_lr,
                        config.batch_size, seed=config.seed, activation_aware=config.warm_start_init != "svd",
                        log=print if parallel.is_main else (lambda *a: None))
    return dict(slots={str(k): v for k, v in report.items()}, tokens=windows.numel(),
                seconds=time.perf_counter() - t0, data=text_provenance(config.warm_start_data))


def make_teacher(source_model, provenance: dict, config: TrainConfig, device):
    from .cache import cache_dir
    from .distill import Teacher

    source_model.to(device)
    identity = f"{provenance.get('source_folder')}|{provenance.get('source_parameters')}"
    folder = Path(config.teacher_cache) if config.teacher_cache else cache_dir("teacher")
    return Teacher(source_model, config.distill_topk, folder, identity)


def resume_session(out: Path, parallel) -> Session:
    """Reload OUT and its trainer state: weights, optimizer, scheduler, RNG and log as of the saved step."""
    state = torch.load(out / TRAINER_STATE, weights_only=False)
    saved = dict(state["config"])
    saved.setdefault("recipe", "paper")  # trainer states from before recipes existed trained the paper's way
    config = TrainConfig(**{k: coerce_value(k, v) for k, v in saved.items()})
    if state["world_size"] != parallel.world_size:
        raise FlexiEdgeError(f"{out} was trained on {state['world_size']} processes; resume it on the same "
                             f"number (now {parallel.world_size}) so the data order stays the same")
    session = new_session(out, config, parallel, state)
    session.provenance = state["provenance"]
    session.step, session.log = state["step"], state["log"]
    parallel.load_optimizer(session, state["optimizer"])
    session.scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    if torch.cuda.is_available() and state["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    if parallel.is_main:
        print(f"flexiedge: resuming {out} at step {session.step} of {session.total_steps}", flush=True)
    return session


def train(session: Session, out: Path, stop: StopRequest, stop_after: int | None, progress: bool) -> None:
    s, config, parallel = session, session.config, session.parallel
    device, dtype = parallel.device, parallel.autocast_dtype
    per_step = config.tokens_per_step(parallel.world_size)
    s.model.train()
    bar = tqdm(total=s.total_steps * per_step, initial=s.step * per_step, unit="tok", unit_scale=True,
               desc="recover", disable=not (progress and parallel.is_main))
    started = s.step
    if stop_after == 0:  # only the starting point (e.g. after the warm start), saved as a checkpoint
        save_session(s, out)
        bar.close()
        return
    while s.step < s.total_steps:
        t0 = time.perf_counter()
        loss = train_step(s, device, dtype)
        s.step += 1
        record = dict(step=s.step, tokens=s.step * per_step, loss=loss, lr=s.scheduler.get_last_lr()[0],
                      tokens_per_s=per_step / (time.perf_counter() - t0))
        last = s.step == s.total_steps
        if last or config.eval_every and s.step % config.eval_every == 0:
            record["eval_loss"] = parallel.mean(heldout_loss(s.model, s.data, config, device, dtype))
            record["eval_ppl"] = math.exp(record["eval_loss"])
        s.log.append(record)
        bar.update(per_step)
        bar.set_postfix(loss=f"{loss:.3f}", **({"eval_ppl": f"{record['eval_ppl']:.2f}"} if "eval_ppl" in record else {}),
                        tok_s=f"{record['tokens_per_s']:.0f}")
        halt = stop.requested or (stop_after is not None and s.step - started >= stop_after)
        if last or halt or config.save_every and s.step % config.save_every == 0:
            save_session(s, out)
        if halt and not last:
            bar.close()
            if stop.requested:
                raise KeyboardInterrupt(f"stopped at step {s.step}; continue with --resume")
            return
    bar.close()


def train_step(s: Session, device, dtype) -> float:
    """One optimizer step over grad_accum micro-batches; returns the mean micro-batch loss."""
    config, parallel = s.config, s.parallel
    total = 0.0
    for micro in range(config.grad_accum):
        batch = batch_at(s.data, config, s.step, micro, parallel.rank, parallel.world_size).to(device)
        with autocast(device, dtype):
            loss = step_loss(s, batch) / config.grad_accum
        parallel.backward(loss)
        total += float(loss.detach())
    if config.grad_clip:
        parallel.clip_grad_norm(list(s.trainable.values()), config.grad_clip)
    parallel.optimizer_step(s.optimizer)
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    return parallel.mean(total)


def step_loss(s: Session, batch: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, mixed with KL to the cached teacher when config.distill > 0."""
    if s.teacher is None or s.config.distill == 0:
        return s.model(input_ids=batch, labels=batch, use_cache=False).loss
    from .distill import topk_kl

    logits = s.model(input_ids=batch, use_cache=False).logits
    logp, ids = s.teacher.topk(batch)
    kl = topk_kl(logits, logp, ids)
    w = s.config.distill
    if w == 1:
        return kl
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten())
    return (1 - w) * ce + w * kl


# ---- saving --------------------------------------------------------------------------------------------

def save_session(s: Session, out: Path) -> None:
    """Write OUT atomically: the checkpoint (compact format) plus trainer state and log beside it."""
    model = s.parallel.full_model(s)          # the trained weights, gathered onto the main process
    optimizer_state = s.parallel.full_optimizer_state(s)
    if not s.parallel.is_main:
        s.parallel.barrier()
        return
    done = s.step >= s.total_steps
    last_eval = next((r for r in reversed(s.log) if "eval_ppl" in r), None)
    provenance = dict(s.provenance)
    provenance["recovery"] = dict(provenance["recovery"], step=s.step, complete=done,
                                  tokens_seen=s.step * s.config.tokens_per_step(s.parallel.world_size),
                                  heldout_ppl=last_eval and last_eval["eval_ppl"])
    state = dict(step=s.step, config=s.config.to_json(), world_size=s.parallel.world_size, log=s.log,
                 optimizer=optimizer_state, scheduler=s.scheduler.state_dict(), provenance=s.provenance,
                 rng=dict(torch=torch.get_rng_state(),
                          cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None))
    with atomic_dir(out, overwrite=True) as tmp:
        # save_checkpoint writes its own atomic folder: build it inside ours, then add the trainer files.
        inner = save_checkpoint(model, s.tokenizer, s.plan, tmp / "checkpoint", provenance)
        for f in inner.iterdir():
            f.rename(tmp / f.name)
        inner.rmdir()
        torch.save(state, tmp / TRAINER_STATE)
        (tmp / LOG).write_text("".join(json.dumps(r) + "\n" for r in s.log))
    s.parallel.barrier()


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / LOG).read_text().splitlines() if line.strip()]


# ---- command line --------------------------------------------------------------------------------------

def add_commands(sub) -> None:
    p = sub.add_parser("recover", help="recovery fine-tune: train slot adapters and norms, base frozen")
    p.add_argument("run", help="run folder written by `flexiedge prune` (or `recover`)")
    p.add_argument("--out", required=True, help="run folder to write (a checkpoint at every save)")
    p.add_argument("--config", help="YAML/JSON file of TrainConfig settings (options below override it)")
    p.add_argument("--tokens", type=int, help="training token budget (default 20000)")
    p.add_argument("--data", nargs="+", help="training texts: built-in names, .txt or .jsonl files")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--batch-size", type=int, help="sequences per micro-batch (per process)")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, help="peak learning rate (default 4e-3, the paper's)")
    p.add_argument("--min-lr", type=float, help="end of the cosine decay (default 0)")
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--grad-clip", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--kept-lora", type=int, metavar="RANK", help="add rank-RANK LoRA on kept blocks (ShortGPT+LoRA)")
    p.add_argument("--no-slot-norms", action="store_true", help="keep the slots' RMSNorm weights frozen")
    p.add_argument("--recipe", choices=sorted(RECIPES), help="slots_kept (default: half the slot adapter rank "
                   "moved to kept blocks, warm start + distillation), flexiedge (all the rank on the slots, warm "
                   "start + distillation) or paper (the published recipe: slots start near identity, next-token loss)")
    p.add_argument("--warm-start-tokens", type=int, help="calibration tokens for the slots' warm start (0 = off)")
    p.add_argument("--warm-start-steps", type=int, help="Adam steps per slot after the closed-form gammas")
    p.add_argument("--distill", type=float, metavar="W", help="weight of KL to the unpruned model (0 = off, 1 = KL only)")
    p.add_argument("--distill-topk", type=int, help="teacher log-probs cached per position (default 64)")
    p.add_argument("--norm-lr-scale", type=float, help="lr multiplier for norm gammas")
    p.add_argument("--frozen-slots", action="store_true", help="do not train the slots (only --kept-lora trains)")
    p.add_argument("--kept-share", type=float, metavar="F", help="move this share of every slot's adapter rank "
                   "to LoRA on the kept blocks (recipe slots_kept: 0.5)")
    p.add_argument("--eval-every", type=int, help="steps between held-out evaluations")
    p.add_argument("--eval-sequences", type=int, help="held-out sequences per evaluation (0 = all)")
    p.add_argument("--save-every", type=int, help="steps between checkpoints")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--stop-after", type=int, metavar="STEPS", help="save and stop after this many steps (resume later)")
    p.add_argument("--resume", action="store_true", help="continue OUT from its last checkpoint")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=_recover)


def _recover(args) -> None:
    config = config_from(args.config, tokens=args.tokens, data=args.data and tuple(args.data), seq_len=args.seq_len,
                         batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr, min_lr=args.min_lr,
                         warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
                         seed=args.seed, kept_lora=args.kept_lora, eval_every=args.eval_every,
                         eval_sequences=args.eval_sequences, save_every=args.save_every, precision=args.precision,
                         train_slot_norms=False if args.no_slot_norms else None, recipe=args.recipe,
                         warm_start_tokens=args.warm_start_tokens, warm_start_steps=args.warm_start_steps,
                         distill=args.distill, distill_topk=args.distill_topk, norm_lr_scale=args.norm_lr_scale,
                         train_slots=False if args.frozen_slots else None, kept_share=args.kept_share)
    out = recover(Path(args.run), Path(args.out), config, resume=args.resume, overwrite=args.force,
                  stop_after=args.stop_after)
    if int(os.environ.get("RANK", "0")) != 0:  # launched on many processes: the main one reports
        return
    log = read_log(out)
    final = next((r for r in reversed(log) if "eval_ppl" in r), None)
    print(f"wrote {out} (step {log[-1]['step'] if log else 0}"
          + (f", held-out PPL {final['eval_ppl']:.3f}" if final else "") + ")")
