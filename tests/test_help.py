"""Every command's --help reads clean: each option explained, no reStructuredText markup, subcommands too."""

import argparse
import importlib

import pytest

COMMANDS = {  # setup.cfg's console_scripts
    "condmoe-prep": "condmoe.data_prep.cli:main", "condmoe-train": "condmoe.train.cli:train_main",
    "condmoe-eval": "condmoe.train.cli:eval_main", "condmoe-experts": "condmoe.train.experts:main",
    "condmoe-export": "condmoe.train.cli:export_main", "condmoe-ckpt": "condmoe.train.ckpt_cli:main",
    "condmoe-launch": "condmoe.train.launch:main", "condmoe-calibrate": "condmoe.train.calibrate:main"}


class Captured(Exception):
    def __init__(self, parser):
        self.parser = parser


def parser_of(target: str, monkeypatch) -> argparse.ArgumentParser:
    module, name = target.split(":")
    main = getattr(importlib.import_module(module), name)

    def capture(self, *args, **kwargs):
        raise Captured(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    try:
        main([])
    except Captured as captured:
        return captured.parser
    raise AssertionError(f"{target} parsed no arguments")


def parsers(parser: argparse.ArgumentParser):
    yield parser.prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from parsers(sub)


def test_setup_cfg_lists_these_commands():
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "setup.cfg").read_text()
    scripts = {line.split("=")[0].strip() for line in text.split("console_scripts =")[1].split("\n\n")[0].splitlines()
               if "=" in line}
    assert scripts == set(COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_is_clean(command, monkeypatch):
    problems = []
    for prog, parser in parsers(parser_of(COMMANDS[command], monkeypatch)):
        text = parser.format_help()
        if "``" in text or ":func:" in text or ":class:" in text or ":mod:" in text:
            problems.append(f"{prog}: reStructuredText markup in --help")
        for action in parser._actions:
            if action.help is None and not isinstance(action, argparse._SubParsersAction):
                problems.append(f"{prog}: {'/'.join(action.option_strings) or action.dest} has no help")
    assert not problems, "\n".join(problems)
