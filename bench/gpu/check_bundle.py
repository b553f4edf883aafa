"""Check a folder of wheels against itself: one version per project, and every requirement that
one wheel states on another project of the folder met by the version there (for CPython 3.12 on
Linux x86_64). Requirements on projects outside the folder are the GPU image's to meet.

    python3 bench/gpu/check_bundle.py .whl
"""

import sys
import zipfile
from pathlib import Path

from pip._vendor.packaging.requirements import Requirement
from pip._vendor.packaging.utils import canonicalize_name

TARGET = {"python_version": "3.12", "python_full_version": "3.12.0", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
          "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


def metadata(wheel: Path) -> tuple[str, str, list[str]]:
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(name).decode()
    fields: dict[str, list[str]] = {}
    for line in text.split("\n\n", 1)[0].splitlines():  # the headers end at the first blank line
        key, _, value = line.partition(": ")
        fields.setdefault(key, []).append(value.strip())
    return canonicalize_name(fields["Name"][0]), fields["Version"][0], fields.get("Requires-Dist", [])


def main(folder: str) -> int:
    found: dict[str, tuple[str, list[str]]] = {}
    problems = []
    for wheel in sorted(Path(folder).glob("*.whl")):
        name, version, requires = metadata(wheel)
        if name in found:
            problems.append(f"{name}: two versions, {found[name][0]} and {version}")
        found[name] = (version, requires)
    for name, (version, requires) in sorted(found.items()):
        for line in requires:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate(TARGET):
                continue
            other = found.get(canonicalize_name(req.name))
            if other is not None and not req.specifier.contains(other[0], prereleases=True):
                problems.append(f"{name} {version} requires {line}; the bundle has {other[0]}")
    for problem in problems:
        print(f"bundle: {problem}", file=sys.stderr)
    print(f"bundle: {len(found)} wheels, {'consistent' if not problems else f'{len(problems)} conflicts'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
