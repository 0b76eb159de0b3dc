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


# flags the docs name for other programs (accelerate launch, pip, examples/cifar10_report.py)
_FOREIGN_FLAGS = {'--multi_gpu', '--num_processes', '--upgrade', '--dry-run', '--dist', '--durations'}  # + pytest's
_DOCS = ('README.md', 'MODEL_CARD.md', 'Makefile', 'examples/cifar10_skipnet38.sh', 'hub_configs/*/README.md')


def _cli_options():
    from timm_skipnet.cli import build_parser
    subparsers = build_parser()._subparsers._group_actions[0].choices
    return {opt for sub in subparsers.values() for action in sub._actions for opt in action.option_strings}


def test_every_flag_the_docs_name_exists():
    known = _cli_options() | _FOREIGN_FLAGS
    for pattern in _DOCS:
        for path in ROOT.glob(pattern):
            flags = set(re.findall(r'(?<![\w-])(--[a-zA-Z][\w-]*)', path.read_text()))
            assert not flags - known, f'{path.relative_to(ROOT)} names flags no parser has: {sorted(flags - known)}'


def test_every_timm_skipnet_command_in_the_readme_parses():
    import shlex

    from timm_skipnet.cli import build_parser
    text = (ROOT / 'README.md').read_text().replace('\\\n', ' ')
    commands = re.findall(r'^(?:\.venv/bin/)?timm-skipnet (.+?)(?:\s+#.*)?$', text, flags=re.M)
    inline = re.findall(r'`(?:\.venv/bin/)?timm-skipnet ([^`]+)`', text)
    commands += [c for c in inline if len(c.split()) > 2]  # `timm-skipnet analyze` alone names the tool
    assert len(commands) >= 6
    for command in commands:
        build_parser().parse_args(shlex.split(command))  # argparse exits on an unknown flag or a missing argument
