"""The README's quick-start code block runs verbatim, and its commands exist."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _quickstart_blocks():
  section = README.split("## Quick start", 1)
  assert len(section) == 2, "README.md has no '## Quick start' section"
  body = section[1].split("\n## ", 1)[0]
  return re.findall(r"```python\n(.*?)```", body, flags=re.S)


@pytest.mark.smoke
def test_quickstart_runs_verbatim():
  blocks = _quickstart_blocks()
  assert blocks, "the Quick start section has no ```python block"
  for code in blocks:
    namespace = {"__name__": "__readme__"}
    exec(compile(code, "README.md:quickstart", "exec"), namespace)  # noqa: S102


@pytest.mark.smoke
def test_readme_commands_match_makefile_and_ci():
  makefile = (ROOT / "Makefile").read_text()
  ci = (ROOT / ".ci" / "run").read_text()
  for target in ("demo", "test"):
    assert f"make {target}" in README, f"README does not show `make {target}`"
    assert re.search(rf"^{target}:", makefile, flags=re.M), f"Makefile has no `{target}` target"
  assert "make test" in ci, ".ci/run must call the README's test command"
