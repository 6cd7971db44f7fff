"""What the README and docs/ show that the code also states is the code's, and every link holds."""

import re
from pathlib import Path

import pytest

from embedded import SERVICE_ACCESS
from settings import load_config

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
PAGES = [ROOT / "README.md", ROOT / "benchmarks" / "README.md",
         *sorted((ROOT / "docs").glob("*.md"))]


def configuration_rows() -> dict:
    """Return {variable: default cell} of the README's configuration table."""
    section = README.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^\| `([A-Z_]+)` \| ([^|]*) \|", section, re.MULTILINE))


def test_the_readme_is_one_a_newcomer_finishes():
    assert len(README.splitlines()) <= 300
    assert "make run" in README and "make test" in README


def test_every_variable_of_env_example_is_in_the_configuration_table_and_back():
    example = (ROOT / ".env.example").read_text()
    variables = set(re.findall(r"^(?:# )?export ([A-Z_]+)=", example, re.MULTILINE))
    assert variables == set(configuration_rows())


@pytest.mark.parametrize(("variable", "default"), [
    (variable, cell.strip()[1:-1]) for variable, cell in configuration_rows().items()
    if re.fullmatch(r"`[^`]+`", cell.strip())])
def test_every_default_the_readme_gives_is_the_one_the_service_takes(variable, default):
    assert load_config({variable: default}) == load_config({})


def test_the_readme_gives_memorydb_the_access_string_the_tests_run_as():
    assert f"   on {SERVICE_ACCESS}\n" in README


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_of_a_page_leads_to_a_file(page):
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
        if "://" not in target:
            assert (page.parent / target).exists(), f"{page.name} links to {target}"
