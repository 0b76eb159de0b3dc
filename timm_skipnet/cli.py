"""``timm-skipnet`` command line: one subcommand per task, each module adds its own parser."""
import argparse
import importlib

# modules that define add_parser(subparsers); each may add one or more subcommands
_MODULES = ('train', 'evaluation', 'bench', 'hub', 'original', 'analysis')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='timm-skipnet', description='SkipNet dynamic-depth ResNets for timm.')
    sub = parser.add_subparsers(dest='command', required=True)
    for name in _MODULES:
        try:
            module = importlib.import_module(f'timm_skipnet.{name}')
        except ModuleNotFoundError as e:
            if e.name != f'timm_skipnet.{name}':
                raise
            continue
        if hasattr(module, 'add_parser'):
            module.add_parser(sub)
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == '__main__':
    main()
