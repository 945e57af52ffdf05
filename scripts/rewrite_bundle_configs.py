"""Rewrite the configs of existing bundles as `lowdose train` writes them now, without retraining.

    .venv/bin/python scripts/rewrite_bundle_configs.py            # every bundle under models/
    .venv/bin/python scripts/rewrite_bundle_configs.py BUNDLE...  # these bundle folders

``configs/metadata.json`` gains the fields MONAI's metadata schema requires (lowdose's own keys are kept as they
are) and ``configs/inference.json`` becomes one that ``python -m monai.bundle run`` runs through lowdose's engine.
Weights, training config and model card are not touched. A bundle rewritten for the first time gets a new patch
version with a changelog entry; running the script again changes nothing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lowdose.atomic import write_text_atomically  # noqa: E402
from lowdose.bundle_configs import inference_config, monai_metadata  # noqa: E402

CHANGE = (
    "configs only (weights unchanged): inference.json runs with MONAI's bundle tooling through lowdose's "
    "engine; metadata carries MONAI's required fields and names its schema"
)


def rewrite(folder: Path) -> bool:
    """Rewrite one bundle's configs; True when a file changed."""
    metadata_file, inference_file = folder / "configs" / "metadata.json", folder / "configs" / "inference.json"
    meta = json.loads(metadata_file.read_text())
    if "changelog" not in meta:  # written before bundles had MONAI's fields: a new patch version says so
        old = str(meta.get("version", "0.1.0"))
        major, minor, patch = (int(part) for part in old.split(".")[:3])
        new = f"{major}.{minor}.{patch + 1}"
        meta["version"], meta["changelog"] = new, {new: CHANGE, old: "trained by lowdose"}
    meta = monai_metadata(meta)
    texts = {metadata_file: json.dumps(meta, indent=2), inference_file: json.dumps(inference_config(meta), indent=2)}
    changed = False
    for path, text in texts.items():
        if not path.is_file() or path.read_text() != text:
            write_text_atomically(path, text)
            changed = True
    return changed


def main(argv: list[str]) -> int:
    folders = [Path(arg) for arg in argv] or sorted(
        p for p in (REPO / "models").iterdir() if (p / "configs" / "metadata.json").is_file()
    )
    for folder in folders:
        print(f"{folder}: {'rewritten' if rewrite(folder) else 'already current'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
