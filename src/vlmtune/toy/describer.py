"""The toy describer: a small image-conditioned text generator standing in for an LMM (LLaVA) or an LLM offline.

Built like LLaVA: the toy CLIP's image tower, frozen, turns each 32 x 32 tile into its pooled token and 4 x 4
pooled patch tokens; a two-layer MLP projects them into a causal decoder that reads ``[image tokens] [mode]
[condition words] caption`` over the toy vocabulary. A group collage is split into its 2 x 2 tiles, each encoded
on its own (LLaVA-NeXT's AnyRes tiling in miniature). Four modes, chosen by the caller
(``vlmtune.textgen.backends.toy`` reads them off the prompt):

- ``image``: describe one image (LatteCLIP's T^image);
- ``group``: describe the attributes a 2x2 collage of four images shares (T^group);
- ``class``: describe a class from the attribute words of its name, no image (LLM class descriptions, LaFTer);
- ``template``: write a caption-like sentence with a ``{}`` class slot, no image (CoFT+'s LLM templates).

The training targets (``image_target``, ``group_target``, ...) follow the toy caption corpus' conventions
(``vlmtune.toy.world``): sketches are named in the sketch dialect, rare styles are named less reliably. What the
model learns from them is informative and imperfect, as an LMM's descriptions are (it sees through the toy CLIP's
eyes, shifts included); ``attribute_accuracy`` measures how much against the renderer's ground truth.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from vlmtune.toy.model import Block, ToyCLIPConfig, VisionTower
from vlmtune.toy.tokenizer import ToyTokenizer
from vlmtune.toy.world import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    SIZES,
    STYLE_PHRASE,
    STYLES,
    TEXTURES,
    SceneBatch,
    sketch_dialect,
    vocabulary,
)

MODES = ("image", "group", "class", "template")
MODE_TOKENS = tuple(f"<{m}>" for m in MODES)
SLOT = "{}"
TILE, MEAN, STD = 32, 0.5, 0.25  # the toy CLIP's input size and normalisation
TOKENS_PER_TILE = 17  # pooled token + 4 x 4 pooled patch tokens
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": COLOURS,
    "size": SIZES,
    "texture": TEXTURES,
    "background": BACKGROUNDS,
    "style": STYLES,
}
ATTRIBUTE_WORDS = frozenset(w for values in ATTRIBUTES.values() for w in values)


def describer_tokenizer(context_length: int = 28) -> ToyTokenizer:
    """The toy vocabulary plus the four mode tokens (never produced from text: the backend inserts them)."""
    return ToyTokenizer([*vocabulary(), *MODE_TOKENS], context_length)


@dataclass(frozen=True)
class DescriberConfig:
    width: int = 128
    heads: int = 4
    decoder_layers: int = 3
    vocab_size: int = 256
    context_length: int = 28  # caption tokens incl. start / end
    cond_length: int = 4  # condition words (class mode: attributes of the class name; template mode: style words)
    max_tiles: int = 4

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def load_toy_vision(folder: str | Path) -> VisionTower:
    """The image tower of a ToyCLIP folder (``toy_clip.safetensors`` + ``toy_clip.json``), frozen, in eval mode."""
    folder = Path(folder)
    meta = json.loads((folder / "toy_clip.json").read_text())
    tower = VisionTower(ToyCLIPConfig(**meta["config"]))
    state = load_file(str(folder / "toy_clip.safetensors"))
    tower.load_state_dict({k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")})
    return tower.requires_grad_(False).eval()


class ToyDescriber(nn.Module):
    """Tiles (B, T, 3, 32, 32) normalised + mode + condition words -> next-token logits over the toy vocabulary."""

    def __init__(self, cfg: DescriberConfig, vision: VisionTower) -> None:
        super().__init__()
        self.cfg = cfg
        w, d = cfg.width, vision.proj.shape[1]
        self.vision = vision  # frozen: not part of the describer's own weights
        self.projector = nn.Sequential(nn.Linear(d, w), nn.GELU(), nn.Linear(w, w))  # LLaVA-1.5's mlp2x_gelu
        self.image_pos = nn.Parameter(torch.randn(TOKENS_PER_TILE, w) * 0.02)
        self.tile_pos = nn.Parameter(torch.randn(cfg.max_tiles, w) * 0.02)
        self.token_embedding = nn.Embedding(cfg.vocab_size, w)
        self.pos = nn.Parameter(torch.randn(1 + cfg.cond_length + cfg.context_length, w) * 0.02)
        self.decoder = nn.ModuleList(Block(w, cfg.heads) for _ in range(cfg.decoder_layers))
        self.ln_final = nn.LayerNorm(w)

    def own_state(self) -> dict[str, torch.Tensor]:
        """The trained weights (the frozen image tower belongs to the toy CLIP)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("vision.")}

    def n_params(self) -> int:
        return sum(v.numel() for v in self.own_state().values())

    def encode_image(self, tiles: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, 32, 32) normalised tiles -> image tokens (B, T * 17, W)."""
        b, t = tiles.shape[:2]
        with torch.no_grad():
            pooled, patches = self.vision(tiles.flatten(0, 1))  # (BT, D), (BT, P, D)
            side = int(patches.shape[1] ** 0.5)
            grid = patches.transpose(1, 2).reshape(b * t, -1, side, side)
            pooled_patches = F.adaptive_avg_pool2d(grid, 4).flatten(2).transpose(1, 2)  # (BT, 16, D)
            tokens = torch.cat([pooled[:, None], pooled_patches], 1)  # (BT, 17, D)
        x = self.projector(tokens) + self.image_pos  # (BT, 17, W)
        x = x.view(b, t, TOKENS_PER_TILE, -1) + self.tile_pos[:t, None]
        return x.flatten(1, 2)

    def forward(self, image_tokens: torch.Tensor | None, prefix: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Image tokens (B, N, W) or None, prefix ids (B, 1 + cond) = mode + condition words, caption ids (B, T)
        -> logits (B, T, V) at the caption positions (position t predicts token t + 1)."""
        ids = torch.cat([prefix, text], 1)  # (B, P + T)
        x = self.token_embedding(ids) + self.pos[: ids.shape[1]]
        n_img = 0
        if image_tokens is not None:
            x, n_img = torch.cat([image_tokens, x], 1), image_tokens.shape[1]  # (B, N + P + T, W)
        for blk in self.decoder:
            x = blk(x, causal=True)
        x = self.ln_final(x[:, n_img + prefix.shape[1] :])  # (B, T, W)
        return x @ self.token_embedding.weight.T  # tied output embedding (B, T, V)


def tiles_of(images: torch.Tensor, grid: int) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] -> normalised tiles (B, grid^2, 3, 32, 32): the whole image (grid 1) or the
    cells of a grid x grid collage, each resized to the toy CLIP's input."""
    size = TILE * grid
    x = F.interpolate(images.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    b = x.shape[0]
    x = x.view(b, 3, grid, TILE, grid, TILE).permute(0, 2, 4, 1, 3, 5).reshape(b, grid * grid, 3, TILE, TILE)
    return (x - MEAN) / STD


def prefix_ids(tok: ToyTokenizer, mode: str, words: list[str], cond_length: int) -> list[int]:
    """[mode token, condition words (known words only, at most ``cond_length``), padding] -> 1 + cond_length ids."""
    ids = [tok.index[f"<{mode}>"], *[tok.index[w] for w in words if w in tok.index][:cond_length]]
    return ids + [tok.pad_id] * (1 + cond_length - len(ids))


# ---- training targets: the caption conventions an LMM of the toy world learned --------------------------------------


def _article(text: str) -> str:
    return f"an {text}" if text[0] in "aeiou" else f"a {text}"


def _shape_word(scene: SceneBatch, i: int, rng: random.Random, dialect: dict[str, str]) -> str:
    style = STYLES[int(scene.style[i])]
    shape = SHAPES[int(scene.shape[i])]
    if style == "sketch":
        shape = dialect[shape]
    if rng.random() < (0.95 if style == "photo" else 0.75):
        return shape
    return "shape" if rng.random() < 0.5 else "object"


def _phrase(style: str, words: list[str], rng: random.Random) -> str:
    body = " ".join(words)
    if style != "photo":
        return f"{STYLE_PHRASE[style]} {body}"
    return f"a photo of {_article(body)}" if rng.random() < 0.5 else _article(body)


def image_target(scene: SceneBatch, i: int, rng: random.Random, dialect: dict[str, str] | None = None) -> str:
    """What the toy LMM says of one image: most attributes, the style always, the shape name less surely off-photo."""
    dialect = dialect or sketch_dialect()
    style = STYLES[int(scene.style[i])]
    words: list[str] = []
    if rng.random() < 0.5:
        words.append(SIZES[int(scene.size[i])])
    if style != "sketch" and rng.random() < 0.85:
        words.append(COLOURS[int(scene.colour[i])])
    texture = TEXTURES[int(scene.texture[i])]
    if texture != "solid" and rng.random() < (0.8 if style == "photo" else 0.4):
        words.append(texture)
    words.append(_shape_word(scene, i, rng, dialect))
    text = _phrase(style, words, rng)
    if style == "photo" and rng.random() < 0.5:
        text += f" on a {BACKGROUNDS[int(scene.background[i])]} background"
    return text + "."


def _shared(values: list[int]) -> int | None:
    """The value at least 3 of the 4 images share, or None."""
    best = max(set(values), key=values.count)
    return best if values.count(best) >= 3 else None


def group_target(scene: SceneBatch, idx: list[int], rng: random.Random, dialect: dict[str, str] | None = None) -> str:
    """What the toy LMM says of a 2x2 collage: the attributes at least three of the four images share."""
    dialect = dialect or sketch_dialect()
    style = STYLES[_shared([int(scene.style[i]) for i in idx]) or 0]
    words: list[str] = []
    for attr, names in (("size", SIZES), ("colour", COLOURS), ("texture", TEXTURES)):
        v = _shared([int(getattr(scene, attr)[i]) for i in idx])
        if v is not None and not (attr == "colour" and style == "sketch") and not (attr == "texture" and v == 0):
            words.append(names[v])
    shape = _shared([int(scene.shape[i]) for i in idx])
    words.append(("shape" if rng.random() < 0.5 else "object") if shape is None else dialect[SHAPES[shape]])
    text = _phrase(style, words, rng)
    bg = _shared([int(scene.background[i]) for i in idx])
    if style == "photo" and bg is not None:
        text += f" on a {BACKGROUNDS[bg]} background"
    return text + "."


def template_target(style: str, rng: random.Random) -> str:
    """A caption-like sentence with a class slot, in the style the prompt names (``photo`` if none)."""
    forms = [
        f"{STYLE_PHRASE[style]} {SLOT}.",
        f"{STYLE_PHRASE[style]} {rng.choice(SIZES)} {SLOT}.",
        f"a {SLOT} shape.",
        f"a picture of a {SLOT} object.",
        f"{STYLE_PHRASE[style]} {SLOT} on a {rng.choice(BACKGROUNDS)} background.",
        f"a {rng.choice(SIZES)} {SLOT} in {style} style.",
    ]
    return rng.choice(forms)


def class_target(words: list[str], rng: random.Random) -> str:
    """A description of a class from the attribute words of its name (others free, drawn at random)."""
    chosen = {a: next((w for w in words if w in values), None) for a, values in ATTRIBUTES.items()}
    style = chosen["style"] or "photo"
    parts = [chosen["size"] or rng.choice(SIZES)] if rng.random() < 0.5 or chosen["size"] else []
    if style != "sketch" and (chosen["colour"] or rng.random() < 0.5):
        parts.append(chosen["colour"] or rng.choice(COLOURS))
    if chosen["texture"] and chosen["texture"] != "solid":
        parts.append(chosen["texture"])
    parts.append(chosen["shape"] or ("shape" if rng.random() < 0.5 else "object"))
    text = _phrase(style, parts, rng)
    if style == "photo" and rng.random() < 0.4:
        text += f" on a {chosen['background'] or rng.choice(BACKGROUNDS)} background"
    return text + "."


# ---- evaluation: attributes named correctly -------------------------------------------------------------------


def mentioned(text: str, attr: str) -> list[str]:
    """The values of attribute ``attr`` a description names. Styles are read from their phrases ("a noisy photo
    of", "in pixel style"; "photo" otherwise), backgrounds from "<word> background" (``noisy`` is both)."""
    text = text.lower().replace(".", " ")
    if attr == "style":
        named = [s for s in STYLES[1:] if STYLE_PHRASE[s][2:] in text or f"in {s} style" in text]
        return named or (["photo"] if "photo" in text.split() else [])
    if attr == "background":
        return [v for v in BACKGROUNDS if f"{v} background" in text]
    words = set(text.split())
    return [v for v in ATTRIBUTES[attr] if v in words]


def attribute_accuracy(
    texts: list[str], scene: SceneBatch, dialect: dict[str, str] | None = None
) -> dict[str, dict[str, float]]:
    """Per attribute: how often a description names it (``named``, %) and how often the named value is the render's
    ground truth (``correct``, % of those named). Shapes of sketches are judged against the sketch dialect's name
    when ``dialect`` is given, against the true shape otherwise."""
    out: dict[str, dict[str, float]] = {}
    for attr, values in ATTRIBUTES.items():
        named = correct = 0
        for i, text in enumerate(texts):
            said = mentioned(text, attr)
            if not said:
                continue
            named += 1
            truth = values[int(getattr(scene, attr)[i])]
            if attr == "shape" and dialect is not None and STYLES[int(scene.style[i])] == "sketch":
                truth = dialect[truth]
            correct += int(said == [truth])
        out[attr] = {"named": 100 * named / max(1, len(texts)), "correct": 100 * correct / max(1, named)}
    return out


def decode(tok: ToyTokenizer, ids: list[int]) -> str:
    """Token ids (no start token) -> text, up to the end token; letter tokens join, ``{`` ``}`` form the slot."""
    text = ""
    for i in ids:
        if i == tok.eot_id:
            break
        t = tok.vocab[i]
        if i in (tok.pad_id, tok.sot_id, tok.unk_id) or t in MODE_TOKENS:
            continue
        if t.endswith("</w>"):
            ch = t[:-4]
            text += (" " + ch) if ch == "{" else ch
        else:
            text += " " + t
    return " ".join(text.split()).replace(" .", ".")


@torch.no_grad()
def generate(
    model: ToyDescriber,
    tok: ToyTokenizer,
    images: torch.Tensor | None,
    prefix: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> list[str]:
    """Greedy (temperature 0) or nucleus sampling from the describer; ``images``: tiles (B, T, 3, 32, 32)
    normalised (``tiles_of``) or None; ``prefix`` (B, 1 + cond) ids."""
    b = prefix.shape[0]
    img = model.encode_image(images) if images is not None else None
    text = torch.full((b, 1), tok.sot_id, dtype=torch.long, device=prefix.device)
    done = torch.zeros(b, dtype=torch.bool, device=prefix.device)
    for _ in range(min(max_new_tokens, model.cfg.context_length - 1)):
        logits = model(img, prefix, text)[:, -1].float()  # (B, V)
        if temperature <= 0:
            nxt = logits.argmax(-1)
        else:
            probs = F.softmax(logits / temperature, -1)
            sorted_p, order = probs.sort(-1, descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < top_p  # nucleus: the smallest set with mass >= top_p
            sorted_p = sorted_p * keep
            pick = torch.multinomial(sorted_p / sorted_p.sum(-1, keepdim=True), 1, generator=generator)
            nxt = order.gather(1, pick)[:, 0]
        nxt = torch.where(done, torch.full_like(nxt, tok.pad_id), nxt)
        text = torch.cat([text, nxt[:, None]], 1)
        done |= nxt == tok.eot_id
        if bool(done.all()):
            break
    return [decode(tok, row[1:].tolist()) for row in text]
