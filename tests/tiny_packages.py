"""A tiny pure-Python wheel made on the spot, and a lock that depends on it, for the environment tests.

Nothing here touches the network: the wheel is a path source in pyproject.toml, and the lock
entry is written the way `uv lock` writes it (tests check it with `uv lock --check --offline`).
"""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path

PROBE = "convnets-probe"
PROBE_MODULE = "convnets_probe"


def make_wheel(folder: Path, name: str = PROBE, version: str = "1.0", source: str = "WHO = 'probe'\n") -> Path:
    """A valid py3-none-any wheel holding one module named after the distribution."""
    dist = name.replace("-", "_")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    info = f"{dist}-{version}.dist-info"
    files = {
        f"{dist}.py": source,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    with zipfile.ZipFile(path, "w") as wheel:
        for member, text in files.items():
            data = text.encode()
            wheel.writestr(member, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{member},sha256={digest},{len(data)}")
        record.append(f"{info}/RECORD,,")
        wheel.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return path


def add_wheel_dependency(project: Path, wheel: Path, package: str = "convnets") -> None:
    """Make `project` (its pyproject.toml and uv.lock) depend on `wheel`, a path source inside it."""
    relative = wheel.relative_to(project).as_posix()
    name = wheel.name.split("-")[0].replace("_", "-")
    version = wheel.name.split("-")[1]
    pyproject = project / "pyproject.toml"
    text = pyproject.read_text()
    text = text.replace("dependencies = [\n", f'dependencies = [\n    "{name}",\n', 1)
    source = f'{name} = {{ path = "{relative}" }}\n'
    if "\n[tool.uv.sources]\n" in text:
        text = text.replace("\n[tool.uv.sources]\n", f"\n[tool.uv.sources]\n{source}", 1)
    else:
        text += f"\n[tool.uv.sources]\n{source}"
    pyproject.write_text(text)

    lock = project / "uv.lock"
    text = lock.read_text()
    start = text.index(f'[[package]]\nname = "{package}"\n')
    at = text.index("dependencies = [\n", start) + len("dependencies = [\n")
    text = text[:at] + f'    {{ name = "{name}" }},\n' + text[at:]
    at = text.index("requires-dist = [\n", start) + len("requires-dist = [\n")
    text = text[:at] + f'    {{ name = "{name}", path = "{relative}" }},\n' + text[at:]
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    entry = (
        f'[[package]]\nname = "{name}"\nversion = "{version}"\nsource = {{ path = "{relative}" }}\n'
        f'wheels = [\n    {{ filename = "{wheel.name}", hash = "sha256:{digest}" }},\n]\n\n'
    )
    packages = [i for i in range(len(text)) if text.startswith("[[package]]\nname = ", i)]
    names = [text[i + len('[[package]]\nname = "') :].split('"', 1)[0] for i in packages]
    after = next((i for i, other in zip(packages, names) if other > name), len(text))
    lock.write_text(text[:after] + entry + text[after:])
