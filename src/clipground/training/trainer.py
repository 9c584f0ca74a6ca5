"""One training loop for every trainable method: CPU, one GPU or many, resumable.

:class:`Trainer` wraps :class:`accelerate.Accelerator`, so the same code runs on a laptop
CPU, a GPU (with bf16/fp16 autocast) or under ``accelerate launch`` on several processes
and nodes. Methods supply only a model, a dataset, a collate function and
``loss_fn(model, batch) -> (loss, metrics)``; the trainer does AdamW, warmup + cosine LR,
gradient clipping, logging (``metrics.jsonl``, tqdm, a learning-curve PNG), evaluation and
atomic checkpoints (:mod:`clipground.training.checkpoint`).

Exact resume: the data order of epoch ``e`` is a permutation drawn from ``seed + e`` (not
from the global RNG), already-consumed batches are skipped with accelerate's
``skip_first_batches``, and optimizer, scheduler, scaler and every process's RNG states are
restored, so a killed run resumed with ``resume=True`` ends with the same weights as an
uninterrupted one. Datasets with random augmentation should draw it from ``(epoch, index)``
(they may define ``set_epoch(epoch)``, which the trainer calls before each epoch) rather
than from a worker's global RNG.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import ConfigError
from ..io import atomic_write, save_figure
from . import checkpoint as C
from .config import TrainConfig, to_dict, validate_train_config

LossFn = Callable[[torch.nn.Module, Any], "tuple[torch.Tensor, dict[str, float]]"]
EvalFn = Callable[[torch.nn.Module], "dict[str, float]"]
ParamFilter = Callable[[str, torch.nn.Parameter], bool]

METRICS_FILE = "metrics.jsonl"
CURVE_FILE = "learning_curve.png"


class EpochPermutationSampler(Sampler[int]):
    """A shuffled order of ``range(n)`` that depends only on ``(seed, epoch)``.

    Unlike :class:`torch.utils.data.RandomSampler` it touches no global RNG, so the order of
    any epoch can be recreated on resume, on every process alike.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns."""

    step: int
    total_steps: int
    finished: bool
    last_metrics: dict[str, float]
    last_eval: dict[str, float]
    output_dir: Path
    wall_time_s: float  # training time summed over every (resumed) session
    cpu_time_s: float = 0.0  # main-process CPU time, likewise summed (contention-independent)


def _to_float(v: Any) -> float:
    return float(v.detach().float().mean().item()) if isinstance(v, torch.Tensor) else float(v)


def plot_learning_curve(metrics_path: str | os.PathLike, out_png: str | os.PathLike) -> Path | None:
    """Plot loss (and ``eval/*`` metrics, if any) against step from ``metrics.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics_path, out_png = Path(metrics_path), Path(out_png)
    if not metrics_path.is_file():
        return None
    rows = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    if not train and not evals:
        return None
    ncols = 2 if evals else 1
    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 4), squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title("training loss")
        ax.grid(alpha=0.3)
    if evals:
        ax2 = axes[0][1]
        keys = sorted({k for r in evals for k in r if k.startswith("eval/")})
        for k in keys:
            pts = [(r["step"], r[k]) for r in evals if k in r and isinstance(r[k], (int, float))]
            if pts:
                ax2.plot(*zip(*pts), marker="o", label=k[5:])
        ax2.set_xlabel("step")
        ax2.set_title("evaluation")
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=8)
    fig.tight_layout()
    try:
        save_figure(fig, out_png, dpi=100)
    finally:
        plt.close(fig)
    return out_png


class Trainer:
    """Fits ``model`` on ``train_dataset`` with ``loss_fn``; see the module docstring.

    Args:
        config: the shared :class:`TrainConfig`.
        model: any ``nn.Module``; build it after seeding if its init must be reproducible.
        train_dataset: a map-style dataset.
        collate_fn: turns a list of items into a batch (passed to ``loss_fn``).
        loss_fn: ``(model, batch) -> (scalar loss, {name: float})``; ``model`` is the
            accelerate-prepared module, so call its ``forward`` (DDP syncs gradients there).
        eval_fn: optional ``(unwrapped model) -> {name: float}``, run on the main process in
            ``eval`` mode without gradients every ``eval_every`` steps and at the end.
        param_filter: optional ``(name, param) -> bool``; only parameters for which it is
            true (and that require grad) are trained and checkpointed, the rest are frozen.
        accelerator: an existing :class:`accelerate.Accelerator` to reuse.
        extra_state: optional JSON-able dict stored in every checkpoint (e.g. the model config).
        lr_scale: optional ``(name, param) -> float``: that parameter's learning rate is
            ``config.lr`` times it (the schedule applies to every group alike).
    """

    def __init__(
        self,
        config: TrainConfig,
        model: torch.nn.Module,
        train_dataset: Dataset,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        loss_fn: LossFn | None = None,
        eval_fn: EvalFn | None = None,
        param_filter: ParamFilter | None = None,
        accelerator: Any | None = None,
        extra_state: dict[str, Any] | None = None,
        lr_scale: Callable[[str, torch.nn.Parameter], float] | None = None,
    ) -> None:
        validate_train_config(config)
        if loss_fn is None:
            raise ValueError("loss_fn is required")
        self.cfg = config
        self.model = model
        self.dataset = train_dataset
        self.collate_fn = collate_fn
        self.loss_fn = loss_fn
        self.eval_fn = eval_fn
        self.param_filter = param_filter
        self.extra_state = extra_state or {}
        self.lr_scale = lr_scale
        self.output_dir = Path(config.output_dir)
        self._accelerator = accelerator

    # ------------------------------------------------------------------ setup
    def _make_accelerator(self) -> Any:
        from accelerate import Accelerator

        if self._accelerator is not None:
            return self._accelerator
        mp = self.cfg.mixed_precision
        if mp == "auto":
            mp = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
        # cpu=True on GPU-less machines makes torchrun/`accelerate launch --multi_gpu` start a
        # gloo process group instead of silently running N independent copies.
        acc = Accelerator(mixed_precision=mp, gradient_accumulation_steps=self.cfg.grad_accum_steps,
                          cpu=not torch.cuda.is_available())
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world > 1 and acc.num_processes != world:
            raise ConfigError(f"launched {world} processes but accelerate set up {acc.num_processes}; "
                              "use `accelerate launch --multi_gpu --num_processes N` (also on CPU)")
        return acc

    def _trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        out = []
        for n, p in self.model.named_parameters():
            keep = p.requires_grad and (self.param_filter is None or self.param_filter(n, p))
            if not keep:
                p.requires_grad_(False)
            else:
                out.append((n, p))
        if not out:
            raise ValueError("no trainable parameters (check param_filter / requires_grad)")
        return out

    def _optimizer(self, named: list[tuple[str, torch.nn.Parameter]]) -> torch.optim.Optimizer:
        # Standard practice: no weight decay on biases, norms, scalars and embeddings of dim 1.
        scales = [1.0 if self.lr_scale is None else float(self.lr_scale(n, p)) for n, p in named]
        groups = []
        for s in dict.fromkeys(scales):  # one decay / no-decay pair per learning-rate scale, in a fixed order
            lr = {} if s == 1.0 else {"lr": self.cfg.lr * s}
            groups += [{"params": [p for (n, p), k in zip(named, scales) if k == s and p.ndim >= 2],
                        "weight_decay": self.cfg.weight_decay, **lr},
                       {"params": [p for (n, p), k in zip(named, scales) if k == s and p.ndim < 2],
                        "weight_decay": 0.0, **lr}]
        groups = [g for g in groups if g["params"]]
        return torch.optim.AdamW(groups, lr=self.cfg.lr, betas=tuple(self.cfg.adam_betas), eps=self.cfg.adam_eps)

    def _scheduler(self, optimizer: torch.optim.Optimizer, total: int) -> Any:
        from transformers import get_scheduler

        name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[self.cfg.lr_schedule]
        return get_scheduler(name, optimizer, num_warmup_steps=self.cfg.warmup_steps, num_training_steps=total)

    # ------------------------------------------------------------------ logging
    def _log(self, acc: Any, row: dict[str, Any]) -> None:
        if not acc.is_main_process:
            return
        with open(self.output_dir / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")

    def _truncate_metrics(self, step: int) -> None:
        """On resume, drop log lines written after the checkpoint we restart from."""
        path = self.output_dir / METRICS_FILE
        if not path.is_file():
            return
        keep = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # the half-written last line of a killed run
                continue
            if isinstance(row, dict) and row.get("step", 0) <= step:
                keep.append(line)
        atomic_write(path, "".join(line + "\n" for line in keep))

    # ------------------------------------------------------------------ checkpoints
    def _save(self, acc: Any, optimizer: Any, scheduler: Any, step: int, epoch: int, batches_done: int,
              batches_per_epoch: int) -> None:
        if batches_done >= batches_per_epoch:
            epoch, batches_done = epoch + 1, 0
        root = self.output_dir / C.CHECKPOINT_DIR
        name = C.checkpoint_name(step)
        tmp = root / (C.TMP_PREFIX + name)
        if acc.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        acc.wait_for_everyone()
        C.write_rng_file(tmp, acc.process_index)
        acc.wait_for_everyone()
        if acc.is_main_process:
            C.write_checkpoint_files(tmp, acc.unwrap_model(self.model), optimizer, scheduler, acc.scaler)
            state = {"step": step, "epoch": epoch, "batches_done": batches_done,
                     "num_processes": acc.num_processes, "config": to_dict(self.cfg),
                     "elapsed_s": self._elapsed(), "cpu_s": self._cpu(), "extra": self.extra_state}
            C.commit_checkpoint(tmp, root / name, state)
            C.prune_checkpoints(self.output_dir, self.cfg.keep_last)
        acc.wait_for_everyone()

    def _restore(self, acc: Any, optimizer: Any, scheduler: Any) -> dict[str, Any] | None:
        ckpt = C.find_latest_checkpoint(self.output_dir)
        if ckpt is None:
            return None
        data = C.read_checkpoint(ckpt, acc.process_index)
        state = data["state"]
        if state.get("num_processes", 1) != acc.num_processes:
            raise ConfigError(f"checkpoint {ckpt} was written with {state['num_processes']} process(es); "
                              f"resume with the same number (now {acc.num_processes})")
        C.load_trainable_state_dict(acc.unwrap_model(self.model), data["model"])
        optimizer.load_state_dict(data["optimizer"]["optimizer"])
        if acc.scaler is not None and "scaler" in data["optimizer"]:
            acc.scaler.load_state_dict(data["optimizer"]["scaler"])
        scheduler.load_state_dict(data["scheduler"])
        if data["rng"] is not None:
            C.set_rng_state(data["rng"])
        state["path"] = str(ckpt)
        return state

    def _elapsed(self) -> float:
        return self._prior[0] + time.time() - self._t0

    def _cpu(self) -> float:
        return self._prior[1] + time.process_time() - self._c0

    # ------------------------------------------------------------------ eval
    def _evaluate(self, acc: Any, step: int) -> dict[str, float]:
        result: dict[str, float] = {}
        if self.eval_fn is not None and acc.is_main_process:
            m = acc.unwrap_model(self.model)
            was_training = m.training
            m.eval()
            with torch.no_grad():
                result = {k: _to_float(v) for k, v in self.eval_fn(m).items()}
            m.train(was_training)
            self._log(acc, {"step": step, **{f"eval/{k}": v for k, v in result.items()}})
            plot_learning_curve(self.output_dir / METRICS_FILE, self.output_dir / CURVE_FILE)
        acc.wait_for_everyone()
        return result

    # ------------------------------------------------------------------ main loop
    def fit(self, resume: bool = False, stop_after_steps: int | None = None) -> TrainResult:
        """Train to ``max_steps``/``epochs``; ``resume`` continues from the latest checkpoint.

        ``stop_after_steps`` ends the run abruptly after that optimiser step without a final
        checkpoint or evaluation: it simulates a killed job (for tests).
        """
        from accelerate.utils import set_seed

        self._t0, self._c0, self._prior = time.time(), time.process_time(), (0.0, 0.0)
        cfg = self.cfg
        acc = self._make_accelerator()
        set_seed(cfg.seed, device_specific=True)
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            C.remove_stale_temp(self.output_dir)
            if not resume:
                (self.output_dir / METRICS_FILE).unlink(missing_ok=True)
                if (self.output_dir / C.CHECKPOINT_DIR).is_dir():
                    shutil.rmtree(self.output_dir / C.CHECKPOINT_DIR)
            import yaml

            atomic_write(self.output_dir / "train_config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
        acc.wait_for_everyone()

        named = self._trainable()
        sampler = EpochPermutationSampler(len(self.dataset), cfg.seed)  # type: ignore[arg-type]
        loader_gen = torch.Generator()
        loader = DataLoader(self.dataset, batch_size=cfg.batch_size, sampler=sampler, collate_fn=self.collate_fn,
                            num_workers=cfg.num_workers, drop_last=cfg.drop_last, generator=loader_gen,
                            persistent_workers=False)
        optimizer = self._optimizer(named)
        model, optimizer, loader = acc.prepare(self.model, optimizer, loader)
        self.model = model
        batches_per_epoch = len(loader)
        if batches_per_epoch == 0:
            raise ConfigError(f"the training set has {len(self.dataset)} samples, fewer than one batch of "  # type: ignore[arg-type]
                              f"batch_size={cfg.batch_size} on {acc.num_processes} process(es); lower batch_size "
                              f"(e.g. train.batch_size={max(1, len(self.dataset))}) or set train.drop_last=false")
        steps_per_epoch = math.ceil(batches_per_epoch / cfg.grad_accum_steps)
        total = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * steps_per_epoch
        # The scheduler is stepped by hand once per optimiser step (not prepared), so the LR
        # schedule is the same whatever the number of processes.
        scheduler = self._scheduler(optimizer, total)

        step, epoch, skip = 0, 0, 0
        if resume:
            state = self._restore(acc, optimizer, scheduler)
            if state is not None:
                step, epoch, skip = state["step"], state["epoch"], state["batches_done"]
                self._prior = (float(state.get("elapsed_s", 0.0)), float(state.get("cpu_s", 0.0)))
                if acc.is_main_process:
                    self._truncate_metrics(step)
                    print(f"resuming from {state['path']} (step {step}, epoch {epoch}, batch {skip})", flush=True)
            elif acc.is_main_process:
                self._truncate_metrics(0)  # nothing to resume: start the log afresh
            acc.wait_for_everyone()

        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=step, disable=not (acc.is_local_main_process and cfg.progress),
                   desc="train", dynamic_ncols=True)
        run_loss, run_n, run_metrics = 0.0, 0, {}  # type: ignore[var-annotated]
        last_metrics: dict[str, float] = {}
        last_eval: dict[str, float] = {}
        last_saved = step if resume and step > 0 else -1
        model.train()
        stopped = False
        batches_done = skip
        while step < total and not stopped:
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(epoch)  # type: ignore[attr-defined]
            loader_gen.manual_seed(cfg.seed * 7919 + epoch)  # worker seeds depend on (seed, epoch) only
            loader.set_epoch(epoch)
            it = acc.skip_first_batches(loader, skip) if skip else loader
            if skip:
                it.set_epoch(epoch)
            batches_done = skip
            skip = 0
            for batch in it:
                with acc.accumulate(model):
                    loss, metrics = self.loss_fn(model, batch)
                    acc.backward(loss)
                    if acc.sync_gradients and cfg.grad_clip > 0:
                        acc.clip_grad_norm_([p for _, p in named], cfg.grad_clip)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                batches_done += 1
                run_loss += float(loss.detach().float().item())
                run_n += 1
                for k, v in (metrics or {}).items():
                    run_metrics[k] = run_metrics.get(k, 0.0) + _to_float(v)
                if not acc.sync_gradients:
                    continue
                if not acc.optimizer_step_was_skipped:
                    scheduler.step()
                step += 1
                bar.update(1)
                if (cfg.log_every > 0 and step % cfg.log_every == 0) or step == total:
                    mean_loss = acc.reduce(torch.tensor(run_loss / max(run_n, 1), device=acc.device), "mean").item()
                    last_metrics = {"loss": mean_loss, **{k: v / max(run_n, 1) for k, v in run_metrics.items()}}
                    row = {"step": step, "epoch": epoch, "lr": scheduler.get_last_lr()[0], **last_metrics}
                    self._log(acc, row)
                    bar.set_postfix(loss=f"{mean_loss:.4f}")
                    run_loss, run_n, run_metrics = 0.0, 0, {}
                if cfg.eval_every > 0 and step % cfg.eval_every == 0 and step < total:
                    last_eval = self._evaluate(acc, step)
                if stop_after_steps is not None and step >= stop_after_steps:
                    stopped = True
                    break
                if cfg.save_every > 0 and step % cfg.save_every == 0 and step < total:
                    self._save(acc, optimizer, scheduler, step, epoch, batches_done, batches_per_epoch)
                    last_saved = step
                if step >= total:
                    break
            else:
                epoch, batches_done = epoch + 1, 0
                continue
            if batches_done >= batches_per_epoch:
                epoch, batches_done = epoch + 1, 0
        bar.close()
        finished = step >= total and not stopped
        if finished:
            last_eval = self._evaluate(acc, step) if self.eval_fn is not None else last_eval
            if last_saved != step:
                self._save(acc, optimizer, scheduler, step, epoch, batches_done, batches_per_epoch)
            if acc.is_main_process:
                plot_learning_curve(self.output_dir / METRICS_FILE, self.output_dir / CURVE_FILE)
        acc.wait_for_everyone()
        return TrainResult(step=step, total_steps=total, finished=finished, last_metrics=last_metrics,
                           last_eval=last_eval, output_dir=self.output_dir, wall_time_s=self._elapsed(),
                           cpu_time_s=self._cpu())

    def unwrapped_model(self) -> torch.nn.Module:
        """The trained model without accelerate/DDP wrappers."""
        from accelerate.utils import extract_model_from_parallel

        return extract_model_from_parallel(self.model)
