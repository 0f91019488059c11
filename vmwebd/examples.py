"""The example configuration shipped inside the package: ``vmwebd.xml`` and the scenario templates.

They are the source tree's ``conf/`` files (``vmwebd/conf`` is a link to that directory, so the
demo, the tests and an installed package read the same files). ``vmwebd --print-example-config``
and ``vmwebd --write-example-config DIR`` hand them out; the config names its templates directory
relative to itself (``<templates dir="templates"/>``), so a directory written here works as is.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

CONFIG_NAME = "vmwebd.xml"
TEMPLATES_DIR = "templates"


def _conf():
    return resources.files("vmwebd") / "conf"


def example_config() -> str:
    """The text of the example ``vmwebd.xml``."""
    return (_conf() / CONFIG_NAME).read_text(encoding="utf-8")


def example_templates() -> dict[str, str]:
    """The example scenario templates: file name → text, sorted by name."""
    found = [f for f in (_conf() / TEMPLATES_DIR).iterdir() if f.name.endswith(".xml")]
    return {f.name: f.read_text(encoding="utf-8") for f in sorted(found, key=lambda f: f.name)}


def write_example_config(directory: str | Path) -> list[Path]:
    """Writes ``DIR/vmwebd.xml`` and ``DIR/templates/*.xml`` (making the directories) and returns
    the files written. Overwrites nothing: when any of them exists, FileExistsError names it and
    no file is written."""
    directory = Path(directory)
    files = {directory / CONFIG_NAME: example_config()}
    files.update({directory / TEMPLATES_DIR / name: text for name, text in example_templates().items()})
    for path in files:
        if path.exists() or path.is_symlink():
            raise FileExistsError(f"{path} exists already (not overwritten)")
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        # "x": never replace a file that appeared since the check above.
        with open(path, "x", encoding="utf-8") as f:
            f.write(text)
    return list(files)
