"""Bash completion for the llamad command, written from its argparse parser, so a new
command or option completes without anyone editing a script. Model names come from
`llamad models --json` (the catalog; no daemon needed)."""

from __future__ import annotations

import argparse

_TEMPLATE = """\
# bash completion for llamad; load it with: source <(llamad completion)
_llamad_models() {
    llamad models --json 2>/dev/null | python3 -c \\
        'import json, sys; print(" ".join(m["id"] for m in json.load(sys.stdin)))' 2>/dev/null
}
_llamad() {
    local cur=${COMP_WORDS[COMP_CWORD]} opts="" models=""
    if [ "$COMP_CWORD" -eq 1 ]; then
        COMPREPLY=($(compgen -W "COMMANDS --help --version" -- "$cur"))
        return
    fi
    case "${COMP_WORDS[1]}" in
CASES
    esac
    if [ -n "$models" ] && [[ "$cur" != -* ]]; then
        opts="$opts $(_llamad_models)"
    fi
    COMPREPLY=($(compgen -W "$opts" -- "$cur"))
}
complete -F _llamad llamad
"""


def bash(parser: argparse.ArgumentParser) -> str:
    commands = next(a for a in parser._actions
                    if isinstance(a, argparse._SubParsersAction)).choices
    cases = []
    for name, sub in commands.items():
        opts = " ".join(o for a in sub._actions for o in a.option_strings)
        takes_model = any(a.dest == "model" and not a.option_strings for a in sub._actions)
        cases.append(f'        {name}) opts="{opts}"; models={"1" if takes_model else ""};;')
    return _TEMPLATE.replace("COMMANDS", " ".join(commands)).replace("CASES", "\n".join(cases))
