"""The Ray engine: ``predict``, ``eval`` and ``cache build`` on 2 local Ray workers write the same
files, byte for byte, as the single-process run; killed runs resume; without Ray, one clear error.

Float sums on the CPU depend on the number of threads, so the single-process reference runs
with the workers' thread count (one each: 2 CPUs, 2 workers). Ray starts once for the module
(``num_cpus=2``) and is shut down after it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from clipground.distributed import (RAY_MISSING, MemoryStore, RayEngine, ShardStore, engine_from_options,
                                    run_fingerprint, shard_bounds)
from clipground.errors import ClipgroundError, ConfigError
from clipground.testing import assert_one_error_line, run_cli


def _images(root: Path, n: int = 5) -> list[Path]:
    rs = np.random.RandomState(0)
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        im = Image.fromarray((rs.rand(56 + 4 * i, 72, 3) * 60 + 90).astype(np.uint8))
        d = ImageDraw.Draw(im)
        for _ in range(3):
            x, y = rs.randint(0, 40), rs.randint(0, 26)
            d.rectangle([x, y, x + rs.randint(10, 28), y + rs.randint(10, 28)],
                        fill=tuple(int(c) for c in rs.randint(0, 255, 3)))
        out.append(root / f"im{i}.png")
        im.save(out[-1])
    return out


def _annotations(tmp_path: Path) -> Path:
    imgs = _images(tmp_path / "data")
    lines = []
    for i, p in enumerate(imgs):
        for phrase in ("the red square", "a blue shape on the left"):
            lines.append({"image": p.name, "expression": phrase, "box": [4, 4, 30 + i, 30], "split": "val"})
    lines.insert(3, {"image": "gone.png", "expression": "nothing", "box": [0, 0, 5, 5], "split": "val"})
    (tmp_path / "data" / "broken.png").write_bytes(b"not an image")
    lines.insert(5, {"image": "broken.png", "expression": "nothing", "box": [0, 0, 5, 5], "split": "val"})
    ann = tmp_path / "data" / "ann.jsonl"
    ann.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return ann


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.fixture()
def one_thread():
    """The single-process reference at the Ray workers' thread count (1 CPU each)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------- without Ray


def test_engine_options_and_shards():
    assert engine_from_options("local") is None
    with pytest.raises(ConfigError, match="--engine must be one of"):
        engine_from_options("spark")
    with pytest.raises(ConfigError, match="need --engine ray"):
        engine_from_options("local", address="auto")
    with pytest.raises(ConfigError):
        RayEngine(workers=-1)
    # Shards start at multiples of the image batch (the same encode batches as one process).
    assert shard_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert shard_bounds(10, 3, multiple=4) == [(0, 4), (4, 8), (8, 10)]
    assert shard_bounds(0, 3) == []


def test_shard_store_resumes_only_its_own_run(tmp_path):
    fp = run_fingerprint(kind="x", images=["a", "b"])
    s = ShardStore(tmp_path / "s", fp)
    s.write(1, b"one")
    again = ShardStore(tmp_path / "s", fp)
    assert again.done() == {1} and again.read(1) == b"one" and again.stale == 0
    other = ShardStore(tmp_path / "s", run_fingerprint(kind="x", images=["a", "c"]))
    assert other.done() == set() and other.stale == 1
    other.remove()
    assert not (tmp_path / "s").exists()
    m = MemoryStore()
    m.write(0, b"z")
    assert m.done() == {0} and m.read(0) == b"z"


def test_engine_ray_without_ray_is_one_clear_error(tiny_clip_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ClipgroundError, match=r"pip install 'clipground\[ray\]'"):
        engine_from_options("ray")
    d = tmp_path / "imgs"
    _images(d, 2)
    for args in (["predict", str(d), "a shape", "-b", str(tiny_clip_dir), "--engine", "ray"],
                 ["eval", str(_annotations(tmp_path)), "-b", str(tiny_clip_dir), "--engine", "ray"],
                 ["cache", "build", "--data", str(tmp_path / "data" / "ann.jsonl"), "--out", str(tmp_path / "c"),
                  "-b", str(tiny_clip_dir), "--engine", "ray"]):
        code, _, err = run_cli(args, monkeypatch, capsys)
        assert_one_error_line(code, err, RAY_MISSING)


def test_what_the_cli_ships_to_each_actor(tiny_clip_dir):
    """The loaders the CLI hands the actors pickle, and build the driver's grounder / backbone."""
    import pickle

    from clipground.backbone import ClipBackbone
    from clipground.cli.cache import worker_models
    from clipground.cli.common import grounder_loader
    from clipground.proposals import get_proposals

    load = pickle.loads(pickle.dumps(grounder_loader(RayEngine(), "zero-shot", str(tiny_clip_dir),
                                                     "selective-search", ["views=crop"], "torch")))
    g = load()
    assert g.method.config.views == ("crop",) and str(g.backbone.device) == "cpu"
    assert load.args[-1] == "cpu" and grounder_loader(RayEngine(gpus=1), "m", "b", "p", None).args[-1] == "cuda"
    bb, props = worker_models(str(tiny_clip_dir), get_proposals("selective-search", top_k=3))
    assert isinstance(bb, ClipBackbone) and props.top_k == 3


# --------------------------------------------------------------------------- on Ray


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster (2 CPUs) for this module's tests, shut down after them."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        pytest.skip("Ray is not installed (pip install 'clipground[ray]'; CI installs it with the dev extra)")
    import logging

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    yield ray
    ray.shutdown()


RAY = ["--engine", "ray", "--ray-workers", "2", "--shard-size", "2"]


def test_eval_on_two_ray_workers_writes_the_same_files(ray_cluster, tiny_clip_dir, tmp_path, monkeypatch, capsys,
                                                         one_thread):
    ann = _annotations(tmp_path)
    base = ["eval", str(ann), "-b", str(tiny_clip_dir), "--no-progress", "--examples", "4", "-o", "views=crop,blur"]
    code, _, err = run_cli(base + ["--out", str(tmp_path / "local")], monkeypatch, capsys)
    assert code == 0, err
    code, _, err = run_cli(base + ["--out", str(tmp_path / "ray"), *RAY], monkeypatch, capsys)
    assert code == 0, err
    local, ray = _files(tmp_path / "local"), _files(tmp_path / "ray")
    assert sorted(local) == sorted(ray) == ["examples.png", "metrics.json", "metrics.md", "metrics.png",
                                            "predictions.jsonl"]
    assert not (tmp_path / "ray" / ".shards").exists()  # merged, then removed
    for name in ("predictions.jsonl", "metrics.md", "metrics.png", "examples.png"):
        assert local[name] == ray[name], name
    # metrics.json: every byte but the wall-clock timing block (which differs between any two runs).
    a, b = json.loads(local["metrics.json"]), json.loads(ray["metrics.json"])
    ta, tb = a.pop("timing"), b.pop("timing")
    assert json.dumps(a, indent=2) == json.dumps(b, indent=2)
    assert tb["engine"] == "ray" and tb["ray_workers"] == 2 and "engine" not in ta
    assert a["counts"]["failed_images"] == 1 and a["counts"]["scored"] == 10


def test_predict_on_two_ray_workers_writes_the_same_jsonl_and_resumes(ray_cluster, tiny_clip_dir, tmp_path,
                                                                       monkeypatch, capsys, one_thread):
    import clipground.distributed as D

    d = tmp_path / "imgs"
    _images(d, 5)
    (d / "broken.png").write_bytes(b"not an image")
    base = ["predict", str(d), "the red square", "a shape", "-b", str(tiny_clip_dir), "--no-progress",
            "--image-batch", "2"]
    code, _, err = run_cli(base + ["--json", str(tmp_path / "local.jsonl")], monkeypatch, capsys)
    assert code == 0, err
    local = (tmp_path / "local.jsonl").read_bytes()
    assert len(local.splitlines()) == 6 and b"error" in local.splitlines()[0]  # broken.png sorts first

    # Shards 0 and 2 of 3 finish on the 2 workers, then the run is killed: they are kept, nothing is merged.
    real, calls = D.map_shards, []

    def killed(engine, load, work, shards, todo, on_result):
        calls.append(list(todo))
        real(engine, load, work, shards, [i for i in todo if i != 1], on_result)
        raise KeyboardInterrupt

    monkeypatch.setattr(D, "map_shards", killed)
    out = tmp_path / "ray.jsonl"
    code, _, err = run_cli(base + ["--json", str(out), *RAY], monkeypatch, capsys)
    assert code == 130 and calls == [[0, 1, 2]] and not out.exists(), err
    assert sorted(p.name for p in (tmp_path / "ray.jsonl.shards").glob("shard-*")) == ["shard-00000.bin",
                                                                                      "shard-00002.bin"]

    # The rerun computes only shard 1 and merges exactly the single-process file.
    def counting(engine, load, work, shards, todo, on_result):
        calls.append(list(todo))
        return real(engine, load, work, shards, todo, on_result)

    monkeypatch.setattr(D, "map_shards", counting)
    code, _, err = run_cli(base + ["--json", str(out), *RAY], monkeypatch, capsys)
    assert code == 0, err
    assert calls[1:] == [[1]]
    assert out.read_bytes() == local
    assert not (tmp_path / "ray.jsonl.shards").exists()


def test_cache_build_on_two_ray_workers_resumes_byte_identical(ray_cluster, tiny_clip_dir, tmp_path, one_thread):
    from clipground.backbone import ClipBackbone
    from clipground.cache import CacheSpec, FeatureCache
    from clipground.data.loaders import load_records
    from clipground.proposals import get_proposals

    ann = _annotations(tmp_path)
    records = [r for r in load_records(ann).records if "broken" not in r.image]
    bb = ClipBackbone.from_pretrained(tiny_clip_dir)
    props = get_proposals("selective-search", top_k=6)
    spec = CacheSpec(views=("crop", "blur"), shard_size=2, text_shard_size=3)
    FeatureCache.build(tmp_path / "local", records, bb, props, spec, progress=False)

    # Killed in its second shard (the first is listed), then resumed on 2 Ray workers.
    class Killed(Exception):
        pass

    def kill(kind, done, total):
        if kind == "images" and done >= 3:
            raise Killed

    with pytest.raises(Killed):
        FeatureCache.build(tmp_path / "ray", records, bb, props, spec, progress=False, callback=kill)
    assert len(json.loads((tmp_path / "ray" / "index.json").read_text())["image_shards"]) == 1
    FeatureCache.build(tmp_path / "ray", records, bb, props, spec, progress=False, engine=RayEngine(workers=2))
    assert _files(tmp_path / "ray") == _files(tmp_path / "local")  # index, image and text shards
    assert len(json.loads((tmp_path / "ray" / "index.json").read_text())["image_shards"]) == 3
