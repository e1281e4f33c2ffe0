"""Noun phrases and attributes of a caption, by small well-tested heuristics (no parser model).

A noun phrase starts after a determiner ("a", "the", "two", ...), at the start of the caption,
or after a preposition when the next word is a known adjective or colour; it runs until a
preposition, conjunction, verb-like word or punctuation, and its last word is the head noun.
"a collection of old coins" gives "old coins" (quantity nouns hand over to their complement).
Each phrase keeps its character span, so an edit object is always an exact substring of the
caption and a target caption is written by replacing that span.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

DETERMINERS = {
    "a", "an", "the", "two", "three", "four", "five", "six", "some", "several", "many", "his",
    "her", "its", "their", "this", "these", "those", "one", "another", "my", "our", "your",
    "each", "every", "few",
}
STOP = {
    "in", "on", "at", "with", "of", "to", "from", "by", "for", "under", "over", "behind",
    "near", "next", "beside", "above", "below", "across", "through", "into", "onto", "along",
    "around", "against", "inside", "outside", "between", "and", "or", "but", "while", "is",
    "are", "was", "were", "be", "being", "who", "which", "that", "as", "during", "before",
    "after", "up", "down", "off", "out", "there", "it", "they", "he", "she", "has", "have",
    "very", "while", "where", "when", "looking", "than", "then", "so", "not", "no", "all",
    "sits", "stands", "holds", "looks", "lies", "rests", "shows", "appears", "seen", "front",
    "top", "side", "away", "together", "about", "like", "toward", "towards", "beneath",
}
COLOURS = {
    "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white",
    "gray", "grey", "silver", "gold", "golden", "beige", "teal", "turquoise", "navy", "violet",
    "maroon", "cyan", "magenta", "tan", "ginger", "cream", "dark", "light",
}
# Adjectives that may open a phrase after a preposition ("in dark space", "on green grass").
ADJECTIVES = {
    "small", "large", "big", "tall", "short", "old", "young", "new", "little", "wooden",
    "metal", "bright", "shiny", "striped", "tabby", "smiling", "deep", "sunny", "cluttered",
    "grassy", "concrete", "stone", "glass", "plastic", "long", "tiny", "huge", "empty", "busy",
    "open", "wet", "dry", "snowy", "sandy", "rocky", "clear", "cloudy", "blurry", "round",
    "square", "thick", "thin", "leather", "paper", "wooded", "american", "brick", "colorful",
    "colourful", "fluffy", "furry", "busy", "calm", "quiet", "modern", "ancient", "vintage",
}
MATERIALS = {"wooden", "metal", "stone", "glass", "plastic", "leather", "paper", "brick",
             "concrete", "marble", "golden", "knitted", "furry", "velvet", "denim", "woolen"}
QUANTITY_NOUNS = {"collection", "group", "pair", "row", "rows", "pile", "piles", "bunch", "set",
                  "couple", "stack", "stacks", "lot", "lots", "number", "herd", "flock",
                  "crowd", "bowl", "plate", "handful", "line", "lines"}
# Heads that name the picture or a place rather than an object one could mask.
NON_OBJECTS = {"image", "photo", "photograph", "picture", "portrait", "view", "scene", "shot",
               "background", "foreground", "day", "night", "field", "front", "side", "top",
               "bottom", "middle", "close", "closeup", "area", "way", "time", "color",
               "colour", "space", "sky", "room", "lot"}
_IRREGULAR = {"man": "men", "woman": "women", "person": "people", "child": "children",
              "mouse": "mice", "foot": "feet", "tooth": "teeth", "sheep": "sheep",
              "fish": "fish", "deer": "deer", "goose": "geese"}
_IRREGULAR_SINGULAR = {v: k for k, v in _IRREGULAR.items()}

_WORD = re.compile(r"[A-Za-z][A-Za-z'\-]*|\d+|[^\sA-Za-z\d]")


@dataclass
class Token:
    text: str
    start: int
    end: int

    @property
    def low(self) -> str:
        return self.text.lower()


@dataclass
class NounPhrase:
    """One noun phrase: `text` is its words without the determiner (an exact substring of the
    caption at [start, end)); `det_start` is where its determiner starts (== start if none)."""

    text: str
    head: str
    start: int
    end: int
    det: str = ""
    det_start: int = 0
    colours: list[str] = field(default_factory=list)
    adjectives: list[str] = field(default_factory=list)

    @property
    def plural(self) -> bool:
        return is_plural(self.head, self.det)

    @property
    def is_object(self) -> bool:
        return self.head.lower() not in NON_OBJECTS


def tokenize(caption: str) -> list[Token]:
    return [Token(m.group(0), m.start(), m.end()) for m in _WORD.finditer(caption)]


def _is_word(t: Token) -> bool:
    return t.text[0].isalpha()


def _verb_like(word: str) -> bool:
    return len(word) > 4 and (word.endswith("ing") or word.endswith("ed"))


def _headable(word: str) -> bool:
    w = word.lower()
    return (w.isalpha() and len(w) > 1 and w not in STOP and w not in DETERMINERS
            and w not in COLOURS and not _verb_like(w) and w not in ADJECTIVES)


def noun_phrases(caption: str) -> list[NounPhrase]:
    """The caption's noun phrases, left to right."""
    toks = tokenize(caption)
    out: list[NounPhrase] = []
    i = 0
    while i < len(toks):
        t = toks[i]
        start_here = False
        det = ""
        det_start = t.start
        if t.low in DETERMINERS and i + 1 < len(toks) and _is_word(toks[i + 1]):
            det, i = t.text, i + 1
            start_here = True
        elif i == 0 and _is_word(t) and t.low not in STOP:
            start_here = True
        elif (i > 0 and toks[i - 1].low in STOP and _is_word(t)
              and (t.low in ADJECTIVES or t.low in COLOURS)):
            start_here = True
        if not start_here:
            i += 1
            continue
        words: list[Token] = []
        j = i
        while j < len(toks):
            w = toks[j]
            # "a red and black motorbike": 'and' between two colours stays in the phrase.
            if (w.low == "and" and words and words[-1].low in COLOURS and j + 1 < len(toks)
                    and toks[j + 1].low in COLOURS):
                words.append(w)
                j += 1
                continue
            if not _is_word(w) or w.low in STOP or w.low in DETERMINERS:
                break
            if words and _verb_like(w.low) and w.low not in ADJECTIVES:
                break
            words.append(w)
            j += 1
        # "a collection of old coins" -> the phrase is "old coins".
        if (words and words[-1].low in QUANTITY_NOUNS and j + 1 < len(toks)
                and toks[j].low == "of"):
            i = j + 1
            continue
        while words and not _headable(words[-1].text):
            words.pop()
        if words:
            head = words[-1].text
            np_ = NounPhrase(
                text=caption[words[0].start:words[-1].end], head=head,
                start=words[0].start, end=words[-1].end, det=det,
                det_start=det_start if det else words[0].start,
                colours=[w.low for w in words[:-1] if w.low in COLOURS],
                adjectives=[w.low for w in words[:-1]
                            if w.low not in COLOURS and w.low != "and"])
            out.append(np_)
        i = max(j, i + 1)
    return out


def is_plural(head: str, det: str = "") -> bool:
    h, d = head.lower(), det.lower()
    if d in ("a", "an", "one", "this", "another", "each", "every"):
        return False
    if d in ("two", "three", "four", "five", "six", "these", "those", "many", "several",
             "few"):
        return True
    if h in _IRREGULAR_SINGULAR:
        return True
    return h.endswith("s") and not h.endswith(("ss", "us", "is", "ous"))


def pluralize(noun: str) -> str:
    low = noun.lower()
    if low in _IRREGULAR:
        return _IRREGULAR[low]
    if low.endswith(("s", "x", "z", "ch", "sh")):
        return noun + "es"
    if low.endswith("y") and low[-2:-1] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def fix_articles(text: str) -> str:
    """'a orange cat' -> 'an orange cat', 'an red cat' -> 'a red cat'."""
    def repl(m: re.Match) -> str:
        art, word = m.group(1), m.group(2)
        vowel = word[0].lower() in "aeiou" and not word.lower().startswith(("uni", "use", "one"))
        want = "an" if vowel else "a"
        if art[0].isupper():
            want = want.capitalize()
        return f"{want} {word}"
    return re.sub(r"\b([Aa]n?) ([A-Za-z]+)", repl, text)


def replace_span(caption: str, start: int, end: int, new: str) -> str:
    out = caption[:start] + new + caption[end:]
    return fix_articles(re.sub(r"\s{2,}", " ", out).strip())


def contains_phrase(caption: str, phrase: str) -> bool:
    """Whether phrase occurs in caption as whole words, ignoring case."""
    phrase = phrase.strip()
    if not phrase:
        return False
    pat = r"(?<![A-Za-z0-9])" + re.escape(phrase.lower()) + r"(?![A-Za-z0-9])"
    return re.search(pat, caption.lower()) is not None


def source_matches(source: str, patterns: list[str] | None) -> bool:
    """Whether a caption source (ingest, coco, caption:<model>, ...) is one of patterns: a
    name, or a prefix ending in '*' ('caption:*': any captioner). None: every source."""
    if not patterns:
        return True
    return any(source.startswith(p[:-1]) if p.endswith("*") else source == p
               for p in patterns)


def parse_sources(value: str | list[str] | None) -> list[str] | None:
    """--caption-source 'coco,caption:*' as a list (None or '' for every source)."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    return [s.strip() for s in items if s.strip()] or None


def word_count(text: str) -> int:
    return len(text.split())
