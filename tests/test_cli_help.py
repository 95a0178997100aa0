"""The command lines document themselves: every option has a help text with its default (or says it
is required), the README names every option, and --help names the command a user types."""

from __future__ import annotations

from pathlib import Path

import pytest

README = (Path(__file__).parent.parent / "README.md").read_text()


def parsers() -> dict:
    import hybrid_r1_merge_tools.cli as merge_cli
    from hybrid_r1 import chat, cli, synth

    _, subs = cli.build_parser()
    out = {"hybrid-r1 generate": subs["generate"], "hybrid-r1 plan": subs["plan"],
           "hybrid-r1 calibrate": subs["calibrate"],
           "hybrid-r1 chat": chat.build_parser("hybrid-r1 chat"), "hybrid-r1 synth": synth.build_parser()}
    merge = merge_cli.build_parser()
    (sub,) = [a for a in merge._actions if a.dest == "command"]
    out.update({f"merge_tools {k}": v for k, v in sub.choices.items() if k != "synth"})
    return out


@pytest.mark.parametrize("name", list(parsers()))
def test_every_option_documented(name):
    ap = parsers()[name]
    assert ap.prog == name or ap.prog.endswith(name.split()[-1])
    for action in ap._actions:
        if action.dest == "help" or not action.option_strings:
            continue
        flag = action.option_strings[-1]
        assert action.help and ("default" in action.help or "required" in action.help), (name, flag, action.help)
        assert f"`{flag}" in README, f"README does not list {name} {flag}"


def test_synth_help_names_the_command(capsys):
    from hybrid_r1.cli import main

    with pytest.raises(SystemExit):
        main(["synth", "--help"])
    assert capsys.readouterr().out.startswith("usage: hybrid-r1 synth")


def test_wording():
    from hybrid_r1.chat_console import stats_line
    from hybrid_r1.cli_support import plural
    from hybrid_r1.generate import Stats
    from hybrid_r1_merge_tools.cli import _mb

    assert (plural(1, "layer"), plural(4, "layer")) == ("1 layer", "4 layers")
    assert (_mb(0.3), _mb(12.345), _mb(1234.5)) == ("0.3", "12.3", "1234")  # a small shard is not "0 MB/s"
    cut = Stats(prompt_tokens=5, prefill_s=0.4, stop_reason="interrupted")  # Ctrl-C during the prefill
    assert cut.time_to_first_token_s is None and "first token none" in stats_line(cut)
    done = Stats(prompt_tokens=5, prefilled_tokens=5, new_tokens=1, prefill_s=0.4, stop_reason="interrupted")
    assert done.time_to_first_token_s == 0.4 and "first token 0.40 s" in stats_line(done)
