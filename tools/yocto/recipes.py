"""The layer's metadata read without bitbake: assignments, inherits, shell functions, packages, dependencies.

Enough of bitbake's syntax for the layer's own files, which oelint-adv keeps conventional: one assignment per line
once continuation lines are joined (``=``, ``?=``, ``??=``, ``:=``, ``+=``, ``=+``, ``.=``, ``=.``), ``inherit``
lines, and shell functions ``name() { ... }`` whose closing brace starts a line. There is no expansion beyond the
recipe's own variables and ``${PN}``, and no ``require``/``include``: a file that uses them raises, so that no check
reads half a recipe and passes. Overrides stay part of the name (``RDEPENDS:${PN}``, ``QB_MEM:qemuarm64``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

_ASSIGNMENT = re.compile(r'^([A-Za-z0-9_:${}./\[\]-]+)\s*(\?\?=|\?=|:=|\+=|\.=|=\+|=\.|=)\s*"(.*)"\s*$')
_FUNCTION = re.compile(r"^(?:python\s+)?([A-Za-z0-9_:${}-]+)\s*\(\)\s*\{\s*$")
_VERSION_CONSTRAINT = re.compile(r"\([^)]*\)")


class MetadataError(Exception):
    """A layer file uses syntax these readers do not model."""


def _logical_lines(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    if re.search(r"^\s*(require|include|include_all)\s", text, flags=re.MULTILINE):
        raise MetadataError(f"{path}: require/include is not modelled by tools/yocto/recipes.py")
    return re.sub(r"\\\n", " ", text).splitlines()


def bb_vars(path: Path) -> dict[str, str]:
    """Assignments of a recipe or conf file, name (with its overrides) -> value; ``+=`` and friends accumulate."""
    out: dict[str, str] = {}
    for line in _logical_lines(path):
        m = _ASSIGNMENT.match(line)
        if m:
            name, op, value = m.groups()
            value = " ".join(value.split())
            if op in ("+=", ".="):
                out[name] = f"{out.get(name, '')} {value}".strip()
            elif op in ("=+", "=."):
                out[name] = f"{value} {out.get(name, '')}".strip()
            elif op in ("?=", "??="):
                out.setdefault(name, value)
            else:
                out[name] = value
    return out


def inherits(path: Path) -> list[str]:
    """The classes a recipe inherits, in order (``inherit`` and ``inherit_defer`` lines)."""
    found: list[str] = []
    for line in _logical_lines(path):
        m = re.match(r"^\s*inherit(?:_defer)?\s+(.*)$", line)
        if m:
            found.extend(m.group(1).split())
    return found


def functions(path: Path) -> dict[str, str]:
    """Shell (and python) function bodies by name, e.g. ``do_install:append``; a repeated name accumulates."""
    out: dict[str, str] = {}
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = _FUNCTION.match(lines[i])
        if not m:
            i += 1
            continue
        body = []
        i += 1
        while i < len(lines) and not lines[i].startswith("}"):
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise MetadataError(f"{path}: function {m.group(1)} has no closing brace at the start of a line")
        out[m.group(1)] = "\n".join([*filter(None, [out.get(m.group(1))]), *body])
        i += 1
    return out


def dependency_names(value: str) -> list[str]:
    """Package names of an RDEPENDS-style value: version constraints such as ``(>= 1.0)`` dropped."""
    return _VERSION_CONSTRAINT.sub(" ", value).split()


@dataclass(frozen=True)
class Recipe:
    """One recipe file of the layer, read as the helpers above read it."""

    path: Path
    variables: dict[str, str] = field(repr=False)
    classes: tuple[str, ...]
    shell: dict[str, str] = field(repr=False)

    @classmethod
    def load(cls, path: Path) -> Recipe:
        return cls(path, bb_vars(path), tuple(inherits(path)), functions(path))

    @property
    def pn(self) -> str:
        return self.path.name.split("_")[0].removesuffix(".bb")

    @property
    def pv(self) -> str:
        stem = self.path.name.removesuffix(".bb")
        return self.variables.get("PV", stem.split("_", 1)[1] if "_" in stem else "1.0")

    def expand(self, value: str) -> str:
        """``${PN}``, ``${BPN}``, ``${PV}`` and the recipe's own plain variables; anything else stays as written."""
        known = {"PN": self.pn, "BPN": self.pn, "PV": self.pv}

        def one(m: re.Match[str]) -> str:
            name = m.group(1)
            if name in known:
                return known[name]
            if name in self.variables and ":" not in name:
                return self.expand(self.variables[name])
            return m.group(0)

        return re.sub(r"\$\{([A-Za-z0-9_-]+)\}", one, value)

    def var(self, name: str, default: str = "") -> str:
        return self.expand(self.variables.get(name, default))

    def values(self, base: str) -> dict[str, str]:
        """Every assignment to ``base`` with any override (``IMAGE_INSTALL``, ``IMAGE_INSTALL:append``, ...),
        name and value expanded."""
        return {
            self.expand(name): self.expand(value)
            for name, value in self.variables.items()
            if name == base or name.startswith(base + ":")
        }

    @property
    def packages(self) -> list[str]:
        """The packages the recipe makes: ``PACKAGES`` additions, ``${PN}-ptest`` with the ptest class, ``${PN}``."""
        pkgs = [*self.var("PACKAGES").split()]
        if "ptest" in self.classes:
            pkgs.append(f"{self.pn}-ptest")
        return [*dict.fromkeys([*pkgs, self.pn])]

    def runtime_deps(self, package: str) -> set[str]:
        """RDEPENDS and RRECOMMENDS of one of its packages, with any override (an image may take either)."""
        names: set[str] = set()
        for base in ("RDEPENDS", "RRECOMMENDS"):
            for name, value in self.variables.items():
                parts = self.expand(name).split(":")
                if parts[0] == base and len(parts) > 1 and parts[1] == package:
                    names.update(dependency_names(self.expand(value)))
        return names

    def image_install(self) -> set[str]:
        """What an image recipe installs by name: IMAGE_INSTALL and CORE_IMAGE_EXTRA_INSTALL, any override."""
        names: set[str] = set()
        for base in ("IMAGE_INSTALL", "CORE_IMAGE_EXTRA_INSTALL"):
            for value in self.values(base).values():
                names.update(n for n in dependency_names(value) if not n.startswith("${"))
        return names

    @property
    def is_image(self) -> bool:
        return any(c in ("core-image", "image") for c in self.classes)


def layer_recipes(layer: Path) -> list[Recipe]:
    return [Recipe.load(p) for p in sorted(layer.rglob("*.bb"))]
