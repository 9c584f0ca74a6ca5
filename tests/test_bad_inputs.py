"""Bad input of every kind ends in a typed error that says what is wrong (or a correct result).

The matrix: annotation files of each format with each type confusion, phrases (empty,
undecodable, control characters, too long in characters or tokens), image arrays, crafted
pickles in every place clipground reads one (ReSC split files in both torch formats,
refer ``refs(*).p``, training checkpoints on resume, a ``pytorch_model.bin`` backbone),
boxes outside their image, and images too small for any candidate box. Pickle cases
assert that the payload did NOT run. CLI cases run the in-process entry point: exit code
2, no traceback, one ``error:`` line. (Bad image FILES on the command line are covered by
``tests/cli/test_bad_input.py``.)

What did not exist before (``clipground.phrases``, the CLI helpers in
``clipground.testing``) is imported inside the tests, so each test fails on its own
against old code.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from clipground.data import load_records
from clipground.errors import (
    BadAnnotationError,
    BadImageError,
    BadPhraseError,
    CheckpointNotFoundError,
    ClipgroundError,
)
from clipground.images import load_image

# --------------------------------------------------------------------------- crafted pickles


class Payload:
    """Unpickling this creates ``marker``: proof that a loader ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def _assert_refused(exc: BaseException, path: Path, marker: Path) -> None:
    assert isinstance(exc, ClipgroundError), type(exc)
    msg = str(exc)
    assert str(path) in msg and "refusing to load it" in msg and "run code" in msg, msg
    assert "\n" not in msg
    assert not marker.exists(), "the pickle's code ran"


def _write_img(path: Path, size: tuple[int, int] = (64, 48), exif_orientation: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", size, (120, 130, 140))
    if exif_orientation is None:
        im.save(path)
    else:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        im.save(path, exif=exif.tobytes())
    return path


def _coco(**over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "images": [{"id": 1, "file_name": "a.png"}],
        "annotations": [{"id": 10, "image_id": 1, "bbox": [1, 2, 10, 10], "category_id": 1}],
        "categories": [{"id": 1, "name": "cup"}],
    }
    d.update(over)
    return d


def _instances(tmp: Path) -> None:
    (tmp / "instances.json").write_text(json.dumps(_coco()))


@pytest.mark.parametrize("zip_format", [False, True], ids=["legacy-pickle", "torch-zip"])
def test_crafted_resc_split_file_is_refused(tmp_path: Path, zip_format: bool) -> None:
    marker = tmp_path / "MARKER"
    path = tmp_path / "gref_umd_val.pth"
    torch.save([("a.jpg", "m.pth", [1, 2, 3, 4], "a cat", Payload(marker))], path,
               _use_new_zipfile_serialization=zip_format)
    with pytest.raises(ClipgroundError) as ei:
        load_records(path, require_images=False)
    _assert_refused(ei.value, path, marker)
    assert "split file" in str(ei.value)


def test_crafted_refer_pickle_is_refused(tmp_path: Path) -> None:
    import pickle

    marker = tmp_path / "MARKER"
    _instances(tmp_path)
    path = tmp_path / "refs(umd).p"
    path.write_bytes(pickle.dumps([{"ref_id": 1, "x": Payload(marker)}], protocol=2))
    with pytest.raises(ClipgroundError) as ei:
        load_records(tmp_path, require_images=False)  # the folder, as a user passes it
    _assert_refused(ei.value, path, marker)


@pytest.mark.parametrize("kind", ["resc", "refer"])
def test_crafted_pickle_through_clipground_eval(kind: str, tmp_path: Path, tiny_clip_dir: Path,
                                                monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from clipground.testing import assert_one_error_line, run_cli
    import pickle

    marker = tmp_path / "MARKER"
    if kind == "resc":
        path = tmp_path / "unc_val.pth"
        torch.save([("a.jpg", [1, 2, 3, 4], "a cat", Payload(marker))], path, _use_new_zipfile_serialization=False)
    else:
        _instances(tmp_path)
        path = tmp_path / "refs(unc).p"
        path.write_bytes(pickle.dumps([Payload(marker)], protocol=2))
    code, _, err = run_cli(["eval", str(path), "-b", str(tiny_clip_dir), "--out", str(tmp_path / "out")],
                           monkeypatch, capsys)
    assert_one_error_line(code, err, str(path), "refusing to load it")
    assert code == 2 and not marker.exists()


# --------------------------------------------------------------------------- checkpoints


class _Data(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        return torch.randn(3, generator=g), torch.randn(1, generator=g)


def _collate(items: list) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])


def _loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    x, y = batch
    loss = torch.nn.functional.mse_loss(model(x), y)
    return loss, {}


def _trainer(out: Path, max_steps: int) -> Any:
    from clipground.training import TrainConfig, Trainer

    cfg = TrainConfig(output_dir=str(out), seed=3, max_steps=max_steps, batch_size=4, save_every=2, log_every=1,
                      eval_every=0, progress=False)
    torch.manual_seed(0)
    return Trainer(cfg, torch.nn.Linear(3, 1), _Data(), _collate, _loss)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run stopped after its step-2 checkpoint (the folder a user would --resume)."""
    out = tmp_path_factory.mktemp("run") / "run"
    _trainer(out, max_steps=4).fit(stop_after_steps=3)
    return out


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng-0.pt"])
def test_crafted_checkpoint_file_is_refused_on_resume(name: str, trained_run: Path, tmp_path: Path) -> None:
    from clipground.training import checkpoint as C

    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    ckpt = C.find_latest_checkpoint(out)
    assert ckpt is not None
    marker = tmp_path / "MARKER"
    torch.save({"state": Payload(marker)}, ckpt / name)
    with pytest.raises(ClipgroundError) as ei:
        _trainer(out, max_steps=4).fit(resume=True)
    _assert_refused(ei.value, ckpt / name, marker)


def test_untampered_checkpoint_resumes(trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    result = _trainer(out, max_steps=4).fit(resume=True)
    assert result.step == 4


def test_rng_states_round_trip_through_the_restricted_loader(tmp_path: Path) -> None:
    """Checkpoint RNG files load with plain ``weights_only`` and restore the exact streams."""
    from clipground.training import checkpoint as C

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.randn()  # leave cached gaussians in both states
    C.write_rng_file(tmp_path, 0)
    expected = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    state = torch.load(tmp_path / "rng-0.pt", weights_only=True)  # torch's own, no allowlist
    C.set_rng_state(state)
    got = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3))
    assert got[:4] == expected[:4] and torch.equal(got[4], expected[4])


def test_rng_files_of_older_checkpoints_still_restore(tmp_path: Path) -> None:
    """RNG files written before (python tuples, numpy arrays) load through the restricted loader."""
    from clipground.io import load_torch_data
    from clipground.training import checkpoint as C

    random.seed(4), np.random.seed(5), torch.manual_seed(6)
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
               tmp_path / "rng-0.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    C.set_rng_state(load_torch_data(tmp_path / "rng-0.pt"))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


# --------------------------------------------------------------------------- backbone with a pickled bin


def _bin_backbone(tiny_clip_dir: Path, dest: Path, payload: Payload | None = None) -> Path:
    from safetensors.torch import load_file

    shutil.copytree(tiny_clip_dir, dest)
    state: dict[str, Any] = load_file(str(dest / "model.safetensors"))
    if payload is not None:
        state["evil"] = payload
    torch.save(state, dest / "pytorch_model.bin")
    (dest / "model.safetensors").unlink()
    return dest


def test_backbone_with_plain_pytorch_model_bin_works(tiny_clip_dir: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from clipground.testing import run_cli
    d = _bin_backbone(tiny_clip_dir, tmp_path / "clip")
    img = _write_img(tmp_path / "img.png", (40, 30))
    code, out, err = run_cli(["predict", str(img), "a cup", "-b", str(d), "--json", "-"], monkeypatch, capsys)
    assert code == 0, err
    assert len(json.loads(out)["predictions"]) == 1


def test_backbone_with_crafted_pytorch_model_bin_is_refused(tiny_clip_dir: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture) -> None:
    from clipground.testing import assert_one_error_line, run_cli
    from clipground.backbone import ClipBackbone

    marker = tmp_path / "MARKER"
    d = _bin_backbone(tiny_clip_dir, tmp_path / "clip", Payload(marker))
    with pytest.raises(CheckpointNotFoundError, match="safetensors") as ei:
        ClipBackbone.from_pretrained(d)
    assert str(d) in str(ei.value) and "\n" not in str(ei.value)
    img = _write_img(tmp_path / "img.png", (40, 30))
    code, _, err = run_cli(["predict", str(img), "a cup", "-b", str(d)], monkeypatch, capsys)
    assert_one_error_line(code, err, str(d), "pytorch_model.bin", "safetensors")
    assert code == 2 and not marker.exists()


def test_backbone_with_truncated_weights_is_one_error(tiny_clip_dir: Path, tmp_path: Path) -> None:
    from clipground.backbone import ClipBackbone

    d = tmp_path / "clip"
    shutil.copytree(tiny_clip_dir, d)
    weights = d / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointNotFoundError, match="complete save_pretrained CLIP folder") as ei:
        ClipBackbone.from_pretrained(d)
    assert str(d) in str(ei.value) and "\n" not in str(ei.value)


# --------------------------------------------------------------------------- real and Python-2 data


def test_real_resc_split_file_still_loads(shared_data: Path) -> None:
    res = load_records(shared_data / "refcoco" / "gref_umd_val.pth", require_images=False)
    assert res.total == len(res.records) == 4896
    assert res.records[0].expression == "the torso of a brown furry teddy bear wearing a red ribbon"


def _py2_str(text: str) -> bytes:
    """A Python 2 ``str`` in a protocol-2 pickle: SHORT_BINSTRING holding raw UTF-8 bytes."""
    raw = text.encode("utf-8")
    assert len(raw) < 256
    return b"U" + bytes([len(raw)]) + raw


def _py2_int(v: int) -> bytes:
    return b"J" + v.to_bytes(4, "little", signed=True)  # BININT


def _py2_dict(items: dict[str, bytes]) -> bytes:
    return b"}(" + b"".join(_py2_str(k) + v for k, v in items.items()) + b"u"  # EMPTY_DICT MARK ... SETITEMS


def test_python2_refs_pickle_loads_and_repairs_text(tmp_path: Path) -> None:
    """A refs(umd).p as Python 2 wrote it (byte strings, protocol 2) loads; UTF-8 text is repaired."""
    _write_img(tmp_path / "a.png")
    _instances(tmp_path)
    sentence = "the café chair — left of the crème brûlée"
    sent = _py2_dict({"sent": _py2_str(sentence), "sent_id": _py2_int(5), "tokens": b"](" + _py2_str("café") + b"e"})
    ref = _py2_dict({"ref_id": _py2_int(1), "ann_id": _py2_int(10), "image_id": _py2_int(1), "split": _py2_str("val"),
                     "category_id": _py2_int(1), "sentences": b"](" + sent + b"e"})
    (tmp_path / "refs(umd).p").write_bytes(b"\x80\x02](" + ref + b"e.")
    res = load_records(tmp_path)
    assert res.format == "refer" and len(res.records) == 1
    r = res.records[0]
    assert (r.expression, r.split, r.box) == (sentence, "val", [1.0, 2.0, 11.0, 12.0])


# --------------------------------------------------------------------------- bad annotation files


def _jsonl(*lines: str | bytes) -> bytes:
    return b"".join((ln if isinstance(ln, bytes) else ln.encode()) + b"\n" for ln in lines)


GOOD_LINE = '{"image": "a.png", "expression": "a cup", "box": [1, 2, 10, 12]}'
BAD_FILES: dict[str, tuple[str, str | None, bytes | str | dict | list, list[str]]] = {
    # name: (file name, format, content, needles)
    "jsonl-string": ("d.jsonl", None, _jsonl(GOOD_LINE, '"just a string"'), [":2:", "a string", "JSON object"]),
    "jsonl-number": ("d.jsonl", None, _jsonl("42"), [":1:", "a number", "JSON object"]),
    "jsonl-array": ("d.jsonl", None, _jsonl(GOOD_LINE, GOOD_LINE, "[1, 2, 3, 4]"), [":3:", "a list", "JSON object"]),
    "jsonl-null": ("d.jsonl", None, _jsonl("null"), [":1:", "null", "JSON object"]),
    "jsonl-latin1": ("d.jsonl", None, _jsonl(GOOD_LINE, '{"image": "a.png", "expression": "caf\xe9", "box": [1, 2, 3, 4]}'.encode("latin-1")),
                     [":2:", "not UTF-8", "0xe9"]),
    "jsonl-box-3": ("d.jsonl", None, _jsonl('{"image": "a.png", "expression": "x", "box": [1, 2, 3]}'), [":1:", "'box'", "4 numbers"]),
    "jsonl-box-str": ("d.jsonl", None, _jsonl('{"image": "a.png", "expression": "x", "box": "1 2 3 4"}'), [":1:", "'box'", "4 numbers"]),
    "jsonl-box-nested": ("d.jsonl", None, _jsonl('{"image": "a.png", "expression": "x", "box": [[1, 2, 3, 4]]}'), [":1:", "4 numbers"]),
    "jsonl-image-null": ("d.jsonl", None, _jsonl('{"image": null, "expression": "x", "box": [1, 2, 3, 4]}'), [":1:", "'image'", "file name"]),
    "jsonl-no-expression": ("d.jsonl", None, _jsonl('{"image": "a.png", "box": [1, 2, 3, 4]}'), [":1:", "'expression'"]),
    "jsonl-meta-list": ("d.jsonl", None, _jsonl('{"image": "a.png", "expression": "x", "box": [1, 2, 3, 4], "meta": [1]}'), [":1:", "'meta'"]),
    "jsonl-box-format-list": ("d.jsonl", None, _jsonl('{"image": "a.png", "expression": "x", "box": [1, 2, 3, 4], "box_format": ["xywh"]}'),
                              [":1:", "box_format"]),
    "jsonl-deep": ("d.jsonl", None, _jsonl("[" * 100_000 + "]" * 100_000), [":1:", "nested too deeply"]),
    "coco-images-object": ("c.json", None, _coco(images={"1": {"id": 1, "file_name": "a.png"}}), ["'images' is an object", "list"]),
    "coco-annotations-object": ("c.json", None, _coco(annotations={"id": 10}), ["'annotations' is an object"]),
    "coco-image-entry-list": ("c.json", None, _coco(images=[[1, "a.png"]]), ["images[0] is a list", "object"]),
    "coco-annotation-entry-string": ("c.json", None, _coco(annotations=["oops"]), ["annotations[0] is a string", "object"]),
    "coco-bbox-string": ("c.json", None, _coco(annotations=[{"image_id": 1, "bbox": "1,2,3,4"}]), ["annotations[0]", "'bbox'", "4 numbers"]),
    "coco-image-id-null": ("c.json", None, _coco(annotations=[{"image_id": None, "bbox": [1, 2, 3, 4]}]), ["annotations[0]", "'image_id'"]),
    "coco-file-name-number": ("c.json", None, _coco(images=[{"id": 1, "file_name": 7}]), ["images[0]", "'file_name'", "file name"]),
    "coco-categories-string": ("c.json", "coco", _coco(categories="cup"), ["'categories' is a string"]),
    "coco-top-level-list": ("c.json", "coco", [1, 2], ["top level is a list"]),
    "mdetr-images-object": ("finetune_refcocog_val.json", "mdetr", _coco(images={"a": 1}), ["MDETR", "'images' is an object"]),
    "mdetr-image-entry-number": ("finetune_refcocog_val.json", "mdetr", _coco(images=[3]), ["MDETR", "images[0] is a number"]),
    "mdetr-bbox-null": ("finetune_refcocog_val.json", None,
                        _coco(images=[{"id": 1, "file_name": "a.png", "caption": "a cup"}], annotations=[{"image_id": 1, "bbox": None}]),
                        ["MDETR", "annotations[0]", "'bbox' is null"]),
    "vg-top-level-object": ("region_descriptions.json", "visual-genome", {"regions": []}, ["expected a list", "an object"]),
    "vg-entry-string": ("region_descriptions.json", None, [{"id": 1, "regions": []}, "x"], ["entry 1", "a string"]),
    "vg-regions-object": ("region_descriptions.json", "visual-genome", [{"id": 1, "regions": {"x": 1}}], ["entry 0", "'regions' is an object"]),
    "vg-x-string": ("region_descriptions.json", None,
                    [{"id": 1, "regions": [{"x": "0", "y": 0, "width": 3, "height": 3, "phrase": "a"}]}], ["regions[0]", "'x'", "number"]),
    "resc-dict": ("unc_val.pth", None, {"a.jpg": [1, 2, 3, 4]}, ["expected a list", "dict"]),
    "resc-item-number": ("unc_val.pth", None, [3], ["item #0"]),
    "refer-refs-dict": ("refs(umd).p", None, {"refs": []}, ["expected a list of refs", "an object"]),
    "refer-ref-list": ("refs(umd).p", None, [[1, 2]], ["ref #0", "a list"]),
    "refer-sentences-string": ("refs(umd).p", None, [{"ann_id": 10, "image_id": 1, "sentences": "a cup"}], ["ref #0", "'sentences' is a string"]),
    "refer-unknown-ann": ("refs(umd).p", None, [{"ann_id": 99, "image_id": 1, "sentences": []}], ["ref #0", "ann_id 99"]),
    "refer-instances-images-object": ("refs(umd).p", None, [], ["instances.json", "'images' is an object"]),
}


def _write_bad(tmp: Path, name: str) -> tuple[Path, str | None, list[str]]:
    import pickle

    file_name, fmt, content, needles = BAD_FILES[name]
    path = tmp / file_name
    if file_name.endswith(".pth"):
        torch.save(content, path)
    elif file_name.endswith(".p"):
        path.write_bytes(pickle.dumps(content, protocol=2))
        inst = _coco(images={"1": 1}) if name == "refer-instances-images-object" else _coco()
        (tmp / "instances.json").write_text(json.dumps(inst))
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(json.dumps(content))
    return path, fmt, needles


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_annotation_file(name: str, tmp_path: Path) -> None:
    path, fmt, needles = _write_bad(tmp_path, name)
    with pytest.raises(BadAnnotationError) as ei:
        load_records(path, format=fmt or "auto", require_images=False)
    msg = str(ei.value)
    named = "instances.json" if name.startswith("refer-instances") else path.name  # the file that is wrong
    assert "\n" not in msg and named in msg, msg
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"


@pytest.mark.parametrize("name", ["jsonl-null", "jsonl-latin1", "coco-images-object", "vg-entry-string"])
def test_bad_annotation_file_through_clipground_eval(name: str, tmp_path: Path, tiny_clip_dir: Path,
                                                     monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from clipground.testing import assert_one_error_line, run_cli
    path, fmt, needles = _write_bad(tmp_path, name)
    args = ["eval", str(path), "-b", str(tiny_clip_dir), "--out", str(tmp_path / "out")] + (["-f", fmt] if fmt else [])
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert_one_error_line(code, err, path.name, *needles)
    assert code == 2


# --------------------------------------------------------------------------- expressions and boxes vs images


def test_null_and_non_string_expressions_are_invalid_not_scored(tmp_path: Path) -> None:
    _write_img(tmp_path / "a.png")
    lines = [GOOD_LINE] + [json.dumps({"image": "a.png", "expression": e, "box": [1, 2, 10, 12]})
                           for e in (None, 5, ["a", "cup"], {"text": "a cup"}, "", "   ")]
    (tmp_path / "d.jsonl").write_bytes(_jsonl(*lines))
    res = load_records(tmp_path / "d.jsonl")
    assert [r.expression for r in res.records] == ["a cup"]
    assert (res.total, res.invalid, res.kept) == (7, 6, 1)
    assert "6 with an invalid box or a missing/empty expression" in res.summary()


@pytest.mark.parametrize("fmt", ["coco", "mdetr", "visual-genome", "refer", "resc"])
def test_null_expression_in_every_format_is_invalid(fmt: str, tmp_path: Path) -> None:
    """No loader turns a null expression into the phrase "None"."""
    import pickle

    if fmt == "coco":
        path = tmp_path / "c.json"
        path.write_text(json.dumps(_coco(annotations=[{"image_id": 1, "bbox": [1, 2, 3, 4], "caption": 5}])))
    elif fmt == "mdetr":
        path = tmp_path / "finetune_refcocog_val.json"
        path.write_text(json.dumps(_coco(images=[{"id": 1, "file_name": "a.png", "caption": None}],
                                         annotations=[{"image_id": 1, "bbox": [1, 2, 3, 4]}])))
    elif fmt == "visual-genome":
        path = tmp_path / "region_descriptions.json"
        path.write_text(json.dumps([{"id": 1, "regions": [{"x": 0, "y": 0, "width": 3, "height": 3, "phrase": None}]}]))
    elif fmt == "refer":
        _instances(tmp_path)
        path = tmp_path / "refs(umd).p"
        path.write_bytes(pickle.dumps([{"ann_id": 10, "image_id": 1, "sentences": [{"sent": None}]}], protocol=2))
    else:
        path = tmp_path / "unc_val.pth"
        torch.save([("a.jpg", [1, 2, 3, 4], None, "the real expression is missing")], path)
    res = load_records(path, format=fmt, require_images=False)
    assert all(r.expression != "None" for r in res.records)
    if fmt != "resc":  # resc finds the expression by type: the next string is taken
        assert (res.total, res.invalid, len(res.records)) == (1, 1, 0)


def test_boxes_outside_their_image_are_dropped_or_clipped(tmp_path: Path) -> None:
    _write_img(tmp_path / "a.png", (64, 48))
    boxes = {
        "inside": [1, 1, 10, 10],
        "overhang": [50, 40, 80, 60],  # clipped to the image and counted
        "rounding": [0, 0, 64.01, 48],  # COCO-style x + w = width + 0.01: clipped, not counted
        "right": [70, 0, 90, 10],  # entirely outside
        "negative": [-20, -20, -5, -5],  # entirely outside
        "edge": [64, 0, 70, 10],  # touches the right edge: no area inside
    }
    (tmp_path / "d.jsonl").write_bytes(_jsonl(*[json.dumps({"image": "a.png", "expression": k, "box": b})
                                                for k, b in boxes.items()]))
    res = load_records(tmp_path / "d.jsonl")
    got = {r.expression: r.box for r in res.records}
    assert got == {"inside": [1, 1, 10, 10], "overhang": [50, 40, 64, 48], "rounding": [0, 0, 64, 48]}
    assert (res.total, res.kept, res.outside, res.clipped, res.dropped, res.invalid) == (6, 3, 3, 1, 0, 0)
    assert "3 whose box lies outside its image" in res.summary() and "clipped 1" in res.summary()
    j = res.to_json()
    assert (j["outside"], j["clipped"]) == (3, 1)


def test_box_check_uses_the_displayed_exif_rotated_size(tmp_path: Path) -> None:
    """Orientation 6 stores 64x48 pixels shown as 48x64: boxes refer to what is shown."""
    _write_img(tmp_path / "r.jpg", (64, 48), exif_orientation=6)
    assert load_image(tmp_path / "r.jpg").size == (48, 64)
    lines = [json.dumps({"image": "r.jpg", "expression": "low", "box": [0, 50, 10, 60]}),  # inside 48x64 only
             json.dumps({"image": "r.jpg", "expression": "wide", "box": [50, 0, 60, 10]})]  # inside 64x48 only
    (tmp_path / "d.jsonl").write_bytes(_jsonl(*lines))
    res = load_records(tmp_path / "d.jsonl")
    assert [r.expression for r in res.records] == ["low"]
    assert (res.outside, res.clipped) == (1, 0) and res.records[0].box == [0, 50, 10, 60]


def test_unreadable_image_header_keeps_the_record(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"not an image")
    (tmp_path / "d.jsonl").write_bytes(_jsonl(GOOD_LINE))
    res = load_records(tmp_path / "d.jsonl")
    assert (res.kept, res.outside, res.clipped) == (1, 0, 0)  # the evaluator reports the decode failure


# --------------------------------------------------------------------------- phrases


def _too_many_tokens(tiny_clip_dir: Path) -> str:
    limit = json.loads((tiny_clip_dir / "config.json").read_text())["text_config"]["max_position_embeddings"]
    return "x" * (limit - 1)  # + start and end tokens: one over the limit


#: Right-to-left (Hebrew) text: well under the character limit, two byte-level tokens per letter.
RTL_PHRASE = "הכדור האדום הגדול שנמצא משמאל לקופסה הירוקה"

BAD_PHRASES: dict[str, tuple[str, list[str]]] = {
    "empty": ("", ["phrase is empty"]),
    "whitespace": (" \t\n ", ["phrase is empty"]),
    "lone-surrogate": ("the red \udcff circle", ["not valid UTF-8", "byte 0xff", "character 9"]),
    "high-surrogate": ("\ud83d alone", ["not valid UTF-8"]),
    "ansi-escape": ("the \x1b[31mred\x1b[0m circle", ["U+001B", "position 5", "control character"]),
    "bell": ("\x07", ["U+0007", "position 1"]),
    "nul": ("a\x00b", ["U+0000", "position 2"]),
    "del": ("red\x7f", ["U+007F", "position 4"]),
    "c1-control": ("red \x9b31m circle", ["U+009B", "position 5"]),
    "too-long-chars": ("a" * 401, ["too long", "401 characters"]),
}


@pytest.mark.parametrize("name", list(BAD_PHRASES))
def test_check_phrase_refuses(name: str) -> None:
    from clipground.phrases import check_phrase

    phrase, needles = BAD_PHRASES[name]
    with pytest.raises(BadPhraseError) as ei:
        check_phrase(phrase)
    msg = str(ei.value)
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    assert "\x1b" not in msg and "\n" not in msg and not any("\ud800" <= c <= "\udfff" for c in msg)


def test_tabs_and_newlines_are_whitespace() -> None:
    from clipground.phrases import check_phrase

    assert check_phrase("the\tred\r\nmug\x0b\x0con the left") == "the red mug on the left"
    assert check_phrase(RTL_PHRASE) == RTL_PHRASE


@pytest.mark.parametrize("name", list(BAD_PHRASES) + ["too-many-tokens", "rtl-too-many-tokens"])
def test_cli_bad_phrase(name: str, tiny_clip_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                        capsys: pytest.CaptureFixture) -> None:
    from clipground.testing import assert_one_error_line, run_cli
    if name == "too-many-tokens":
        phrase, needles = _too_many_tokens(tiny_clip_dir), ["too long for this model's tokenizer", "tokens"]
    elif name == "rtl-too-many-tokens":
        phrase, needles = RTL_PHRASE, ["too long for this model's tokenizer", "several tokens per character"]
    else:
        phrase, needles = BAD_PHRASES[name]
    img = _write_img(tmp_path / "img.png", (40, 30))
    code, _, err = run_cli(["predict", str(img), phrase, "-b", str(tiny_clip_dir)], monkeypatch, capsys)
    line = assert_one_error_line(code, err, *needles)
    assert code == 2 and "\x1b" not in line and "\x07" not in line


def test_backbone_token_limit_message(tiny_clip_dir: Path) -> None:
    from clipground.backbone import ClipBackbone

    bb = ClipBackbone.from_pretrained(tiny_clip_dir)
    limit = bb.max_text_tokens
    with pytest.raises(BadPhraseError) as ei:
        bb.tokenize([RTL_PHRASE])
    msg = str(ei.value)
    assert f"{len(RTL_PHRASE)} characters became" in msg and f"the limit is {limit}" in msg
    assert "several tokens per character" in msg
    with pytest.raises(BadPhraseError, match="not valid UTF-8"):
        bb.tokenize(["ok", "\udcff"])  # crashed inside the tokenizer with a TypeError before


def test_error_line_is_safe_for_a_terminal(tmp_path: Path, tiny_clip_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture) -> None:
    """A control character in a file name is shown escaped, not sent to the terminal."""
    from clipground.testing import assert_one_error_line, run_cli
    from clipground.phrases import printable

    assert printable("a\x1b[31mb\nc\udcff ü日本") == "a\\x1b[31mb\\nc\\udcff ü日本"
    missing = tmp_path / "red\x1b[31m\x07name.png"
    code, _, err = run_cli(["predict", str(missing), "a cup", "-b", str(tiny_clip_dir)], monkeypatch, capsys)
    line = assert_one_error_line(code, err, "not found", "red\\x1b[31m\\x07name.png")
    assert "\x1b" not in line and "\x07" not in line


# --------------------------------------------------------------------------- image arrays


def test_float_array_in_0_255_is_refused_not_white() -> None:
    a = np.random.RandomState(0).randint(0, 256, (8, 8, 3)).astype(np.float32)
    with pytest.raises(BadImageError, match="divide by 255") as ei:
        load_image(a)
    assert "uint8" in str(ei.value)
    assert np.array_equal(np.asarray(load_image(a / 255.0)), a.astype(np.uint8))  # the fix it suggests works


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("layout", ["chw", "hwc"])
def test_low_precision_float_tensors_work(dtype: torch.dtype, layout: str) -> None:
    expected = np.random.RandomState(1).randint(0, 256, (6, 10, 3)).astype(np.uint8)
    # Values exactly representable in bfloat16 (8 significant bits): k/256 for k < 256.
    t = torch.from_numpy(expected.astype(np.float32) / 256.0).to(dtype)
    if layout == "chw":
        t = t.permute(2, 0, 1)
    got = np.asarray(load_image(t))
    ref = (expected.astype(np.float32) / 256.0 * 255.0 + 0.5).astype(np.uint8)
    assert got.shape == (6, 10, 3) and np.array_equal(got, ref)


@pytest.mark.parametrize(
    "bad,needles",
    [
        (np.full((4, 4, 3), np.nan, np.float32), ["NaN"]),
        (np.full((4, 4, 3), -0.5, np.float32), ["[0, 1]"]),
        (torch.full((3, 5, 6), 255.0, dtype=torch.bfloat16), ["divide by 255"]),
        (np.zeros((4, 4, 3), np.int64), ["int64", "uint8"]),
        (np.zeros((5,), np.uint8), ["shape (5,)"]),
        (np.zeros((1, 3, 8, 8), np.float32), ["shape (1, 3, 8, 8)"]),
        (np.zeros((8, 8, 5), np.uint8), ["shape (8, 8, 5)"]),
        (np.zeros((0, 8, 3), np.uint8), ["no pixels"]),
        ("not a file.png", ["not found"]),
    ],
)
def test_bad_arrays(bad: Any, needles: list[str]) -> None:
    with pytest.raises(BadImageError) as ei:
        load_image(bad)
    for n in needles:
        assert n in str(ei.value), str(ei.value)


# --------------------------------------------------------------------------- no candidate box


@pytest.mark.parametrize("size", [(1, 1), (4000, 3)])
def test_predict_table_marks_whole_image_fallback(size: tuple[int, int], tmp_path: Path, tiny_clip_dir: Path,
                                                  monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from clipground.testing import run_cli
    from clipground.grounder import Grounder

    img = _write_img(tmp_path / "tiny.png", size)
    g = Grounder.load("zero-shot", backbone=tiny_clip_dir)
    g.set_image(img, image_key=str(img))
    pred = g.predict("a dot")
    assert pred.fallback and pred.to_dict()["fallback"]  # what the table must show
    monkeypatch.setenv("COLUMNS", "200")
    code, out, err = run_cli(["predict", str(img), "a dot", "-b", str(tiny_clip_dir)], monkeypatch, capsys)
    assert code == 0, err
    assert "no candidate: whole image" in out
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "whole image" in warnings[0] and f"{size[0]}x{size[1]}" in warnings[0]



# --------------------------------------------------------------------------- options, training, caches


@pytest.mark.parametrize("value,want", [("no", False), ("false", False), ("0", False), ("off", False),
                                        ("yes", True), ("true", True), ("1", True)])
def test_boolean_options_are_typed(value: str, want: bool) -> None:
    """`-o relations=no` used to keep the truthy string 'no'."""
    from clipground.methods.zero_shot import ZeroShotConfig

    assert ZeroShotConfig.from_dict({"relations": value}).relations is want


def test_bad_and_unknown_options_are_one_error_line(tiny_clip_dir: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from clipground.testing import assert_one_error_line, run_cli

    img = _write_img(tmp_path / "a.png")
    base = ["predict", str(img), "the red box", "-b", str(tiny_clip_dir), "-p", "selective-search"]
    assert_one_error_line(*run_cli(base + ["-o", "relations=maybe"], monkeypatch, capsys)[::2], "relations",
                          "true/false")
    assert_one_error_line(*run_cli(base + ["-o", "relationz=no"], monkeypatch, capsys)[::2], "relationz",
                          "relations")
    assert_one_error_line(*run_cli(base + ["-o", "temperature=hot"], monkeypatch, capsys)[::2], "temperature")
    code, out, err = run_cli(base + ["-o", "relations=no", "--json", "-"], monkeypatch, capsys)
    assert code == 0, err


def _tiny_world_jsonl(tmp: Path, n: int) -> Path:
    from clipground.data.jsonl import write_jsonl
    from clipground.data.records import GroundingRecord

    img = _write_img(tmp / "a.png")
    recs = [GroundingRecord(str(img), f"the box number {i}", [4.0 + i, 4.0, 30.0, 30.0]) for i in range(n)]
    write_jsonl(recs, tmp / "train.jsonl")
    (tmp / "props.json").write_text(json.dumps({str(img): {"boxes": [r.box for r in recs]}}))
    return tmp / "train.jsonl"


@pytest.mark.parametrize("method", ["fusion-regressor", "proposal-classifier"])
def test_training_set_smaller_than_a_batch_is_one_error_line(method: str, tiny_clip_dir: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture) -> None:
    from clipground.testing import assert_one_error_line, run_cli

    ann = _tiny_world_jsonl(tmp_path, 3)
    args = ["train", "--method", method, "--train", str(ann), "--backbone", str(tiny_clip_dir),
            "--proposals", f"file:{tmp_path / 'props.json'}", "--out", str(tmp_path / "run"), "batch_size=8",
            "progress=false"]
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert_one_error_line(code, err, "batch_size")


def test_corrupt_cache_shard_is_one_error_line(tiny_clip_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture) -> None:
    from clipground.testing import assert_one_error_line, run_cli

    ann = _tiny_world_jsonl(tmp_path, 4)
    common = ["--backbone", str(tiny_clip_dir), "--proposals", f"file:{tmp_path / 'props.json'}"]
    code, _, err = run_cli(["cache", "build", "--data", str(ann), *common, "--out", str(tmp_path / "c" / "train")],
                           monkeypatch, capsys)
    assert code == 0, err
    (tmp_path / "c" / "train" / "images-00000.safetensors").write_bytes(b"\x00" * 40)
    args = ["train", "--method", "proposal-classifier", "--train", str(ann), *common, "--cache", str(tmp_path / "c"),
            "--out", str(tmp_path / "run"), "batch_size=2", "progress=false", "max_steps=1"]
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert_one_error_line(code, err, "corrupt", "rebuild")


def test_fallback_is_visible_in_the_terminal_table(tiny_clip_dir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from PIL import Image

    from clipground.testing import run_cli

    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    code, out, err = run_cli(["predict", str(tmp_path / "dot.png"), "the red box", "-b", str(tiny_clip_dir)],
                             monkeypatch, capsys)
    assert code == 0, err
    assert "whole image" in out and "warning:" in err and "Traceback" not in err
