"""The recipes: one per main table of papers 000-004, each naming its protocol, rows (methods and presets), datasets,
backbones, shots and seeds; the paper's numbers come from ``vlmtune.runs.paper_tables`` (package data).

A row whose method vlmtune does not have yet (``method=None``) is listed and skipped, never run as something else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from vlmtune.errors import UnknownName
from vlmtune.runs.paper_tables import PaperTable, paper_table

Protocol = Literal["few-shot", "base-to-new", "transfer", "unsupervised", "noisy-labels", "distill"]

# the papers' backbones -> open_clip specs (the papers use OpenAI's CLIP weights, paper 004 OpenCLIP's LAION-2B)
BACKBONES: dict[str, str] = {
    "RN50": "openclip:RN50@openai",
    "RN101": "openclip:RN101@openai",
    "ViT-B/32": "openclip:ViT-B-32@openai",
    "ViT-B/16": "openclip:ViT-B-16@openai",
    "ViT-L/14": "openclip:ViT-L-14@openai",
    "ViT-B/32 LAION-2B": "openclip:ViT-B-32@laion2b_s34b_b79k",
}
DISTILL_SEP = "->"  # "ViT-L/14->ViT-B/16": Phase I on the first, Phase II fine-tunes the second

# the 11 datasets of CoOp's protocol (papers 000-002), in our names
COOP_11 = (
    "oxford_pets",
    "oxford_flowers",
    "fgvc_aircraft",
    "dtd",
    "eurosat",
    "stanford_cars",
    "food101",
    "sun397",
    "caltech101",
    "ucf101",
    "imagenet",
)


@dataclass(frozen=True)
class Row:
    """One row of a paper's table: ``label`` as in the table's CSV; ``method`` the registered method (None: not in
    vlmtune yet), with ``options``; ``protocol`` / ``shots`` where they differ from the recipe's."""

    label: str
    method: str | None
    options: Mapping[str, Any] = field(default_factory=dict)
    protocol: Protocol | None = None
    shots: int | None = None
    note: str = ""


@dataclass(frozen=True)
class Recipe:
    """A paper table as runs: ``rows`` x ``datasets`` x ``backbones`` x ``shots`` x ``seeds`` under ``protocol``.

    ``columns="datasets"``: one column per dataset (transfer: the source, then each target) and the paper's
    ``avg``; ``"shots"``: one column per shot count, the mean over ``datasets`` (the ablation tables).
    """

    name: str
    table: str  # key of the paper's numbers (``vlmtune.runs.paper_tables``)
    protocol: Protocol
    rows: tuple[Row, ...]
    shots: tuple[int, ...] = (16,)
    seeds: tuple[int, ...] = (1, 2, 3)
    columns: Literal["datasets", "shots"] = "datasets"
    datasets: tuple[str, ...] = ()  # () = the table's dataset columns
    noise: str = ""  # noisy-labels: the noise spec of the train labels
    note: str = ""

    @property
    def paper(self) -> PaperTable:
        return paper_table(self.table)

    @property
    def title(self) -> str:
        return self.paper.caption

    @property
    def backbones(self) -> tuple[str, ...]:
        return self.paper.backbones

    def dataset_columns(self) -> tuple[str, ...]:
        """The datasets the recipe trains on (transfer: the source first, then the targets it is scored on)."""
        if self.datasets:
            return self.datasets
        names = (c.partition("/")[0] for c in self.paper.columns)
        return tuple(dict.fromkeys(n for n in names if n != "avg"))

    def row(self, label: str) -> Row:
        for r in self.rows:
            if r.label == label:
                return r
        raise UnknownName(f"row of recipe {self.name}", label, [r.label for r in self.rows])


def _craft_rows(preset: str | None = None) -> tuple[Row, ...]:
    """Zero-shot, BBT and CraFT (CARROT: its lambda_I = 1 preset) with the papers' template, as Table 1."""
    craft_options = {"preset": preset} if preset else {}
    return (
        Row("zeroshot", "zeroshot"),
        Row("bbt", "bbt"),
        Row("craft", "craft", craft_options),
    )


def _shift_rows(preset: str | None = None) -> tuple[Row, ...]:
    return (
        Row("zeroshot", "zeroshot"),
        Row("coop-L4", "coop", {"n_ctx": 4, "ctx_init": "a photo of a"}, note="CoOp, prompt length 4"),
        Row("coop-L16", "coop", {"n_ctx": 16}, note="CoOp, prompt length 16"),
        Row("craft", "craft", {"preset": preset} if preset else {}),
    )


def _components(preset: str | None = None) -> tuple[Row, ...]:
    base = {"preset": preset} if preset else {}
    return (
        Row("pg-only", "craft", {**base, "use_head": False}, note="prompt generation alone"),
        Row("pr-only", "craft", {**base, "use_prompt": False}, note="prediction refinement alone"),
        Row("iterative", "craft", {**base, "training": "iterative"}, note="PG + PR alternated, no KL terms"),
        Row("craft", "craft", base),
    )


def _refinement(preset: str | None = None) -> tuple[Row, ...]:
    base = {"preset": preset} if preset else {}
    return (
        Row("no-residual", "craft", {**base, "residual": False}, note="Y_O = R(Y_I)"),
        Row("linear-head", "craft", {**base, "head": "linear"}, note="one K x K layer"),
        Row("craft", "craft", base),
    )


def _ablation(name: str, rows: tuple[Row, ...]) -> Recipe:
    """An ablation table of papers 000 / 001: each shot count's mean over the 11 datasets."""
    return Recipe(name, name.replace("-", "_"), "few-shot", rows, (1, 2, 4, 8, 16), columns="shots", datasets=COOP_11)


_TMM_ROWS = (
    Row("zeroshot", "zeroshot"),
    Row("coop", "coop"),
    Row("cocoop", "cocoop"),
    Row("proda", "proda"),
    Row("tmm", "tmm"),
)
_TMM_SHORT = tuple(r for r in _TMM_ROWS if r.label != "proda")  # Tables 2-4 have no ProDA row
_LABEL_FREE = tuple(Row(m, m) for m in ("zeroshot", "coft_plus", "coft", "upl", "ifpl", "grip", "lafter", "cpl"))
_MISSING_NOISY = ("elr", "sce", "gmm", "rolt", "unicon", "longremix", "promix", "deft")

RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("000-table1", "000_table1", "few-shot", _craft_rows("carrot"), note="CARROT = CraFT with lambda_I = 1"),
        Recipe("000-table2", "000_table2", "transfer", _shift_rows("carrot")),
        _ablation("000-table3", _refinement("carrot")),
        _ablation("000-table4", _components("carrot")),
        Recipe("001-table1", "001_table1", "few-shot", _craft_rows()),
        Recipe("001-table2", "001_table2", "transfer", _shift_rows()),
        _ablation("001-table3", _components()),
        _ablation("001-table7", _refinement()),
        Recipe(
            "001-table9",
            "001_table9",
            "few-shot",
            (
                Row("bbt", "bbt"),
                Row("blackvip", "blackvip", note="coordinator encoder: the run's backbone (paper: MAE ViT-B/16)"),
                Row("bbt-vp", "bbt", {"preset": "yu2023"}, note="Yu et al. 2023: BBT with text and visual prompts"),
                Row("craft", "craft"),
                Row("craft-vp", "craft", {"visual_prompt": True}, note="CraFT + visual prompts (App. B)"),
            ),
        ),
        Recipe("002-table1", "002_table1", "base-to-new", _TMM_ROWS),
        Recipe("002-table2", "002_table2", "few-shot", _TMM_SHORT, note="the caption's '6-shot' read as 16 shots"),
        Recipe("002-table3", "002_table3", "transfer", _TMM_SHORT[1:]),
        Recipe("002-table4", "002_table4", "transfer", _TMM_SHORT),
        Recipe("003-table1", "003_table1", "unsupervised", _LABEL_FREE, (0,)),
        Recipe(
            "003-table2",
            "003_table2",
            "noisy-labels",
            (
                Row("ce", "linear_probe", note="plain cross-entropy on the noisy labels (ours: the linear probe)"),
                *(
                    Row(m, None, note=f"{m.upper()}: a noisy-label method vlmtune does not have")
                    for m in _MISSING_NOISY
                ),
                Row("coft", "coft"),
                Row("coft_plus", "coft_plus"),
            ),
            (0,),
            noise="cifar100n",
        ),
        Recipe(
            "003-table3",
            "003_table3",
            "distill",
            (
                Row("zeroshot", "zeroshot"),
                Row("coft_plus", "coft_plus"),
                Row("coft", "coft"),
                Row("promptkd", None, note="PromptKD: not in vlmtune (a transductive zero-shot distillation)"),
            ),
            (0,),
        ),
        Recipe(
            "003-table4",
            "003_table4",
            "unsupervised",
            (
                *_LABEL_FREE[:3],
                *(
                    Row(f"{m}-{k}", m, protocol="few-shot", shots=k, note=f"{k} labelled shots per class")
                    for m in ("coop", "tip_adapter", "tip_adapter_f")
                    for k in (2, 4, 8)
                ),
            ),
            (0,),
        ),
        Recipe("003-table5", "003_table5", "unsupervised", _LABEL_FREE, (0,)),
        Recipe(
            "004-table1",
            "004_table1",
            "unsupervised",
            (
                Row("flyp", "flyp", protocol="few-shot", shots=0, note="the oracle: FLYP on the true labels"),
                Row("lmm_zeroshot", "lmm_zeroshot"),
                Row("zeroshot", "zeroshot"),
                Row("reclip", "reclip"),
                Row("flyp_pl", "flyp_pl"),
                Row("latteclip", "latteclip"),
            ),
            (0,),
        ),
        Recipe(
            "004-table2",
            "004_table2",
            "unsupervised",
            tuple(
                Row(texts, "latteclip", {"texts": "class+image+group" if texts == "latteclip" else texts})
                for texts in ("latteclip", "class+image", "class", "image+group", "image", "group", "class+group")
            ),
            (0,),
        ),
        Recipe(
            "004-table3",
            "004_table3",
            "unsupervised",
            tuple(
                Row(p, "latteclip", {"preset": p} if p != "latteclip" else {})
                for p in ("latteclip", "no-mixer", "no-ft", "no-zs", "no-momentum")
            ),
            (0,),
        ),
    )
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise UnknownName("recipe", name, list(RECIPES))
    return RECIPES[name]
