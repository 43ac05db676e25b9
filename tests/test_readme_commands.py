"""CI (``.ci/run``) runs the README's Quick start commands as written, in order: command 1 (pretraining, shortened
only by the documented ``--epochs`` override) and then command 2 (the tests)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_ci_runs_the_two_readme_commands_in_order():
    commands = _quick_start_commands()
    assert len(commands) == 2, commands
    train, tests = commands
    assert "monai.bundle run training" in train and "pytest" in tests
    ci = [line for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    steps = [line for line in ci if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert steps == [f"{train} --epochs 1", tests], steps
    assert "--epochs" in (ROOT / "README.md").read_text(encoding="utf-8").split("| shorter run |", 1)[1].split("\n")[0]
