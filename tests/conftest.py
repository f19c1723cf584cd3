"""Shared fixtures. Tests never touch the network: real data comes from ../shared/data when present."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("VLMTUNE_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# pytest-xdist workers share the 2 cores: one thread each (else two threads, as on the CI machine)
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("VLMTUNE_SHARED_DATA", REPO.parent / "shared" / "data"))
TEST_DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def toy():
    from vlmtune import load_backbone

    return load_backbone("toy")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def openclip_tiny():
    """Tiny random-init open_clip configs (no download), registered once."""
    open_clip = pytest.importorskip("open_clip")
    open_clip.add_model_config(TEST_DATA)
    return open_clip


@pytest.fixture(scope="session")
def toy_features():
    """Cached 16-shot / val / test features of a few toy tasks (computed once per session)."""
    from vlmtune import load_backbone, load_dataset
    from vlmtune.runs.runner import FeatureSource, RunConfig, make_task

    backbone = load_backbone("toy")
    source = FeatureSource(backbone, None, progress=False)
    out = {}

    def get(dataset: str, method: str = "linear_probe", shots: int = 16, seed: int = 1):
        key = (dataset, method, shots, seed)
        if key not in out:
            splits = load_dataset(dataset)
            cfg = RunConfig(method=method, dataset=dataset, shots=shots, seed=seed)
            task, _ = make_task(splits, source, cfg)
            out[key] = (task, source.features(splits["test"]))
        return out[key]

    return get


@pytest.fixture(scope="session")
def hf_tiny(tmp_path_factory):
    """A tiny random-init Hugging Face CLIP saved to a folder (letter-level vocabulary, no download)."""
    transformers = pytest.importorskip("transformers")
    import json
    import string

    folder = tmp_path_factory.mktemp("hf-tiny")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + ".,":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(folder)
    text = dict(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    torch.manual_seed(0)
    model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    model.save_pretrained(folder)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder
    )
    return folder, model


def capture_task(monkeypatch, method_cls) -> dict:
    """Record the ``Task`` the runner hands ``method_cls.fit`` (in the returned dict, key "task")."""
    seen: dict = {}
    original = method_cls.fit

    def spy(self, handle, task, *, generator):
        seen["task"] = task
        return original(self, handle, task, generator=generator)

    monkeypatch.setattr(method_cls, "fit", spy)
    return seen


FAST_COFT = {"peft_epochs": 2, "fft_epochs": 1, "n_ctx": 4, "vpt_tokens": 2, "shots": 4, "workers": 0, "final": "first"}
# Small black-box settings for the contract suite (the full-budget evidence lives in test_blackbox_methods.py).
FAST_OPTIONS = {
    "bbt": {"budget": 200, "popsize": 10, "subspace": 64},
    "craft": {"budget": 220, "popsize": 10, "subspace": 64},
    "blackvip": {"encoder": "toy:small", "epochs": 4, "batch_size": 64, "sp_avg": 2, "p_eps": 0.1},
    "coop": {"epochs": 4, "n_ctx": 4},
    "cocoop": {"epochs": 1, "batch_size": 16},
    "tmm": {"epochs": 1, "batch_size": 16},
    "proda": {"epochs": 4, "n_ctx": 4, "n_prompts": 8},
    "tip_adapter_f": {"epochs": 3},
    "upl": {"epochs": 5, "n_ctx": 4},
    "ifpl": {"iterations": 2, "epochs": 3, "n_ctx": 4},
    "grip": {"iterations": 2, "epochs": 3, "n_ctx": 4},
    "cpl": {"iterations": 2, "epochs": 3, "n_ctx": 4},
    "coft": FAST_COFT,
    "coft_plus": {**FAST_COFT, "rounds": 1, "moco": False},  # MoCo: test_coft.py
    # class texts only: generated texts through the runner are exercised once, in test_latteclip.py
    "latteclip": {"batch_size": 64, "iterations": 3, "lr": 1e-5, "workers": 0, "texts": "class"},
    "flyp": {"batch_size": 64, "iterations": 3, "lr": 1e-5, "workers": 0},
    "flyp_pl": {"batch_size": 64, "iterations": 3, "lr": 1e-5, "workers": 0},
    "reclip": {"epochs": 1, "workers": 0},
    "lmm_zeroshot": {},
    "lafter": {"epochs": 1, "text_steps": 100, "tokens": 4, "workers": 0, "descriptions": None},
}


@pytest.fixture(scope="session")
def toy_setup(toy):
    """(dataset, method) -> (fit(seed) -> classifier, predict(classifier) -> logits, test labels, task)."""
    from vlmtune import load_backbone, load_dataset
    from vlmtune.blackbox.local import LocalBlackBox
    from vlmtune.capabilities import Capability
    from vlmtune.data import few_shot
    from vlmtune.methods.api import Task
    from vlmtune.methods.registry import get_method, make_config
    from vlmtune.runs.runner import (
        FeatureSource,
        RunConfig,
        bind_client_encoder,
        make_task,
        split_logits,
        upload_split,
    )

    sources = {patches: FeatureSource(toy, None, progress=False, patches=patches) for patches in (False, True)}
    boxes: dict = {}

    def get(dataset: str, method: str):
        method_cls = get_method(method)
        cfg = make_config(method_cls, FAST_OPTIONS.get(method))
        splits = load_dataset(dataset)
        if method_cls.capability is Capability.BLACK_BOX:
            method = method_cls(cfg)
            options = method.box_options()
            key = (dataset, tuple(sorted(options.items())))
            if key not in boxes:
                box = LocalBlackBox(toy, **options)
                train = few_shot(splits["train"], 16, 1)
                refs = upload_split(box, train, False)
                boxes[key] = (
                    box,
                    Task(train.classnames, train.templates, train=refs),
                    upload_split(box, splits["test"], False),
                )
            box, task, test = boxes[key]
            if method.wants_encoder() is not None:  # a client-side encoder other than the served model
                task = dataclasses.replace(task, encoder=load_backbone(method.wants_encoder() or "toy"))

            def fit(seed: int = 1):
                return method_cls(cfg).fit(box, task, generator=torch.Generator().manual_seed(seed))

            def predict_bb(clf):
                bind_client_encoder(clf, "cpu")  # a loaded BlackVIP adapter: its coordinator's encoder
                return clf.predict_blackbox(box, test)

            return fit, predict_bb, test.labels, task
        source = sources[method_cls.needs_patches]
        task, _ = make_task(splits, source, RunConfig(method=method, dataset=dataset), method_cls(cfg))
        test = source.features(splits["test"])

        def fit_features(seed: int = 1):
            return method_cls(cfg).fit(toy, task, generator=torch.Generator().manual_seed(seed))

        def predict(clf):  # a tuned tower has its own features: through the adapter's image encoder
            if clf.image_encoder(toy) is toy:
                return clf.bind(toy).score(test)
            return split_logits(clf, toy, splits["test"], source, False)[0]

        return fit_features, predict, test.labels, task

    return get


@contextlib.contextmanager
def running_server(
    app, header_timeout: float = 10.0, max_connections: int = 512, max_per_address: int = 64, send_timeout: float = 30.0
):
    """Serve an ASGI app on a free loopback port in a thread; yields its URL."""
    import threading
    import time

    import uvicorn

    from vlmtune.blackbox.server import server_config

    server = uvicorn.Server(
        server_config(app, "127.0.0.1", 0, header_timeout, max_connections, "error", max_per_address, send_timeout)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def key_box(app, key: str):
    """The per-key box behind a served app (tests look at its counters)."""
    from vlmtune.blackbox.accounts import key_id

    return app.app.state.boxes[key_id(key)]
