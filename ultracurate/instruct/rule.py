"""The offline rule-based back-end: parses a caption's noun phrases and attributes and fills
templates, one family per edit type. Deterministic: the same (caption, type, seed) always
gives the same edit. It never needs a model, so it is the default for the demo and for users
without an LLM; its answers go through the same validator as an LLM's."""

from __future__ import annotations

import random

from .captions import (ADJECTIVES, COLOURS, MATERIALS, NounPhrase, fix_articles, noun_phrases, pluralize,
                       replace_span)

VERSION = "rule-v1"

NEW_COLOURS = ["red", "blue", "green", "yellow", "purple", "pink", "orange", "black", "white",
               "silver", "golden", "turquoise"]
ADD_ON = ["a small bird", "a red bow", "a party hat", "a butterfly", "a string of fairy lights",
          "a sticker with a smiley face", "a tiny crown", "a green leaf", "a snowflake",
          "a ladybug"]
ADD_SCENE = ["a rainbow", "a hot air balloon", "a flock of birds", "a full moon",
             "a potted plant", "a small dog", "falling cherry blossoms", "a paper lantern",
             "a kite", "a street lamp"]
CONDITIONS = [  # change_global: (instruction, what the target caption adds)
    ("make it nighttime", "at night"), ("make it snow", "in heavy snow"),
    ("make it a rainy day", "on a rainy day"), ("make it sunset", "at sunset"),
    ("make it autumn", "in autumn with falling leaves"), ("add fog to the scene", "in thick fog"),
    ("make the lighting warm and golden", "in warm golden light"),
    ("make it look like winter", "in winter"), ("add a thunderstorm", "during a thunderstorm"),
]
STYLES = [  # transform_global: (instruction, how the target caption starts)
    ("make it look like a watercolor painting", "a watercolor painting of"),
    ("turn the photo into a pencil sketch", "a pencil sketch of"),
    ("make it an oil painting", "an oil painting of"),
    ("make it look like a cartoon", "a cartoon drawing of"),
    ("render it as pixel art", "pixel art of"),
    ("make it look like a van gogh painting", "a van gogh style painting of"),
    ("make it look like an old photograph", "an old sepia photograph of"),
    ("make it a comic book illustration", "a comic book illustration of"),
]
NEW_MATERIALS = ["wooden", "glass", "marble", "stone", "knitted", "metal", "plastic", "velvet",
                 "paper", "brick"]
NEW_PATTERNS = ["striped", "polka dot", "checkered", "floral", "leopard print"]
SHAPES = [  # transform_local: (instruction template, adjective put before the phrase)
    ("make the {np} much bigger", "giant"), ("make the {np} tiny", "tiny"),
    ("make the {np} look like {it} melting", "melting"),
    ("make the {np} round", "round"), ("stretch the {np} to make {obj} taller", "tall"),
    ("make the {np} look inflated", "inflatable"),
]
REPLACE_WITH = ["dog", "teddy bear", "robot", "vase of flowers", "lamp", "bicycle", "pumpkin",
                "penguin", "suitcase", "guitar", "pineapple", "horse", "owl", "backpack"]
TURN_INTO = [("stone statue", "stone statues"), ("bronze sculpture", "bronze sculptures"),
             ("toy model", "toy models"), ("plush toy", "plush toys"),
             ("ice sculpture", "ice sculptures"), ("paper origami model", "paper origami models"),
             ("lego model", "lego models"), ("chocolate sculpture", "chocolate sculptures")]
WORDS = ["HELLO", "OPEN", "LOVE", "2024", "SALE", "STOP", "HOME", "JOY"]
NUMBERS = ["two", "three", "four"]


class RuleError(ValueError):
    """The caption gives this edit type nothing to work on (e.g. no noun phrase)."""


def propose(caption: str, edit_type: str, seed: int) -> dict:
    """One edit of edit_type for caption, as the answer dict the validator reads."""
    rng = random.Random(seed)
    caption = " ".join(caption.split()).rstrip(".")
    objects = [n for n in noun_phrases(caption) if n.is_object]
    fn = _TYPES.get(edit_type)
    if fn is None:
        raise RuleError(f"unknown edit type '{edit_type}'")
    if edit_type not in ("change_global", "transform_global", "add") and not objects:
        raise RuleError(f"no object phrase found in the caption for a {edit_type} edit")
    instruction, target, obj = fn(caption, objects, rng)
    return {"instruction": instruction, "target_caption": fix_articles(target),
            "edit_object": obj, "edit_type": edit_type}


def _insert_before_nouns(words: list[str], new: str) -> str:
    """Put an attribute after the phrase's adjectives and before its nouns:
    (shiny, motorbike) + white -> 'shiny white motorbike'; (coffee, cup) -> 'white coffee cup'."""
    i = 0
    while i < len(words) - 1 and (words[i].lower() in ADJECTIVES or words[i].lower() in COLOURS
                                  or words[i].lower().endswith(("ing", "ed"))):
        i += 1
    return " ".join(words[:i] + [new] + words[i:])


def _the(np_: NounPhrase) -> str:
    return f"the {np_.text}"


def _with_det(caption: str, np_: NounPhrase) -> str:
    return caption[np_.det_start:np_.end]


def _add(caption, objects, rng):
    if objects and rng.random() < 0.5:
        np_ = rng.choice(objects)
        new = rng.choice(ADD_ON)
        verb = rng.choice(["add", "put", "place"])
        target = replace_span(caption, np_.start, np_.end, f"{np_.text} with {new} on it")
        return f"{verb} {new} on {_the(np_)}", target, np_.text
    new = rng.choice(ADD_SCENE)
    where = rng.choice(["in the background", "in the scene", "in the corner"])
    return f"add {new} {where}", f"{caption}, with {new} {where}", "NONE"


def _change_global(caption, objects, rng):
    instruction, suffix = rng.choice(CONDITIONS)
    return instruction, f"{caption} {suffix}", "NONE"


def _transform_global(caption, objects, rng):
    instruction, prefix = rng.choice(STYLES)
    return instruction, f"{prefix} {caption}", "NONE"


def _change_color(caption, objects, rng):
    np_ = rng.choice(objects)
    choices = [c for c in NEW_COLOURS if c not in np_.colours]
    colour = rng.choice(choices)
    # Drop the phrase's colour words ("red and black motorbike" -> "blue motorbike").
    kept = [w for w in np_.text.split() if w.lower() not in COLOURS and w.lower() != "and"]
    new_text = _insert_before_nouns(kept, colour)
    target = replace_span(caption, np_.start, np_.end, new_text)
    if rng.random() < 0.5:
        instruction = f"change the color of {_the(np_)} to {colour}"
    else:
        instruction = f"make {_the(np_)} {colour}"
    return instruction, target, np_.text


def _change_local(caption, objects, rng):
    np_ = rng.choice(objects)
    words = np_.text.split()
    kept = [w for w in words if w.lower() not in MATERIALS]
    if rng.random() < 0.6:
        material = rng.choice([m for m in NEW_MATERIALS if m not in {w.lower() for w in words}])
        new_text = _insert_before_nouns(kept, material)
        instruction = rng.choice([f"make {_the(np_)} {material}",
                                  f"change {_the(np_)} to be {material}"])
    else:
        pattern = rng.choice(NEW_PATTERNS)
        new_text = _insert_before_nouns(kept, pattern)
        instruction = f"give {_the(np_)} a {pattern} pattern"
    target = replace_span(caption, np_.start, np_.end, new_text)
    return instruction, target, np_.text


def _transform_local(caption, objects, rng):
    np_ = rng.choice(objects)
    template, adjective = rng.choice(SHAPES)
    target = replace_span(caption, np_.start, np_.end, f"{adjective} {np_.text}")
    it, obj = ("they are", "them") if np_.plural else ("it is", "it")
    return template.format(np=np_.text, it=it, obj=obj), target, np_.text


def _replace(caption, objects, rng):
    np_ = rng.choice(objects)
    head = np_.head.lower()
    choices = [o for o in REPLACE_WITH if o.split()[-1] != head]
    new = rng.choice(choices)
    if np_.plural:
        new_phrase = pluralize(new) if " " not in new else pluralize(new.split()[0]) + \
            new[len(new.split()[0]):]
        instruction = f"replace {_the(np_)} with {new_phrase}"
    else:
        new_phrase = new
        instruction = rng.choice([f"replace {_the(np_)} with a {new}",
                                  f"swap {_the(np_)} for a {new}"])
    target = replace_span(caption, np_.start, np_.end, new_phrase)
    return fix_articles(instruction), target, np_.text


def _turn(caption, objects, rng):
    np_ = rng.choice(objects)
    single, plural = rng.choice(TURN_INTO)
    if np_.plural:
        new = f"{plural} of {np_.text}"
        instruction = f"turn {_the(np_)} into {plural}"
    else:
        new = f"a {single} of a {np_.text}"
        instruction = f"turn {_the(np_)} into a {single}"
    target = replace_span(caption, np_.det_start, np_.end, new)
    return fix_articles(instruction), target, np_.text


def _others(caption, objects, rng):
    np_ = rng.choice(objects)
    if not np_.plural and rng.random() < 0.5:
        n = rng.choice(NUMBERS)
        words = np_.text.split()
        new = " ".join(words[:-1] + [pluralize(words[-1])])
        target = replace_span(caption, np_.det_start, np_.end, f"{n} {new}")
        return f"make it {n} {new} instead of one", target, np_.text
    word = rng.choice(WORDS)
    target = replace_span(caption, np_.start, np_.end,
                          f"{np_.text} with the word '{word}' written on {'them' if np_.plural else 'it'}")
    return f"write the word '{word}' on {_the(np_)}", target, np_.text


_TYPES = {
    "add": _add, "change_global": _change_global, "change_local": _change_local,
    "change_color": _change_color, "transform_global": _transform_global,
    "transform_local": _transform_local, "replace": _replace, "turn": _turn,
    "others": _others,
}
