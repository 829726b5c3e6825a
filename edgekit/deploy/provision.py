"""Provisioning steps as POSIX shell: the one definition `edgekit deploy` runs over SSH step by step
and `edgekit flash` writes into a first-boot script, so both set devices up the same way.

Every step is idempotent (running it twice changes nothing the second time) and writes files
atomically (temp file, chmod/chown, rename), so an interrupted step never leaves half a config.
"""

from __future__ import annotations

import base64
import shlex
from dataclasses import dataclass, replace
from pathlib import Path
from string import Template
from typing import Any

from edgekit.deploy.layout import UNIT_NAME, DeviceLayout
from edgekit.mqtt.settings import BrokerSettings
from edgekit.serve.config import DaemonConfig

MIB = 1024**2


@dataclass(frozen=True)
class Step:
    """One provisioning step: what it does in words (safe to print: never holds secrets) and its script."""

    title: str
    script: str
    detail: str = ""
    # "copy": done by the deploy runner itself; "restart" and "tune": followed by a health check
    kind: str = "script"


def _q(value: str) -> str:
    return shlex.quote(value)


def prepare(layout: DeviceLayout) -> Step:
    """The dedicated service user and the folders, owned so the daemon can read but not change them."""
    script = """
id -u "$EK_USER" >/dev/null 2>&1 || useradd --system --home-dir "$EK_HOME" --no-create-home --shell /usr/sbin/nologin "$EK_USER"
mkdir -p "$EK_HOME" "$EK_BUNDLES" "$EK_INCOMING" "$EK_ETC/trusted-keys"
chmod 755 "$EK_HOME" "$EK_BUNDLES"
chmod 700 "$EK_INCOMING"
chown root:"$EK_USER" "$EK_ETC"
chmod 750 "$EK_ETC"
"""
    return Step(f"create user {layout.user} and {layout.home}, {layout.etc}", script)


def install_runtime(layout: DeviceLayout, version: str, wheelhouse: bool, index_url: str | None = None) -> Step:
    """A virtualenv with edgekit's runtime (no torch, no transformers), skipped when already at ``version``.

    From the wheelhouse copied to the device, else from ``index_url`` (a private index or mirror),
    else from the device's configured package index.
    """
    if wheelhouse:
        source = '--no-index --find-links "$EK_WHEELHOUSE"'
    else:
        source = f"--index-url {_q(index_url)}" if index_url else ""
    script = f"""
have=$("$EK_VENV/bin/python" -c 'import edgekit; print(edgekit.__version__)' 2>/dev/null || true)
if [ "$have" = {_q(version)} ]; then echo "runtime {version} already installed"; exit 0; fi
if ! python3 -m venv "$EK_VENV" 2>/dev/null; then
  # Debian-family images ship venv without ensurepip in a separate package.
  command -v apt-get >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv >/dev/null
  python3 -m venv "$EK_VENV"
fi
"$EK_VENV/bin/pip" install --disable-pip-version-check --no-input -q {source} {_q(f"edgekit=={version}")}
"$EK_VENV/bin/edgekit" --version
"""
    where = "the wheelhouse copied along" if wheelhouse else (index_url or "the package index")
    return Step(f"install the edgekit {version} runtime into {layout.venv} from {where}", script)


def write_file(path: str, data: bytes, mode: int, owner: str, *, secret: bool = False) -> Step:
    """Write ``data`` to ``path`` atomically with ``mode`` and ``owner`` (``root`` or ``$EK_USER``)."""
    encoded = base64.encodebytes(data).decode()
    # The folder keeps the default mode (the service user must reach the file); the file itself is
    # created under umask 077, so a secret is never readable by others, not even before its chmod.
    script = f"""
dir=$(dirname {_q(path)}); [ -d "$dir" ] || install -d -m 755 "$dir"
umask 077
tmp=$(mktemp "$dir/.edgekit.XXXXXX")
base64 -d > "$tmp" <<'EDGEKIT_DATA'
{encoded}EDGEKIT_DATA
chmod {mode:o} "$tmp"
chown {owner}:{owner} "$tmp"
mv -f "$tmp" {_q(path)}
"""
    detail = "" if secret else data.decode(errors="replace")
    shown_owner = owner.replace("$EK_USER", "service user").replace('"', "")
    return Step(f"write {path} (mode {mode:o}, owner {shown_owner}{', secret' if secret else ''})", script, detail)


def write_config(layout: DeviceLayout, config_yaml: str) -> Step:
    """The daemon config, keeping the one it replaces as ``daemon.yaml.previous`` for rollback."""
    step = write_file(layout.config, config_yaml.encode(), 0o600, '"$EK_USER"')
    keep = '[ -f "$EK_CONFIG" ] && cp -p "$EK_CONFIG" "$EK_CONFIG.previous"\n'
    return Step(step.title, keep + step.script, step.detail)


def trust_keys(layout: DeviceLayout, trust: tuple[Path, ...]) -> list[Step]:
    """Install public keys the device will require bundles to be signed with (before any bundle is checked)."""
    from edgekit import signing

    steps = []
    for key in trust:
        kid = signing.key_id(signing.load_public(key))
        steps.append(write_file(f"{layout.etc}/trusted-keys/{kid}.pem", key.read_bytes(), 0o644, "root"))
    return steps


def config_steps(layout: DeviceLayout, broker: BrokerSettings, device_id: str | None, pools: tuple[str, ...],
                 trust: tuple[Path, ...], already_trusting: bool) -> list[Step]:
    """Broker secrets and TLS files, then the daemon config that names them and the trusted keys.

    ``broker`` names local files (password file, TLS); they are copied to the device, and the config
    names the copies. ``already_trusting``: the device already requires signed bundles. Its keys stay
    trusted, so leaving out ``--trust`` never turns signature checking off.
    """
    steps: list[Step] = []
    on_device: dict[str, Any] = {"password": None}
    if broker.password_file:
        remote = f"{layout.etc}/mqtt-password"
        steps.append(write_file(remote, broker.password_file.read_bytes(), 0o600, '"$EK_USER"', secret=True))
        on_device["password_file"] = Path(remote)
    for name in ("ca", "cert", "key"):
        local = getattr(broker, f"tls_{name}")
        if local:
            remote = f"{layout.etc}/tls/{name}.pem"
            steps.append(write_file(remote, local.read_bytes(), 0o600, '"$EK_USER"', secret=name == "key"))
            on_device[f"tls_{name}"] = Path(remote)
    config = DaemonConfig(bundle=Path(layout.current), broker=replace(broker, **on_device), device_id=device_id,
                          pools=pools, trusted_keys=(Path(f"{layout.etc}/trusted-keys"),) if trust or already_trusting else ())
    steps.append(write_config(layout, config.to_yaml()))
    return steps


def unit_text(layout: DeviceLayout, memory_max: int) -> str:
    """The systemd unit from ``deploy/systemd/edgekit.service`` with this layout and memory limit."""
    template = Template((_systemd_dir() / UNIT_NAME).read_text())
    return template.substitute(edgekit=layout.edgekit, config=layout.config, user=layout.user,
                               memory_max=f"{memory_max // MIB}M", memory_high=f"{memory_max * 9 // 10 // MIB}M")


def install_unit(layout: DeviceLayout, memory_max: int) -> Step:
    """Write the unit and have systemd re-read it."""
    step = write_file(layout.unit, unit_text(layout, memory_max).encode(), 0o644, "root")
    return Step(step.title, step.script + "systemctl daemon-reload\n", step.detail)


def memory_limit(ram_total: int, ram_share: float) -> int:
    """MemoryMax for the service: the profile's share of this device's RAM."""
    return int(ram_total * ram_share)


def verify_bundle(layout: DeviceLayout, bundle_id: str) -> Step:
    """Check every sha256 on the device with the device's own runtime, and the signature where keys are
    trusted; the staged copy when there is one, else the bundle already in place."""
    staged, final = layout.staged(bundle_id), layout.bundle(bundle_id)
    script = f"""
if [ -d {_q(staged)} ]; then set -- {_q(staged)}; else set -- {_q(final)}; fi
if ls "$EK_ETC"/trusted-keys/*.pem >/dev/null 2>&1; then set -- "$@" --trusted-key "$EK_ETC/trusted-keys"; fi
"$EK_VENV/bin/edgekit" verify "$@"
"""
    return Step(f"verify every file's sha256 (and the signature, where the device trusts keys) of {bundle_id}", script)


def switch_current(target: str) -> str:
    """Shell lines that point ``current`` at ``target`` atomically: a new link renamed over the old one."""
    return f'ln -sfn {_q(target)} "$EK_CURRENT.new"\nmv -T "$EK_CURRENT.new" "$EK_CURRENT"\n'


def activate(layout: DeviceLayout, bundle_id: str) -> Step:
    """Move the verified bundle into place and switch ``current`` to it."""
    staged, final = layout.staged(bundle_id), layout.bundle(bundle_id)
    script = f"""
if [ -d {_q(staged)} ]; then
  # Replacing a bundle already here (a new signature, say): two renames, so it is never half-replaced.
  if [ -e {_q(final)} ]; then mv {_q(final)} {_q(final)}.old; mv {_q(staged)} {_q(final)}; rm -rf {_q(final)}.old
  else mv {_q(staged)} {_q(final)}; fi
fi
chmod -R a+rX,go-w {_q(final)}
if [ -L "$EK_CURRENT" ]; then readlink "$EK_CURRENT" > "$EK_HOME/previous"; fi
{switch_current(final)}"""
    return Step(f"switch {layout.current} -> {final}", script)


def fetch_bundle(url: str, sha256: str, bundle_id: str) -> Step:
    """Download a packed bundle (``edgekit pack``), check its pinned sha256, unpack it for verification."""
    fetch = (
        "import hashlib, sys, urllib.request\n"
        "url, want, out = sys.argv[1:4]\n"
        "digest = hashlib.sha256()\n"
        "with urllib.request.urlopen(url, timeout=60) as src, open(out, 'wb') as dst:\n"
        "    while chunk := src.read(1 << 20):\n"
        "        digest.update(chunk); dst.write(chunk)\n"
        "if digest.hexdigest() != want:\n"
        "    sys.exit(f'{url}: sha256 {digest.hexdigest()} is not the pinned {want}')\n"
    )
    script = f"""
if [ -d "$EK_BUNDLES"/{_q(bundle_id)} ]; then echo "bundle {bundle_id} already on the device"; exit 0; fi
archive="$EK_INCOMING/{bundle_id}.tar"
python3 -c {_q(fetch)} {_q(url)} {_q(sha256)} "$archive"
rm -rf "$EK_INCOMING"/{_q(bundle_id)}
tar -xf "$archive" -C "$EK_INCOMING"
rm -f "$archive"
"""
    return Step(f"download the bundle from {url} (sha256 {sha256[:12]}...)", script)


def enable_and_restart() -> Step:
    """Enable the service at boot and (re)start it without waiting for readiness (the deploy's health
    check waits, with its own timeout); prints the device clock so that check knows the start time."""
    return Step(f"enable and restart {UNIT_NAME}",
                f"date +%s\nsystemctl enable {UNIT_NAME} >/dev/null 2>&1\nsystemctl restart --no-block {UNIT_NAME}\n",
                kind="restart")


def tune() -> Step:
    """`edgekit tune` on the device: each thread count measured with the daemon stopped, the fastest
    written into its config, the daemon started again; prints the device clock, then the JSON report."""
    return Step("measure thread counts on the device and keep the fastest (the daemon pauses meanwhile)",
                f'date +%s\n"$EK_VENV/bin/edgekit" tune --config "$EK_CONFIG" --unit {UNIT_NAME} --pause-daemon --json\n',
                kind="tune")


def prune() -> Step:
    """Keep the newest bundles up to the configured count, never the current or the previous one."""
    script = """
keep_current=$(readlink -f "$EK_CURRENT" 2>/dev/null || true)
keep_previous=$(cat "$EK_HOME/previous" 2>/dev/null || true)
count=0
for dir in $(ls -1td "$EK_BUNDLES"/*/ 2>/dev/null); do
  dir=${dir%/}
  count=$((count + 1))
  if [ "$dir" = "$keep_current" ] || [ "$dir" = "$keep_previous" ] || [ "$count" -le "$EK_KEEP" ]; then continue; fi
  echo "pruned $dir"; rm -rf "$dir"
done
"""
    return Step("prune old bundles (keep the newest, the current and the previous one)", script)


def script(layout: DeviceLayout, steps: list[Step]) -> str:
    """One POSIX shell script running ``steps`` in order, stopping at the first failure."""
    parts = ["#!/bin/sh", "# Written by edgekit: provisions the edgekit daemon (see `edgekit flash --help`).",
             "set -eu", layout.shell_vars()]
    for number, step in enumerate(steps, 1):
        # Each step in a subshell: an `exit 0` that skips a finished step ends that step only.
        parts.append(f"echo 'edgekit provision step {number}/{len(steps)}: {step.title.replace(chr(39), '')}'\n"
                     f"(\nset -eu\n{step.script.strip()}\n)")
    return "\n".join(parts) + "\n"


def _systemd_dir() -> Path:
    """The unit template: inside the installed package, or under deploy/ in a source checkout."""
    packaged = Path(__file__).parent / "systemd"
    return packaged if packaged.is_dir() else Path(__file__).parents[2] / "deploy" / "systemd"
