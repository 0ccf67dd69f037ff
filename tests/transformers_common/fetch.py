"""Extract Transformers' common test mixins from the pinned transformers sdist on PyPI (run by `make install`).

Usage: python tests/transformers_common/fetch.py
The version is the one pinned in requirements/constraints.txt; the archive's sha256 must match `SDIST_SHA256`.
"""

import hashlib
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONSTRAINTS = HERE.parents[1] / "requirements" / "constraints.txt"
SDIST_SHA256 = {"5.24.0": "906cb8c3cb2123575e263962586a4d21a979ce97feeb95fe6aaf66fe6ae88bf3"}
FILES = ("tests/test_modeling_common.py", "tests/test_configuration_common.py", "tests/test_processing_common.py")


def pinned_version() -> str:
    match = re.search(r"^transformers==(\S+)$", CONSTRAINTS.read_text(), flags=re.MULTILINE)
    if match is None:
        raise SystemExit(f"{CONSTRAINTS} pins no transformers version.")
    return match.group(1)


def main() -> None:
    version = pinned_version()
    if version not in SDIST_SHA256:
        raise SystemExit(f"No sha256 recorded for transformers {version}; add it to SDIST_SHA256 in {__file__}.")
    if all((HERE / Path(name).name).is_file() for name in FILES) and (HERE / "VERSION").is_file():
        if (HERE / "VERSION").read_text().strip() == version:
            return
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", f"transformers=={version}", "--no-binary", ":all:",
             "--no-deps", "--no-build-isolation", "--dest", tmp],
            check=True,
        )
        archive = Path(tmp) / f"transformers-{version}.tar.gz"
        digest = hashlib.sha256(archive.read_bytes()).hexdigest()
        if digest != SDIST_SHA256[version]:
            raise SystemExit(f"{archive.name}: sha256 {digest} != pinned {SDIST_SHA256[version]}.")
        with tarfile.open(archive) as tar:
            for name in (*FILES, "LICENSE"):
                member = tar.extractfile(f"transformers-{version}/{name}")
                (HERE / Path(name).name).write_bytes(member.read())
    (HERE / "LICENSE").rename(HERE / "LICENSE.transformers")
    (HERE / "VERSION").write_text(f"{version}\n")


if __name__ == "__main__":
    main()
