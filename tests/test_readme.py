"""README's results tables are what the repository's scripts print from its committed result
files: a table whose files are missing or changed fails here, not in a reader's hands."""

import subprocess
import sys
from pathlib import Path

import pytest

from sb_crossmodal_kd.results_tables import (
    README_BEGIN,
    README_END,
    readme_block,
    readme_results,
    write_readme,
)

ROOT = Path(__file__).resolve().parents[1]


def test_readme_results_block_is_generated_from_the_committed_results(tmp_path, monkeypatch):
    # The result files a table reads must be under version control, not only on disk.
    tracked = subprocess.run(["git", "ls-files", "results"], cwd=ROOT, capture_output=True,
                             text=True, check=False).stdout.split()
    if tracked:  # a git checkout (not an unpacked source tree)
        for part in ("long", "study", "scaling"):
            stored = ROOT / "results" / part / "ablation.json"
            if part == "scaling":
                stored = stored.with_name("scaling.json")
            if stored.is_file():
                assert stored.relative_to(ROOT).as_posix() in tracked, f"{stored} untracked"
    readme = tmp_path / "README.md"
    readme.write_text((ROOT / "README.md").read_text())
    monkeypatch.chdir(ROOT)  # README names the folder as the command is given it: results/
    write_readme(readme, "results")
    assert readme.read_text() == (ROOT / "README.md").read_text(), (
        "README's results tables differ from the committed results: run "
        "`python -m sb_crossmodal_kd.results_tables results/ --readme README.md`")


def test_readme_demo_table_is_generated_from_the_committed_demo_result():
    printed = subprocess.run([sys.executable, "benchmarks/readme_tables.py"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
    assert printed.startswith("| condition | WER % |")
    assert printed in (ROOT / "README.md").read_text()


def test_write_readme_replaces_only_the_block_and_refuses_a_readme_without_one(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nIntro.\n{README_BEGIN}\nold tables\n{README_END}\nEnd.\n")
    write_readme(readme, tmp_path)  # an empty results folder: every part "not run yet"
    text = readme.read_text()
    assert text.startswith(f"# Title\n\nIntro.\n{README_BEGIN}\n#### The demo trained")
    assert text.endswith(f"absent).\n{README_END}\nEnd.\n")
    assert "old tables" not in text
    assert readme_block(readme) == readme_results(tmp_path, heading="####")
    plain = tmp_path / "PLAIN.md"
    plain.write_text("# No block here\n")
    with pytest.raises(ValueError, match="PLAIN.md has no '<!-- results-tables:begin -->'"):
        write_readme(plain, tmp_path)
    assert plain.read_text() == "# No block here\n"
