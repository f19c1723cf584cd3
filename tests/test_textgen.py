"""The text-generation stage: backends (toy, transformers on a tiny random-init LLaVA, openai over loopback HTTP),
the cache with provenance, prompts, collages, groups, the CLI and CoFT+'s generated templates. No network."""

from __future__ import annotations

import json
import sqlite3
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import running_server
from vlmtune.data import load_dataset
from vlmtune.errors import UnknownName, VlmtuneError
from vlmtune.textgen import DatasetTexts, GenRequest, GenSettings, Prompts, TextCache, TextStage, collage
from vlmtune.textgen.backends.toy import ToyBackend, request_mode
from vlmtune.textgen.stage import group_members, usable_template
from vlmtune.toy.describer import attribute_accuracy
from vlmtune.toy.world import SHAPES, SceneDistribution


@pytest.fixture(scope="module")
def toy_gen():
    return ToyBackend()


@pytest.fixture(scope="module")
def shapes_train():
    return load_dataset("toy:shapes")["train"]


def small(split, n=6):
    return split.subset(range(0, len(split), len(split) // n)[:n])


def counting(backend):
    """Wrap a backend's generate to count the requests it receives."""
    calls = []
    inner = backend.generate

    def generate(requests, settings):
        calls.append(len(requests))
        return inner(requests, settings)

    backend.generate = generate
    return calls


# ---- cache -----------------------------------------------------------------------------------------------------------
def test_second_run_generates_nothing_and_changed_prompt_or_setting_misses(tmp_path, toy_gen, shapes_train):
    split = small(shapes_train)
    stage = TextStage("toy", cache=TextCache(tmp_path), progress=False, _generator=toy_gen)
    first = DatasetTexts(stage, split).image_descriptions()
    assert stage.generated == len(split) and all(first)

    again = TextStage("toy", cache=TextCache(tmp_path), progress=False)  # a new process: backend never loaded
    assert DatasetTexts(again, split).image_descriptions() == first
    assert again.generated == 0 and again._generator is None

    prompts = Prompts.for_dataset(split.dataset).with_overrides({"image": "Describe the colour of the shape."})
    DatasetTexts(again, split, prompts).image_descriptions()
    assert again.generated == len(split)  # a changed prompt misses
    longer = TextStage("toy", cache=TextCache(tmp_path), settings=GenSettings(max_new_tokens=5), progress=False)
    DatasetTexts(longer, split).image_descriptions()
    assert longer.generated == len(split)  # a changed setting misses

    rows = list(TextCache(tmp_path).entries())
    prov = rows[0].provenance
    assert {"backend", "model", "revision", "settings", "prompt", "image", "date", "kind", "dataset", "id"} <= set(prov)
    assert prov["model"] == "toy-describer" and prov["settings"]["max_new_tokens"] in (77, 5)


def test_damaged_entries_are_regenerated_and_a_damaged_file_is_refused(tmp_path, toy_gen, shapes_train):
    split = small(shapes_train, 2)
    stage = TextStage("toy", cache=TextCache(tmp_path), progress=False, _generator=toy_gen)
    texts = DatasetTexts(stage, split).image_descriptions()
    with sqlite3.connect(tmp_path / "texts.sqlite") as db:
        db.execute("UPDATE texts SET text = 'tampered' WHERE rowid = 1")
    stage2 = TextStage("toy", cache=TextCache(tmp_path), progress=False, _generator=toy_gen)
    assert DatasetTexts(stage2, split).image_descriptions() == texts
    assert stage2.generated == 1

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "texts.sqlite").write_bytes(b"not a database" * 100)
    with pytest.raises(VlmtuneError, match="damaged"):
        TextCache(bad)


@pytest.mark.parametrize(
    "damage",
    [
        "UPDATE texts SET text = 5 WHERE rowid = 1",  # not text at all
        "UPDATE texts SET text = CAST(X'fffe4d41524b4552' AS TEXT) WHERE rowid = 1",  # not UTF-8 (MARKER)
        "UPDATE texts SET provenance = 'MARKER {' WHERE rowid = 1",  # provenance that is not JSON
    ],
)
def test_damaged_rows_are_misses_and_never_tracebacks(tmp_path, toy_gen, shapes_train, damage, caplog):
    split = small(shapes_train, 2)
    stage = TextStage("toy", cache=TextCache(tmp_path), progress=False, _generator=toy_gen)
    texts = DatasetTexts(stage, split).image_descriptions()
    with sqlite3.connect(tmp_path / "texts.sqlite") as db:
        db.execute(damage)
    again = TextStage("toy", cache=TextCache(tmp_path), progress=False, _generator=toy_gen)
    assert DatasetTexts(again, split).image_descriptions() == texts
    assert again.generated == (0 if "provenance" in damage else 1)  # the text is fine, its record was not
    entries = list(TextCache(tmp_path).entries())  # the damaged row is now replaced (or skipped, if only its record)
    assert len(entries) >= len(split) - 1 and "MARKER" not in caplog.text


def test_a_cache_damaged_inside_its_pages_is_one_line(tmp_path, toy_gen, shapes_train):
    stage = TextStage("toy", cache=TextCache(tmp_path), progress=False, _generator=toy_gen)
    DatasetTexts(stage, small(shapes_train, 20)).image_descriptions()
    stage.cache.close()
    path = tmp_path / "texts.sqlite"
    data = bytearray(path.read_bytes())
    data[4096:] = b"\xa5" * (len(data) - 4096)  # the header page intact, every other page garbage
    path.write_bytes(bytes(data))
    with pytest.raises(VlmtuneError, match="damaged") as info:
        cache = TextCache(tmp_path)
        cache.get_many(["x" * 64])
        list(cache.entries())
    assert "\n" not in str(info.value)


# ---- the toy describer ----------------------------------------------------------------------------------------------
def test_toy_describer_names_what_it_sees(toy_gen):
    """Informative and imperfect: greedy descriptions of fresh photo renders name the shape and colour mostly right."""
    from vlmtune.toy.render import render

    gen = torch.Generator().manual_seed(7)
    scene = SceneDistribution(style=(1, 0, 0, 0, 0), exclude_pairs=()).sample(48, gen)
    images = (render(scene, gen) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    reqs = [GenRequest(Prompts.for_dataset("toy:shapes").image, Image.fromarray(im)) for im in images]
    texts = toy_gen.generate(reqs, GenSettings())
    acc = attribute_accuracy(texts, scene)
    assert acc["shape"]["named"] > 50 and acc["shape"]["correct"] > 100 / len(SHAPES) + 20
    assert acc["colour"]["correct"] > 50


def test_describer_training_script_runs_on_the_cpu_and_its_output_loads(tmp_path):
    from vlmtune.toy.train_describer import main

    main(["--steps", "2", "--batch", "4", "--eval-n", "4", "--device", "cpu", "--out", str(tmp_path)])
    meta = json.loads((tmp_path / "describer.json").read_text())
    assert meta["provenance"]["steps"] == 2 and set(meta["attribute_accuracy"]) == {
        "photo",
        "sketch",
        "noisy",
        "pixel",
        "blurry",
    }
    backend = ToyBackend(str(tmp_path))
    assert backend.model == str(tmp_path) and len(backend.generate([GenRequest("a {} shape.")], GenSettings())) == 1


def test_toy_modes_templates_and_class_descriptions(toy_gen, shapes_train):
    prompts = Prompts.for_dataset("toy:shapes")
    assert request_mode(GenRequest(prompts.group, Image.new("RGB", (8, 8)))) == "group"
    assert request_mode(GenRequest(prompts.image, Image.new("RGB", (8, 8)))) == "image"
    assert request_mode(GenRequest(prompts.templates)) == "template"
    assert request_mode(GenRequest(prompts.class_.replace("{classname}", "star"))) == "class"
    stage = TextStage("toy", progress=False, _generator=toy_gen)
    texts = DatasetTexts(stage, small(shapes_train, 2))
    templates = texts.templates(6)
    assert templates and all(t.count("{}") == 1 for t in templates)
    assert texts.templates(6) == templates  # sampled with fixed seeds: reproducible
    described = texts.class_descriptions(["red star", "blue ring"], n=3)
    assert [len(v) for v in described.values()] == [3, 3]
    assert sum("star" in s for s in described["red star"]) >= 2


def test_usable_template_keeps_one_slot_and_escapes_other_braces():
    assert usable_template('"a photo of a {}."') == "a photo of a {}."
    assert usable_template("a {} {} photo") is None and usable_template("no slot") is None
    assert usable_template("a {x} photo of a {}").format("cat") == "a {x} photo of a cat"


# ---- groups and collages -------------------------------------------------------------------------------------------
def test_collage_is_a_2x2_grid_on_black():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    out = np.asarray(collage([Image.new("RGB", (40, 20), c) for c in colours]))
    assert out.shape == (672, 672, 3)
    assert (out[:20] == 0).all() and (out[:, 326:346] == 0).all()  # outer and middle gaps
    cell = (672 - 3 * 20) // 2
    for k, c in enumerate(colours):
        r, col = divmod(k, 2)
        centre = out[20 + r * (cell + 20) + cell // 2, 20 + col * (cell + 20) + cell // 2]
        assert tuple(centre) == c
    assert np.asarray(collage([Image.new("RGB", (9, 9), "white")] * 5)).shape == (672, 672, 3)  # 3x3 grid


def test_group_members_share_the_pseudo_label_and_are_reproducible():
    labels = np.array([0, 0, 0, 0, 0, 1, 1, 2])
    groups = group_members(labels, 4, seed=3)
    assert groups == group_members(labels, 4, seed=3)
    for i, members in enumerate(groups):
        assert len(members) == 4 and all(labels[j] == labels[i] for j in members)
    assert len(set(groups[0])) == 4  # without replacement where the class has four
    assert set(groups[7]) == {7}  # a class of one: that image four times


def test_groups_drawn_by_content_do_not_depend_on_the_order_of_the_images():
    labels = np.array([0, 1, 0, 0, 1, 0, 1, 1, 0])
    keys = [f"{(37 * i) % 101:024x}" for i in range(len(labels))]
    groups = group_members(labels, 3, seed=2, keys=keys)
    order = np.random.default_rng(0).permutation(len(labels))  # the run's seed-shuffled order
    shuffled = group_members(labels[order], 3, seed=2, keys=[keys[j] for j in order])
    for pos, i in enumerate(order):  # the same images (by content) in every image's group
        assert sorted(keys[order[j]] for j in shuffled[pos]) == sorted(keys[j] for j in groups[i])
    assert group_members(labels, 3, seed=5, keys=keys) != groups  # the seed still matters


def test_group_descriptions_cache_by_members(tmp_path, toy_gen, shapes_train):
    split = small(shapes_train, 8)
    stage = TextStage("toy", cache=TextCache(tmp_path), progress=False, _generator=toy_gen)
    labels = np.arange(8) % 2
    out = DatasetTexts(stage, split).group_descriptions(labels)
    assert len(out) == 8 and stage.generated <= 8
    entry = next(TextCache(tmp_path).entries())
    assert entry.provenance["kind"] == "group" and len(entry.provenance["members"]) == 4


# ---- prompts --------------------------------------------------------------------------------------------------------
def test_paper_and_reference_prompts():
    paper = Prompts.for_dataset("oxford_pets")
    assert paper.image == "Describe the pet in the photo concisely, using less than 20 words."
    assert "common visual attributes of the pet in all the photos" in paper.group
    ref = Prompts.for_dataset("dtd", "reference")
    assert ref.image == "Describe the texture in the photo concisely, less than 20 words."
    assert "of the textures in all the photos" in ref.group
    assert "satellite image" in Prompts.for_dataset("eurosat@noisy=pairflip-0.2", "reference").image
    assert "{label}" in Prompts.for_dataset("food101", "reference").image
    assert "{}" in paper.templates and "{{" not in paper.templates
    assert Prompts.for_dataset("dtd").with_overrides({"class": "What is {classname}?"}).class_ == "What is {classname}?"
    with pytest.raises(UnknownName):
        Prompts.for_dataset("dtd", "mine")
    with pytest.raises(UnknownName):
        TextStage("llamas")


# ---- transformers: a tiny random-init LLaVA built offline ------------------------------------------------------------
def build_tiny_llava(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    words = "describe the shape in photo concisely using less than 20 words a red circle user assistant : .".split()
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", "<image>", *dict.fromkeys(words)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )  # fmt: skip
    template = (
        "{% for m in messages %}user : {% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
        "{% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %}assistant : "
        "{% endif %}"
    )
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=fast, patch_size=8, vision_feature_select_strategy="default",
        chat_template=template, num_additional_image_tokens=1,
    )  # fmt: skip
    torch.manual_seed(0)
    small_llm = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**small_llm, image_size=32, patch_size=8),
        text_config=LlamaConfig(
            vocab_size=len(vocab), num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
            bos_token_id=1, eos_token_id=2, **small_llm,
        ),
        image_token_index=vocab["<image>"],
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )  # fmt: skip
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_transformers_backend_generates_decodes_and_caches(tmp_path, shapes_train):
    pytest.importorskip("transformers")
    folder = build_tiny_llava(tmp_path / "tiny-llava")
    split = small(shapes_train, 3)
    cache = TextCache(tmp_path / "cache")
    stage = TextStage("transformers", str(folder), cache, GenSettings(max_new_tokens=4), progress=False)
    texts = DatasetTexts(stage, split)
    out = texts.image_descriptions()
    assert len(out) == 3 and all(isinstance(t, str) and t for t in out)
    assert stage.generated == 3
    assert stage.generator.revision == "local"
    mixed = stage.generator.generate(
        [GenRequest("describe a red circle"), GenRequest("describe the shape", split.image(0))], stage.settings
    )  # text-only and image requests in one call
    assert len(mixed) == 2 and all(mixed)
    # likelihoods of given answers: batched (right-padded) scores equal each answer scored alone
    backend, req = stage.generator, GenRequest("describe the shape", split.image(0))
    answers = ["a red circle .", "circle", "a circle in a red photo ."]
    together = backend.score([req], answers)[0]
    alone = [backend.score([req], [a])[0][0] for a in answers]
    assert all(v < 0 for v in together)
    np.testing.assert_allclose(together, alone, rtol=1e-4)
    again = TextStage("transformers", str(folder), cache, GenSettings(max_new_tokens=4), progress=False)
    assert DatasetTexts(again, split).image_descriptions() == out and again._generator is None
    with pytest.raises(VlmtuneError, match="not available offline"):
        TextStage("transformers", str(tmp_path / "nowhere"), progress=False).generator  # noqa: B018


# ---- openai: the toy describer served in the chat-completions schema on loopback ---------------------------------
@pytest.fixture(scope="module")
def chat_server(toy_gen):
    pytest.importorskip("openai")
    from starlette.responses import JSONResponse

    from vlmtune.textgen.serve import chat_app

    app = chat_app(toy_gen, keys=None)
    state = {"fail": 0, "delay": 0.0, "seen": 0}

    @app.app.middleware("http")
    async def misbehave(request, call_next):  # rate limits and slowness on demand
        state["seen"] += 1
        if state["fail"] > 0:
            state["fail"] -= 1
            return JSONResponse({"error": {"message": "slow down"}}, status_code=429, headers={"retry-after": "0"})
        if state["delay"]:
            time.sleep(state["delay"])
        return await call_next(request)

    with running_server(app) as url:
        yield f"{url}/v1", state


def test_openai_backend_over_http_matches_the_toy_describer_and_retries_429(chat_server, toy_gen, shapes_train):
    from vlmtune.textgen.backends.openai_api import OpenAIBackend

    url, state = chat_server
    split = small(shapes_train, 4)
    reqs = [GenRequest(Prompts.for_dataset("toy:shapes").image, split.image(i)) for i in range(4)]
    api = OpenAIBackend("toy-describer", url, concurrency=2, timeout=30, retries=2)
    assert api.generate(reqs, GenSettings()) == toy_gen.generate(reqs, GenSettings())  # PNG data URLs: lossless
    state.update(fail=1, seen=0)
    assert api.generate(reqs[:1], GenSettings()) == toy_gen.generate(reqs[:1], GenSettings())
    assert state["seen"] == 2  # one 429, one retry


def test_openai_backend_times_out_and_reports_errors_in_one_line(chat_server):
    from vlmtune.textgen.backends.openai_api import OpenAIBackend

    url, state = chat_server
    state.update(delay=1.5)
    try:
        with pytest.raises(VlmtuneError, match="timed out"):
            OpenAIBackend("toy-describer", url, timeout=0.5, retries=0).generate(
                [GenRequest("a {} shape.")], GenSettings()
            )
    finally:
        state.update(delay=0.0)
    state.update(fail=5)
    with pytest.raises(VlmtuneError, match="HTTP 429"):
        OpenAIBackend("toy-describer", url, retries=1).generate([GenRequest("a {} shape.")], GenSettings())
    state.update(fail=0)
    with pytest.raises(VlmtuneError, match="cannot reach"):
        OpenAIBackend("m", "http://127.0.0.1:9/v1", timeout=2, retries=0).generate([GenRequest("x")], GenSettings())


# ---- CLI and methods ------------------------------------------------------------------------------------------------
def test_cli_textgen_fills_the_cache_and_reruns_from_it(tmp_path, capsys):
    from vlmtune.cli import main

    args = ["textgen", "--dataset", "toy:shapes", "--kind", "group", "--limit", "8", "--cache-dir", str(tmp_path), "-q"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "8 texts" in first and "0 from the cache" in first
    assert main(args) == 0
    assert "(0 generated, 8 from the cache)" in capsys.readouterr().out
    rows = [
        json.loads(line) for line in (tmp_path / "textgen" / "toy_shapes-train-group.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 8 and {"id", "pseudo_label", "text"} <= set(rows[0])
    assert main(["textgen", "--dataset", "toy:shapes", "--kind", "image", "--backend", "llama", "-q"]) == 2
    assert "unknown text-generation backend" in capsys.readouterr().err


def test_coft_plus_pseudo_labels_with_generated_templates(toy, toy_gen, shapes_train):
    from vlmtune.methods.api import Task
    from vlmtune.methods.common.text import class_text_weights
    from vlmtune.methods.labelfree.coft.methods import CoFTPlus, CoFTPlusConfig

    stage = TextStage("toy", progress=False, _generator=toy_gen)
    task = Task(shapes_train.classnames, shapes_train.templates, texts=DatasetTexts(stage, small(shapes_train, 2)))
    method = CoFTPlus(CoFTPlusConfig(generated=6))
    weights = method.initial_weights(toy, task)
    templates = task.texts.templates(6)
    assert templates and torch.allclose(weights, class_text_weights(toy, task.classnames, templates))
    assert "generated templates" in method.hooks.notes[0]
    per_class = CoFTPlus(CoFTPlusConfig(descriptions="generate-classes", generated=2)).initial_weights(toy, task)
    assert per_class.shape == weights.shape
    assert stage.generated == 6 + 2 * len(task.classnames)
