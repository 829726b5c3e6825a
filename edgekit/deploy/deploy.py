"""`edgekit deploy`: put the runtime and a bundle onto one device over SSH, start it, check it, or roll back.

Order matters for safety: everything that can fail (probe, fit, runtime install, copy, on-device
verification) happens before ``current`` moves; after the switch, a device that does not come
online with the new bundle is switched back (or, on a first deploy, stopped and disabled).
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from edgekit import __version__
from edgekit import bundle as bundles
from edgekit.bundle import Manifest
from edgekit.deploy import provision
from edgekit.deploy.layout import UNIT_NAME, DeviceLayout
from edgekit.deploy.probe import VENV_BYTES, DeviceFacts, probe, problems
from edgekit.deploy.provision import Step
from edgekit.deploy.ssh import Remote, RemoteCommandFailed, Target
from edgekit.errors import BundleDamaged, EdgekitError
from edgekit.mqtt.settings import BrokerSettings, MqttVersion

_SIZES = r'''
import json, os, sys
base = sys.argv[1]
sizes = {}
for top, _, names in os.walk(base):
    for name in names:
        path = os.path.join(top, name)
        sizes[os.path.relpath(path, base)] = os.path.getsize(path)
print(json.dumps(sizes))
'''


@dataclass(frozen=True)
class DeployOptions:
    """Everything one deploy needs besides the device address."""

    bundle: Path
    # Where the device's daemon connects; password and TLS files are local files, copied to the device.
    broker: BrokerSettings = field(default_factory=lambda: BrokerSettings(protocol=MqttVersion.AUTO))
    device_id: str | None = None  # default: the device's hostname
    pools: tuple[str, ...] = ()
    trust: tuple[Path, ...] = ()  # public keys the device will require bundles to be signed with
    wheelhouse: Path | None = None  # install the runtime from these wheels instead of the index
    index_url: str | None = None  # else from this package index instead of the device's default
    layout: DeviceLayout = field(default_factory=DeviceLayout)
    online_timeout: float = 120.0
    dry_run: bool = False
    tune: bool = False  # after the deploy, `edgekit tune` on the device picks its thread count


@dataclass
class DeployReport:
    """What a deploy did, for the CLI's summary and ``--json``."""

    host: str
    bundle_id: str
    device_id: str = ""
    facts: dict[str, Any] = field(default_factory=dict)
    steps: list[dict[str, str]] = field(default_factory=list)
    bytes_copied: int = 0
    bytes_resumed: int = 0
    previous: str | None = None
    status: dict[str, Any] | None = None
    tune: dict[str, Any] | None = None  # `edgekit tune`'s report, with --tune
    outcome: str = "pending"  # deployed, dry-run, refused (nothing changed), rolled-back, failed
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Reporter(Protocol):
    """Progress hooks; the CLI draws them with rich, tests and Ansible runs use :class:`SilentReporter`."""

    def step(self, title: str) -> None:
        """A step is starting."""

    def copy(self, total: int) -> Callable[[int], None]:
        """Bytes are about to be copied; return a callable taking each chunk's size."""


class SilentReporter:
    """A reporter that reports nothing."""

    def step(self, title: str) -> None:
        pass

    def copy(self, total: int) -> Callable[[int], None]:
        return lambda n: None


class DeployFailed(EdgekitError):
    """A deploy that did not complete; ``report`` says how far it got and what became of the device."""

    def __init__(self, message: str, report: DeployReport) -> None:
        super().__init__(message)
        self.report = report


def deploy(target: Target, options: DeployOptions, reporter: Reporter | None = None) -> DeployReport:
    """Deploy ``options.bundle`` to ``target``; raise DeployFailed (after rolling back) when it fails."""
    report = DeployReport(host=target.destination, bundle_id="")
    try:
        return _deploy(target, options, reporter or SilentReporter(), report)
    except EdgekitError as exc:
        if report.outcome == "pending":
            report.outcome = "failed"
        report.error = str(exc)
        raise DeployFailed(str(exc), report) from exc


def _deploy(target: Target, options: DeployOptions, reporter: Reporter, report: DeployReport) -> DeployReport:
    layout = options.layout
    manifest = bundles.verify(options.bundle)  # a tampered or incomplete local bundle never leaves this machine
    bundle_id = report.bundle_id = bundles.bundle_id(options.bundle, manifest)
    with Remote(target) as remote:
        reporter.step(f"probing {target.host}")
        facts = probe(remote, layout)
        report.facts = facts.to_dict()
        report.device_id = options.device_id or facts.hostname
        report.previous = facts.current
        incoming = 0 if facts.current == layout.bundle(bundle_id) else manifest.size_bytes
        incoming += 0 if facts.runtime_version == __version__ else VENV_BYTES
        if found := problems(facts, manifest, incoming):
            report.outcome = "refused"
            raise EdgekitError(f"{target.host} cannot take {bundle_id}:\n  - " + "\n  - ".join(found))
        steps = _plan(options, manifest, facts, bundle_id, report.device_id)
        if options.dry_run:
            report.steps = [{"title": s.title, "detail": s.detail} for s in steps]
            report.outcome = "dry-run"
            return report
        for step in steps:
            reporter.step(step.title)
            report.steps.append({"title": step.title, "detail": step.detail})
            if step.kind == "wheelhouse":
                assert options.wheelhouse is not None
                _send_tree(remote, options.wheelhouse, layout.wheelhouse, report, reporter,
                           sorted(p.name for p in options.wheelhouse.iterdir() if p.is_file()))
            elif step.kind == "bundle":
                _stage_existing(remote, layout, bundle_id)
                _copy_bundle(remote, options.bundle, manifest, layout.staged(bundle_id), report, reporter)
                _verify_on_device(remote, options.bundle, manifest, layout, bundle_id, report, reporter)
            elif step.kind == "restart":
                try:
                    started = int(_run(remote, layout, step).split()[0])
                    report.status = _wait_online(remote, layout, report.device_id, manifest.name, started, options.online_timeout)
                except EdgekitError as exc:
                    reporter.step(f"rolling back: {exc}")
                    _roll_back(remote, layout, facts)
                    report.outcome = "rolled-back"
                    rolled = f"rolled back to {facts.current}" if facts.current else f"stopped and disabled {UNIT_NAME} (first deploy)"
                    raise EdgekitError(f"{bundle_id} did not come up on {target.host}: {exc}; {rolled}") from exc
            elif step.kind == "tune":
                try:
                    clock, _, tuned = _run(remote, layout, step).partition("\n")
                    report.tune = json.loads(tuned)
                    report.status = _wait_online(remote, layout, report.device_id, manifest.name, int(clock),
                                                 options.online_timeout)
                except EdgekitError as exc:
                    # The bundle is deployed and was online: a failed tuning is reported, not rolled back.
                    report.outcome = "deployed"
                    raise EdgekitError(f"{bundle_id} is deployed on {target.host}, but tuning failed: {exc}") from exc
            else:
                _run(remote, layout, step)
        report.outcome = "deployed"
    return report


def _plan(options: DeployOptions, manifest: Manifest, facts: DeviceFacts, bundle_id: str,
          device_id: str) -> list[Step]:
    """The steps of this deploy, in order (the copies are placeholders the runner does itself)."""
    layout = options.layout
    steps = [provision.prepare(layout), *provision.trust_keys(layout, options.trust)]
    if options.wheelhouse:
        steps.append(Step(f"copy the wheelhouse {options.wheelhouse} to {layout.wheelhouse}", "", kind="wheelhouse"))
    steps.append(provision.install_runtime(layout, __version__, options.wheelhouse is not None, options.index_url))
    steps.append(Step(f"copy {bundle_id} to {layout.staged(bundle_id)} (resumable) and verify every sha256 there", "",
                      kind="bundle"))
    steps += provision.config_steps(layout, options.broker, device_id, options.pools, options.trust, facts.trusted_keys > 0)
    steps.append(provision.install_unit(layout, provision.memory_limit(facts.ram_total, manifest.profile.ram_share)))
    steps.append(provision.activate(layout, bundle_id))
    steps.append(provision.enable_and_restart())
    steps.append(provision.prune())
    if options.tune:
        steps.append(provision.tune())
    return steps


def _run(remote: Remote, layout: DeviceLayout, step: Step) -> str:
    result = remote.run(f"set -eu\n{layout.shell_vars()}\n{step.script}", step.title)
    return result.stdout.decode(errors="replace")


def _copy_bundle(remote: Remote, folder: Path, manifest: Manifest, staged: str, report: DeployReport,
                 reporter: Reporter) -> None:
    """Send what the device lacks of the bundle, appending to partial files from an interrupted copy."""
    names = [bundles.MANIFEST] + [f.path for f in manifest.files]
    if (folder / bundles.SIGNATURE).is_file():
        names.append(bundles.SIGNATURE)
    _send_tree(remote, folder, staged, report, reporter, names)


def _send_tree(remote: Remote, local_dir: Path, remote_dir: str, report: DeployReport, reporter: Reporter,
               names: list[str]) -> None:
    sizes = json.loads(remote.run(f"mkdir -p {shlex.quote(remote_dir)}\npython3 - {shlex.quote(remote_dir)} <<'EOF'\n{_SIZES}\nEOF\n",
                                  f"listing {remote_dir}").stdout)
    plan = []
    for name in names:
        size, have = (local_dir / name).stat().st_size, sizes.get(name, 0)
        # Start over where the device's file is no prefix of ours, and for the manifest and its signature,
        # whose sizes say nothing about their content.
        if have > size or (have and name in (bundles.MANIFEST, bundles.SIGNATURE)):
            remote.run(f"rm -f {shlex.quote(f'{remote_dir}/{name}')}", f"removing a stale {name}")
            have = 0
        if have < size:
            plan.append((name, have, size))
            report.bytes_resumed += have
        parent = str(Path(name).parent)
        if parent != ".":
            remote.run(f"mkdir -p {shlex.quote(f'{remote_dir}/{parent}')}", f"creating {parent}")
    advance = reporter.copy(sum(size - have for _, have, size in plan))
    for name, have, size in plan:
        remote.upload(local_dir / name, f"{remote_dir}/{name}", offset=have, progress=advance)
        report.bytes_copied += size - have


def _stage_existing(remote: Remote, layout: DeviceLayout, bundle_id: str) -> None:
    """When the device has this bundle already, stage hard links to it: only what changed is sent, and
    the result is verified like any copy before it replaces the one in place."""
    final, staged = shlex.quote(layout.bundle(bundle_id)), shlex.quote(layout.staged(bundle_id))
    remote.run(f"if [ -d {final} ] && [ ! -e {staged} ]; then cp -al {final} {staged}; fi", "staging the bundle on the device")


def _verify_on_device(remote: Remote, folder: Path, manifest: Manifest, layout: DeviceLayout, bundle_id: str,
                      report: DeployReport, reporter: Reporter) -> None:
    """Check the copy on the device; a damaged copy is sent once more in full, then given up. A copy
    that is refused never stays in the staging folder."""
    staged = layout.staged(bundle_id)
    step = provision.verify_bundle(layout, bundle_id)
    remove = Step("remove the refused copy", f"rm -rf {shlex.quote(staged)}")
    for attempt in (1, 2):
        try:
            _run(remote, layout, step)
            return
        except EdgekitError as exc:
            _run(remote, layout, remove)
            # `edgekit verify` exits 3 for a damaged copy; anything else (a signature refusal) stays
            # refused however often it is sent.
            damaged = isinstance(exc, RemoteCommandFailed) and exc.status == BundleDamaged.exit_code
            if attempt == 2 or not damaged:
                raise
            reporter.step(f"copy did not verify ({exc}); copying again from scratch")
            _copy_bundle(remote, folder, manifest, staged, report, reporter)


def _wait_online(remote: Remote, layout: DeviceLayout, device_id: str, bundle_name: str, since: int,
                 timeout: float) -> dict[str, Any]:
    """Wait, from the device itself and with its own broker settings, for its new retained online status."""
    command = (f'"$EK_VENV/bin/edgekit" status --config "$EK_CONFIG" --device {shlex.quote(device_id)} '
               f"--wait-online --bundle {shlex.quote(bundle_name)} --since {since} --timeout {timeout:g} --json")
    output = _run(remote, layout, Step("wait for the device's online status", command))
    return json.loads(output)


def _roll_back(remote: Remote, layout: DeviceLayout, facts: DeviceFacts) -> None:
    """Put the previous bundle and config back and restart; on a first deploy, stop and disable the service."""
    if facts.current:
        script = f"""
{provision.switch_current(facts.current)}if [ -f "$EK_CONFIG.previous" ]; then mv -f "$EK_CONFIG.previous" "$EK_CONFIG"; fi
systemctl restart --no-block {UNIT_NAME}
"""
    else:
        script = f"systemctl disable --now {UNIT_NAME} >/dev/null 2>&1 || systemctl stop {UNIT_NAME}\nrm -f \"$EK_CURRENT\"\n"
    _run(remote, layout, Step("roll back", script))
