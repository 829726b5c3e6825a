"""Where edgekit lives on a device: one layout shared by `edgekit deploy` and `edgekit flash`.

``/opt/edgekit/venv`` (runtime only), ``/opt/edgekit/bundles/<name>-<sha>/`` with a ``current`` link
switched atomically, ``/etc/edgekit/daemon.yaml`` (0600, owned by the service user) and the systemd
unit. ``root`` moves all of it under another directory: a mounted SD card's root filesystem, or a
scratch folder for staging and tests.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import PurePosixPath

UNIT_NAME = "edgekit.service"


@dataclass(frozen=True)
class DeviceLayout:
    """Paths on the device (POSIX, as the device sees them)."""

    root: str = "/"
    user: str = "edgekit"  # the dedicated system user the daemon runs as
    keep_bundles: int = 3  # bundles kept on the device, current and previous included

    def _path(self, *parts: str) -> str:
        return str(PurePosixPath(self.root, *parts))

    @property
    def home(self) -> str:
        return self._path("opt", "edgekit")

    @property
    def venv(self) -> str:
        return self._path("opt", "edgekit", "venv")

    @property
    def edgekit(self) -> str:
        """The runtime's command line entry point."""
        return self._path("opt", "edgekit", "venv", "bin", "edgekit")

    @property
    def bundles(self) -> str:
        return self._path("opt", "edgekit", "bundles")

    @property
    def incoming(self) -> str:
        """Partial copies live here until verified; nothing here is ever served."""
        return self._path("opt", "edgekit", "bundles", ".incoming")

    @property
    def wheelhouse(self) -> str:
        return self._path("opt", "edgekit", "wheelhouse")

    @property
    def current(self) -> str:
        return self._path("opt", "edgekit", "current")

    @property
    def etc(self) -> str:
        return self._path("etc", "edgekit")

    @property
    def config(self) -> str:
        return self._path("etc", "edgekit", "daemon.yaml")

    @property
    def unit_dir(self) -> str:
        return self._path("etc", "systemd", "system")

    @property
    def unit(self) -> str:
        return self._path("etc", "systemd", "system", UNIT_NAME)

    def bundle(self, bundle_id: str) -> str:
        return self._path("opt", "edgekit", "bundles", bundle_id)

    def staged(self, bundle_id: str) -> str:
        """Where a copy of ``bundle_id`` waits until it is verified."""
        return self._path("opt", "edgekit", "bundles", ".incoming", bundle_id)

    def shell_vars(self) -> str:
        """The layout as shell assignments, the preamble of every provisioning script."""
        values = {"EK_HOME": self.home, "EK_VENV": self.venv, "EK_BUNDLES": self.bundles, "EK_INCOMING": self.incoming,
                  "EK_WHEELHOUSE": self.wheelhouse, "EK_CURRENT": self.current, "EK_ETC": self.etc,
                  "EK_CONFIG": self.config, "EK_UNIT": self.unit, "EK_USER": self.user, "EK_KEEP": str(self.keep_bundles)}
        return "\n".join(f"{name}={shlex.quote(value)}" for name, value in values.items())
