"""Bash completion for the llamad command, written from its argparse parser, so a new
command or option completes without anyone editing a script. Model names come from
`llamad models --json` (the catalog; no daemon needed), of the `--config` on the line."""

from __future__ import annotations

import argparse

# The line is split at spaces here rather than read from COMP_WORDS: bash splits words at
# COMP_WORDBREAKS too, whose ':' cuts Ollama's and the hub's names (gemma3:270m,
# user/repo:Q4_K_M) in pieces, and bash then replaces only the piece after the last ':'.
_TEMPLATE = """\
# bash completion for llamad; load it with: source <(llamad completion)
_llamad_models() {
    llamad models ${1:+--config "$1"} --json 2>/dev/null | python3 -c \\
        'import json, sys; print(" ".join(m["id"] for m in json.load(sys.stdin)))' 2>/dev/null
}
_llamad() {
    local line=${COMP_LINE:0:COMP_POINT} cur="" cmd="" config="" prev="" w i
    local opts="" models="" valued=""
    local -a words
    read -ra words <<< "$line"
    if [[ -n "$line" && "$line" != *[[:space:]] && ${#words[@]} -gt 0 ]]; then
        cur=${words[${#words[@]}-1]}
        unset 'words[${#words[@]}-1]'
    fi
    for w in "${words[@]:1}"; do  # the command is the first word that is no option
        [ "$prev" = --config ] && config=${w/#\\~/$HOME}
        [ -z "$cmd" ] && [[ "$w" != -* ]] && cmd=$w
        prev=$w
    done
    if [ -z "$cmd" ]; then
        COMPREPLY=($(compgen -W "COMMANDS -h --help --version -v --verbose" -- "$cur"))
        return
    fi
    case "$cmd" in
CASES
    esac
    if [ "$prev" != "$cmd" ] && [[ " $valued " == *" $prev "* ]]; then  # an option's value
        COMPREPLY=()
        if [ "$prev" = --config ]; then
            compopt -o filenames 2>/dev/null
            COMPREPLY=($(compgen -f -- "$cur"))
        fi
        return
    fi
    if [ -n "$models" ] && [[ "$cur" != -* ]]; then
        opts="$opts $(_llamad_models "$config")"
    fi
    COMPREPLY=($(compgen -W "$opts" -- "$cur"))
    if [[ "$cur" == *:* && "$COMP_WORDBREAKS" == *:* ]]; then
        local colon=${cur%"${cur##*:}"}
        for i in "${!COMPREPLY[@]}"; do
            COMPREPLY[i]=${COMPREPLY[i]#"$colon"}
        done
    fi
}
complete -F _llamad llamad
"""


def bash(parser: argparse.ArgumentParser) -> str:
    commands = next(a for a in parser._actions
                    if isinstance(a, argparse._SubParsersAction)).choices
    cases = []
    for name, sub in commands.items():
        opts = " ".join(o for a in sub._actions for o in a.option_strings)
        # Options whose next word is their value (--watch's is optional: not counted).
        valued = " ".join(o for a in sub._actions if a.option_strings and a.nargs != 0
                          and a.nargs != "?" for o in a.option_strings)
        takes_model = any(a.dest == "model" and not a.option_strings for a in sub._actions)
        cases.append(f'        {name}) opts="{opts}"; valued="{valued}"; '
                     f'models={"1" if takes_model else ""};;')
    return _TEMPLATE.replace("COMMANDS", " ".join(commands)).replace("CASES", "\n".join(cases))
