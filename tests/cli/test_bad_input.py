"""Bad input at the command line: every user mistake ends in ONE ``error: ...`` line on
stderr and a non-zero exit, never a traceback.

The main cases run ``python -m clipground.cli.main predict`` in real subprocesses (all
started at once, since each pays the torch/transformers import); the full matrix of cases
runs the same entry point in-process, which is what the subprocess executes.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipground.backbone.clip import DEFAULT_BACKBONE
from clipground.images import MAX_PIXELS
from clipground.testing import assert_one_error_line, run_cli

HANG_GUARD_S = 300  # generous: a hang, not slowness, is what this catches


# --------------------------------------------------------------------------- input files


def _png_header_only(path: Path, width: int, height: int) -> Path:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def make_inputs(d: Path) -> dict[str, Path]:
    """Write one file per kind of bad (and one good) input into ``d``."""
    d.mkdir(parents=True, exist_ok=True)
    rs = np.random.RandomState(0)
    photo = Image.fromarray((rs.rand(120, 160, 3) * 255).astype(np.uint8))
    f = {"good": d / "good.png", "dir": d / "a_directory", "missing": d / "missing.jpg"}
    photo.save(f["good"])
    f["dir"].mkdir(exist_ok=True)
    f["text"] = d / "notes.jpg"
    f["text"].write_text("not an image\n")
    f["zero"] = d / "zero.png"
    f["zero"].write_bytes(b"")
    for fmt in ("jpg", "png"):
        full = d / f"full.{fmt}"
        photo.save(full)
        f[f"trunc_{fmt}"] = d / f"truncated.{fmt}"
        f[f"trunc_{fmt}"].write_bytes(full.read_bytes()[: int(full.stat().st_size * 0.8)])
    side = int(MAX_PIXELS**0.5) + 100
    f["huge"] = _png_header_only(d / "huge.png", side, side)
    f["bad_json"] = d / "bad.json"
    f["bad_json"].write_text("{not json")
    f["bad_coco"] = d / "bad_coco.json"
    f["bad_coco"].write_text(json.dumps({"images": [{"id": 1, "file_name": "good.png"}]}))
    f["bad_props"] = d / "bad_props.jsonl"
    f["bad_props"].write_text('{"image": "good.png", "boxes": [[1, 2, 3]]}\n')
    f["no_config_dir"] = d / "not_a_checkpoint"
    f["no_config_dir"].mkdir(exist_ok=True)
    return f


# --------------------------------------------------------------------------- subprocess cases


def _hub_really_reachable() -> bool:
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=3):
            return True
    except OSError:
        return False


def _base_env(hf_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE"):
        env.pop(k, None)
    env["HF_HOME"] = str(hf_home)  # empty cache: the default model is certainly not there
    env["PYTHONWARNINGS"] = "ignore"
    return env


def _run_concurrently(cases: dict[str, tuple[list[str], dict[str, str]]], cwd: Path) -> dict[str, tuple]:
    """Run ``python -m clipground.cli.main ARGS`` for every case at once.

    Returns ``name -> (returncode, stdout, stderr, seconds)``.
    """
    procs = {}
    for name, (args, env) in cases.items():
        procs[name] = (
            subprocess.Popen([sys.executable, "-m", "clipground.cli.main", *args], env=env, cwd=cwd,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
            time.perf_counter(),
        )
    results = {}
    try:
        for name, (p, t0) in procs.items():
            out, err = p.communicate(timeout=HANG_GUARD_S)
            results[name] = (p.returncode, out, err, time.perf_counter() - t0)
    finally:
        for p, _ in procs.values():
            if p.poll() is None:
                p.kill()
    return results


@pytest.fixture(scope="module")
def cli_runs(tiny_clip_dir, tmp_path_factory):
    """The main subprocess cases (bad image file, default hub backbone offline), run at once."""
    d = tmp_path_factory.mktemp("cli_bad")
    f = make_inputs(d)
    env = _base_env(d / "hf_home")
    offline_env = {**env, "HF_HUB_OFFLINE": "1"}
    # Without HF_HUB_OFFLINE: this machine has no internet; elsewhere point the hub at a
    # closed local port so the test never downloads a model.
    plain_env = dict(env) if not _hub_really_reachable() else {**env, "HF_ENDPOINT": "http://127.0.0.1:9"}
    cases = {
        "truncated": (["predict", str(f["trunc_jpg"]), "a cat", "-b", str(tiny_clip_dir)], env),
        "offline_hub": (["predict", str(f["good"]), "a cat"], offline_env),
        "offline_hub_no_env": (["predict", str(f["good"]), "a cat"], plain_env),
    }
    return _run_concurrently(cases, d)


def test_subprocess_truncated_image(cli_runs):
    code, out, err, _ = cli_runs["truncated"]
    assert_one_error_line(code, err, "truncated", "truncated.jpg")


@pytest.mark.parametrize("name", ["offline_hub", "offline_hub_no_env"])
def test_subprocess_default_backbone_offline(cli_runs, name):
    code, out, err, seconds = cli_runs[name]
    line = assert_one_error_line(code, err, DEFAULT_BACKBONE, "--backbone DIR")
    assert "local" in line and "directory" in line
    print(f"{name}: exit {code} after {seconds:.1f}s (including interpreter start and imports)")


def test_offline_message_is_the_same_with_and_without_hf_hub_offline(cli_runs):
    assert cli_runs["offline_hub"][2].strip() == cli_runs["offline_hub_no_env"][2].strip()


@pytest.mark.slow
def test_subprocess_bad_input_all_kinds(tiny_clip_dir, tmp_path):
    """Every bad-input kind through a real process (the in-process matrix below is the fast twin)."""
    f = make_inputs(tmp_path)
    env = _base_env(tmp_path / "hf_home")
    tiny = ["-b", str(tiny_clip_dir)]
    cases = {
        "missing": (["predict", str(f["missing"]), "a cat", *tiny], ["not found", "missing.jpg"]),
        "dir": (["predict", str(f["dir"]), "a cat", *tiny], ["holds no images"]),
        "text": (["predict", str(f["text"]), "a cat", *tiny], ["cannot read", "notes.jpg"]),
        "zero": (["predict", str(f["zero"]), "a cat", *tiny], ["empty"]),
        "trunc_png": (["predict", str(f["trunc_png"]), "a cat", *tiny], ["truncated"]),
        "huge": (["predict", str(f["huge"]), "a cat", *tiny], [f"limit of {MAX_PIXELS}"]),
        "empty_phrase": (["predict", str(f["good"]), "   ", *tiny], ["phrase is empty"]),
        "long_phrase": (["predict", str(f["good"]), "a" * 401, *tiny], ["too long"]),
        "bad_annotation": (["predict", str(f["good"]), "a cat", *tiny, "-p", f"gt:{f['bad_json']}"], ["not valid JSON"]),
        "usage": (["predict"], ["Error:"]),
    }
    results = _run_concurrently({k: (a, env) for k, (a, _) in cases.items()}, tmp_path)
    for name, (_, needles) in cases.items():
        code, out, err, _ = results[name]
        if name == "usage":
            assert code not in (0, None) and "Traceback" not in err and "Error:" in err
        else:
            assert_one_error_line(code, err, *needles)


# --------------------------------------------------------------------------- in-process matrix


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    return make_inputs(tmp_path_factory.mktemp("inputs"))


@pytest.mark.parametrize(
    "key,extra,phrase,needles",
    [
        ("missing", [], "a cat", ["not found"]),
        ("dir", [], "a cat", ["holds no images"]),
        ("text", [], "a cat", ["cannot read"]),
        ("zero", [], "a cat", ["empty"]),
        ("trunc_jpg", [], "a cat", ["truncated"]),
        ("trunc_png", [], "a cat", ["truncated"]),
        ("huge", [], "a cat", [f"limit of {MAX_PIXELS}"]),
        ("good", [], "", ["phrase is empty"]),
        ("good", [], " \t\n ", ["phrase is empty"]),
        ("good", [], "a" * 401, ["too long", "characters"]),
        ("good", [], "{too_many_tokens}", ["too long", "tokens"]),
        ("good", ["-p", "gt:{bad_json}"], "a cat", ["not valid JSON"]),
        ("good", ["-p", "gt:{bad_coco}"], "a cat", ["not a COCO instances file"]),
        ("good", ["-p", "gt:{missing}"], "a cat", ["not found"]),
        ("good", ["-p", "file:{bad_props}"], "a cat", ["malformed"]),
        ("good", ["-p", "nope"], "a cat", ["unknown proposal source"]),
        ("good", ["-m", "nope"], "a cat", ["unknown method"]),
        ("good", ["-o", "nonsense"], "a cat", ["key=value"]),
        ("good", ["-o", "no_such_option=1"], "a cat", ["unknown option"]),
    ],
)
def test_cli_bad_input(key, extra, phrase, needles, inputs, tiny_clip_dir, monkeypatch, capsys):
    extra = [a.format(**{k: str(v) for k, v in inputs.items()}) for a in extra]
    if phrase == "{too_many_tokens}":  # under the character limit, over the checkpoint's token context
        limit = json.loads((tiny_clip_dir / "config.json").read_text())["text_config"]["max_position_embeddings"]
        phrase = "x" * (limit - 1)  # the character-level tokenizer adds start and end tokens
    code, out, err = run_cli(["predict", str(inputs[key]), phrase, "-b", str(tiny_clip_dir), *extra], monkeypatch, capsys)
    assert_one_error_line(code, err, *needles)


@pytest.mark.parametrize(
    "backbone,needles",
    [
        ("./no/such/checkpoint", ["not found"]),
        ("{no_config_dir}", ["no config.json"]),
    ],
)
def test_cli_bad_backbone(backbone, needles, inputs, monkeypatch, capsys):
    backbone = backbone.format(**{k: str(v) for k, v in inputs.items()})
    code, out, err = run_cli(["predict", str(inputs["good"]), "a cat", "-b", backbone], monkeypatch, capsys)
    assert_one_error_line(code, err, *needles)


@pytest.mark.parametrize("args", [["predict"], ["predict", "x.png", "a cat", "--bogus"], ["no-such-command"]])
def test_cli_usage_error_is_not_a_traceback(args, monkeypatch, capsys):
    code, out, err = run_cli(args, monkeypatch, capsys)
    assert code not in (0, None) and "Traceback" not in err and "Error:" in err


def test_cli_good_input_succeeds(inputs, tiny_clip_dir, monkeypatch, capsys):
    """The same harness passes on good input, so the failures above are real."""
    code, out, err = run_cli(["predict", str(inputs["good"]), "a cat", "-b", str(tiny_clip_dir), "--json", "-"],
                             monkeypatch, capsys)
    assert code == 0, err
    payload = json.loads(out)
    assert payload["image_size"] == [160, 120] and len(payload["predictions"]) == 1


# --------------------------------------------------------------------------- library level


@pytest.mark.parametrize(
    "phrase,match",
    [("", "empty"), ("   \t\n", "empty"), ("a" * 401, "too long: 401 characters"), (None, "must be a string"), (3, "string")],
)
def test_check_phrase_refuses(phrase, match):
    from clipground.phrases import check_phrase
    from clipground.errors import BadPhraseError

    with pytest.raises(BadPhraseError, match=match):
        check_phrase(phrase)


def test_check_phrase_accepts_and_normalizes():
    from clipground.phrases import MAX_PHRASE_CHARS, check_phrase

    assert check_phrase("  the   red\tmug \n") == "the red mug"
    assert len(check_phrase("a" * MAX_PHRASE_CHARS)) == MAX_PHRASE_CHARS


def test_token_limit_is_enforced_by_the_backbone(tiny_clip_dir):
    from clipground.backbone import ClipBackbone
    from clipground.errors import BadPhraseError

    bb = ClipBackbone.from_pretrained(tiny_clip_dir)
    limit = bb.max_text_tokens
    bb.tokenize(["x" * (limit - 2)])  # start + end tokens: exactly at the limit
    with pytest.raises(BadPhraseError, match=f"became {limit + 1} tokens, the limit is {limit}"):
        bb.tokenize(["x" * (limit - 1)])
    with pytest.raises(BadPhraseError):
        bb.text_embeds(["ok", "y" * (limit + 10)])  # one bad phrase in a batch is named, not truncated


def test_grounder_refuses_bad_phrases(tiny_clip_dir):
    from clipground.errors import BadPhraseError, ClipgroundError
    from clipground.grounder import Grounder

    g = Grounder.load("zero-shot", backbone=tiny_clip_dir, proposals="selective-search")
    with pytest.raises(ClipgroundError, match="set_image"):
        g.predict("a cat")
    g.set_image(np.full((40, 60, 3), 128, np.uint8))
    for bad in ("", "  ", "z" * 500):
        with pytest.raises(BadPhraseError):
            g.predict(bad)
    with pytest.raises(ClipgroundError, match="list of phrases"):
        g.predict_batch("a cat")


def test_resolve_checkpoint_offline_library_level(monkeypatch, tmp_path):
    import huggingface_hub

    from clipground.backbone import resolve_checkpoint
    from clipground.errors import CheckpointNotFoundError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)  # not cached
    with pytest.raises(CheckpointNotFoundError, match="openai/clip-vit-base-patch32") as ei:
        resolve_checkpoint(DEFAULT_BACKBONE)
    assert "--backbone DIR" in str(ei.value) and "\n" not in str(ei.value)
    with pytest.raises(CheckpointNotFoundError, match="not found"):
        resolve_checkpoint(str(tmp_path / "nope"))
    with pytest.raises(CheckpointNotFoundError, match="config.json"):
        resolve_checkpoint(tmp_path)
