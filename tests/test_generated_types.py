"""The sidebar's types of the gateway's answers are generated from their models (``scripts/gen_types.py``); the
committed file must be what the models give now, or the panel reads answers by a shape the gateway no longer
sends. Needs the sidebar's Node packages (``jlpm install`` in ``labextension``, as ``scripts/setup.sh`` does)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ROOT / "labextension" / "src" / "api-types.generated.ts"


def test_the_generated_typescript_is_what_the_models_give(tmp_path: Path) -> None:
    fresh = tmp_path / "api-types.generated.ts"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_types.py"), "--out", str(fresh)],
                         capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT),
                                                                                        os.environ.get("PYTHONPATH"))))})
    assert run.returncode == 0, run.stderr
    assert fresh.read_text() == GENERATED.read_text(), (
        f"{GENERATED.relative_to(ROOT)} is stale: run `python scripts/gen_types.py` and commit the result")
