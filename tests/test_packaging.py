"""The package as pip installs it: the wheel holds the example config, the scenario templates, the
web files and the schema; an installed wheel hands out its example config; every library the
code imports is declared."""

from __future__ import annotations

import ast
import email
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from procs import REPO
from vmwebd import __version__

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the source tree, offline (no build isolation, no deps), so
    the build leaves nothing in the repository."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    shutil.copy2(REPO / "pyproject.toml", src)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "vmwebd", src / "vmwebd", symlinks=True, ignore=skip)
    shutil.copytree(REPO / "conf", src / "conf", ignore=skip)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(src),
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(tmp / "dist"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp,
    )
    assert proc.returncode == 0, proc.stderr
    wheels = list((tmp / "dist").glob("vmweb-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_package_conf_is_the_source_trees_conf():
    """vmwebd/conf is conf/ itself: the demo, the tests and an installed package read one set of
    files."""
    assert (REPO / "vmwebd" / "conf").resolve() == (REPO / "conf").resolve()


def test_wheel_holds_config_templates_web_files_and_schema(wheel):
    """The wheel holds the example vmwebd.xml, every scenario template, every static web file and
    the DOM's RelaxNG schema, plus both commands."""
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = {"vmwebd/conf/vmwebd.xml", "vmwebd/dom/schema.rng"}
    wanted |= {f"vmwebd/conf/templates/{p.name}" for p in (REPO / "conf" / "templates").glob("*.xml")}
    wanted |= {
        f"vmwebd/web/static/{p.name}" for p in (REPO / "vmwebd" / "web" / "static").iterdir() if p.is_file()
    }
    wanted |= {f"vmwebd/{p.relative_to(REPO / 'vmwebd')}" for p in (REPO / "vmwebd").rglob("*.rng")}
    assert len(wanted) > 6 and wanted - names == set()
    entry_points = zipfile.ZipFile(wheel).read(f"vmweb-{__version__}.dist-info/entry_points.txt").decode()
    assert "vmweb = vmwebd.cli:main" in entry_points and "vmwebd = vmwebd.daemon:main" in entry_points


def test_wheel_metadata(wheel):
    """The wheel's version is vmwebd.__version__; requests and argcomplete are requirements;
    libvirt-python is required only by the daemon extra."""
    meta = email.message_from_bytes(zipfile.ZipFile(wheel).read(f"vmweb-{__version__}.dist-info/METADATA"))
    assert meta["Version"] == __version__
    requires = meta.get_all("Requires-Dist")
    plain = {re.split(r"[<>=!;\[ ]", r)[0].lower() for r in requires if "extra ==" not in r}
    assert {"requests", "argcomplete", "zeep"} <= plain
    assert "libvirt-python" not in plain
    assert any(r.startswith("libvirt-python") and 'extra == "daemon"' in r for r in requires)


def test_installed_wheel_writes_its_example_config(wheel, tmp_path):
    """From the installed wheel (not the source tree), vmwebd --write-example-config DIR writes a
    config that loads as is, with its templates beside it, and --print-example-config prints it."""
    target = tmp_path / "site"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-index",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    env = dict(os.environ, PYTHONPATH=str(target))
    env.pop("NOTIFY_SOCKET", None)
    where = subprocess.run(
        [sys.executable, "-c", "import vmwebd; print(vmwebd.__file__)"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env,
    )
    assert where.stdout.startswith(str(target)), where  # the installed copy, not the repo's
    printed = subprocess.run(
        [sys.executable, "-m", "vmwebd.daemon", "--print-example-config"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env,
    )
    assert printed.returncode == 0 and printed.stdout == (REPO / "conf" / "vmwebd.xml").read_text()
    etc = tmp_path / "etc" / "vmwebd"
    wrote = subprocess.run(
        [sys.executable, "-m", "vmwebd.daemon", "--write-example-config", str(etc)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env,
    )
    assert wrote.returncode == 0, wrote.stderr
    assert sorted(p.name for p in (etc / "templates").iterdir()) == sorted(
        p.name for p in (REPO / "conf" / "templates").glob("*.xml")
    )
    from vmwebd.config import load_config
    from vmwebd.templates import load_templates

    config = load_config(etc / "vmwebd.xml")
    assert config.templates_dir == etc / "templates"
    assert set(load_templates(config.templates_dir)) == set(load_templates(REPO / "conf" / "templates"))
    again = subprocess.run(
        [sys.executable, "-m", "vmwebd.daemon", "--write-example-config", str(etc)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env,
    )
    assert again.returncode == 2 and "--write-example-config" in again.stderr
    assert "exists already" in again.stderr


def test_every_imported_library_is_declared():
    """Every third-party module vmwebd imports comes from a distribution pyproject.toml names
    (in its dependencies or an extra)."""
    declared = {
        re.split(r"[<>=!;\[ ]", r)[0].lower().replace("_", "-")
        for r in PYPROJECT["project"]["dependencies"]
        + [r for rs in PYPROJECT["project"]["optional-dependencies"].values() for r in rs]
    }
    providers = importlib.metadata.packages_distributions()
    missing = {}
    for path in (REPO / "vmwebd").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "vmwebd":
                    continue
                dists = {d.lower().replace("_", "-") for d in providers.get(top, [top])}
                if not dists & declared:
                    missing.setdefault(top, set()).add(str(path.relative_to(REPO)))
    assert missing == {}


def test_bootstrap_installs_the_daemon_extra():
    """scripts/bootstrap.sh installs the project with the daemon extra (libvirt-python) and the
    test tools, so `make bootstrap` on a fresh machine still gets everything."""
    text = (REPO / "scripts" / "bootstrap.sh").read_text()
    assert re.search(r"pip install -q -e '\.\[daemon,test\]'", text), text
    assert set(PYPROJECT["project"]["optional-dependencies"]) >= {"daemon", "test"}


def test_the_daemon_without_the_libvirt_binding_says_so_in_one_line():
    """On a Python where libvirt-python is missing (a CLI-only install), vmwebd exits 2 with one
    line naming the package and the extra to install, no traceback."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['libvirt'] = None; from vmwebd.daemon import main; "
        "sys.exit(main(['--config', '/nonexistent/vmwebd.xml']))"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p.stderr
    assert "libvirt-python" in p.stderr and "vmweb[daemon]" in p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
