"""Two levels of help: ``--help`` shows what a study user needs, ``--help-all`` every flag.

A flag that matters only with one optimiser or model family, or only to a speed run, a profile or a cluster, is marked
``advanced``: ``--help`` leaves it out (and says how many it left out), ``--help-all`` shows it. A flag whose full
explanation is long has a ``brief`` one for ``--help``. Both answer before anything heavy loads, as every flag mistake
does.
"""

from __future__ import annotations

import argparse


def advanced(action: argparse.Action) -> argparse.Action:
    """Mark a flag as one that --help leaves out (--help-all shows it)."""
    action.advanced = True
    return action


def brief(action: argparse.Action, text: str) -> argparse.Action:
    """A short help for --help; --help-all shows the flag's full one."""
    action.brief = text
    return action


class HelpAction(argparse.Action):
    """--help (``show_all`` False) or --help-all: print the help and exit."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None, show_all=False):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)
        self.show_all = show_all

    def __call__(self, parser, namespace, values, option_string=None):
        # the groups' actions make the help (a parser copied to parse, as engine.settings does, shares them)
        shown = [action for group in parser._action_groups for action in group._group_actions]
        full_helps = {action: action.help for action in shown}
        hidden = [] if self.show_all else [action for action in shown if getattr(action, "advanced", False)]
        for action in shown if not self.show_all else ():
            action.help = argparse.SUPPRESS if action in hidden else getattr(action, "brief", action.help)
        try:
            text = parser.format_help()
        finally:
            for action, full in full_helps.items():
                action.help = full
        if hidden:
            text += (
                f"\n{len(hidden)} more options for speed runs, other optimisers, profiling and clusters: --help-all\n"
            )
        print(text, end="")
        parser.exit()


def script_parser(description: str, usage: str | None = None) -> argparse.ArgumentParser:
    """A script's parser: its docstring as the description, --help and --help-all."""
    parser = argparse.ArgumentParser(
        description=description,
        usage=usage or "%(prog)s [options]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    group = parser.add_argument_group("help")
    group.add_argument("-h", "--help", action=HelpAction, help="show the options most runs need, and exit")
    group.add_argument("--help-all", action=HelpAction, show_all=True, help="show every option, and exit")
    return parser
