"""CI's check that the package still runs on the oldest Python pyproject claims (3.10).

Run by .ci/run in a 3.10 venv that holds the package and only its light dependencies (typer, rich,
tomli): the full stack (torch, diffusers, ...) is tested on 3.11. It proves what differs by version:
every file compiles under 3.10's grammar, the CLI starts, and recipes parse through the tomli
fallback (fluid_cli/config.py).
"""

from __future__ import annotations

import compileall
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    assert sys.version_info[:2] == (3, 10), sys.version
    for d in ("fluid_cli", "tests", "recipes", ".ci"):
        assert compileall.compile_dir(ROOT / d, quiet=1, force=True, legacy=False), f"{d}: syntax"

    import importlib.metadata

    reqs = importlib.metadata.requires("fluid-cli") or []
    assert any(r.startswith("tomli") and "python_version" in r for r in reqs), reqs  # what pip installs

    from fluid_cli.config import resolve
    from fluid_cli.errors import FluidError

    recipes = sorted([*(ROOT / "recipes").glob("*.toml"), *(ROOT / "fluid_cli/data/recipes").glob("*.toml")])
    assert recipes
    for path in recipes:
        r = resolve(path, {}, ["train.lr=3e-4", 'runtime.device="cpu"'])
        assert r.train.lr == 3e-4 and r.runtime.device == "cpu", path
    with tempfile.TemporaryDirectory() as d:
        bad = Path(d) / "bad.toml"
        bad.write_text("[train\nlr = 1\n")
        try:
            resolve(bad, {}, [])
        except FluidError:
            pass
        else:
            raise AssertionError("a malformed recipe must be a FluidError")

    out = subprocess.run([sys.executable, "-m", "fluid_cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "train" in out.stdout, out.stderr
    print(f"python {sys.version.split()[0]}: {len(recipes)} recipes parse, fluid --help runs")


if __name__ == "__main__":
    main()
