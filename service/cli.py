"""The ``sonocase`` command line.

Each command lives beside the stage it drives and is imported only when it runs,
so ``sonocase serve`` never imports torch and ``sonocase --help`` stays fast.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import click

from service.common.logs import configure_logging
from service.settings import Peer, Settings, SettingsError, load_settings, parse_peer

#: command name -> "module:attribute" of its click command
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("service.node:serve", "Run the node: DICOM receiver, scheduler, workers, sender, web."),
    "worker": ("service.pipeline.tasks:worker", "Run an analysis worker against the configured broker."),
    "migrate": ("service.migrations:migrate", "Upgrade the ledger's schema (the node also does it at start)."),
    "status": ("service.ops.status:status", "Show studies and their state, or one study in detail."),
    "purge": ("service.delivery.retention:purge_command", "Show or remove files of done studies (retention)."),
    "resend": ("service.delivery.recovery:resend", "Retry a failed study, or send its results again."),
    "outcomes": ("service.outcomes.cli:outcomes", "Import outcomes (pathology, follow-up) from CSV; list them."),
    "monitoring": ("service.monitoring.cli:monitoring", "Registry export and real-world performance from the ledger."),
    "index": ("service.similar.cli:index", "Build, fill and query the similar-case index."),
    "demo": ("service.demo:demo", "Self-contained demo: node, stand-in PACS, synthetic studies."),
    "train": ("training.cli:train", "Train a model (needs the 'train' extra)."),
    "evaluate": ("training.cli:evaluate", "Evaluate a trained model: metrics, plots, report."),
    "export": ("training.cli:export", "Export a trained model to ONNX with Grad-CAM and a model card."),
    "calibrate": (
        "training.cli:calibrate",
        "Refit the domain guard and calibration of an exported model into its card.",
    ),
    "compare": ("training.cli:compare", "Train and evaluate the four architectures on the same splits."),
}


class LazyGroup(click.Group):
    """A group whose commands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module_name, attr = COMMANDS[cmd_name][0].split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            return _unavailable(cmd_name, exc)
        command: click.Command = getattr(module, attr)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Short help from the table: listing must not import every stage.
        with formatter.section("Commands"):
            formatter.write_dl([(name, COMMANDS[name][1]) for name in self.list_commands(ctx)])


def _unavailable(name: str, exc: ModuleNotFoundError) -> click.Command:
    @click.command(name, help=COMMANDS[name][1], context_settings={"ignore_unknown_options": True})
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def command(args: tuple[str, ...]) -> None:
        hint = " (install the 'train' extra: pip install -e '.[train]')" if exc.name == "torch" else ""
        raise click.ClickException(f"'{name}' needs the Python module {exc.name!r}{hint}")

    return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="SONOCASE_CONFIG",
    help="TOML settings file (keys as in docs/sonocase.example.toml); the environment (SONOCASE_*) wins over it.",
)
@click.version_option(package_name="sonocase")
@click.pass_context
def cli(ctx: click.Context, config: Path | None) -> None:
    """Sonocase: breast-ultrasound AI as a DICOM node beside your PACS.

    AI results are not for primary diagnosis. Every setting is an environment
    variable SONOCASE_<NAME> or a key in the --config TOML file.
    """
    ctx.obj = {"config": config}


def settings_from(ctx: click.Context, **overrides: Any) -> Settings:
    """Load the settings for a command (command-line options win) and set up logging.

    Invalid settings end the process with a message naming each bad setting.
    """
    try:
        settings = load_settings(ctx.find_root().obj.get("config"), **overrides)
    except SettingsError as exc:
        click.echo(f"sonocase: {exc}", err=True)
        ctx.exit(2)
    configure_logging(settings.log_level, settings.log_format)
    return settings


def peer_param(
    ctx: click.Context,
    param: click.Parameter,
    value: str | tuple[str, ...] | None,
) -> Peer | tuple[Peer, ...] | None:
    """Click callback: an option's ``AE@host:port[+tls]`` or DICOMweb URL (or several,
    for a ``multiple`` option) parsed, a bad one a usage error naming the option."""
    try:
        if isinstance(value, tuple):
            return tuple(parse_peer(v) for v in value)
        return None if value is None else parse_peer(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def main() -> None:
    # ONNX Runtime's telemetry (1DS, on Linux since 1.2x) would write a device ID under
    # $HOME and upload events: a hospital node sends nothing anywhere. The variable must
    # be set before the runtime starts; worker processes inherit it.
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    cli(prog_name="sonocase")


if __name__ == "__main__":
    main()
