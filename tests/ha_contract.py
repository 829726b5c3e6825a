"""Home Assistant's MQTT discovery schema as written in its source, for testing edgekit's discovery.

Home Assistant's wheels need Python 3.13 or later, so its voluptuous schemas cannot run here. This
reads them instead (``ast``, no import): the keys each schema accepts and requires, the key
abbreviations, the supported platforms, the sensor device and state classes, and the discovery
topic pattern. ``python -m tests.ha_contract WHEEL`` writes ``tests/data/ha_mqtt_discovery.json``,
which the tests check payloads against; what this cannot see (value types, templates that render,
units per device class) stays unverified, and docs/home-assistant.md says so.

Get the wheel with ``pip download --no-deps --only-binary=:all: --python-version 3.14 homeassistant``.
"""

from __future__ import annotations

import ast
import json
import sys
import zipfile
from pathlib import Path
from typing import Any

CONTRACT = Path(__file__).parent / "data" / "ha_mqtt_discovery.json"
_MQTT = "homeassistant/components/mqtt/"


class _Source:
    """The wheel's modules, parsed, and the string constants they define (CONF_X = "x")."""

    def __init__(self, wheel: zipfile.ZipFile) -> None:
        self.wheel = wheel
        self.trees: dict[str, ast.Module] = {}
        self.strings: dict[str, str] = {}
        aliases: dict[str, str] = {}  # CONF_QOS = ATTR_QOS
        for module in ("homeassistant/const.py", f"{_MQTT}const.py", f"{_MQTT}abbreviations.py", f"{_MQTT}schemas.py",
                       f"{_MQTT}config.py", f"{_MQTT}sensor.py", f"{_MQTT}notify.py", f"{_MQTT}discovery.py",
                       "homeassistant/components/sensor/const.py"):
            tree = self.trees[module] = ast.parse(wheel.read(module))
            for node in tree.body:
                target, value = _assignment(node)
                if target and isinstance(value, ast.Constant) and isinstance(value.value, str):
                    self.strings.setdefault(target, value.value)
                elif target and isinstance(value, ast.Name):
                    aliases.setdefault(target, value.id)
        for target, other in aliases.items():
            if other in self.strings:
                self.strings.setdefault(target, self.strings[other])

    def value(self, module: str, name: str) -> ast.expr:
        for node in self.trees[module].body:
            target, value = _assignment(node)
            if target == name and value is not None:
                return value
        raise KeyError(f"{module}: no {name}")

    def literal(self, module: str, name: str) -> Any:
        return ast.literal_eval(self.value(module, name))

    def keys(self, module: str, name: str) -> tuple[set[str], set[str]]:
        """(required, optional) keys of a schema, following the schemas it extends; the keys of schemas
        nested in a value (a device's, an availability entry's) are not this schema's own."""
        required: set[str] = set()
        optional: set[str] = set()
        pending: list[ast.AST] = [self.value(module, name)]
        while pending:
            node = pending.pop()
            if isinstance(node, ast.Dict):
                for key in node.keys:
                    if isinstance(key, ast.Call) and isinstance(key.func, ast.Attribute) and key.args:
                        (required if key.func.attr == "Required" else optional).add(self._resolve(key.args[0]))
                continue  # the values are other schemas' business
            if isinstance(node, ast.Name) and node.id.isupper() and "SCHEMA" in node.id and node.id != name:
                for other in (module, f"{_MQTT}schemas.py", f"{_MQTT}config.py"):
                    try:
                        more = self.keys(other, node.id)
                    except KeyError:
                        continue
                    required |= more[0]
                    optional |= more[1]
                    break
                continue
            pending.extend(ast.iter_child_nodes(node))
        return required, optional - required

    def enum_values(self, module: str, cls: str) -> list[str]:
        for node in self.trees[module].body:
            if isinstance(node, ast.ClassDef) and node.name == cls:
                return [v.value.value for v in node.body if isinstance(v, ast.Assign) and isinstance(v.value, ast.Constant)]
        raise KeyError(f"{module}: no class {cls}")

    def _resolve(self, node: ast.expr) -> str:
        if isinstance(node, ast.Constant):
            return str(node.value)
        if isinstance(node, ast.Name) and node.id in self.strings:
            return self.strings[node.id]
        raise ValueError(f"cannot resolve schema key {ast.dump(node)}")


def _assignment(node: ast.stmt) -> tuple[str | None, ast.expr | None]:
    if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
        return node.targets[0].id, node.value
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return node.target.id, node.value
    return None, None


def extract(wheel_path: Path) -> dict[str, Any]:
    with zipfile.ZipFile(wheel_path) as wheel:
        source = _Source(wheel)
        version = source.strings["__version__"] if "__version__" in source.strings else wheel_path.name.split("-")[1]

        def schema(module: str, name: str) -> dict[str, list[str]]:
            required, optional = source.keys(module, name)
            return {"required": sorted(required), "optional": sorted(optional)}

        return {
            "source": f"homeassistant {version} wheel ({wheel_path.name}), read with ast by tests/ha_contract.py",
            "topic_matcher": ast.literal_eval(source.value(f"{_MQTT}discovery.py", "TOPIC_MATCHER").args[0]),  # type: ignore[attr-defined]
            "supported_components": list(source.literal(f"{_MQTT}const.py", "SUPPORTED_COMPONENTS")),
            "abbreviations": source.literal(f"{_MQTT}abbreviations.py", "ABBREVIATIONS"),
            "device_abbreviations": source.literal(f"{_MQTT}abbreviations.py", "DEVICE_ABBREVIATIONS"),
            "origin_abbreviations": source.literal(f"{_MQTT}abbreviations.py", "ORIGIN_ABBREVIATIONS"),
            "device_discovery": schema(f"{_MQTT}schemas.py", "DEVICE_DISCOVERY_SCHEMA"),
            "device": schema(f"{_MQTT}schemas.py", "MQTT_ENTITY_DEVICE_INFO_SCHEMA"),
            "origin": schema(f"{_MQTT}schemas.py", "MQTT_ORIGIN_INFO_SCHEMA"),
            "platforms": {"sensor": schema(f"{_MQTT}sensor.py", "_PLATFORM_SCHEMA_BASE"),
                          "notify": schema(f"{_MQTT}notify.py", "PLATFORM_SCHEMA_MODERN")},
            "sensor_device_classes": source.enum_values("homeassistant/components/sensor/const.py", "SensorDeviceClass"),
            "sensor_state_classes": source.enum_values("homeassistant/components/sensor/const.py", "SensorStateClass"),
            "entity_categories": source.enum_values("homeassistant/const.py", "EntityCategory"),
        }


if __name__ == "__main__":
    contract = extract(Path(sys.argv[1]))
    CONTRACT.parent.mkdir(exist_ok=True)
    CONTRACT.write_text(json.dumps(contract, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {CONTRACT}")
