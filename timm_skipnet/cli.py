"""``timm-skipnet`` command line: one subcommand per task, each module adds its own parser."""
import argparse
import importlib
import sys

# modules that define add_parser(subparsers); each may add one or more subcommands
_MODULES = ('train', 'evaluation', 'thresholds', 'bench', 'hub', 'original', 'analysis', 'onnx_export',
            'aoti_export')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='timm-skipnet', description='SkipNet dynamic-depth ResNets for timm.')
    sub = parser.add_subparsers(dest='command', required=True)
    for name in _MODULES:
        importlib.import_module(f'timm_skipnet.{name}').add_parser(sub)
    return parser


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # the subcommand's own argv: `train -c cfg.yaml` parses it again over the YAML defaults
    args.func(args)


if __name__ == '__main__':
    main()
