"""Role `grounding`: open-vocabulary detection of an edit object phrase, through transformers.

    d = load("IDEA-Research/grounding-dino-base", "cuda")    # the method's default (Swin-B)
    d = load("google/owlv2-base-patch16-ensemble", "cuda")   # OWLv2, the alternative back-end
    dets = d.detect([pil, ...], ["a red car", ...])          # one phrase per image
    # -> [Detections(boxes=[[x0, y0, x1, y1], ...] in image pixels, scores, labels), ...]
    load("random:grounding-dino-base", "cuda")               # real architecture, random weights

The back-end follows the checkpoint's config (`model_type` grounding-dino or owlv2), or
`backend=` forces it. GroundingDINO keeps boxes whose best token logit is above
`box_threshold` (0.3) and labels them with the phrase tokens above `text_threshold` (0.25), as
the released code's `predict` does; OWLv2 keeps boxes scoring above `box_threshold`.

`make_tiny(folder)` writes a tiny random-weight GroundingDINO (Swin backbone, 1-layer BERT with
a WordPiece vocabulary written here, decoder_layers 2) with its processor;
`make_tiny(folder, family="owlv2")` a tiny OWLv2 with a byte-level BPE vocabulary written here.
Both load back by path through `load`.
"""

from __future__ import annotations

import json
import string
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..errors import UltracurateError
from ..names import BOX_THRESHOLD, TEXT_THRESHOLD
from ._bpe import bytes_to_unicode


@dataclass
class Detections:
    boxes: list[list[float]] = field(default_factory=list)   # x0, y0, x1, y1 (pixels)
    scores: list[float] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"boxes": [[round(float(v), 2) for v in b] for b in self.boxes],
                "scores": [round(float(s), 4) for s in self.scores], "labels": self.labels}


def _default_dtype(device: str, dtype):
    import torch
    if dtype is not None:
        return dtype
    return torch.float32  # detection heads are sensitive to half precision; cheap anyway


@dataclass
class Grounder:
    """A loaded detector and its processor."""

    model: Any
    processor: Any
    backend: str          # grounding-dino | owlv2
    device: str
    dtype: Any
    ref: str
    box_threshold: float = BOX_THRESHOLD
    text_threshold: float = TEXT_THRESHOLD

    def detect(self, images: Sequence, phrases: Sequence[str], *,
               box_threshold: float | None = None,
               text_threshold: float | None = None) -> list[Detections]:
        """Boxes for phrases[i] in images[i] (PIL), in that image's pixel coordinates."""
        if len(images) != len(phrases):
            raise ValueError("detect needs one phrase per image")
        if not images:
            return []
        bt = self.box_threshold if box_threshold is None else box_threshold
        tt = self.text_threshold if text_threshold is None else text_threshold
        if self.backend == "owlv2":
            return self._detect_owl(images, phrases, bt)
        return self._detect_gdino(images, phrases, bt, tt)

    def _to_device(self, inputs):
        import torch
        out = {}
        for k, v in inputs.items():
            if isinstance(v, torch.Tensor):
                v = v.to(self.device)
                if v.is_floating_point():
                    v = v.to(self.dtype)
            out[k] = v
        return out

    def _detect_gdino(self, images, phrases, bt, tt) -> list[Detections]:
        import torch
        # GroundingDINO expects lower-case phrases ending with a period.
        texts = [_gdino_text(p) for p in phrases]
        inputs = self.processor(images=list(images), text=texts, return_tensors="pt",
                                padding=True)
        with torch.inference_mode():
            outputs = self.model(**self._to_device(inputs))
        outputs.logits = outputs.logits.float()
        outputs.pred_boxes = outputs.pred_boxes.float()
        sizes = [(im.height, im.width) for im in images]
        with warnings.catch_warnings():  # about its deprecated `labels` key, which we skip
            warnings.simplefilter("ignore", FutureWarning)
            results = self.processor.post_process_grounded_object_detection(
                outputs, inputs["input_ids"], threshold=bt, text_threshold=tt,
                target_sizes=sizes)
        return [_dets(r, im.width, im.height, r["text_labels"] if "text_labels" in r else r.get("labels"))
                for r, im in zip(results, images)]

    def _detect_owl(self, images, phrases, bt) -> list[Detections]:
        import torch
        inputs = self.processor(images=list(images), text=[[p] for p in phrases],
                                return_tensors="pt", padding="max_length", truncation=True)
        with torch.inference_mode():
            outputs = self.model(**self._to_device(inputs))
        for name in ("logits", "pred_boxes"):
            setattr(outputs, name, getattr(outputs, name).float())
        # OWLv2 pads each image to a square at its bottom/right: boxes are relative to it.
        sizes = [(max(im.height, im.width),) * 2 for im in images]
        results = self.processor.post_process_grounded_object_detection(
            outputs, threshold=bt, target_sizes=sizes, text_labels=[[p] for p in phrases])
        return [_dets(r, im.width, im.height, r.get("text_labels"))
                for r, im in zip(results, images)]


def _gdino_text(phrase: str) -> str:
    p = phrase.strip().lower()
    return p if p.endswith(".") else p + "."


def _dets(r: dict, width: int, height: int, labels) -> Detections:
    boxes = r["boxes"].detach().cpu().tolist() if len(r["boxes"]) else []
    scores = r["scores"].detach().cpu().tolist() if len(r["scores"]) else []
    out = Detections()
    for i, (b, s) in enumerate(zip(boxes, scores)):
        x0, y0 = min(max(b[0], 0.0), width), min(max(b[1], 0.0), height)
        x1, y1 = min(max(b[2], 0.0), width), min(max(b[3], 0.0), height)
        if x1 <= x0 or y1 <= y0:
            continue
        out.boxes.append([x0, y0, x1, y1])
        out.scores.append(float(s))
        lab = str(labels[i]) if labels is not None and i < len(labels) else ""
        out.labels.append(" ".join(w for w in lab.split() if not w.startswith("[")).strip())
    return out


def _backend_of(ref: str, backend: str | None) -> str:
    if backend:
        if backend not in ("grounding-dino", "owlv2"):
            raise UltracurateError(f"unknown grounding backend '{backend}' "
                                   f"(grounding-dino or owlv2)")
        return backend
    cfg = Path(ref) / "config.json"
    if cfg.is_file():
        mt = json.loads(cfg.read_text()).get("model_type", "")
    else:
        mt = "owlv2" if "owlv2" in ref.lower() else "grounding-dino"
    if mt == "owlv2":
        return "owlv2"
    if mt == "grounding-dino":
        return "grounding-dino"
    raise UltracurateError(f"grounding checkpoint '{ref}' is a '{mt}' model "
                           f"(grounding-dino or owlv2 expected)")


def load(ref: str, device: str = "cpu", dtype: Any = None, backend: str | None = None,
         box_threshold: float = BOX_THRESHOLD, text_threshold: float = TEXT_THRESHOLD
         ) -> Grounder:
    """Load a GroundingDINO or OWLv2 checkpoint by hub id or local folder."""
    ref = str(ref)
    dtype = _default_dtype(device, dtype)
    if ref.startswith("random:"):
        return _load_random(ref, device, dtype, box_threshold, text_threshold)
    be = _backend_of(ref, backend)
    try:
        if be == "owlv2":
            from transformers import Owlv2ForObjectDetection, Owlv2Processor
            model = Owlv2ForObjectDetection.from_pretrained(ref)
            proc = Owlv2Processor.from_pretrained(ref)
        else:
            from transformers import AutoProcessor, GroundingDinoForObjectDetection
            model = GroundingDinoForObjectDetection.from_pretrained(ref)
            proc = AutoProcessor.from_pretrained(ref)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UltracurateError(f"cannot load grounding checkpoint '{ref}': {first}") from None
    model = model.to(device=device, dtype=dtype).eval()
    return Grounder(model, proc, be, str(device), dtype, ref, box_threshold, text_threshold)


# -- real architectures with random weights (benchmarks) -----------------------------------------
def _gdino_config(kind: str):
    from transformers import BertConfig, GroundingDinoConfig, SwinConfig
    swin = {"tiny": dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
                         window_size=7, image_size=224),
            "base": dict(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32],
                         window_size=12, image_size=384)}[kind]
    return GroundingDinoConfig(
        backbone_config=SwinConfig(**swin, out_features=["stage2", "stage3", "stage4"],
                                   out_indices=[2, 3, 4]),
        text_config=BertConfig())  # bert-base-uncased's architecture


def _load_random(ref, device, dtype, bt, tt) -> Grounder:
    """"random:grounding-dino-base|grounding-dino-tiny": the real architecture (Swin-B/T +
    BERT-base), random weights, with the tiny checkpoint's tokenizer (compute does not depend
    on the vocabulary). Only for timing."""
    import tempfile

    from transformers import GroundingDinoForObjectDetection
    name = ref.split(":", 1)[1]
    kinds = {"grounding-dino-base": "base", "grounding-dino-tiny": "tiny"}
    if name not in kinds:
        raise UltracurateError(f"unknown random grounding architecture '{name}' "
                               f"(one of {', '.join(kinds)})")
    cfg = _gdino_config(kinds[name])
    model = GroundingDinoForObjectDetection(cfg).to(device=device, dtype=dtype).eval()
    with tempfile.TemporaryDirectory() as tmp:
        # the released checkpoints' input size: short side 800, long side at most 1333
        _write_gdino_processor(Path(tmp), vocab_size=cfg.text_config.vocab_size,
                               size={"shortest_edge": 800, "longest_edge": 1333})
        from transformers import AutoProcessor
        proc = AutoProcessor.from_pretrained(tmp)
    return Grounder(model, proc, "grounding-dino", str(device), dtype, ref, bt, tt)


# -- tiny checkpoints ------------------------------------------------------------------------------
_WORDS = ("a an the of and with on in at to left right top bottom front back small large big "
          "red green blue yellow black white brown orange pink purple gray grey "
          "person man woman child people cat dog bird horse car bus truck bicycle motorcycle "
          "rocket astronaut coffee cup mug table chair sofa bed tree sky grass water road "
          "building house window door sign flower plant food plate bowl hat shirt helmet "
          "flag face hair hand eye ball book phone clock lamp rock mountain cloud sun moon "
          "star space suit wheel").split()


def _wordpiece_vocab(size: int | None = None) -> list[str]:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase + string.digits) + list(".,;:!?'\"-()/&")
    vocab = specials + chars + ["##" + c for c in string.ascii_lowercase + string.digits]
    vocab += [w for w in dict.fromkeys(_WORDS) if w not in vocab]
    if size is not None:
        vocab += [f"[unused{i}]" for i in range(size - len(vocab))]
    return vocab


def _write_gdino_processor(folder: Path, vocab_size: int | None = None,
                           size: dict | None = None) -> int:
    from transformers import (BertTokenizer, GroundingDinoImageProcessor,
                              GroundingDinoProcessor)
    vocab = _wordpiece_vocab(vocab_size)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizer(str(folder / "vocab.txt"), do_lower_case=True, model_max_length=256)
    # Small input for the tiny model; real checkpoints bring their own (800, max 1333).
    ip = GroundingDinoImageProcessor(size=size or {"shortest_edge": 128, "longest_edge": 224})
    GroundingDinoProcessor(image_processor=ip, tokenizer=tok).save_pretrained(str(folder))
    return len(vocab)


def _make_tiny_gdino(folder: Path) -> None:
    from transformers import (BertConfig, GroundingDinoConfig,
                              GroundingDinoForObjectDetection, SwinConfig)
    n_vocab = _write_gdino_processor(folder)
    cfg = GroundingDinoConfig(
        backbone_config=SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                                   window_size=7, image_size=224,
                                   out_features=["stage2", "stage3", "stage4"],
                                   out_indices=[2, 3, 4]),
        text_config=BertConfig(vocab_size=n_vocab, hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=64,
                               max_position_embeddings=256),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=30,
        num_feature_levels=4, encoder_n_points=2, decoder_n_points=2, max_text_len=256)
    GroundingDinoForObjectDetection(cfg).eval().save_pretrained(str(folder))


def _make_tiny_owlv2(folder: Path) -> None:
    from transformers import (CLIPTokenizer, Owlv2Config, Owlv2ForObjectDetection,
                              Owlv2ImageProcessor, Owlv2Processor)
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                        model_max_length=16, pad_token="!")
    ip = Owlv2ImageProcessor(size={"height": 64, "width": 64})
    Owlv2Processor(image_processor=ip, tokenizer=tok).save_pretrained(str(folder))
    cfg = Owlv2Config(
        text_config=dict(vocab_size=len(tokens), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                         bos_token_id=len(tokens) - 2, eos_token_id=len(tokens) - 1,
                         pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=64, patch_size=16),
        projection_dim=32)
    Owlv2ForObjectDetection(cfg).eval().save_pretrained(str(folder))


def make_tiny(folder: str | Path, family: str = "grounding-dino") -> str:
    """Write a tiny random-weight detector checkpoint (seeded by the caller):
    GroundingDINO (default) or family="owlv2"."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if family == "grounding-dino":
        _make_tiny_gdino(folder)
    elif family == "owlv2":
        _make_tiny_owlv2(folder)
    else:
        raise UltracurateError(f"unknown tiny grounding family '{family}' "
                               f"(grounding-dino or owlv2)")
    return str(folder)
