"""Tests of the shared training loop: exact resume, atomic checkpoints, config parsing,
and multi-process runs under ``accelerate launch``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clipground.io import atomic_write
from clipground.training import ConfigError, TrainConfig, Trainer, apply_overrides, load_config
from clipground.training import checkpoint as C

# --------------------------------------------------------------------------- tiny problem


class TinyData(torch.utils.data.Dataset):
    """Deterministic regression data whose per-item noise depends on (epoch, index)."""

    def __init__(self, n: int = 40) -> None:
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(n, 6, generator=g)
        self.y = self.x @ torch.randn(6, 2, generator=g)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.epoch * 100_000 + i)
        return self.x[i] + 0.05 * torch.randn(6, generator=g), self.y[i]


def collate(items: list) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    # Dropout makes the result depend on the restored global RNG state.
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 2))


def loss_fn(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    x, y = batch
    loss = torch.nn.functional.mse_loss(model(x), y)
    return loss, {"mse": loss.detach()}


def cfg_for(out: Path, **kw) -> TrainConfig:
    base = dict(output_dir=str(out), seed=7, max_steps=13, batch_size=8, lr=1e-2, warmup_steps=3,
                save_every=4, log_every=2, eval_every=5, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    ckpt = C.find_latest_checkpoint(out)
    assert ckpt is not None
    return load_file(str(ckpt / C.WEIGHTS_FILE))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def run(out: Path, resume: bool = False, stop: int | None = None, **kw):
    evals = []

    def eval_fn(m):
        evals.append(1)
        with torch.no_grad():
            return {"w_norm": sum(p.norm() for p in m.parameters()).item()}

    t = Trainer(cfg_for(out, **kw), make_model(), TinyData(), collate, loss_fn, eval_fn=eval_fn)
    return t.fit(resume=resume, stop_after_steps=stop), t


# --------------------------------------------------------------------------- resume


def test_resume_after_kill_equals_uninterrupted(tmp_path: Path) -> None:
    full, _ = run(tmp_path / "full")
    assert full.finished and full.step == 13
    ref = final_weights(tmp_path / "full")

    # "Killed" after step 10 (5 batches/epoch: mid epoch 2); last checkpoint is step 8.
    part, _ = run(tmp_path / "part", stop=10)
    assert not part.finished
    assert C.find_latest_checkpoint(tmp_path / "part").name == C.checkpoint_name(8)
    resumed, _ = run(tmp_path / "part", resume=True)
    assert resumed.finished and resumed.step == 13
    assert max_diff(ref, final_weights(tmp_path / "part")) < 1e-6

    # The metrics log has no duplicated steps and matches the uninterrupted one.
    def rows(p: Path) -> list[dict]:
        return [json.loads(line) for line in (p / "metrics.jsonl").read_text().splitlines()]

    a, b = rows(tmp_path / "full"), rows(tmp_path / "part")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for k in ra:
            if isinstance(ra[k], float):
                assert ra[k] == pytest.approx(rb[k], abs=1e-6)
    assert (tmp_path / "full" / "learning_curve.png").stat().st_size > 1000


def test_resume_is_sensitive_to_state(tmp_path: Path) -> None:
    """The equality above is not vacuous: a different seed gives different weights."""
    run(tmp_path / "a")
    run(tmp_path / "b", seed=8)
    assert max_diff(final_weights(tmp_path / "a"), final_weights(tmp_path / "b")) > 1e-3


def test_grad_accumulation_resume(tmp_path: Path) -> None:
    run(tmp_path / "full", grad_accum_steps=2, max_steps=7, save_every=3)
    run(tmp_path / "part", grad_accum_steps=2, max_steps=7, save_every=3, stop=5)
    run(tmp_path / "part", grad_accum_steps=2, max_steps=7, save_every=3, resume=True)
    assert max_diff(final_weights(tmp_path / "full"), final_weights(tmp_path / "part")) < 1e-6


def test_partial_checkpoint_is_ignored(tmp_path: Path) -> None:
    run(tmp_path / "full")
    out = tmp_path / "part"
    run(out, stop=10)
    root = out / C.CHECKPOINT_DIR
    # A half-written temp dir (the run died while saving step 12) and a final-looking folder
    # without its trainer_state.json must both be ignored.
    tmp = root / (C.TMP_PREFIX + C.checkpoint_name(12))
    tmp.mkdir()
    (tmp / C.WEIGHTS_FILE).write_bytes(b"garbage")
    bogus = root / C.checkpoint_name(11)
    bogus.mkdir()
    (bogus / C.WEIGHTS_FILE).write_bytes(b"garbage")
    assert C.find_latest_checkpoint(out).name == C.checkpoint_name(8)
    (root / C.LATEST).unlink()  # even without the pointer the scan finds step 8
    assert C.find_latest_checkpoint(out).name == C.checkpoint_name(8)
    run(out, resume=True)
    assert not tmp.exists()
    assert max_diff(final_weights(tmp_path / "full"), final_weights(out)) < 1e-6


def test_atomic_write_leaves_old_file_on_failure(tmp_path: Path) -> None:
    p = tmp_path / "f.txt"
    atomic_write(p, "old")

    with pytest.raises(TypeError):
        atomic_write(p, 12345)  # type: ignore[arg-type]
    assert p.read_text() == "old"
    assert [q.name for q in tmp_path.iterdir()] == ["f.txt"]


def test_param_filter_trains_and_saves_only_selected(tmp_path: Path) -> None:
    model = make_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    t = Trainer(cfg_for(tmp_path, max_steps=4, eval_every=0), model, TinyData(), collate, loss_fn,
                param_filter=lambda n, p: n.startswith("3."))
    t.fit()
    after = dict(t.unwrapped_model().named_parameters())
    assert torch.equal(before["0.weight"], after["0.weight"].detach())
    assert not torch.equal(before["3.weight"], after["3.weight"].detach())
    assert set(final_weights(tmp_path)) == {"3.weight", "3.bias"}


# --------------------------------------------------------------------------- config


@dataclass
class ModelSection:
    hidden: int = 8
    layers: list[int] = field(default_factory=lambda: [1, 2])
    name: str | None = None


@dataclass
class BigConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelSection = field(default_factory=ModelSection)
    scale: float = 1.0


def test_yaml_and_overrides(tmp_path: Path) -> None:
    y = tmp_path / "c.yaml"
    y.write_text(textwrap.dedent("""
        train:
          lr: 3.0e-4
          mixed_precision: no      # YAML reads this as False; must come back as "no"
          batch_size: 16
        model:
          hidden: 32
        scale: 2
    """))
    cfg = load_config(BigConfig, y, ["train.max_steps=100", "hidden=64", "model.layers=3,4,5",
                                     "progress=false", "model.name=none", "warmup_steps=1e2"])
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.train.batch_size == 16
    assert cfg.train.mixed_precision == "no" and cfg.train.progress is False
    assert cfg.train.max_steps == 100 and cfg.train.warmup_steps == 100
    assert cfg.model.hidden == 64 and cfg.model.layers == [3, 4, 5] and cfg.model.name is None
    assert cfg.scale == 2.0 and isinstance(cfg.scale, float)
    flat = apply_overrides(TrainConfig(), ["adam_betas=0.8,0.95", "lr=0.5"])
    assert flat.adam_betas == (0.8, 0.95) and flat.lr == 0.5


@pytest.mark.parametrize("bad", ["nokey", "train.lr=abc", "unknown=1", "train.batch_size=1.5", "progress=maybe"])
def test_bad_overrides_raise(bad: str) -> None:
    with pytest.raises(ConfigError):
        load_config(BigConfig, None, [bad])


def test_bad_yaml_raises(tmp_path: Path) -> None:
    y = tmp_path / "c.yaml"
    y.write_text("train:\n  lrr: 1\n")
    with pytest.raises(ConfigError, match="train.lrr"):
        load_config(BigConfig, y)
    with pytest.raises(ConfigError, match="not found"):
        load_config(BigConfig, tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="mixed_precision"):
        Trainer(TrainConfig(mixed_precision="fp8"), make_model(), TinyData(), collate, loss_fn)


# --------------------------------------------------------------------------- real processes

SCRIPT = textwrap.dedent('''
    import sys, time, torch
    sys.path.insert(0, {test_dir!r})
    from test_trainer import TinyData, collate, loss_fn, make_model, cfg_for
    from clipground.training import Trainer
    from pathlib import Path
    out, resume, slow = Path(sys.argv[1]), sys.argv[2] == "1", float(sys.argv[3])

    def slow_loss(m, b):
        time.sleep(slow)
        return loss_fn(m, b)

    cfg = cfg_for(out, max_steps=int(sys.argv[4]), eval_every=0)
    Trainer(cfg, make_model(), TinyData(), collate, slow_loss).fit(resume=resume)
''')


def _script(tmp_path: Path) -> Path:
    s = tmp_path / "tiny_run.py"
    s.write_text(SCRIPT.format(test_dir=str(Path(__file__).parent)))
    return s


def test_sigkill_then_resume(tmp_path: Path) -> None:
    """A real process killed with SIGKILL after its first checkpoint resumes exactly."""
    script = _script(tmp_path)
    ref = tmp_path / "ref"
    subprocess.run([sys.executable, str(script), str(ref), "0", "0", "13"], check=True, timeout=120)
    out = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, str(script), str(out), "0", "0.15", "13"])
    try:
        deadline = time.time() + 120
        while C.find_latest_checkpoint(out) is None and time.time() < deadline and p.poll() is None:
            time.sleep(0.05)
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.wait(timeout=30)
    killed_at = C.find_latest_checkpoint(out)
    assert killed_at is not None and p.returncode == -signal.SIGKILL
    assert json.loads((killed_at / C.STATE_FILE).read_text())["step"] < 13
    subprocess.run([sys.executable, str(script), str(out), "1", "0", "13"], check=True, timeout=120)
    assert max_diff(final_weights(ref), final_weights(out)) < 1e-6


@pytest.mark.slow
def test_accelerate_launch_two_processes(tmp_path: Path) -> None:
    """The same loop runs as 2 CPU processes (gloo) under ``accelerate launch`` and resumes."""
    script = _script(tmp_path)
    # accelerate 1.x: `--cpu --num_processes 2` starts ONE process (its simple launcher has no
    # fan-out without mpirun); `--multi_gpu` goes through torchrun and, on a machine without
    # GPUs, the trainer asks accelerate for CPU, i.e. a gloo process group.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", "29517", str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    out = tmp_path / "ddp"
    r = subprocess.run(launch + [str(out), "0", "0", "6"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    state = json.loads((C.find_latest_checkpoint(out) / C.STATE_FILE).read_text())
    assert state["num_processes"] == 2 and state["step"] == 6
    assert (C.find_latest_checkpoint(out) / "rng-1.pt").is_file()
    r = subprocess.run(launch + [str(out), "1", "0", "9"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stdout
