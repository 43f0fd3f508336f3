"""bench/reproduction_page.py: the results page is the three sections, their claims summarised first."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import reproduction_page  # noqa: E402


def _write_section(folder: Path, name: str, claims: list) -> None:
    (folder / f"{name}.md").write_text(f"## {name} as the script titles it\n\nRegenerate: `python bench/x.py`\n\n"
                                       f"![figure]({name}.png) and [numbers]({name}.json), "
                                       "[a site](https://example.org)\n")
    (folder / f"{name}.json").write_text(json.dumps({"claims": claims}))


def test_page_summarises_every_claim_and_links_figures_from_the_page(tmp_path):
    source = tmp_path / "reproduction"
    source.mkdir()
    _write_section(source, "retrievalguard", [{"claim": "a | b", "holds": "not measurable"}])
    _write_section(source, "umcd", [{"claim": "c", "holds": False}, {"claim": "d", "holds": True}])
    _write_section(source, "colotride", [])
    text = reproduction_page.page(source)
    assert "| RetrievalGuard | a \\| b | not measurable |" in text
    assert "| UMCD | c | no |" in text and "| UMCD | d | yes |" in text
    assert text.count("| COLO-TRIDE |") == 0
    assert "## UMCD (detection in deep hashing)" in text and "as the script titles it" not in text
    assert "![figure](reproduction/umcd.png)" in text and "[numbers](reproduction/umcd.json)" in text
    assert "(https://example.org)" in text
    # the order of the sections is the page's, whatever the folder's
    assert text.index("## RetrievalGuard") < text.index("## UMCD") < text.index("## COLO-TRIDE")


def test_a_missing_section_is_a_one_line_error_and_no_page(tmp_path):
    source = tmp_path / "reproduction"
    source.mkdir()
    _write_section(source, "umcd", [])
    out = tmp_path / "REPRODUCTION.md"
    run = subprocess.run([sys.executable, str(BENCH / "reproduction_page.py"), "--source", str(source),
                          "--out", str(out)], capture_output=True, text=True)
    assert run.returncode == 1
    assert run.stderr.count("\n") == 1 and "retrievalguard" in run.stderr and "reproduce_retrievalguard.py" in run.stderr
    assert not out.exists()
