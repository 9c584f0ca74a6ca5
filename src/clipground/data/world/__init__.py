"""A synthetic referring-expression world (in the spirit of CLEVR-Ref+).

No pretrained CLIP is reachable from our machines, so methods are proven in a world we
generate: flat-coloured shapes on a textured background, each scene with 2-8 objects and
1-4 referring expressions that each pick out exactly one object. It doubles as a
diagnostic benchmark that generates and evaluates in minutes on CPU, and its train split
is the pretraining data of the bundled world CLIP.

One module per idea:

* :mod:`~clipground.data.world.config`: the vocabulary, :class:`WorldConfig`, the
  held-out (colour, shape) pairs of the ``compositional`` split;
* :mod:`~clipground.data.world.render`: drawing a scene (:func:`render_scene`);
* :mod:`~clipground.data.world.grammar`: the expression grammar (:data:`TEMPLATES`), its
  parser and the independent checker (:func:`check_expression`);
* :mod:`~clipground.data.world.expressions`: generating a scene's expressions
  (:func:`describe`), each accepted only if the checker finds exactly its target;
* :mod:`~clipground.data.world.files`: the world on disk (:func:`generate_world`).

Layout written by :func:`generate_world` (details in :mod:`~clipground.data.world.files`)::

    OUT/images/{split}/{scene_id:06d}.png
    OUT/{split}.jsonl             GroundingRecords (image path relative to OUT)
    OUT/instances_{split}.json    COCO instances; masks as uncompressed COCO RLE
    OUT/world.json                config, vocabulary, held-out pairs, counts (written last)

The same config gives byte-identical files.
"""

from __future__ import annotations

from .config import COLOUR_NAMES, COLOURS, SHAPES, SIZES, SPLITS, TYPES, VERSION, WorldConfig, WorldConfigError, held_out_pairs
from .expressions import Expression, describe
from .files import ensure_world, generate_world, load_scene_objects, load_world_config, rle_decode, rle_encode
from .grammar import TEMPLATES, NounPhrase, WorldExpression, check_expression, parse_expression, referents
from .render import Scene, SceneObject, render_scene

__all__ = [
    "VERSION",
    "SHAPES",
    "COLOURS",
    "COLOUR_NAMES",
    "SIZES",
    "SPLITS",
    "TYPES",
    "TEMPLATES",
    "WorldConfigError",
    "WorldConfig",
    "SceneObject",
    "Scene",
    "NounPhrase",
    "WorldExpression",
    "Expression",
    "held_out_pairs",
    "render_scene",
    "describe",
    "parse_expression",
    "referents",
    "check_expression",
    "generate_world",
    "ensure_world",
    "load_world_config",
    "load_scene_objects",
    "rle_encode",
    "rle_decode",
]
