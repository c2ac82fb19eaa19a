"""One import root, and layers that hold: read from the source's imports and the built wheel."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import venv
import zipfile
from importlib.metadata import entry_points
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The folders of the project's layout, and the package each one is installed as.
FOLDERS = {
    "truscl": ROOT / "truscl",
    "truscl.agent": ROOT / "agent",
    "truscl.server": ROOT / "server",
    "truscl.sim": ROOT / "firmware_sim",
    "truscl.contracts": ROOT / "contracts",
}
CORE = ("truscl.wire", "truscl.privacy", "truscl.learning", "truscl.chain")
ROLES = ("truscl.agent", "truscl.server", "truscl.sim")
FACE = ("truscl.cli", "truscl.demo")


def modules() -> dict[str, Path]:
    """Every module of the source tree by its installed name (the symlinks under truscl/,
    which mirror the role folders, are left to the folders themselves)."""
    found: dict[str, Path] = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            relative = path.relative_to(folder)
            if "node_modules" in relative.parts:
                continue
            if package == "truscl" and relative.parts[0] in ("agent", "server", "sim", "contracts"):
                continue
            parts = [*package.split("."), *relative.with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports_of(path: Path, module: str) -> set[str]:
    """Absolute names of the truscl modules ``path`` imports, at any depth of the file."""
    names: set[str] = set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in names if name == "truscl" or name.startswith("truscl.")}


def within(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def violations(allowed: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    found = []
    for module, path in modules().items():
        if within(module, allowed):
            found += [
                f"{module} imports {name}"
                for name in sorted(imports_of(path, module))
                if within(name, forbidden)
            ]
    return found


def test_the_source_tree_has_every_layer_it_is_checked_for() -> None:
    names = modules()
    for package in (*CORE, *ROLES, *FACE, "truscl.contracts"):
        assert package in names, f"{package} is missing: the layering test would pass vacuously"
    assert "truscl.agent.device" in names and "truscl.server.rounds" in names


def test_the_shared_core_imports_no_role_and_not_the_face() -> None:
    assert violations(CORE, ROLES + FACE) == []


def test_the_agent_never_imports_the_simulator_nor_the_server() -> None:
    assert violations(("truscl.agent",), ("truscl.sim", "truscl.server", *FACE)) == []


def test_the_server_imports_no_device_and_no_simulator() -> None:
    assert violations(("truscl.server",), ("truscl.agent", "truscl.sim", *FACE)) == []


def test_the_simulator_stands_behind_the_drivers_not_beside_the_server() -> None:
    assert violations(("truscl.sim",), ("truscl.server", *FACE)) == []


def test_only_the_face_composes_roles() -> None:
    composers = []
    for module, path in modules().items():
        roles = {
            role for role in ROLES for name in imports_of(path, module) if within(name, (role,))
        }
        own = next((role for role in ROLES if within(module, (role,))), None)
        if len(roles - {own}) >= 2 or (own is None and len(roles) >= 2):
            composers.append(module)
    assert all(within(m, FACE) for m in composers), composers


def test_hardware_backends_are_found_by_name() -> None:
    backends = {ep.name: ep.value for ep in entry_points(group="truscl.hardware")}
    assert backends["pi"].startswith("truscl.agent.")
    assert backends["simulated"].startswith("truscl.sim.")


@pytest.mark.slow
def test_a_fresh_venv_gets_one_top_level_package(tmp_path: Path) -> None:
    # Prepare: the wheel a user's pip would build, from a copy of the tree (pip builds in place
    # and would leave build/ and egg-info/ behind in the checkout)
    source = tmp_path / "source"
    shutil.copytree(
        ROOT,
        source,
        symlinks=True,
        ignore=lambda folder, names: [
            name
            for name in names
            if name in ("node_modules", "__pycache__")
            or name.endswith((".egg-info", "_cache"))
            or (Path(folder) == ROOT and name in (".git", ".venv", "build", "dist"))
        ],
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
         "-w", str(tmp_path / "dist"), str(source)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("truscl-*.whl")
    fresh = tmp_path / "venv"
    venv.create(fresh, with_pip=True)
    python = fresh / "bin" / "python"
    site = Path(
        subprocess.check_output(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            text=True,
        ).strip()
    )
    before = {p.name for p in site.iterdir()}

    # Execute
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip

    # Assert: one package and its metadata, holding every module of every folder
    added = {p.name for p in site.iterdir()} - before
    packages = {name for name in added if not name.endswith(".dist-info")}
    assert packages == {"truscl"}, added
    installed = {
        str(p.relative_to(site).with_suffix("")).replace("/", ".").removesuffix(".__init__")
        for p in (site / "truscl").rglob("*.py")
    }
    assert set(modules()) <= installed, set(modules()) - installed
    assert (site / "truscl" / "contracts" / "build" / "Truscl.json").is_file()
    with zipfile.ZipFile(wheel) as archive:
        assert not [n for n in archive.namelist() if "node_modules" in n]
