"""Commands that put bundles onto devices: keys, sign, deploy, pack, flash, wheelhouse."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from edgekit.cli.common import Output, err, friendly, out, output_option

if TYPE_CHECKING:
    from edgekit.deploy.deploy import DeployReport

_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
_BUNDLE = click.Path(exists=True, file_okay=False, path_type=Path)


@click.command()
@click.argument("prefix", type=click.Path(dir_okay=False, path_type=Path))
@output_option()
@friendly
def keys(prefix: Path, output: Output) -> None:
    """Create an ed25519 key pair for signing bundles: PREFIX.key (private, 0600) and PREFIX.pub.

    \b
    Example:
      edgekit keys keys/release
      edgekit build --profile raspberry-pi-5 --sign keys/release.key
      edgekit deploy dist/BUNDLE --host pi@kitchen.local --trust keys/release.pub
    """
    from edgekit.signing import create_keys

    prefix.parent.mkdir(parents=True, exist_ok=True)
    private, public = prefix.with_name(prefix.name + ".key"), prefix.with_name(prefix.name + ".pub")
    kid = create_keys(private, public)
    output.result({"private": str(private), "public": str(public), "key_id": kid},
                  lambda _: out.print(f"[green]created[/] {private} (keep it secret) and {public} (give it to devices), key id {kid}"))


@click.command()
@click.argument("bundle_dir", type=_BUNDLE)
@click.option("--key", "key_path", type=_FILE, required=True, help="ed25519 private key (from `edgekit keys`).")
@friendly
def sign(bundle_dir: Path, key_path: Path) -> None:
    """Sign an existing bundle's manifest (after checking every file against it).

    \b
    Example:
      edgekit sign dist/qwen3.5-0.8b-raspberry-pi-5-int4 --key keys/release.key
    """
    from edgekit import signing

    signing.verify(bundle_dir)
    kid = signing.sign(bundle_dir, key_path)
    out.print(f"[green]signed[/] {bundle_dir} with key {kid}")


def _device_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Options describing the daemon a device will run: shared by deploy and flash."""
    options: list[Callable[[Callable[..., Any]], Callable[..., Any]]] = [
        click.option("--device-id", default=None, help="Device id in MQTT topics [default: the device's hostname]."),
        click.option("--broker", default="mqtt://127.0.0.1:1883", show_default=True,
                     help="Broker the device connects to: mqtt://HOST[:PORT] or mqtts://HOST[:PORT]."),
        click.option("--mqtt", "mqtt_version", type=click.Choice(["5", "3.1.1", "auto"]), default="auto", show_default=True),
        click.option("--username", default=None, help="Broker user name for the device."),
        click.option("--password-file", type=_FILE, default=None, help="File holding the device's broker password."),
        click.option("--tls-ca", type=_FILE, default=None, help="Broker CA certificate (PEM)."),
        click.option("--tls-cert", type=_FILE, default=None, help="Device client certificate (PEM)."),
        click.option("--tls-key", type=_FILE, default=None, help="Device client key (PEM)."),
        click.option("--pool", "pools", multiple=True, help="Device pool to join (repeatable)."),
        click.option("--trust", multiple=True, type=_FILE,
                     help="Public key the device will require bundles to be signed with (repeatable)."),
        click.option("--index-url", default=None,
                     help="Install the runtime from this package index (a mirror or private index) [default: the device's]."),
        click.option("--device-root", default="/", show_default=True,
                     help="Install under this folder instead of / (staging, tests)."),
        click.option("--service-user", default="edgekit", show_default=True, help="Dedicated user the daemon runs as."),
        click.option("--keep", type=click.IntRange(1), default=3, show_default=True, help="Bundles kept on the device."),
        output_option("Print a machine-readable report."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _broker(broker: str, mqtt_version: str, username: str | None, password_file: Path | None, tls_ca: Path | None,
            tls_cert: Path | None, tls_key: Path | None) -> Any:
    """The device's broker settings; the password and TLS files are local files that provisioning copies."""
    from edgekit.mqtt.settings import BrokerSettings

    return BrokerSettings.from_url(broker, protocol=mqtt_version, username=username, password_file=password_file,
                                   tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key)


class _RichDeploy:
    """Deploy progress: one line per step, a transfer bar for copies."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def step(self, title: str) -> None:
        if not self.quiet:
            err.print(f"[cyan]>[/] {title}", highlight=False)

    def copy(self, total: int) -> Callable[[int], None]:
        if self.quiet or total == 0:
            return lambda n: None
        from rich.progress import BarColumn, DownloadColumn, Progress, SpinnerColumn, TextColumn, TransferSpeedColumn

        bar = Progress(SpinnerColumn(), TextColumn("copying"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                       console=err.rich, transient=True)
        task = bar.add_task("copy", total=total)
        bar.start()

        def advance(n: int) -> None:
            bar.advance(task, n)
            if bar.tasks[0].completed >= total:
                bar.stop()

        return advance


@click.command()
@click.argument("bundle_dir", type=_BUNDLE)
@click.option("--host", "destination", required=True, help="USER@HOST of the device (a user with sudo, or root).")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="SSH port [default: ssh's].")
@click.option("--identity", type=_FILE, default=None, help="SSH private key [default: ssh's].")
@click.option("--known-hosts", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="known_hosts file to check the device's host key against [default: ssh's].")
@click.option("--connect-timeout", type=click.IntRange(1, 300), default=10, show_default=True, help="Seconds.")
@click.option("--wheelhouse", type=_BUNDLE, default=None,
              help="Install the runtime from these wheels (`edgekit wheelhouse`) instead of the package index.")
@click.option("--online-timeout", type=click.FloatRange(1), default=120.0, show_default=True,
              help="Seconds to wait for the device's online status before rolling back.")
@click.option("--dry-run", is_flag=True, help="Probe the device and print every step without changing anything.")
@click.option("--tune", is_flag=True,
              help="Then run `edgekit tune` on the device: measure thread counts, keep the fastest in its config.")
@_device_options
@friendly
def deploy(bundle_dir: Path, destination: str, port: int | None, identity: Path | None, known_hosts: Path | None,
           connect_timeout: int, wheelhouse: Path | None, online_timeout: float, dry_run: bool, tune: bool,
           device_id: str | None,
           pools: tuple[str, ...], trust: tuple[Path, ...], index_url: str | None, device_root: str, service_user: str,
           keep: int, output: Output, **broker: Any) -> None:
    """Install the runtime and BUNDLE on a device over SSH, start it, and roll back if it does not come online.

    \b
    Example:
      edgekit deploy dist/qwen3.5-0.8b-raspberry-pi-5-int4 --host pi@kitchen.local --broker mqtt://hub.local
      edgekit deploy dist/BUNDLE --host pi@kitchen.local --trust keys/release.pub --dry-run
      edgekit deploy dist/BUNDLE --host pi@kitchen.local --broker mqtt://hub.local --tune
    """
    from edgekit.deploy.deploy import DeployFailed, DeployOptions
    from edgekit.deploy.deploy import deploy as run_deploy
    from edgekit.deploy.layout import DeviceLayout
    from edgekit.deploy.ssh import Target

    target = Target(destination, port=port, identity=identity, known_hosts=known_hosts, connect_timeout=connect_timeout)
    options = DeployOptions(bundle=bundle_dir, broker=_broker(**broker), device_id=device_id, pools=pools, trust=trust,
                            wheelhouse=wheelhouse, index_url=index_url,
                            layout=DeviceLayout(root=device_root, user=service_user, keep_bundles=keep),
                            online_timeout=online_timeout, dry_run=dry_run, tune=tune)
    try:
        report = run_deploy(target, options, _RichDeploy(quiet=output.as_json))
    except DeployFailed as exc:
        # Scripts get the report on failure too; the error line still goes to stderr.
        output.result(exc.report.to_dict(), lambda _: None)
        raise
    output.result(report.to_dict(), lambda _: _print_deploy(report, destination, dry_run))


def _print_deploy(report: DeployReport, destination: str, dry_run: bool) -> None:
    if dry_run:
        facts = report.facts
        out.print(f"[bold]dry run[/]: {facts['hostname']} ({facts['machine']}, {facts['os']}, "
                  f"{facts['ram_total'] / 1024**2:.0f} MiB RAM, {facts['disk_free'] / 1024**2:.0f} MiB free) "
                  f"would get {report.bundle_id} in these steps:", highlight=False)
        for number, step in enumerate(report.steps, 1):
            out.print(f"{number:2}. {step['title']}", highlight=False)
            if step["detail"]:
                out.print("    " + step["detail"].strip().replace("\n", "\n    "), highlight=False, style="dim")
        out.print("nothing was changed on the device")
        return
    resumed = f", resumed {report.bytes_resumed / 1024**2:.0f} MiB" if report.bytes_resumed else ""
    out.print(f"[green]deployed[/] {report.bundle_id} to {destination} as {report.device_id} "
              f"(copied {report.bytes_copied / 1024**2:.0f} MiB{resumed}); the device is online")
    if report.tune:
        fastest = next(t for t in report.tune["trials"] if t["threads"] == report.tune["chosen"])
        out.print(f"tuned: {report.tune['chosen']} threads (decode {fastest['decode_tps']:.1f} tok/s, prefill "
                  f"{fastest['prefill_tps']:.1f}; tried {', '.join(str(t['threads']) for t in report.tune['trials'])})")


@click.command()
@click.argument("bundle_dir", type=_BUNDLE)
@click.option("-o", "--output", "archive", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Archive to write (.tar).")
@output_option()
@friendly
def pack(bundle_dir: Path, archive: Path, output: Output) -> None:
    """Pack a bundle into one archive to host for `edgekit flash --bundle-url`; prints its sha256.

    \b
    Example:
      edgekit pack dist/qwen3.5-0.8b-raspberry-pi-5-int4 -o qwen-pi5.tar
    """
    from edgekit.deploy.flash import pack as pack_bundle

    digest = pack_bundle(bundle_dir, archive)
    size = archive.stat().st_size
    output.result({"archive": str(archive), "sha256": digest, "size_bytes": size},
                  lambda _: out.print(f"[green]packed[/] {archive} ({size / 1024**2:.0f} MiB), sha256 {digest}"))


@click.command()
@click.argument("bundle_dir", type=_BUNDLE)
@click.option("-o", "--output", "user_data", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write the cloud-init user-data (e.g. the boot partition's user-data).")
@click.option("--bundle-url", default=None, help="URL the device downloads the packed bundle from at first boot.")
@click.option("--bundle-sha256", default=None, help="sha256 of that archive (from `edgekit pack`).")
@click.option("--rootfs", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Mounted root filesystem of the image: copy the bundle (and wheelhouse) into it now.")
@click.option("--wheelhouse", type=_BUNDLE, default=None, help="Runtime wheels to copy into --rootfs (offline devices).")
@click.option("--hostname", default=None, help="Hostname to give the device.")
@click.option("--admin-user", default=None, help="Create this login user (sudo, key-only SSH).")
@click.option("--ssh-key", "ssh_keys", multiple=True, help="Authorized public key for the admin user (repeatable).")
@_device_options
@friendly
def flash(bundle_dir: Path, user_data: Path, bundle_url: str | None, bundle_sha256: str | None, rootfs: Path | None,
          wheelhouse: Path | None, hostname: str | None, admin_user: str | None, ssh_keys: tuple[str, ...],
          device_id: str | None, pools: tuple[str, ...], trust: tuple[Path, ...], index_url: str | None, device_root: str,
          service_user: str, keep: int, output: Output, **broker: Any) -> None:
    """Write first-boot provisioning (cloud-init user-data) so a fresh device comes up serving BUNDLE.

    \b
    Example:
      edgekit pack dist/BUNDLE -o bundle.tar     # host it, e.g. https://files.lan/bundle.tar
      edgekit flash dist/BUNDLE -o /media/boot/user-data --bundle-url https://files.lan/bundle.tar \\
          --bundle-sha256 SHA --hostname kitchen --admin-user pi --ssh-key "$(cat ~/.ssh/id_ed25519.pub)"
      edgekit flash dist/BUNDLE -o /media/boot/user-data --rootfs /media/rootfs --wheelhouse wheels-aarch64
    """
    from edgekit.deploy.flash import FlashOptions
    from edgekit.deploy.flash import flash as run_flash
    from edgekit.deploy.layout import DeviceLayout

    options = FlashOptions(bundle=bundle_dir, broker=_broker(**broker), bundle_url=bundle_url, bundle_sha256=bundle_sha256,
                           rootfs=rootfs, wheelhouse=wheelhouse, index_url=index_url, device_id=device_id, hostname=hostname,
                           pools=pools,
                           trust=trust, admin_user=admin_user, ssh_keys=ssh_keys,
                           layout=DeviceLayout(root=device_root, user=service_user, keep_bundles=keep))
    result = run_flash(options, user_data)

    def draw(_: Any) -> None:
        out.print(f"[green]wrote[/] {user_data} (cloud-init user-data for {result.bundle_id})")
        for path in result.copied_to:
            out.print(f"copied {path}")

    output.result({"user_data": str(user_data), "bundle_id": result.bundle_id, "copied_to": result.copied_to}, draw)


@click.command()
@click.argument("output", type=click.Path(file_okay=False, path_type=Path))
@click.option("--arch", type=click.Choice(["aarch64", "x86_64"]), default="aarch64", show_default=True)
@click.option("--python", "python_version", default="3.11", show_default=True,
              help="The device's Python (Raspberry Pi OS bookworm: 3.11).")
@friendly
def wheelhouse(output: Path, arch: str, python_version: str) -> None:
    """Download the runtime's wheels for a device platform, for `deploy --wheelhouse` on devices without internet.

    \b
    Example:
      edgekit wheelhouse wheels-aarch64 --arch aarch64 --python 3.11
    """
    from edgekit.deploy.wheelhouse import build

    with err.status(f"collecting wheels for {arch}, Python {python_version}"):
        wheels = build(output, arch, python_version)
    out.print(f"[green]wrote[/] {len(wheels)} wheels ({sum(w.stat().st_size for w in wheels) / 1024**2:.0f} MiB) to {output}")


COMMANDS = (keys, sign, deploy, pack, flash, wheelhouse)
