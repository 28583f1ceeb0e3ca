"""Shared fixtures.

Omniglot tests run on the real archives when ``CS330_DATA_MIRROR`` holds them (as in CI) and
otherwise on a small Omniglot-shaped pair of zips built here, so ``make test`` passes either way.
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


def make_fake_omniglot(folder: Path, alphabets: int = 8, characters: int = 10, seed: int = 0) -> Path:
    """Write ``omniglot/images_{background,evaluation}.zip`` with 105x105 1-bit PNGs in the official
    layout (``<split>/<alphabet>/characterNN/<id>_<drawing>.png``): each character is a random
    stroke pattern plus per-drawing noise, so classes are learnable but not identical."""
    rng = np.random.default_rng(seed)
    out = folder / "omniglot"
    out.mkdir(parents=True, exist_ok=True)
    char_id = 0
    for split, n_alpha in (("images_background", alphabets), ("images_evaluation", alphabets // 2)):
        with zipfile.ZipFile(out / f"{split}.zip", "w") as zf:
            for a in range(n_alpha):
                for c in range(characters):
                    char_id += 1
                    prototype = rng.random((15, 15)) < 0.12
                    for d in range(20):
                        strokes = prototype ^ (rng.random((15, 15)) < 0.03)
                        pixels = np.where(np.kron(strokes, np.ones((7, 7))), 0, 255).astype(np.uint8)
                        buf = io.BytesIO()
                        Image.fromarray(pixels).convert("1").save(buf, format="PNG")
                        member = f"{split}/Alphabet_{split[7]}{a}/character{c + 1:02d}/{char_id:04d}_{d + 1:02d}.png"
                        zf.writestr(member, buf.getvalue())
    return folder


def real_omniglot_available() -> bool:
    mirror = os.environ.get("CS330_DATA_MIRROR")
    return bool(mirror) and (Path(mirror) / "omniglot" / "images_background.zip").exists()


@pytest.fixture(scope="session")
def omniglot_data_dir(tmp_path_factory) -> Path:
    """A data directory from which ``OmniglotStore.load(data_dir)`` works: real archives through
    the mirror when available (the tensor cache is built once per session here), else a fake set."""
    folder = tmp_path_factory.mktemp("data")
    if real_omniglot_available():
        return folder
    return make_fake_omniglot(folder)


@pytest.fixture(scope="session")
def omniglot_store(omniglot_data_dir):
    from common.omniglot import OmniglotStore

    return OmniglotStore.load(omniglot_data_dir)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread (extra threads only add overhead and contend with other
    jobs); a module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``, and the
    setting is restored for the other modules."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
