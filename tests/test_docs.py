"""The README is the front door: guard it against broken edits (a bad in-place replace once repeated one section
thousands of times and CI stayed green)."""
import collections
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _headings(text):
    return [line for line in text.splitlines() if re.match(r'#{1,4} ', line)]


def test_readme_headings_are_unique_and_the_file_is_readable_length():
    text = (ROOT / 'README.md').read_text()
    repeated = [h for h, n in collections.Counter(_headings(text)).items() if n > 1]
    assert not repeated, f'README.md repeats headings: {repeated}'
    assert len(text.splitlines()) < 600, 'README.md is far longer than a front page should be'


def test_readme_gives_exactly_the_two_setup_commands():
    text = (ROOT / 'README.md').read_text()
    setup = text[text.index('## Set-up'):text.index('## Usage')]
    commands = re.findall(r'^make (\w+)', setup, flags=re.M)
    assert commands == ['demo', 'test']
    makefile = (ROOT / 'Makefile').read_text()
    assert re.search(r'^demo:', makefile, flags=re.M) and re.search(r'^test:', makefile, flags=re.M)
