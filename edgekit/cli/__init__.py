"""The ``edgekit`` command: parses arguments, calls a module, formats the result.

One module per command group: :mod:`.build` (profiles, build, verify, generate), :mod:`.device`
(serve, ask, status), :mod:`.fleet` (keys, sign, deploy, pack, flash, wheelhouse), :mod:`.bench`,
:mod:`.gateway` (the HTTP front).
"""

from __future__ import annotations

import click

from edgekit import __version__
from edgekit.cli import bench, build, device, fleet, gateway


@click.group()
@click.version_option(__version__, prog_name="edgekit")
def main() -> None:
    """Put small Qwen3.5 language models on edge and IoT devices.

    \b
    Example:
      edgekit profiles
      edgekit build --profile raspberry-pi-5 --model Qwen/Qwen3.5-0.8B
      edgekit generate dist/qwen3.5-0.8b-raspberry-pi-5-int4 "Hello!"
    """


for _module in (build, device, fleet, bench, gateway):
    for _command in _module.COMMANDS:
        main.add_command(_command)
